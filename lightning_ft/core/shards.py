"""Row shards of FSDP2 parameters, as the methods see them: this process's rows, the whole tensor, agreement.

Under FSDP2 (``fully_shard``) a parameter is a ``DTensor`` whose local part is a block of rows (``Shard(0)``). The
methods edit those rows in place (:func:`local`), gather a whole tensor one at a time where the math needs it
(:func:`full_tensor`), know which rows they hold (:func:`shard_info`) and agree on per-tensor decisions
(:func:`any_rank`). Outside FSDP2 each helper returns its argument as it is, so the same code serves every strategy.
Torch only: importing this module does not import Lightning (the sparse artifact and the snapshot use it).
"""

from __future__ import annotations

import threading

import torch
from torch import nn

__all__ = [
    "any_rank",
    "average_gradients",
    "full_tensor",
    "gather_rows",
    "gathered_state",
    "guard_optimizer_state_init",
    "initializing_optimizer_state",
    "is_dtensor",
    "is_sharded",
    "local",
    "rows_like",
    "shard_info",
]

_STATE_INIT = threading.local()


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` has been applied to ``module`` (or any module inside it)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP2 parameter, its gradient, or state sharded like it)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def rows_like(rows: torch.Tensor, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """This rank's ``rows`` of a tensor of global ``shape`` sharded by rows as ``like`` is (a ``DTensor``), so that a
    distributed checkpoint writes and reads each rank's rows at their place. Not a collective."""
    from torch.distributed.tensor import DTensor

    stride = tuple(int(torch.Size(shape)[i + 1 :].numel()) for i in range(len(shape)))
    return DTensor.from_local(rows, like.device_mesh, like.placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)  # fmt: skip


def gather_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor whose rows this rank holds as ``like`` holds its own (a collective: every rank calls it)."""
    if not is_dtensor(like):
        return rows
    return rows_like(rows, like, (like.shape[0], *rows.shape[1:])).full_tensor()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (a view that in-place edits write through), else ``tensor`` itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ``DTensor`` (a collective: every rank must call it), else ``tensor`` itself."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def shard_info(tensor: torch.Tensor) -> tuple[int, int] | None:
    """``(first row, rows)`` of this rank's shard along dim 0 of a row-sharded ``DTensor``; ``None`` if not sharded.

    FSDP2 shards dim 0 in ``ceil(rows / world)`` pieces; the last ranks may hold fewer rows, or none.
    """
    if not is_dtensor(tensor):
        return None
    mesh = tensor.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    chunk = -(-tensor.shape[0] // world)
    start = min(rank * chunk, tensor.shape[0])
    return start, tensor.to_local().shape[0] if tensor.ndim else 0


def any_rank(flags: list[bool], sharded: bool) -> list[bool]:
    """Each flag OR-ed over the processes when ``sharded`` (each process decided on its own shard), else as given.

    A collective when ``sharded``: every rank must call it with as many flags.
    """
    if not sharded or not torch.distributed.is_initialized() or not flags:
        return flags
    votes = torch.tensor([float(f) for f in flags])
    torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in votes.tolist()]


def average_gradients(params: list[torch.Tensor]) -> None:
    """Average the gradients of a module every process holds whole (not sharded: e.g. the Copilot under FSDP2) over
    the processes, in one all-reduce, as DDP would. A collective: every rank calls it with the same parameters."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    start = 0
    for grad in grads:
        grad.copy_(flat[start : start + grad.numel()].view_as(grad))
        start += grad.numel()


def initializing_optimizer_state() -> bool:
    """Whether torch's distributed checkpointing is running its state-initialising ``optimizer.step()`` right now.

    ``get_optimizer_state_dict`` (every distributed checkpoint save and load) first runs one ``step()`` with zero
    gradients and a zero learning rate on an optimizer that holds no state yet, so that every parameter gets state.
    A method that wraps ``optimizer.step`` (``SparseFineTuning``'s compact AdamW) must not count that as a step;
    :func:`guard_optimizer_state_init` makes this flag tell it.
    """
    return bool(getattr(_STATE_INIT, "active", False))


def guard_optimizer_state_init() -> None:
    """Make :func:`initializing_optimizer_state` true while torch initialises optimizer state for a distributed
    checkpoint (wraps ``torch.distributed.checkpoint.state_dict._init_optim_state`` once; idempotent)."""
    import torch.distributed.checkpoint.state_dict as dcp_state

    original = dcp_state._init_optim_state
    if getattr(original, "_lightning_ft_guard", False):
        return

    def guarded(optim: torch.optim.Optimizer) -> None:
        _STATE_INIT.active = True
        try:
            original(optim)
        finally:
            _STATE_INIT.active = False

    guarded._lightning_ft_guard = True  # type: ignore[attr-defined]
    dcp_state._init_optim_state = guarded


def gathered_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with whole tensors (each ``DTensor`` all-gathered: every process must call it)."""
    return {key: full_tensor(value) for key, value in module.state_dict().items()}
