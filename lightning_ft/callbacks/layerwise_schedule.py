"""LayerwiseSampling's schedule: how many blocks train at a time, which ones, and OwLore's preset of these settings.

Used by :class:`~lightning_ft.callbacks.LayerwiseSampling` (re-exported by :mod:`lightning_ft.callbacks.layerwise`,
their old home).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

__all__ = ["OWLORE_ACTIVE_FRACTION", "owlore_preset", "sample_blocks"]

OWLORE_ACTIVE_FRACTION = 5 / 32
"""OwLore's gamma: 5 active blocks of LLaMA-2-7B's 32 (``lisa_activated_layers=5`` in its scripts)."""


def sample_blocks(probabilities: Sequence[float], gamma: int, rng: random.Random) -> list[int]:
    """Sample ``gamma`` distinct blocks, each pick proportional to ``probabilities`` among those left.

    This is ``numpy.random.choice(L, gamma, replace=False, p=probabilities)``'s scheme, driven by ``rng``.

    Args:
        probabilities: Non-negative weight per block (need not sum to one).
        gamma: Number of blocks to draw.
        rng: The draw's generator.

    Returns:
        Sorted block indices.
    """
    weights = [max(0.0, float(p)) for p in probabilities]
    left = list(range(len(weights)))
    picked: list[int] = []
    for _ in range(min(gamma, len(left))):
        total = sum(weights[i] for i in left)
        if total <= 0:
            choice = left[rng.randrange(len(left))]
        else:
            choice = rng.choices(left, weights=[weights[i] for i in left])[0]
        picked.append(choice)
        left.remove(choice)
    return sorted(picked)


def owlore_preset(
    preset: Literal["owlore"] | None,
    num_active: int | None,
    active_fraction: float | None,
    interval: int | None,
    sampling: Literal["uniform", "outlier"] | None,
    galore_rank: int | None,
) -> tuple[int, float | None, int, Literal["uniform", "outlier"], int | None]:
    """LayerwiseSampling's arguments with their defaults filled in: OwLore's settings for ``preset="owlore"``
    (each unless set explicitly), else LISA's.

    Args:
        preset: ``"owlore"`` or ``None``.
        num_active: ``gamma`` as given.
        active_fraction: ``gamma`` as a fraction of the blocks, as given.
        interval: Steps between resamplings, as given.
        sampling: ``uniform`` or ``outlier``, as given.
        galore_rank: GaLore rank, as given.

    Returns:
        ``(num_active, active_fraction, interval, sampling, galore_rank)``.
    """
    if preset not in (None, "owlore"):
        raise ValueError(f"preset={preset!r} is not a known preset: use 'owlore' or leave it unset.")
    owlore = preset == "owlore"
    if owlore and num_active is None and active_fraction is None:
        active_fraction = OWLORE_ACTIVE_FRACTION
    num_active = 2 if num_active is None else num_active
    interval = 50 if interval is None else interval
    sampling = sampling or ("outlier" if owlore else "uniform")
    galore_rank = (256 if owlore else None) if galore_rank is None else galore_rank
    return num_active, active_fraction, interval, sampling, galore_rank
