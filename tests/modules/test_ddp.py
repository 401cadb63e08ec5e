"""A 2-process DDP run on CPU (gloo): both ranks train on different shards and end with identical weights, and each
rank has registered destroying its process group at exit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_ft.data import InstructionDataModule
from lightning_ft.modules import CausalLMModule

pytestmark = pytest.mark.ddp


class _CheckSync(L.Callback):
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = pl_module.all_gather(flat)
        assert gathered.shape[0] == 2
        assert torch.equal(gathered[0], gathered[1]), "ranks diverged"
        first_batch = pl_module.all_gather(torch.tensor(float(trainer.global_step)))
        assert first_batch.tolist() == [4.0, 4.0]
        from lightning_ft.core import process_group

        assert process_group._registered, "setup() did not register destroying the gloo group at exit"


def test_two_process_ddp_trains_in_sync(tiny_llama_dir: Path, tmp_path: Path) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=1e-2, warmup_steps=0, output_dir=str(tmp_path / "out"))
    before = [p.detach().clone() for p in module.parameters()]
    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[_CheckSync()], default_root_dir=str(tmp_path),
    )
    dm: Any = InstructionDataModule(label_options=["positive", "negative"], train_size=32, val_size=8, test_size=0,
                                    control_size=0, batch_size=4, max_length=48)
    trainer.fit(module, dm)
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert any(not torch.equal(b, p) for b, p in zip(before, saved.parameters()))
