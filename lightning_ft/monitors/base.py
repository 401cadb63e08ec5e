"""The one home of a monitor's schedule, history, logging, resume state and fit-end JSON.

A monitor measures the model without changing it: every ``every_n_validations`` validations, optionally at the start
of training (``baseline``) and at the end of ``fit``, on global rank 0 only, in eval mode and without touching any
step where it does not run. :class:`MonitorCallback` owns all of that; a monitor implements :meth:`measure` (one
history entry) and, when an entry is not a flat ``{name: number}`` dict, :meth:`metrics` (the numbers logged from it).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from typing_extensions import override

from lightning_ft.core.io import write_text_atomic
from lightning_ft.core.layer_map import find_transformer
from lightning_ft.core.support import check_support
from lightning_ft.errors import UserError
from lightning_ft.monitors.panels import Panel

__all__ = ["RANK_ZERO_SHARDED", "MonitorCallback", "module_tokenizer"]

#: the refusal of a sharded strategy by a monitor whose forward passes run on global rank 0 alone
RANK_ZERO_SHARDED = ("{name} runs its probe forward passes on global rank 0 alone, and {strategy} shards the model "
                     "across processes: use strategy='ddp' (or a single device).")  # fmt: skip


class MonitorCallback(L.Callback, ABC):
    """The schedule, history, logging, resume state and JSON of a monitor.

    :meth:`measure` runs every ``every_n_validations`` validations (0: never during training), at the start of
    training when ``baseline`` is set (not again on resume) and at the end of ``fit``; at most once per global step,
    on global rank 0, with the model in eval mode (its mode is restored after). Each entry is kept in ``history``
    with its ``step`` (restored on resume), its :meth:`metrics` go to every logger under ``<prefix>/``, and at the end
    of ``fit`` rank 0 writes ``{**settings(), "history": history}`` atomically to ``<default_root_dir>/<filename>.json``.

    Subclasses set ``prefix``, implement :meth:`measure`, and may override :meth:`check_model` (every rank, in
    ``setup('fit')``), :meth:`prepare` (rank 0, in ``setup('fit')``), :meth:`metrics`, :meth:`settings`,
    :meth:`write_files` and :meth:`dashboard_panels`; state beyond the history extends :meth:`state_dict`.
    """

    prefix: ClassVar[str] = "monitor"

    def __init__(self, every_n_validations: int, baseline: bool, filename: str | None, module: str | None) -> None:
        if every_n_validations < 0:
            raise ValueError(f"every_n_validations={every_n_validations} must be 0 (fit end only) or more.")
        self.every_n_validations, self.baseline = every_n_validations, baseline
        self.filename, self.module = filename, module
        self.history: list[dict[str, Any]] = []
        self._validations = 0
        self._model: nn.Module | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._model = find_transformer(pl_module, self.module)
        check_support(self, trainer, self._model)
        self.check_model(self._model)
        if trainer.global_rank == 0:
            self.prepare(trainer, pl_module, self._model)

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model the monitor cannot measure (every rank, before anything runs)."""

    def prepare(self, trainer: L.Trainer, pl_module: L.LightningModule, model: nn.Module) -> None:
        """Load what the measurements need, before training changes a weight (global rank 0, once per fit)."""

    @abstractmethod
    def measure(self) -> dict[str, Any]:
        """One history entry for the model as it is now (without ``step``; the schedule adds it)."""

    def metrics(self, entry: dict[str, Any]) -> dict[str, float]:
        """The numbers logged for one entry, by name without the prefix (default: the entry itself)."""
        return {name: float(value) for name, value in entry.items()}

    def settings(self) -> dict[str, Any]:
        """The settings written into the JSON with the history."""
        return {}

    def dashboard_panels(self) -> list[Panel]:
        """Every logged value over steps (one line each)."""
        if not self.history:
            return []
        rows = [{"step": h["step"], **self.metrics({k: v for k, v in h.items() if k != "step"})} for h in self.history]
        names = [k for k in rows[0] if k != "step"]
        return [Panel(f"{self.prefix}/history", f"{type(self).__name__} over steps", "lines", ["step", *names],
                      [[r["step"], *[r.get(n) for n in names]] for r in rows], x_label="step")]  # fmt: skip

    def _record(self, trainer: L.Trainer) -> None:
        if trainer.global_rank != 0 or (self.history and self.history[-1]["step"] == trainer.global_step):
            return
        assert self._model is not None, "call setup('fit') first"
        was_training = self._model.training
        self._model.eval()
        try:
            entry = self.measure()
        finally:
            self._model.train(was_training)
        self.history.append({"step": trainer.global_step, **entry})
        metrics = {f"{self.prefix}/{name}": value for name, value in self.metrics(entry).items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.baseline and not self.history:
            self._record(trainer)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not self.every_n_validations:
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            self._record(trainer)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer)
        self._write(trainer)

    @rank_zero_only
    def _write(self, trainer: L.Trainer) -> None:
        if not self.history:
            return
        root = Path(trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.write_files(root)

    def write_files(self, root: Path) -> None:
        """Write the fit-end files into ``root`` (rank 0; default: the JSON, when ``filename`` is set)."""
        if self.filename:
            payload = {**self.settings(), "history": self.history}
            write_text_atomic(root / f"{self.filename}.json", json.dumps(payload, indent=1))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "validations": self._validations}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self._validations = int(state_dict.get("validations", 0))


def module_tokenizer(pl_module: L.LightningModule, name: str | None, owner: str, model: nn.Module | None = None) -> Any:
    """The tokenizer named by ``name``, else the LightningModule's ``tokenizer`` attribute, else the one saved with
    ``model`` (its ``config._name_or_path`` folder): a user's own module often holds only the HF model."""
    from transformers import AutoTokenizer

    if name is not None:
        from lightning_ft.assets import resolve_model

        return _padded(AutoTokenizer.from_pretrained(resolve_model(name)))
    tokenizer = getattr(pl_module, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    try:
        if source:
            return _padded(AutoTokenizer.from_pretrained(source))
    except (OSError, ValueError):
        pass
    raise UserError(f"{owner} tokenizes its probes with the module's tokenizer, and {type(pl_module).__name__} has "
                    f"none (nor does the model's folder {source!r}): pass tokenizer=<model name or folder>.")  # fmt: skip


def _padded(tokenizer: Any) -> Any:
    if tokenizer.pad_token is None:  # Llama-style tokenizers ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
