"""Callbacks: one file per method family. Importing this module registers their short names for YAML."""

from lightning_ft.callbacks.predictions import JsonlPredictionWriter
from lightning_ft.callbacks.report import ForgettingReport

__all__ = ["ForgettingReport", "JsonlPredictionWriter"]
