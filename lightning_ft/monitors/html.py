"""``report.html``: one self-contained page of a run's dashboard (no script, no network: tables and inline SVG)."""

from __future__ import annotations

import html
from typing import Any

from lightning_ft.monitors.panels import Panel, svg_of

__all__ = ["page", "render_report", "table_html"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; } th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
.note { color: #555; font-size: 0.85em; } nav a { margin-right: 1em; font-size: 0.85em; }
svg { max-width: 100%; height: auto; }
"""


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table_html(columns: list[str], rows: list[list[Any]], limit: int = 200) -> str:
    """An HTML table (the first ``limit`` rows; the rest are counted)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows[:limit])
    more = f'<p class="note">{len(rows) - limit} more rows in dashboard.json</p>' if len(rows) > limit else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


def _section(panel: Panel) -> str:
    anchor = html.escape(panel.key.replace("/", "-"))
    parts = [f'<section id="{anchor}"><h2>{html.escape(panel.title)}</h2>']
    if panel.kind == "table":
        parts.append(table_html(*panel.table()))
    else:
        parts.append(svg_of(panel))
        if panel.kind != "lines" or len(panel.values) <= 12:
            parts.append("<details><summary>numbers</summary>" + table_html(*panel.table()) + "</details>")
    if panel.note:
        parts.append(f'<p class="note">{html.escape(panel.note)}</p>')
    parts.append("</section>")
    return "\n".join(parts)


def page(title: str, body: str) -> str:
    """A whole self-contained HTML page."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")  # fmt: skip


def render_report(payload: dict[str, Any]) -> str:
    """The page of one run from its ``dashboard.json`` payload: the before/after table first, then the curves,
    then every method's panels."""
    panels = [Panel.from_dict(p) for p in payload.get("panels", [])]
    order = {"report": 0, "curves": 1}
    panels.sort(key=lambda p: order.get(p.key.split("/", 1)[0], 2))
    title = str(payload.get("title", "run"))
    nav = "".join(f'<a href="#{html.escape(p.key.replace("/", "-"))}">{html.escape(p.title)}</a>' for p in panels)
    body = [f"<h1>lightning-ft run: {html.escape(title)}</h1>",
            f'<p class="note">step {html.escape(str(payload.get("step", "")))}</p><nav>{nav}</nav>']  # fmt: skip
    if not panels:
        body.append('<p class="note">No panels: nothing in this run shows its state.</p>')
    body += [_section(p) for p in panels]
    return page(f"lightning-ft: {title}", "\n".join(body))
