"""Transformer Copilot: a Copilot decoder that learns from the Pilot's mistake log and rectifies its predictions.

``model: class_path: lightning_ft.copilot.CopilotCausalLM`` (or ``CopilotCausalLM`` with the ``lightning-ft``
CLI), or mix :class:`CopilotMixin` into your own composition, e.g.
``class M(CopilotMixin, MaskedThoughtMixin, CausalLMModule)``.
"""

from lightning_ft.copilot.decoder import CopilotConfig, CopilotDecoder, CopilotLayer, DecoderCache, pack_stream
from lightning_ft.copilot.fusion import CopilotLogitsProcessor, PilotCapture, fuse_log_probs, fuse_probs
from lightning_ft.copilot.log import MistakeLog, Round
from lightning_ft.copilot.mixin import LAMBDA_GRID, CopilotMixin
from lightning_ft.modules.causal_lm import CausalLMModule

__all__ = [
    "LAMBDA_GRID",
    "CopilotCausalLM",
    "CopilotConfig",
    "CopilotDecoder",
    "CopilotLayer",
    "CopilotLogitsProcessor",
    "CopilotMixin",
    "DecoderCache",
    "MistakeLog",
    "PilotCapture",
    "Round",
    "fuse_log_probs",
    "fuse_probs",
    "pack_stream",
]


class CopilotCausalLM(CopilotMixin, CausalLMModule):
    """:class:`~lightning_ft.modules.CausalLMModule` trained as a Pilot with a Copilot (see :class:`CopilotMixin`)."""
