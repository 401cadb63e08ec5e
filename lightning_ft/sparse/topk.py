"""Exact, deterministic top-k selection over one tensor or over many tensors at once.

Scores are non-negative ``float32`` tensors. The global selection finds the k-th largest score by bisection on
the scores' bit patterns (for non-negative IEEE floats the integer order of the bits is the numeric order), so
it never concatenates the scores into one model-sized vector; about 31 counting passes find the threshold.
Ties at the threshold are broken by position (tensor order, then flat index), so exactly ``k`` entries are
chosen and every rank, run and resume chooses the same ones.

:func:`sharded_topk` is the same selection over tensors whose rows are split across the processes of a group (FSDP2):
each process passes the scores of its own rows, the counts of every bisection pass are all-reduced (one small
all-reduce per pass, for every tensor at once), and ties go by the global flat order (tensor, then rank, then
index), so the processes together choose exactly the entries one process holding the whole tensors would.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["allocate", "global_topk", "sharded_topk", "tensor_topk"]

_INF_BITS = 0x7F800000


def _bits(score: torch.Tensor) -> torch.Tensor:
    """The int32 view of a non-negative float32 score tensor (NaN treated as 0)."""
    clean = torch.nan_to_num(score.detach().float().reshape(-1), nan=0.0, posinf=float("inf")).clamp_min_(0.0)
    return clean.view(torch.int32)


def _pick(bits: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Exactly ``k`` flat indices per name with the largest bit values, ties by (name order, index)."""
    total = sum(b.numel() for b in bits.values())
    if k >= total:
        return {n: torch.arange(b.numel(), device=b.device) for n, b in bits.items()}
    if k <= 0:
        return {n: torch.empty(0, dtype=torch.long, device=b.device) for n, b in bits.items()}
    lo, hi = 0, _INF_BITS  # invariant: count(bits >= lo) >= k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(int((b >= mid).sum()) for b in bits.values()) >= k:
            lo = mid
        else:
            hi = mid - 1
    remaining = k - sum(int((b > lo).sum()) for b in bits.values())
    out: dict[str, torch.Tensor] = {}
    for name, b in bits.items():
        chosen = b > lo
        if remaining > 0:
            ties = (b == lo).nonzero().squeeze(1)[:remaining]
            chosen[ties] = True
            remaining -= ties.numel()
        out[name] = chosen.nonzero().squeeze(1)
    return out


def tensor_topk(score: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat indices of the ``k`` largest entries of one score tensor.

    Args:
        score: Non-negative scores of any shape.
        k: How many to keep (clamped to ``[0, numel]``).

    Returns:
        An int64 tensor of ``min(k, numel)`` flat indices in increasing order.
    """
    return _pick({"": _bits(score)}, k)[""]


def global_topk(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Sorted flat indices, per tensor, of the ``k`` largest entries over all tensors together.

    Args:
        scores: Name -> non-negative scores; the mapping's order breaks ties.
        k: How many entries to keep in total.

    Returns:
        Name -> int64 flat indices in increasing order; their counts sum to ``min(k, total)``.
    """
    return _pick({n: _bits(s) for n, s in scores.items()}, k)


def allocate(numels: Mapping[str, int], count: int) -> dict[str, int]:
    """Split ``count`` entries over tensors in proportion to their sizes, exactly (largest remainders).

    Args:
        numels: Name -> element count.
        count: Total to allocate (at most the sum of ``numels``).

    Returns:
        Name -> entries for that tensor; the values sum to ``count`` and never exceed the tensor's size.
    """
    total = sum(numels.values())
    if total == 0:
        return {n: 0 for n in numels}
    count = max(0, min(count, total))
    shares = {n: count * m / total for n, m in numels.items()}
    out = {n: min(numels[n], int(s)) for n, s in shares.items()}
    left = count - sum(out.values())
    position = {n: i for i, n in enumerate(numels)}
    order = sorted(numels, key=lambda n: (-(shares[n] - int(shares[n])), position[n]))
    for name in order:
        if left <= 0:
            break
        if out[name] < numels[name]:
            out[name] += 1
            left -= 1
    return out


def _all_reduce(values: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(values)
    return values


def sharded_topk(scores: Mapping[str, torch.Tensor], k: int | Mapping[str, int]) -> dict[str, torch.Tensor]:
    """:func:`global_topk` (``k`` an int) or one :func:`tensor_topk` per tensor (``k`` a mapping), over row shards.

    A collective over the default process group: every process calls it with the same names in the same order,
    each with the scores of its own rows (rank ``r`` holding the ``r``-th block of rows, as FSDP2's ``Shard(0)``).

    Args:
        scores: Name -> this process's non-negative scores.
        k: Entries to keep in total, or per name.

    Returns:
        Name -> int64 flat indices into this process's scores, in increasing order.
    """
    names = list(scores)
    bits = [_bits(scores[n]) for n in names]
    per_tensor = not isinstance(k, int)
    width = len(names) if per_tensor else 1

    def counts(predicate: Any) -> torch.Tensor:
        local = torch.tensor([int(predicate(i, b).sum()) for i, b in enumerate(bits)], dtype=torch.int64)
        return _all_reduce(local if per_tensor else local.sum().reshape(1))

    totals = counts(lambda i, b: torch.ones_like(b, dtype=torch.bool))
    wanted = torch.tensor([int(k[n]) for n in names] if per_tensor else [int(k)], dtype=torch.int64)  # type: ignore[index]
    wanted = torch.minimum(wanted.clamp_min(0), totals)
    lo = torch.zeros(width, dtype=torch.int64)
    hi = torch.full((width,), _INF_BITS, dtype=torch.int64)  # invariant: count(bits >= lo) >= wanted
    while bool((active := lo < hi).any()):
        mid = (lo + hi + 1) // 2
        ok = counts(lambda i, b, mid=mid: b >= int(mid[i if per_tensor else 0])) >= wanted
        lo, hi = torch.where(active & ok, mid, lo), torch.where(active & ~ok, mid - 1, hi)
    threshold = [int(lo[i if per_tensor else 0]) for i in range(len(names))]
    above = counts(lambda i, b: b > threshold[i])
    local_ties = torch.tensor([int((b == threshold[i]).sum()) for i, b in enumerate(bits)], dtype=torch.int64)
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    ties = [torch.empty_like(local_ties) for _ in range(world)]
    torch.distributed.all_gather(ties, local_ties)
    remaining = (wanted - above).tolist()
    take = []
    for i in range(len(names)):  # the global flat order: tensor, then rank (its block of rows), then index
        slot = i if per_tensor else 0
        mine = 0
        for r in range(world):
            given = max(0, min(remaining[slot], int(ties[r][i])))
            remaining[slot] -= given
            mine = given if r == rank else mine
        take.append(mine)
    out: dict[str, torch.Tensor] = {}
    for i, (name, b) in enumerate(zip(names, bits)):
        if int(wanted[i if per_tensor else 0]) == 0:
            out[name] = torch.empty(0, dtype=torch.long, device=b.device)
            continue
        chosen = b > threshold[i]
        if take[i]:
            chosen[(b == threshold[i]).nonzero().squeeze(1)[: take[i]]] = True
        out[name] = chosen.nonzero().squeeze(1)
    return out
