"""ComPEFT never keeps an unchanged entry: on the deltas of real tiny fine-tunes that leave most entries alone
(sparse, layer-frozen, HFT), every entry with ``tau == 0`` decompresses to exactly 0, in both scopes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import make_data, make_trainer
from lightning_ft.callbacks import HalfFineTuning, LayerFreezing, Random, SparseFineTuning
from lightning_ft.merging import compress
from lightning_ft.merging.cli import main
from lightning_ft.modules import CausalLMModule

FITS: dict[str, Any] = {
    "sparse": lambda: SparseFineTuning(rule=Random(), density=0.02),
    "layer_frozen": lambda: LayerFreezing(freeze_bottom=1),
    "hft": lambda: HalfFineTuning(seed=0),
}


@pytest.fixture(scope="module")
def fine_tunes(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three 3-step fine-tunes of the tiny Llama, saved as HF folders."""
    root = tmp_path_factory.mktemp("compeft_fits")
    out = {}
    for name, callback in FITS.items():
        L.seed_everything(0)
        module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=1e-2, warmup_steps=0, output_dir="")
        data = make_data(train_size=12)
        make_trainer(root / name, 3, callbacks=[callback()]).fit(module, data)
        out[name] = module.save_pretrained(root / name / "hf_model")
    return out


def _delta(base: Path, model: Path) -> dict[str, torch.Tensor]:
    b, m = load_file(base / "model.safetensors"), load_file(model / "model.safetensors")
    return {k: m[k].float() - b[k].float() for k in b if b[k].is_floating_point()}


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("kind", list(FITS))
def test_unchanged_entries_decompress_to_exactly_zero(
    kind: str, scope: str, fine_tunes: dict[str, Path], tiny_llama_dir: Path, tmp_path: Path
) -> None:
    tau = _delta(tiny_llama_dir, fine_tunes[kind])
    unchanged = sum(int((t == 0).sum()) for t in tau.values())
    total = sum(t.numel() for t in tau.values())
    assert unchanged > total // 4, f"the {kind} fine-tune should leave many entries alone"
    artifact = tmp_path / "c.safetensors"
    report = compress(tiny_llama_dir, fine_tunes[kind], artifact, density=0.9, scope=scope)  # type: ignore[arg-type]
    assert report.kept <= total - unchanged
    main(["decompress", "--base", str(tiny_llama_dir), "--artifact", str(artifact), "--output", str(tmp_path / "d")])
    restored = _delta(tiny_llama_dir, tmp_path / "d")
    for key, t in tau.items():
        assert torch.equal(restored[key][t == 0], torch.zeros(int((t == 0).sum()))), key
        if scope == "tensor":  # exactly min(floor(density * n), nnz) entries of each tensor come back
            assert int((restored[key] != 0).sum()) == min(int(0.9 * t.numel() + 1e-9), int((t != 0).sum())), key


def _folder(path: Path, state: dict[str, torch.Tensor]) -> Path:
    path.mkdir()
    save_file(state, str(path / "model.safetensors"))
    return path


def test_k_is_at_most_the_nonzero_count_in_both_scopes(tmp_path: Path) -> None:
    base = {"w": torch.zeros(4, 5)}
    tau = torch.zeros(4, 5)
    tau[0, 1], tau[2, 3], tau[3, 4] = 0.5, -2.0, 1.0  # 3 non-zero entries of 20
    _folder(tmp_path / "base", base), _folder(tmp_path / "ft", {"w": tau})
    sigma = float(tau.std())
    for scope in ("global", "tensor"):
        out = tmp_path / f"{scope}.safetensors"
        report = compress(tmp_path / "base", tmp_path / "ft", out, density=0.5, alpha=1.0, scope=scope)  # type: ignore[arg-type]
        assert report.kept == 3  # floor(0.5 * 20) = 10 > 3 non-zero: only those 3
        main(["decompress", "--base", str(tmp_path / "base"), "--artifact", str(out), "--output",
              str(tmp_path / f"{scope}_d")])  # fmt: skip
        restored = load_file(tmp_path / f"{scope}_d" / "model.safetensors")["w"]
        torch.testing.assert_close(restored, sigma * torch.sign(tau), rtol=0, atol=1e-7)
    # Top-k below the non-zero count still keeps exactly floor(density * n) entries (the largest two here).
    report = compress(tmp_path / "base", tmp_path / "ft", tmp_path / "t.safetensors", density=0.1, scope="tensor")
    assert report.kept == 2
