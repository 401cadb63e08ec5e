"""Building the Copilot decoder: from the Pilot's own lowest layers, from another model of its family, or at random,
and wrapping its layers with LoRA."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from lightning_ft.copilot.decoder import CopilotConfig, CopilotDecoder
from lightning_ft.copilot.settings import CopilotSettings
from lightning_ft.core.anatomy import decoder_parts, input_embeddings, plain_state

__all__ = ["build_copilot", "wrap_copilot_lora"]

_CALLER = "CopilotMixin"
_LORA_DEFAULTS: dict[str, Any] = {
    "r": 16, "lora_alpha": 16, "lora_dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}  # fmt: skip


def build_copilot(backbone: nn.Module, settings: CopilotSettings) -> CopilotDecoder:
    """A Copilot for the Pilot ``backbone`` as ``settings`` say (``copilot_init``, ``copilot_model``,
    ``copilot_layers``, ``copilot_config``, ``zero_init_output``), in the dtype of the Pilot's embeddings."""
    parts = decoder_parts(backbone, _CALLER)
    layers, config = parts.layers, parts.config
    embedding = input_embeddings(backbone).weight
    dtype = embedding.dtype if embedding.dtype.is_floating_point else torch.float32
    n_layers, zero_out = settings.copilot_layers, settings.zero_init_output
    if settings.copilot_init == "random":
        cfg = CopilotConfig(**{"vocab_size": embedding.shape[0], "hidden_size": int(config.hidden_size),
                               "pilot_hidden_size": int(config.hidden_size), "num_layers": n_layers,
                               "num_heads": int(config.num_attention_heads),
                               "num_kv_heads": int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
                               "intermediate_size": int(getattr(config, "intermediate_size", 4 * config.hidden_size)),
                               "head": settings.copilot_head, **(settings.copilot_config or {})})  # fmt: skip
        decoder = CopilotDecoder(cfg, zero_init_output=zero_out)
        with torch.no_grad():
            decoder.embed.copy_(embedding.detach().float())
        return decoder.to(dtype)
    if settings.copilot_model is not None:
        source = settings.copilot_model
        return _copilot_from_model(
            source, n_layers, int(config.hidden_size), embedding.shape[0], zero_out, settings.copilot_head
        ).to(dtype)
    if n_layers > len(layers):
        raise ValueError(f"copilot_layers={n_layers} is more than the Pilot's {len(layers)} decoder layers.")
    states = [_plain_layer_state(layers[i]) for i in range(n_layers)]
    cfg = _config_from(config, n_layers, embedding.shape[0], int(config.hidden_size), states[0], settings.copilot_head)
    decoder = CopilotDecoder(cfg, zero_init_output=zero_out)
    decoder.load_pilot_layers(states)
    with torch.no_grad():
        decoder.embed.copy_(embedding.detach().float())
    return decoder.to(dtype)


def _copilot_from_model(
    source: str, n_layers: int, pilot_hidden: int, vocab: int, zero_out: bool, head: str
) -> CopilotDecoder:
    from transformers import AutoModelForCausalLM

    from lightning_ft.assets import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model(source), dtype=torch.float32)
    parts = decoder_parts(model, _CALLER)
    layers, config = parts.layers, parts.config
    embedding = input_embeddings(model).weight.detach()
    if embedding.shape[0] != vocab:
        raise ValueError(
            f"copilot_model={source!r} has a vocabulary of {embedding.shape[0]}, the Pilot's has {vocab}: use a model "
            "of the Pilot's family (same tokenizer)."
        )
    if n_layers > len(layers):
        raise ValueError(f"copilot_layers={n_layers} is more than copilot_model's {len(layers)} decoder layers.")
    states = [_plain_layer_state(layers[i]) for i in range(n_layers)]
    cfg = _config_from(config, n_layers, vocab, pilot_hidden, states[0], head)
    decoder = CopilotDecoder(cfg, zero_init_output=zero_out)
    decoder.load_pilot_layers(states)
    with torch.no_grad():
        decoder.embed.copy_(embedding)  # the Copilot reads errors through its own model's embeddings
    return decoder


def wrap_copilot_lora(decoder: CopilotDecoder, spec: dict[str, Any]) -> None:
    """Freeze the decoder layers and inject LoRA into them (``spec`` overrides ``r=16, lora_alpha=16`` on every
    attention and MLP projection); the output map and the small input/memory maps stay fully trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    options = {**_LORA_DEFAULTS, **{k: v for k, v in spec.items() if k != "peft_type"}}
    for param in decoder.layers.parameters():
        param.requires_grad_(False)
    decoder.layers = cast(nn.ModuleList, inject_adapter_in_model(LoraConfig(**options), decoder.layers))


def _plain_layer_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    refusal = (
        "CopilotMixin cannot copy the quantized Pilot weight {name!r} into the Copilot: set copilot_model to the "
        "unquantized model (e.g. smollm2-135m) or copilot_init='random'."
    )
    return {k: v.float() for k, v in plain_state(layer, refusal).items()}


def _config_from(
    config: Any, n_layers: int, vocab: int, pilot_hidden: int, state: dict[str, torch.Tensor], head: str
) -> CopilotConfig:
    rope = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get(
        "rope_theta", 10000.0
    )
    heads = int(config.num_attention_heads)
    return CopilotConfig(
        vocab_size=vocab, hidden_size=int(config.hidden_size), pilot_hidden_size=pilot_hidden,
        embed_size=int(config.hidden_size), num_layers=n_layers,
        num_heads=heads, num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        intermediate_size=_intermediate(config, state), rms_norm_eps=float(getattr(config, "rms_norm_eps", 1e-5)),
        rope_theta=float(rope), attention_bias="self_attn.q_proj.bias" in state, head=cast(Any, head),
    )  # fmt: skip


def _intermediate(config: Any, state: dict[str, torch.Tensor]) -> int:
    """The SwiGLU width of the layers to copy (a layer without ``mlp.gate_proj`` is refused by
    :meth:`CopilotDecoder.load_pilot_layers` in one sentence, so the fallback only has to be well defined)."""
    gate = state.get("mlp.gate_proj.weight")
    if gate is not None:
        return int(gate.shape[0])
    return int(getattr(config, "intermediate_size", None) or 4 * int(config.hidden_size))
