"""GOT-D (Kang et al., ICLR 2024): select the candidates that move the pool toward the target task the most.

``lightning-ft data select --method ot --data POOL --target TARGET --budget K --output selected.jsonl``

The target-task sample and the candidate pool are embedded (the bundled all-MiniLM-L6-v2 by default), and the
entropic optimal transport between the uniform measures on the two is solved with POT's log-domain Sinkhorn
(``epsilon`` 0.1 as in the official notebook, which uses ott-jax; the cost is its ``PointCloud`` default, the
squared Euclidean distance). The candidates' dual potentials ``g`` are the gradient of the OT distance with respect
to each candidate's mass; LAVA's calibration (Just et al., ICLR 2023) turns them into the gradient of moving mass
*to* a candidate from all the others, ``g_i - sum_{j != i} g_j / (N - 1)``. The official notebook divides by ``N``
instead (``g - (sum(g)/N - g/N)``), a slip that changes no ranking; this module follows LAVA. The candidates are
ranked ascending (most negative first: adding mass there brings the pool closest to the target) and the lowest
``budget`` are written out, in rank order, with their ``ot_score``.

Pools larger than memory are streamed: the pool is embedded ``--ot-batch-size`` candidates at a time, each batch's
OT against the whole target sample is solved on its own, and only its scores are kept. The notebook solves one
problem over the whole pool (its ``batch_size`` only tiles the cost matrix); batches are what keeps memory bounded
here. Potentials are defined up to a constant (``f + c, g - c``), so per-batch ``g`` are not comparable as they
come out. The constant is fixed on the target side, which every batch shares: each candidate's score is
``g_j + <a, f>``, whose mean over a batch is that batch's entropic OT cost, so a batch far from the target scores
high as a whole rather than being re-centred. The calibration is then applied once over the whole pool's scores.
When one batch holds the whole pool this is exactly the one-shot result (``<a, f>`` cancels in the calibration);
smaller batches rank nearly, not exactly, as one problem would, so ``--ot-batch-size`` is best kept as large as
memory allows (its cost matrix is ``targets x batch`` float64).

Sinkhorn here has no momentum (the notebook's ott-jax solver uses over-relaxation 1.3 with a loose 0.1 threshold):
it iterates until the candidates' marginal is met within ``1e-6`` (L2), at most ``--sinkhorn-iters`` times, and the
report says whether every batch converged.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_ft.errors import UserError

__all__ = [
    "DEFAULT_EPSILON",
    "OTScores",
    "SinkhornPotentials",
    "add_arguments",
    "add_embedder_argument",
    "budget_value",
    "calibrate",
    "calibrated_potentials",
    "make_embedder",
    "resolve_budget",
    "run",
    "select_ot",
    "sinkhorn_potentials",
    "stream_ot_scores",
    "texts_of",
    "transport_plan",
]

DEFAULT_EPSILON = 0.1  # the official notebook's ott-jax epsilon
DEFAULT_MAX_ITER = 2000  # the notebook's max_iterations
DEFAULT_TOL = 1e-6  # L2 violation of the candidates' marginal; the notebook stops at ott's looser 0.1
DEFAULT_OT_BATCH = 10_000


@dataclass(frozen=True)
class SinkhornPotentials:
    """Dual potentials of one entropic OT problem, in the convention ``P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps)``.

    Attributes:
        f: Potentials of the target points, ``[M]``.
        g: Potentials of the candidates, ``[N]``.
        cost: The entropic OT cost, ``<a, f> + <b, g>``.
        converged: Whether the candidates' marginal was met within the tolerance (the targets' holds exactly).
        iterations: Sinkhorn iterations run.
    """

    f: np.ndarray
    g: np.ndarray
    cost: float
    converged: bool
    iterations: int


@dataclass(frozen=True)
class OTScores:
    """GOT-D scores of a whole pool.

    Attributes:
        scores: The calibrated gradient of every candidate, ``[N]``; lower is closer to the target.
        batch_costs: The entropic OT cost of each batch against the target sample.
        converged: Whether every batch's Sinkhorn converged.
    """

    scores: np.ndarray
    batch_costs: list[float]
    converged: bool


def _sq_euclidean(x: Any, y: Any) -> Any:
    """Squared Euclidean cost matrix of two float64 tensors (ott-jax's ``PointCloud`` default cost)."""
    cost = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return cost.clamp_(min=0.0)


def _as_tensor(array: np.ndarray, name: str) -> Any:
    import torch

    data = np.asarray(array, dtype=np.float64)
    if data.ndim != 2 or len(data) == 0:
        raise ValueError(f"{name} must be a non-empty [n, dim] array (got shape {data.shape}).")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the cost matrix and Sinkhorn run on the GPU if any
    return torch.from_numpy(np.ascontiguousarray(data)).to(device)


def sinkhorn_potentials(
    target: np.ndarray,
    pool: np.ndarray,
    *,
    epsilon: float = DEFAULT_EPSILON,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
) -> SinkhornPotentials:
    """Solve the entropic OT between uniform measures on ``target`` rows and ``pool`` rows (POT, log domain).

    Args:
        target: Target-task embeddings ``[M, dim]``.
        pool: Candidate embeddings ``[N, dim]``.
        epsilon: Entropic regularisation (absolute, in units of the squared Euclidean cost).
        max_iter: Most Sinkhorn iterations.
        tol: Stop when the L2 violation of the marginal falls below this.
    """
    import ot
    import torch

    x, y = _as_tensor(target, "target"), _as_tensor(pool, "pool")
    cost = _sq_euclidean(x, y)
    a = torch.full((len(x),), 1.0 / len(x), dtype=torch.float64, device=x.device)
    b = torch.full((len(y),), 1.0 / len(y), dtype=torch.float64, device=x.device)
    _, log = ot.sinkhorn(a, b, cost, epsilon, method="sinkhorn_log", numItermax=max_iter, stopThr=tol, log=True,
                         warn=False)  # fmt: skip
    f = epsilon * (log["log_u"] - a.log())  # the row update runs last: the targets' marginal holds exactly
    g = epsilon * (log["log_v"] - b.log())
    errors = log["err"]
    converged = bool(errors) and float(errors[-1]) < tol
    total = float(a @ f + b @ g)
    return SinkhornPotentials(f.cpu().numpy(), g.cpu().numpy(), total, converged, int(log["niter"]) + 1)


def transport_plan(target: np.ndarray, pool: np.ndarray, potentials: SinkhornPotentials, epsilon: float) -> np.ndarray:
    """The entropic plan ``[M, N]`` of solved potentials (for checks on small problems)."""
    x, y = _as_tensor(target, "target"), _as_tensor(pool, "pool")
    cost = _sq_euclidean(x, y).cpu().numpy()
    m, n = cost.shape
    f, g = potentials.f[:, None], potentials.g[None, :]
    return np.exp((f + g - cost) / epsilon - math.log(m) - math.log(n))


def calibrate(scores: np.ndarray) -> np.ndarray:
    """LAVA's calibrated gradient ``s_i - sum_{j != i} s_j / (N - 1)`` (free of the potentials' constant)."""
    values = np.asarray(scores, dtype=np.float64)
    if len(values) < 2:
        return values - values  # one candidate: nothing to move mass from
    return values - (values.sum() - values) / (len(values) - 1)


def calibrated_potentials(
    target_emb: np.ndarray,
    pool_emb: np.ndarray,
    *,
    epsilon: float = DEFAULT_EPSILON,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
) -> np.ndarray:
    """GOT-D's score of every candidate from one OT problem over the whole pool: the calibrated ``g``.

    Args:
        target_emb: Target-task embeddings ``[M, dim]``.
        pool_emb: Candidate embeddings ``[N, dim]``.
        epsilon: Entropic regularisation.
        max_iter: Most Sinkhorn iterations.
        tol: Sinkhorn's stopping tolerance.

    Returns:
        ``[N]`` float64 scores; the lowest belong to the candidates nearest the target distribution.
    """
    return calibrate(sinkhorn_potentials(target_emb, pool_emb, epsilon=epsilon, max_iter=max_iter, tol=tol).g)


def stream_ot_scores(
    target_emb: np.ndarray,
    pool_batches: Iterable[np.ndarray],
    *,
    epsilon: float = DEFAULT_EPSILON,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
) -> OTScores:
    """GOT-D's scores of a pool given as a stream of embedding batches, keeping only the per-candidate scores.

    Each batch's OT against the whole target sample is solved on its own; its candidates get ``g_j + <a, f>``
    (the potentials' free constant fixed on the target side, which all batches share, so a batch's mean score is
    its OT cost), and the whole pool's scores are calibrated once at the end.
    """
    anchored: list[np.ndarray] = []
    costs: list[float] = []
    converged = True
    for batch in pool_batches:
        solved = sinkhorn_potentials(target_emb, batch, epsilon=epsilon, max_iter=max_iter, tol=tol)
        anchored.append(solved.g + float(solved.f.mean()))
        costs.append(solved.cost)
        converged = converged and solved.converged
    if not anchored:
        raise ValueError("the pool stream yielded no batch.")
    return OTScores(calibrate(np.concatenate(anchored)), costs, converged)


def select_ot(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` lowest scores, lowest first (ties keep pool order)."""
    return np.argsort(np.asarray(scores), kind="stable")[: max(0, int(k))]


# ---------------------------------------------------------------------------------------------- command line
def budget_value(text: str) -> float:
    """argparse type of ``--budget``: a count (a whole number of at least 1) or a fraction in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count nor a fraction") from None
    if not math.isfinite(value) or value <= 0 or (value >= 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole count (e.g. 500) or a fraction in (0, 1)")
    return value


def resolve_budget(value: float, pool_size: int, *, argument: str = "--budget", source: str = "--data") -> int:
    """The count a ``--budget`` value selects from a pool of ``pool_size``.

    Raises:
        UserError: The count is more than the pool holds.
    """
    count = max(1, int(value * pool_size)) if value < 1 else int(value)
    if count > pool_size:
        raise UserError(
            f"{argument} {count} is more than the {pool_size} examples of {source}: give at most {pool_size}, "
            "or a fraction below 1."
        )
    return count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """GOT-D's own options (cli.py adds --data, --output, --prompt-field and the other common ones)."""
    parser.description = (
        "GOT-D (Kang et al., ICLR 2024): embed the target-task sample (--target) and the candidate pool (--data), "
        "solve the entropic optimal transport between them (POT's log-domain Sinkhorn, squared Euclidean cost), and "
        "keep the --budget candidates whose calibrated dual potential is lowest: those that move the pool toward the "
        "target the most. Output: the selected pool records, most useful first, each with an 'ot_score' field, and "
        "<output stem>.report.json with the scores' quantiles."
    )
    parser.add_argument("--target", required=True,
                        help="the target-task sample: a bundled dataset name or a data file (e.g. trivia)")  # fmt: skip
    parser.add_argument("--target-field", default=None,
                        help="the target's text column (default: --prompt-field, the pool's text column)")  # fmt: skip
    parser.add_argument("--budget", type=budget_value, required=True,
                        help="how many candidates to keep: a count (e.g. 500) or a fraction of the pool (e.g. 0.1)")  # fmt: skip
    parser.add_argument("--epsilon", type=float, default=DEFAULT_EPSILON,
                        help=f"entropic regularisation of the OT (default {DEFAULT_EPSILON}, the paper's)")  # fmt: skip
    parser.add_argument("--ot-batch-size", type=int, default=DEFAULT_OT_BATCH,
                        help="candidates per OT problem; the pool streams through in batches of this size, so "
                        f"memory holds one batch's embeddings and cost matrix (default {DEFAULT_OT_BATCH})")  # fmt: skip
    parser.add_argument("--sinkhorn-iters", type=int, default=DEFAULT_MAX_ITER,
                        help=f"most Sinkhorn iterations per batch (default {DEFAULT_MAX_ITER})")  # fmt: skip
    add_embedder_argument(parser)


def add_embedder_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--embedder`` (the sentence encoder of the selection methods) unless the parser has it already."""
    if any("--embedder" in action.option_strings for action in parser._actions):
        return  # the command line already offers it to every command
    parser.add_argument("--embedder", default="minilm-l6",
                        help="the sentence encoder: a bundled alias (minilm-l6, smollm2-135m mean-pooled) or an HF "
                        "folder (default minilm-l6)")  # fmt: skip


def _check_arguments(args: argparse.Namespace) -> None:
    if not args.epsilon > 0:
        raise UserError(f"--epsilon {args.epsilon} must be positive (the paper uses 0.1).")
    if args.ot_batch_size < 2:
        raise UserError(f"--ot-batch-size {args.ot_batch_size} must be at least 2.")
    if args.sinkhorn_iters < 1:
        raise UserError(f"--sinkhorn-iters {args.sinkhorn_iters} must be at least 1.")


def make_embedder(args: argparse.Namespace) -> Any:
    """The command's :class:`~lightning_ft.curation.embedder.Embedder` (GPU when there is one)."""
    import torch

    from lightning_ft.curation.embedder import Embedder

    cache = getattr(args, "cache_dir", None)
    kwargs: dict[str, Any] = {"cache_dir": Path(cache).expanduser() / "embeddings" if cache else None}
    if getattr(args, "batch_size", None):
        kwargs["batch_size"] = args.batch_size
    return Embedder(args.embedder, device="cuda" if torch.cuda.is_available() else "cpu", **kwargs)


def texts_of(records: Sequence[dict[str, Any]], field: str) -> Iterator[str]:
    """The ``field`` of each record as text."""
    return (value if isinstance(value, str) else str(value) for value in (r[field] for r in records))


def _quantiles(values: np.ndarray) -> dict[str, float]:
    points = {"min": 0.0, "q05": 0.05, "q25": 0.25, "median": 0.5, "q75": 0.75, "q95": 0.95, "max": 1.0}
    return {name: float(np.quantile(values, q)) for name, q in points.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Score the pool, write the lowest ``--budget`` candidates in rank order, and return the report."""
    from lightning_ft.curation.records import read_pool, write_dataset

    _check_arguments(args)
    target_field = args.target_field or args.prompt_field
    pool = read_pool(
        args.data, argument="--data", fields=(args.prompt_field,), options={args.prompt_field: "--prompt-field"}
    )
    option = "--target-field" if args.target_field else "--prompt-field"
    target = read_pool(args.target, argument="--target", fields=(target_field,), options={target_field: option})
    budget = resolve_budget(args.budget, len(pool))
    embedder = make_embedder(args)
    target_emb = embedder.embed(list(texts_of(target, target_field)))
    batches = embedder.embed_batches(texts_of(pool, args.prompt_field), batch_size=args.ot_batch_size)
    result = stream_ot_scores(target_emb, batches, epsilon=args.epsilon, max_iter=args.sinkhorn_iters)
    order = select_ot(result.scores, budget)
    selected = [{**pool[i], "ot_score": float(result.scores[i])} for i in order]
    report = {
        "method": "ot",
        "paper": "GOT-D (Kang et al., ICLR 2024)",
        "data": str(args.data),
        "target": str(args.target),
        "pool_size": len(pool),
        "target_size": len(target),
        "selected": len(selected),
        "epsilon": args.epsilon,
        "cost": "squared euclidean",
        "embedder": str(args.embedder),
        "ot_batch_size": args.ot_batch_size,
        "batches": len(result.batch_costs),
        "batch_ot_costs": result.batch_costs,
        "sinkhorn_converged": result.converged,
        "score_quantiles": _quantiles(result.scores),
        "selected_score_max": float(result.scores[order[-1]]) if len(order) else None,
    }
    write_dataset(selected, args.output, report)
    return report
