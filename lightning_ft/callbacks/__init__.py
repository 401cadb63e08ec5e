"""Callbacks: one file per method family. Importing this module registers their short names for YAML."""

from lightning_ft.callbacks.cofitune import CoFiTune
from lightning_ft.callbacks.corda import CorDAInit
from lightning_ft.callbacks.half import HalfFineTuning
from lightning_ft.callbacks.ist import ImportanceLayerSampling
from lightning_ft.callbacks.layerwise import LayerFreezing, LayerwiseSampling
from lightning_ft.callbacks.lines import LiNeS
from lightning_ft.callbacks.predictions import JsonlPredictionWriter
from lightning_ft.callbacks.report import ForgettingReport
from lightning_ft.callbacks.s2ft import S2FT
from lightning_ft.callbacks.sparse import SparseFineTuning
from lightning_ft.sparse.rules import LotteryTicket, Magnitude, PrincipalWeights, Random, Sensitivity

__all__ = [
    "CoFiTune",
    "CorDAInit",
    "ForgettingReport",
    "HalfFineTuning",
    "ImportanceLayerSampling",
    "JsonlPredictionWriter",
    "LayerFreezing",
    "LayerwiseSampling",
    "LiNeS",
    "LotteryTicket",
    "Magnitude",
    "PrincipalWeights",
    "Random",
    "S2FT",
    "Sensitivity",
    "SparseFineTuning",
]
