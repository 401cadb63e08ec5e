"""Intruder dimensions: the similarity against an SVD oracle, a planted case, the callback's logging, history,
resume and refusals, and peft's mitigation through ``lightning-ft mitigate-intruders``."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import make_data, make_trainer

from lightning_ft.modules import CausalLMModule
from lightning_ft.monitors import IntruderDimensions, intruder_similarities


def test_similarities_equal_an_svd_oracle() -> None:
    g = torch.Generator().manual_seed(0)
    base, current = torch.randn(24, 16, generator=g), torch.randn(24, 16, generator=g)
    u0 = np.linalg.svd(base.double().numpy(), full_matrices=False)[0]
    u = np.linalg.svd(current.double().numpy(), full_matrices=False)[0][:, :5]
    expected = np.abs(u.T @ u0).max(axis=1)
    np.testing.assert_allclose(intruder_similarities(base, current, 5).numpy(), expected, atol=1e-5)
    assert torch.allclose(intruder_similarities(base, base, 5), torch.ones(5), atol=1e-5)


def test_a_planted_rank_one_update_is_exactly_one_intruder_and_small_noise_none() -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 48, generator=g)
    u0 = torch.linalg.svd(base, full_matrices=False).U
    direction = torch.randn(64, generator=g)
    direction -= u0 @ (u0.T @ direction)  # orthogonal to every pretrained left singular vector
    direction /= direction.norm()
    planted = base + 40.0 * torch.outer(direction, torch.randn(48, generator=g) / 48**0.5)
    sims = intruder_similarities(base, planted, 10)
    assert int((sims < 0.5).sum()) == 1 and sims[0] < 0.1  # the top direction, tilted a little by the base
    noisy = base + 1e-3 * torch.randn(64, 48, generator=g)
    assert int((intruder_similarities(base, noisy, 10) < 0.5).sum()) == 0


def _lora_module(path: Path) -> CausalLMModule:
    return CausalLMModule(model=str(path), peft={"r": 1, "target_modules": ["q_proj", "v_proj"]}, output_dir="")


def _plant(layer: torch.nn.Module, seed: int) -> None:
    """Set a rank-1 LoRA update along the mean of the base weight's left singular vectors (cosine 1/sqrt(n) with
    each, so at most 0.25 here) and large enough to be the merged weight's top direction: a sure intruder."""
    u0 = torch.linalg.svd(layer.base_layer.weight.detach(), full_matrices=False).U
    direction = u0.sum(dim=1) / u0.shape[1] ** 0.5
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(8 * direction[:, None])
        layer.lora_A["default"].weight.copy_(0.1 * torch.randn(1, layer.in_features, generator=g))


def test_callback_finds_the_planted_adapter_only(tiny_llama_dir: Path) -> None:
    module = _lora_module(tiny_llama_dir)
    callback = IntruderDimensions(top_k=4)
    callback.setup(make_trainer(Path("."), 1), module, "fit")
    assert set(callback.counts().values()) == {0}  # peft starts B at zero: the merged weight is the base weight
    _plant(module.backbone.base_model.model.model.layers[1].self_attn.q_proj, seed=2)
    counts = callback.counts()
    assert counts.pop("model.layers.1.self_attn.q_proj.weight") >= 1 and set(counts.values()) == {0}
    assert len(counts) == 2 * 7 - 1  # every attention and MLP matrix of both blocks is measured, not only LoRA's


def test_fit_logs_counts_keeps_history_writes_json_and_resumes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    def run(root: Path, ckpt: str | None = None) -> IntruderDimensions:
        L.seed_everything(0)
        module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=5e-2, warmup_steps=0, output_dir="")
        callback = IntruderDimensions(top_k=4, every_n_validations=1)
        trainer = make_trainer(root, 6 if ckpt is None else 10, val_check_interval=3, limit_val_batches=1,
                               enable_checkpointing=True, logger=CSVLogger(root, name="csv"),
                               callbacks=[callback, ModelCheckpoint(dirpath=root / "ckpt", save_last=True)])  # fmt: skip
        trainer.fit(module, make_data(), ckpt_path=ckpt)
        return callback

    first = run(tmp_path)
    assert [h["step"] for h in first.history] == [3, 6]
    assert set(first.history[0]["counts"]) == {f"model.layers.{b}.{m}.weight" for b in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj")}  # fmt: skip
    written = json.loads((tmp_path / "intruders.json").read_text())
    assert written["history"] == first.history and written["top_k"] == 4
    logged = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"intruders/total", "intruders/block_00", "intruders/block_01", "intruders/q_proj"} <= set(logged)
    resumed = run(tmp_path, ckpt=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [h["step"] for h in resumed.history] == [3, 6, 9, 10] and resumed.history[:2] == first.history


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=r"top_k=0 must be at least 1"):
        IntruderDimensions(top_k=0)
    with pytest.raises(ValueError, match=r"epsilon=1.5 must be in \(0, 1\]"):
        IntruderDimensions(epsilon=1.5)
    with pytest.raises(ValueError, match=r"every_n_validations=-1 must be 0"):
        IntruderDimensions(every_n_validations=-1)


def _save_adapter(tiny_llama_dir: Path, root: Path, planted: bool) -> Path:
    module = _lora_module(tiny_llama_dir)
    if planted:
        _plant(module.backbone.base_model.model.model.layers[0].self_attn.v_proj, seed=3)
    folder = root / "adapter"
    module.backbone.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tiny_llama_dir)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_mitigate_intruders_shrinks_the_planted_direction(tiny_llama_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lightning_ft.cli import main

    adapter = _save_adapter(tiny_llama_dir, tmp_path, planted=True)
    main(["mitigate-intruders", "--adapter", str(adapter), "--output", str(tmp_path / "out"), "--top-k", "4"])
    assert "intruder dimensions in 1 layers" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "intruders.json").read_text())
    assert list(report["layers_with_intruders"]) == ["base_model.model.model.layers.0.self_attn.v_proj"]

    def delta(folder: Path) -> torch.Tensor:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(folder))
        return model.base_model.model.model.layers[0].self_attn.v_proj.get_delta_weight("default")

    before, after = delta(adapter), delta(tmp_path / "out")
    # the planted update is the intruder: (lambda - 1) of its part along the intruder vector is removed
    assert 0.2 * before.norm() < (before - after).norm() < 0.5 * before.norm()


def test_mitigate_refusals_are_one_sentence(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from lightning_ft.errors import UserError
    from lightning_ft.monitors.mitigate import mitigate

    with pytest.raises(UserError, match=r"--adapter .* holds no adapter_config.json: give a peft LoRA adapter folder"):
        mitigate(tiny_llama_dir, tmp_path / "out")
    adapter = _save_adapter(tiny_llama_dir, tmp_path, planted=False)
    with pytest.raises(UserError, match=r"--lambda 1.5 must be"):
        mitigate(adapter, tmp_path / "out", lam=1.5)
    with pytest.raises(UserError, match=r"--output .* is, holds or sits inside|--output .* the input --adapter"):
        mitigate(adapter, adapter / "inside")
