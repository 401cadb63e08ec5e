"""The ``lightning-ft`` command: LightningCLI with fine-tuning defaults.

``lightning-ft fit|validate|test|predict --config configs/quickstart.yaml`` runs a LightningCLI whose
defaults are the causal-LM module and the instruction DataModule, a per-run folder
(``runs/<run_name>``) holding checkpoints (``last.ckpt`` for resuming), CSV metrics, the W&B run (offline
unless W&B is configured), predictions and the exported HF model.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["POSTHOC_COMMANDS", "main", "wandb_mode"]  # LightningFTCLI: built lazily, see __getattr__

# Post-hoc weight commands, dispatched before LightningCLI (they run no Trainer).
POSTHOC_COMMANDS = ("merge", "compress", "decompress", "sparse-apply")


def wandb_mode() -> str:
    """``online`` when the user configured W&B (``WANDB_MODE``, ``WANDB_API_KEY`` or a login), else ``offline``."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if "api.wandb.ai" in netrc.read_text():
            return "online"
    except OSError:
        pass
    return "offline"


def _cli_class() -> type:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
    from lightning.pytorch.loggers import CSVLogger, WandbLogger
    from torch.optim.lr_scheduler import ReduceLROnPlateau

    import lightning_ft.callbacks  # noqa: F401  (registers short class names for YAML)
    import lightning_ft.data  # noqa: F401
    import lightning_ft.modules  # noqa: F401
    import lightning_ft.copilot  # noqa: F401
    import lightning_ft.objectives  # noqa: F401

    class LightningFTCLI(LightningCLI):
        """LightningCLI with lightning-ft's defaults (see the module docstring)."""

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_argument("--run_name", type=str | None, default=None, help="Run folder name under runs/.")
            parser.add_argument(
                "--wandb", type=str, default="auto", help="W&B logging: auto (offline unless configured), online, offline, disabled."
            )
            parser.set_defaults(
                {
                    "model": {"class_path": "lightning_ft.modules.CausalLMModule"},
                    "data": {"class_path": "lightning_ft.data.InstructionDataModule"},
                }
            )

        def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
            config = self.config_init.get(str(self.subcommand), self.config_init) if self.subcommand else self.config_init
            trainer_cfg = config["trainer"]
            run_name = config.get("run_name") or f"{self.subcommand or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
            root = Path(trainer_cfg.get("default_root_dir") or "runs") / run_name
            kwargs.setdefault("default_root_dir", str(root))
            if trainer_cfg.get("logger") in (None, True):
                kwargs.setdefault("logger", self._default_loggers(root, run_name, config.get("wandb", "auto")))
            callbacks = list(trainer_cfg.get("callbacks") or [])
            extra: list[pl.Callback] = []
            if not any(isinstance(c, ModelCheckpoint) for c in callbacks) and trainer_cfg.get("enable_checkpointing") is not False:
                extra.append(ModelCheckpoint(dirpath=root / "checkpoints", save_last="link"))
            if not any(isinstance(c, pl.callbacks.ProgressBar) for c in callbacks) and trainer_cfg.get("enable_progress_bar") is not False:
                extra.append(RichProgressBar(leave=True))
            if self.subcommand == "predict":
                from lightning_ft.callbacks import JsonlPredictionWriter

                if not any(isinstance(c, JsonlPredictionWriter) for c in callbacks):
                    extra.append(JsonlPredictionWriter())
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": extra}
            return super().instantiate_trainer(**kwargs)

        @staticmethod
        def _default_loggers(root: Path, run_name: str, wandb: str) -> list[Any]:
            loggers: list[Any] = [CSVLogger(save_dir=str(root), name="", version="csv")]
            mode = wandb_mode() if wandb == "auto" else wandb
            if mode != "disabled":
                os.environ.setdefault("WANDB_MODE", mode)
                loggers.append(
                    WandbLogger(project="lightning-ft", name=run_name, save_dir=str(root), offline=mode == "offline")
                )
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


def __getattr__(name: str) -> Any:
    if name == "LightningFTCLI":
        return _cli_class()
    raise AttributeError(name)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-ft`` console script (``args``: the command line, for calls from Python)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", os.environ["HF_HUB_OFFLINE"])
    os.environ.setdefault("HF_DATASETS_OFFLINE", os.environ["HF_HUB_OFFLINE"])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(args) if args is not None else sys.argv[1:]
    if argv and argv[0] in POSTHOC_COMMANDS:
        from lightning_ft.merging.cli import main as posthoc_main

        posthoc_main(argv)
        return
    cli_class = _cli_class()
    cli_class(
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf"} if _has_omegaconf() else {},
        args=args,
    )


def _has_omegaconf() -> bool:
    import importlib.util

    return importlib.util.find_spec("omegaconf") is not None


if __name__ == "__main__":  # pragma: no cover
    main()
