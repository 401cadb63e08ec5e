"""Sparse-gradient DDP: a communication hook that all-reduces only the selected entries' gradients.

Under sparse fine-tuning every eligible tensor's gradient is zeroed outside its mask before the optimizer step,
so averaging the other entries across ranks is wasted bandwidth. :func:`sparse_allreduce_hook` replaces DDP's
bucket all-reduce: for each parameter of a bucket it gathers the gradient at the parameter's flat indices (the
whole gradient for a parameter without a mask, e.g. a densely trained head or the dense phase of LT-SFT),
averages that compact vector across ranks, and writes it back into the bucket (zeros elsewhere). Bytes on the
wire are proportional to the mask, not to the model. Every rank holds the same masks (rank 0's selection is
broadcast), so no indices travel. With an empty mask table it is DDP's plain average, with a byte counter.

:class:`~lightning_ft.callbacks.SparseFineTuning` installs it automatically under DDP (``sparse_ddp=False``
turns that off) and keeps :attr:`SparseCommState.masks` in step with its selections.
"""

# no ``from __future__ import annotations``: DDP's register_comm_hook compares the hook's real annotations
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["SparseCommState", "compact_gradients", "scatter_gradients", "sparse_allreduce_hook"]


@dataclass
class SparseCommState:
    """State of :func:`sparse_allreduce_hook`.

    Attributes:
        masks: ``id(parameter)`` -> flat indices whose gradient is communicated; parameters absent from it are
            communicated whole.
        process_group: The group to average over (``None``: the default group).
        bytes_sent: Bytes this rank passed to all-reduce since the last :meth:`reset`.
        buckets: Buckets communicated since the last :meth:`reset`.
    """

    masks: dict[int, torch.Tensor] = field(default_factory=dict)
    process_group: dist.ProcessGroup | None = None
    bytes_sent: int = 0
    buckets: int = 0

    def reset(self) -> None:
        """Zero the counters."""
        self.bytes_sent = self.buckets = 0


def compact_gradients(grads: list[torch.Tensor], masks: list[torch.Tensor | None]) -> torch.Tensor:
    """Concatenate, per gradient, its entries at the mask (or all of it when the mask is ``None``)."""
    pieces = [g.reshape(-1) if m is None else g.reshape(-1)[m] for g, m in zip(grads, masks)]
    return torch.cat(pieces) if pieces else torch.empty(0)


def scatter_gradients(views: list[torch.Tensor], masks: list[torch.Tensor | None], compact: torch.Tensor) -> None:
    """Inverse of :func:`compact_gradients` into flat ``views``: masked entries from ``compact``, zeros elsewhere."""
    offset = 0
    for view, mask in zip(views, masks):
        count = view.numel() if mask is None else mask.numel()
        piece = compact[offset : offset + count]
        if mask is None:
            view.copy_(piece)
        else:
            view.zero_()
            view[mask] = piece
        offset += count


def _bucket_views(bucket: dist.GradBucket) -> list[torch.Tensor] | None:
    """Flat views of each gradient inside the bucket's buffer (``None`` if the layout is not the plain concat)."""
    buffer = bucket.buffer()
    grads = bucket.gradients()
    if sum(g.numel() for g in grads) != buffer.numel():
        return None
    views, offset = [], 0
    for g in grads:
        views.append(buffer.narrow(0, offset, g.numel()))
        offset += g.numel()
    return views


def sparse_allreduce_hook(state: SparseCommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average only the masked gradient entries of the bucket across ranks."""
    buffer = bucket.buffer()
    views = _bucket_views(bucket)
    masks = [state.masks.get(id(p)) for p in bucket.parameters()] if views is not None else []
    if views is None or all(m is None for m in masks):
        views, masks = [buffer], [None]
    world = dist.get_world_size(state.process_group)
    compact = compact_gradients(views, masks).div_(world)
    state.bytes_sent += compact.numel() * compact.element_size()
    state.buckets += 1
    future = dist.all_reduce(compact, group=state.process_group, async_op=True).get_future()

    def finish(done: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        scatter_gradients(views, masks, done.value()[0])
        return buffer

    return future.then(finish)
