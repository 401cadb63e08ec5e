"""The Pareto front of a search and the files it is written to.

``front.md`` (a markdown table), ``front.csv`` and ``front.json`` list the non-dominated completed trials (trial
number, the metric, the trainable parameters, each dimension's choice, and the ready-to-run YAML);
``front/trial-<n>.yaml`` is each point's fit config at the user's full fidelity; ``front.png`` plots every
completed trial with the front (when matplotlib is installed); ``trials.csv`` lists every trial with its state.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_ft.core.io import atomic_file, write_text_atomic

__all__ = ["FrontPoint", "dominates", "pareto_front", "write_front", "write_trials"]


@dataclass(frozen=True)
class FrontPoint:
    """One completed trial.

    Attributes:
        number: The optuna trial number.
        metric: The quality metric.
        trainable: The trainable parameters of the model the trial built.
        choices: One value per dimension (a layers dimension as its list of layers that are on).
        peft: The trial's peft mapping.
    """

    number: int
    metric: float
    trainable: int
    choices: dict[str, Any]
    peft: dict[str, Any]


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether ``a`` dominates ``b`` when every objective is minimized: no worse in any, better in one."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(points: Sequence[FrontPoint], maximize: bool = False) -> list[FrontPoint]:
    """The points no other point dominates (quality in the metric's direction, fewer trainable parameters),
    sorted by trainable parameters."""
    sign = -1.0 if maximize else 1.0
    keys = [(sign * p.metric, float(p.trainable)) for p in points]
    front = [p for p, k in zip(points, keys) if not any(dominates(other, k) for other in keys)]
    return sorted(front, key=lambda p: (p.trainable, sign * p.metric, p.number))


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value) if value else "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _rows(front: Sequence[FrontPoint], metric: str, yaml_dir: Path) -> list[dict[str, Any]]:
    return [{"trial": p.number, metric: p.metric, "trainable_params": p.trainable, **p.choices,
             "yaml": str(yaml_dir / f"trial-{p.number:04d}.yaml")} for p in front]  # fmt: skip


def _markdown(rows: list[dict[str, Any]]) -> str:
    header = list(rows[0]) if rows else ["trial"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(row[k]) for k in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _cell(v) if isinstance(v, list) else v for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def _yaml(config: dict[str, Any], point: FrontPoint, metric: str, path: Path) -> str:
    import yaml

    head = (f"# AutoPEFT front point: trial {point.number}, {metric} {point.metric:.6g} at low fidelity, "
            f"{point.trainable:,} trainable parameters.\n# Run it at full fidelity: lightning-ft fit --config {path}\n")  # fmt: skip
    return head + yaml.safe_dump(config, sort_keys=False)


def write_front(out: Path, points: Sequence[FrontPoint], configs: dict[int, dict[str, Any]], *, metric: str,
                maximize: bool) -> tuple[list[FrontPoint], str]:  # fmt: skip
    """Write the front of ``points`` under ``out``; returns the front and its markdown table.

    Args:
        out: The search folder.
        points: The completed trials.
        configs: The full-fidelity fit config of each trial number (at least those of the front).
        metric: The metric's name.
        maximize: Whether a larger metric is better.
    """
    front = pareto_front(points, maximize)
    yaml_dir = out / "front"
    for stale in yaml_dir.glob("trial-*.yaml") if yaml_dir.is_dir() else []:
        if int(stale.stem.split("-")[1]) not in {p.number for p in front}:
            stale.unlink()
    for point in front:
        path = yaml_dir / f"trial-{point.number:04d}.yaml"
        write_text_atomic(path, _yaml(configs[point.number], point, metric, path))
    rows = _rows(front, metric, yaml_dir)
    table = _markdown(rows)
    write_text_atomic(out / "front.md", f"# AutoPEFT Pareto front ({metric}, {'max' if maximize else 'min'}imized; "
                      "trainable parameters, minimized)\n\n" + table)  # fmt: skip
    write_text_atomic(out / "front.csv", _csv(rows))
    json_rows = [{**row, "peft": p.peft} for row, p in zip(rows, front)]
    write_text_atomic(out / "front.json", json.dumps(json_rows, indent=2) + "\n")
    _plot(out / "front.png", points, front, metric)
    return front, table


def write_trials(out: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``trials.csv``: every trial with its state, objectives, choices and why it failed."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    write_text_atomic(out / "trials.csv", _csv([{k: row.get(k, "") for k in keys} for row in rows]))


def _plot(path: Path, points: Sequence[FrontPoint], front: Sequence[FrontPoint], metric: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed, so {path.name} is not drawn (pip install matplotlib).")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p.trainable for p in points], [p.metric for p in points], s=18, c="0.6", label="completed trials")
    ax.plot([p.trainable for p in front], [p.metric for p in front], "o-", c="tab:red", label="Pareto front")
    for p in front:
        ax.annotate(str(p.number), (p.trainable, p.metric), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if min(p.trainable for p in points) > 0 and max(p.trainable for p in points) > 10 * min(
        p.trainable for p in points
    ):
        ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(metric)
    ax.set_title("AutoPEFT search (low-fidelity trials)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
