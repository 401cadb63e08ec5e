"""The run's dashboard: every method's state as W&B tables and images, and ``report.html`` in the run folder.

:class:`RunDashboard` records the training and validation curves and, for every callback that decides which blocks
train (:class:`~lightning_ft.core.selection.SelectionCallback`: layer freezing, LISA/OwLore, HFT, IST, ...), the
trainable share of each block whenever it changes. At the end of ``fit`` it collects the panels that callbacks and
the LightningModule show through ``dashboard_panels()`` (the before/after table of
:class:`~lightning_ft.callbacks.ForgettingReport`, mask densities of sparse fine-tuning, LiNeS's factors and sweep,
the Copilot's lambda sweep, intruder dimensions, ...), and

- logs each panel to W&B as a table (``panels/<key>``) and each picture as an image (``panels/<key>_plot``), the
  before/after values as summary fields (``report/before/*``, ``report/after/*``), and, with ``log_model``, the
  exported model folder as a ``model`` artifact;
- writes ``dashboard.json`` (the panels as data) and ``report.html`` (one self-contained page, pictures as inline
  SVG) into the run folder, both atomically.

It works at the end of ``fit`` (in ``teardown``, after every callback's ``on_fit_end`` edit and export) on global
rank 0; during training it only copies a few scalars per logged step. ``lightning-ft fit`` adds it to every run
(``--report false`` leaves it out); in a plain Lightning script add it yourself.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from typing_extensions import override

from lightning_ft.core.io import write_text_atomic
from lightning_ft.core.support import MethodSupport, check_support
from lightning_ft.monitors.panels import Panel, figure_of

__all__ = ["RunDashboard", "collect_panels", "log_panels", "wandb_mode"]


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
        return float(value)
    return None


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


def collect_panels(trainer: L.Trainer, pl_module: L.LightningModule) -> list[Panel]:
    """The panels of every callback and of the LightningModule that define ``dashboard_panels()``."""
    panels: list[Panel] = []
    for owner in [*trainer.callbacks, pl_module]:
        show = getattr(owner, "dashboard_panels", None)
        if callable(show) and not isinstance(owner, RunDashboard):
            panels.extend(show())
    return panels


class RunDashboard(L.Callback):
    """W&B panels of every method's state and a self-contained ``report.html`` (see the module docstring).

    Args:
        html: write ``report.html`` beside ``dashboard.json`` in ``trainer.default_root_dir``.
        log_model: log the LightningModule's exported model folder (``output_path()``) to W&B as a ``model``
            artifact at the end of ``fit``.
        every_n_steps: record the training curves every n optimizer steps (default: the Trainer's
            ``log_every_n_steps``).
        title: the page's heading (default: the run folder's name).

    Example::

        trainer = L.Trainer(callbacks=[ForgettingReport(), SparseFineTuning(...), RunDashboard()])
    """

    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "fsdp2", "lora", "quantized", "mixed"}),
        notes="A monitor: it changes no weight; global rank 0 records and writes (a method's panel from its own "
        "parameter shards says so).",
    )

    def __init__(self, html: bool = True, log_model: bool = False, every_n_steps: int | None = None,
                 title: str | None = None) -> None:  # fmt: skip
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be at least 1 (or None: the Trainer's log_every_n_steps).")
        self.html, self.log_model, self.every_n_steps, self.title = html, log_model, every_n_steps, title
        self.curves: dict[str, list[list[float]]] = {}
        self.activity: dict[str, list[list[Any]]] = {}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_support(self, trainer)  # every strategy but the legacy sharded ones
        if self.log_model and _export_path(pl_module) is None:
            raise ValueError(
                f"RunDashboard(log_model=True) logs the exported model, and {type(pl_module).__name__} exports none: "
                "keep its export on (output_dir unset or a folder) or drop log_model."
            )

    # ------------------------------------------------------------------ recording
    def _add(self, key: str, step: int, value: float) -> None:
        points = self.curves.setdefault(key, [])
        if points and points[-1][0] == step:
            points[-1][1] = value
        else:
            points.append([float(step), value])

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        step = trainer.global_step
        every = self.every_n_steps or max(1, trainer.log_every_n_steps)
        if trainer.is_global_zero and step % every == 0:
            for key, value in trainer.callback_metrics.items():
                number = _scalar(value) if key.startswith("train") else None
                if number is not None:
                    self._add(key, step, number)
        if trainer.is_global_zero:
            self._sample_activity(trainer, step)

    def _sample_activity(self, trainer: L.Trainer, step: int) -> None:
        for callback in trainer.callbacks:
            activity = getattr(callback, "block_activity", None)
            if not callable(activity):
                continue
            blocks = activity()
            if not blocks:
                continue
            series = self.activity.setdefault(type(callback).__name__, [])
            row = [round(float(v), 6) for _, v in sorted(blocks.items())]
            if not series or series[-1][1] != row:
                series.append([step, row])

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not trainer.is_global_zero:
            return
        for key, value in trainer.callback_metrics.items():
            number = _scalar(value) if key.startswith("val") else None
            if number is not None:
                self._add(key, trainer.global_step, number)

    # ------------------------------------------------------------------ panels
    def own_panels(self, trainer: L.Trainer) -> list[Panel]:
        """Curves (training, target, control) and the trainable share of each block over steps."""
        panels: list[Panel] = []
        groups: dict[str, list[str]] = {}
        for key in sorted(self.curves):
            name = key.split("/", 1)[-1]
            group = ("loss" if key.startswith("train") else "control" if "control" in name
                     else "target" if "target" in name else "other")  # fmt: skip
            groups.setdefault(group, []).append(key)
        titles = {"loss": "Training loss", "target": "Target metrics", "control": "Control (forgetting) metrics", "other": "Other metrics"}
        for group in ("loss", "target", "control", "other"):
            keys = groups.get(group, [])
            if not keys:
                continue
            steps = sorted({p[0] for k in keys for p in self.curves[k]})
            lookup = {k: {p[0]: p[1] for p in self.curves[k]} for k in keys}
            values = [[s, *[lookup[k].get(s) for k in keys]] for s in steps]
            panels.append(Panel(f"curves/{group}", titles[group], "lines", ["step", *keys], values, x_label="step"))
        for name, series in self.activity.items():
            if not series:
                continue
            last = trainer.global_step
            blocks = len(series[0][1])
            steps = [int(s) for s, _ in series]
            ends = [s - 1 for s in steps[1:]] + [max(last, steps[-1])]  # a row holds from its step to the next row's
            labels = [f"{a}-{b}" if b > a else str(a) for a, b in zip(steps, ends)]
            panels.append(Panel(f"selection/{name}", f"{name}: trainable share of each block over steps", "heatmap",
                                [f"{b:02d}" for b in range(blocks)], [row for _, row in series], rows=labels,
                                x_label="block", y_label="steps",
                                note="Each row is one selection, trained in the optimizer steps it names (1-based); 1 = the whole block trains."))  # fmt: skip
        return panels

    # ------------------------------------------------------------------ the end of fit
    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        panels = self.own_panels(trainer) + collect_panels(trainer, pl_module)
        summary = self._summary(trainer)
        root = Path(trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        title = self.title or root.resolve().name
        payload = {"title": title, "step": trainer.global_step, "summary": summary,
                   "panels": [p.as_dict() for p in panels]}  # fmt: skip
        write_text_atomic(root / "dashboard.json", json.dumps(payload, indent=1, default=_jsonable))
        if self.html:
            from lightning_ft.monitors.html import render_report

            write_text_atomic(root / "report.html", render_report(payload))
            print(f"lightning-ft: the run's report is {root / 'report.html'}")
        self._to_wandb(trainer, pl_module, panels, summary)

    def _summary(self, trainer: L.Trainer) -> dict[str, float]:
        out: dict[str, float] = {}
        for callback in trainer.callbacks:
            before, after = getattr(callback, "before", None), getattr(callback, "after", None)
            if type(callback).__name__ == "ForgettingReport" and isinstance(before, dict) and isinstance(after, dict):
                out.update({f"report/before/{k}": float(v) for k, v in before.items()})
                out.update({f"report/after/{k}": float(v) for k, v in after.items()})
        for key, points in self.curves.items():
            if points:
                out[f"final/{key}"] = points[-1][1]
        return out

    def _to_wandb(self, trainer: L.Trainer, pl_module: L.LightningModule, panels: list[Panel],
                  summary: dict[str, float]) -> None:  # fmt: skip
        loggers = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
        path = _export_path(pl_module) if self.log_model else None
        if path is not None and not path.exists():
            raise ValueError(f"RunDashboard(log_model=True) found no exported model at {path}: the module's export "
                             "did not run; check its on_fit_end.")  # fmt: skip
        for logger in loggers:
            log_panels(logger.experiment, panels, summary, model_dir=path)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"curves": self.curves, "activity": self.activity}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.curves = {k: [list(p) for p in v] for k, v in state_dict.get("curves", {}).items()}
        self.activity = {k: [list(p) for p in v] for k, v in state_dict.get("activity", {}).items()}


def log_panels(run: Any, panels: list[Panel], summary: dict[str, Any], model_dir: str | Path | None = None) -> None:
    """Log ``panels`` to a W&B run (a table ``panels/<key>`` each, and an image ``panels/<key>_plot`` of each
    picture), ``summary`` as summary fields, and ``model_dir`` as a ``model`` artifact."""
    import wandb

    logged: dict[str, Any] = {}
    for panel in panels:
        columns, rows = panel.table()
        logged[f"panels/{panel.key}"] = wandb.Table(columns=columns, data=[[_cell(v) for v in r] for r in rows])
        image = _png(panel)
        if image is not None:
            logged[f"panels/{panel.key}_plot"] = wandb.Image(image, caption=panel.title)
    if logged:
        run.log(logged)
    run.summary.update(summary)
    if model_dir is not None:
        artifact = wandb.Artifact(f"model-{run.id}", type="model")
        artifact.add_dir(str(model_dir))
        run.log_artifact(artifact)


def _export_path(pl_module: L.LightningModule) -> Path | None:
    output_path = getattr(pl_module, "output_path", None)
    path = output_path() if callable(output_path) else None
    return None if path is None else Path(path)


def _jsonable(value: Any) -> Any:
    number = _scalar(value)
    return number if number is not None else str(value)


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool)):
        return value
    number = _scalar(value)
    return number if number is not None else str(value)


def _png(panel: Panel) -> Any:
    """The panel's figure as a PIL image (``None`` for a table)."""
    fig = figure_of(panel)
    if fig is None:
        return None
    import matplotlib.pyplot as plt
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
