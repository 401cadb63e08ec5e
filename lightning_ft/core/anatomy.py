"""Model anatomy: where a causal LM keeps its decoder layers, final norm and LM head, and plain copies of layers.

The layer map (:mod:`lightning_ft.core.layer_map`) names parameters; this module finds the modules that methods
which build extra layers (CAFT heads, the Transformer Copilot) copy from or hook into. Both look through peft
wrappers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from lightning_ft.core.layer_map import _split_peft_name, is_quantized_param

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["DecoderParts", "decoder_parts", "input_embeddings", "plain_state"]

_LAYER_ATTRS = ("layers", "h", "blocks")
_NORM_ATTRS = ("norm", "ln_f", "final_layer_norm")


@dataclass(frozen=True)
class DecoderParts:
    """The parts of a causal LM that extra decoder layers are built from.

    Attributes:
        layers: The decoder layers, in order.
        final_norm: The norm applied to the last layer's output before the head (``None`` if the model has none).
        head: The LM head (``get_output_embeddings()``).
        config: The model's ``transformers`` config.
    """

    layers: nn.ModuleList
    final_norm: nn.Module | None
    head: nn.Module
    config: Any


def _unwrapped(backbone: nn.Module) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    from peft import PeftModel

    return cast("PreTrainedModel", backbone.get_base_model() if isinstance(backbone, PeftModel) else backbone)


def input_embeddings(backbone: nn.Module) -> nn.Embedding:
    """The input embedding table of a (peft-wrapped) transformers model."""
    return cast(nn.Embedding, _unwrapped(backbone).get_input_embeddings())


def _child(module: nn.Module, names: tuple[str, ...], kind: type) -> Any:
    return next((getattr(module, n) for n in names if isinstance(getattr(module, n, None), kind)), None)


def decoder_parts(backbone: nn.Module, caller: str) -> DecoderParts:
    """The decoder layers, final norm, LM head and config of a (peft-wrapped) causal LM.

    Args:
        backbone: A Llama/Mistral/Qwen2/GPT-2-style ``AutoModelForCausalLM``, possibly wrapped by peft.
        caller: The class that needs the parts, named in the error.

    Raises:
        ValueError: The model has no ``layers``/``h``/``blocks`` list of 2 or more decoder layers, or no LM head.
    """
    base = _unwrapped(backbone)
    inner = getattr(base, "base_model", base)
    layers = _child(inner, _LAYER_ATTRS, nn.ModuleList)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if layers is None or head is None or len(layers) < 2:
        raise ValueError(
            f"{caller} needs a causal LM with 2 or more decoder layers (`layers`, `h` or `blocks`) and an LM head, "
            f"which {type(base).__name__} does not expose: use a Llama/Mistral/Qwen2/GPT-2-style AutoModelForCausalLM."
        )
    return DecoderParts(layers, _child(inner, _NORM_ATTRS, nn.Module), head, base.config)


def plain_state(module: nn.Module, refusal: str) -> dict[str, torch.Tensor]:
    """A detached copy of ``module``'s state dict with peft wrappers removed and adapter tensors dropped.

    Args:
        module: A layer, possibly holding peft adapters.
        refusal: The error raised for a quantized weight, formatted with its ``name``.

    Raises:
        ValueError: ``refusal``, when a weight is quantized (bitsandbytes); its plain values cannot be copied.
    """
    for name, param in module.named_parameters():
        if is_quantized_param(param):
            raise ValueError(refusal.format(name=name))
    state = {}
    for name, value in module.state_dict().items():
        base, _, adapter = _split_peft_name(name)
        if adapter is None:
            state[base] = value.detach().clone()
    return state
