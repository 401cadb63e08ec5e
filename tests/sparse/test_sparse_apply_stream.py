"""``apply_sparse`` streams: each base tensor is read, patched and written before the next is read, the folder is
byte-identical to the in-memory result, a failure half-way leaves the previous folder, and importing the artifact
module does not import Lightning (``sparse-apply`` and ``decompress`` stay light)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lightning_ft.core.weights import SafetensorsReader, save_hf_folder
from lightning_ft.core.weights.writer import HFFolderWriter
from lightning_ft.sparse import SparseDelta, apply_sparse

_Q = "model.layers.0.self_attn.q_proj.weight"
_DOWN = "model.layers.1.mlp.down_proj.weight"
_NORM = "model.layers.1.input_layernorm.weight"


def _artifacts(base: dict[str, torch.Tensor], root: Path) -> list[Path]:
    """Two deltas on overlapping keys; the second also replaces a norm weight densely."""
    paths = []
    for seed in (5, 6):
        gen = torch.Generator().manual_seed(seed)
        current = {k: base[k].clone() for k in (_Q, _DOWN)}
        selected = {}
        for key, tensor in current.items():
            idx = torch.randperm(tensor.numel(), generator=gen)[:30].sort().values
            tensor.view(-1)[idx] += torch.randn(30, generator=gen)
            selected[key] = idx
        dense = {_NORM: torch.randn(base[_NORM].shape, generator=gen)} if seed == 6 else None
        delta = SparseDelta.from_tensors(current, base, selected, dense=dense)
        paths.append(delta.save(root / f"d{seed}.sparse.safetensors"))
    return paths


def test_streamed_output_is_byte_identical_to_the_in_memory_result(tiny_llama_dir: Path, tmp_path: Path) -> None:
    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    paths = _artifacts(base, tmp_path)
    out = apply_sparse(str(tiny_llama_dir), paths, tmp_path / "out", scales=[1.0, -0.5])
    state = {key: tensor.clone() for key, tensor in base.items()}
    for path, scale in zip(paths, [1.0, -0.5]):
        SparseDelta.load(path).apply_to(state, scale)
    got = load_file(str(out / "model.safetensors"))
    assert list(got) == list(state)
    for key, want in state.items():
        assert got[key].dtype == want.dtype and torch.equal(got[key], want), key
    assert not torch.equal(got[_Q], base[_Q]) and torch.equal(got[_NORM], SparseDelta.load(paths[1]).dense[_NORM])
    reference = save_hf_folder(state, str(tiny_llama_dir), tmp_path / "reference")
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    names = [*(p.name for p in reference.iterdir()), "sparse_apply.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)


def test_each_tensor_is_written_before_the_next_is_read(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The property that bounds memory: never more than one base tensor read and not yet written."""
    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    paths = _artifacts(base, tmp_path)
    events: list[tuple[str, str]] = []
    get, write = SafetensorsReader.get, HFFolderWriter.write

    def logged_get(self: SafetensorsReader, key: str) -> torch.Tensor:
        events.append(("read", key))
        return get(self, key)

    def logged_write(self: HFFolderWriter, key: str, tensor: torch.Tensor) -> None:
        events.append(("write", key))
        write(self, key, tensor)

    monkeypatch.setattr(SafetensorsReader, "get", logged_get)
    monkeypatch.setattr(HFFolderWriter, "write", logged_write)
    apply_sparse(str(tiny_llama_dir), paths, tmp_path / "out")
    assert events == [(kind, key) for key in base for kind in ("read", "write")]


def test_a_failure_half_way_through_the_stream_leaves_the_previous_folder(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    paths = _artifacts(base, tmp_path)
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "model.safetensors").write_bytes(b"old weights")
    (previous / "config.json").write_text("{}")
    written: list[str] = []
    write = HFFolderWriter.write

    def full_after_three(self: HFFolderWriter, key: str, tensor: torch.Tensor) -> None:
        if len(written) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(key)
        write(self, key, tensor)

    monkeypatch.setattr(HFFolderWriter, "write", full_after_three)
    with pytest.raises(OSError, match="No space left on device"):
        apply_sparse(str(tiny_llama_dir), paths, previous, overwrite=True)
    assert len(written) == 3
    assert sorted(p.name for p in previous.iterdir()) == ["config.json", "model.safetensors"]
    assert (previous / "model.safetensors").read_bytes() == b"old weights"
    assert (previous / "config.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_importing_the_artifact_module_does_not_import_lightning() -> None:
    code = "import sys, lightning_ft.sparse.artifact; assert 'lightning' not in sys.modules, 'lightning imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", __import__("lightning_ft.sparse", fromlist=["__all__"]).__all__)
def test_every_public_name_is_importable(name: str) -> None:
    from lightning_ft import sparse

    value: Any = getattr(sparse, name)
    assert getattr(value, "__name__", name) == name
