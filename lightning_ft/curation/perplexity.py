"""``lightning-ft data filter --method perplexity``: keep the examples whose perplexity lies in a band (POINTS' data step).

POINTS (Liu et al. 2024, https://arxiv.org/abs/2409.04828) scores every pre-training example with a reference model
and keeps the ones with the lowest perplexity (the first 20% after sorting, ``--keep-quantiles 0 0.2`` here): text the
model finds obscure is dropped. Here the band is given either in perplexity (``--min-ppl`` / ``--max-ppl``) or by
quantiles of the pool (``--keep-quantiles LOW HIGH``), so very low perplexity (repeated, boilerplate text) can be cut
too.

The perplexity of an example is ``exp`` of the mean negative log-likelihood per token under ``--model``: of the
response given the prompt (``--prompt-field`` / ``--response-field``, response tokens only), or of the whole text of
``--text-field`` (every token after the first). Kept records keep their order and get a ``perplexity`` field; the
report holds the band, the counts (kept, below, above) and the pool's quantiles and histogram.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_ft.errors import UserError

__all__ = ["add_arguments", "band", "perplexities", "run", "split_by_band"]

_QUANTILES = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0)
_BINS = 12


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The perplexity filter's own options (cli.py adds --data, --output, --model and the other common ones)."""
    parser.add_argument("--text-field", default=None,
                        help="score the whole text of this column (e.g. text of rotten_tomatoes) instead of the "
                        "--response-field given the --prompt-field")  # fmt: skip
    parser.add_argument("--min-ppl", type=float, default=None, help="keep examples with perplexity >= this")
    parser.add_argument("--max-ppl", type=float, default=None, help="keep examples with perplexity <= this")
    parser.add_argument("--keep-quantiles", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                        help="keep the band between these quantiles of the pool's perplexities, e.g. 0 0.2 for the "
                        "20%% lowest (POINTS); instead of --min-ppl/--max-ppl")  # fmt: skip
    parser.add_argument("--max-length", type=int, default=512, help="tokens scored per example (default 512)")
    parser.add_argument("--chat-template", action="store_true",
                        help="wrap the prompt in the model's chat template before scoring the response")  # fmt: skip


def perplexities(
    service: Any,
    records: Sequence[dict[str, Any]],
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    text_field: str | None = None,
    chat_template: bool = False,
) -> np.ndarray:
    """The perplexity of each record under ``service``'s model (a :class:`~lightning_ft.curation.generation.
    GenerationService`): ``exp`` of the mean token NLL of ``text_field``, or of ``response_field`` given
    ``prompt_field``. A record without a scored token gets NaN."""
    if text_field is not None:
        items: list[Any] = [str(r[text_field]) for r in records]
    else:
        items = [(str(r[prompt_field]), str(r[response_field])) for r in records]
    return np.exp(service.mean_token_nll(items, chat_template=chat_template))


def band(
    ppl: np.ndarray,
    *,
    min_ppl: float | None = None,
    max_ppl: float | None = None,
    quantiles: Sequence[float] | None = None,
) -> tuple[float, float]:
    """The kept band ``(low, high)``: ``[min_ppl, max_ppl]`` (an open side is unbounded) or the pool's quantiles.

    Raises:
        UserError: No band, both kinds of band, an empty band, or quantiles outside [0, 1].
    """
    if quantiles is not None:
        if min_ppl is not None or max_ppl is not None:
            raise UserError("--keep-quantiles replaces --min-ppl/--max-ppl: give one kind of band, not both.")
        low_q, high_q = quantiles
        if not 0.0 <= low_q < high_q <= 1.0:
            raise UserError(f"--keep-quantiles {low_q} {high_q} must satisfy 0 <= LOW < HIGH <= 1.")
        scored = ppl[np.isfinite(ppl)]
        if scored.size == 0:
            raise UserError("no example of the pool has a scored token, so --keep-quantiles has nothing to rank: check "
                            "the fields (an empty response scores nothing).")  # fmt: skip
        return float(np.quantile(scored, low_q)), float(np.quantile(scored, high_q))
    if min_ppl is None and max_ppl is None:
        raise UserError("the perplexity filter needs a band: give --min-ppl and/or --max-ppl, or --keep-quantiles.")
    low = -math.inf if min_ppl is None else float(min_ppl)
    high = math.inf if max_ppl is None else float(max_ppl)
    if low > high:
        raise UserError(f"--min-ppl {min_ppl} is above --max-ppl {max_ppl}: the band would be empty.")
    return low, high


def split_by_band(ppl: np.ndarray, low: float, high: float) -> dict[str, np.ndarray]:
    """Indices of the ``kept`` (``low <= ppl <= high``), ``below``, ``above`` and ``unscored`` (NaN) examples."""
    finite = np.isfinite(ppl)
    return {
        "kept": np.flatnonzero(finite & (ppl >= low) & (ppl <= high)),
        "below": np.flatnonzero(finite & (ppl < low)),
        "above": np.flatnonzero(finite & (ppl > high)),
        "unscored": np.flatnonzero(~finite),
    }


def _statistics(ppl: np.ndarray) -> dict[str, Any]:
    scored = ppl[np.isfinite(ppl)]
    if scored.size == 0:
        return {"quantiles": {}, "histogram": {}}
    quantiles = {f"{q:g}": float(np.quantile(scored, q)) for q in _QUANTILES}
    lo, hi = float(scored.min()), float(scored.max())
    edges = np.geomspace(lo, hi, _BINS + 1) if lo > 0 and hi > lo else np.linspace(lo, hi + 1e-9, _BINS + 1)
    counts, edges = np.histogram(scored, bins=edges)
    return {"quantiles": quantiles, "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}


def _check_arguments(args: argparse.Namespace) -> None:
    if args.max_length < 2:
        raise UserError(f"--max-length {args.max_length} must be at least 2.")
    if args.text_field is None and not args.response_field:
        raise UserError("the perplexity filter scores --response-field given --prompt-field, or --text-field alone: "
                        "give one of them.")  # fmt: skip


def _service(args: argparse.Namespace) -> Any:
    from lightning_ft.curation.generation import GenerationService

    return GenerationService(args.model, batch_size=args.batch_size, max_length=args.max_length)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Score ``--data`` under ``--model``, keep the band and write ``--output`` and its report; returns the report."""
    from lightning_ft.curation.records import read_pool, write_dataset

    _check_arguments(args)
    if args.text_field is not None:
        fields, options = (args.text_field,), {args.text_field: "--text-field"}
    else:
        fields = (args.prompt_field, args.response_field)
        options = {args.prompt_field: "--prompt-field", args.response_field: "--response-field"}
    records = read_pool(args.data, argument="--data", fields=fields, options=options)
    band(np.ones(1), min_ppl=args.min_ppl, max_ppl=args.max_ppl, quantiles=args.keep_quantiles)  # refuse before scoring
    service = _service(args)
    ppl = perplexities(service, records, prompt_field=args.prompt_field, response_field=args.response_field,
                       text_field=args.text_field, chat_template=args.chat_template)  # fmt: skip
    low, high = band(ppl, min_ppl=args.min_ppl, max_ppl=args.max_ppl, quantiles=args.keep_quantiles)
    groups = split_by_band(ppl, low, high)
    if groups["kept"].size == 0:
        raise UserError(f"the band [{low:.4g}, {high:.4g}] keeps none of the {len(records)} examples (perplexities "
                        f"{np.nanmin(ppl):.4g} to {np.nanmax(ppl):.4g}): widen --min-ppl/--max-ppl or "
                        "--keep-quantiles.")  # fmt: skip
    kept = [{**records[i], "perplexity": float(ppl[i])} for i in groups["kept"]]
    report = {
        "command": "filter", "method": "perplexity", "data": str(args.data), "output": str(args.output),
        "model": str(args.model), "fingerprint": service.fingerprint,
        "scored": f"{args.text_field} (whole text)" if args.text_field else
                  f"{args.response_field} given {args.prompt_field}",
        "band": {"min": low, "max": high, "quantiles": list(args.keep_quantiles) if args.keep_quantiles else None},
        "counts": {"pool": len(records), **{name: int(idx.size) for name, idx in groups.items()}},
        **_statistics(ppl),
    }  # fmt: skip
    write_dataset(kept, Path(args.output), report)
    return report
