r"""
Forgetting report
^^^^^^^^^^^^^^^^^

Evaluates the target task and the control set before and after ``fit`` and prints one table, so that
the gain on the task and the forgetting of general text are visible at a glance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lightning_ft.core.io import write_text_atomic
from lightning_ft.monitors.panels import Panel

__all__ = ["ForgettingReport"]

_ROWS = (
    ("target_acc", "target accuracy", "{:.3f}"),
    ("target_loss", "target loss", "{:.4f}"),
    ("target_ppl", "target perplexity", "{:.3f}"),
    ("control_ppl", "control perplexity", "{:.3f}"),
    ("control_drift", "control drift", "{:.4f}"),
)


def _fingerprint(module: L.LightningModule) -> float:
    """A cheap checksum of all parameters, to tell whether weights changed since the last validation."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum() for p in module.parameters()))


class ForgettingReport(L.Callback):
    """Before/after table of target metrics and control perplexity.

    The "before" column is measured at the start of training with the module's ``evaluate`` over the
    DataModule's validation loaders; the "after" column at the end of ``fit``, after every callback's
    ``on_train_end`` edit (reusing the last validation run only when it happened at the final step and no
    weight changed since). The table is printed, logged (``report/before/*``,
    ``report/after/*``) and written as ``report.json`` and ``report.md`` into the run folder.

    Args:
        print_table: print the table to the terminal at the end of fit.
        filename: base name of the files written into ``trainer.default_root_dir`` (``None``: no files).
    """

    def __init__(self, print_table: bool = True, filename: str | None = "report") -> None:
        self.print_table = print_table
        self.filename = filename
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}
        self._last_val: tuple[int, dict[str, float]] | None = None
        self._last_val_weights: float | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not callable(getattr(pl_module, "evaluate", None)):
            raise ValueError(
                f"ForgettingReport measures with `evaluate(loaders) -> metrics`, which {type(pl_module).__name__} "
                "lacks: add that method (CausalLMModule and SequenceClassificationModule have it) or drop the callback."
            )
        if trainer.datamodule is None:
            raise ValueError("ForgettingReport evaluates the DataModule's validation loaders: pass `datamodule=` to fit.")

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.before:  # a resumed run keeps the before-values from its checkpoint
            self.before = self._evaluate(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        values = {
            k.split("/", 1)[1]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")
        }
        self._last_val = (trainer.global_step, values)
        self._last_val_weights = _fingerprint(pl_module)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reusable = (
            self._last_val is not None
            and self._last_val[0] == trainer.global_step
            and self._last_val[1]
            and self._last_val_weights == _fingerprint(pl_module)  # no callback edited weights since (e.g. LiNeS)
        )
        if reusable:
            self.after = self._last_val[1]  # type: ignore[index]
        else:
            self.after = self._evaluate(trainer, pl_module)
        metrics = {f"report/before/{k}": v for k, v in self.before.items()}
        metrics.update({f"report/after/{k}": v for k, v in self.after.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self._emit(trainer)

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        evaluate = getattr(pl_module, "evaluate", None)
        datamodule = trainer.datamodule
        if evaluate is None or datamodule is None:
            return {}
        loaders = datamodule.val_dataloader()
        loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
        return dict(evaluate(loaders))

    def table(self) -> list[tuple[str, str, str, str]]:
        """Rows of (metric, before, after, change) for the metrics that were measured."""
        rows = []
        for key, label, fmt in _ROWS:
            if key not in self.before and key not in self.after:
                continue
            b, a = self.before.get(key), self.after.get(key)
            change = ""
            if b is not None and a is not None and math.isfinite(b) and math.isfinite(a):
                change = f"{a - b:+.3f}" if key == "target_acc" else f"{(a - b) / abs(b) * 100:+.1f}%" if b else ""
            rows.append((label, fmt.format(b) if b is not None else "-", fmt.format(a) if a is not None else "-", change))
        return rows

    def dashboard_panels(self) -> list[Panel]:
        """The before/after table (for :class:`~lightning_ft.monitors.RunDashboard`)."""
        rows = self.table()
        if not rows:
            return []
        return [Panel("report/before_after", "Before vs after fine-tuning", "table", ["metric", "before", "after", "change"],
                      [list(r) for r in rows], note="Target metrics and control perplexity on the validation loaders.")]

    @rank_zero_only
    def _emit(self, trainer: L.Trainer) -> None:
        rows = self.table()
        if self.print_table and rows:
            from rich.console import Console
            from rich.table import Table

            table = Table(title="lightning-ft: before vs after fine-tuning")
            for col in ("metric", "before", "after", "change"):
                table.add_column(col, justify="left" if col == "metric" else "right")
            for row in rows:
                table.add_row(*row)
            Console().print(table)
        if self.filename:
            root = Path(trainer.default_root_dir)
            root.mkdir(parents=True, exist_ok=True)
            write_text_atomic(
                root / f"{self.filename}.json",
                json.dumps({"before": self.before, "after": self.after, "step": trainer.global_step}, indent=2),
            )
            lines = ["| metric | before | after | change |", "|---|---|---|---|"]
            lines += [f"| {' | '.join(r)} |" for r in rows]
            write_text_atomic(root / f"{self.filename}.md", "\n".join(lines) + "\n")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"before": dict(self.before)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = dict(state_dict.get("before", {}))
