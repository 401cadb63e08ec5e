"""One search trial: the base config it starts from, the config it runs, and the fit that runs it.

Each trial is an ordinary ``lightning-ft fit`` of a generated YAML: the user's base config with the trial's
``model.init_args.peft`` and the low-fidelity overrides (:func:`trial_config`: few steps, one validation at the end
over a few batches, no checkpoints, export, progress bar or W&B run), plus a :class:`~lightning_ft.search.result.
TrialResult` callback that writes what the fit measured. The front's ready-to-run YAMLs are the base config with the
front point's peft only (:func:`full_config`), at the user's full fidelity.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_ft.errors import UserError, config_problem, import_class

__all__ = ["BaseConfig", "FitCommand", "ModelLayout", "fit_command", "full_config", "load_base_config", "model_layout",
           "run_in_process", "run_subprocess", "stop_subprocesses", "trial_config", "use_command"]  # fmt: skip

RESULT_CALLBACK = "lightning_ft.search.result.TrialResult"


@dataclass(frozen=True)
class FitCommand:
    """The ``lightning-ft`` command line as a search uses it, handed over by :func:`lightning_ft.cli.main` when it
    dispatches ``search`` (the command line imports the search, so the search does not import it back).

    Attributes:
        main: ``lightning_ft.cli.main``, which runs an in-process trial's ``fit``.
        default_classes: The module and data classes a config without ``class_path`` gets.
        known_classes: The short class names the command line resolves.
    """

    main: Callable[[list[str]], None]
    default_classes: Mapping[str, str]
    known_classes: Callable[[], dict[str, type]]


_COMMAND: list[FitCommand] = []


def use_command(command: FitCommand) -> None:
    """Hand the search the command line it runs fits with (:func:`lightning_ft.search.cli.main` does)."""
    _COMMAND[:] = [command]


def _command() -> FitCommand:
    if not _COMMAND:
        raise RuntimeError("lightning_ft.search runs through `lightning-ft search`, which hands it the fit command.")
    return _COMMAND[0]
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_RUNNING: set[subprocess.Popen[bytes]] = set()  # the trials running in their own processes
_RUNNING_LOCK = threading.Lock()


@dataclass(frozen=True)
class BaseConfig:
    """The user's base fit config.

    Attributes:
        path: The YAML file.
        data: Its mapping, with ``model`` as ``{class_path, init_args}``.
        module_class: The LightningModule class it names.
        model: The backbone it loads (``model.init_args.model`` or the class's default).
        peft: Its ``model.init_args.peft`` mapping, or ``None``.
        digest: A hash of its text (a study refuses to resume with another base config).
    """

    path: Path
    data: dict[str, Any]
    module_class: type
    model: str
    peft: dict[str, Any] | None
    digest: str

    @property
    def init_args(self) -> dict[str, Any]:
        """``model.init_args`` of the base config."""
        return self.data["model"]["init_args"]


@dataclass(frozen=True)
class ModelLayout:
    """What the space needs to know of the backbone: its decoder layers and its module names."""

    num_layers: int
    module_names: tuple[str, ...]

    def missing(self, names: list[str]) -> list[str]:
        """The peft module names (suffixes) of ``names`` that match no module of the model."""
        return [n for n in names if not any(m == n or m.endswith(f".{n}") for m in self.module_names)]


def load_base_config(path: str | Path) -> BaseConfig:
    """Read and check the base config of a search.

    Raises:
        UserError: The file is missing or not a YAML mapping, or its module cannot take a peft config.
    """
    import yaml

    command = _command()
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--config {path} does not exist: give the YAML of a fit (e.g. configs/quickstart_lora.yaml).")
    problem = config_problem(["--config", str(file)])
    if problem:
        raise UserError(problem)
    text = file.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    model = data.get("model") or {}
    if isinstance(model, str):
        model = {"class_path": model}
    if not isinstance(model, dict):
        raise UserError(f"--config {path}: model must be a mapping with class_path and init_args.")
    model = {
        "class_path": model.get("class_path") or command.default_classes["model"],
        "init_args": dict(model.get("init_args") or {}),
    }
    data["model"] = model
    cls = import_class(str(model["class_path"]), command.known_classes())
    if cls is None:
        raise UserError(f"--config {path}: model class {model['class_path']} cannot be imported: check its class_path.")
    params = inspect.signature(cls).parameters
    if "peft" not in params:
        raise UserError(f"--config {path}: {cls.__name__} takes no peft argument, so a search has nothing to configure: "
                        "use a module with one, e.g. lightning_ft.modules.CausalLMModule.")  # fmt: skip
    name = model["init_args"].get("model", params["model"].default if "model" in params else None)
    if not isinstance(name, str):
        raise UserError(f"--config {path}: give the backbone as model.init_args.model.")
    peft = model["init_args"].get("peft")
    if peft is not None and not isinstance(peft, dict):
        raise UserError(f"--config {path}: model.init_args.peft must be a mapping (peft_type: LORA, r: 8, ...).")
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return BaseConfig(file, data, cls, name, dict(peft) if peft else None, digest)


def model_layout(model: str) -> ModelLayout:
    """The decoder layers and module names of ``model``, built on the meta device from its config (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModel

    from lightning_ft.assets import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(model))
    layers = next((getattr(config, k) for k in _LAYER_COUNT_KEYS if isinstance(getattr(config, k, None), int)), None)
    if layers is None:
        raise UserError(f"model {model} has no num_hidden_layers in its config: the search cannot count its layers.")
    with torch.device("meta"):
        names = tuple(name for name, _ in AutoModel.from_config(config).named_modules())
    return ModelLayout(layers, names)


def _is_checkpointing(callback: Any) -> bool:
    path = callback.get("class_path", "") if isinstance(callback, dict) else str(callback)
    return str(path).rpartition(".")[2] == "ModelCheckpoint"


def trial_config(base: BaseConfig, peft: dict[str, Any], run_dir: Path, *, steps: int,
                 val_batches: int) -> dict[str, Any]:  # fmt: skip
    """The low-fidelity fit config of one trial, whose run folder is ``run_dir``.

    Args:
        base: The base config.
        peft: The trial's peft mapping.
        run_dir: The trial's run folder (``<default_root_dir>/<run_name>``); its result goes to
            ``run_dir/trial_result.json``.
        steps: The optimizer steps the trial trains for; it validates once, after the last.
        val_batches: The validation batches of that validation.
    """
    from lightning_ft.search.result import RESULT_FILE

    config = copy.deepcopy(base.data)
    init_args = config["model"]["init_args"]
    init_args["peft"] = peft
    params = inspect.signature(base.module_class).parameters
    if "output_dir" in params:
        init_args["output_dir"] = ""  # no HF export of a trial
    if "merge_adapter" in params:
        init_args["merge_adapter"] = False
    trainer = config.setdefault("trainer", {})
    accumulate = int(trainer.get("accumulate_grad_batches") or 1)
    callbacks = [cb for cb in trainer.get("callbacks") or [] if not _is_checkpointing(cb)]
    callbacks.append({"class_path": RESULT_CALLBACK, "init_args": {"path": str(run_dir / RESULT_FILE)}})
    trainer.update(max_steps=steps, max_epochs=None, limit_val_batches=val_batches, val_check_interval=steps * accumulate,
                   check_val_every_n_epoch=None, num_sanity_val_steps=0, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(run_dir.parent),
                   callbacks=callbacks)  # fmt: skip
    config["run_name"] = run_dir.name
    config["wandb"] = "disabled"
    config.pop("ckpt_path", None)  # a trial starts from the base model
    return config


def full_config(base: BaseConfig, peft: dict[str, Any]) -> dict[str, Any]:
    """The base config with ``peft``: a front point at the user's full fidelity."""
    config = copy.deepcopy(base.data)
    config["model"]["init_args"]["peft"] = peft
    return config


def fit_command(config: Path) -> list[str]:
    """The command line of a trial run in its own process."""
    return [sys.executable, "-m", "lightning_ft.cli", "fit", "--config", str(config)]


def _error_line(log: Path) -> str:
    """The error sentence a failed fit printed (its last ``error:`` line), or its last line."""
    try:
        lines = [
            line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()
        ]
    except OSError:
        return "the fit failed"
    errors = [line for line in lines if ": error: " in line]
    return (errors or lines or ["the fit failed"])[-1][:500]


def run_subprocess(config: Path, log: Path, threads: int | None = None) -> str | None:
    """Run the fit of ``config`` in its own process, its output in ``log``; returns why it failed, or ``None``."""
    env = dict(os.environ)
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    with log.open("w", encoding="utf-8") as out:
        process = subprocess.Popen(fit_command(config), stdout=out, stderr=subprocess.STDOUT, env=env,
                                   stdin=subprocess.DEVNULL)  # fmt: skip
        with _RUNNING_LOCK:
            _RUNNING.add(process)
        try:
            code = process.wait()
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(process)
    return None if code == 0 else f"exit status {code}: {_error_line(log)}"


def stop_subprocesses() -> None:
    """Terminate the trials running in their own processes (the search is stopping)."""
    with _RUNNING_LOCK:
        running = list(_RUNNING)
    for process in running:
        process.terminate()


def run_in_process(config: Path, log: Path) -> str | None:
    """Run the fit of ``config`` in this process (the command line's ``main``); returns why it failed, or ``None``.

    Its printed output goes to ``log``. Lightning answers Ctrl-C in a fit with ``sys.exit(1)`` after setting SIGINT
    to be ignored: the SIGINT handler is put back here, and the caller, whose handlers record the interruption,
    tells it from a failure.
    """
    import gc
    import signal

    main = _command().main
    quiet = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in quiet]
    handler = signal.getsignal(signal.SIGINT)
    code: Any = 0
    with log.open("w", encoding="utf-8") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        for logger in quiet:
            logger.setLevel(logging.WARNING)
        try:
            main(["fit", "--config", str(config)])
        except SystemExit as exit_:
            code = exit_.code
        finally:
            for logger, level in zip(quiet, levels):
                logger.setLevel(level)
            gc.collect()
    if signal.getsignal(signal.SIGINT) is not handler and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
    if code == 130:
        raise KeyboardInterrupt
    return None if code in (0, None) else f"exit status {code}: {_error_line(log)}"
