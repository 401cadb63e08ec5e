"""RunDashboard: each method's state as panels, read back from W&B's own offline-run reader; report.html rendered
in a real headless browser; curves that survive a resume; ``lightning-ft compare``."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import make_data, make_trainer

from lightning_ft.callbacks import ForgettingReport, LayerwiseSampling, SparseFineTuning
from lightning_ft.modules import CausalLMModule
from lightning_ft.monitors import IntruderDimensions, Panel, RepresentationShift, RunDashboard
from lightning_ft.monitors.panels import svg_of
from lightning_ft.sparse import Magnitude

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


def test_heatmap_panel_flattens_with_row_labels_and_draws_svg() -> None:
    panel = Panel("x/heat", "Heat", "heatmap", ["q", "k"], [[0.1, 0.2], [0.3, None]], rows=["00", "01"], y_label="block")
    assert panel.table() == (["block", "q", "k"], [["00", 0.1, 0.2], ["01", 0.3, None]])
    assert svg_of(panel).startswith("<svg") and svg_of(Panel("t", "T", "table", ["a"], [[1]])) == ""
    assert Panel.from_dict(json.loads(json.dumps(panel.as_dict()))) == panel


def _fit(root: Path, model_dir: Path, callbacks: list[L.Callback], steps: int, wandb: bool = False,
         ckpt: str | None = None, **kwargs: Any) -> tuple[L.Trainer, CausalLMModule]:  # fmt: skip
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    L.seed_everything(0)
    loggers: list[Any] = [CSVLogger(root, name="csv")]
    if wandb:
        loggers.append(WandbLogger(project="lightning-ft-test", name="dash", save_dir=str(root), offline=True))
    module = CausalLMModule(model=str(model_dir), learning_rate=5e-2, warmup_steps=0, output_dir="")
    trainer = make_trainer(root, steps, val_check_interval=2, limit_val_batches=1, log_every_n_steps=1,
                           logger=loggers, enable_checkpointing=True,
                           callbacks=[*callbacks, ModelCheckpoint(dirpath=root / "ckpt", save_last=True)], **kwargs)  # fmt: skip
    trainer.fit(module, make_data(control="humaneval", control_size=4), ckpt_path=ckpt)
    for logger in loggers:
        if wandb and isinstance(logger, WandbLogger):
            logger.experiment.finish()
    return trainer, module


@pytest.fixture(scope="module")
def lisa_run(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-step LISA fit (one block active, redrawn every 2 steps) with the report, intruders and the dashboard,
    logging to CSV and an offline W&B run."""
    os.environ["WANDB_MODE"] = "offline"
    root = tmp_path_factory.mktemp("lisa")
    callbacks = [ForgettingReport(print_table=False), LayerwiseSampling(num_active=1, interval=2, seed=1),
                 IntruderDimensions(top_k=4), RepresentationShift(num_concepts=2), RunDashboard()]  # fmt: skip
    _fit(root, tiny_llama_dir, callbacks, 6, wandb=True)
    return root


def _panels(root: Path) -> dict[str, dict[str, Any]]:
    return {p["key"]: p for p in json.loads((root / "dashboard.json").read_text())["panels"]}


def test_dashboard_holds_every_methods_state(lisa_run: Path) -> None:
    panels = _panels(lisa_run)
    assert {"report/before_after", "curves/loss", "curves/target", "curves/control", "selection/LayerwiseSampling",
            "intruders/per_block", "intruders/total", "representation/cka", "representation/shift"} <= set(panels)  # fmt: skip
    report = json.loads((lisa_run / "report.json").read_text())
    table = panels["report/before_after"]
    assert table["columns"] == ["metric", "before", "after", "change"]
    assert table["values"][0][:3] == ["target accuracy", f"{report['before']['target_acc']:.3f}",
                                      f"{report['after']['target_acc']:.3f}"]  # fmt: skip
    # LISA: every recorded selection has exactly one whole block training, and a new draw every 2 steps at most
    selection = panels["selection/LayerwiseSampling"]
    assert selection["columns"] == ["00", "01"] and selection["values"]
    assert all(sorted(row) == [0.0, 1.0] for row in selection["values"])
    # the loss curve has one point per optimizer step (keyed by the steps done), equal to what the CSV logger wrote
    loss = panels["curves/loss"]
    assert [row[0] for row in loss["values"]] == [1, 2, 3, 4, 5, 6]
    rows = list(csv.DictReader((lisa_run / "csv" / "version_0" / "metrics.csv").open()))
    logged = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert [row[1] for row in loss["values"]] == pytest.approx(logged)
    intruders = json.loads((lisa_run / "intruders.json").read_text())["history"][-1]["counts"]
    assert sum(sum(row) for row in panels["intruders/per_block"]["values"]) == sum(intruders.values())
    representation = json.loads((lisa_run / "representation.json").read_text())["history"]
    assert panels["representation/cka"]["values"] == [h["cka"] for h in representation]
    assert panels["representation/cka"]["rows"] == [str(h["step"]) for h in representation] == ["2", "4", "6"]


def _wandb_records(root: Path) -> list[dict[str, Any]]:
    """The offline run's records, read with W&B's own reader (``wandb leet inspect --json``)."""
    files = list((root / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    wandb = Path(sys.executable).parent / "wandb"
    out = subprocess.run([str(wandb), "leet", "inspect", "--json", str(files[0])], capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_wandb_run_read_back_has_every_panel_the_summary_and_the_media(lisa_run: Path) -> None:
    records = _wandb_records(lisa_run)
    history_keys: set[str] = set()
    summary: dict[str, Any] = {}
    for record in records:  # the reader prints history items and summary updates as flat {key: value} objects
        history_keys.update(record.get("history", {}).get("item", {}))
        summary.update(record.get("summary", {}).get("update", {}))
    for key in ("selection/LayerwiseSampling", "intruders/per_block", "report/before_after", "curves/loss"):
        assert any(k.startswith(f"panels/{key}") for k in history_keys), key
        assert any(k.startswith(f"panels/{key}_plot") for k in history_keys) or key == "report/before_after", key
    report = json.loads((lisa_run / "report.json").read_text())
    assert summary["report/after/target_acc"] == pytest.approx(report["after"]["target_acc"])
    assert summary["report/before/control_ppl"] == pytest.approx(report["before"]["control_ppl"])
    run_dir = next((lisa_run / "wandb").glob("offline-run-*"))
    tables = {p.name.split("_")[0]: p for p in (run_dir / "files" / "media" / "table" / "panels").rglob("*.table.json")}
    heat = json.loads(next(p for p in (run_dir / "files" / "media" / "table").rglob("*.table.json")
                           if "LayerwiseSampling" in str(p)).read_text())  # fmt: skip
    panel = _panels(lisa_run)["selection/LayerwiseSampling"]
    assert heat["columns"] == ["steps", "00", "01"] and [row[1:] for row in heat["data"]] == panel["values"]
    assert tables and list((run_dir / "files" / "media" / "images").rglob("*.png"))


@pytest.mark.skipif(BROWSER is None, reason="no Chromium on this machine: scripts/test.sh installs Debian's chromium "
                    "where apt-get can, and this check needs it")  # fmt: skip
def test_report_html_renders_in_a_headless_browser_without_errors(lisa_run: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    text = (lisa_run / "report.html").read_text()
    assert not re.search(r"(src|href)=\"(https?:|//)", text) and "<script" not in text  # self-contained
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=BROWSER, args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                                    "--disable-background-networking", "--disable-component-update", "--disable-sync"])  # fmt: skip
        page = browser.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
        page.goto((lisa_run / "report.html").resolve().as_uri())
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        headings = page.locator("h2").all_inner_texts()
        svgs = page.locator("svg").count()
        cells = page.locator("#report-before_after td").all_inner_texts()
        browser.close()
    assert errors == []
    assert headings[0] == "Before vs after fine-tuning" and "Training loss" in headings
    assert any(h.startswith("LayerwiseSampling: trainable share") for h in headings)
    assert svgs >= 5 and "target accuracy" in cells
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_curves_and_activity_of_a_resumed_run_equal_an_uninterrupted_one(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from helpers import Crash, CrashAt

    def callbacks() -> list[L.Callback]:
        return [LayerwiseSampling(num_active=1, interval=2, seed=3), RunDashboard(html=False)]

    _fit(tmp_path / "a", tiny_llama_dir, callbacks(), 6)
    with pytest.raises(Crash):
        _fit(tmp_path / "b", tiny_llama_dir, [*callbacks(), CrashAt(4)], 6)
    assert not (tmp_path / "b" / "dashboard.json").exists()
    _fit(tmp_path / "b", tiny_llama_dir, callbacks(), 6, ckpt=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    a, b = _panels(tmp_path / "a"), _panels(tmp_path / "b")
    assert a["selection/LayerwiseSampling"] == b["selection/LayerwiseSampling"]
    assert len(a["curves/loss"]["values"]) == 6
    torch.testing.assert_close(torch.tensor(a["curves/loss"]["values"]), torch.tensor(b["curves/loss"]["values"]))


def test_sparse_mask_density_heatmap_equals_the_mask(tiny_llama_dir: Path, tmp_path: Path) -> None:
    sparse = SparseFineTuning(Magnitude(), density=0.05, save_path="")
    _fit(tmp_path, tiny_llama_dir, [sparse, RunDashboard(html=False)], 2)
    panel = _panels(tmp_path)["sparse/density"]
    layer_map = sparse._layer_map
    assert layer_map is not None
    for row, block in zip(panel["values"], panel["rows"]):
        for value, kind in zip(row, panel["columns"]):
            names = [n for n in sparse.states if n.endswith(f"{kind}.weight") and f"layers.{int(block)}." in n]
            if not names:
                assert value is None
                continue
            expected = sum(sparse.states[n].numel for n in names) / sum(layer_map[n].numel for n in names)
            assert value == pytest.approx(expected)
    total = sum(s.numel for s in sparse.states.values()) / sparse.eligible_numel
    assert total == pytest.approx(0.05, abs=0.01)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=r"every_n_steps=0 must be at least 1"):
        RunDashboard(every_n_steps=0)


def test_hft_halves_and_lines_factors_and_the_model_artifact(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from lightning.pytorch.loggers import WandbLogger

    from lightning_ft.callbacks import HalfFineTuning, LiNeS

    os.environ["WANDB_MODE"] = "offline"
    hft, lines = HalfFineTuning(redraw="steps", every_n_steps=2, seed=0), LiNeS(alpha=0.25, beta=0.5)
    L.seed_everything(0)
    module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=1e-2, warmup_steps=0, output_dir=str(tmp_path / "hf"))
    logger = WandbLogger(project="lightning-ft-test", save_dir=str(tmp_path), offline=True)
    trainer = make_trainer(tmp_path, 4, logger=logger, callbacks=[hft, lines, RunDashboard(html=False, log_model=True)])
    trainer.fit(module, make_data())
    logger.experiment.finish()
    panels = _panels(tmp_path)
    # HFT: each recorded draw trains part of every block; a new row only when the draw changed
    halves = panels["selection/HalfFineTuning"]
    assert halves["values"] and all(0.0 < v < 1.0 for row in halves["values"] for v in row)
    assert all(a != b for a, b in zip(halves["values"], halves["values"][1:]))
    # LiNeS: the factor of block i is alpha + beta * i / (L - 1)
    factors = dict(panels["lines/factors"]["values"])
    assert factors["00"] == pytest.approx(0.25) and factors["01"] == pytest.approx(0.75)
    records = _wandb_records(tmp_path)
    assert any(r.get("artifact", {}).get("type") == "model" for r in records)


def test_log_model_without_an_export_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from lightning.pytorch.loggers import WandbLogger

    os.environ["WANDB_MODE"] = "offline"
    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    logger = WandbLogger(project="lightning-ft-test", save_dir=str(tmp_path), offline=True)
    trainer = make_trainer(tmp_path, 1, logger=logger, callbacks=[RunDashboard(html=False, log_model=True)])
    with pytest.raises(ValueError, match=r"^RunDashboard\(log_model=True\) logs the exported model, and CausalLMModule "
                                         r"exports none: keep its export on \(output_dir unset or a folder\) or drop "
                                         r"log_model\.$"):
        trainer.fit(module, make_data())
    logger.experiment.finish()


def test_copilot_lambda_sweep_panel_is_the_sweep() -> None:
    from types import SimpleNamespace

    from lightning_ft.copilot.evaluation import CopilotEvaluation

    sweep = [{"lambda": 0.0, "target_acc": 0.5}, {"lambda": 0.5, "target_acc": 0.75}, {"lambda": 1.0, "target_acc": 0.625}]
    (panel,) = CopilotEvaluation.dashboard_panels(SimpleNamespace(lambda_sweep=sweep, copilot_lambda=0.5))  # type: ignore[arg-type]
    assert panel.key == "copilot/lambda_sweep" and panel.columns == ["lambda", "target_acc"]
    assert panel.values == [[0.0, 0.5], [0.5, 0.75], [1.0, 0.625]] and "Chosen lambda = 0.5" in panel.note
    assert CopilotEvaluation.dashboard_panels(SimpleNamespace(lambda_sweep=[], copilot_lambda=1.0)) == []  # type: ignore[arg-type]
