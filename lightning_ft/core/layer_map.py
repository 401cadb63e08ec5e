"""Map every parameter of a transformers model to its block index and kind.

The map is built from ``model.named_parameters()`` with anchored regular
expressions on the parameter name, after stripping peft's wrappers
(``base_model.model.`` prefix, ``.base_layer`` / ``.original_module``
segments and adapter tensors such as ``lora_A.<adapter>.weight``).  It knows
Llama / Mistral / Qwen2, GPT-2 and BERT naming and falls back to a generic
``layers.<i>.`` rule for anything else.  Tied weights are listed once.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch


class ParamKind(str, enum.Enum):
    """The role of a parameter inside a transformer."""

    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_O = "attn_o"
    ATTN_QKV = "attn_qkv"
    MLP_GATE = "mlp_gate"
    MLP_UP = "mlp_up"
    MLP_DOWN = "mlp_down"
    NORM = "norm"
    EMBEDDING = "embedding"
    FINAL_NORM = "final_norm"
    HEAD = "head"
    OTHER = "other"


_ATTENTION_KINDS = frozenset(
    {ParamKind.ATTN_Q, ParamKind.ATTN_K, ParamKind.ATTN_V, ParamKind.ATTN_O, ParamKind.ATTN_QKV}
)
_MLP_KINDS = frozenset({ParamKind.MLP_GATE, ParamKind.MLP_UP, ParamKind.MLP_DOWN})

KIND_GROUPS: dict[str, frozenset[ParamKind]] = {
    "attention": _ATTENTION_KINDS,
    "mlp": _MLP_KINDS,
    "norm": frozenset({ParamKind.NORM, ParamKind.FINAL_NORM}),
    "embedding": frozenset({ParamKind.EMBEDDING}),
    "head": frozenset({ParamKind.HEAD}),
    "matrices": _ATTENTION_KINDS | _MLP_KINDS,
}

# ---------------------------------------------------------------------------
# Name patterns
# ---------------------------------------------------------------------------

_PREFIX = r"^(?:\w+\.)*?"
_LEAF = r"\.(?:weight|bias)$"
_BLOCK = _PREFIX + r"(?:layers|h|layer|blocks)\.(?P<block>\d+)\."
_ATTN = r"(?:self_attn|self_attention|attn|attention)"
_MLP = r"(?:mlp|feed_forward|ffn|block_sparse_moe)(?:\.(?:experts\.\d+|shared_experts?))?"

_BLOCK_RULES: tuple[tuple[str, ParamKind], ...] = (
    (rf"{_ATTN}\.(?:q_proj|query)|attention\.self\.query", ParamKind.ATTN_Q),
    (rf"{_ATTN}\.(?:k_proj|key)|attention\.self\.key", ParamKind.ATTN_K),
    (rf"{_ATTN}\.(?:v_proj|value)|attention\.self\.value", ParamKind.ATTN_V),
    (rf"{_ATTN}\.(?:c_attn|qkv_proj|query_key_value|Wqkv|qkv)", ParamKind.ATTN_QKV),
    (rf"{_ATTN}\.(?:o_proj|c_proj|out_proj|dense|wo)|attention\.output\.dense", ParamKind.ATTN_O),
    (rf"{_MLP}\.(?:gate_proj|w1)", ParamKind.MLP_GATE),
    (
        rf"{_MLP}\.(?:up_proj|gate_up_proj|c_fc|fc1|w3|dense_h_to_4h)|intermediate\.dense",
        ParamKind.MLP_UP,
    ),
    (rf"{_MLP}\.(?:down_proj|c_proj|fc2|w2|dense_4h_to_h)|output\.dense", ParamKind.MLP_DOWN),
    (r"(?:\w+\.)*?(?i:\w*norm\w*|ln_\d+)", ParamKind.NORM),
)

_TOP_RULES: tuple[tuple[str, ParamKind], ...] = (
    (
        _PREFIX
        + r"(?:embed_tokens|wte|wpe|word_embeddings|position_embeddings"
        + r"|token_type_embeddings|embed_positions|embed_in)"
        + _LEAF,
        ParamKind.EMBEDDING,
    ),
    (_PREFIX + r"embeddings\.(?i:layer_?norm|norm)" + _LEAF, ParamKind.EMBEDDING),
    (
        _PREFIX + r"(?:lm_head|classifier|pooler|score|qa_outputs|cls|embed_out)(?:\.\w+)*$",
        ParamKind.HEAD,
    ),
    (
        _PREFIX + r"(?:norm|ln_f|norm_f|final_norm|final_layernorm|final_layer_norm)" + _LEAF,
        ParamKind.FINAL_NORM,
    ),
)

_COMPILED_BLOCK_RULES = tuple((re.compile(f"{_BLOCK}(?:{body}){_LEAF}"), k) for body, k in _BLOCK_RULES)
_COMPILED_TOP_RULES = tuple((re.compile(rx), k) for rx, k in _TOP_RULES)
_GENERIC_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")

_PEFT_PREFIX = re.compile(r"^base_model\.model\.")
_PEFT_WRAPPER_SEGMENT = re.compile(r"\.(?:base_layer|original_module)(?=\.)")
_ADAPTER_TOKENS = (
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
    "modules_to_save",
    "ia3_l",
    "trainable_tokens_delta",
)
_ADAPTER = re.compile(
    r"^(?P<module>.+?)\.(?P<adapter>" + "|".join(_ADAPTER_TOKENS) + r")"
    r"\.(?P<adapter_name>[^.]+)(?P<tail>(?:\.[^.]+)*)$"
)


@dataclass(frozen=True)
class ParamInfo:
    """Where a parameter sits in the transformer and what it does.

    Attributes:
        name: Canonical name in ``model.named_parameters()``.
        base_name: The plain transformers state-dict key for a base weight
            (peft prefix and ``.base_layer`` removed); for an adapter tensor,
            the adapter's own key with the peft prefix removed.
        block: Transformer block index, ``None`` outside blocks.
        kind: The parameter's role.
        adapter: ``None`` for base weights, else the peft adapter attribute
            (``"lora_A"``, ``"lora_B"``, ``"lora_embedding_A"``, ...).
        aliases: Other names sharing this tensor (tied weights).
        shape: The parameter's shape.
        numel: The parameter's element count.
    """

    name: str
    base_name: str
    block: int | None
    kind: ParamKind
    adapter: str | None
    aliases: tuple[str, ...]
    shape: tuple[int, ...]
    numel: int

    @property
    def is_matrix(self) -> bool:
        """Whether this is the 2-D weight of an attention or MLP projection."""
        return self.adapter is None and self.kind in _ATTENTION_KINDS | _MLP_KINDS and len(self.shape) == 2


def _split_peft_name(name: str) -> tuple[str, str, str | None]:
    """Split a parameter name into its base name, the name to classify, and the adapter.

    Args:
        name: A name from ``named_parameters()``, possibly peft-wrapped.

    Returns:
        ``(base_name, match_name, adapter)``: ``match_name`` is the base
        weight name an adapter tensor belongs to (used for kind and block).
    """
    stripped = _PEFT_PREFIX.sub("", name, count=1)
    found = _ADAPTER.match(stripped)
    if found is None:
        base = _PEFT_WRAPPER_SEGMENT.sub("", stripped)
        return base, base, None
    module = _PEFT_WRAPPER_SEGMENT.sub("", found["module"] + ".")[:-1]
    match_name = module + (found["tail"] or ".weight")
    return stripped, match_name, found["adapter"]


def plain_name(name: str) -> str:
    """Return the transformers state-dict key of a possibly peft-wrapped name.

    Args:
        name: A name from ``named_parameters()``.

    Returns:
        The base weight's key, or an adapter tensor's key without peft's prefix.
    """
    return _split_peft_name(name)[0]


def _compile_extra(extra_patterns: Sequence[tuple[str, str]]) -> list[tuple[re.Pattern[str], ParamKind]]:
    """Compile user ``(regex, kind)`` pairs, validating the kinds."""
    return [(re.compile(regex), ParamKind(kind)) for regex, kind in extra_patterns]


def _generic_block(name: str) -> int | None:
    """Return the block index from the generic ``layers.<i>.`` rule, if any."""
    found = _GENERIC_BLOCK.search(name)
    return int(found.group(1)) if found else None


def classify(
    name: str, extra: Sequence[tuple[re.Pattern[str], ParamKind]] = ()
) -> tuple[int | None, ParamKind]:
    """Return ``(block, kind)`` for a plain (unwrapped) parameter name.

    Args:
        name: A transformers state-dict style key.
        extra: Compiled user patterns, tried first (searched in ``name``).

    Returns:
        The block index (``None`` outside blocks) and the kind.
    """
    for regex, kind in extra:
        found = regex.search(name)
        if found:
            block = found.groupdict().get("block")
            return (int(block) if block is not None else _generic_block(name)), kind
    block = _generic_block(name)
    if block is not None:
        for regex, kind in _COMPILED_BLOCK_RULES:
            found = regex.match(name)
            if found:
                return int(found["block"]), kind
        return block, ParamKind.OTHER
    for regex, kind in _COMPILED_TOP_RULES:
        if regex.match(name):
            return None, kind
    return None, ParamKind.OTHER


_QUANTIZED_PARAM_TYPES = frozenset({"Params4bit", "Int8Params"})


def is_quantized_param(param: torch.Tensor) -> bool:
    """Whether ``param`` is a bitsandbytes 4-bit or 8-bit weight (checked by class name, so bitsandbytes need not
    be importable)."""
    return type(param).__name__ in _QUANTIZED_PARAM_TYPES


def keep_4bit_trainable(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns the layers changed.

    On a CPU with AVX512-BF16, bitsandbytes 0.50's ``Linear4bit`` repacks its weight in place the first time it runs
    in eval mode on an input without grad (a validation loop, an evaluation pass), and from then on its output has no
    gradient with respect to its input: every adapter below it silently stops learning. A model that trains
    (QLoRA) keeps the unpacked weight and the training kernel everywhere.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def is_peft_model(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a peft ``PeftModel`` (a LoRA or other adapter wrapper around a transformers model)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(module, PeftModel)


def _logical_shape(param: torch.Tensor) -> tuple[int, ...]:
    """Shape of a parameter, looking through bitsandbytes 4-bit packing."""
    quant_state = getattr(param, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    return tuple(shape) if shape is not None else tuple(param.shape)


def _group_tied(model: torch.nn.Module) -> list[tuple[str, tuple[str, ...], torch.Tensor]]:
    """Group ``named_parameters(remove_duplicate=False)`` by tensor identity."""
    groups: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
        tensors[id(param)] = param
    return [(names[0], tuple(names[1:]), tensors[key]) for key, names in groups.items()]


def _resolve_kinds(kinds: Iterable[ParamKind | str]) -> set[ParamKind]:
    """Expand group names and kind values into a set of kinds."""
    resolved: set[ParamKind] = set()
    for item in kinds:
        if isinstance(item, str) and not isinstance(item, ParamKind) and item in KIND_GROUPS:
            resolved |= KIND_GROUPS[item]
            continue
        try:
            resolved.add(ParamKind(item))
        except ValueError:
            valid = sorted(KIND_GROUPS) + [k.value for k in ParamKind]
            raise ValueError(f"Unknown kind {item!r}; use one of {valid}.") from None
    return resolved


class LayerMap:
    """Parameter name -> :class:`ParamInfo` for one model, tied weights once."""

    def __init__(self, infos: Iterable[ParamInfo]) -> None:
        """Build the map from already classified parameters.

        Args:
            infos: One entry per distinct tensor, in model order.
        """
        self._infos: dict[str, ParamInfo] = {info.name: info for info in infos}
        self._aliases: dict[str, str] = {
            alias: info.name for info in self._infos.values() for alias in info.aliases
        }
        blocks = [info.block for info in self._infos.values() if info.block is not None]
        self.num_blocks: int = max(blocks) + 1 if blocks else 0

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, *, extra_patterns: Sequence[tuple[str, str]] = ()
    ) -> LayerMap:
        """Classify every parameter of ``model``.

        Args:
            model: A transformers model, a peft-wrapped one, or any module.
            extra_patterns: ``(regex, kind value)`` pairs tried before the
                built-in rules. The regex is searched in the unwrapped name
                and may capture the block with ``(?P<block>\\d+)``.

        Returns:
            The layer map.
        """
        extra = _compile_extra(extra_patterns)
        infos = []
        for name, aliases, param in _group_tied(model):
            base_name, match_name, adapter = _split_peft_name(name)
            block, kind = classify(match_name, extra)
            shape = _logical_shape(param)
            infos.append(ParamInfo(name, base_name, block, kind, adapter, aliases, shape, math.prod(shape)))
        return cls(infos)

    def canonical(self, name: str) -> str:
        """Return the canonical name for a canonical name or an alias.

        Raises:
            KeyError: If ``name`` is not a parameter of the mapped model.
        """
        if name in self._infos:
            return name
        if name in self._aliases:
            return self._aliases[name]
        raise KeyError(f"{name!r} is not a parameter of the mapped model.")

    def __getitem__(self, name: str) -> ParamInfo:
        return self._infos[self.canonical(name)]

    def __iter__(self) -> Iterator[ParamInfo]:
        return iter(self._infos.values())

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos or name in self._aliases

    def __repr__(self) -> str:
        return f"LayerMap({len(self)} params, {self.num_blocks} blocks)"

    @property
    def names(self) -> list[str]:
        """Canonical names in model order."""
        return list(self._infos)

    def select(
        self,
        *,
        kinds: Iterable[ParamKind | str] | None = None,
        blocks: Iterable[int] | None = None,
        pattern: str | None = None,
        adapters: bool = False,
    ) -> list[ParamInfo]:
        """Return the parameters matching every given filter.

        Args:
            kinds: Kinds, kind values or group names from :data:`KIND_GROUPS`.
            blocks: Block indices; parameters outside blocks never match.
            pattern: Regex searched in the canonical name.
            adapters: ``False`` skips adapter tensors, ``True`` keeps only them.

        Returns:
            Matching entries in model order.
        """
        kind_set = _resolve_kinds(kinds) if kinds is not None else None
        block_set = set(blocks) if blocks is not None else None
        regex = re.compile(pattern) if pattern is not None else None
        return [
            info
            for info in self._infos.values()
            if (info.adapter is not None) == adapters
            and (kind_set is None or info.kind in kind_set)
            and (block_set is None or info.block in block_set)
            and (regex is None or regex.search(info.name))
        ]

    def by_block(self) -> dict[int, list[ParamInfo]]:
        """Group the in-block parameters (adapters included) by block index."""
        grouped: dict[int, list[ParamInfo]] = {}
        for info in self._infos.values():
            if info.block is not None:
                grouped.setdefault(info.block, []).append(info)
        return dict(sorted(grouped.items()))

    def parameters(
        self, model: torch.nn.Module, infos: Iterable[ParamInfo] | None = None
    ) -> dict[str, torch.nn.Parameter]:
        """Return the live parameters of ``model`` by canonical name.

        Args:
            model: The model this map was built from.
            infos: Entries to fetch; all of them by default.

        Returns:
            Canonical name -> live parameter.
        """
        chosen = self._infos.values() if infos is None else infos
        return {info.name: model.get_parameter(info.name) for info in chosen}

    def summary(self) -> dict[str, int]:
        """Element count per kind value (kinds present only, enum order)."""
        totals = {kind.value: 0 for kind in ParamKind}
        for info in self._infos.values():
            totals[info.kind.value] += info.numel
        return {kind: count for kind, count in totals.items() if count}


def _is_transformer(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a transformers PreTrainedModel or a peft PeftModel."""
    from transformers import PreTrainedModel

    if isinstance(module, PreTrainedModel):
        return True
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is optional
        return False
    return isinstance(module, PeftModel)


def find_transformer(module: torch.nn.Module, attr: str | None = None) -> torch.nn.Module:
    """Return the transformers model (or peft model) inside ``module``.

    Args:
        module: Any ``nn.Module``, e.g. a LightningModule holding the model.
        attr: Dotted attribute path to the model; when omitted, the outermost
            submodule that is a ``PeftModel`` or ``PreTrainedModel`` (a module that builds its
            model lazily is asked to build it first through its ``materialize()`` method).

    Returns:
        The model.

    Raises:
        ValueError: If the attribute path does not exist or nothing is found.
    """
    if attr is not None:
        target: object = module
        for part in attr.split("."):
            if not hasattr(target, part):
                raise ValueError(
                    f"{type(module).__name__} has no attribute path {attr!r}; "
                    "pass `module=` the dotted path to the transformers model."
                )
            target = getattr(target, part)
        if not isinstance(target, torch.nn.Module):
            raise ValueError(
                f"{attr!r} is a {type(target).__name__}, not an nn.Module; "
                "pass `module=` the dotted path to the transformers model."
            )
        return target
    for sub in module.modules():
        if _is_transformer(sub):
            return sub
    materialize = getattr(module, "materialize", None)  # a module that builds its model lazily (in setup)
    if callable(materialize):
        materialize()
        found = next((sub for sub in module.modules() if _is_transformer(sub)), None)
        if found is not None:
            return found
    raise ValueError(
        f"No transformers PreTrainedModel or peft PeftModel found inside {type(module).__name__}; "
        "pass `module=` the dotted attribute path to the model."
    )
