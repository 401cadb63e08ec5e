"""All objective mixins in one 2-process DDP run on CPU (gloo): a task-weighted mixture with token weights,
Masked Thought, frozen CAFT heads and the task-balanced loss; both ranks end in sync, the heads unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from objective_checks import AllObjectives, make_data, thought_data, thought_records

from lightning_ft.objectives import MultiTaskDataModule

pytestmark = pytest.mark.ddp


class _CheckSync(L.Callback):
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = pl_module.all_gather(flat)
        assert gathered.shape[0] == 2 and torch.equal(gathered[0], gathered[1]), "ranks diverged"
        assert pl_module.all_gather(torch.tensor(float(trainer.global_step))).tolist() == [3.0, 3.0]


def test_two_process_ddp_with_every_objective(tiny_llama_dir: Path, tmp_path: Path) -> None:
    module = AllObjectives(
        model=str(tiny_llama_dir),
        learning_rate=1e-2,
        warmup_steps=0,
        output_dir="",
        heads_output=str(tmp_path / "heads.safetensors"),
        max_rate=0.3,
        warmup=0.0,
        heads_coefficient=0.5,
    )
    heads = {n: p.detach().clone() for n, p in module.aux_heads.named_parameters()}
    trunk = [p.detach().clone() for p in module.backbone.parameters()]
    dm: Any = MultiTaskDataModule(
        tasks=[
            make_data(train_size=24, mask_prompt=False),
            thought_data(thought_records(tmp_path / "t.jsonl"), train_size=16),
        ],
        weights=[1.0, 1.0],
        epoch_size=24,
        batch_size=4,
        control_size=0,
    )
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[_CheckSync()],
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, dm)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "heads.safetensors"))  # written by rank 0 after training: heads were frozen
    assert saved.keys() == heads.keys() and all(torch.equal(saved[n], heads[n]) for n in heads)
    assert any(not torch.equal(a, b) for a, b in zip(trunk, module.backbone.parameters()))  # rank 0's weights return
