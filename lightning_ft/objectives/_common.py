"""Small pieces the objective mixins share: training progress, a deterministic per-batch generator, and the
support check of ``setup``."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

__all__ = ["batch_generator", "check_fit_support", "log_train", "training_progress"]

def check_fit_support(method: object, trainer: Any, model: torch.nn.Module | None) -> None:
    """What an objective's ``setup("fit")`` does: register the clean process-group exit, then refuse in one sentence a
    feature of this fit that ``method``'s declared support (:mod:`lightning_ft.support`) does not cover."""
    from lightning_ft.core.process_group import destroy_process_group_at_exit
    from lightning_ft.support import check_support

    destroy_process_group_at_exit()
    check_support(method, trainer, model)


def training_progress(module: L.LightningModule) -> tuple[int, int]:
    """``(t, T)``: the optimizer steps done so far and the total of the run (``T = 0`` when unknown).

    ``t`` is ``trainer.global_step``, restored on resume, so every schedule built on it resumes exactly.
    """
    trainer = module._trainer
    if trainer is None:
        return 0, 0
    total = trainer.estimated_stepping_batches
    return int(trainer.global_step), int(total) if math.isfinite(total) else 0


def batch_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and integer ``keys`` (step, batch index, rank) alone.

    Draws that depend only on these never drift on resume and differ across ranks and batches.
    """
    value = seed & 0xFFFFFFFF
    for key in keys:
        value = (value * 1_000_003 + int(key) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def log_train(module: L.LightningModule, name: str, value: float | torch.Tensor, batch_size: int) -> None:
    """``module.log`` inside ``training_step`` (a direct ``compute_loss`` call logs nothing)."""
    if module._trainer is not None and getattr(module, "_current_fx_name", None) == "training_step":
        module.log(name, value, batch_size=batch_size)
