"""DataModules and collators."""

from lightning_ft.data.classification import ClassificationDataModule
from lightning_ft.data.instruction import InstructionDataModule

__all__ = ["ClassificationDataModule", "InstructionDataModule"]
