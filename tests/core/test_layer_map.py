"""Tests for lightning_ft.core.layer_map on tiny random models."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable

import peft
import pytest
import torch
import transformers

from lightning_ft.core.layer_map import KIND_GROUPS, LayerMap, ParamInfo, ParamKind, find_transformer

K = ParamKind


def _llama() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config)


def _mistral() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return transformers.MistralForCausalLM(config)


def _qwen2() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return transformers.Qwen2ForCausalLM(config)


def _gpt2() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=128, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def _bert() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


def _lora(model: torch.nn.Module, **kwargs: object) -> peft.PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(r=2, **kwargs))


def _assert_all_mapped(model: torch.nn.Module, layer_map: LayerMap) -> None:
    all_names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    assert all(name in layer_map for name in all_names)
    assert len(layer_map) + sum(len(info.aliases) for info in layer_map) == len(all_names)
    assert len(layer_map) == len(list(model.parameters()))


def _weight_kinds(layer_map: LayerMap) -> Counter[ParamKind]:
    return Counter(info.kind for info in layer_map if info.name.endswith("weight"))


DECODERS: dict[str, Callable[[], transformers.PreTrainedModel]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
}


@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_decoder_models_fully_mapped(arch: str) -> None:
    model = DECODERS[arch]()
    layer_map = LayerMap.from_model(model)
    _assert_all_mapped(model, layer_map)
    assert layer_map.num_blocks == 3
    assert all(info.kind is not K.OTHER for info in layer_map)
    counts = _weight_kinds(layer_map)
    for kind in (K.ATTN_Q, K.ATTN_K, K.ATTN_V, K.ATTN_O, K.MLP_GATE, K.MLP_UP, K.MLP_DOWN):
        assert counts[kind] == 3, kind
    assert counts[K.NORM] == 6
    assert counts[K.EMBEDDING] == 1
    assert counts[K.FINAL_NORM] == 1
    assert counts[K.HEAD] == (0 if arch == "llama" else 1)
    info = layer_map["model.layers.2.self_attn.k_proj.weight"]
    assert (info.block, info.kind, info.adapter, info.base_name) == (2, K.ATTN_K, None, info.name)
    assert layer_map["model.layers.1.mlp.gate_proj.weight"].is_matrix
    assert layer_map["model.layers.1.post_attention_layernorm.weight"].kind is K.NORM
    assert layer_map["model.norm.weight"].block is None


def test_qwen2_biases_follow_their_projection() -> None:
    layer_map = LayerMap.from_model(_qwen2())
    info = layer_map["model.layers.0.self_attn.q_proj.bias"]
    assert (info.block, info.kind, info.is_matrix) == (0, K.ATTN_Q, False)


def test_llama_tied_head_counted_once() -> None:
    model = _llama()
    layer_map = LayerMap.from_model(model)
    embed = layer_map["model.embed_tokens.weight"]
    assert embed.aliases == ("lm_head.weight",)
    assert embed.kind is K.EMBEDDING and embed.block is None
    assert layer_map["lm_head.weight"] is embed
    assert "lm_head.weight" in layer_map and "lm_head.weight" not in layer_map.names
    assert layer_map.summary()[K.EMBEDDING.value] == 128 * 32
    assert K.HEAD.value not in layer_map.summary()
    assert sum(layer_map.summary().values()) == sum(p.numel() for p in model.parameters())


def test_gpt2_kinds() -> None:
    model = _gpt2()
    layer_map = LayerMap.from_model(model)
    _assert_all_mapped(model, layer_map)
    expected = {
        "transformer.wte.weight": (None, K.EMBEDDING),
        "transformer.wpe.weight": (None, K.EMBEDDING),
        "transformer.h.0.ln_1.weight": (0, K.NORM),
        "transformer.h.1.ln_2.bias": (1, K.NORM),
        "transformer.h.1.attn.c_attn.weight": (1, K.ATTN_QKV),
        "transformer.h.0.attn.c_proj.weight": (0, K.ATTN_O),
        "transformer.h.0.mlp.c_fc.bias": (0, K.MLP_UP),
        "transformer.h.1.mlp.c_proj.weight": (1, K.MLP_DOWN),
        "transformer.ln_f.weight": (None, K.FINAL_NORM),
    }
    for name, (block, kind) in expected.items():
        assert (layer_map[name].block, layer_map[name].kind) == (block, kind), name
    assert layer_map["transformer.wte.weight"].aliases == ("lm_head.weight",)
    assert layer_map.num_blocks == 2
    assert layer_map["transformer.h.0.attn.c_attn.weight"].is_matrix


def test_bert_kinds() -> None:
    model = _bert()
    layer_map = LayerMap.from_model(model)
    _assert_all_mapped(model, layer_map)
    expected = {
        "bert.embeddings.word_embeddings.weight": (None, K.EMBEDDING),
        "bert.embeddings.token_type_embeddings.weight": (None, K.EMBEDDING),
        "bert.embeddings.LayerNorm.bias": (None, K.EMBEDDING),
        "bert.encoder.layer.0.attention.self.query.weight": (0, K.ATTN_Q),
        "bert.encoder.layer.0.attention.self.key.bias": (0, K.ATTN_K),
        "bert.encoder.layer.1.attention.self.value.weight": (1, K.ATTN_V),
        "bert.encoder.layer.1.attention.output.dense.weight": (1, K.ATTN_O),
        "bert.encoder.layer.1.attention.output.LayerNorm.weight": (1, K.NORM),
        "bert.encoder.layer.0.intermediate.dense.weight": (0, K.MLP_UP),
        "bert.encoder.layer.0.output.dense.weight": (0, K.MLP_DOWN),
        "bert.encoder.layer.0.output.LayerNorm.bias": (0, K.NORM),
        "bert.pooler.dense.weight": (None, K.HEAD),
        "classifier.weight": (None, K.HEAD),
    }
    for name, (block, kind) in expected.items():
        assert (layer_map[name].block, layer_map[name].kind) == (block, kind), name
    assert all(info.kind is not K.OTHER for info in layer_map)


def _assert_base_weights_match(plain: LayerMap, wrapped: LayerMap) -> None:
    by_base = {info.base_name: info for info in wrapped if info.adapter is None}
    assert set(by_base) == {info.name for info in plain}
    for info in plain:
        other = by_base[info.name]
        assert (other.block, other.kind, other.shape) == (info.block, info.kind, info.shape)


def test_peft_llama_maps_like_plain() -> None:
    plain = LayerMap.from_model(_llama())
    model = _lora(_llama(), target_modules=["q_proj", "v_proj"])
    wrapped = LayerMap.from_model(model)
    _assert_all_mapped(model, wrapped)
    _assert_base_weights_match(plain, wrapped)
    base = wrapped["base_model.model.model.layers.1.self_attn.q_proj.base_layer.weight"]
    assert base.base_name == "model.layers.1.self_attn.q_proj.weight" and base.adapter is None
    assert wrapped["base_model.model.lm_head.weight"].name == "base_model.model.model.embed_tokens.weight"
    lora_b = wrapped["base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"]
    assert (lora_b.block, lora_b.kind, lora_b.adapter) == (1, K.ATTN_V, "lora_B")
    assert lora_b.base_name == "model.layers.1.self_attn.v_proj.lora_B.default.weight"
    assert not lora_b.is_matrix
    adapters = wrapped.select(adapters=True)
    assert len(adapters) == 3 * 2 * 2
    assert Counter(info.adapter for info in adapters) == {"lora_A": 6, "lora_B": 6}
    assert len(wrapped.select()) == len(plain)


def test_peft_gpt2_fused_qkv() -> None:
    plain = LayerMap.from_model(_gpt2())
    wrapped = LayerMap.from_model(_lora(_gpt2(), target_modules=["c_attn"], fan_in_fan_out=True))
    _assert_base_weights_match(plain, wrapped)
    lora_a = wrapped["base_model.model.transformer.h.1.attn.c_attn.lora_A.default.weight"]
    assert (lora_a.block, lora_a.kind, lora_a.adapter) == (1, K.ATTN_QKV, "lora_A")
    bias = wrapped["base_model.model.transformer.h.0.attn.c_attn.base_layer.bias"]
    assert (bias.base_name, bias.kind) == ("transformer.h.0.attn.c_attn.bias", K.ATTN_QKV)


def test_peft_embedding_and_modules_to_save() -> None:
    llama = LayerMap.from_model(_lora(_llama(), target_modules=["embed_tokens"]))
    emb_a = llama["base_model.model.model.embed_tokens.lora_embedding_A.default"]
    assert (emb_a.kind, emb_a.block, emb_a.adapter) == (K.EMBEDDING, None, "lora_embedding_A")
    bert = LayerMap.from_model(_lora(_bert(), task_type="SEQ_CLS", target_modules=["query", "value"]))
    original = bert["base_model.model.classifier.original_module.weight"]
    assert (original.base_name, original.kind, original.adapter) == ("classifier.weight", K.HEAD, None)
    copy = bert["base_model.model.classifier.modules_to_save.default.bias"]
    assert (copy.kind, copy.adapter) == (K.HEAD, "modules_to_save")
    query_a = bert["base_model.model.bert.encoder.layer.1.attention.self.query.lora_A.default.weight"]
    assert (query_a.block, query_a.kind) == (1, K.ATTN_Q)


def test_select_filters() -> None:
    layer_map = LayerMap.from_model(_llama())
    attention = layer_map.select(kinds=["attention"])
    assert {info.kind for info in attention} == {K.ATTN_Q, K.ATTN_K, K.ATTN_V, K.ATTN_O}
    assert len(attention) == 12
    assert len(layer_map.select(kinds=["matrices"])) == 21
    assert all(info.is_matrix for info in layer_map.select(kinds=["matrices"]))
    assert len(layer_map.select(kinds=["mlp"], blocks=[0, 2])) == 6
    assert len(layer_map.select(kinds=[K.ATTN_Q, "mlp_down"])) == 6
    assert {i.kind for i in layer_map.select(kinds=["norm"])} == {K.NORM, K.FINAL_NORM}
    assert {i.kind for i in layer_map.select(kinds=[K.NORM])} == {K.NORM}
    assert len(layer_map.select(blocks=[1])) == 9
    picked = layer_map.select(pattern=r"layers\.1\..*_proj", kinds=["attention"])
    assert [info.name for info in picked] == [f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkvo"]
    assert layer_map.select(adapters=True) == []
    with pytest.raises(ValueError, match="Unknown kind"):
        layer_map.select(kinds=["attn"])
    assert set(KIND_GROUPS["matrices"]) == KIND_GROUPS["attention"] | KIND_GROUPS["mlp"]


def test_by_block_and_parameters() -> None:
    model = _llama()
    layer_map = LayerMap.from_model(model)
    grouped = layer_map.by_block()
    assert list(grouped) == [0, 1, 2]
    assert all(len(infos) == 9 for infos in grouped.values())
    live = layer_map.parameters(model)
    assert list(live) == layer_map.names
    assert live["model.embed_tokens.weight"] is model.lm_head.weight
    some = layer_map.parameters(model, layer_map.select(blocks=[0], kinds=["attention"]))
    assert some["model.layers.0.self_attn.q_proj.weight"] is model.model.layers[0].self_attn.q_proj.weight


class _Mixer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = torch.nn.Linear(4, 4)
        self.extra = torch.nn.Linear(4, 4)


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stack = torch.nn.ModuleList([_Mixer() for _ in range(2)])
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])
        self.readout = torch.nn.Linear(4, 1)


def test_extra_patterns_on_plain_module() -> None:
    toy = _Toy()
    default = LayerMap.from_model(toy)
    assert default["stack.1.mix.weight"].kind is K.OTHER and default["stack.1.mix.weight"].block is None
    assert (default["layers.2.weight"].block, default["layers.2.weight"].kind) == (2, K.OTHER)
    assert default.num_blocks == 3
    layer_map = LayerMap.from_model(
        toy,
        extra_patterns=[(r"^stack\.(?P<block>\d+)\.mix\.weight$", "attn_o"), (r"^readout\.", K.HEAD)],
    )
    mix = layer_map["stack.1.mix.weight"]
    assert (mix.block, mix.kind, mix.is_matrix) == (1, K.ATTN_O, True)
    assert layer_map["stack.1.mix.bias"].kind is K.OTHER
    assert layer_map["readout.bias"].kind is K.HEAD
    with pytest.raises(ValueError):
        LayerMap.from_model(toy, extra_patterns=[("x", "not_a_kind")])


class _LitLike(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.head = torch.nn.Linear(2, 2)
        self.net = net


def test_find_transformer() -> None:
    gpt2 = _gpt2()
    assert find_transformer(_LitLike(gpt2)) is gpt2
    assert find_transformer(gpt2) is gpt2
    wrapped = _lora(_gpt2(), target_modules=["c_attn"], fan_in_fan_out=True)
    outer = _LitLike(wrapped)
    assert find_transformer(outer) is wrapped
    assert find_transformer(outer, "net.base_model.model") is wrapped.base_model.model
    with pytest.raises(ValueError, match="module="):
        find_transformer(_LitLike(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="module="):
        find_transformer(outer, "net.missing")


def test_param_info_is_frozen() -> None:
    info = next(iter(LayerMap.from_model(torch.nn.Linear(2, 3))))
    assert isinstance(info, ParamInfo)
    assert (info.shape, info.numel, info.aliases) == ((3, 2), 6, ())
    with pytest.raises(AttributeError):
        info.block = 1  # type: ignore[misc]
