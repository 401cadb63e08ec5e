"""Diversify and Conquer (Yu et al. 2024): k-means selection with quality sampling (kMQ) and iterative refinement.

``lightning-ft data select --method kmq --data POOL --budget 0.05 --output selected.jsonl`` clusters the embedded
prompts with faiss k-means (``--clusters`` K = 512, 300 iterations, 5 restarts, as in the official
``kmeansiter.py``) and takes an equal share of the budget from every cluster: ``B / K`` each, capped by the cluster's
size, the remainder handed on to the clusters with room so that exactly ``B`` examples are selected (the official code
floors the share and drops the remainder, which leaves nothing at all once ``B < K``). Inside a cluster the examples
are drawn uniformly, or with probability ``softmax(quality)`` when ``--quality-field`` names a score column (the kMQ
variant, as the official ``KMenasRandomDeita``; sampling without replacement, by Gumbel top-k).

With ``--rounds R --fit-config FIT.yaml --work-dir DIR`` it is the iterative method. Round 1 takes ``B / R`` examples as
above; round ``r`` writes the cumulative selection to ``DIR/round_r/selection.jsonl`` and fine-tunes on it with one
in-process ``lightning-ft fit --config FIT.yaml`` (run folder ``DIR/round_r/fit``, its export ``hf_model/``). Then
the fitted model answers the selected prompts (greedy, cached in ``DIR/round_r/generations.jsonl``), a reward scores
the gold and the generated responses, and each cluster's weight is ``w = softmax_c(mean_{i in c}(r_gold - r_gen))``:
clusters where the model falls furthest short of the gold answers get more of the next ``B / R`` examples, whose
per-cluster counts are drawn from ``w`` (exactly ``B / R`` of them, capped by the unseen examples each cluster has
left) and sampled among the examples not selected yet. The official ``iter.py`` draws ``N * portion / K / R`` new
examples per round (one cluster's share, not a round's); this follows the paper's equal split of ``B`` over ``R``
rounds. Clusters whose examples got no reward yet weigh in with the mean gap of all scored examples.

The prompts and gold responses are rendered with the fit config's ``data.init_args.prompt_template`` and
``response_template`` (the DataModule's defaults when absent), exactly as the fit saw them. The reward is pluggable
(``--reward module:function``, called with the prompts and the responses, returning one score each); the default is
the per-token log-likelihood of the response under ``--model``, a judge that stays fixed across rounds. (The fitted
model itself is no judge: it rates its own greedy answer above the gold one the more so where it has learnt least,
which would invert the weights.)

After every step (selection, fit, scoring) ``DIR/state.json`` is replaced atomically, so a rerun of the same command
resumes at the first unfinished step: a finished round is never refitted, and an interrupted fit continues from its
``last.ckpt``. The output is the final selection (``B`` examples, each with its ``kmq_cluster`` and ``kmq_round``).
"""

from __future__ import annotations

import argparse
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_ft.curation.ot import add_embedder_argument, budget_value, make_embedder, resolve_budget, texts_of
from lightning_ft.curation.records import import_callable
from lightning_ft.curation.rounds import load_rounds, save_rounds
from lightning_ft.errors import UserError

__all__ = [
    "RoundState",
    "add_arguments",
    "allocate_budget",
    "cluster_weights",
    "draw_cluster_counts",
    "fit_config_arguments",
    "fit_round",
    "kmeans_labels",
    "load_reward",
    "round_sizes",
    "run",
    "sample_in_clusters",
]

Reward = Callable[[list[str], list[str]], Sequence[float]]
STATE_FILE = "state.json"


# ---------------------------------------------------------------------------------------------- core functions
def kmeans_labels(embeddings: np.ndarray, k: int, *, niter: int = 300, restarts: int = 5, seed: int = 0) -> np.ndarray:
    """The cluster of every row of ``embeddings`` under faiss k-means (``nredo`` restarts, the best one kept).

    Raises:
        UserError: There are fewer rows than clusters.
    """
    import faiss

    data = np.ascontiguousarray(embeddings, dtype=np.float32)
    if k < 1 or len(data) < k:
        raise UserError(f"--clusters {k} needs at least {max(k, 1)} examples in --data (it has {len(data)}): lower "
                        "--clusters.")  # fmt: skip
    kmeans = faiss.Kmeans(data.shape[1], k, niter=niter, nredo=restarts, seed=seed, verbose=False)
    kmeans.train(data)
    _, labels = kmeans.index.search(data, 1)
    return labels.reshape(-1).astype(np.int64)


def allocate_budget(sizes: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Per-cluster counts summing exactly to ``total``: equal shares capped by each cluster's size, the remainder
    handed on (an equal share again to the clusters with room, then single examples to randomly chosen ones).

    Raises:
        ValueError: ``total`` exceeds the clusters' sizes together.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if total > int(sizes.sum()) or total < 0:
        raise ValueError(f"cannot take {total} examples from clusters holding {int(sizes.sum())}.")
    counts = np.zeros_like(sizes)
    remaining = int(total)
    while remaining > 0:
        room = sizes - counts
        open_ = np.flatnonzero(room > 0)
        share = remaining // len(open_)
        if share == 0:
            counts[rng.choice(open_, size=remaining, replace=False)] += 1
            break
        added = np.minimum(room[open_], share)
        counts[open_] += added
        remaining -= int(added.sum())
    return counts


def draw_cluster_counts(weights: np.ndarray, total: int, room: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-cluster counts drawn from ``weights`` (a multinomial draw of ``total``), capped by ``room``; what a full
    cluster drew is drawn again among the clusters with room, so the counts sum exactly to ``total``.

    Raises:
        ValueError: ``total`` exceeds the room left in all clusters.
    """
    room = np.asarray(room, dtype=np.int64)
    if total > int(room.sum()) or total < 0:
        raise ValueError(f"cannot draw {total} examples from clusters with {int(room.sum())} left.")
    counts = np.zeros_like(room)
    remaining = int(total)
    while remaining > 0:
        open_ = room - counts > 0
        p = np.where(open_, np.asarray(weights, dtype=np.float64), 0.0)
        p = p / p.sum() if p.sum() > 0 else open_ / open_.sum()
        added = np.minimum(rng.multinomial(remaining, p), room - counts)
        counts += added
        remaining -= int(added.sum())
    return counts


def cluster_weights(labels: np.ndarray, gaps: np.ndarray, k: int) -> np.ndarray:
    """``softmax_c(mean_{i in c} gap_i)`` over ``k`` clusters; ``labels`` and ``gaps`` are the scored examples'.

    Examples with a non-finite gap are left out; a cluster without scored examples gets the mean gap of all of them.
    """
    labels, gaps = np.asarray(labels, dtype=np.int64), np.asarray(gaps, dtype=np.float64)
    keep = np.isfinite(gaps)
    labels, gaps = labels[keep], gaps[keep]
    neutral = float(gaps.mean()) if len(gaps) else 0.0
    sums = np.bincount(labels, weights=gaps, minlength=k)
    counts = np.bincount(labels, minlength=k)
    means = np.where(counts > 0, sums / np.maximum(counts, 1), neutral)
    exp = np.exp(means - means.max())
    return exp / exp.sum()


def sample_in_clusters(
    labels: np.ndarray,
    counts: np.ndarray,
    rng: np.random.Generator,
    *,
    exclude: np.ndarray | None = None,
    quality: np.ndarray | None = None,
) -> np.ndarray:
    """``counts[c]`` examples of every cluster ``c``, without replacement and outside ``exclude``: uniformly, or with
    probability ``softmax(quality)`` within the cluster (successive sampling, drawn as Gumbel top-k)."""
    labels = np.asarray(labels, dtype=np.int64)
    available = np.ones(len(labels), dtype=bool)
    if exclude is not None and len(exclude):
        available[np.asarray(exclude, dtype=np.int64)] = False
    keys = rng.gumbel(size=len(labels))
    if quality is not None:
        keys = keys + np.asarray(quality, dtype=np.float64)
    chosen: list[np.ndarray] = []
    for c, count in enumerate(np.asarray(counts, dtype=np.int64)):
        if count <= 0:
            continue
        members = np.flatnonzero((labels == c) & available)
        if count > len(members):
            raise ValueError(f"cluster {c} has {len(members)} examples left, fewer than the {count} asked.")
        chosen.append(members[np.argsort(-keys[members], kind="stable")[:count]])
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def round_sizes(budget: int, rounds: int) -> list[int]:
    """The new examples of each round: ``budget`` split as evenly as whole counts allow (earlier rounds +1)."""
    return [budget // rounds + (1 if r < budget % rounds else 0) for r in range(rounds)]


def select_round(
    labels: np.ndarray,
    size: int,
    rng: np.random.Generator,
    *,
    k: int,
    weights: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
    quality: np.ndarray | None = None,
) -> np.ndarray:
    """One round's new examples: equal per-cluster shares (``weights`` None, round 1), else counts drawn from
    ``weights``, both capped by what each cluster has left outside ``exclude``."""
    left = np.bincount(np.asarray(labels, dtype=np.int64), minlength=k)
    if exclude is not None and len(exclude):
        left = left - np.bincount(np.asarray(labels)[np.asarray(exclude, dtype=np.int64)], minlength=k)
    counts = allocate_budget(left, size, rng) if weights is None else draw_cluster_counts(weights, size, left, rng)
    return sample_in_clusters(labels, counts, rng, exclude=exclude, quality=quality)


# ---------------------------------------------------------------------------------------------- rounds
@dataclass
class RoundState:
    """What one round has done (persisted in ``state.json``).

    Attributes:
        new: Pool indices this round added to the selection.
        model: The fitted model folder (``hf_model``), once the fit is done.
        gaps: ``r_gold - r_gen`` of the cumulative selection, once scored (``None`` entries: not finite).
        weights: The cluster weights the next round draws from.
    """

    new: list[int]
    model: str | None = None
    gaps: list[float | None] | None = None
    weights: list[float] | None = None


@dataclass
class _State:
    settings: dict[str, Any]
    rounds: list[RoundState] = field(default_factory=list)

    def selected(self, upto: int) -> list[int]:
        return [i for r in self.rounds[:upto] for i in r.new]


def _load_state(path: Path, settings: dict[str, Any]) -> _State:
    return _State(settings, [RoundState(**r) for r in load_rounds(path, settings)])


def _save_state(path: Path, state: _State) -> None:
    save_rounds(path, state.settings, [vars(r) for r in state.rounds])


def _save_labels(path: Path, labels: np.ndarray) -> None:
    from lightning_ft.core.io import atomic_file

    with atomic_file(path) as tmp, open(tmp, "wb") as file:
        np.save(file, labels)


def fit_round(
    config: Path, dataset: Path, root: Path, fit: Callable[[list[str]], None], extra: Sequence[str] = ()
) -> Path:
    """Fine-tune on ``dataset`` with one in-process ``lightning-ft fit`` (run folder ``root/fit``; ``fit`` is
    :func:`lightning_ft.cli.main`, handed down by the command so that this package does not import the CLI); returns
    the exported ``hf_model`` folder; ``extra`` are further command-line overrides. An interrupted fit of the same folder continues from its ``last.ckpt``; one that
    has exported already is not run again.

    Raises:
        UserError: The fit failed (its own error line is printed above) or exported no model.
    """
    import gc
    import signal
    import threading

    run = root / "fit"
    exported = run / "hf_model"
    if exported.is_dir():
        return exported  # the fit finished and exported (atomically) before the state recorded it
    argv = ["fit", "--config", str(config), "--data.init_args.dataset", str(dataset),
            "--trainer.default_root_dir", str(root), "--run_name", "fit", *extra]  # fmt: skip
    last = run / "checkpoints" / "last.ckpt"
    if last.exists():
        argv += ["--ckpt_path", str(last)]
    handler = signal.getsignal(signal.SIGINT)
    try:
        fit(argv)
    except SystemExit as exit_:
        if exit_.code == 130:
            raise KeyboardInterrupt from None
        if exit_.code not in (0, None):
            raise UserError(f"the fit of {dataset} failed (exit status {exit_.code}, its error is above): fix "
                            "--fit-config and rerun the command to resume.") from None  # fmt: skip
    finally:
        gc.collect()
        if signal.getsignal(signal.SIGINT) is not handler and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after a Ctrl-C in a fit
    if not exported.is_dir():
        raise UserError(f"the fit in {run} exported no hf_model/ folder: leave model.init_args.output_dir unset in "
                        "--fit-config so that the fit exports its model there.")  # fmt: skip
    return exported


def load_reward(spec: str) -> Reward:
    """The ``module:function`` reward of ``--reward`` (called with prompts and responses, returning one score each).

    Raises:
        UserError: The spec is malformed, or names no importable callable.
    """
    target = import_callable(spec, "--reward", "name a function as module:function (e.g. mypkg.rewards:score)")
    if not callable(target):
        raise UserError(f"--reward {spec!r} is not callable: name a function taking (prompts, responses).")
    return target


def _likelihood_reward(model: str, batch_size: int, chat_template: bool) -> Reward:
    """The default reward: the response's mean per-token log-likelihood under ``model`` (loaded once)."""
    from lightning_ft.curation.generation import GenerationService

    service: list[Any] = []

    def reward(prompts: list[str], responses: list[str]) -> np.ndarray:
        if not service:
            service.append(GenerationService(model, batch_size=batch_size))
        return -service[0].mean_token_nll(list(zip(prompts, responses)), chat_template=chat_template)

    return reward


def fit_config_arguments(config: Path, section: str) -> dict[str, Any]:
    """The ``init_args`` of the ``section`` (``model``, ``data``) of the ``--fit-config`` YAML (``{}`` if absent).

    Raises:
        UserError: The file is not a YAML mapping.
    """
    import yaml

    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise UserError(
            f"--fit-config {config} cannot be read as YAML ({err}): give a lightning-ft fit config."
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"--fit-config {config} is not a YAML mapping: give a lightning-ft fit config.")
    part = data.get(section) or {}
    init = part.get("init_args", part) if isinstance(part, dict) else {}
    return init if isinstance(init, dict) else {}


def _templates(config: Path) -> tuple[str, str, bool]:
    """The fit config's prompt and response templates and chat-template flag (the DataModule's defaults if absent)."""
    import inspect

    from lightning_ft.data import InstructionDataModule

    init = fit_config_arguments(config, "data")
    defaults = inspect.signature(InstructionDataModule.__init__).parameters
    values = {name: init.get(name, defaults[name].default) for name in ("prompt_template", "response_template",
                                                                         "chat_template")}  # fmt: skip
    return str(values["prompt_template"]), str(values["response_template"]), bool(values["chat_template"])


@dataclass(frozen=True)
class _Rounds:
    """Everything the round loop needs besides the state."""

    pool: list[dict[str, Any]]
    labels: np.ndarray
    quality: np.ndarray | None
    k: int
    sizes: list[int]
    seed: int
    work: Path
    config: Path
    reward: Reward
    max_new_tokens: int
    batch_size: int
    fit: Callable[[list[str]], None]


def _score_round(ctx: _Rounds, selected: list[int], model: Path, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """Generate with the fitted ``model`` for the selected prompts and return ``(gaps, cluster weights)``."""
    from lightning_ft.curation.generation import GenerationService, GenerationSettings
    from lightning_ft.data.collate import render  # the DataModules' own rendering, as the fit trained on

    prompt_t, response_t, chat = _templates(ctx.config)
    records = [ctx.pool[i] for i in selected]
    prompts = [render(prompt_t, r, "--fit-config's prompt_template") for r in records]
    gold = [render(response_t, r, "--fit-config's response_template") for r in records]
    service = GenerationService(model, cache=cache, batch_size=ctx.batch_size, progress=True)
    settings = GenerationSettings(max_new_tokens=ctx.max_new_tokens, chat_template=chat)
    generated = [samples[0] for samples in service.generate(prompts, settings)]
    del service
    gaps = np.asarray(ctx.reward(prompts, gold), dtype=np.float64) - np.asarray(
        ctx.reward(prompts, generated), dtype=np.float64
    )
    if gaps.shape != (len(selected),):
        raise UserError(f"--reward returned {gaps.size} scores for {len(selected)} responses: return one per response.")
    return gaps, cluster_weights(ctx.labels[selected], gaps, ctx.k)


def _run_rounds(ctx: _Rounds, state: _State, state_path: Path) -> None:
    """Run (or resume) every round, saving the state after each step."""
    from lightning_ft.curation.records import write_dataset

    for r, size in enumerate(ctx.sizes):
        if len(state.rounds) <= r:
            previous = state.rounds[r - 1].weights if r else None
            rng = np.random.default_rng([ctx.seed, r])
            new = select_round(ctx.labels, size, rng, k=ctx.k, weights=None if previous is None else np.array(previous),
                               exclude=np.array(state.selected(r), dtype=np.int64), quality=ctx.quality)  # fmt: skip
            state.rounds.append(RoundState(new=[int(i) for i in new]))
            _save_state(state_path, state)
        entry, selected = state.rounds[r], state.selected(r + 1)
        root = ctx.work / f"round_{r + 1}"
        if entry.model is None:
            dataset = root / "selection.jsonl"
            report = {"method": "kmq", "round": r + 1, "selected": len(selected)}
            write_dataset(_records(ctx.pool, ctx.labels, state.rounds[: r + 1]), dataset, report)
            entry.model = str(fit_round(ctx.config, dataset, root, ctx.fit))
            _save_state(state_path, state)
        if r + 1 < len(ctx.sizes) and entry.weights is None:
            gaps, weights = _score_round(ctx, selected, Path(entry.model), root / "generations.jsonl")
            entry.gaps = [float(g) if math.isfinite(g) else None for g in gaps]
            entry.weights = [float(w) for w in weights]
            _save_state(state_path, state)


def _records(pool: list[dict[str, Any]], labels: np.ndarray, rounds: list[RoundState]) -> list[dict[str, Any]]:
    """The selected pool records, in selection order, with their cluster and round."""
    return [{**pool[i], "kmq_cluster": int(labels[i]), "kmq_round": r + 1}
            for r, entry in enumerate(rounds) for i in entry.new]  # fmt: skip


# ---------------------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Diversify and Conquer's own options (cli.py adds --data, --output, --prompt-field and the other common ones)."""
    parser.description = (
        "Diversify and Conquer (Yu et al. 2024): cluster the embedded prompts (--prompt-field of --data) with k-means "
        "and take an equal share of --budget from every cluster (kMQ; quality-weighted inside clusters with "
        "--quality-field). With --rounds R it fine-tunes on the selection once per round (--fit-config, in "
        "--work-dir), scores the fitted model's answers against the gold ones with a reward, and draws the next "
        "round's examples from the clusters where the gap is largest. Output: the selected records, each with "
        "'kmq_cluster' and 'kmq_round', and <output stem>.report.json (cluster sizes, counts, weights per round)."
    )
    parser.add_argument("--budget", type=budget_value, required=True,
                        help="how many examples to select in all: a count (e.g. 500) or a fraction of the pool (e.g. "
                        "0.05, the paper's 5%%)")  # fmt: skip
    parser.add_argument("--clusters", type=int, default=512, help="k-means clusters K (default 512, the paper's)")
    parser.add_argument("--kmeans-iters", type=int, default=300, help="k-means iterations (default 300)")
    parser.add_argument("--kmeans-restarts", type=int, default=5,
                        help="k-means restarts, the best kept (faiss nredo; default 5)")  # fmt: skip
    parser.add_argument("--quality-field", default=None,
                        help="a numeric column of quality scores: sample inside clusters with probability "
                        "softmax(score) instead of uniformly (kMQ)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=None,
                        help="iterative refinement over R rounds (the paper uses 3); needs --fit-config and "
                        "--work-dir. Without it: one-shot kMQ, no fit")  # fmt: skip
    parser.add_argument("--fit-config", default=None,
                        help="the lightning-ft fit YAML of every round (e.g. configs/data_kmq_round.yaml); its data "
                        "templates also render the prompts and gold responses that are scored")  # fmt: skip
    parser.add_argument("--work-dir", default=None,
                        help="the rounds' folder: round_<r>/selection.jsonl, round_<r>/fit/ (the run, hf_model/), "
                        "generations and state.json; rerun the same command to resume")  # fmt: skip
    parser.add_argument("--reward", default=None,
                        help="module:function scoring (prompts, responses) -> one float each; default: the "
                        "response's per-token log-likelihood under --model")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="tokens the fitted model generates per prompt when scoring a round (default 64)")  # fmt: skip
    add_embedder_argument(parser)


def _check_arguments(args: argparse.Namespace) -> None:
    if args.clusters < 1:
        raise UserError(f"--clusters {args.clusters} must be at least 1.")
    if args.kmeans_iters < 1 or args.kmeans_restarts < 1:
        raise UserError(f"--kmeans-iters {args.kmeans_iters} and --kmeans-restarts {args.kmeans_restarts} must be at "
                        "least 1.")  # fmt: skip
    if args.rounds is None:
        return
    if args.rounds < 1:
        raise UserError(f"--rounds {args.rounds} must be at least 1 (or left out for one-shot kMQ).")
    missing = [name for name, value in (("--fit-config", args.fit_config), ("--work-dir", args.work_dir)) if not value]
    if missing:
        raise UserError(f"--rounds {args.rounds} needs {' and '.join(missing)}: give the fit YAML of each round and "
                        "the folder that holds the rounds.")  # fmt: skip
    if not Path(args.fit_config).is_file():
        raise UserError(f"--fit-config {args.fit_config} is not a file: give a lightning-ft fit YAML.")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be at least 1.")


def _quality(pool: list[dict[str, Any]], name: str | None) -> np.ndarray | None:
    if not name:
        return None
    values = np.empty(len(pool), dtype=np.float64)
    for i, record in enumerate(pool):
        try:
            values[i] = float(record[name])
        except (TypeError, ValueError):
            raise UserError(f"--quality-field {name}: record {i + 1} holds {record[name]!r}, not a number: give a "
                            "column of numeric quality scores.") from None  # fmt: skip
    if not np.isfinite(values).all():
        raise UserError(f"--quality-field {name} holds NaN or infinite scores: give finite quality scores.")
    return values


def _labels(args: argparse.Namespace, pool: list[dict[str, Any]], cached: Path | None) -> np.ndarray:
    """The pool's clusters (reloaded from ``cached`` when resuming rounds, so they never change between runs)."""
    if cached is not None and cached.is_file():
        labels = np.load(cached)
        if len(labels) == len(pool):
            return labels
    embeddings = make_embedder(args).embed(list(texts_of(pool, args.prompt_field)), progress=True)
    labels = kmeans_labels(embeddings, args.clusters, niter=args.kmeans_iters, restarts=args.kmeans_restarts,
                           seed=_seed(args))  # fmt: skip
    if cached is not None:
        _save_labels(cached, labels)
    return labels


def _seed(args: argparse.Namespace) -> int:
    return int(getattr(args, "seed", None) or 0)


def _settings(args: argparse.Namespace, budget: int, pool_size: int) -> dict[str, Any]:
    """The options a resumed run must share with the run that started the work folder."""
    config_text = Path(args.fit_config).read_bytes() if args.fit_config else b""
    return {"data": str(args.data), "pool_size": pool_size, "prompt_field": args.prompt_field, "budget": budget,
            "clusters": args.clusters, "rounds": args.rounds, "seed": _seed(args), "embedder": str(args.embedder),
            "quality_field": args.quality_field, "reward": args.reward, "model": str(getattr(args, "model", "")),
            "fit_config": hashlib.sha256(config_text).hexdigest()[:16]}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Select with kMQ (one shot, or ``--rounds`` of fit, score and reweight), write the selection, return the report."""
    from lightning_ft.curation.records import read_pool, write_dataset

    _check_arguments(args)
    fields = [args.prompt_field] + ([args.quality_field] if args.quality_field else [])
    options = {
        args.prompt_field: "--prompt-field",
        **({args.quality_field: "--quality-field"} if args.quality_field else {}),
    }
    pool = read_pool(args.data, argument="--data", fields=fields, options=options)
    budget = resolve_budget(args.budget, len(pool))
    rounds = args.rounds or 1
    if budget < rounds:
        raise UserError(f"--budget {budget} is less than --rounds {rounds}: every round needs at least one example.")
    quality = _quality(pool, args.quality_field)
    work = Path(args.work_dir).expanduser() if args.rounds else None
    state = _State(_settings(args, budget, len(pool)))
    if work is not None:
        state = _load_state(work / STATE_FILE, state.settings)  # refuses a folder of other settings before any work
    labels = _labels(args, pool, work / "clusters.npy" if work else None)
    k = int(args.clusters)
    if work is None:
        rng = np.random.default_rng([_seed(args), 0])
        state.rounds.append(RoundState(new=[int(i) for i in select_round(labels, budget, rng, k=k, quality=quality)]))
    else:
        fit = getattr(args, "fit_command", None)
        if fit is None:
            raise UserError("--rounds fits a model in every round through lightning-ft fit: run the selection as "
                            "`lightning-ft data select --method kmq ...`, or set args.fit_command = "
                            "lightning_ft.cli.main when calling run() from Python.")  # fmt: skip
        batch = int(getattr(args, "batch_size", None) or 8)
        reward = load_reward(args.reward) if args.reward else None
        if reward is None:
            reward = _likelihood_reward(str(args.model), batch, _templates(Path(args.fit_config))[2])
        ctx = _Rounds(pool, labels, quality, k, round_sizes(budget, rounds), _seed(args), work, Path(args.fit_config),
                      reward, args.max_new_tokens, batch, fit)  # fmt: skip
        _run_rounds(ctx, state, work / STATE_FILE)
    selected = state.selected(len(state.rounds))
    records = _records(pool, labels, state.rounds)
    report = _report(args, pool, labels, k, budget, state, selected)
    write_dataset(records, args.output, report)
    return report


def _report(args: argparse.Namespace, pool: list[dict[str, Any]], labels: np.ndarray, k: int, budget: int,
            state: _State, selected: list[int]) -> dict[str, Any]:  # fmt: skip
    sizes = np.bincount(labels, minlength=k)
    taken = np.bincount(labels[selected], minlength=k) if selected else np.zeros(k, dtype=np.int64)
    return {
        "method": "kmq",
        "paper": "Diversify and Conquer (Yu et al. 2024)",
        "data": str(args.data),
        "pool_size": len(pool),
        "budget": budget,
        "selected": len(selected),
        "clusters": k,
        "cluster_sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())},
        "clusters_covered": int((taken > 0).sum()),
        "clusters_nonempty": int((sizes > 0).sum()),
        "per_cluster_selected": taken.tolist(),
        "quality_field": args.quality_field,
        "rounds": [
            {
                "round": r + 1,
                "new": len(entry.new),
                "model": entry.model,
                "weights": entry.weights,
                "mean_gap": None if not entry.gaps else _mean([g for g in entry.gaps if g is not None]),
            }
            for r, entry in enumerate(state.rounds)
        ],
        "work_dir": str(args.work_dir) if args.rounds else None,
    }


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None
