"""Panels: one picture of a method's state (a table, a heatmap, lines or bars), shared by the W&B dashboard, the
run's ``report.html`` and ``lightning-ft compare``.

A callback or LightningModule shows its state by defining ``dashboard_panels(self) -> list[Panel]``;
:class:`~lightning_ft.monitors.dashboard.RunDashboard` collects them at the end of ``fit``. A panel is plain data
(JSON-serialisable), so ``dashboard.json`` in the run folder holds everything the report draws.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["Panel", "figure_of", "inline_svg", "svg_of"]

Kind = Literal["table", "heatmap", "lines", "bars"]


@dataclass
class Panel:
    """One picture of a method's state.

    Args:
        key: W&B key and anchor, ``<method>/<what>`` (``sparse/density``).
        title: a heading a person reads.
        kind: ``table`` (``columns`` x ``values`` rows), ``heatmap`` (``values[y][x]`` with ``columns`` the x labels
            and ``rows`` the y labels), ``lines`` (``values`` rows ``[x, series...]``, ``columns`` ``[x name,
            series names...]``) or ``bars`` (``values`` rows ``[label, value]``).
        note: one line under the picture (what the numbers mean).
    """

    key: str
    title: str
    kind: Kind
    columns: list[str]
    values: list[list[Any]]
    rows: list[str] = field(default_factory=list)
    x_label: str = ""
    y_label: str = ""
    note: str = ""

    def table(self) -> tuple[list[str], list[list[Any]]]:
        """The panel as one flat table (what W&B stores): a heatmap gets its y labels as the first column."""
        if self.kind == "heatmap":
            return [self.y_label or "row", *self.columns], [[r, *v] for r, v in zip(self.rows, self.values)]
        return list(self.columns), [list(v) for v in self.values]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Panel:
        return cls(**data)


def _number(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def figure_of(panel: Panel) -> Any:
    """A matplotlib figure of a heatmap, lines or bars panel (``None`` for a table)."""
    if panel.kind == "table":
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if panel.kind == "heatmap":
        width = min(12.0, max(4.5, 2.5 + 0.35 * len(panel.columns)))
        height = min(10.0, 1.8 + 0.28 * len(panel.rows))
        fig, ax = plt.subplots(figsize=(width, height))
        data = [[_number(v) for v in row] for row in panel.values]
        image = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(panel.columns)), panel.columns, rotation=90 if len(panel.columns) > 6 else 0, fontsize=7)
        step = max(1, len(panel.rows) // 30)
        ax.set_yticks(range(0, len(panel.rows), step), panel.rows[::step], fontsize=7)
        fig.colorbar(image, ax=ax)
    elif panel.kind == "lines":
        xs = [_number(r[0]) for r in panel.values]
        series = {name: [_number(r[i]) if i < len(r) else math.nan for r in panel.values]
                  for i, name in enumerate(panel.columns[1:], start=1)}  # fmt: skip
        if _scales_differ(list(series.values())):  # one axis each, side by side (accuracy beside a loss)
            fig, axes = plt.subplots(1, len(series), figsize=(min(12.0, 3.6 * len(series)), 3.2), squeeze=False)
            for ax, (name, ys) in zip(axes[0], series.items()):
                ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3)
                ax.set_title(name, fontsize=8)
                ax.grid(alpha=0.3)
                ax.set_xlabel(panel.x_label or panel.columns[0])
            fig.suptitle(panel.title, fontsize=9)
            fig.tight_layout()
            return fig
        fig, ax = plt.subplots(figsize=(6.0, 3.4))
        for name, ys in series.items():
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, label=name)
        if len(series) > 1:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    else:  # bars
        fig, ax = plt.subplots(figsize=(min(12.0, 2.5 + 0.3 * len(panel.values)), 3.4))
        ax.bar([str(r[0]) for r in panel.values], [_number(r[1]) for r in panel.values])
        ax.tick_params(axis="x", labelrotation=90 if len(panel.values) > 8 else 0, labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    ax.set_title(panel.title, fontsize=9)
    ax.set_xlabel(panel.x_label or (panel.columns[0] if panel.kind == "lines" else ""))
    ax.set_ylabel(panel.y_label)
    fig.tight_layout()
    return fig


def _scales_differ(series: list[list[float]]) -> bool:
    """Whether the series' magnitudes differ by more than 5x (then each gets its own axis)."""
    peaks = [max((abs(v) for v in ys if math.isfinite(v)), default=0.0) for ys in series]
    peaks = [p for p in peaks if p > 0]
    return len(series) > 1 and bool(peaks) and max(peaks) > 5 * min(peaks)


def svg_of(panel: Panel) -> str:
    """The panel's figure as an inline ``<svg>`` element (empty for a table)."""
    fig = figure_of(panel)
    if fig is None:
        return ""
    import matplotlib.pyplot as plt

    text = inline_svg(fig)
    plt.close(fig)
    return text


def inline_svg(fig: Any) -> str:
    """A matplotlib figure as an ``<svg>`` element for an HTML page (no XML prologue, no metadata block)."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    text = buffer.getvalue()
    text = text[text.index("<svg") :]
    start, end = text.find("<metadata>"), text.find("</metadata>")
    return text[:start] + text[end + len("</metadata>") :] if 0 <= start < end else text
