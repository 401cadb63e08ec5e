"""KaSA (KaSALossMixin / KaSACausalLM): the auxiliary terms equal the paper's formula on a hand case and peft's own
``_get_kasa_loss``; weights 0 give plain KaSA's loss; a backbone without KaSA adapters and bad weights are refused in
one sentence; on SmolLM2 it learns. Resume, DDP, the FSDP2 and quantized refusals and the user's own module are the
conformance matrix's row ``kasa`` (tests/conformance)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import first_batch_loss, make_data, make_trainer

from lightning_ft.errors import UserError
from lightning_ft.modules import CausalLMModule
from lightning_ft.objectives import KaSACausalLM, kasa_terms

KASA = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "kasa_config": {}}


def test_the_terms_equal_the_formula_on_a_hand_case(tiny_llama_dir: Path) -> None:
    module = KaSACausalLM(model=str(tiny_llama_dir), peft=KASA, output_dir="", kasa_beta=0.5, kasa_gamma=0.25)
    layers = [m for m in module.backbone.modules() if getattr(m, "lora_diag", None) is not None]
    assert len(layers) == 4  # q and v of 2 blocks
    with torch.no_grad():
        for layer in layers:
            layer.lora_diag["default"].copy_(torch.tensor([3.0, -4.0]))  # ||sigma||^2 = 25
            a = layer.lora_A["default"].weight  # (2, 32): rows e_0 and 2 e_1, so A A^T = diag(1, 4)
            a.zero_()
            a[0, 0], a[1, 1] = 1.0, 2.0
            b = layer.lora_B["default"].weight  # (out, 2): B^T B = [[1, 1], [1, 2]]
            b.zero_()
            b[0, 0], b[1, 0], b[1, 1] = 1.0, 0.0, 1.0
            b[0, 1] = 1.0
    l2, l3, count = kasa_terms(module.backbone)
    # ||[[0, 1], [1, 1]]||_F = sqrt(3) and ||diag(0, 3)||_F = 3 per layer
    assert count == 4 and l2.item() == pytest.approx(4 * 25) and l3.item() == pytest.approx(4 * (math.sqrt(3) + 3))
    peft_loss = module.backbone.base_model._get_kasa_loss()  # peft's own, with the config's 1e-4 and 1e-3
    assert peft_loss.item() == pytest.approx(1e-4 * 100 + 1e-3 * 4 * (math.sqrt(3) + 3))
    _, batch, _ = first_batch_loss(module, train_size=8, batch_size=4, max_length=24)
    plain = CausalLMModule.compute_loss(module, batch)
    assert module.compute_loss(batch).item() == pytest.approx(plain.item() + 0.5 * 100 + 0.25 * 4 * (math.sqrt(3) + 3))


def test_zero_weights_train_exactly_plain_kasa(tiny_llama_dir: Path, tmp_path: Path) -> None:
    runs = []
    for cls, extra in ((KaSACausalLM, {"kasa_beta": 0.0, "kasa_gamma": 0.0}), (CausalLMModule, {})):
        torch.manual_seed(0)
        module = cls(model=str(tiny_llama_dir), peft=KASA, learning_rate=1e-2, warmup_steps=0, output_dir="", **extra)
        data = make_data(train_size=12, batch_size=4, max_length=24)
        make_trainer(tmp_path / cls.__name__, 3).fit(module, data)
        runs.append({n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad})
    assert runs[0].keys() == runs[1].keys()
    for name, value in runs[0].items():
        assert torch.equal(value, runs[1][name]), name


def test_a_backbone_without_kasa_and_negative_weights_are_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    lora = {k: v for k, v in KASA.items() if k != "kasa_config"}
    module = KaSACausalLM(model=str(tiny_llama_dir), peft=lora, output_dir="")
    with pytest.raises(UserError, match="regularises KaSA adapters, and this backbone has none: set peft"):
        make_trainer(tmp_path, 1).fit(module, make_data(train_size=8, batch_size=4, max_length=24))
    with pytest.raises(ValueError, match=r"kasa_gamma=-1.0 must be zero or positive"):
        KaSACausalLM(model=str(tiny_llama_dir), peft=KASA, output_dir="", kasa_gamma=-1.0)


@pytest.mark.slow
def test_smollm2_kasa_learns_with_trained_singular_values(smollm2_dir: Path, tmp_path: Path) -> None:
    peft = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "kasa_config": {}}
    module = KaSACausalLM(model=str(smollm2_dir), peft=peft, learning_rate=1e-3, warmup_steps=0, output_dir="")
    data, batch, loss_before = first_batch_loss(module, train_size=48, batch_size=4, max_length=40)
    sigma = {n: p.detach().clone() for n, p in module.named_parameters() if "lora_diag" in n}
    make_trainer(tmp_path, 10, gradient_clip_val=1.0).fit(module, data)
    with torch.no_grad():
        loss_after = CausalLMModule.compute_loss(module, batch).item()
    assert len(sigma) == 60 and all(not torch.equal(v, module.get_parameter(n)) for n, v in sigma.items())
    assert loss_after < loss_before - 0.1  # the task loss alone, without the auxiliary terms
