"""Objective-shaping mixins for :class:`~lightning_ft.modules.CausalLMModule` and the data they need.

Mixins combine by inheritance, outermost first, e.g.
``class M(MaskedThoughtMixin, MultiTokenHeadsMixin, TaskBalancedLossMixin, CausalLMModule)``. The ready-made
classes below are usable from YAML as ``model: class_path: lightning_ft.objectives.CAFTCausalLM`` (or the
short name ``CAFTCausalLM`` with the ``lightning-ft`` CLI).
"""

from lightning_ft.modules.causal_lm import CausalLMModule
from lightning_ft.objectives.grpo import GroupRelativeRewardMixin, group_advantages, label_match_reward
from lightning_ft.objectives.heads import MultiTokenHeadsMixin, chunked_unembedding_ce, heads_schedule
from lightning_ft.objectives.kasa import KaSALossMixin, kasa_terms
from lightning_ft.objectives.lofit import LoFiTCausalLM, LoFiTMixin, load_lofit_model
from lightning_ft.objectives.loramoe import LoRAMoECausalLM, LoRAMoEMixin, add_loramoe, balance_loss, load_loramoe
from lightning_ft.objectives.masked_thought import MaskedThoughtMixin, mask_response_tokens, masked_thought_rate
from lightning_ft.objectives.multitask import (
    MultiTaskDataModule,
    TaskBalancedLossMixin,
    mix_counts,
    task_balanced_loss,
)
from lightning_ft.objectives.preference import PreferenceLossMixin, preference_loss, sequence_logprobs
from lightning_ft.objectives.weights import (
    DiffWeights,
    KeyTokenWeights,
    SpanWeights,
    TokenWeightedDataModule,
    TokenWeighting,
)

__all__ = [
    "CAFTCausalLM",
    "DiffWeights",
    "GroupRelativeCausalLM",
    "GroupRelativeRewardMixin",
    "KaSACausalLM",
    "KaSALossMixin",
    "KeyTokenWeights",
    "LoFiTCausalLM",
    "LoFiTMixin",
    "LoRAMoECausalLM",
    "LoRAMoEMixin",
    "MaskedThoughtCausalLM",
    "MaskedThoughtMixin",
    "MultiTaskDataModule",
    "MultiTokenHeadsMixin",
    "PreferenceCausalLM",
    "PreferenceLossMixin",
    "SpanWeights",
    "TaskBalancedCausalLM",
    "TaskBalancedLossMixin",
    "TokenWeightedDataModule",
    "TokenWeighting",
    "add_loramoe",
    "balance_loss",
    "chunked_unembedding_ce",
    "group_advantages",
    "heads_schedule",
    "kasa_terms",
    "label_match_reward",
    "load_lofit_model",
    "load_loramoe",
    "mask_response_tokens",
    "masked_thought_rate",
    "mix_counts",
    "preference_loss",
    "sequence_logprobs",
    "task_balanced_loss",
]


class CAFTCausalLM(MultiTokenHeadsMixin, CausalLMModule):
    """:class:`~lightning_ft.modules.CausalLMModule` with CAFT multi-token heads (see :class:`MultiTokenHeadsMixin`)."""


class KaSACausalLM(KaSALossMixin, CausalLMModule):
    """:class:`~lightning_ft.modules.CausalLMModule` with KaSA's auxiliary terms (see :class:`KaSALossMixin`)."""


class MaskedThoughtCausalLM(MaskedThoughtMixin, CausalLMModule):
    """:class:`~lightning_ft.modules.CausalLMModule` with Masked Thought (see :class:`MaskedThoughtMixin`)."""


class TaskBalancedCausalLM(TaskBalancedLossMixin, CausalLMModule):
    """:class:`~lightning_ft.modules.CausalLMModule` with the task-balanced loss (:class:`TaskBalancedLossMixin`)."""


class PreferenceCausalLM(PreferenceLossMixin, CausalLMModule):
    """:class:`~lightning_ft.modules.CausalLMModule` trained with the DPO-family loss (see :class:`PreferenceLossMixin`)."""


class GroupRelativeCausalLM(GroupRelativeRewardMixin, CausalLMModule):
    """:class:`~lightning_ft.modules.CausalLMModule` trained by GRPO with a rule reward (see
    :class:`GroupRelativeRewardMixin`)."""
