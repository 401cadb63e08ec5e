"""Pilot + Copilot in a 2-process DDP run on CPU (gloo): both models stay in sync across ranks, the Copilot trains,
global_step counts Pilot steps, and the export is written once."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import make_data

from lightning_ft.copilot import CopilotCausalLM

pytestmark = pytest.mark.ddp


class _CheckSync(L.Callback):
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for part in (pl_module.backbone, pl_module.copilot):
            flat = torch.cat([p.detach().flatten() for p in part.parameters()])
            gathered = pl_module.all_gather(flat)
            assert gathered.shape[0] == 2 and torch.equal(gathered[0], gathered[1]), "ranks diverged"
        assert pl_module.all_gather(torch.tensor(float(trainer.global_step))).tolist() == [3.0, 3.0]
        assert len(pl_module.mistake_log) == 6  # 3 steps x accumulation 2, one round per batch on each rank


def test_two_process_ddp_pilot_and_copilot(tiny_llama_dir: Path, tmp_path: Path) -> None:
    module = CopilotCausalLM(model=str(tiny_llama_dir), copilot_layers=2, learning_rate=1e-2, warmup_steps=0,
                             output_dir="", copilot_output=str(tmp_path / "copilot"), zero_init_output=False)  # fmt: skip
    start = {n: p.detach().clone() for n, p in module.copilot.named_parameters() if p.requires_grad}
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        accumulate_grad_batches=2, gradient_clip_val=1.0, callbacks=[_CheckSync()], default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(module, make_data(train_size=32))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "copilot" / "copilot.safetensors"))
    assert any(not torch.equal(saved[n], start[n]) for n in start)  # rank 0 wrote a Copilot that trained
