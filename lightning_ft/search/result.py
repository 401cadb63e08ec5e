"""``TrialResult``: the callback a search adds to each trial's fit to report what the fit measured."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from lightning_ft.core.io import write_text_atomic

__all__ = ["RESULT_FILE", "TrialResult", "read_result"]

RESULT_FILE = "trial_result.json"


class TrialResult(pl.Callback):
    """Writes ``path`` (JSON) at the end of a fit that completed: the trainer's ``callback_metrics`` and the number
    of parameters that trained, counted on the model actually built when training starts (after every callback's
    ``setup`` has chosen what trains).

    The file is written atomically (:func:`lightning_ft.core.io.write_text_atomic`), so a reader sees all of it or
    none; a fit that fails writes nothing.

    Args:
        path: The JSON file to write.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.trainable: int | None = None
        self.total: int | None = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = list(pl_module.parameters())
        self.trainable = sum(p.numel() for p in params if p.requires_grad)
        self.total = sum(p.numel() for p in params)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        metrics = {name: _number(value) for name, value in trainer.callback_metrics.items()}
        result = {"metrics": metrics, "trainable_params": self.trainable, "total_params": self.total,
                  "global_step": trainer.global_step}  # fmt: skip
        write_text_atomic(self.path, json.dumps(result, indent=2) + "\n")


def _number(value: Any) -> float | None:
    """A metric as a JSON number (``None`` for NaN or inf, which JSON cannot hold)."""
    number = float(value.item() if hasattr(value, "item") else value)
    return number if math.isfinite(number) else None


def read_result(path: Path) -> dict[str, Any] | None:
    """The result a :class:`TrialResult` wrote to ``path``, or ``None`` when there is none."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
