"""Every objective with LoRA and across a crash: a resumed run equals an uninterrupted one, LoRA trains only the
adapters (CAFT heads stay as loaded), and all mixins compose in one module."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import Crash
from objective_checks import AllObjectives, first_batch, make_data, run_once, thought_data, thought_records, two_tasks

from lightning_ft.modules import CausalLMModule
from lightning_ft.objectives import CAFTCausalLM, MaskedThoughtCausalLM, TaskBalancedCausalLM

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def _setup(name: str, model: Path, tmp: Path) -> tuple[Callable[[], L.LightningModule], Callable[[], Any]]:
    common: dict[str, Any] = dict(model=str(model), learning_rate=5e-3, warmup_steps=2, output_dir="")
    if name == "caft_full":
        return lambda: CAFTCausalLM(heads_output="", heads_coefficient=0.5, **common), lambda: make_data(
            train_size=16, mask_prompt=False
        )
    if name == "caft_lora":
        return (
            lambda: CAFTCausalLM(heads_output="", heads_coefficient=0.5, peft=LORA, **common),
            lambda: make_data(train_size=16, mask_prompt=False),
        )
    if name == "masked_thought_lora":
        return lambda: MaskedThoughtCausalLM(max_rate=0.5, warmup=0.3, peft=LORA, **common), lambda: make_data(
            train_size=16, mask_prompt=False
        )
    if name == "token_weights_lora":
        path = thought_records(tmp / "thoughts.jsonl")
        return lambda: CausalLMModule(peft=LORA, **common), lambda: thought_data(path, train_size=16)
    assert name == "task_balanced_lora"
    return lambda: TaskBalancedCausalLM(peft=LORA, **common), lambda: two_tasks(epoch_size=16)


SETUPS = ["caft_full", "caft_lora", "masked_thought_lora", "token_weights_lora", "task_balanced_lora"]


@pytest.mark.parametrize("name", SETUPS)
def test_resumed_run_equals_uninterrupted_and_lora_trains_only_adapters(
    name: str, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    make_module, make_dm = _setup(name, tiny_llama_dir, tmp_path)
    initial = {n: p.detach().clone() for n, p in make_module().named_parameters()}
    steps, crash = 7, 5  # 4 batches per epoch: the crash and the resume are in the second epoch
    full = run_once(make_module, make_dm, tmp_path / "a", steps)
    with pytest.raises(Crash):
        run_once(make_module, make_dm, tmp_path / "b", steps, crash=crash)
    resumed = run_once(make_module, make_dm, tmp_path / "c", steps, ckpt=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    changed = {n for n, p in full.named_parameters() if not torch.equal(initial[n], p)}
    if name.endswith("lora"):
        assert changed and all("lora_" in n for n in changed), sorted(changed)[:3]
    else:
        assert changed and not any(n.startswith("aux_heads.") for n in changed)


def test_all_mixins_compose(tiny_llama_dir: Path) -> None:
    module = AllObjectives(
        model=str(tiny_llama_dir),
        output_dir="",
        heads_output="",
        max_rate=0.0,
        heads_coefficient=0.0,
        task_balance="token",
    )
    batch = first_batch(module, two_tasks(batch_size=8))
    plain = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    assert torch.equal(module.compute_loss(batch), plain.compute_loss(batch))  # every weight 0: the plain loss
    active = AllObjectives(model=str(tiny_llama_dir), output_dir="", heads_output="", max_rate=0.3, warmup=0.0)
    assert torch.isfinite(active.compute_loss(batch)) and not torch.equal(
        active.compute_loss(batch), plain.compute_loss(batch)
    )
