"""Tests for lightning_ft.core.anatomy on tiny random models: the parts found, through peft, and the refusals."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers

from lightning_ft.core.anatomy import decoder_parts, plain_state


def _llama() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2
    )
    return transformers.LlamaForCausalLM(config)


def _gpt2() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2))


def _bert() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    return transformers.BertForMaskedLM(config)


def test_llama_parts_are_the_models_own_modules() -> None:
    model = _llama()
    parts = decoder_parts(model, "SomeMixin")
    assert parts.layers is model.model.layers and len(parts.layers) == 3
    assert parts.final_norm is model.model.norm
    assert parts.head is model.lm_head
    assert parts.config is model.config


def test_gpt2_parts_are_the_models_own_modules() -> None:
    model = _gpt2()
    parts = decoder_parts(model, "SomeMixin")
    assert parts.layers is model.transformer.h
    assert parts.final_norm is model.transformer.ln_f
    assert parts.head is model.lm_head


def test_peft_wrapped_model_gives_the_base_models_parts() -> None:
    model = _llama()
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    parts = decoder_parts(wrapped, "SomeMixin")
    assert parts.layers is model.model.layers
    assert parts.final_norm is model.model.norm
    assert parts.head is model.lm_head
    # the LoRA tensors are dropped and the wrapped names unwrapped: the plain layer's own state dict
    state = plain_state(parts.layers[0], "refused {name}")
    assert set(state) == set(_llama().model.layers[0].state_dict())


@pytest.mark.parametrize("caller", ["MultiTokenHeadsMixin", "CopilotMixin"])
def test_bert_style_model_is_refused_naming_the_caller(caller: str) -> None:
    with pytest.raises(
        ValueError, match=rf"^{caller} needs a causal LM with 2 or more decoder layers.*BertForMaskedLM"
    ):
        decoder_parts(_bert(), caller)


def test_one_layer_model_is_refused() -> None:
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match=r"^CopilotMixin needs a causal LM with 2 or more decoder layers"):
        decoder_parts(model, "CopilotMixin")


def test_plain_state_refuses_a_quantized_weight_with_the_given_sentence() -> None:
    layer = torch.nn.Linear(2, 2)
    quantized = type("Params4bit", (torch.nn.Parameter,), {})
    layer.weight = quantized(layer.weight.detach())
    with pytest.raises(ValueError, match=r"^cannot copy 'weight'\.$"):
        plain_state(layer, "cannot copy {name!r}.")
