"""Sparse-gradient DDP: the hook's compaction against a hand oracle, and a 2-process CPU (gloo) fit in which the
sparse hook gives the same weights as dense DDP while communicating bytes proportional to the mask."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from helpers import make_data, make_trainer
from lightning_ft.callbacks import Magnitude, SparseFineTuning
from lightning_ft.modules import CausalLMModule
from lightning_ft.strategies import SparseCommState, compact_gradients, scatter_gradients, sparse_allreduce_hook

STEPS = 3


def test_compact_and_scatter_by_hand() -> None:
    grads = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([[5.0, 6.0]])]
    masks: list[torch.Tensor | None] = [torch.tensor([3, 0], dtype=torch.int32), None]
    compact = compact_gradients(grads, masks)
    assert compact.tolist() == [4.0, 1.0, 5.0, 6.0]
    views = [torch.full((4,), 9.0), torch.full((2,), 9.0)]
    scatter_gradients(views, masks, compact * 10)
    assert views[0].tolist() == [10.0, 0.0, 0.0, 40.0] and views[1].tolist() == [50.0, 60.0]
    empty: list[torch.Tensor | None] = [torch.tensor([], dtype=torch.long)]
    assert compact_gradients([torch.ones(3)], empty).numel() == 0
    scatter_gradients([v := torch.ones(3)], empty, torch.empty(0))
    assert v.tolist() == [0.0, 0.0, 0.0]


class _Record(L.Callback):
    """Rank 0 writes the bytes its all-reduces carried per optimizer step; ``dense`` installs the counting dense
    all-reduce (the same hook with no masks) for the baseline."""

    def __init__(self, sft: SparseFineTuning, path: Path, dense: bool) -> None:
        self.sft, self.path, self.dense = sft, path, dense
        self.state: SparseCommState | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.dense:
            self.state = SparseCommState()
            trainer.strategy.model.register_comm_hook(self.state, sparse_allreduce_hook)
        else:
            self.state = self.sft.comm_state
        assert self.state is not None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.state is not None
        if trainer.is_global_zero:
            selected = sum(s.numel for s in self.sft.states.values())
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"bytes_per_step": self.state.bytes_sent / trainer.global_step,
                                             "selected": selected, "eligible": self.sft.eligible_numel}))  # fmt: skip


def _fit(model_dir: Path, root: Path, sparse: bool, count: bool = True) -> tuple[CausalLMModule, dict[str, Any]]:
    L.seed_everything(0)
    module = CausalLMModule(model=str(model_dir), learning_rate=1e-2, warmup_steps=0, output_dir="")
    sft = SparseFineTuning(Magnitude(), density=0.05, save_path="", sparse_ddp=sparse)
    record = root / "bytes.json"
    callbacks: list[Any] = [sft, _Record(sft, record, not sparse)] if count else [sft]
    make_trainer(root, STEPS, devices=2, strategy="ddp_spawn", callbacks=callbacks).fit(module, make_data(batch_size=2))
    return module, json.loads(record.read_text()) if count else {}


@pytest.mark.ddp
def test_sparse_hook_equals_dense_ddp_with_bytes_proportional_to_the_mask(tiny_llama_dir: Path, tmp_path: Path) -> None:
    sparse, s_bytes = _fit(tiny_llama_dir, tmp_path / "sparse", sparse=True)
    dense, d_bytes = _fit(tiny_llama_dir, tmp_path / "dense", sparse=False)  # DDP's average, counted by our hook
    plain, _ = _fit(tiny_llama_dir, tmp_path / "plain", sparse=False, count=False)  # DDP's built-in all-reduce
    for (name, p), (_, q), (_, r) in zip(sparse.named_parameters(), dense.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q) and torch.equal(q, r), f"{name}: {(p - q).abs().max():.3g}, {(q - r).abs().max():.3g}"
    assert s_bytes["selected"] == d_bytes["selected"] > 0
    assert s_bytes["bytes_per_step"] == 4 * s_bytes["selected"]  # fp32 gradients of the selected entries only
    assert d_bytes["bytes_per_step"] == 4 * d_bytes["eligible"]  # every trainable entry
    ratio = s_bytes["bytes_per_step"] / d_bytes["bytes_per_step"]
    assert abs(ratio - 0.05) < 0.001, ratio
    print(f"\nbytes per step and rank: sparse {s_bytes['bytes_per_step']:.0f}, dense {d_bytes['bytes_per_step']:.0f}")
