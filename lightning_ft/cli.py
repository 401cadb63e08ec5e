"""The ``lightning-ft`` command: LightningCLI with fine-tuning defaults.

``lightning-ft fit|validate|test|predict --config configs/quickstart.yaml`` runs a LightningCLI whose
defaults are the causal-LM module and the instruction DataModule, a per-run folder
(``runs/<run_name>``) holding checkpoints (``last.ckpt`` for resuming), CSV metrics, the W&B run (offline
unless W&B is configured), predictions and the exported HF model.

A run folder that already holds a run (checkpoints, an exported model, a report or predictions) is never written
over: ``fit`` continues it only through ``--ckpt_path``. A mistake in the command line, the config, a data file or a
checkpoint is answered with ``lightning-ft <command>: error: <sentence>`` and no traceback (``--debug`` or
``LIGHTNING_FT_DEBUG=1`` shows it; see :mod:`lightning_ft.errors`).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning_ft.errors import (
    UsageError,
    UserError,
    config_problem,
    debug_requested,
    did_you_mean,
    explain_parse_error,
    import_class,
    run_command,
)

__all__ = ["ANALYSIS_COMMANDS", "COMMANDS", "DATA_COMMANDS", "DEFAULT_CLASSES", "POSTHOC_COMMANDS", "SEARCH_COMMANDS", "SUBCOMMANDS", "main"]
# LightningFTCLI (built lazily) and wandb_mode (from lightning_ft.monitors.dashboard): see __getattr__

# Post-hoc weight commands, dispatched before LightningCLI (they run no Trainer).
POSTHOC_COMMANDS = ("merge", "compress", "decompress", "sparse-apply", "estimate")
SUBCOMMANDS = ("fit", "validate", "test", "predict")
# Commands that run fits of their own (dispatched before LightningCLI too).
SEARCH_COMMANDS = ("search", "spin", "self-train", "explore-novelty")
# Data selection and curation (lightning-ft data select|curate|rewrite|filter), dispatched before LightningCLI too.
DATA_COMMANDS = ("data",)
# Analysis commands on finished runs (dispatched before LightningCLI too).
ANALYSIS_COMMANDS = ("mitigate-intruders", "analyze-shift", "steer", "compare")
COMMANDS = SUBCOMMANDS + POSTHOC_COMMANDS + SEARCH_COMMANDS + DATA_COMMANDS + ANALYSIS_COMMANDS
# what makes a run folder hold a run that another command must not write over
RUN_OUTPUTS = ("checkpoints", "hf_model", "report.json", "predictions.jsonl")
# the model and data classes of a command that names none (a named class gets its own defaults, see
# LightningFTCLI._drop_defaults_of_named_classes)
DEFAULT_CLASSES = {"model": "lightning_ft.modules.CausalLMModule", "data": "lightning_ft.data.InstructionDataModule"}
_SPECIAL_CKPT = ("last", "best", "hpc", "registry")
_WEIGHT_FILES = (".safetensors", ".bin", ".gguf", ".pth")
_SHARDED_MARKERS = ("meta.pt", ".metadata", "latest", "checkpoint")  # FSDP and DeepSpeed checkpoint folders


def run_outputs(root: Path) -> list[str]:
    """The outputs of a previous run in the run folder ``root`` (empty when a command may write there)."""
    found = [name for name in RUN_OUTPUTS if (root / name).exists()]
    checkpoints = root / "checkpoints"
    if "checkpoints" in found and checkpoints.is_dir() and not any(checkpoints.iterdir()):
        found.remove("checkpoints")
    return found


class _Recorder:
    """Wraps a jsonargparse instantiator and keeps the exception of the last constructor that failed.

    jsonargparse folds a constructor's exception into a text listing every type it tried, so the CLI raises the
    recorded one instead: its own sentence, its own traceback and its own type (a user error or a bug).
    """

    def __init__(self, cli: Any, instantiator: Any = None) -> None:
        self.cli, self.instantiator = cli, instantiator
        self.links = instantiator is not None and "applied_instantiation_links" in inspect.signature(instantiator).parameters

    def __call__(self, class_type: type, *args: Any, applied_instantiation_links: Any = None, **kwargs: Any) -> Any:
        if self.links:
            kwargs["applied_instantiation_links"] = applied_instantiation_links
        try:
            made = (self.instantiator or class_type)(*((class_type,) if self.instantiator else ()), *args, **kwargs)
        except Exception as err:
            self.cli.constructor_error = err
            raise
        self.cli.constructor_error = None
        return made


def _cli_class() -> type:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
    from lightning.pytorch.loggers import CSVLogger, WandbLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter
    from lightning.pytorch.loggers.logger import rank_zero_experiment
    from torch.optim.lr_scheduler import ReduceLROnPlateau

    import lightning_ft.callbacks  # noqa: F401  (registers short class names for YAML)
    import lightning_ft.data  # noqa: F401
    import lightning_ft.modules  # noqa: F401
    import lightning_ft.copilot  # noqa: F401
    import lightning_ft.objectives  # noqa: F401
    import lightning_ft.decoding  # noqa: F401
    import lightning_ft.monitors  # noqa: F401

    class ContinuingWriter(ExperimentWriter):
        """Appends to the metrics of the run it continues (Lightning's writer deletes them)."""

        def _check_log_dir_exists(self) -> None:
            if self._fs.isfile(self.metrics_file_path):
                import csv

                with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                    self.metrics_keys = sorted(next(csv.reader(file), []))

    class ContinuingCSVLogger(CSVLogger):
        """A CSVLogger whose ``metrics.csv`` survives a run continued through ``--ckpt_path``."""

        @property
        @rank_zero_experiment
        def experiment(self) -> ExperimentWriter:
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = ContinuingWriter(log_dir=self.log_dir)
            return self._experiment

    class LightningFTCLI(LightningCLI):
        """LightningCLI with lightning-ft's defaults (see the module docstring)."""

        constructor_error: BaseException | None = None
        run_root: Path | None = None

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_argument("--run_name", type=str | None, default=None, help="Run folder name under runs/.")
            parser.add_argument(
                "--wandb", type=str, default="auto", help="W&B logging: auto (offline unless configured), online, offline, disabled."
            )
            parser.add_argument(
                "--report", type=bool, default=True,
                help="fit: add RunDashboard (W&B panels of every method's state, dashboard.json and report.html in the run folder).",
            )
            parser.set_defaults({key: {"class_path": path} for key, path in DEFAULT_CLASSES.items()})

        # ------------------------------------------------------------------ parsing and early refusals
        def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
            from argparse import ArgumentError

            argv = [str(a) for a in args] if isinstance(args, list) else sys.argv[1:]
            subcommand = next((a for a in argv if a in SUBCOMMANDS), None)
            try:
                if args is None or isinstance(args, list):
                    self._drop_defaults_of_named_classes(parser, argv)
                super().parse_arguments(parser, args)
            except ArgumentError as err:
                raise explain_parse_error(
                    str(err), argv, prog=f"lightning-ft {subcommand}" if subcommand else "lightning-ft",
                    options=_options(parser, subcommand), classes=known_classes(), usage=_usage(subcommand),
                ) from err
            except UnicodeDecodeError as err:  # jsonargparse reads --config files as text
                problem = config_problem(argv) or f"a --config file is not UTF-8 text ({err})."
                raise UsageError(problem, _usage(subcommand)) from err

        def _drop_defaults_of_named_classes(self, parser: LightningArgumentParser, argv: list[str]) -> None:
            """Keep the default model and data classes (:data:`DEFAULT_CLASSES`) only where no class is named.

            jsonargparse starts from the defaults, the default class's ``init_args`` included, and keeps those a class
            named over it accepts ("only what gets specified is changed"): ClassificationDataModule would get
            InstructionDataModule's ``max_length``. A parse without defaults shows which classes the command line and
            configs name (init_args given alone are the default class's); a class other than the default loses the
            parser's default, so each of its arguments not given takes that class's own default.
            """
            if any(a in ("-h", "--help") for a in argv):
                return  # the help shows the default classes (and a parse would print it here)
            try:
                given = parser.parse_args([a for a in argv if not a.startswith("--print_config")], defaults=False,
                                          _skip_validation=True)  # fmt: skip
            except Exception:  # noqa: BLE001 - the parse that follows reports the mistake in its own sentence
                return
            subcommand = given.get("subcommand")
            sub = self._subcommand_parsers.get(subcommand) if subcommand else None
            for key, default in DEFAULT_CLASSES.items():
                named = given.get(f"{subcommand}.{key}")
                if sub is not None and hasattr(named, "get") and named.get("class_path") not in (None, default):
                    sub.set_defaults({key: None})

        def _parse_ckpt_path(self) -> None:
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if ckpt_path:
                self._check_ckpt_path(str(ckpt_path), self.config[subcommand]["model"])
            super()._parse_ckpt_path()

        def _check_ckpt_path(self, ckpt_path: str, model_config: Any) -> None:
            """Refuse a ``--ckpt_path`` that is not a Lightning checkpoint of this config's module."""
            path = Path(ckpt_path)
            usage = "--ckpt_path takes the .ckpt file of a run, e.g. runs/<run_name>/checkpoints/last.ckpt"
            if ckpt_path in _SPECIAL_CKPT or ckpt_path.startswith("registry:"):
                return
            if not path.exists():
                raise UserError(f"--ckpt_path {ckpt_path} does not exist: {usage}.")
            if path.is_dir():
                if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
                    raise UserError(
                        f"--ckpt_path {ckpt_path} is a Hugging Face model folder, not a Lightning checkpoint: load it "
                        f"with --model.init_args.model {ckpt_path} ({usage})."
                    )
                if any((path / marker).exists() for marker in _SHARDED_MARKERS):
                    return  # a sharded (FSDP / DeepSpeed) checkpoint folder
                inside = [*path.glob("*.ckpt"), *path.glob("*/*.ckpt"), *path.glob("*/*/*.ckpt")]
                last = [p for p in inside if p.name == "last.ckpt"]
                example = min(last or inside, key=lambda p: len(p.parts)) if inside else None
                raise UserError(f"--ckpt_path {ckpt_path} is a folder, not a checkpoint: "
                                + (f"give a .ckpt file in it, e.g. {example}." if example else f"{usage}."))  # fmt: skip
            if path.suffix in _WEIGHT_FILES:
                raise UserError(
                    f"--ckpt_path {ckpt_path} is a weights file, not a Lightning checkpoint: load the model folder "
                    f"that holds it with --model.init_args.model {path.parent} ({usage})."
                )
            checkpoint = _load_checkpoint(path)
            if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
                raise UserError(
                    f"--ckpt_path {ckpt_path} is not a Lightning checkpoint (no state_dict in it): {usage}; a model "
                    "folder or weights file goes to --model.init_args.model."
                )
            from lightning_ft.modules.causal_lm import checkpoint_mismatch

            current = import_class(str(model_config.get("class_path")), known_classes())
            init_args = dict(model_config.get("init_args") or {})
            mismatch = checkpoint_mismatch(checkpoint, current, init_args) if current is not None else None
            if mismatch is not None:
                raise UserError(
                    f"--ckpt_path {ckpt_path} is a checkpoint of {mismatch[0]}, but the config gives {mismatch[1]}: pass "
                    "the config that trained it, or a checkpoint of this config's model."
                )

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand] if self.subcommand else self.config
            if config.get("wandb", "auto") not in ("auto", "online", "offline", "disabled"):
                raise UserError(f"--wandb {config['wandb']} is not a W&B mode: use auto, online, offline or disabled.")
            self.run_root = self._claim_run_root(config)
            from lightning_ft.support import check_strategy_support

            named = [cb.get("class_path") for cb in config["trainer"].get("callbacks") or [] if hasattr(cb, "get")]
            classes = [import_class(str(path), known_classes()) for path in [*named, config["model"].get("class_path")]]
            check_strategy_support([c for c in classes if c is not None], config["trainer"].get("strategy"))

        def _claim_run_root(self, config: Any) -> Path:
            """The run folder; refuses one that holds another run unless ``fit`` continues it through --ckpt_path."""
            base = Path(config["trainer"].get("default_root_dir") or "runs")
            name = config.get("run_name")
            if not name:
                name = f"{self.subcommand or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
                stem, n = name, 1
                while run_outputs(base / name):
                    n, name = n + 1, f"{stem}-{n}"
                return base / name
            root = base / name
            found = run_outputs(root)
            if not found or int(os.environ.get("LOCAL_RANK", "0")) != 0 or int(os.environ.get("NODE_RANK", "0")) != 0:
                return root  # only the first process checks: other ranks start after it has written there
            ckpt = config.get("ckpt_path")
            if self.subcommand == "fit" and ckpt and (ckpt in _SPECIAL_CKPT or _inside(Path(ckpt), root)):
                return root  # continues this run
            last = root / "checkpoints" / "last.ckpt"
            fix = (f"continue it with --ckpt_path {last} (a checkpoint of this run), or pick another --run_name"
                   if self.subcommand == "fit" else f"give this {self.subcommand} its own --run_name")  # fmt: skip
            raise UserError(
                f"--run_name {name} already holds a run ({root} has {', '.join(found)}), which this {self.subcommand} "
                f"would write over: {fix}."
            )

        def _add_instantiators(self) -> None:
            super()._add_instantiators()
            for (class_type, subclasses), instantiator in list((self.parser._instantiators or {}).items()):
                self.parser.add_instantiator(_Recorder(self, instantiator), class_type, subclasses=subclasses)
            self.parser.add_instantiator(_Recorder(self), object, subclasses=True)

        def instantiate_classes(self) -> None:
            self.constructor_error = None
            try:
                super().instantiate_classes()
            except Exception as err:
                recorded = self.constructor_error
                if recorded is None or recorded is err:
                    raise
                raise recorded.with_traceback(recorded.__traceback__) from None

        # ------------------------------------------------------------------ the Trainer
        def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
            config = self.config_init.get(str(self.subcommand), self.config_init) if self.subcommand else self.config_init
            trainer_cfg = config["trainer"]
            root = self.run_root or self._claim_run_root(self.config[self.subcommand] if self.subcommand else self.config)
            kwargs.setdefault("default_root_dir", str(root))
            if trainer_cfg.get("logger") in (None, True):
                kwargs.setdefault("logger", self._default_loggers(root, root.name, config.get("wandb", "auto")))
            callbacks = list(trainer_cfg.get("callbacks") or [])
            extra: list[pl.Callback] = []
            if not any(isinstance(c, ModelCheckpoint) for c in callbacks) and trainer_cfg.get("enable_checkpointing") is not False:
                # the run folder is this run's alone (see _claim_run_root): no last-v1.ckpt beside a stale last.ckpt
                extra.append(ModelCheckpoint(dirpath=root / "checkpoints", save_last="link", enable_version_counter=False))
            if not any(isinstance(c, pl.callbacks.ProgressBar) for c in callbacks) and trainer_cfg.get("enable_progress_bar") is not False:
                extra.append(RichProgressBar(leave=True))
            if config.get("report", True):  # it acts in fit only; elsewhere it takes its state from a fit checkpoint
                from lightning_ft.monitors.dashboard import RunDashboard

                if not any(type(c).__name__ == "RunDashboard" for c in callbacks):
                    extra.append(RunDashboard())
            if self.subcommand == "predict":
                from lightning_ft.callbacks import JsonlPredictionWriter

                if not any(isinstance(c, JsonlPredictionWriter) for c in callbacks):
                    extra.append(JsonlPredictionWriter())
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": extra}
            return super().instantiate_trainer(**kwargs)

        @staticmethod
        def _default_loggers(root: Path, run_name: str, wandb: str) -> list[Any]:
            loggers: list[Any] = [ContinuingCSVLogger(save_dir=str(root), name="", version="csv")]
            from lightning_ft.monitors.dashboard import wandb_mode

            mode = wandb_mode() if wandb == "auto" else wandb
            if mode != "disabled":
                os.environ.setdefault("WANDB_MODE", mode)
                root.mkdir(parents=True, exist_ok=True)  # W&B looks for the git root from here, and warns if it is missing
                logger = WandbLogger(project="lightning-ft", name=run_name, save_dir=str(root), offline=mode == "offline")
                logger._wandb_init.pop("anonymous", None)  # W&B warns that the setting is gone whenever it is passed
                loggers.append(logger)
            return loggers

        @staticmethod
        def configure_optimizers(lightning_module: Any, optimizer: Any, lr_scheduler: Any = None) -> Any:
            """Schedulers given with ``--lr_scheduler`` step every optimizer step (fine-tuning schedules are step-based)."""
            if lr_scheduler is None:
                return optimizer
            if isinstance(lr_scheduler, ReduceLROnPlateau):
                return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "monitor": lr_scheduler.monitor}}
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}

    return LightningFTCLI


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _load_checkpoint(path: Path) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file gets the same sentence
        raise UserError(
            f"--ckpt_path {path} is not a Lightning checkpoint (torch.load cannot read it): --ckpt_path takes the .ckpt "
            "file of a run (runs/<run_name>/checkpoints/last.ckpt); a model folder goes to --model.init_args.model."
        ) from None


# ---------------------------------------------------------------------------------------------- parser messages
_CLASS_MODULES = ("lightning_ft.callbacks", "lightning_ft.modules", "lightning_ft.data", "lightning_ft.objectives",
                  "lightning_ft.copilot", "lightning_ft.decoding", "lightning_ft.monitors", "lightning.pytorch.callbacks",
                  "lightning.pytorch.loggers")  # fmt: skip


def known_classes() -> dict[str, type]:
    """The classes a config may name by their short name (``HalfFineTuning``), by name."""
    found: dict[str, type] = {}
    for module_name in _CLASS_MODULES:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", None) or dir(module):
            obj = getattr(module, name, None)
            if isinstance(obj, type):
                found.setdefault(name, obj)
    return found


def _usage(subcommand: str | None) -> str:
    command = subcommand or "{" + ",".join(COMMANDS) + "}"
    return f"usage: lightning-ft {command} [-h] [--config FILE] [--KEY VALUE ...] [--print_config] [--debug]"


def _unknown_command(name: str | None) -> UsageError:
    commands = ", ".join(COMMANDS)
    if name is None:
        return UsageError(f"a command is needed: one of {commands}.", _usage(None))
    hint = did_you_mean(name, COMMANDS).rstrip(".?")
    return UsageError(f"{name!r} is not a command (commands: {commands}){hint}" + ("?" if hint else "."), _usage(None))


def _options(parser: Any, subcommand: str | None) -> list[str]:
    action = getattr(parser, "_subcommands_action", None)
    sub = getattr(action, "_name_parser_map", {}).get(subcommand, parser) if subcommand else parser
    return [o.lstrip("-") for a in getattr(sub, "_actions", []) for o in a.option_strings if o.startswith("--")]


def __getattr__(name: str) -> Any:
    if name == "LightningFTCLI":
        return _cli_class()
    if name == "wandb_mode":  # lives with the W&B dashboard; imported on use, as the CLI's other heavy parts
        from lightning_ft.monitors.dashboard import wandb_mode

        return wandb_mode
    raise AttributeError(name)


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in str(record.msg) for f in self.fragments)


# known-harmless start-up notices of dependencies: (logger, fragment of the message)
_QUIET_LOGS = (
    ("bitsandbytes.backends.cpu.ops", "kernels-community"),  # the optional kernel hub is not installed
    *((name, "litlogger") for name in ("lightning_utilities.core.rank_zero", "lightning.fabric.utilities.rank_zero",
                                       "lightning.pytorch.utilities.rank_zero")),  # Lightning's cloud-logger advert
)


@contextlib.contextmanager
def quiet_dependencies() -> Iterator[None]:
    """Silence the dependencies' known-harmless notices for the duration of one command (and only there)."""
    filters = [(logging.getLogger(name), _DropMessages(fragment)) for name, fragment in _QUIET_LOGS]
    for logger, drop in filters:
        logger.addFilter(drop)
    progress = None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=PendingDeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        try:
            from transformers.utils import logging as hf_logging

            progress = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars of every load and save
        except ImportError:  # pragma: no cover - transformers is a dependency
            pass
        try:
            yield
        finally:
            for logger, drop in filters:
                logger.removeFilter(drop)
            if progress:
                hf_logging.enable_progress_bar()


def _prog(argv: list[str]) -> str:
    command = next((a for a in argv if a in COMMANDS), None)
    return f"lightning-ft {command}" if command else "lightning-ft"


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-ft`` console script (``args``: the command line, for calls from Python).

    Raises:
        SystemExit: After printing one ``lightning-ft <command>: error: <sentence>`` line for a user's mistake (status
            1, or 2 for a command-line mistake), or a traceback and a bug line for an internal error (status 1).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", os.environ["HF_HUB_OFFLINE"])
    os.environ.setdefault("HF_DATASETS_OFFLINE", os.environ["HF_HUB_OFFLINE"])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv, debug = debug_requested(list(args) if args is not None else sys.argv[1:])
    with quiet_dependencies():
        run_command(_prog(argv), lambda: _run(argv), debug=debug)


def _run(argv: list[str]) -> None:
    if argv and argv[0] == "estimate":
        from lightning_ft.planning.cli import main as estimate_main

        estimate_main(argv[1:])
        return
    if argv and argv[0] == "search":
        from lightning_ft.search.cli import main as search_main
        from lightning_ft.search.trial import FitCommand

        search_main(argv[1:], FitCommand(main, DEFAULT_CLASSES, known_classes))
        return
    if argv and argv[0] in DATA_COMMANDS:
        from lightning_ft.curation.cli import main as data_main

        data_main(argv[1:], fit=main)
        return
    if argv and argv[0] == "self-train":
        from lightning_ft.curation.self_training import main as self_train_main

        self_train_main(argv[1:])
        return
    if argv and argv[0] == "explore-novelty":
        from lightning_ft.curation.novelty import main as novelty_main

        novelty_main(argv[1:])
        return
    if argv and argv[0] == "mitigate-intruders":
        from lightning_ft.monitors.mitigate import main as mitigate_main

        mitigate_main(argv[1:])
        return
    if argv and argv[0] == "analyze-shift":
        from lightning_ft.monitors.attribution import main as analyze_main

        analyze_main(argv[1:])
        return
    if argv and argv[0] == "steer":
        from lightning_ft.monitors.steer import main as steer_main

        steer_main(argv[1:])
        return
    if argv and argv[0] == "compare":
        from lightning_ft.monitors.compare import main as compare_main

        compare_main(argv[1:])
        return
    if argv and argv[0] == "spin":
        from lightning_ft.curation.spin import main as spin_main

        spin_main(argv[1:], fit=main)
        return
    if argv and argv[0] in POSTHOC_COMMANDS:
        from lightning_ft.merging.cli import main as posthoc_main

        posthoc_main(argv)
        return
    if not argv or not (argv[0] in SUBCOMMANDS or argv[0].startswith("-")):
        raise _unknown_command(argv[0] if argv else None)
    cli_class = _cli_class()
    cli = cli_class(
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False, **({"parser_mode": "omegaconf"} if _has_omegaconf() else {})},
        args=argv,
    )
    _finish_wandb(getattr(cli, "trainer", None))


def _finish_wandb(trainer: Any) -> None:
    """Finish the command's W&B run, so that its files are complete when the command returns (``main`` may be
    called several times in one process, e.g. fit then validate)."""
    for logger in getattr(trainer, "loggers", None) or []:
        if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()


def _has_omegaconf() -> bool:
    import importlib.util

    return importlib.util.find_spec("omegaconf") is not None


if __name__ == "__main__":  # pragma: no cover
    main()
