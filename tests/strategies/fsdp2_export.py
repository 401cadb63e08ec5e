"""Run by ``torchrun --nproc_per_node=2`` from test_fsdp2.py: a full and a LoRA CausalLMModule and a
SequenceClassificationModule (a BERT encoder, new head) fitted under FSDP2Strategy, and a full one with
SparseFineTuning (one artifact written from every process's rows), each exporting ``hf_model`` at fit end (gathered
one tensor at a time onto rank 0). Rank 0 writes the gathered weights of each (``<kind>.pt``) for the test to compare
with what ``from_pretrained`` loads; each rank records the most bytes of gathered (full) tensors alive at once during
the export.

After the full fit each rank generates its own number of tokens (2 and 5), which needs the rank that finishes
first to keep running forward passes (``generated<rank>.pt``: how many it generated).

Then a CopilotCausalLM (sharded Pilot, replicated Copilot) with ``copilot_lambda="auto"``: rank 0 writes
``copilot.pt`` with the Copilot's weights before and after, whether the two processes' Copilots agree, the sweep, the
chosen weight and the one recorded in ``last.ckpt`` (a distributed checkpoint) for the test to compare with the
exported Copilot.

First, ``sharded_topk`` on fixed scores split by rows (``topk<rank>.pt``), in the same process group.

Usage: ``fsdp2_export.py <tiny llama folder> <tiny bert folder> <output folder>``
"""

from __future__ import annotations

import os
import sys
import weakref
from pathlib import Path

import lightning as L
import torch
from helpers import make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ft.callbacks import Magnitude, SparseFineTuning
from lightning_ft.copilot import CopilotCausalLM
from lightning_ft.modules import CausalLMModule, SequenceClassificationModule
from lightning_ft.objectives import CAFTCausalLM
from lightning_ft.sparse.topk import sharded_topk
from lightning_ft.strategies import FSDP2Strategy, fsdp2


def _tracked() -> list[int]:
    """Wrap ``full_tensor`` so that each gather records the bytes of all gathered tensors still alive then."""
    alive: list[weakref.ref[torch.Tensor]] = []
    peaks: list[int] = []
    plain = fsdp2.full_tensor

    def full(tensor: torch.Tensor) -> torch.Tensor:
        whole = plain(tensor)
        alive[:] = [ref for ref in alive if ref() is not None] + [weakref.ref(whole)]
        peaks.append(sum(t.numel() * t.element_size() for ref in alive if (t := ref()) is not None))
        return whole

    fsdp2.full_tensor = full
    return peaks


def _batches(classes: bool = False) -> torch.utils.data.DataLoader:
    """Each rank's own fixed random token rows, labelled with themselves (or with a class)."""
    gen = torch.Generator().manual_seed(int(os.environ["RANK"]))
    ids = torch.randint(3, 300, (12, 10), generator=gen)
    labels = torch.randint(0, 2, (12,), generator=gen) if classes else ids
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": y} for r, y in zip(ids, labels)]
    return torch.utils.data.DataLoader(rows, batch_size=2)


def topk_scores() -> dict[str, torch.Tensor]:
    """Scores with ties, odd row counts and a one-row tensor, for sharded_topk (test_fsdp2.py builds the same)."""
    gen = torch.Generator().manual_seed(0)
    return {"a": torch.rand(7, 5, generator=gen), "b": torch.randint(0, 3, (6, 4), generator=gen).float(),
            "c": torch.rand(1, 9, generator=gen), "d": torch.zeros(5, 2)}  # fmt: skip


def _sharded_topk(out: Path, rank: int) -> None:
    """Each rank's choice among its rows (FSDP2's row blocks: ``chunk(2)``), a global and a per-tensor budget."""
    torch.distributed.init_process_group("gloo")
    scores = topk_scores()
    mine = {n: s.chunk(2)[rank] if s.shape[0] > 1 else (s[:0] if rank else s) for n, s in scores.items()}
    chosen = [sharded_topk(mine, 37), sharded_topk(mine, {n: 3 + i for i, n in enumerate(scores)})]
    torch.save(chosen, out / f"topk{rank}.pt")


class _Data(L.LightningDataModule):
    """Each rank's own token rows for training and for the Copilot's lambda sweep (which needs a DataModule)."""

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return _batches()

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return _batches()


def _copilot(path: str, out: Path, rank: int) -> None:
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    L.seed_everything(0)
    module = CopilotCausalLM(model=path, copilot_layers=2, copilot_lambda="auto", lambda_grid=(0.5, 1.0),
                             zero_init_output=False, learning_rate=1e-2, copilot_learning_rate=1e-2, warmup_steps=0,
                             copilot_output=str(out / "copilot" / "copilot"), output_dir="")  # fmt: skip
    before = {n: t.detach().clone() for n, t in module.copilot.state_dict().items()}
    checkpoint = ModelCheckpoint(dirpath=out / "copilot" / "ckpt", save_last=True, save_top_k=0)
    trainer = make_trainer(out / "copilot", 3, devices=2, strategy=FSDP2Strategy(), use_distributed_sampler=False,
                           enable_checkpointing=True, callbacks=[checkpoint], gradient_clip_val=1.0)  # fmt: skip
    trainer.fit(module, datamodule=_Data())
    after = {n: t.detach().clone() for n, t in module.copilot.state_dict().items()}
    spread = torch.tensor(max(float((t - after[n]).abs().max()) for n, t in _from_rank0(after).items()))
    torch.distributed.all_reduce(spread, op=torch.distributed.ReduceOp.MAX)
    if rank == 0:
        meta = torch.load(Path(checkpoint.last_model_path) / _METADATA_FILENAME, weights_only=False)
        torch.save({"before": before, "after": after, "agree": float(spread) == 0.0, "lambda": module.copilot_lambda,
                    "sweep": module.lambda_sweep, "last": meta["copilot"]}, out / "copilot.pt")  # fmt: skip


def _from_rank0(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's copy of each tensor, on every rank."""
    copies = {n: t.clone() for n, t in state.items()}
    for tensor in copies.values():
        torch.distributed.broadcast(tensor, src=0)
    return copies


def main(path: str, bert: str, out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    _sharded_topk(out, rank)
    peaks = _tracked()
    for kind, peft in (
        ("full", None),
        ("lora", {"r": 2, "target_modules": ["q_proj", "v_proj"]}),
        ("classifier", None),
        ("sparse", None),
        ("caft", None),
    ):
        L.seed_everything(0)
        if kind == "caft":
            module = CAFTCausalLM(
                model=path,
                num_heads=2,
                heads_coefficient=0.5,
                learning_rate=1e-2,
                warmup_steps=0,
                heads_output=str(out / "heads.safetensors"),
                output_dir=str(out / kind / "hf_model"),
            )
        elif kind == "classifier":
            module = SequenceClassificationModule(model=bert, num_labels=2, learning_rate=1e-2, warmup_steps=0,
                                                  output_dir=str(out / kind / "hf_model"))  # fmt: skip
        else:
            module = CausalLMModule(model=path, peft=peft, learning_rate=1e-2, warmup_steps=0,
                                    output_dir=str(out / kind / "hf_model"))  # fmt: skip
        callbacks = [SparseFineTuning(Magnitude(), density=0.05, save_path=str(out / "sparse.safetensors"))]
        trainer = make_trainer(out / kind, 3, devices=2, strategy=FSDP2Strategy(), use_distributed_sampler=False,
                               callbacks=callbacks if kind == "sparse" else [])  # fmt: skip
        peaks.clear()  # and the previous module's gathered weights are gone (``del weights`` below)
        trainer.fit(module, train_dataloaders=_batches(classes=kind == "classifier"))
        export_peak = max(peaks)
        if kind == "full":  # each rank stops after its own number of tokens: the one done first keeps pace
            prompt = _batches().dataset[0]["input_ids"][None]
            generated = module.generate(prompt, max_new_tokens=2 + 3 * rank, min_new_tokens=2 + 3 * rank)
            torch.save(generated.shape[1] - prompt.shape[1], out / f"generated{rank}.pt")
        weights = dict(fsdp2.gathered_parameters(module.backbone if kind != "caft" else module))
        if rank == 0:
            model_bytes = sum(t.numel() * t.element_size() for t in weights.values())
            torch.save({"weights": weights, "export_peak": export_peak, "model_bytes": model_bytes},
                       out / f"{kind}.pt")  # fmt: skip
        del weights
        trainer.strategy.barrier()
    _copilot(path, out, rank)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
