"""The lightning-ft CLI end to end on a tiny model: fit, then validate, test and predict from the same YAML;
per-run folder, checkpoints, W&B offline files, CSV metrics, HF export and short callback names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lightning_ft.cli import main, wandb_mode


def _config(tmp_path: Path, model_dir: Path) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 4, "default_root_dir": str(tmp_path / "runs"),
                    "limit_val_batches": 2, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
                    "val_check_interval": 4, "check_val_every_n_epoch": None,
                    "callbacks": [{"class_path": "ForgettingReport", "init_args": {"print_table": True}}]},
        "model": {"class_path": "lightning_ft.modules.CausalLMModule",
                  "init_args": {"model": str(model_dir), "learning_rate": 1e-3, "warmup_steps": 1, "max_new_tokens": 3}},
        "data": {"class_path": "lightning_ft.data.InstructionDataModule",
                 "init_args": {"label_options": ["positive", "negative"], "train_size": 32, "val_size": 16, "test_size": 8,
                               "batch_size": 4, "eval_batch_size": 8, "max_length": 48, "control_size": 8}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_then_validate_test_predict(tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM

    config = _config(tmp_path, tiny_llama_dir)
    main(["fit", "--config", str(config), "--run_name", "first"])
    run = tmp_path / "runs" / "first"
    out = capsys.readouterr().out
    assert "before vs after fine-tuning" in out and "target accuracy" in out
    report = json.loads((run / "report.json").read_text())
    assert {"target_acc", "control_ppl"} <= set(report["before"]) and report["step"] == 4
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "csv" / "config.yaml").is_file()
    assert "val/control_ppl" in (run / "csv" / "metrics.csv").read_text()
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert offline, "the W&B run must be written offline"
    AutoModelForCausalLM.from_pretrained(run / "hf_model")
    dashboard = json.loads((run / "dashboard.json").read_text())  # RunDashboard is on by default in fit
    assert {"report/before_after", "curves/loss"} <= {p["key"] for p in dashboard["panels"]}
    assert (run / "report.html").read_text().startswith("<!DOCTYPE html>")

    # a second run without the dashboard, then both side by side
    main(["fit", "--config", str(config), "--run_name", "second", "--report", "false", "--trainer.max_steps", "2"])
    assert not (tmp_path / "runs" / "second" / "report.html").exists()
    capsys.readouterr()
    main(["compare", str(run), str(tmp_path / "runs" / "second"), "--out", str(tmp_path / "cmp")])
    table = capsys.readouterr().out.splitlines()
    second = json.loads((tmp_path / "runs" / "second" / "report.json").read_text())
    assert table[0].startswith("| run | step | target_acc before | target_acc after | target_acc change |")
    b, a = second["before"]["target_acc"], second["after"]["target_acc"]
    assert table[3].startswith(f"| second | 2 | {b:.4g} | {a:.4g} | {a - b:.4g} |")
    compared = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    change = compared["rows"][0][compared["columns"].index("control_ppl change %")]
    assert change == pytest.approx((report["after"]["control_ppl"] / report["before"]["control_ppl"] - 1) * 100)
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0 and "<svg" in (tmp_path / "cmp" / "compare.html").read_text()

    ckpt = str(run / "checkpoints" / "last.ckpt")
    main(["validate", "--config", str(config), "--run_name", "val", "--ckpt_path", ckpt])
    val_metrics = (tmp_path / "runs" / "val" / "csv" / "metrics.csv").read_text()
    assert "val/target_acc" in val_metrics and "val/control_ppl" in val_metrics
    main(["test", "--config", str(config), "--run_name", "test", "--ckpt_path", ckpt])
    assert "test/target_acc" in (tmp_path / "runs" / "test" / "csv" / "metrics.csv").read_text()
    main(["predict", "--config", str(config), "--run_name", "pred", "--ckpt_path", ckpt, "--trainer.limit_predict_batches", "1"])
    rows = [json.loads(line) for line in (tmp_path / "runs" / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all({"prompt", "completion", "reference"} <= set(r) for r in rows)


def test_print_config_shows_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/quickstart.yaml", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "lightning_ft.modules.CausalLMModule"
    assert printed["trainer"]["callbacks"][0]["class_path"] == "lightning_ft.callbacks.ForgettingReport"


# every shipped config parses, with its classes' own defaults: tests/cli/test_defaults.py


def test_wandb_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x")
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
