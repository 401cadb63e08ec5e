"""The settings of CAFT's multi-token heads and the schedule ``s(t)`` of their loss weight."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["CAFTSettings", "HeadSchedule", "Stage", "heads_schedule"]

HeadSchedule = Literal["rsine", "sine", "linear", "constant"]
Stage = Literal["heads", "finetune"]


def heads_schedule(name: str, step: int, total: int, ratio: float = 1.0) -> float:
    """The CAFT weight schedule ``s(t)`` in ``[0, 1]`` at optimizer step ``step`` of ``total``.

    ``rsine`` (default): ``sin((T - t) / T * pi / 2)``, 1 at the start and 0 at the end; ``sine``:
    ``sin(min(1, t / (ratio * T)) * pi / 2)`` (warm-up until ``t / T = ratio``); ``linear``: ``t / T``;
    ``constant``: 1. With an unknown total (``total <= 0``) every schedule is 1.
    """
    if name == "constant" or total <= 0:
        return 1.0
    x = min(1.0, max(0.0, step / total))
    if name == "rsine":
        return math.sin((1.0 - x) * math.pi / 2)
    if name == "sine":
        return math.sin(min(1.0, x / ratio) * math.pi / 2)
    if name == "linear":
        return x
    raise ValueError(f"heads_schedule={name!r} is not a schedule: use 'rsine', 'sine', 'linear' or 'constant'.")


@dataclass(frozen=True)
class CAFTSettings:
    """The settings of :class:`~lightning_ft.objectives.MultiTokenHeadsMixin`, named as its arguments (one sentence
    for an invalid value).

    Attributes:
        num_heads: Auxiliary heads.
        layers_per_head: Decoder layers per head.
        stage: ``heads`` or ``finetune``.
        heads_path: Heads file to start from.
        train_heads: Whether the heads train (``None``: in stage ``heads`` only; see :attr:`trains_heads`).
        init_layer: Decoder layer the heads are copied from.
        decay: ``gamma``.
        heads_coefficient: ``alpha``.
        heads_schedule: ``s(t)``.
        schedule_ratio: Fraction of training over which ``sine`` rises.
        final_norm: Pass the head outputs through the final norm.
        ce_chunk_size: Rows per chunk of the auxiliary cross-entropies.
        heads_output: Where ``on_fit_end`` writes the heads (``None``: default, ``""``: disabled).
    """

    num_heads: int = 4
    layers_per_head: int = 1
    stage: Stage = "finetune"
    heads_path: str | None = None
    train_heads: bool | None = None
    init_layer: int = -2
    decay: float = 0.8
    heads_coefficient: float = 0.01
    heads_schedule: HeadSchedule = "rsine"
    schedule_ratio: float = 1.0
    final_norm: bool = True
    ce_chunk_size: int = 1024
    heads_output: str | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.num_heads >= 1, f"num_heads={self.num_heads} must be at least 1."),
            (self.layers_per_head >= 1, f"layers_per_head={self.layers_per_head} must be at least 1."),
            (self.stage in ("heads", "finetune"), f"stage={self.stage!r} is not a stage: use 'heads' or 'finetune'."),
            (0 < self.decay <= 1, f"decay={self.decay} must be in (0, 1]: the paper uses 0.8."),
            (self.heads_coefficient >= 0, f"heads_coefficient={self.heads_coefficient} must be zero or positive."),
            (self.heads_schedule in ("rsine", "sine", "linear", "constant"),
             f"heads_schedule={self.heads_schedule!r} is not a schedule: use 'rsine', 'sine', 'linear' or 'constant'."),
            (0 < self.schedule_ratio <= 1, f"schedule_ratio={self.schedule_ratio} must be in (0, 1]."),
            (self.ce_chunk_size >= 1, f"ce_chunk_size={self.ce_chunk_size} must be at least 1."),
            (not (self.stage == "heads" and self.train_heads is False),
             "stage='heads' with train_heads=false trains nothing: drop train_heads or use stage: finetune."),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def trains_heads(self) -> bool:
        """Whether the heads train: ``train_heads``, by default in stage ``heads`` only."""
        return self.stage == "heads" if self.train_heads is None else self.train_heads
