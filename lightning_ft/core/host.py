"""The host contract of the objective and Copilot mixins: what they need from the module they are mixed into.

A mixin (``class M(CopilotMixin, CausalLMModule)``) is a :class:`lightning.LightningModule` once mixed in, and it
calls the host's own methods: the loss (:meth:`ModuleHost.compute_loss`), the aligned logits, the evaluation hooks
and generation. :class:`ModuleHost` declares them once; :class:`~lightning_ft.modules.CausalLMModule` is the
host the library ships, and a user's own LightningModule can host a mixin by providing the members the mixin uses.

For type checkers the mixins derive from :data:`MixinBase`, which is :class:`lightning.LightningModule` for them and
``object`` at run time (the mixin takes its place in the host's MRO), and they reach the host's methods through
``cast(ModuleHost, super())`` or ``cast(ModuleHost, self)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["MixinBase", "ModuleHost"]


@runtime_checkable
class ModuleHost(Protocol):
    """What the mixins use of their host module beyond the LightningModule API.

    Attributes:
        backbone: The transformers model being fine-tuned (possibly peft-wrapped).
        tokenizer: Its tokenizer.
    """

    backbone: nn.Module
    tokenizer: Any

    def aligned_logits(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(logits [B, k, V], targets [B, k], weights [B, k] | None)``: ``logits[:, j]`` predicts
        ``targets[:, j]`` at the positions that carry a label."""
        ...

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The training loss of a batch (each mixin reshapes the one of the module it wraps)."""
        ...

    def eval_update(self, batch: dict[str, Any]) -> None:
        """Accumulate the evaluation metrics of one target or control batch."""
        ...

    def _log_eval(self, prefix: str) -> None:
        """Log the accumulated evaluation metrics under ``prefix/`` and reset them."""
        ...

    def evaluate(self, dataloaders: list[Any]) -> dict[str, float]:
        """The evaluation metrics over ``dataloaders`` outside the Trainer's loops."""
        ...

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The backbone's ``generate`` with the module's defaults."""
        ...


if TYPE_CHECKING:
    from lightning import LightningModule as MixinBase
else:
    MixinBase = object
