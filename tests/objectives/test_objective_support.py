"""What the objectives declare (lightning_ft.support) and what backs it: CAFT refuses a quantized backbone when built
(also inside a composed module), a token-weight provider is checked by the DataModule that applies it (also as a task
of a mixture), and the declared quantized/LoRA/bf16-mixed support trains. The FSDP refusal of every objective is
asserted by the conformance matrix (tests/conformance)."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from objective_checks import AllObjectives, make_data, make_trainer, thought_data, thought_records, two_tasks

from lightning_ft.modules import CausalLMModule
from lightning_ft.objectives import (
    CAFTCausalLM,
    MaskedThoughtCausalLM,
    MultiTokenHeadsMixin,
    TaskBalancedCausalLM,
    TokenWeighting,
)
from lightning_ft.support import legacy_refusal

LORA = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
@pytest.mark.parametrize("cls", [CAFTCausalLM, AllObjectives])
def test_caft_refuses_a_quantized_backbone_when_built_in_its_declared_sentence(cls: type, tiny_llama_dir: Path) -> None:
    expected = MultiTokenHeadsMixin.support.refusals["quantized"].format(name=cls.__name__)
    with pytest.raises(ValueError) as err:
        cls(model=str(tiny_llama_dir), quantization="nf4", peft=LORA, output_dir="")
    assert str(err.value) == expected
    assert expected.startswith(f"{cls.__name__} copies a decoder layer of the backbone into each auxiliary head")


def test_a_token_weighted_task_of_a_mixture_is_checked_in_fit(tiny_llama_dir: Path, tmp_path: Path) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    weighted = {"class_path": "lightning_ft.objectives.TokenWeightedDataModule",
                "init_args": {"weighting": {"class_path": "lightning_ft.objectives.SpanWeights"},
                              "dataset": str(thought_records(tmp_path / "t.jsonl")), "label_options": None}}  # fmt: skip
    dm = two_tasks(tasks=[{"label_options": ["positive", "negative"]}, weighted], weights=[1.0, 1.0])
    dm.tokenizer = module.tokenizer
    dm.trainer = types.SimpleNamespace(strategy=FSDPStrategy(), precision="32-true", lightning_module=module)
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    assert str(err.value) == legacy_refusal(TokenWeighting.support, "SpanWeights", "FSDPStrategy")
    assert str(err.value).startswith("SpanWeights does not run under FSDPStrategy")


def _fit(module: Any, dm: Any, root: Path, precision: str) -> dict[str, torch.Tensor]:
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer = make_trainer(root, 2, precision=precision)
    trainer.fit(module, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    return {n: p for n, p in module.named_parameters() if n in before and not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize("name", ["masked_thought", "task_balanced", "token_weights"])
def test_declared_quantized_lora_and_bf16_mixed_support_trains(name: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    common: dict[str, Any] = {"model": str(tiny_llama_dir), "quantization": "nf4", "peft": LORA,
                              "learning_rate": 5e-3, "warmup_steps": 1, "output_dir": ""}  # fmt: skip
    if name == "masked_thought":
        module, dm = MaskedThoughtCausalLM(max_rate=0.5, warmup=0.0, **common), make_data(train_size=8)
    elif name == "task_balanced":
        module, dm = TaskBalancedCausalLM(**common), two_tasks(epoch_size=8, control_size=0)
    else:
        module, dm = CausalLMModule(**common), thought_data(thought_records(tmp_path / "t.jsonl"), train_size=8)
    changed = _fit(module, dm, tmp_path, "bf16-mixed")
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:3]


def test_caft_trains_in_bf16_mixed(tiny_llama_dir: Path, tmp_path: Path) -> None:
    module = CAFTCausalLM(model=str(tiny_llama_dir), heads_output="", heads_coefficient=0.5, learning_rate=5e-3,
                          warmup_steps=1, output_dir="")  # fmt: skip
    changed = _fit(module, make_data(train_size=8, mask_prompt=False), tmp_path, "bf16-mixed")
    assert changed and not any(n.startswith("aux_heads") for n in changed)  # frozen heads in stage finetune
