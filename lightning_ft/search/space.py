"""The AutoPEFT search space, mapped onto the adapters peft 0.21 has.

AutoPEFT (Zhou et al., TACL 2024, https://arxiv.org/abs/2301.12132) searches, per configuration, which layers carry
adapters (per-layer on/off), the size of a serial adapter after the FFN, the size of a parallel adapter beside the
FFN and the length of a prefix in attention. peft 0.21 has no bottleneck (Houlsby/He) adapter, so the default space
here is its LoRA counterpart (in He et al.'s unified view LoRA is a parallel adapter):

* ``layers``: one on/off choice per decoder layer -> LoRA ``layers_to_transform`` (at least one layer on);
* ``attn_rank``: the LoRA rank of the attention projections (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``);
* ``ffn_rank``: the LoRA rank of the FFN projections (``gate_proj``, ``up_proj``, ``down_proj``), the parallel
  adapter beside the FFN;

with rank 0 meaning no adapter there (``target_modules`` and ``rank_pattern``/``alpha_pattern`` are written so
every rank keeps the base config's ``lora_alpha / r`` scale). A configuration where nothing would train (all layers
off, or every rank 0) is infeasible: the study records it as pruned without running a fit.

The serial adapter has no peft counterpart and is left out. The prefix length is left out of the default space
too: a fit of :class:`~lightning_ft.modules.CausalLMModule` takes one peft config, and peft cannot combine LoRA with
prefix tuning in one model (``PeftMixedModel`` takes LoRA-like tuners only; injecting LoRA with
``inject_adapter_in_model`` and wrapping the result for prefix tuning freezes the LoRA weights and its
``save_pretrained`` drops them, so the exported adapter would not be the trained one). Prefix tuning alone fits
through the module, so a prefix-length search is a space of its own, given in a ``--space`` file::

    peft_type: PREFIX_TUNING
    dimensions:
      - {name: prefix_length, kind: value, key: num_virtual_tokens, choices: [1, 4, 8, 16, 32]}

A space file lists dimensions of three kinds: ``layers`` (per-layer on/off), ``rank`` (a LoRA rank for the named
``modules``, 0 for none) and ``value`` (any peft config ``key`` taking one of ``choices``, e.g. ``lora_dropout``);
``configs/search/lora_space.yaml`` is the default space written out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from lightning_ft.errors import UserError

__all__ = [
    "ATTENTION_MODULES", "DEFAULT_RANKS", "FFN_MODULES", "Dimension", "SearchSpace", "default_space", "load_space",
    "parse_ranks",
]  # fmt: skip

Kind = Literal["layers", "rank", "value"]
KINDS: tuple[str, ...] = ("layers", "rank", "value")
# AutoPEFT's sizes are 0 or the hidden size over a power of two; LoRA ranks of 0 or a power of two up to 64 are the
# same idea at the sizes LoRA is used with
DEFAULT_RANKS = (0, 1, 2, 4, 8, 16, 32, 64)
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")  # Llama, Mistral, Qwen2, SmolLM2
FFN_MODULES = ("gate_proj", "up_proj", "down_proj")
_LORA_KEYS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "layers_to_transform")
_DEFAULT_ALPHA_RATIO = 2.0  # lora_alpha = 2 r when the base config gives neither


class Suggester(Protocol):
    """What a space asks of an optuna trial (``optuna.Trial`` is one)."""

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


@dataclass(frozen=True)
class Dimension:
    """One searched choice.

    Attributes:
        name: Its name (the optuna parameter name; a ``layers`` dimension has one parameter per layer,
            ``<name>_<i>``).
        kind: ``layers`` (per-layer on/off), ``rank`` (a LoRA rank for ``modules``, 0 for none) or ``value`` (the
            peft config ``key`` takes one of ``choices``).
        choices: The values to choose from (``rank`` and ``value``).
        modules: The peft module names a ``rank`` applies to (suffixes of the model's module names).
        key: The peft config key a ``value`` sets.
    """

    name: str
    kind: Kind
    choices: tuple[Any, ...] = ()
    modules: tuple[str, ...] = ()
    key: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The dimension as a plain mapping (a space file's entry)."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.kind != "layers":
            out["choices"] = list(self.choices)
        if self.kind == "rank":
            out["modules"] = list(self.modules)
        if self.kind == "value":
            out["key"] = self.key
        return out


@dataclass(frozen=True)
class SearchSpace:
    """The dimensions of one search, bound to a model's number of decoder layers.

    Attributes:
        dimensions: The searched choices, in order.
        num_layers: The model's decoder layers (a ``layers`` dimension has one on/off choice per layer).
        peft_type: The peft method every trial uses (``LORA`` for ``layers`` and ``rank`` dimensions).
    """

    dimensions: tuple[Dimension, ...]
    num_layers: int
    peft_type: str = "LORA"

    def __post_init__(self) -> None:
        _check_space(self.dimensions, self.peft_type)

    def describe(self) -> dict[str, Any]:
        """The space as a plain mapping (stored with the study, to refuse resuming it with another space)."""
        return {"peft_type": self.peft_type, "num_layers": self.num_layers,
                "dimensions": [d.as_dict() for d in self.dimensions]}  # fmt: skip

    def suggest(self, trial: Suggester) -> dict[str, Any]:
        """Ask ``trial`` for one value of every dimension; returns the optuna parameters."""
        params: dict[str, Any] = {}
        for dim in self.dimensions:
            if dim.kind == "layers":
                for i in range(self.num_layers):
                    params[f"{dim.name}_{i}"] = trial.suggest_categorical(f"{dim.name}_{i}", [True, False])
            else:
                params[dim.name] = trial.suggest_categorical(dim.name, list(dim.choices))
        return params

    def choices(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """One readable value per dimension (a ``layers`` dimension as the list of layers that are on)."""
        return {d.name: self.layers_on(d, params) if d.kind == "layers" else params[d.name] for d in self.dimensions}

    def layers_on(self, dim: Dimension, params: Mapping[str, Any]) -> list[int]:
        """The layers a ``layers`` dimension switches on."""
        return [i for i in range(self.num_layers) if params[f"{dim.name}_{i}"]]

    def infeasible(self, params: Mapping[str, Any]) -> str | None:
        """Why nothing would train with ``params`` (all layers off, every rank 0), or ``None``."""
        for dim in self.dimensions:
            if dim.kind == "layers" and not self.layers_on(dim, params):
                return f"every layer of {dim.name} is off"
        ranks = [params[d.name] for d in self.dimensions if d.kind == "rank"]
        if ranks and not any(ranks):
            return "every rank is 0"
        return None

    def peft(self, params: Mapping[str, Any], base: Mapping[str, Any] | None) -> dict[str, Any]:
        """The peft config mapping of ``params``: the base config's peft with the searched fields set.

        Args:
            params: The trial's optuna parameters (:meth:`suggest`).
            base: The base config's ``peft`` mapping (``None`` when it has none); only used when it is of the
                space's ``peft_type``.
        """
        same = base is not None and str(base.get("peft_type", "LORA")).upper() == self.peft_type
        spec = dict(base) if same else {}  # another method's fields (a LoRA r for prefix tuning) do not carry over
        spec["peft_type"] = self.peft_type
        rank_dims = [d for d in self.dimensions if d.kind == "rank"]
        if rank_dims:
            spec = _with_ranks(spec, {m: int(params[d.name]) for d in rank_dims for m in d.modules})
        for dim in self.dimensions:
            if dim.kind == "layers":
                spec["layers_to_transform"] = self.layers_on(dim, params)
            elif dim.kind == "value":
                spec[str(dim.key)] = params[dim.name]
        return spec


def _with_ranks(base: dict[str, Any], ranks: dict[str, int]) -> dict[str, Any]:
    """``base`` with LoRA on the modules of nonzero rank, each at its rank and at the base config's alpha/r scale."""
    if base.get("r") is None and base.get("lora_alpha") is None:
        ratio = _DEFAULT_ALPHA_RATIO
    else:  # peft's defaults are r=8, lora_alpha=8
        ratio = float(base.get("lora_alpha") or 8) / float(base.get("r") or 8)
    spec = {k: v for k, v in base.items() if k not in _LORA_KEYS or k == "layers_to_transform"}
    on = {m: r for m, r in ranks.items() if r > 0}
    first = next(iter(on.values()))

    def alpha(rank: int) -> float | int:
        value = ratio * rank
        return int(value) if value.is_integer() else value

    spec.update(target_modules=list(on), r=first, lora_alpha=alpha(first),
                rank_pattern={re.escape(m): r for m, r in on.items()},
                alpha_pattern={re.escape(m): alpha(r) for m, r in on.items()})  # fmt: skip
    return spec


def _check_space(dims: Sequence[Dimension], peft_type: str) -> None:
    if not dims:
        raise UserError("the search space has no dimensions: give at least one (see lightning_ft/search/space.py).")
    names = [d.name for d in dims]
    if len(set(names)) != len(names):
        raise UserError(f"the search space names a dimension twice ({', '.join(names)}): give each its own name.")
    lora_only = [d.name for d in dims if d.kind in ("layers", "rank")]
    if lora_only and peft_type != "LORA":
        raise UserError(f"the dimensions {', '.join(lora_only)} are LoRA choices, but the space's peft_type is "
                        f"{peft_type}: use peft_type LORA, or only value dimensions.")  # fmt: skip


def parse_ranks(text: str, option: str = "--ranks") -> tuple[int, ...]:
    """``"0,2,4,8"`` -> ``(0, 2, 4, 8)``; one sentence for anything else.

    Raises:
        UserError: Not a comma-separated list of distinct non-negative integers with one above 0.
    """
    usage = f"{option} takes distinct non-negative integers separated by commas with at least one above 0, e.g. 0,2,4,8"
    try:
        ranks = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"{usage} (got {text!r}).") from None
    if any(r < 0 for r in ranks) or not any(ranks) or len(set(ranks)) != len(ranks):
        raise UserError(f"{usage} (got {text!r}).")
    return ranks


def default_space(num_layers: int, *, ranks: Sequence[int] = DEFAULT_RANKS, layers: bool = True,
                  attention: Sequence[str] = ATTENTION_MODULES, ffn: Sequence[str] = FFN_MODULES) -> SearchSpace:  # fmt: skip
    """AutoPEFT's space in LoRA terms (see the module docstring).

    Args:
        num_layers: The model's decoder layers.
        ranks: The rank choices of the attention and of the FFN projections.
        layers: Search per-layer on/off (otherwise every layer carries the adapters).
        attention: The attention projections' module names.
        ffn: The FFN projections' module names.
    """
    dims = [Dimension("layers", "layers")] if layers else []
    dims += [Dimension("attn_rank", "rank", tuple(ranks), tuple(attention)),
             Dimension("ffn_rank", "rank", tuple(ranks), tuple(ffn))]  # fmt: skip
    return SearchSpace(tuple(dims), num_layers)


def load_space(path: str | Path, num_layers: int, default_peft_type: str = "LORA") -> SearchSpace:
    """Read a space file (see the module docstring).

    Args:
        path: The YAML file.
        num_layers: The model's decoder layers.
        default_peft_type: The peft type when the file names none (the base config's).

    Raises:
        UserError: The file is missing, not YAML, or a dimension is malformed.
    """
    import yaml

    where = f"--space {path}"
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError:
        raise UserError(f"{where} is not a readable file: give a YAML file listing the dimensions.") from None
    except yaml.YAMLError as err:
        raise UserError(f"{where} is not valid YAML ({getattr(err, 'problem', None) or err}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("dimensions"), list):
        raise UserError(f"{where} must be a mapping with a 'dimensions' list (and optionally 'peft_type').")
    dims = tuple(_dimension(entry, f"{where}: dimension {i + 1}") for i, entry in enumerate(data["dimensions"]))
    return SearchSpace(dims, num_layers, str(data.get("peft_type") or default_peft_type).upper())


def _dimension(entry: Any, where: str) -> Dimension:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or entry.get("kind") not in KINDS:
        raise UserError(f"{where} needs a name and a kind (one of {', '.join(KINDS)}).")
    name, kind = entry["name"], entry["kind"]
    if kind == "layers":
        return Dimension(name, "layers")
    choices = entry.get("choices")
    if not isinstance(choices, list) or not choices:
        raise UserError(f"{where} ({name}) needs a non-empty list of choices.")
    if kind == "rank":
        modules = entry.get("modules")
        if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
            raise UserError(
                f"{where} ({name}) needs modules: the peft module names the rank applies to, e.g. [q_proj]."
            )
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in choices):
            raise UserError(f"{where} ({name}): rank choices must be integers (got {choices}).")
        parse_ranks(",".join(str(c) for c in choices), f"{where} ({name}) choices")
        return Dimension(name, "rank", tuple(choices), tuple(modules))
    if not isinstance(entry.get("key"), str):
        raise UserError(f"{where} ({name}) needs key: the peft config field it sets, e.g. lora_dropout.")
    return Dimension(name, "value", tuple(choices), key=entry["key"])
