"""LightningModules holding a transformers backbone."""

from lightning_ft.modules.causal_lm import CausalLMModule
from lightning_ft.modules.classification import SequenceClassificationModule

__all__ = ["CausalLMModule", "SequenceClassificationModule"]
