"""The README's quickstart on the bundled SmolLM2-135M-Instruct and real review data (its own file, so that the
suite's two workers share the long real-model tests evenly)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def test_quickstart_raises_heldout_accuracy_and_exports_identical_model(smollm2_dir: Path, tmp_path: Path) -> None:
    """The README's quickstart config, end to end through the CLI: the run folder is redirected and the budget cut
    to a third (20 steps, 100 held-out reviews, 16 control texts) to keep the suite short; the full run's numbers are
    in the README. (At batch 4 instead of 8 the accuracy did not rise in 20 steps: 0.76 -> 0.76.)"""
    import json

    from transformers import AutoModelForCausalLM

    from lightning_ft.cli import main

    main(["fit", "--config", "configs/quickstart.yaml", "--trainer.default_root_dir", str(tmp_path), "--run_name", "qs",
          "--wandb", "disabled", "--trainer.max_steps", "20", "--trainer.val_check_interval", "20",
          "--data.val_size", "100", "--data.control_size", "16"])  # fmt: skip
    run = tmp_path / "qs"
    report = json.loads((run / "report.json").read_text())
    before, after = report["before"], report["after"]
    # 100 held-out reviews never trained on: the answer becomes far likelier and accuracy rises above zero-shot
    assert after["target_loss"] < 0.25 * before["target_loss"], report  # measured here: 5.83 -> 0.49
    assert after["target_acc"] >= before["target_acc"] + 0.03, report  # measured here: 0.76 -> 0.80
    assert 0.5 * before["control_ppl"] < after["control_ppl"] < 2.0 * before["control_ppl"], report

    exported = AutoModelForCausalLM.from_pretrained(run / "hf_model").eval()
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    trained = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    trained.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")})
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]) + 1000
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trained(ids).logits, rtol=0, atol=0)
