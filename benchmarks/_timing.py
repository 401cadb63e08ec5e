"""Step timing shared by the benchmark scripts (imported from the script's own folder).

Lightning is imported on first use, so that a benchmark's parent process, which only spawns workers, stays light.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any


@functools.cache
def step_timer_class() -> type:
    """A Lightning callback class that records the wall time of each training step (forward, backward, optimizer)."""
    import lightning as L

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._start = 0.0

        def on_train_batch_start(self, *args: Any) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            self.times.append(time.perf_counter() - self._start)

        def median(self) -> float:
            """Median step time without the first two (warm-up) steps, when there are more."""
            return median_step(self.times)

    return StepTimer


def step_timer() -> Any:
    """A new :func:`step_timer_class` callback."""
    return step_timer_class()()


def median_step(times: list[float]) -> float:
    """Median of ``times`` without the first two (warm-up) steps, when there are more."""
    return statistics.median(times[2:] or times)
