"""The host contract of the objective and Copilot mixins: what they need from the module they are mixed into.

A mixin (``class M(CopilotMixin, CausalLMModule)``) is a :class:`lightning.LightningModule` once mixed in, and it
calls the host's own methods: the loss (:meth:`ModuleHost.compute_loss`), the aligned logits, the evaluation hooks
and generation. :class:`ModuleHost` declares them once; :class:`~lightning_ft.modules.CausalLMModule` is the
host the library ships, and a user's own LightningModule can host a mixin by providing the members the mixin uses.

For type checkers the mixins derive from :data:`MixinBase`, which is :class:`lightning.LightningModule` for them and
``object`` at run time (the mixin takes its place in the host's MRO), and they reach the host's methods through
``cast(ModuleHost, super())`` or ``cast(ModuleHost, self)``. Each mixin calls :func:`require_host` once its host is
built, so a host without a member the mixin uses is refused in one sentence instead of an ``AttributeError`` deep
inside.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["HOST_MEMBERS", "MixinBase", "ModuleHost", "require_host"]

#: the members of :class:`ModuleHost`, in the order :func:`require_host` checks them
HOST_MEMBERS = ("backbone", "tokenizer", "aligned_logits", "compute_loss", "eval_update", "_log_eval", "evaluate",
                "generate")  # fmt: skip


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


def _host_provides(module: object, mixin: type, member: str) -> bool:
    """Whether ``member`` comes from the host: a class after ``mixin`` in the module's MRO that is not part of the
    mixin itself (the mixin's own methods call the host's through ``super()``), or the instance (``backbone``...)."""
    mro = type(module).__mro__
    after = mro[mro.index(mixin) + 1 :] if mixin in mro else mro
    if any(member in vars(cls) for cls in after if cls not in mixin.__mro__):
        return True
    return member in vars(module) or member in getattr(module, "_modules", {})


def require_host(module: object, mixin: type, members: Sequence[str] = HOST_MEMBERS) -> None:
    """Refuse a host module that lacks a member of :class:`ModuleHost` the mixin uses.

    Args:
        module: The mixed module (call it once the host's ``__init__`` has run).
        mixin: The mixin class, named in the sentence.
        members: The members of :data:`HOST_MEMBERS` the mixin uses.

    Raises:
        TypeError: One sentence naming the mixin, the first missing member and the fix.
    """
    missing = next((m for m in members if not _host_provides(module, mixin, m)), None)
    if missing is not None:
        raise TypeError(
            f"{mixin.__name__} needs its host module's `{missing}`, which {type(module).__name__} lacks: mix it into "
            f"CausalLMModule (or a subclass), or give your module `{missing}` as lightning_ft.core.host.ModuleHost "
            "describes it."
        )


if TYPE_CHECKING:
    from lightning import LightningModule as MixinBase
else:
    MixinBase = object
