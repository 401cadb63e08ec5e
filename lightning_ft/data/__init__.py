"""DataModules and collators."""

from lightning_ft.data.classification import ClassificationDataModule
from lightning_ft.data.curriculum import CurriculumDataModule, CurriculumSampler
from lightning_ft.data.instruction import InstructionDataModule
from lightning_ft.data.preference import PreferenceCollator, PreferenceDataModule
from lightning_ft.data.ul2 import DenoisingDataModule, MixtureOfDenoisersCollator, PrefixLMMaskMixin

__all__ = [
    "ClassificationDataModule",
    "CurriculumDataModule",
    "CurriculumSampler",
    "DenoisingDataModule",
    "InstructionDataModule",
    "MixtureOfDenoisersCollator",
    "PreferenceCollator",
    "PreferenceDataModule",
    "PrefixLMMaskMixin",
]
