"""Sparse fine-tuning: selection rules, compact optimizer state, exact top-k and the sparse-delta artifact.

The Lightning callback that uses them is :class:`lightning_ft.callbacks.SparseFineTuning`.
"""

from lightning_ft.sparse.artifact import SparseDelta, SparseSource, apply_sparse, is_sparse_artifact
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
