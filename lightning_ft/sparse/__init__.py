"""Sparse fine-tuning: selection rules, compact optimizer state, exact top-k and the sparse-delta artifact.

The Lightning callback that uses them is :class:`lightning_ft.callbacks.SparseFineTuning`.

The artifact (:mod:`lightning_ft.sparse.artifact`) is imported eagerly, since importing it registers its format
for merging; the selection rules import Lightning, so they and the other training helpers are imported on first
use (PEP 562), which keeps ``lightning-ft sparse-apply`` and ``decompress`` free of Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_ft.sparse.artifact import SparseDelta, SparseSource, apply_sparse, is_sparse_artifact

if TYPE_CHECKING:
    from lightning_ft.sparse.compact import CompactState, mask_gradient_, sparse_adamw_
    from lightning_ft.sparse.rules import (
        LotteryTicket,
        Magnitude,
        PrincipalWeights,
        Random,
        SelectionContext,
        SelectionRule,
        Sensitivity,
    )
    from lightning_ft.sparse.topk import allocate, global_topk, tensor_topk

_RULES = (
    "LotteryTicket",
    "Magnitude",
    "PrincipalWeights",
    "Random",
    "SelectionContext",
    "SelectionRule",
    "Sensitivity",
)
_LAZY = {
    **dict.fromkeys(("CompactState", "mask_gradient_", "sparse_adamw_"), "compact"),
    **dict.fromkeys(_RULES, "rules"),
    **dict.fromkeys(("allocate", "global_topk", "tensor_topk"), "topk"),
}

__all__ = [
    "CompactState",
    "LotteryTicket",
    "Magnitude",
    "PrincipalWeights",
    "Random",
    "SelectionContext",
    "SelectionRule",
    "Sensitivity",
    "SparseDelta",
    "SparseSource",
    "allocate",
    "apply_sparse",
    "global_topk",
    "is_sparse_artifact",
    "mask_gradient_",
    "sparse_adamw_",
    "tensor_topk",
]


def __getattr__(name: str) -> Any:
    """Import a training helper's submodule on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
