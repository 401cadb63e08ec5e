"""The shape of a Llama-like model, read from its ``config.json`` (no weights are loaded).

:func:`load_shape` accepts a bundled alias (``smollm2-135m``), a local model folder holding ``config.json`` or the
path of a config JSON file (``configs/models/llama-7b.json``). Only the Llama family's layout is modelled (``llama``,
``mistral``, ``qwen2``; SmolLM2 is a ``llama``): per block four attention projections (grouped-query attention with
``num_key_value_heads``), a gated MLP (gate, up, down) and two RMSNorms; an embedding, a final RMSNorm and an LM head
that may be tied to the embedding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_ft.errors import UserError

__all__ = ["LINEAR_KINDS", "SUPPORTED_MODEL_TYPES", "ModelShape", "load_config", "load_shape"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
#: the linear layers of a block, named by their layer-map kind (:class:`lightning_ft.core.layer_map.ParamKind`)
LINEAR_KINDS = ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down")
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know about a Llama-like model.

    Attributes:
        name: Where the config came from (for the report).
        model_type: ``llama``, ``mistral`` or ``qwen2``.
        hidden: Hidden size ``H``.
        intermediate: MLP size ``I``.
        layers: Number of blocks ``N``.
        heads: Attention heads.
        kv_heads: Key/value heads (grouped-query attention).
        head_dim: Size of one head.
        vocab: Vocabulary size ``V``.
        tied: Whether the LM head is the embedding matrix.
        biases: The linear kinds that have a bias (``qwen2``: q, k and v).
    """

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    biases: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "model") -> ModelShape:
        """Read a ``config.json`` mapping.

        Raises:
            UserError: The model type is not Llama-like, or a size is missing or not a positive integer.
        """
        model_type = str(config.get("model_type", "")).lower()
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"--model {name} is a {model_type or 'untyped'!r} model, which the estimate does not model: give a "
                f"Llama-like config (model_type {', '.join(SUPPORTED_MODEL_TYPES)})."
            )
        for key in _REQUIRED:
            if not isinstance(config.get(key), int) or config[key] < 1:
                raise UserError(
                    f"--model {name}: config.json needs {key} as a positive integer, got {config.get(key)!r}."
                )
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        if heads % kv_heads:
            raise UserError(f"--model {name}: num_attention_heads={heads} is not a multiple of "
                            f"num_key_value_heads={kv_heads}: fix config.json.")  # fmt: skip
        return cls(
            name=name, model_type=model_type, hidden=hidden, intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"], heads=heads, kv_heads=int(kv_heads), head_dim=int(head_dim),
            vocab=config["vocab_size"], tied=bool(config.get("tie_word_embeddings", False)), biases=_biases(config),
        )  # fmt: skip

    def matrices(self) -> dict[str, tuple[int, int]]:
        """``(out_features, in_features)`` of each linear layer of a block, by kind."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        shapes = ((q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i))
        return dict(zip(LINEAR_KINDS, shapes))

    def bias_numel(self, kind: str) -> int:
        """Elements of the bias of one linear layer (0 without a bias)."""
        return self.matrices()[kind][0] if kind in self.biases else 0

    @property
    def block_matrix_numel(self) -> int:
        """Elements of a block's weight matrices."""
        return sum(o * i for o, i in self.matrices().values())

    @property
    def block_numel(self) -> int:
        """Elements of one block: matrices, biases and the two norms."""
        return self.block_matrix_numel + sum(self.bias_numel(k) for k in LINEAR_KINDS) + 2 * self.hidden

    @property
    def embed_numel(self) -> int:
        """Elements of the embedding (``V x H``)."""
        return self.vocab * self.hidden

    @property
    def head_numel(self) -> int:
        """Elements of the LM head (0 when tied to the embedding)."""
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def total_numel(self) -> int:
        """Elements of the whole model (tied weights once)."""
        return self.layers * self.block_numel + self.embed_numel + self.head_numel + self.hidden


def _biases(config: dict[str, Any]) -> tuple[str, ...]:
    if config.get("model_type") == "qwen2":  # Qwen2's q, k and v projections always have a bias
        return ("attn_q", "attn_k", "attn_v")
    attention = ("attn_q", "attn_k", "attn_v", "attn_o") if config.get("attention_bias") else ()
    mlp = ("mlp_gate", "mlp_up", "mlp_down") if config.get("mlp_bias") else ()
    return attention + mlp


def load_config(source: str) -> dict[str, Any]:
    """The ``config.json`` mapping of a bundled alias, a model folder or a config file.

    Raises:
        UserError: Nothing readable is found at ``source``.
    """
    from lightning_ft.assets import BUNDLED_MODELS, resolve_model

    path = Path(resolve_model(source)) if source in BUNDLED_MODELS else Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"--model {source} is a folder without config.json: give a model folder that holds one, "
                            "a config JSON file or a bundled alias (smollm2-135m).")  # fmt: skip
        path = path / "config.json"
    elif not path.is_file():
        aliases = ", ".join(sorted(BUNDLED_MODELS))
        raise UserError(f"--model {source} is neither a bundled alias ({aliases}) nor a model folder or config JSON "
                        "file: give one of these (e.g. configs/models/llama-7b.json).")  # fmt: skip
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"--model {source}: {path} is not valid JSON ({err}): give a model's config.json.") from None
    if not isinstance(config, dict):
        raise UserError(f"--model {source}: {path} holds no JSON object: give a model's config.json.")
    return config


def load_shape(source: str) -> ModelShape:
    """The :class:`ModelShape` of a bundled alias, a model folder or a config file (see :func:`load_config`)."""
    return ModelShape.from_config(load_config(source), name=source)
