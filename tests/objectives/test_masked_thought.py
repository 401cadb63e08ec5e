"""Masked Thought: only response inputs change, labels never; the rate follows p_max * min(1, t / (w T)) during
training; evaluation sees real inputs; p = 0 is the plain loss; one-sentence errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from objective_checks import first_batch, make_data, make_trainer

from lightning_ft.data.collate import IGNORE_INDEX
from lightning_ft.modules import CausalLMModule
from lightning_ft.objectives import MaskedThoughtCausalLM, mask_response_tokens, masked_thought_rate


def test_only_response_inputs_change_and_at_the_given_rate() -> None:
    ids = torch.randint(10, 300, (64, 40))
    labels = ids.clone()
    labels[:, :15] = IGNORE_INDEX  # prompt
    labels[:8, 30:] = IGNORE_INDEX  # padding of short rows
    out = mask_response_tokens(ids, labels, 0.3, torch.Generator().manual_seed(0), vocab_size=320)
    response = labels != IGNORE_INDEX
    assert torch.equal(out[~response], ids[~response])
    changed = (out != ids)[response].float().mean().item()
    assert 0.25 < changed < 0.31  # random ids collide with the original 1/320 of the time
    masked = mask_response_tokens(ids, labels, 0.3, torch.Generator().manual_seed(0), vocab_size=320, mask_token_id=1)
    assert set(masked[masked != ids].tolist()) == {1} and torch.equal(masked[~response], ids[~response])
    assert torch.equal(out, mask_response_tokens(ids, labels, 0.3, torch.Generator().manual_seed(0), vocab_size=320))


def test_rate_schedule() -> None:
    assert masked_thought_rate(0, 90, 0.4, 2 / 3) == 0.0
    assert masked_thought_rate(30, 90, 0.4, 2 / 3) == pytest.approx(0.2)
    assert masked_thought_rate(60, 90, 0.4, 2 / 3) == pytest.approx(0.4)
    assert masked_thought_rate(89, 90, 0.4, 2 / 3) == pytest.approx(0.4)
    assert masked_thought_rate(5, 90, 0.2, 0.0) == 0.2


class _SeenInputs(L.Callback):
    """Records the ids the embedding receives in training and validation, and the rate at each step."""

    def __init__(self) -> None:
        self.train: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.val: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.rates: list[tuple[int, float]] = []
        self._batch: dict[str, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            if pl_module.training:
                self.train.append((self._batch["input_ids"].clone(), self._batch["labels"].clone(), args[0].clone()))
            else:
                self.val.append((self._batch["input_ids"].clone(), args[0].clone()))

        pl_module.backbone.get_input_embeddings().register_forward_pre_hook(hook)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._batch = batch
        self.rates.append((trainer.global_step, pl_module.mask_rate()))

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, *args: Any) -> None:
        self._batch = batch


def test_training_masks_by_schedule_and_evaluation_sees_real_inputs(tiny_llama_dir: Path, tmp_path: Path) -> None:
    module = MaskedThoughtCausalLM(model=str(tiny_llama_dir), max_rate=0.5, warmup=0.5, output_dir="", warmup_steps=0)
    seen = _SeenInputs()
    trainer = make_trainer(tmp_path, 8, callbacks=[seen], limit_val_batches=1, val_check_interval=8)
    trainer.fit(module, make_data(mask_prompt=False, label_options=None))
    assert [r for _, r in seen.rates] == pytest.approx([0.5 * min(1.0, t / 4) for t in range(8)])
    for step, (ids, labels, used) in enumerate(seen.train):
        response = labels != IGNORE_INDEX
        assert torch.equal(used[~response], ids[~response])  # prompt and padding untouched
        if step == 0:
            assert torch.equal(used, ids)  # p_0 = 0
    late = torch.cat([(used != ids)[labels != IGNORE_INDEX].float() for ids, labels, used in seen.train[4:]])
    assert 0.35 < late.mean().item() < 0.6
    assert seen.val and all(torch.equal(ids, used) for ids, used in seen.val)


def test_zero_rate_and_eval_mode_give_the_plain_loss(tiny_llama_dir: Path) -> None:
    plain = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    batch = first_batch(plain)
    zero = MaskedThoughtCausalLM(model=str(tiny_llama_dir), max_rate=0.0, output_dir="")
    assert torch.equal(zero.compute_loss(batch), plain.compute_loss(batch))
    constant = MaskedThoughtCausalLM(model=str(tiny_llama_dir), max_rate=0.9, warmup=0.0, output_dir="")
    assert not torch.equal(constant.compute_loss(batch), plain.compute_loss(batch))
    constant.eval()
    assert torch.equal(constant.compute_loss(batch), plain.eval().compute_loss(batch))  # training only


def test_errors_are_one_sentence(tiny_llama_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"max_rate=1.5 is a probability"):
        MaskedThoughtCausalLM(model=str(tiny_llama_dir), max_rate=1.5)
    with pytest.raises(ValueError, match=r"replacement='drop' is not supported"):
        MaskedThoughtCausalLM(model=str(tiny_llama_dir), replacement="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"replacement='mask' needs a mask token.*set mask_token_id"):
        MaskedThoughtCausalLM(model=str(tiny_llama_dir), replacement="mask")  # the tiny tokenizer has no mask/unk
