"""Deterministic, resumable training order: a resumed run sees exactly the batches an uninterrupted one would."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpochShuffleSampler", "ResumableDataLoader", "batches_done_this_epoch", "current_epoch"]


class EpochShuffleSampler(Sampler[int]):
    """A permutation drawn from ``seed + epoch`` alone (no global RNG), so any epoch can be replayed."""

    def __init__(self, size: int, seed: int = 0, epoch: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, epoch

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of each epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class ResumableDataLoader(DataLoader):
    """A DataLoader that skips the first ``skip_batches`` batches of its first iteration (mid-epoch resume).

    It also exposes ``state_dict``/``load_state_dict`` so that Lightning treats it as resumable; the
    position itself comes from the Trainer's restored progress (see :func:`batches_done_this_epoch`).
    """

    def __init__(self, dataset: Dataset, *args: Any, skip_batches: int = 0, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.skip_batches = skip_batches

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        iterator = super().__iter__()
        skip, self.skip_batches = self.skip_batches, 0
        for _ in range(skip):
            next(iterator, None)
        return iterator

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None


def current_epoch(trainer: L.Trainer | None) -> int:
    """The Trainer's epoch (restored on resume), or 0 without a Trainer."""
    return int(trainer.current_epoch) if trainer is not None else 0


def batches_done_this_epoch(trainer: L.Trainer | None) -> int:
    """Training batches already consumed in the current epoch when the Trainer resumes mid-epoch, else 0."""
    if trainer is None:
        return 0
    try:
        loop = trainer.fit_loop
        if not loop.restarting:
            return 0
        return int(loop.epoch_loop.batch_progress.current.processed)
    except (AttributeError, RuntimeError):
        return 0
