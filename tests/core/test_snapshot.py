"""Tests for lightning_ft.core.snapshot on a tiny random Llama saved to disk."""

from __future__ import annotations

import gc
import warnings
import weakref
from pathlib import Path

import peft
import pytest
import torch
import transformers

from lightning_ft.core.snapshot import PretrainedSnapshot


def _config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )


def _random_llama() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(_config())


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    _random_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama_sharded")
    _random_llama().save_pretrained(path, max_shard_size="20KB")
    return path


def _load(path: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path)


def _originals(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _perturb(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.5)


def test_auto_picks_disk(saved_dir: Path) -> None:
    model = _load(saved_dir)
    originals = _originals(model)
    snap = PretrainedSnapshot.of(model)
    assert snap.storage == "disk"
    assert snap.source == str(saved_dir)
    assert snap.memory_bytes == 0 and snap.memory_names == []
    assert snap.names == list(originals)
    for name, value in originals.items():
        got = snap.get(name)
        assert got.dtype == value.dtype and torch.equal(got, value)
    assert torch.equal(snap.get("lm_head.weight"), originals["model.embed_tokens.weight"])
    assert snap.get("model.norm.weight", dtype=torch.float16).dtype == torch.float16


def test_delta_and_restore(saved_dir: Path) -> None:
    model = _load(saved_dir)
    originals = _originals(model)
    snap = PretrainedSnapshot.of(model)
    _perturb(model)
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(snap.delta(model, name), torch.full_like(originals[name], 0.5))
    assert torch.allclose(snap.delta(model, "lm_head.weight"), torch.full((128, 32), 0.5))
    snap.restore(model, [name])
    assert torch.equal(model.get_parameter(name), originals[name])
    assert not torch.equal(model.model.norm.weight, originals["model.norm.weight"])
    snap.restore(model)
    for key, value in originals.items():
        assert torch.equal(model.get_parameter(key), value)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_sharded_source(sharded_dir: Path) -> None:
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    model = _load(sharded_dir)
    originals = _originals(model)
    snap = PretrainedSnapshot.of(model, storage="disk")
    assert snap.storage == "disk" and snap.memory_bytes == 0
    for name, value in originals.items():
        assert torch.equal(snap.get(name), value)


def test_peft_reads_base_from_disk(saved_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = peft.get_peft_model(_load(saved_dir), config)
    originals = _originals(model)
    snap = PretrainedSnapshot.of(model)
    assert snap.storage == "disk"
    adapters = {name for name in originals if ".lora_" in name}
    assert set(snap.memory_names) == adapters and len(adapters) == 12
    assert snap.memory_bytes == sum(originals[n].numel() * 4 for n in adapters)
    name = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert snap._disk[name].key == "model.layers.0.self_attn.q_proj.weight"
    for key, value in originals.items():
        assert torch.equal(snap.get(key), value)
    _perturb(model)
    snap.restore(model)
    for key, value in originals.items():
        assert torch.equal(model.get_parameter(key), value)


def test_memory_mode_copies() -> None:
    model = _random_llama()
    originals = _originals(model)
    snap = PretrainedSnapshot.of(model, storage="memory")
    assert snap.storage == "memory" and snap.source is None
    assert snap.memory_bytes == sum(p.numel() * 4 for p in model.parameters())
    _perturb(model)
    name = "model.layers.0.self_attn.o_proj.weight"
    fresh = snap.get(name)
    fresh.zero_()
    assert torch.equal(snap.get(name), originals[name])
    assert torch.allclose(snap.delta(model, name), torch.full_like(fresh, 0.5))
    snap.restore(model)
    assert torch.equal(model.get_parameter(name), originals[name])


def test_auto_without_source_uses_memory() -> None:
    snap = PretrainedSnapshot.of(_random_llama())
    assert snap.storage == "memory" and snap.memory_bytes > 0


def test_of_is_shared_until_released() -> None:
    model = _random_llama()
    first = PretrainedSnapshot.of(model, storage="memory")
    assert PretrainedSnapshot.of(model) is first
    PretrainedSnapshot.release(model)
    assert PretrainedSnapshot.of(model) is not first
    PretrainedSnapshot.release(model)
    PretrainedSnapshot.release(model)


def test_mismatch_at_capture_falls_back_to_memory(saved_dir: Path) -> None:
    model = _load(saved_dir)
    edited = "model.layers.2.mlp.down_proj.weight"
    with torch.no_grad():
        model.get_parameter(edited).mul_(2.0)
    value = model.get_parameter(edited).detach().clone()
    snap = PretrainedSnapshot.of(model)
    assert snap.storage == "disk"
    assert snap.memory_names == [edited]
    assert snap.memory_bytes == value.numel() * 4
    assert torch.equal(snap.get(edited), value)


def test_disk_without_source_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="source"):
        PretrainedSnapshot.of(_random_llama(), storage="disk")
    with pytest.raises(ValueError, match="source"):
        PretrainedSnapshot.of(_random_llama(), storage="disk", source=tmp_path)


def test_explicit_source_for_unsaved_model(saved_dir: Path) -> None:
    model = _random_llama()
    snap = PretrainedSnapshot.of(model, source=saved_dir / "model.safetensors")
    assert snap.storage == "disk" and snap.memory_bytes == 0
    with pytest.raises(KeyError):
        snap.get("not.a.param")


def test_registry_does_not_keep_model_alive() -> None:
    model = _random_llama()
    PretrainedSnapshot.of(model, storage="memory")
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
