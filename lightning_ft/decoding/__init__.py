"""Decoding-time methods: Dynamic Logits Fusion (arXiv 2406.15480), weak-to-strong transfer of small experts into a
large base model at every decoding step.

``model: class_path: lightning_ft.decoding.LogitsFusionCausalLM`` in a ``predict`` config, :func:`fuse_generate` in
Python, or :class:`DynamicLogitsFusion` as a ``logits_processor`` of your own ``generate`` call.
"""

from lightning_ft.decoding.generate import LogitsFusionMixin, fuse_generate, load_causal_lm
from lightning_ft.decoding.logits_fusion import (
    PAPER_ALPHA_GRID,
    DynamicLogitsFusion,
    IncrementalLM,
    alpha_candidates,
    check_alpha_grid,
    check_same_vocabulary,
    choose_alphas,
    fuse_logits,
    kl_divergence,
    kl_matching_loss,
)
from lightning_ft.modules.causal_lm import CausalLMModule

__all__ = [
    "PAPER_ALPHA_GRID",
    "DynamicLogitsFusion",
    "IncrementalLM",
    "LogitsFusionCausalLM",
    "LogitsFusionMixin",
    "alpha_candidates",
    "check_alpha_grid",
    "check_same_vocabulary",
    "choose_alphas",
    "fuse_generate",
    "fuse_logits",
    "kl_divergence",
    "kl_matching_loss",
    "load_causal_lm",
]


class LogitsFusionCausalLM(LogitsFusionMixin, CausalLMModule):
    """:class:`~lightning_ft.modules.CausalLMModule` whose ``generate`` and ``predict`` fuse the backbone (the large
    base model) with small experts (see :class:`LogitsFusionMixin` for the ``fusion_*`` arguments)."""
