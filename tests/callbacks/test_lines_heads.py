"""LiNeS and newly initialised heads: a head absent from the pretrained weights keeps its fine-tuned value
(or is scaled by ``head_scale``) while every block follows ``theta_0 + lambda(l) * (theta - theta_0)``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_ft.callbacks.lines import LiNeS, newly_initialised
from lightning_ft.core.snapshot import PretrainedSnapshot
from lightning_ft.data import ClassificationDataModule
from lightning_ft.merging.ops import lines_factor
from lightning_ft.modules import SequenceClassificationModule
from helpers import make_trainer
from helpers import one_thread  # noqa: F401  (autouse fixture: applies where imported)

_HEAD = ("backbone.classifier.weight", "backbone.classifier.bias")


class _Record(L.Callback):
    """Placed before LiNeS: keeps the fine-tuned weights as they are just before the edit."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.theta = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def _fit_minilm(tmp_path: Path, lines: LiNeS) -> tuple[SequenceClassificationModule, dict[str, torch.Tensor], _Record]:
    L.seed_everything(0)
    module = SequenceClassificationModule(model="minilm-l6", num_labels=2, learning_rate=1e-3, warmup_steps=0,
                                          output_dir="")  # fmt: skip
    theta0 = {n: p.detach().clone() for n, p in module.named_parameters()}  # the head's theta_0: its random init
    dm = ClassificationDataModule(train_size=8, val_size=4, test_size=0, control_size=0, batch_size=4, max_length=16)
    record = _Record()
    make_trainer(tmp_path, 2, callbacks=[record, lines]).fit(module, dm)
    return module, theta0, record


def test_new_classifier_head_keeps_its_fine_tuned_value_and_blocks_follow_the_formula(tmp_path: Path) -> None:
    lines = LiNeS(alpha=0.3)
    module, theta0, record = _fit_minilm(tmp_path, lines)
    assert lines.new_tensors == {"classifier.weight", "classifier.bias"}  # the pooler is in the weights file
    blocks = 0
    for name, param in module.named_parameters():
        assert not torch.equal(record.theta[name], theta0[name]), f"{name} did not train"
        if name in _HEAD:  # no pretrained value: left as fine-tuned, bit for bit
            assert torch.equal(param.detach(), record.theta[name]), name
            continue
        block = int(name.split(".layer.")[1].split(".")[0]) if ".layer." in name else None
        factor = lines_factor(block, 6, 0.3, 0.7)  # embeddings and pooler: alpha
        expected = theta0[name] + factor * (record.theta[name] - theta0[name])
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-7, msg=name)
        blocks += int(block is not None)
    assert blocks == 6 * 16


def test_head_scale_scales_the_new_head_towards_its_init(tmp_path: Path) -> None:
    module, theta0, record = _fit_minilm(tmp_path, LiNeS(alpha=0.3, head_scale=0.5))
    for name in _HEAD:
        expected = theta0[name] + 0.5 * (record.theta[name] - theta0[name])
        torch.testing.assert_close(module.get_parameter(name).detach(), expected, rtol=0, atol=1e-7, msg=name)


def test_lora_modules_to_save_copy_of_the_new_head_is_new_and_adapters_are_not() -> None:
    module = SequenceClassificationModule(model="minilm-l6", num_labels=2, peft={"r": 2, "target_modules": ["query"]})
    new = newly_initialised(module.backbone, PretrainedSnapshot.of(module.backbone))
    assert new == {
        "base_model.model.classifier.original_module.weight", "base_model.model.classifier.original_module.bias",
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    }  # fmt: skip


def test_causal_lm_with_its_weights_file_has_no_new_tensors(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)  # tied lm_head: found through its alias
    assert newly_initialised(model, PretrainedSnapshot.of(model)) == frozenset()


def test_without_a_weights_file_nothing_is_new_and_a_warning_says_so(tiny_llama_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_llama_dir))  # built in code
    with pytest.warns(UserWarning, match="cannot tell newly initialised heads"):
        assert newly_initialised(model, PretrainedSnapshot.of(model, storage="memory")) == frozenset()


def test_callbacks_find_a_classification_model_built_from_the_datamodule(tmp_path: Path) -> None:
    """Without num_labels the module builds its model from the DataModule, which Lightning sets up after the
    callbacks' setup; the callbacks ask it to build first (it used to fail with 'No transformers model found')."""
    module = SequenceClassificationModule(model="minilm-l6", learning_rate=1e-3, warmup_steps=0, output_dir="")
    assert module.backbone is None
    lines = LiNeS(alpha=0.3)
    dm = ClassificationDataModule(train_size=8, val_size=4, test_size=0, control_size=0, batch_size=4, max_length=16)
    make_trainer(tmp_path, 1, callbacks=[lines]).fit(module, dm)
    assert module.backbone.config.num_labels == 2 and lines.new_tensors == {"classifier.weight", "classifier.bias"}
