"""Pure tensor operations on task vectors (``tau = theta_ft - theta_0``), one tensor at a time.

Every function here takes and returns plain tensors, has no I/O and no state, and is unit-tested
against hand-computed oracles. The streaming engine (:mod:`lightning_ft.merging.engine`), the
ComPEFT artifact code and the :class:`~lightning_ft.callbacks.lines.LiNeS` callback all call them.

The merge methods compute what mergekit 0.1.5 computes (``generalized_task_arithmetic.py``, ``sparsify.py``,
``linear.py``), formula for formula, in the dtype of the task vectors they are given (the engine gives the
task-arithmetic family the base's dtype, as mergekit; linear accumulates in fp32). Per-tensor magnitude
selections keep exactly the stated number of entries; ties in magnitude at the cut are settled by the same torch
sort call mergekit makes (so the same entries as mergekit on the same torch version), and the per-row
Breadcrumbs selection breaks them by position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

NonBlockScale = Literal["alpha", "one", "last"]

__all__ = [
    "agreement",
    "bernoulli_mask",
    "breadcrumbs",
    "breadcrumbs_mask",
    "combine",
    "dare",
    "elect_sign",
    "l1_rescale",
    "linear",
    "lines_alpha_from_norms",
    "lines_factor",
    "lines_scale",
    "magnitude_mask",
    "sparsify",
    "task_arithmetic",
    "task_arithmetic_family",
    "ternarize",
    "ties",
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


# ------------------------------------------------------------------------------- sparsification
Sparsifier = Literal["magnitude", "breadcrumbs", "bernoulli"]
BreadcrumbsScope = Literal["tensor", "row"]


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} must be between 0 and 1.")


def _rank_by_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Rank of every entry by decreasing ``|x|`` within its row of the last dimension, ties by position."""
    flat = x.abs().reshape(-1, x.shape[-1])
    order = torch.sort(flat, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(flat.shape[-1], device=x.device).expand_as(order).contiguous())
    return ranks.view(x.shape)


_CHUNK = 1 << 20  # entries per slice of the elementwise passes below (their results do not depend on it)


def _sort_indices(magnitudes: torch.Tensor, descending: bool) -> torch.Tensor:
    """``torch.sort(magnitudes, descending).indices`` (mergekit's call, so the same order of equal values), sorting
    ``magnitudes`` in place: the sort's own copy of the values is not made (``magnitudes`` is a temporary)."""
    indices = torch.empty(magnitudes.shape, dtype=torch.int64, device=magnitudes.device)
    torch.sort(magnitudes, descending=descending, out=(magnitudes, indices))
    return indices


def magnitude_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim (mergekit ``magnitude``): keep the ``k = max(1, int(density * numel))`` largest ``|x|``.

    Over the whole flattened tensor; ``density >= 1`` keeps everything and ``density <= 0`` nothing. Ties in
    ``|x|`` at the cut are broken by ``torch.argsort`` on fp32 magnitudes, mergekit's own call, so the kept
    entries are mergekit's on the same torch version.
    """
    _check_fraction("density", density)
    if density >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    if density <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    shape, k, magnitudes = x.shape, max(1, int(density * x.numel())), x.abs().flatten().float()
    del x  # a caller's temporary (a lazily read task vector) is freed before the sort's memory is taken
    order = _sort_indices(magnitudes, descending=True)  # argsort(descending=True)'s order
    mask = torch.zeros(order.numel(), dtype=torch.bool, device=order.device)
    mask[order[:k]] = True
    return mask.view(shape)


def breadcrumbs_mask(x: torch.Tensor, density: float, gamma: float, scope: BreadcrumbsScope = "tensor") -> torch.Tensor:
    """Model Breadcrumbs mask of one tensor: drop the largest outliers and the small entries, keep the band between.

    ``scope="tensor"`` (mergekit ``magnitude_outliers``): over the flattened tensor of ``n`` entries sorted by
    ascending ``|x|`` (``torch.sort``, mergekit's call, which also settles ties), skip the ``n_bot`` smallest
    and keep the next ``int(density * n)``, i.e. drop the ``int(gamma * n)`` largest (fewer when
    ``density + gamma > 1``); ``density >= 1`` keeps everything. ``scope="row"`` (the official
    ``TaskVectorMiddleKeep``): per row of the last dimension of ``c`` entries, drop the ``int(gamma * c)`` largest
    and keep the next ``int(density * c)`` (ties by position; a 1-D tensor is one row, a scalar is kept).
    """
    _check_fraction("density", density)
    _check_fraction("gamma", gamma)
    if scope == "row":
        if x.ndim == 0:
            return torch.ones_like(x, dtype=torch.bool)
        top, keep = int(gamma * x.shape[-1]), int(density * x.shape[-1])
        rank = _rank_by_magnitude(x)
        return (rank >= top) & (rank < top + keep)
    if scope != "tensor":
        raise ValueError(f"scope={scope!r} is not one of 'tensor' (mergekit), 'row' (official Breadcrumbs code).")
    if density >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    n, shape, magnitudes = x.numel(), x.shape, x.abs().flatten().float()
    del x  # as in magnitude_mask: freed before the sort
    keep = int(density * n)
    bottom = max(0, n - keep - int(gamma * n))
    ascending = _sort_indices(magnitudes, descending=False)
    mask = torch.zeros(n, dtype=torch.bool, device=ascending.device)
    mask[ascending[bottom : bottom + keep]] = True
    return mask.view(shape)


def _bernoulli_dtype(x: torch.Tensor) -> torch.dtype:
    """mergekit's DARE working dtype: the tensor's own on GPU or for bf16, fp32 otherwise (CPU fp16 has no draw)."""
    return x.dtype if x.device.type != "cpu" or x.dtype == torch.bfloat16 else torch.float32


def bernoulli_mask(x: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE drop: keep each entry with probability ``density``, one Bernoulli draw per entry as mergekit draws it.

    The probabilities are a ``torch.full`` of ``density`` in mergekit's working dtype (fp32, or bf16 for a bf16
    tensor), so a seeded generator yields mergekit's masks.
    """
    _check_fraction("density", density)
    probabilities = torch.full(x.shape, density, dtype=_bernoulli_dtype(x), device=x.device)
    return torch.bernoulli(probabilities, generator=generator).bool()


def l1_rescale(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Scale the kept entries so their L1 norm matches the unpruned delta's (skipped when either is < 1e-7)."""
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def sparsify(
    delta: torch.Tensor,
    sparsifier: Sparsifier | None,
    density: float = 1.0,
    gamma: float = 0.01,
    rescale: bool = False,
    scope: BreadcrumbsScope = "tensor",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One model's task vector of one tensor after pruning (and the optional L1 rescale), in ``delta``'s dtype.

    ``density >= 1`` returns ``delta`` unchanged and draws no random numbers (as mergekit), except for
    row-scoped Breadcrumbs, whose ``gamma`` still drops the outliers of each row. The random drop masks and
    rescales in mergekit's working dtype (:func:`bernoulli_mask`) and casts back.
    """
    if sparsifier is None or (density >= 1 and not (sparsifier == "breadcrumbs" and scope == "row")):
        return delta
    work = delta
    if sparsifier == "magnitude":
        mask = magnitude_mask(delta, density)
    elif sparsifier == "breadcrumbs":
        mask = breadcrumbs_mask(delta, density, gamma, scope)
    elif sparsifier == "bernoulli":
        mask, work = bernoulli_mask(delta, density, generator), delta.to(_bernoulli_dtype(delta))
    else:
        raise ValueError(f"sparsifier={sparsifier!r} is not one of 'magnitude', 'breadcrumbs', 'bernoulli'.")
    kept = work * mask
    return (l1_rescale(work, kept) if rescale else kept).to(delta.dtype)


# ---------------------------------------------------------------------------------- merge methods
def _stack(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    if not deltas:
        raise ValueError("A merge needs at least one task vector.")
    return torch.stack(list(deltas))


def _per_model(value: float | Sequence[float] | None, count: int, name: str, default: float) -> list[float]:
    if value is None:
        return [default] * count
    if isinstance(value, (int, float)):
        return [float(value)] * count
    if len(value) != count:
        raise ValueError(f"{len(value)} values of {name} were given for {count} task vectors: give one per model.")
    return [float(v) for v in value]


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-model values as a ``[T, 1, ...]`` tensor broadcasting against stacked ``[T, ...]`` deltas."""
    return torch.tensor(list(values), dtype=like.dtype, device=like.device).view(-1, *([1] * (like.ndim - 1)))


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """TIES sign election (mergekit's ``sum`` consensus): ``+1`` where ``sum_t D_t >= 0``, else ``-1``.

    Args:
        weighted: ``[T, ...]`` stacked, trimmed and weighted task vectors ``D_t = w_t * tau_t``.

    Returns:
        ``+1`` / ``-1`` with shape ``weighted.shape[1:]``; an entry whose sum is exactly zero elects ``+1``.
    """
    return torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)


def agreement(weighted: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Which entries agree with the elected sign; a pruned (zero) entry never agrees."""
    return torch.sign(weighted) == sign.unsqueeze(0)


def combine(
    weighted: torch.Tensor, weights: torch.Tensor, consensus: bool, normalize: bool, lam: float = 1.0
) -> torch.Tensor:
    """Mix weighted task vectors ``D_t``: plain sum, or the TIES disjoint sum over sign-agreeing entries.

    ``normalize`` divides by the sum of the weights: of all models (a constant) without consensus, of the
    agreeing models per entry with it (the disjoint mean); a zero divisor counts as 1. ``lam`` scales the result.

    Args:
        weighted: ``[T, ...]`` weighted task vectors.
        weights: ``[T, 1, ...]`` the weights ``w_t``.
        consensus: Elect signs and keep only agreeing entries (ties, breadcrumbs_ties, dare_ties).
        normalize: Divide by the sum of the (agreeing) weights.
        lam: The global scale ``lambda`` of the merged task vector.
    """
    if consensus:
        keep = agreement(weighted, elect_sign(weighted))
        merged = (weighted * keep).sum(dim=0)
        divisor = (weights * keep).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        merged = weighted.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    if normalize:
        merged = merged / divisor
    if lam != 1.0:
        merged = merged * lam
    return merged


def _work(delta: torch.Tensor, sparsifier: Sparsifier | None) -> torch.Tensor:
    """The dtype :func:`sparsify` prunes ``delta`` in (mergekit's DARE working dtype for ``bernoulli``)."""
    return delta.to(_bernoulli_dtype(delta)) if sparsifier == "bernoulli" else delta


def _ratio(work: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """:func:`l1_rescale`'s factor ``sum|work| / sum|kept|`` on the whole tensor, ``None`` where it is skipped."""
    before, after = work.abs().sum(), (work * mask).abs().sum()
    return None if before < 1e-7 or after < 1e-7 else before / after


def task_arithmetic_family(
    deltas: Sequence[torch.Tensor],
    weights: float | Sequence[float] | None = None,
    density: float | Sequence[float] | None = None,
    gamma: float | Sequence[float] | None = None,
    sparsifier: Sparsifier | None = None,
    consensus: bool = False,
    normalize: bool = False,
    rescale: bool = False,
    lam: float = 1.0,
    scope: BreadcrumbsScope = "tensor",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """mergekit's generalized task arithmetic on one tensor: sparsify each ``tau_t``, weight, (elect), mix.

    ``D_t = w_t * sparsify(tau_t)`` per model in order (the order of the random draws), then :func:`combine`,
    all in the dtype of ``deltas``. ``weights``, ``density`` and ``gamma`` are one number for every model or one
    per model.

    Memory: the masks (and rescale ratios) are computed per model on the whole tensor, which the selections need,
    reading ``deltas[t]`` for each and dropping it before the next (a lazy sequence, as the merge engine passes,
    then holds only one task vector while a magnitude sort runs). Everything after them is elementwise across
    models, so it runs over slices of the flattened tensor into the result: one mask per model, the task vectors
    and a slice are held, never a pruned or weighted copy of them all (the values are those of the whole-tensor
    formulas, bit for bit).
    """
    count = len(deltas)
    if not count:
        raise ValueError("A merge needs at least one task vector.")
    w = _per_model(weights, count, "weight", 1.0)
    dens, gams = _per_model(density, count, "density", 1.0), _per_model(gamma, count, "gamma", 0.01)
    masks: list[torch.Tensor | None] = []
    ratios: list[torch.Tensor | None] = []
    for i in range(count):
        mask = None
        # deltas[i] goes straight into the mask function (no name holds it here), so it can free it before sorting
        if sparsifier is None or (dens[i] >= 1 and not (sparsifier == "breadcrumbs" and scope == "row")):
            pass  # sparsify keeps the task vector whole (and draws nothing)
        elif sparsifier == "magnitude":
            mask = magnitude_mask(deltas[i], dens[i])
        elif sparsifier == "breadcrumbs":
            mask = breadcrumbs_mask(deltas[i], dens[i], gams[i], scope)
        elif sparsifier == "bernoulli":
            mask = bernoulli_mask(deltas[i], dens[i], generator)
        else:
            raise ValueError(f"sparsifier={sparsifier!r} is not one of 'magnitude', 'breadcrumbs', 'bernoulli'.")
        masks.append(mask)
        ratios.append(_ratio(_work(deltas[i], sparsifier), mask) if rescale and mask is not None else None)
    tensors = list(deltas)
    dtype, shape = tensors[0].dtype, tensors[0].shape
    works = [_work(d, sparsifier) if m is not None else d for d, m in zip(tensors, masks)]
    column = torch.tensor(w, dtype=dtype, device=tensors[0].device).view(-1, 1)
    out = torch.empty(shape, dtype=dtype, device=tensors[0].device)
    flat = out.view(-1)
    for start in range(0, flat.numel(), _CHUNK):
        part = slice(start, start + _CHUNK)
        rows = []
        for delta, work, mask, ratio in zip(tensors, works, masks, ratios):
            row = work.reshape(-1)[part]
            if mask is not None:
                row = row * mask.reshape(-1)[part]
            if ratio is not None:
                row = row * ratio
            rows.append(row.to(delta.dtype))
        trimmed = torch.stack(rows)
        flat[part] = combine(trimmed * column, column, consensus, normalize, lam)
    return out


def task_arithmetic(
    deltas: Sequence[torch.Tensor],
    weights: float | Sequence[float] | None = None,
    normalize: bool = False,
    lam: float = 1.0,
) -> torch.Tensor:
    """Task arithmetic: ``lam * sum_t w_t tau_t`` (divided by ``sum_t w_t`` when ``normalize``)."""
    return task_arithmetic_family(deltas, weights, normalize=normalize, lam=lam)


def ties(
    deltas: Sequence[torch.Tensor],
    density: float | Sequence[float] = 1.0,
    weights: float | Sequence[float] | None = None,
    normalize: bool = True,
    rescale: bool = False,
    lam: float = 1.0,
) -> torch.Tensor:
    """TIES-merging: top-``density`` trim per tensor, weight, elect signs on the weighted sum, disjoint mean."""
    return task_arithmetic_family(
        deltas, weights, density, sparsifier="magnitude", consensus=True, normalize=normalize, rescale=rescale, lam=lam
    )


def breadcrumbs(
    deltas: Sequence[torch.Tensor],
    density: float | Sequence[float] = 1.0,
    gamma: float | Sequence[float] = 0.01,
    weights: float | Sequence[float] | None = None,
    consensus: bool = False,
    normalize: bool = False,
    rescale: bool = False,
    lam: float = 1.0,
    scope: BreadcrumbsScope = "tensor",
) -> torch.Tensor:
    """Model Breadcrumbs: :func:`breadcrumbs_mask` per model, then task arithmetic (or TIES with ``consensus``)."""
    return task_arithmetic_family(
        deltas, weights, density, gamma, "breadcrumbs", consensus, normalize, rescale, lam, scope
    )


def dare(
    deltas: Sequence[torch.Tensor],
    density: float | Sequence[float] = 1.0,
    weights: float | Sequence[float] | None = None,
    consensus: bool = False,
    normalize: bool = False,
    rescale: bool = True,
    lam: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE: random drop with keep probability ``density``, L1 rescale, then task arithmetic or TIES (``consensus``)."""
    return task_arithmetic_family(
        deltas, weights, density, None, "bernoulli", consensus, normalize, rescale, lam, generator=generator
    )


def uniform_soup(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Uniform soup as a task vector: ``mean_t tau_t`` (so ``theta_0 + result = mean_t theta_t``)."""
    return _stack(deltas).mean(dim=0)


def linear(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: float | Sequence[float] | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """mergekit ``linear`` as a task vector of ``base``: ``sum_t w_t theta_t / sum_t w_t`` minus ``base``.

    The models ``theta_t = base + tau_t`` are accumulated in fp32 one by one (``addcmul``) and divided by the fp32
    sum of the weights, as mergekit does; without ``normalize`` the merged model is ``sum_t w_t theta_t``.
    """
    stacked = _stack(deltas)
    w = torch.tensor(_per_model(weights, len(deltas), "weight", 1.0), dtype=torch.float32)
    anchor = base.float()
    merged = torch.zeros_like(anchor)
    for tau, coefficient in zip(stacked, w):
        merged.addcmul_(anchor + tau, coefficient)
    if normalize:
        if float(w.sum()) == 0:
            raise ValueError("linear with normalize divides by the sum of the weights, which is 0: change a weight.")
        merged = merged / w.sum()
    return merged - anchor


# ------------------------------------------------------------------------------------- ComPEFT
def ternarize(x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """ComPEFT reconstruction of one tensor: ``scale * sign(x)`` on ``mask``, zero elsewhere (fp32)."""
    return torch.where(mask, torch.sign(x.float()) * scale, torch.zeros((), dtype=torch.float32, device=x.device))
