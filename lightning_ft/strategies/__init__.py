"""Distributed pieces: FSDP2 sharding, the sparse-gradient DDP communication hook and the clean process-group exit.

FSDP2 (:mod:`~lightning_ft.strategies.fsdp2`): our modules shard their backbone per block in ``configure_model``
under Lightning's ``ModelParallelStrategy``; :class:`FSDP2Strategy` (registered as ``strategy: fsdp2``) is that
strategy with data parallelism over every process and atomic distributed checkpoints. Each method declares whether
it works on shards (:mod:`lightning_ft.support`); the legacy ``FSDPStrategy`` and DeepSpeed flatten parameters and
are refused by every method with one sentence naming ``ModelParallelStrategy``.

:func:`destroy_process_group_at_exit` destroys a gloo group before the interpreter's teardown, which otherwise
now and then kills a rank of a finished CPU run with SIGABRT.
"""

from lightning_ft.strategies.fsdp2 import FSDP2Strategy, register_strategy
from lightning_ft.strategies.process_group import destroy_process_group_at_exit
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

register_strategy()
