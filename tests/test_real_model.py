"""Behaviour on the bundled real models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) and real review data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_ft.data import ClassificationDataModule, InstructionDataModule
from lightning_ft.modules import CausalLMModule, SequenceClassificationModule

pytestmark = pytest.mark.slow


def _trainer(tmp_path: Path, steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0,
        default_root_dir=str(tmp_path),
    )


def _reviews(**kwargs: Any) -> InstructionDataModule:
    opts: dict[str, Any] = dict(label_options=["positive", "negative"], val_size=200, test_size=0, control_size=16,
                                batch_size=8, eval_batch_size=25, max_length=96)
    opts.update(kwargs)
    return InstructionDataModule(**opts)


def _eval(module: Any, dm: Any) -> dict[str, float]:
    return module.evaluate(list(dm.val_dataloader()))


def test_lora_on_smollm2_trains_and_reloads_with_peft(smollm2_dir: Path, tmp_path: Path) -> None:
    from peft import AutoPeftModelForCausalLM

    module = CausalLMModule(
        model="smollm2-135m", peft={"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        learning_rate=1e-3, warmup_steps=0, output_dir=str(tmp_path / "adapter"),
    )
    n_trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert n_trainable == 30 * 2 * 8 * (576 + 576) - 30 * 8 * (576 - 192)  # q: 576->576, v: 576->192
    dm = _reviews(val_size=50, control_size=8, batch_size=4)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    before = _eval(module, dm)["target_loss"]
    _trainer(tmp_path, 8).fit(module, dm)
    assert _eval(module, dm)["target_loss"] < before
    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    ids = module.tokenizer("Review: a gripping, lovely film\nSentiment:", return_tensors="pt")["input_ids"]
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, module(ids).logits, rtol=1e-5, atol=1e-5)


def test_nf4_qlora_on_smollm2_trains_on_cpu(smollm2_dir: Path, tmp_path: Path) -> None:
    module = CausalLMModule(
        model="smollm2-135m", quantization="nf4", peft={"r": 4, "target_modules": ["q_proj", "v_proj"]},
        learning_rate=1e-3, warmup_steps=0, output_dir="",
    )
    import bitsandbytes as bnb

    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in module.modules()) == 30 * 7  # every q,k,v,o,gate,up,down
    adapters = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    dm = _reviews(val_size=8, control=None, train_size=64)
    _trainer(tmp_path, 3).fit(module, dm)
    changed = [n for n, p in module.named_parameters() if n in adapters and not torch.equal(adapters[n], p)]
    assert changed and all("lora_" in n for n in changed)


def test_minilm_classification_learns_sentiment(tmp_path: Path) -> None:
    L.seed_everything(0)
    module = SequenceClassificationModule(model="minilm-l6", learning_rate=1e-4, warmup_steps=5, output_dir=str(tmp_path / "clf"))
    dm = ClassificationDataModule(val_size=300, test_size=0, control_size=32, batch_size=16)
    trainer = _trainer(tmp_path, 60)
    trainer.fit(module, dm)
    after = module.evaluate(list(dm.val_dataloader()))
    assert after["target_acc"] > 0.72, after  # majority class is 0.58; the frozen-feature probe reaches ~0.77
    assert 0.0 < after["control_drift"] < 0.5
    from transformers import AutoModelForSequenceClassification

    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf").eval()
    assert reloaded.config.num_labels == 2
