"""Write ``predict`` outputs (prompt, completion, reference) to a JSONL file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

__all__ = ["JsonlPredictionWriter"]


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes each predicted record to ``<output_dir>/predictions[-rank<r>].jsonl``.

    Records stream into a hidden ``.predictions*.jsonl.partial`` beside it, which replaces the file only when
    ``predict`` ends: an interrupted run leaves the previous predictions whole (and its partial file to look at).

    Args:
        output_dir: folder for the file; default: the trainer's ``default_root_dir``.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.path: Path | None = None
        self._partial = Path()

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        root = Path(self.output_dir or trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        suffix = f"-rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        self.path = root / f"predictions{suffix}.jsonl"
        self._partial = root / f".{self.path.name}.partial"
        self._partial.write_text("")

    @override
    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.path is not None and self._partial.exists():
            with self._partial.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(self._partial, self.path)

    @override
    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if self.path is None or not isinstance(prediction, list):
            return
        with self._partial.open("a", encoding="utf-8") as f:
            for record in prediction:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
