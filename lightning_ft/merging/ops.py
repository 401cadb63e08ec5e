"""Pure tensor operations on task vectors (``tau = theta_ft - theta_0``), one tensor at a time.

Every function here takes and returns plain tensors, has no I/O and no state, and is unit-tested
against hand-computed oracles. The streaming engine (:mod:`lightning_ft.merging.engine`), the
ComPEFT artifact code and the :class:`~lightning_ft.callbacks.lines.LiNeS` callback all call them.

Magnitude selections break ties by position (a stable descending sort), so the number of kept
entries is exact and deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

NonBlockScale = Literal["alpha", "one", "last"]

__all__ = [
    "breadcrumbs_mask",
    "disjoint_mean",
    "elect_sign",
    "lines_alpha_from_norms",
    "lines_factor",
    "lines_scale",
    "magnitude_mask",
    "task_arithmetic",
    "ternarize",
    "ties",
    "breadcrumbs",
    "uniform_soup",
]


# ----------------------------------------------------------------------------------------- LiNeS
def lines_factor(
    block: int | None, num_blocks: int, alpha: float, beta: float, non_block: NonBlockScale = "alpha"
) -> float:
    """LiNeS scaling factor of one parameter: ``alpha + beta * i / (L - 1)`` for block ``i``.

    Parameters outside the residual blocks (embeddings, final norm, head) get ``alpha`` (the official
    behaviour, ``non_block="alpha"``), ``1.0`` (``"one"``: keep their full update) or the last block's
    factor (``"last"``). With a single block (``L == 1``) that block is also the last: ``alpha + beta``.

    Args:
        block: Block index ``0..L-1``, or ``None`` outside the blocks.
        num_blocks: ``L``, the number of residual blocks.
        alpha: Factor of the first block (and, by default, of everything outside the blocks).
        beta: Added linearly with depth; the last block gets ``alpha + beta``.
        non_block: Factor rule for parameters outside the blocks.

    Returns:
        The factor ``lambda`` by which the update of that parameter is multiplied.
    """
    if block is None:
        if non_block == "alpha":
            return float(alpha)
        if non_block == "one":
            return 1.0
        if non_block == "last":
            return float(alpha + beta)
        raise ValueError(f"non_block_scale={non_block!r} is not one of 'alpha', 'one', 'last'.")
    if not 0 <= block < max(num_blocks, 1):
        raise ValueError(f"block {block} is outside 0..{num_blocks - 1}.")
    if num_blocks <= 1:
        return float(alpha + beta)
    return float(alpha + beta * block / (num_blocks - 1))


def lines_scale(theta0: torch.Tensor, theta: torch.Tensor, factor: float) -> torch.Tensor:
    """Return ``theta0 + factor * (theta - theta0)`` computed in fp32 and cast to ``theta``'s dtype.

    A factor of exactly 1 returns ``theta`` unchanged (bit for bit).
    """
    if factor == 1.0:
        return theta.clone()
    base = theta0.to(device=theta.device, dtype=torch.float32)
    return (base + factor * (theta.float() - base)).to(theta.dtype)


def lines_alpha_from_norms(norm_summed: float, norm_merged: float, num_tasks: int) -> float:
    """LiNeS-for-merging ``alpha = (||sum_t tau_t||_1 / ||tau_MTL||_1) / T`` (L1 norms of whole vectors).

    For task arithmetic (``tau_MTL = sum_t tau_t``) this is ``1 / T``: the first block gets the average.
    """
    if num_tasks < 1:
        raise ValueError("LiNeS for merging needs at least one task vector.")
    if norm_merged <= 0:
        return 1.0 / num_tasks
    return float(norm_summed / norm_merged / num_tasks)


# ------------------------------------------------------------------------------- magnitude masks
def _order_by_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Flat indices of ``x`` by decreasing ``|x|``, ties by position."""
    return torch.sort(x.abs().flatten(), descending=True, stable=True).indices


def magnitude_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask keeping exactly ``floor(density * numel)`` largest-magnitude entries of ``x``."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density={density} must be between 0 and 1.")
    keep = math.floor(density * x.numel() + 1e-9)
    mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    mask[_order_by_magnitude(x)[:keep]] = True
    return mask.view(x.shape)


def breadcrumbs_mask(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs mask of one tensor: drop the top ``gamma`` outliers and the small entries.

    The ``floor(gamma * n)`` largest-magnitude entries are removed, the next ``floor(density * n)``
    are kept, and everything smaller is removed (per tensor, as in mergekit's ``magnitude_outliers``).
    """
    if not (0.0 <= gamma <= 1.0 and 0.0 <= density <= 1.0 and density + gamma <= 1.0 + 1e-9):
        raise ValueError(f"density={density} and gamma={gamma} must be in [0, 1] with density + gamma <= 1.")
    n = x.numel()
    top = math.floor(gamma * n + 1e-9)
    keep = math.floor(density * n + 1e-9)
    mask = torch.zeros(n, dtype=torch.bool, device=x.device)
    mask[_order_by_magnitude(x)[top : top + keep]] = True
    return mask.view(x.shape)


# ---------------------------------------------------------------------------------- merge methods
def _stack(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    if not deltas:
        raise ValueError("A merge needs at least one task vector.")
    return torch.stack([d.float() for d in deltas])


def _weighted(stacked: torch.Tensor, weights: Sequence[float] | None) -> torch.Tensor:
    if weights is None:
        return stacked
    if len(weights) != stacked.shape[0]:
        raise ValueError(f"{len(weights)} weights were given for {stacked.shape[0]} task vectors.")
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    return stacked * w.view(-1, *([1] * (stacked.ndim - 1)))


def uniform_soup(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Uniform soup as a task vector: ``mean_t tau_t`` (so ``theta_0 + result = mean_t theta_t``)."""
    return _stack(deltas).mean(dim=0)


def task_arithmetic(
    deltas: Sequence[torch.Tensor], scaling: float = 1.0, weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Task arithmetic: ``scaling * sum_t w_t tau_t``."""
    return scaling * _weighted(_stack(deltas), weights).sum(dim=0)


def elect_sign(trimmed: torch.Tensor) -> torch.Tensor:
    """TIES sign election by total mass: ``sign(sum_t tau_t)`` per entry.

    Entries whose sum is exactly zero take the majority sign of the elected signs (the official
    ``resolve_sign``), here over the tensor.

    Args:
        trimmed: ``[T, ...]`` stacked (already trimmed) task vectors.

    Returns:
        A tensor of ``+1`` / ``-1`` (``0`` only when everything is zero) with shape ``trimmed.shape[1:]``.
    """
    sign = torch.sign(trimmed.sum(dim=0))
    majority = torch.sign(sign.sum())
    return torch.where(sign == 0, majority, sign)


def disjoint_mean(trimmed: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """TIES disjoint merge: mean of the entries that agree with the elected sign (zeros ignored)."""
    agree = (torch.sign(trimmed) == sign.unsqueeze(0)) & (trimmed != 0)
    total = (trimmed * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp_min(1)


def ties(
    deltas: Sequence[torch.Tensor],
    density: float = 0.2,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """TIES-merging: trim each task vector to its top ``density`` magnitudes, elect signs, disjoint mean."""
    stacked = _weighted(_stack(deltas), weights)
    trimmed = torch.stack([t * magnitude_mask(t, density) for t in stacked])
    return scaling * disjoint_mean(trimmed, elect_sign(trimmed))


def breadcrumbs(
    deltas: Sequence[torch.Tensor],
    density: float = 0.143,
    gamma: float = 0.007,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Model Breadcrumbs: ``scaling * sum_t m_t * tau_t`` with each ``m_t`` from :func:`breadcrumbs_mask`."""
    stacked = _weighted(_stack(deltas), weights)
    return scaling * torch.stack([t * breadcrumbs_mask(t, density, gamma) for t in stacked]).sum(dim=0)


# ------------------------------------------------------------------------------------- ComPEFT
def ternarize(x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """ComPEFT reconstruction of one tensor: ``scale * sign(x)`` on ``mask``, zero elsewhere (fp32)."""
    return torch.where(mask, torch.sign(x.float()) * scale, torch.zeros((), dtype=torch.float32, device=x.device))
