"""Test helpers shared by every test module: a quiet CPU Trainer, tiny review data and a simulated crash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from lightning_ft.data import InstructionDataModule


def make_trainer(root: Path, steps: int, **kwargs: Any) -> L.Trainer:
    """A CPU Trainer without logger, checkpointing, progress bar or validation (override any by keyword)."""
    opts: dict[str, Any] = dict(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=str(root),
    )  # fmt: skip
    opts.update(kwargs)
    return L.Trainer(**opts)


def make_data(**kwargs: Any) -> InstructionDataModule:
    """Real review data, a small slice of it: 40 training records in batches of 4 (override any by keyword)."""
    opts: dict[str, Any] = dict(label_options=["positive", "negative"], train_size=40, val_size=8, test_size=0,
                                control_size=0, batch_size=4, max_length=48)  # fmt: skip
    opts.update(kwargs)
    return InstructionDataModule(**opts)


class Crash(RuntimeError):
    """The simulated crash raised by :class:`CrashAt`."""


class CrashAt(L.Callback):
    """Raises :class:`Crash` after optimizer step ``step``.

    ``ModelCheckpoint`` runs after the other callbacks, so ``last.ckpt`` is then the one of step ``step - 1``.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"simulated crash at step {self.step}")
