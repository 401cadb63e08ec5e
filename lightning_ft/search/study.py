"""The search loop: an optuna multi-objective study over the space, one low-fidelity fit per trial.

The study lives in ``<out>/study.db`` (optuna RDB storage, study name :data:`STUDY_NAME`), so a search that stops
(Ctrl-C, a crash, a lost machine) resumes when the same command runs again: it runs only the trials still missing
to reach ``--trials`` completed or failed ones; a trial a crash left RUNNING is marked failed first. A lock file
(``<out>/search.lock``) keeps two searches out of one folder. A trial that fails (its fit raises or exits non-zero,
writes no result, or measures NaN) is recorded as failed with its reason and the search goes on; a configuration
where nothing would train is recorded as pruned without a fit, and does not count; a configuration a completed trial
already measured is not fitted again: the trial takes that trial's result (``duplicate_of``) and counts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_ft.errors import UserError
from lightning_ft.search.front import FrontPoint, write_front, write_trials
from lightning_ft.search.result import RESULT_FILE, read_result
from lightning_ft.search.space import SearchSpace
from lightning_ft.search.trial import (
    BaseConfig,
    full_config,
    run_in_process,
    run_subprocess,
    stop_subprocesses,
    trial_config,
)

__all__ = ["STUDY_NAME", "SearchSettings", "Summary", "import_optuna", "run_search"]

STUDY_NAME = "autopeft"
_MAX_INFEASIBLE = 200  # consecutive configurations where nothing trains before the search gives up
_STOP = threading.Event()  # set by Ctrl-C or SIGTERM during a search (see _stop_on_signals)


def import_optuna() -> Any:
    """The ``optuna`` module; one sentence when it is missing."""
    try:
        import optuna
    except ImportError:
        raise UserError(
            "lightning-ft search needs optuna: pip install optuna (or pip install 'lightning-ft[search]')."
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@dataclass(frozen=True)
class SearchSettings:
    """What one search runs.

    Attributes:
        base: The base fit config.
        space: The search space.
        out: The search folder (study, trials, front).
        trials: The completed plus failed trials to reach.
        metric: The quality metric, a name in the fit's ``callback_metrics``.
        maximize: Whether a larger metric is better.
        steps: Each trial's optimizer steps.
        val_batches: Each trial's validation batches.
        jobs: Trials run at once.
        in_process: Run trials in this process (only with ``jobs == 1``) rather than in their own.
        sampler: ``tpe`` (multi-objective TPE), ``nsga2`` or ``random``.
        seed: The sampler's seed.
    """

    base: BaseConfig
    space: SearchSpace
    out: Path
    trials: int
    metric: str
    maximize: bool
    steps: int
    val_batches: int
    jobs: int = 1
    in_process: bool = True
    sampler: str = "tpe"
    seed: int = 0

    def identity(self) -> dict[str, Any]:
        """What a resumed study must share with the one it continues."""
        return {"base_config": self.base.digest, "space": self.space.describe(), "metric": self.metric,
                "maximize": self.maximize, "trial_steps": self.steps, "trial_val_batches": self.val_batches}  # fmt: skip


@dataclass(frozen=True)
class Summary:
    """What a search run did: the trials it ran now, the study's totals and the front."""

    ran: int
    completed: int
    failed: int
    front: list[FrontPoint]
    table: str


def _sampler(optuna: Any, name: str, seed: int) -> Any:
    """The multi-objective sampler: TPE (MOTPE), NSGA-II or random."""
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def open_study(optuna: Any, settings: SearchSettings) -> Any:
    """Create or load the study of ``settings.out``; refuse one of another search; fail its stale RUNNING trials."""
    storage = f"sqlite:///{(settings.out / 'study.db').resolve()}"
    directions = ["maximize" if settings.maximize else "minimize", "minimize"]
    existing = optuna.get_all_study_names(storage) if (settings.out / "study.db").exists() else []
    # a resumed search draws new samples: the sampler's seed moves on with the trials already there
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, directions=directions, load_if_exists=True)
    study.sampler = _sampler(optuna, settings.sampler, settings.seed + len(study.trials))
    identity = settings.identity()
    if STUDY_NAME not in existing:
        study.set_user_attr("search", identity)
    elif study.user_attrs.get("search") != identity:
        old = study.user_attrs.get("search") or {}
        differ = [k for k in identity if old.get(k) != identity[k]]
        raise UserError(f"{settings.out} holds a search with another {', '.join(differ) or 'setting'}: resume it "
                        "with the command that started it, or give this search another --out.")  # fmt: skip
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        optuna.trial.Trial(study, trial._trial_id).set_user_attr("error", "interrupted (the search stopped during it)")
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return study


def _ask(optuna: Any, study: Any, space: SearchSpace) -> tuple[Any, dict[str, Any]]:
    """A trial whose configuration trains something; the others are recorded as pruned."""
    for _ in range(_MAX_INFEASIBLE):
        trial = study.ask()
        params = space.suggest(trial)
        reason = space.infeasible(params)
        if reason is None:
            return trial, params
        trial.set_user_attr("choices", space.choices(params))
        trial.set_user_attr("error", f"infeasible: {reason}")
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    raise UserError(f"the sampler proposed {_MAX_INFEASIBLE} configurations in a row where nothing trains: give "
                    "rank choices above 0 (--ranks) or search fewer layers (--no-layers).")  # fmt: skip


def _prepare(study_trial: Any, params: dict[str, Any], settings: SearchSettings) -> Path:
    """Write the trial's fit config; returns its path."""
    import yaml

    from lightning_ft.core.io import write_text_atomic

    peft = settings.space.peft(params, settings.base.peft)
    run_dir = settings.out / "trials" / f"trial-{study_trial.number:04d}"
    study_trial.set_user_attr("peft", peft)
    study_trial.set_user_attr("choices", settings.space.choices(params))
    config = trial_config(settings.base, peft, run_dir, steps=settings.steps, val_batches=settings.val_batches)
    path = run_dir / "fit.yaml"
    write_text_atomic(path, yaml.safe_dump(config, sort_keys=False))
    return path


def _outcome(config: Path, error: str | None, metric: str) -> tuple[list[float] | None, str | None, dict[str, Any]]:
    """``(values, why it failed, the result file)`` of a finished trial."""
    result = read_result(config.parent / RESULT_FILE)
    if error is not None:
        return None, error, result or {}
    if result is None:
        return None, f"the fit wrote no {RESULT_FILE}", {}
    metrics = result.get("metrics") or {}
    if metric not in metrics:
        return None, f"metric {metric} was not logged", result
    if metrics[metric] is None:
        return None, f"{metric} is NaN or infinite", result
    if result.get("trainable_params") is None:
        return None, "the fit did not train (no trainable parameters were counted)", result
    return [float(metrics[metric]), float(result["trainable_params"])], None, result


def _record(optuna: Any, study: Any, trial: Any, config: Path, error: str | None, metric: str) -> UserError | None:
    """Tell the study how ``trial`` ended; returns the refusal of a metric name the fit did not log."""
    values, error, result = _outcome(config, error, metric)
    label = f"trial {trial.number}: {json.dumps(trial.user_attrs.get('choices'))}"
    if result.get("trainable_params") is not None:
        trial.set_user_attr("trainable_params", result["trainable_params"])
    if values is None:
        trial.set_user_attr("error", error)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        print(f"{label} failed: {error}", flush=True)
        if error == f"metric {metric} was not logged":
            logged = ", ".join(sorted(result.get("metrics") or {})) or "none"
            return UserError(
                f"--metric {metric} is not a metric the trials log (they log: {logged}): pass one of them."
            )
        return None
    study.tell(trial, values)
    print(f"{label} -> {metric} {values[0]:.6g}, {int(values[1]):,} trainable parameters", flush=True)
    return None


def _launcher(settings: SearchSettings) -> Callable[[Path], str | None]:
    if settings.in_process:
        return lambda config: run_in_process(config, config.parent / "trial.log")
    threads = max(1, (os.cpu_count() or 1) // settings.jobs)
    return lambda config: run_subprocess(config, config.parent / "trial.log", threads)


def _counts(optuna: Any, study: Any) -> tuple[int, int]:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return states.count(optuna.trial.TrialState.COMPLETE), states.count(optuna.trial.TrialState.FAIL)


def _run_trials(optuna: Any, study: Any, settings: SearchSettings, missing: int) -> None:
    """Run ``missing`` trials, ``settings.jobs`` at a time; stops early (after the running ones) on a bad metric."""
    launch = _launcher(settings)
    pending: dict[Future[str | None], tuple[Any, Path]] = {}
    refusal: UserError | None = None
    with ThreadPoolExecutor(max_workers=settings.jobs) as pool:
        try:
            while (missing and refusal is None) or pending:
                while missing and refusal is None and len(pending) < settings.jobs:
                    trial, params = _ask(optuna, study, settings.space)
                    missing -= 1
                    if _reuse(optuna, study, trial, params, settings.space):
                        continue
                    config = _prepare(trial, params, settings)
                    if settings.in_process:  # in this thread: Lightning and Ctrl-C expect the main thread
                        refusal = _run_here(optuna, study, trial, config, launch, settings.metric)
                    else:
                        pending[pool.submit(launch, config)] = (trial, config)
                done, _ = wait(pending, return_when=FIRST_COMPLETED) if pending else (set(), set())
                for future in done:
                    trial, config = pending.pop(future)
                    refusal = _record(optuna, study, trial, config, future.result(), settings.metric) or refusal
        except KeyboardInterrupt:  # the running trials stay RUNNING in the study: a resumed search fails them
            stop_subprocesses()
            raise
    if refusal is not None:
        raise refusal


def _reuse(optuna: Any, study: Any, trial: Any, params: dict[str, Any], space: SearchSpace) -> bool:
    """Give ``trial`` the result of a completed trial of the same configuration, if there is one (no fit)."""
    same = next((t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                 if t.params == params and "duplicate_of" not in t.user_attrs), None)  # fmt: skip
    if same is None:
        return False
    for key in ("peft", "choices", "trainable_params"):
        trial.set_user_attr(key, same.user_attrs.get(key))
    trial.set_user_attr("duplicate_of", same.number)
    study.tell(trial, same.values)
    print(f"trial {trial.number}: {json.dumps(space.choices(params))} is trial {same.number} again (not refitted)")
    return True


def _run_here(optuna: Any, study: Any, trial: Any, config: Path, launch: Callable[[Path], str | None],
              metric: str) -> UserError | None:  # fmt: skip
    try:
        error = launch(config)
        if _STOP.is_set():  # Lightning turned the interruption into a failed fit
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        trial.set_user_attr("error", "interrupted")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    return _record(optuna, study, trial, config, error, metric)


def _points(optuna: Any, study: Any) -> list[FrontPoint]:
    """The completed trials, each configuration once (the first trial that measured it)."""
    points: dict[str, FrontPoint] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        key = json.dumps(t.params, sort_keys=True)
        if key not in points and "duplicate_of" not in t.user_attrs:
            choices, peft = t.user_attrs.get("choices", {}), t.user_attrs["peft"]
            points[key] = FrontPoint(t.number, t.values[0], int(t.values[1]), choices, peft)
    return list(points.values())


def _trial_rows(study: Any, metric: str) -> list[dict[str, Any]]:
    return [{"trial": t.number, "state": t.state.name, metric: t.values[0] if t.values else "",
             "trainable_params": t.user_attrs.get("trainable_params", ""), **(t.user_attrs.get("choices") or {}),
             "duplicate_of": t.user_attrs.get("duplicate_of", ""), "error": t.user_attrs.get("error", "")}
            for t in study.get_trials(deepcopy=False)]  # fmt: skip


def run_search(settings: SearchSettings) -> Summary:
    """Run (or resume) the search of ``settings`` and write its front.

    Raises:
        UserError: optuna is missing, another search holds the folder, the folder holds another search, the metric
            is not logged, or no trial completed.
    """
    from filelock import FileLock, Timeout

    optuna = import_optuna()
    settings.out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(settings.out / "search.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"another lightning-ft search is running in {settings.out}: wait for it to end or give this "
                        "one another --out.") from None  # fmt: skip
    try:
        with _stop_on_signals():
            return _search(optuna, settings)
    finally:
        lock.release()


def _search(optuna: Any, settings: SearchSettings) -> Summary:
    study = open_study(optuna, settings)
    completed, failed = _counts(optuna, study)
    missing = max(0, settings.trials - completed - failed)
    print(f"AutoPEFT search in {settings.out}: {completed} completed and {failed} failed trials in the study, "
          f"running {missing} more (--trials {settings.trials}).", flush=True)  # fmt: skip
    if missing:
        _run_trials(optuna, study, settings, missing)
    completed, failed = _counts(optuna, study)
    write_trials(settings.out, _trial_rows(study, settings.metric))
    points = _points(optuna, study)
    if not points:
        raise UserError(f"no trial completed ({failed} failed): see the trial.log of each trial under "
                        f"{settings.out / 'trials'}.")  # fmt: skip
    configs = {p.number: full_config(settings.base, p.peft) for p in points}
    front, table = write_front(settings.out, points, configs, metric=settings.metric, maximize=settings.maximize)
    return Summary(missing, completed, failed, front, table)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Ctrl-C (unless SIGINT is ignored) and SIGTERM stop the search: the handler records the stop in :data:`_STOP`
    and raises ``KeyboardInterrupt``. A fit in this process catches that and exits as failed; the record tells the
    two apart. Nothing is set off the main thread, where handlers cannot be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        _STOP.set()
        raise KeyboardInterrupt

    _STOP.clear()
    signals = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN else [])
    previous = {sig: signal.signal(sig, stop) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
