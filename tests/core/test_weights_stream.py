"""The weight reader and the streaming HF-folder writer: exact bytes, HF shards, nothing mapped, nothing half-written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lightning_ft.core.weights import (
    HFFolderWriter,
    SafetensorsReader,
    TensorSpec,
    save_hf_folder,
    stream_hf_folder,
)


def _mixed() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(6, 5, generator=gen),
        "b.weight": torch.randn(7, 3, generator=gen).to(torch.bfloat16),
        "c.half": torch.randn(4, generator=gen).to(torch.float16),
        "d.ids": torch.arange(9, dtype=torch.int64).view(3, 3),
        "e.mask": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(2.5),
        "g.empty": torch.zeros(0, 4),
    }


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_reader_returns_the_stored_bytes_and_keeps_no_memory_map(tmp_path: Path) -> None:
    state = _mixed()
    save_file(state, str(tmp_path / "model.safetensors"))
    reader = SafetensorsReader(tmp_path)
    got = {key: reader.get(key) for key in state}
    assert {key: (reader.shape(key), reader.dtype(key)) for key in state} == {
        key: (tuple(v.shape), v.dtype) for key, v in state.items()}  # fmt: skip
    if sys.platform.startswith("linux"):  # a mapped file's pages count in the resident set while it is mapped
        assert str(tmp_path / "model.safetensors") not in Path("/proc/self/maps").read_text()
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        for key in state:
            stored = handle.get_tensor(key)
            assert got[key].dtype == stored.dtype and got[key].shape == stored.shape, key
            assert torch.equal(got[key], stored), key


def test_a_folder_over_the_shard_size_is_written_as_hf_shards_with_an_index(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    state = _mixed()
    out = save_hf_folder(state, tiny_llama_dir, tmp_path / "sharded", max_shard_size=100)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in range(1, 4)]  # [a] [b c] [d e f g]
    assert sorted(index["weight_map"]) == sorted(state)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    assert not (out / "model.safetensors").exists() and (out / "config.json").is_file()
    loaded: dict[str, torch.Tensor] = {}
    for shard in shards:  # every shard is a valid safetensors file (contiguous offsets, whole buffer)
        part = load_file(out / shard)
        assert all(index["weight_map"][k] == shard for k in part)
        loaded.update(part)
    read = SafetensorsReader(out)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
        assert torch.equal(read.get(key), value), key
    single = save_hf_folder(state, tiny_llama_dir, tmp_path / "single")
    assert sorted(p.name for p in single.glob("model*")) == ["model.safetensors"]
    assert all(torch.equal(v, state[k]) for k, v in load_file(single / "model.safetensors").items())


def test_a_failed_or_incomplete_stream_leaves_the_previous_folder_byte_identical(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    state = _mixed()
    save_hf_folder(state, tiny_llama_dir, tmp_path / "out")
    before = _tree(tmp_path)
    layout = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
    with (
        pytest.raises(OSError, match="disk full"),
        stream_hf_folder(tiny_llama_dir, tmp_path / "out", layout, overwrite=True, max_shard_size=64) as writer,
    ):
        writer.write("a.weight", state["a.weight"])
        raise OSError("disk full")
    assert _tree(tmp_path) == before
    with (
        pytest.raises(ValueError, match=r"^tensor 'b.weight' of the output layout was never written"),
        stream_hf_folder(tiny_llama_dir, tmp_path / "out", layout, overwrite=True) as writer,
    ):
        writer.write("a.weight", state["a.weight"])
    assert _tree(tmp_path) == before


def test_the_writer_refuses_a_tensor_outside_its_layout(tmp_path: Path) -> None:
    writer = HFFolderWriter(tmp_path, [TensorSpec("w", torch.float32, (2, 3))])
    with pytest.raises(ValueError, match=r"^tensor 'w' is torch.float16 \(2, 3\) but the layout planned torch.float32"):
        writer.write("w", torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"^tensor 'v' is not in the output layout"):
        writer.write("v", torch.zeros(2, 3))
    writer.write("w", torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"^tensor 'w' was written already"):
        writer.write("w", torch.ones(2, 3))
    writer.finish()
    assert torch.equal(load_file(tmp_path / "model.safetensors")["w"], torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"^max_shard_size=0 must be a positive number of bytes"):
        HFFolderWriter(tmp_path, [], max_shard_size=0)
