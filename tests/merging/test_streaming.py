"""Merges stream: the folder written tensor by tensor (HF shards above the shard size) equals the in-memory merge
bit for bit, and only one tensor's worth of inputs and outputs is alive at any time."""

from __future__ import annotations

import gc
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_ft.core.weights import SafetensorsReader
from lightning_ft.merging import MergePlan, merge, merge_to_folder
from lightning_ft.merging.cli import main


def _finetune(base: Path, out: Path, seed: int) -> Path:
    shutil.copytree(base, out)
    gen = torch.Generator().manual_seed(seed)
    state = load_file(base / "model.safetensors")
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in state.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    return out


@pytest.fixture(scope="module")
def three(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("stream")
    return [str(_finetune(tiny_llama_dir, root / f"ft{i}", i)) for i in range(3)]


@pytest.mark.parametrize(("method", "params", "lines"), [
    ("ties", {"density": 0.5}, False), ("dare_ties", {"density": 0.5, "seed": 7}, False),
    ("task_arithmetic", {}, True), ("linear", {}, False),
])  # fmt: skip
def test_a_streamed_sharded_merge_equals_the_merge_in_memory(
    tiny_llama_dir: Path, three: list[str], tmp_path: Path, method: str, params: dict, lines: bool
) -> None:
    def plan() -> MergePlan:
        return MergePlan.build(str(tiny_llama_dir), three, method, dict(params), lines=lines,
                               out_dtype=torch.bfloat16 if method == "linear" else None)  # fmt: skip

    beta = 0.5 if lines else None
    expected = merge(plan(), beta).state
    out, report = merge_to_folder(plan(), str(tiny_llama_dir), tmp_path / "sharded", beta, max_shard_size=20_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    assert not (out / "model.safetensors").exists() and (out / "merge_report.md").is_file()
    streamed = SafetensorsReader(out)
    assert sorted(streamed.keys()) == sorted(expected)
    for key, value in expected.items():
        got = streamed.get(key)
        assert got.dtype == value.dtype and torch.equal(got, value), key
    single, _ = merge_to_folder(plan(), str(tiny_llama_dir), tmp_path / "single", beta)
    assert sorted(p.name for p in single.glob("model*")) == ["model.safetensors"]
    whole = load_file(single / "model.safetensors")
    assert all(torch.equal(whole[key], value) for key, value in expected.items())
    if lines:
        assert report["lines"]["alpha"] == pytest.approx(1 / 3)


def _live_tensors() -> int:
    return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())


def test_a_cli_merge_holds_one_tensor_per_input_at_a_time(
    tiny_llama_dir: Path, three: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At every read, the tensors read before are gone but the current tensor's; at reads late in the merge
    (counting every live tensor, which is slow), nothing merged before is held either."""
    keys = sorted(SafetensorsReader(tiny_llama_dir).keys())
    assert len(keys) >= 20  # so that holding the merged outputs would show
    late = set(keys[-6::2])
    reads: list[weakref.ref] = []
    held: list[int] = []
    alive: list[int] = []
    read = SafetensorsReader.get

    def counting(self: SafetensorsReader, key: str) -> torch.Tensor:
        held.append(sum(ref() is not None for ref in reads))
        if key in late and str(self.path) == str(tiny_llama_dir):
            alive.append(_live_tensors())
        tensor = read(self, key)
        reads.append(weakref.ref(tensor))
        return tensor

    gc.collect()
    before = _live_tensors()
    monkeypatch.setattr(SafetensorsReader, "get", counting)
    main(["merge", "--base", str(tiny_llama_dir), "--models", *three, "--method", "ties", "--param", "density=0.5",
          "--output", str(tmp_path / "out")])  # fmt: skip
    # the base once per tensor; each ingredient twice (its mask, the merge; a full model touches every tensor
    # without a read): the task vectors are read again rather than held while a mask is sorted
    assert len(held) == len(keys) * (1 + 2 * len(three)) and len(alive) == 3
    assert max(held) <= len(three)  # the base tensor and the ingredients' tensors of the current key, at most
    assert max(alive) - before <= 1 + len(three) + 2  # those (+ the method's locals), never the merged outputs
