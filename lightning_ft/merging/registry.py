"""A small registry of merge methods: a method is a pure per-tensor function plus metadata.

Each registered function maps the list of task vectors of one tensor (fp32, one per ingredient)
and its scalar parameters to the merged task vector of that tensor. Its keyword parameters and
their defaults, read from the signature, are the method's recipe schema.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lightning_ft.merging import ops

MergeFn = Callable[..., torch.Tensor]

__all__ = ["MERGE_METHODS", "MergeMethod", "get_method", "register"]


@dataclass(frozen=True)
class MergeMethod:
    """One merge method.

    Attributes:
        name: Recipe / command-line name.
        pretty_name: Human name for reports.
        reference_url: The paper.
        fn: ``fn(deltas, **params) -> merged delta`` on one tensor.
        defaults: Scalar parameters and their defaults (from ``fn``'s signature).
        needs_eval: Whether the method scores candidates on validation data (greedy soup).
        beta_grid: The LiNeS-for-merging ``beta`` grid swept with ``beta: sweep``.
        scaling_param: The parameter LiNeS replaces (its ``alpha``/``beta`` take over the global scale).
    """

    name: str
    pretty_name: str
    reference_url: str
    fn: MergeFn
    defaults: dict[str, Any] = field(default_factory=dict)
    needs_eval: bool = False
    beta_grid: tuple[float, ...] = tuple(round(b, 2) for b in np.linspace(0.0, 1.0, 11)[1:])
    scaling_param: str | None = "scaling"

    def resolve(self, params: dict[str, Any] | None) -> dict[str, Any]:
        """Defaults overridden by ``params``; an unknown name is refused in one sentence."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"Merge method {self.name!r} has no parameter {unknown[0]!r}; its parameters are "
                f"{sorted(self.defaults) or 'none'}."
            )
        return {**self.defaults, **params}

    def __call__(self, deltas: Sequence[torch.Tensor], **params: Any) -> torch.Tensor:
        return self.fn(deltas, **params)


MERGE_METHODS: dict[str, MergeMethod] = {}


def _signature_defaults(fn: MergeFn) -> dict[str, Any]:
    params = list(inspect.signature(fn).parameters.values())[1:]
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def register(name: str, pretty_name: str, reference_url: str, **meta: Any) -> Callable[[MergeFn], MergeFn]:
    """Decorator adding ``fn`` to :data:`MERGE_METHODS` under ``name``."""

    def wrap(fn: MergeFn) -> MergeFn:
        if name in MERGE_METHODS:
            raise ValueError(f"Merge method {name!r} is already registered.")
        MERGE_METHODS[name] = MergeMethod(name, pretty_name, reference_url, fn, _signature_defaults(fn), **meta)
        return fn

    return wrap


def get_method(name: str) -> MergeMethod:
    """Return a registered method; an unknown name is refused with the closest valid names."""
    if name in MERGE_METHODS:
        return MERGE_METHODS[name]
    close = difflib.get_close_matches(name, list(MERGE_METHODS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown merge method {name!r}: use one of {sorted(MERGE_METHODS)}.{hint}")


@register("uniform_soup", "Uniform model soup", "https://arxiv.org/abs/2203.05482", scaling_param=None)
def _uniform_soup(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    return ops.uniform_soup(deltas)


@register("greedy_soup", "Greedy model soup", "https://arxiv.org/abs/2203.05482", needs_eval=True, scaling_param=None)
def _greedy_soup(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    # The engine picks the ingredients on validation data; the chosen ones are averaged.
    return ops.uniform_soup(deltas)


@register("task_arithmetic", "Task arithmetic", "https://arxiv.org/abs/2212.04089")
def _task_arithmetic(deltas: Sequence[torch.Tensor], scaling: float = 0.4) -> torch.Tensor:
    return ops.task_arithmetic(deltas, scaling)


@register(
    "ties",
    "TIES-merging",
    "https://arxiv.org/abs/2306.01708",
    beta_grid=tuple(round(b, 2) for b in np.arange(0.1, 1.6, 0.1)),
)
def _ties(deltas: Sequence[torch.Tensor], density: float = 0.2, scaling: float = 1.0) -> torch.Tensor:
    return ops.ties(deltas, density, scaling)


@register("breadcrumbs", "Model Breadcrumbs", "https://arxiv.org/abs/2312.06795")
def _breadcrumbs(
    deltas: Sequence[torch.Tensor], density: float = 0.143, gamma: float = 0.007, scaling: float = 0.4
) -> torch.Tensor:
    return ops.breadcrumbs(deltas, density, gamma, scaling)
