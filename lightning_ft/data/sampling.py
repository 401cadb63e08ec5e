"""Deterministic, resumable training order: a resumed run sees exactly the batches an uninterrupted one would."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpochShuffleSampler", "ResumableDataLoader", "resume_position", "train_loader"]


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
    position itself comes from the Trainer's restored progress (see :func:`resume_position`).
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


def resume_position(trainer: L.Trainer | None, batches_per_epoch: int) -> tuple[int, int]:
    """``(epoch, batches to skip)`` for the next training iteration, from the Trainer's restored progress.

    A fresh run starts at ``(current_epoch, 0)``. A run resumed mid-epoch skips the batches the epoch
    already processed; one resumed from a checkpoint written on the epoch's last batch starts the next epoch.
    """
    if trainer is None:
        return 0, 0
    epoch = int(trainer.current_epoch)
    try:
        loop = trainer.fit_loop
        done = int(loop.epoch_loop.batch_progress.current.processed) if loop.restarting else 0
    except (AttributeError, RuntimeError):
        done = 0
    if batches_per_epoch > 0 and done >= batches_per_epoch:
        return epoch + 1, 0
    return epoch, done


def train_loader(
    data: Any,
    batch_size: int,
    seed: int,
    trainer: L.Trainer | None,
    sampler: Callable[[int], Sampler[int]] | None = None,
    **kwargs: Any,
) -> ResumableDataLoader:
    """A seeded, resumable training DataLoader over ``data`` (see :func:`resume_position`).

    ``sampler(epoch)`` builds the order of the epoch to start at (default: an :class:`EpochShuffleSampler`); it must
    depend on its seed and the epoch alone and hold ``len(data)`` indices, so that a resumed run skips exactly the
    batches already seen.
    """
    batches = -(-len(data) // batch_size)
    epoch, skip = resume_position(trainer, batches)
    order = sampler(epoch) if sampler is not None else EpochShuffleSampler(len(data), seed=seed, epoch=epoch)
    return ResumableDataLoader(data, batch_size=batch_size, sampler=order, skip_batches=skip, **kwargs)
