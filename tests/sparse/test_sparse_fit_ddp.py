"""SparseFineTuning under 2-process DDP on CPU (gloo): both ranks select the same entries and the result
matches one process that sees the same global batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from torch.utils.data import DataLoader, Subset

from helpers import make_trainer
from lightning_ft.callbacks import PrincipalWeights, SparseFineTuning
from lightning_ft.data import InstructionDataModule
from lightning_ft.data.collate import IGNORE_INDEX, LMCollator
from lightning_ft.modules import CausalLMModule

pytestmark = pytest.mark.ddp


class _SameMasks(L.Callback):
    """On every rank at the end: the masks and the weights are identical across ranks."""

    def __init__(self, sft: SparseFineTuning) -> None:
        self.sft = sft

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        indices = torch.cat([i for i in self.sft.selected.values()])
        gathered = pl_module.all_gather(indices)
        assert gathered.shape[0] == 2 and torch.equal(gathered[0], gathered[1]), "ranks selected different entries"
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        both = pl_module.all_gather(flat)
        assert torch.equal(both[0], both[1]), "ranks diverged"
        assert len([e for e in self.sft.events if e["event"] == "select"]) == 3


class _Interleaved(InstructionDataModule):
    """Rank r of w reads examples r, r+w, r+2w... in order, so w ranks with batch b see exactly the global batches
    of one process with batch w*b (no shuffling, no distributed sampler)."""

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        data = self._encoded["train"]
        return DataLoader(Subset(data, list(range(rank, len(data), world))), batch_size=self.hparams.batch_size,
                          shuffle=False, collate_fn=LMCollator(self.pad_token_id))  # fmt: skip


def _data(batch_size: int) -> _Interleaved:
    return _Interleaved(label_options=["positive", "negative"], train_size=40, val_size=8, test_size=0, control_size=0,
                        batch_size=batch_size, max_length=48)  # fmt: skip


def _fit(path: Path, root: Path, devices: int, batch_size: int) -> CausalLMModule:
    L.seed_everything(0)
    module = CausalLMModule(model=str(path), learning_rate=1e-2, warmup_steps=0, output_dir="")
    sft = SparseFineTuning(
        PrincipalWeights(filter_rank=4, reselect_every=2), rank=2, save_path=str(root / "sft.safetensors")
    )
    callbacks: list[Any] = [sft] + ([_SameMasks(sft)] if devices > 1 else [])
    opts: dict[str, Any] = {"strategy": "ddp_spawn"} if devices > 1 else {}
    trainer = make_trainer(root, 4, devices=devices, callbacks=callbacks, use_distributed_sampler=False, **opts)
    trainer.fit(module, _data(batch_size))
    return module


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tiny_llama_dir: Path, tmp_path: Path) -> None:
    # per-rank token means average to the global token mean only when every example has as many labelled tokens
    probe = _data(4)
    probe.tokenizer = CausalLMModule(model=str(tiny_llama_dir), output_dir="").tokenizer
    probe.setup("fit")
    counts = {int((torch.tensor(ex["labels"]) != IGNORE_INDEX).sum()) for ex in probe._encoded["train"]}
    assert len(counts) == 1, counts
    ddp = _fit(tiny_llama_dir, tmp_path / "ddp", devices=2, batch_size=2)
    single = _fit(tiny_llama_dir, tmp_path / "single", devices=1, batch_size=4)
    for (name, p), (_, q) in zip(ddp.named_parameters(), single.named_parameters()):
        assert (p - q).abs().max() <= 2e-6, f"{name}: {(p - q).abs().max():.3g}"
    assert (tmp_path / "ddp" / "sft.safetensors").is_file()
