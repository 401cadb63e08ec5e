"""Distributed pieces: the sparse-gradient DDP communication hook and the sharded-strategy checks.

FSDP: the callbacks that select or edit weights keep masks, ``requires_grad`` flags or in-place edits over whole
tensors, which FSDP's flat sharded parameters do not expose; each of them refuses a sharded strategy in ``setup()``
(driven by :mod:`lightning_ft.support`) with one sentence naming the strategy to use instead.

:func:`destroy_process_group_at_exit` destroys a gloo group before the interpreter's teardown, which otherwise
now and then kills a rank of a finished CPU run with SIGABRT.
"""

from lightning_ft.strategies.process_group import destroy_process_group_at_exit
from lightning_ft.strategies.sparse_ddp import (
    SparseCommState,
    compact_gradients,
    scatter_gradients,
    sparse_allreduce_hook,
)

__all__ = [
    "SparseCommState",
    "compact_gradients",
    "destroy_process_group_at_exit",
    "scatter_gradients",
    "sparse_allreduce_hook",
]
