"""A small registry of merge methods: a method is a pure per-tensor function plus metadata.

Each registered function maps the base tensor, the task vectors of that tensor (exact fp32 differences, one per
ingredient), the
per-model parameters (``weight``, ``density``, ``gamma``), the global parameters and a random generator to the
merged task vector of that tensor. The parameter names and defaults are mergekit 0.1.5's: ``weight`` multiplies
each (sparsified) task vector before the sign election, ``normalize`` divides by the sum of the weights (of the
sign-agreeing models per entry for the TIES family, of all models otherwise), ``lambda`` scales the merged task
vector, ``rescale`` restores each pruned task vector's L1 norm. ``scaling`` is accepted as an alias of ``lambda``.
"""

from __future__ import annotations

import difflib
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lightning_ft.merging import ops

MergeFn = Callable[
    [torch.Tensor, Sequence[torch.Tensor], Sequence[dict[str, Any]], dict[str, Any], "torch.Generator | None"],
    torch.Tensor,
]

__all__ = ["MERGE_METHODS", "MergeMethod", "ResolvedParams", "get_method", "register"]

_ALIASES = {"scaling": "lambda"}  # our earlier name of mergekit's global scale


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, (list, dict)):
            raise ValueError(
                f"{name}={value!r}: per-layer lists and {{filter, value}} entries are not supported; give one number."
            )
        raise ValueError(f"{name}={value!r} must be a number.")
    return float(value)


def _fraction(name: str, value: Any) -> float:
    number = _number(name, value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{name}={value!r} must be between 0 and 1.")
    return number


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be true or false.")
    return value


def _scope(name: str, value: Any) -> str:
    if value not in ("tensor", "row"):
        raise ValueError(f"{name}={value!r} must be 'tensor' (mergekit, per tensor) or 'row' (official, per row).")
    return str(value)


def _seed(name: str, value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name}={value!r} must be an integer.")
    return value


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "weight": _number, "density": _fraction, "gamma": _fraction, "lambda": _number, "normalize": _flag,
    "rescale": _flag, "int8_mask": _flag, "scope": _scope, "seed": _seed,
}  # fmt: skip


@dataclass(frozen=True)
class ResolvedParams:
    """A method's parameters for one merge.

    Attributes:
        params: The global parameters (defaults overridden by the top-level block).
        models: One dict of per-model parameters per ingredient (a model's own block wins over the top level).
    """

    params: dict[str, Any]
    models: list[dict[str, Any]]


@dataclass(frozen=True)
class MergeMethod:
    """One merge method.

    Attributes:
        name: Recipe / command-line name.
        pretty_name: Human name for reports.
        reference_url: The paper.
        fn: ``fn(base, deltas, models, params, generator) -> merged delta`` on one tensor.
        summary: The exact formula, for ``lightning-ft merge --help``.
        defaults: Global parameters and their defaults (top-level ``parameters:`` only).
        model_defaults: Per-model parameters and their defaults (a model's ``parameters:`` or the top level).
        needs_eval: Whether the method scores candidates on validation data (greedy soup).
        random: Whether the method draws random numbers (it then takes a ``seed``).
        beta_grid: The LiNeS-for-merging ``beta`` grid swept with ``beta: sweep``.
        scaling_param: The parameter LiNeS replaces (its ``alpha``/``beta`` take over the global scale).
    """

    name: str
    pretty_name: str
    reference_url: str
    fn: MergeFn
    summary: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    model_defaults: dict[str, Any] = field(default_factory=dict)
    needs_eval: bool = False
    random: bool = False
    beta_grid: tuple[float, ...] = tuple(round(b, 2) for b in np.linspace(0.0, 1.0, 11)[1:])
    scaling_param: str | None = "lambda"

    def _unknown(self, key: str, scope: str) -> ValueError:
        names = sorted({*self.defaults, *self.model_defaults})
        close = difflib.get_close_matches(key, names + [a for a, t in _ALIASES.items() if t in names], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if key == "weight" and not self.model_defaults:
            hint = " (use method 'linear' for a weighted average)"
        return ValueError(
            f"Merge method {self.name!r} has no {scope}parameter {key!r}{hint}; its parameters are {names or 'none'}."
        )

    def _canonical(self, params: dict[str, Any]) -> dict[str, Any]:
        """Aliases (``scaling``) renamed to their parameter (``lambda``); both with different values is refused."""
        out = {key: value for key, value in params.items() if _ALIASES.get(key) not in self.defaults}
        for alias, name in _ALIASES.items():
            if alias in params and name in self.defaults:
                if name in out and out[name] != params[alias]:
                    raise ValueError(
                        f"Both {alias!r} and {name!r} are set ({params[alias]} vs {out[name]}); {alias!r} is an alias "
                        f"of {name!r}: keep one."
                    )
                out[name] = _CHECKS[name](alias, params[alias])  # checked under the name the user wrote
        return out

    def resolve(self, params: dict[str, Any] | None, models: Sequence[dict[str, Any] | None] = ()) -> ResolvedParams:
        """Check and complete the top-level and per-model parameters; anything unknown is refused in one sentence.

        Args:
            params: The top-level ``parameters:`` block (global and per-model names; the latter apply to every
                model that does not set its own).
            models: Each ingredient's own ``parameters:`` block (per-model names only), in order.

        Returns:
            The resolved global and per-model parameters.
        """
        top = self._canonical(dict(params or {}))
        for key in top:
            if key not in self.defaults and key not in self.model_defaults:
                raise self._unknown(key, "")
        own = [self._canonical(dict(m or {})) for m in models]
        for block in own:
            for key in block:
                if key in self.defaults:
                    raise ValueError(
                        f"{key!r} is a global parameter of {self.name!r}: set it in the top-level `parameters:` block, "
                        "not under a model."
                    )
                if key not in self.model_defaults:
                    raise self._unknown(key, "per-model ")
        glob = {k: _CHECKS[k](k, top.get(k, v)) for k, v in self.defaults.items()}
        shared = {k: _CHECKS[k](k, top.get(k, v)) for k, v in self.model_defaults.items()}
        per_model = [{k: _CHECKS[k](k, block.get(k, v)) for k, v in shared.items()} for block in own]
        if self.random and glob.get("seed") is None:
            glob["seed"] = secrets.randbelow(2**31)  # drawn once, so every pass of this merge uses the same masks
        return ResolvedParams(glob, per_model)

    def __call__(
        self,
        base: torch.Tensor,
        deltas: Sequence[torch.Tensor],
        models: Sequence[dict[str, Any]],
        params: dict[str, Any],
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return self.fn(base, deltas, models, params, generator)


MERGE_METHODS: dict[str, MergeMethod] = {}


def register(name: str, pretty_name: str, reference_url: str, **meta: Any) -> Callable[[MergeFn], MergeFn]:
    """Decorator adding ``fn`` to :data:`MERGE_METHODS` under ``name`` (``meta``: the other fields)."""

    def wrap(fn: MergeFn) -> MergeFn:
        if name in MERGE_METHODS:
            raise ValueError(f"Merge method {name!r} is already registered.")
        MERGE_METHODS[name] = MergeMethod(name, pretty_name, reference_url, fn, **meta)
        return fn

    return wrap


def get_method(name: str) -> MergeMethod:
    """Return a registered method; an unknown name is refused with the closest valid names."""
    if name in MERGE_METHODS:
        return MERGE_METHODS[name]
    close = difflib.get_close_matches(name, list(MERGE_METHODS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown merge method {name!r}: use one of {sorted(MERGE_METHODS)}.{hint}")


def _column(models: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [m[key] for m in models]


@register(
    "uniform_soup", "Uniform model soup", "https://arxiv.org/abs/2203.05482", scaling_param=None,
    summary="theta = mean_i theta_i (no parameters; use linear for weights).",
)  # fmt: skip
def _uniform_soup(base: torch.Tensor, deltas: Sequence[torch.Tensor], *_: Any) -> torch.Tensor:
    return ops.uniform_soup(deltas)


@register(
    "greedy_soup", "Greedy model soup", "https://arxiv.org/abs/2203.05482", needs_eval=True, scaling_param=None,
    summary="uniform soup of the ingredients kept greedily: ranked by their own validation score, each is added "
    "only when the soup's score strictly improves (needs `eval:`).",
)  # fmt: skip
def _greedy_soup(base: torch.Tensor, deltas: Sequence[torch.Tensor], *_: Any) -> torch.Tensor:
    # The engine picks the ingredients on validation data; the chosen ones are averaged.
    return ops.uniform_soup(deltas)


@register(
    "linear", "Linear merge (weighted average, mergekit)", "https://arxiv.org/abs/2203.05482", scaling_param=None,
    defaults={"normalize": True}, model_defaults={"weight": 1.0},
    summary="theta = sum_i w_i theta_i / sum_i w_i (normalize: true) or sum_i w_i theta_i (false); a mergekit "
    "recipe's base_model is one more ingredient and needs a weight (without base_model the first model is the "
    "reference).",
)  # fmt: skip
def _linear(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], models: Sequence[dict[str, Any]], params: dict[str, Any], _: Any
) -> torch.Tensor:
    return ops.linear(base, deltas, _column(models, "weight"), params["normalize"])


_KEEP_ALL = {"magnitude": "; density >= 1 keeps all", "breadcrumbs": "; density >= 1 keeps all (scope: tensor)",
             "bernoulli": "; density >= 1 keeps all (no draw)"}  # fmt: skip
_FAMILY_SUMMARY = {
    None: "no pruning",
    "magnitude": "tau_i -> its k = max(1, int(density*n)) largest |entries| per tensor",
    "breadcrumbs": "tau_i -> drop its int(gamma*n) largest |entries| and keep the next int(density*n), per tensor "
    "(scope: tensor, mergekit; fewer dropped at the top when density + gamma > 1) or per row of the last dim "
    "(scope: row, official TaskVectorMiddleKeep)",
    "bernoulli": "tau_i -> keep each entry with probability density (seeded Bernoulli)",
}


class _Cast(Sequence[torch.Tensor]):
    """``[d.to(dtype) for d in deltas]``, converted at each access (a lazy ``deltas`` stays lazy)."""

    def __init__(self, deltas: Sequence[torch.Tensor], dtype: torch.dtype) -> None:
        self._deltas, self._dtype = deltas, dtype

    def __len__(self) -> int:
        return len(self._deltas)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]  # type: ignore[return-value]
        return self._deltas[index].to(self._dtype)


def _register_family(
    name: str,
    pretty_name: str,
    url: str,
    sparsifier: ops.Sparsifier | None,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    **meta: Any,
) -> None:
    """Register one member of mergekit's generalized task arithmetic (sparsifier + consensus + defaults)."""
    defaults: dict[str, Any] = {"normalize": normalize, "lambda": 1.0, "int8_mask": False}
    model_defaults: dict[str, Any] = {"weight": 1.0}
    if sparsifier is not None:
        defaults["rescale"] = rescale
        model_defaults["density"] = 1.0
    if sparsifier == "breadcrumbs":
        defaults["scope"] = "tensor"
        model_defaults["gamma"] = 0.01
    if sparsifier == "bernoulli":
        defaults["seed"] = None
    mix = (
        "elect s = +1 where sum_i D_i >= 0 else -1, keep D_i with sign(D_i) == s (pruned entries never), "
        "sum them [/ sum of the agreeing w_i per entry if normalize]"
        if consensus
        else "sum_i D_i [/ sum_i w_i if normalize]"
    )
    summary = (
        f"{_FAMILY_SUMMARY[sparsifier]}{_KEEP_ALL.get(sparsifier, '')}"
        f"{'; if rescale, kept *= sum|tau_i| / sum|kept|' if sparsifier else ''}; D_i = w_i * tau_i; {mix}; "
        f"theta = base + lambda * that. Defaults: normalize {str(normalize).lower()}"
        + (f", rescale {str(rescale).lower()}" if sparsifier else "")
        + "."
    )

    def fn(
        base: torch.Tensor,
        deltas: Sequence[torch.Tensor],
        models: Sequence[dict[str, Any]],
        params: dict[str, Any],
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        work = _Cast(deltas, base.dtype)  # mergekit subtracts in the base's (``dtype``-cast) dtype
        return ops.task_arithmetic_family(
            work, _column(models, "weight"), [m.get("density", 1.0) for m in models],
            [m.get("gamma", 0.01) for m in models], sparsifier, consensus, params["normalize"],
            params.get("rescale", False), params["lambda"], params.get("scope", "tensor"), generator,
        )  # fmt: skip

    register(
        name, pretty_name, url, summary=summary, defaults=defaults, model_defaults=model_defaults,
        random=sparsifier == "bernoulli", **meta,
    )(fn)  # fmt: skip


# mergekit's table (merge_methods/registry.py): sparsifier, sign consensus, default normalize, default rescale.
_TIES_GRID = tuple(round(b, 2) for b in np.arange(0.1, 1.6, 0.1))
_BREADCRUMBS, _DARE = "https://arxiv.org/abs/2312.06795", "https://arxiv.org/abs/2311.03099"
_register_family("task_arithmetic", "Task arithmetic", "https://arxiv.org/abs/2212.04089", None, False, False, False)
_register_family("ties", "TIES-merging", "https://arxiv.org/abs/2306.01708", "magnitude", True, True, False,
                 beta_grid=_TIES_GRID)  # fmt: skip
_register_family("breadcrumbs", "Model Breadcrumbs", _BREADCRUMBS, "breadcrumbs", False, False, False)
_register_family("breadcrumbs_ties", "Model Breadcrumbs + TIES", _BREADCRUMBS, "breadcrumbs", True, False, False)
_register_family("dare_linear", "DARE + task arithmetic", _DARE, "bernoulli", False, False, True)
_register_family("dare_ties", "DARE + TIES", _DARE, "bernoulli", True, False, True)
