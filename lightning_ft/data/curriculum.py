"""Easy-to-hard curriculum: the warm-up of iterative reinforced fine-tuning for tool use (iTool, Zeng et al. 2025).

iTool (https://arxiv.org/abs/2501.09766) warms the model up with supervised fine-tuning that runs from easy to hard
examples before its preference-optimisation iterations: the training set is split by difficulty into subsets
(easy, medium, hard) and the model sees them in that order. Here that is a sampler and a DataModule:

- :class:`CurriculumSampler`: the examples are ranked by a difficulty score (ties by position) and split by rank
  into ``stages`` buckets of near-equal size. During each of the first ``curriculum_epochs`` epochs, stage ``k``
  follows stage ``k - 1``. With ``mode="sequential"`` (iTool's) stage ``k`` is bucket ``k`` shuffled, so the epoch
  holds every example once, easiest bucket first. With ``mode="cumulative"`` stage ``k`` draws as many examples as
  bucket ``k`` holds, without replacement, from buckets ``0..k``: easy examples are revisited while harder ones
  join (the "baby steps" curriculum). Every epoch has the dataset's length, so Lightning's epoch length never
  changes. Later epochs are plain seeded permutations, equal to
  :class:`~lightning_ft.data.sampling.EpochShuffleSampler`'s. Every order depends on ``seed + epoch`` alone, so a
  resumed run replays the batches of an uninterrupted one.
- :class:`CurriculumDataModule`: :class:`~lightning_ft.data.InstructionDataModule` whose training order is the
  curriculum. The difficulty is a numeric column of the data (``difficulty: perplexity`` after
  ``lightning-ft data filter --method perplexity``, which writes each kept example's perplexity under a reference
  model; a column of tool-call counts; a human rating), or the example's length in tokens (``tokens``, the
  default) or its response's (``response_tokens``).

Example (``configs/curriculum.yaml``)::

    data:
      class_path: lightning_ft.data.CurriculumDataModule
      init_args: {dataset: rotten_tomatoes, difficulty: tokens, stages: 3, mode: sequential, curriculum_epochs: 1}
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from lightning_ft.data.collate import LMCollator
from lightning_ft.data.instruction import InstructionDataModule
from lightning_ft.data.sampling import train_loader

__all__ = ["CurriculumDataModule", "CurriculumSampler", "difficulty_buckets"]

Mode = Literal["sequential", "cumulative"]
_MODES = ("sequential", "cumulative")
_LENGTHS = ("tokens", "response_tokens")


def difficulty_buckets(difficulty: Sequence[float], stages: int) -> list[np.ndarray]:
    """Indices ranked by ``difficulty`` (ascending, ties by index) and split by rank into ``stages`` buckets whose
    sizes differ by at most one (the larger ones first)."""
    if not 1 <= stages <= len(difficulty):
        raise ValueError(
            f"stages={stages} must be between 1 and the number of training examples ({len(difficulty)}); "
            "lower stages or give more training data."
        )
    order = np.argsort(np.asarray(difficulty, dtype=np.float64), kind="stable")
    return list(np.array_split(order, stages))


class CurriculumSampler(Sampler[int]):
    """Easy-to-hard order over the first ``curriculum_epochs`` epochs, seeded permutations afterwards.

    Args:
        difficulty: one score per example (higher is harder).
        stages: number of difficulty buckets (iTool: 3, easy / medium / hard).
        mode: ``"sequential"`` (stage ``k`` = bucket ``k``) or ``"cumulative"`` (stage ``k`` draws ``len(bucket k)``
            examples from buckets ``0..k``).
        curriculum_epochs: epochs that follow the curriculum; later ones are plain permutations.
        seed: the order's seed (combined with the epoch, as in ``EpochShuffleSampler``).
        epoch: the epoch to start at (Lightning calls :meth:`set_epoch`).
    """

    def __init__(
        self,
        difficulty: Sequence[float],
        stages: int = 3,
        mode: Mode = "sequential",
        curriculum_epochs: int = 1,
        seed: int = 0,
        epoch: int = 0,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode={mode!r} is not a curriculum mode; use one of {', '.join(_MODES)}.")
        if curriculum_epochs < 0:
            raise ValueError(f"curriculum_epochs={curriculum_epochs} must be 0 or more (0 turns the curriculum off).")
        self.buckets = difficulty_buckets(difficulty, stages)
        self.size, self.mode, self.curriculum_epochs = len(difficulty), mode, curriculum_epochs
        self.seed, self.epoch = seed, epoch

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of each epoch."""
        self.epoch = epoch

    def stage_slices(self) -> list[slice]:
        """Where each stage lies in a curriculum epoch's order."""
        bounds = np.cumsum([0, *map(len, self.buckets)])
        return [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]

    def order(self, epoch: int) -> list[int]:
        """The indices of ``epoch``, in order."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        if epoch >= self.curriculum_epochs:
            return torch.randperm(self.size, generator=generator).tolist()
        out: list[int] = []
        for k, bucket in enumerate(self.buckets):
            pool = bucket if self.mode == "sequential" else np.concatenate(self.buckets[: k + 1])
            picked = torch.randperm(len(pool), generator=generator)[: len(bucket)].numpy()
            out.extend(int(i) for i in pool[picked])
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch))

    def __len__(self) -> int:
        return self.size


class CurriculumDataModule(InstructionDataModule):
    """:class:`~lightning_ft.data.InstructionDataModule` trained easy to hard (see the module docstring).

    Args:
        difficulty: a numeric column of the data, ``"tokens"`` (the example's token count, prompt and response) or
            ``"response_tokens"`` (the response's).
        stages: number of difficulty buckets, at least 1 and at most the training set's size.
        mode: ``"sequential"`` or ``"cumulative"`` (see :class:`CurriculumSampler`).
        curriculum_epochs: epochs that follow the curriculum (a warm-up); later epochs are shuffled as usual.
        **kwargs: the arguments of :class:`~lightning_ft.data.InstructionDataModule`.
    """

    def __init__(
        self,
        difficulty: str = "tokens",
        stages: int = 3,
        mode: Mode = "sequential",
        curriculum_epochs: int = 1,
        **kwargs: Any,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode={mode!r} is not a curriculum mode; use one of {', '.join(_MODES)}.")
        if stages < 1 or curriculum_epochs < 0:
            raise ValueError(
                f"stages={stages} must be at least 1 and curriculum_epochs={curriculum_epochs} at least 0."
            )
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self._difficulty: list[float] = []

    def setup(self, stage: str | None = None) -> None:
        """Load, split and tokenise the data, then score each training example's difficulty."""
        super().setup(stage)
        if not self._difficulty:
            self._difficulty = self.difficulties()

    def difficulties(self) -> list[float]:
        """The difficulty of each training example, in the training split's order."""
        name = self.hparams.difficulty
        if name == "tokens":
            return [float(len(e["input_ids"])) for e in self._encoded["train"]]
        if name == "response_tokens":
            encode = self.tokenizer
            return [float(len(encode(self._response(r), add_special_tokens=False)["input_ids"]))
                    for r in self._splits["train"]]  # fmt: skip
        records = self._splits["train"]
        missing = next((i for i, r in enumerate(records) if name not in r), None)
        if missing is not None:
            columns = ", ".join(sorted(records[missing])) if records else "none"
            raise ValueError(
                f"difficulty={name!r} is not a column of training record {missing} (columns: {columns}); name a "
                f"numeric column or use one of {', '.join(_LENGTHS)}."
            )
        scores: list[float] = []
        for i, record in enumerate(records):
            try:
                score = float(record[name])
            except (TypeError, ValueError):
                score = float("nan")
            if not np.isfinite(score):
                raise ValueError(
                    f"difficulty={name!r} of training record {i} is {record[name]!r}, not a finite number; "
                    "fill or drop that record, or name another column."
                )
            scores.append(score)
        return scores

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        seed = h.split_seed if h.shuffle_seed is None else h.shuffle_seed
        return train_loader(
            self._encoded["train"], h.batch_size, seed, self.trainer,
            sampler=lambda epoch: CurriculumSampler(
                self._difficulty, h.stages, h.mode, h.curriculum_epochs, seed=seed, epoch=epoch
            ),
            collate_fn=LMCollator(self.pad_token_id), num_workers=h.num_workers,
        )  # fmt: skip
