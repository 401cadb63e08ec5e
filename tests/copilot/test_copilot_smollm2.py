"""The Copilot on the bundled SmolLM2-135M and real review data: it fits the Pilot's logged error (a round of the log,
in sample), and the fused accuracy and the held-out RMSE are logged beside the Pilot's (no claim that they are
better: at this scale the held-out RMSE equals the zero predictor's, benchmarks/results/copilot_seeds_paper.md)."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import make_data, make_trainer

from lightning_ft.copilot import CopilotCausalLM, PilotCapture


def test_copilot_fits_the_pilots_logged_error_on_smollm2(smollm2_dir: Path, tmp_path: Path) -> None:
    module = CopilotCausalLM(model=str(smollm2_dir), copilot_layers=2, learning_rate=1e-5, warmup_steps=6,
                             output_dir="", copilot_lambda="auto",
                             copilot_output=str(tmp_path / "copilot"))  # fmt: skip
    dm = make_data(train_size=96, val_size=24, batch_size=4)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    module._round_store = {}  # a probe round: the pretrained Pilot's error on one training batch
    first = next(iter(dm.train_dataloader()))
    with torch.no_grad(), PilotCapture(module.backbone) as capture:
        module.compute_loss(first)
    probe = module._record_round(first, capture)
    module._round_store = None
    with torch.no_grad():
        before = float(module.copilot_step_loss(probe))
    trainer = make_trainer(tmp_path, 30, limit_val_batches=None, val_check_interval=30, check_val_every_n_epoch=None)
    trainer.fit(module, dm)
    with torch.no_grad():
        after = float(module.copilot_step_loss(probe))
    assert after < 0.95 * before, (before, after)  # below the zero predictor it started as
    metrics = trainer.callback_metrics
    for key in ("val/target_acc", "val/fused_target_acc", "val/fused_target_loss", "train/copilot_loss",
                "val/copilot_rmse", "val/copilot_zero_rmse"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert module.copilot_lambda in (0.0, 0.1, 0.3, 0.5, 0.8, 1.0)
    assert (tmp_path / "copilot" / "copilot.json").is_file()
    assert 0 < module.mistake_log.nbytes <= 512 * 2**20
    print({"before": before, "after": after, **{k: float(v) for k, v in metrics.items()}, "lambda": module.copilot_lambda,
           "sweep": module.lambda_sweep})  # fmt: skip
