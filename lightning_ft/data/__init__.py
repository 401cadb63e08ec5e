"""DataModules and collators."""

from lightning_ft.data.classification import ClassificationDataModule
from lightning_ft.data.instruction import InstructionDataModule
from lightning_ft.data.preference import PreferenceCollator, PreferenceDataModule

__all__ = ["ClassificationDataModule", "InstructionDataModule", "PreferenceCollator", "PreferenceDataModule"]
