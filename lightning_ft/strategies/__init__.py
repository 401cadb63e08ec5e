"""Distributed pieces: FSDP2 sharding, the sparse-gradient DDP communication hook and the clean process-group exit.

FSDP2 (:mod:`~lightning_ft.strategies.fsdp2`): our modules shard their backbone per block in ``configure_model``
under Lightning's ``ModelParallelStrategy``; :class:`FSDP2Strategy` (registered as ``strategy: fsdp2``) is that
strategy with data parallelism over every process and atomic distributed checkpoints. Each method declares whether
it works on shards (:mod:`lightning_ft.support`); the legacy ``FSDPStrategy`` and DeepSpeed flatten parameters and
are refused by every method with one sentence naming ``strategy="fsdp2"`` or ``"ddp"``.

:func:`destroy_process_group_at_exit` (:mod:`lightning_ft.core.process_group`, where ``core`` reaches it) destroys a gloo group before the interpreter's teardown, which otherwise
now and then kills a rank of a finished CPU run with SIGABRT.
"""

from typing import Any

from lightning_ft.core.process_group import destroy_process_group_at_exit
from lightning_ft.strategies.sparse_ddp import (
    SparseCommState,
    compact_gradients,
    scatter_gradients,
    sparse_allreduce_hook,
)

__all__ = [
    "FSDP2Strategy",
    "SparseCommState",
    "compact_gradients",
    "destroy_process_group_at_exit",
    "scatter_gradients",
    "sparse_allreduce_hook",
]


def __getattr__(name: str) -> Any:
    if name in ("FSDP2Strategy", "register_strategy"):  # lazily: importing Lightning's strategies costs seconds
        from lightning_ft.strategies import fsdp2

        return getattr(fsdp2, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
