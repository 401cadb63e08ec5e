"""Run by ``torchrun --nproc_per_node=2`` from test_matrix.py: every DDP row of the matrix, one after the other, in
ONE gloo process group (spawned once for all rows). Rank 0 writes, per row, the weights it ended with and whether
both ranks agree; the test compares them with the one-process run.

Usage: ``ddp_fit.py <tiny llama folder> <output folder> <row>...``
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from helpers import make_trainer
from lightning.pytorch.strategies import DDPStrategy
from rows import ROW, STEPS, TokenData, build


def main(path: str, out: Path, names: list[str]) -> None:
    torch.set_num_threads(1)
    for name in names:
        row = ROW[name]
        L.seed_everything(0)
        module, callbacks = build(row, "llama", "ours", path)
        strategy = DDPStrategy(find_unused_parameters=row.dynamic)
        trainer = make_trainer(out, STEPS, devices=2, strategy=strategy, callbacks=callbacks,
                               use_distributed_sampler=False)  # fmt: skip
        trainer.fit(module, TokenData("llama", row.batch_extra))
        flat = torch.cat([p.detach().flatten() for p in module.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        if trainer.is_global_zero:
            state = {n: p.detach().clone() for n, p in module.named_parameters()}
            agree = bool(torch.equal(gathered[0], gathered[1]))
            torch.save({"params": state, "ranks_agree": agree}, out / f"{name}.pt")
        trainer.strategy.barrier()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
