"""``lightning-ft compare RUN RUN ...``: finished runs side by side, with an accuracy-vs-forgetting plot.

Each run folder needs the ``report.json`` that :class:`~lightning_ft.callbacks.ForgettingReport` writes (the before
and after values of the target metrics and the control perplexity). The command prints one table and writes
``compare.md``, ``compare.json``, ``compare.png`` and a self-contained ``compare.html`` into ``--out``, atomically.
"""

from __future__ import annotations

import argparse
import html
import json
import math
from pathlib import Path
from typing import Any

from lightning_ft.core.io import atomic_file, write_text_atomic
from lightning_ft.errors import UserError
from lightning_ft.monitors.html import page, table_html
from lightning_ft.monitors.panels import inline_svg

__all__ = ["compare_runs", "load_run", "main"]

_METRICS = ("target_acc", "target_loss", "control_ppl")


def load_run(folder: Path) -> dict[str, Any]:
    """A run's name, before and after values (``report.json``) and its dashboard summary if there is one."""
    report = folder / "report.json"
    if not folder.is_dir():
        raise UserError(f"run folder {folder} does not exist: pass folders under runs/ of finished fits.")
    if not report.is_file():
        raise UserError(
            f"{folder} has no report.json: add ForgettingReport to that fit (the quickstart configs have it), "
            "or leave the folder out."
        )
    try:
        data = json.loads(report.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{report} is not JSON ({err.msg}): rerun the fit or leave the folder out.") from None
    return {"name": folder.resolve().name, "path": str(folder), "before": data.get("before", {}),
            "after": data.get("after", {}), "step": data.get("step")}  # fmt: skip


def _change(before: float | None, after: float | None, relative: bool) -> float | None:
    if before is None or after is None or not (math.isfinite(before) and math.isfinite(after)):
        return None
    if relative:
        return (after - before) / abs(before) * 100 if before else None
    return after - before


def compare_runs(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """One row per run: the after value and change of each metric any run measured (accuracy and loss as a
    difference, control perplexity as a percentage)."""
    metrics = [m for m in _METRICS if any(m in r["after"] for r in runs)]
    columns = ["run", "step"]
    for m in metrics:
        columns += [f"{m} before", f"{m} after", f"{m} change" + (" %" if m.endswith("ppl") else "")]
    rows: list[list[Any]] = []
    for run in runs:
        row: list[Any] = [run["name"], run["step"]]
        for m in metrics:
            b, a = run["before"].get(m), run["after"].get(m)
            row += [b, a, _change(b, a, relative=m.endswith("ppl"))]
        rows.append(row)
    return columns, rows


def _plot(runs: list[dict[str, Any]]) -> tuple[bytes, str] | None:
    """Target (accuracy, else loss) after fine-tuning against the control-perplexity change, one point per run."""
    target = "target_acc" if any("target_acc" in r["after"] for r in runs) else "target_loss"
    points = [(r["name"], _change(r["before"].get("control_ppl"), r["after"].get("control_ppl"), True),
               r["after"].get(target)) for r in runs]  # fmt: skip
    points = [(n, x, y) for n, x, y in points if x is not None and y is not None]
    if not points:
        return None
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.2))
    ax = fig.subplots()
    for name, x, y in points:
        ax.scatter([x], [y])
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(0.0, color="#999", linewidth=0.8)
    ax.set_xlabel("control perplexity change (%): forgetting, lower is better")
    ax.set_ylabel(f"{target} after fine-tuning" + (" (higher is better)" if target == "target_acc" else " (lower is better)"))
    ax.set_title("Target vs forgetting", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    return png.getvalue(), inline_svg(fig)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-ft compare",
        description="Compare finished runs side by side. Input: run folders holding report.json (ForgettingReport). "
        "Output: the table on stdout, and compare.md, compare.json, compare.png (target vs control-perplexity "
        "change) and a self-contained compare.html in --out.",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, e.g. runs/a runs/b")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder (default runs/compare)")
    args = parser.parse_args(argv)
    names = [r.resolve() for r in args.runs]
    if len(set(names)) != len(names):
        raise UserError("a run folder is given twice: pass each run once.")
    runs = [load_run(folder) for folder in args.runs]
    columns, rows = compare_runs(runs)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    markdown = "\n".join(lines) + "\n"
    print(markdown, end="")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "compare.md", markdown)
    write_text_atomic(out / "compare.json", json.dumps({"columns": columns, "rows": rows, "runs": runs}, indent=1))
    plot = _plot(runs)
    body = [f"<h1>lightning-ft: {len(runs)} runs compared</h1>", table_html(columns, rows)]
    if plot is not None:
        with atomic_file(out / "compare.png") as tmp:
            tmp.write_bytes(plot[0])
        body += ["<h2>Target vs forgetting</h2>", plot[1]]
    body.append('<p class="note">' + html.escape(", ".join(f"{r['name']}: {r['path']}" for r in runs)) + "</p>")
    write_text_atomic(out / "compare.html", page("lightning-ft compare", "\n".join(body)))
    print(f"wrote {out / 'compare.html'}")
    return 0
