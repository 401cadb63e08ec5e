"""Planning a fit before it starts: the per-device memory estimate behind ``lightning-ft estimate``.

:func:`estimate` is a pure function of a model's shape (:func:`load_shape` reads it from ``config.json``) and a
:class:`FitPlan`; it returns a :class:`MemoryEstimate` broken down into weights, gradients, optimizer state,
activations, the loss's logits and communication buffers. Nothing here imports Lightning or loads weights.
"""

from lightning_ft.planning.estimate import METHODS, FitPlan, MemoryEstimate, check_plan, estimate, parse_targets
from lightning_ft.planning.model import ModelShape, load_config, load_shape

__all__ = [
    "METHODS", "FitPlan", "MemoryEstimate", "ModelShape", "check_plan", "estimate", "load_config", "load_shape",
    "parse_targets",
]  # fmt: skip
