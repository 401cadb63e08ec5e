"""Cross-entropy through a model's unembedding (final norm and LM head) without holding the full logits."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["Unembedding", "chunked_unembedding_ce"]


def _ce_sum(unembed: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(unembed(rows).float(), targets, reduction="sum")


def chunked_unembedding_ce(
    rows: torch.Tensor, targets: torch.Tensor, unembed: Callable[[torch.Tensor], torch.Tensor], chunk_size: int
) -> torch.Tensor:
    """Summed cross-entropy of ``unembed(rows)`` against ``targets`` without holding all logits at once.

    The rows go through the unembedding ``chunk_size`` at a time; under autograd each chunk is
    recomputed in the backward pass (activation checkpointing), so at most ``chunk_size x vocab``
    logits exist at any moment, in the forward and in the backward pass.

    Args:
        rows: ``[N, H]`` hidden states at the positions that carry a target.
        targets: ``[N]`` token ids.
        unembed: hidden states -> logits (final norm and LM head).
        chunk_size: rows per chunk.

    Returns:
        The fp32 sum of the ``N`` cross-entropies (a zero connected to ``rows`` when ``N == 0``).
    """
    total = rows.sum().float() * 0.0
    fn = functools.partial(_ce_sum, unembed)
    for start in range(0, rows.shape[0], chunk_size):
        part_rows, part_targets = rows[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and (part_rows.requires_grad or any(p.requires_grad for p in _params(unembed))):
            total = total + checkpoint(fn, part_rows, part_targets, use_reentrant=False)
        else:
            total = total + fn(part_rows, part_targets)
    return total


def _params(fn: Callable[..., Any]) -> Iterator[nn.Parameter]:
    owner = getattr(fn, "__self__", fn)
    return owner.parameters() if isinstance(owner, nn.Module) else iter(())


class Unembedding(nn.Module):
    """Final norm (optional) then the LM head, applied row-wise; a view of the backbone's own modules."""

    def __init__(self, norm: nn.Module | None, head: nn.Module) -> None:
        super().__init__()
        self.parts = [m for m in (norm, head) if m is not None]  # plain list: not registered, not saved twice

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            rows = part(rows)
        return rows

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        for part in self.parts:
            yield from part.parameters(recurse)
