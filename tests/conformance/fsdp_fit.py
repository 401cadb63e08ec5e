"""Run by ``torchrun --nproc_per_node=2`` from test_matrix.py: every FSDP2 row of the matrix, one after the other, in
ONE gloo process group, under :class:`~lightning_ft.strategies.FSDP2Strategy` (our modules ``fully_shard`` each
block in ``configure_model``).

Per row, rank 0 writes ``<row>.pt``: the gathered weights of the uninterrupted run, the method's ``state_dict``, the
gathered weights and state of a run resumed from the distributed checkpoint of step ``MID``, and whether, at every
step on every rank, the tensors the method left out had neither a gradient nor optimizer state. A row whose method
refuses FSDP2 writes the refusal instead.

Usage: ``fsdp_fit.py <tiny llama folder> <output folder> <row>...``
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from helpers import make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from rows import ROW, STEPS, KeepMid, TokenData, build

from lightning_ft.errors import UserError
from lightning_ft.strategies import FSDP2Strategy
from lightning_ft.strategies.fsdp2 import gathered_parameters


class FrozenStateless(L.Callback):
    """At every optimizer step, on this rank: the candidates a selection left out have no gradient and no optimizer
    state, in a sparse fine-tuning's sparse phase the module's optimizer holds no state for its eligible tensors
    (theirs is the compact state of this rank's rows), and every parameter is a shard (a ``DTensor``)."""

    def __init__(self, method: Any) -> None:
        self.method, self.ok, self.steps = method, True, 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        from torch.distributed.tensor import DTensor

        self.steps += 1
        self.ok &= all(isinstance(p, DTensor) for p in pl_module.backbone.parameters())
        held = {id(p) for p in optimizer.state}
        if getattr(self.method, "phase", None) == "sparse":  # LT-SFT's dense phase trains them with the optimizer
            self.ok &= not held & {id(p) for p in self.method._params.values()}
        selection = getattr(self.method, "selection", None)
        if selection is None:
            return
        for name in selection.candidates:
            if name not in selection.active:
                param = selection.params[name]
                self.ok &= param.grad is None and id(param) not in held and not param.requires_grad


def _fit(name: str, path: str, root: Path, ckpt: str | None) -> tuple[dict[str, torch.Tensor], Any, bool]:
    row = ROW[name]
    L.seed_everything(0)
    module, callbacks = build(row, "llama", "ours", path)
    method = callbacks[0] if row.callback is not None else None
    probe = FrozenStateless(method)
    extra: list[L.Callback] = [probe, ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1,
                                                      save_top_k=0)]  # fmt: skip
    extra += [KeepMid(root / "ckpt")] if ckpt is None else []
    trainer = make_trainer(root, STEPS, devices=2, strategy=FSDP2Strategy(), callbacks=callbacks[:-1] + extra,
                           enable_checkpointing=True, use_distributed_sampler=False)  # fmt: skip
    trainer.fit(module, TokenData("llama", row.batch_extra), ckpt_path=ckpt)
    weights = dict(gathered_parameters(module, only={n for n, _ in module.named_parameters()}))  # as ddp_fit.py
    state = method.state_dict() if method is not None else {}
    ok = torch.tensor(float(probe.ok and probe.steps > 0))
    torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return weights, state, bool(ok)


def main(path: str, out: Path, names: list[str]) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    for name in names:
        root = out / name
        try:
            weights, state, ok = _fit(name, path, root, None)
        except UserError as err:  # a method that refuses FSDP2: every rank raises the same sentence in setup()
            if rank == 0:
                torch.save({"refused": str(err)}, out / f"{name}.pt")
            continue
        resumed, resumed_state, resumed_ok = _fit(name, path, root / "resumed", str(root / "ckpt" / "mid.ckpt"))
        if rank == 0:
            torch.save({"params": weights, "state": state, "resumed": resumed, "resumed_state": resumed_state,
                        "frozen_stateless": ok and resumed_ok}, out / f"{name}.pt")  # fmt: skip
        torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
