"""LIFT-style sparse fine-tuning of the bundled SmolLM2 on real reviews, through the CLI: the answer becomes far
likelier on held-out reviews, only the selected entries move, and ``lightning-ft sparse-apply`` rebuilds the
exported model from the base plus the artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def test_lift_on_smollm2_learns_and_the_artifact_rebuilds_the_model(smollm2_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lightning_ft.cli import main
    from lightning_ft.sparse import SparseDelta

    import yaml

    config = yaml.safe_load(Path("configs/sparse_lift.yaml").read_text())
    rule = config["trainer"]["callbacks"][0]["init_args"]["rule"]["init_args"]
    rule.update(reselect_every=4, svd="lowrank")  # a short run: re-select once, randomized SVD for speed
    config["trainer"].update(max_steps=7, val_check_interval=7)
    config["data"]["init_args"].update(val_size=32, test_size=0, control_size=8, batch_size=4, max_length=64)
    short = tmp_path / "lift.yaml"
    short.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(short), "--trainer.default_root_dir", str(tmp_path), "--run_name", "lift",
          "--wandb", "disabled"])  # fmt: skip
    run = tmp_path / "lift"
    report = json.loads((run / "report.json").read_text())
    assert report["after"]["target_loss"] < 0.5 * report["before"]["target_loss"], report

    base = load_file(str(smollm2_dir / "model.safetensors"))
    tuned = AutoModelForCausalLM.from_pretrained(run / "hf_model").state_dict()
    delta = SparseDelta.load(run / "checkpoints" / "sparse_delta.safetensors")
    touched = 0
    for key, value in base.items():
        changed = (tuned[key] != value).reshape(-1).nonzero().squeeze(1)
        if key not in delta.values:
            assert changed.numel() == 0, f"{key} is not eligible but changed"
            continue
        # entries outside the union of the two selections (steps 0 and 3) never move; the artifact holds them all
        assert set(changed.tolist()) == set(delta.indices[key].long().tolist()), key
        rows, cols = value.shape
        assert changed.numel() <= 2 * min((rows + cols) * 8, rows * cols)
        touched += changed.numel()
    assert 0 < touched < 0.1 * sum(v.numel() for k, v in base.items() if k in delta.values)

    main(["sparse-apply", "--base", str(smollm2_dir), "--sft", str(run / "checkpoints" / "sparse_delta.safetensors"),
          "--output", str(tmp_path / "applied")])  # fmt: skip
    applied = AutoModelForCausalLM.from_pretrained(tmp_path / "applied").state_dict()
    for key, value in tuned.items():
        torch.testing.assert_close(applied[key], value, rtol=0, atol=1e-6, msg=key)
