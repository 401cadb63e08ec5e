"""The DPO-family preference objective (PreferenceLossMixin) and its pairs (PreferenceDataModule)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import make_trainer

from lightning_ft.data import PreferenceDataModule
from lightning_ft.errors import UserError
from lightning_ft.objectives import PreferenceCausalLM, preference_loss, sequence_logprobs
from lightning_ft.objectives.preference import pair_halves

LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def _pairs(**kwargs: object) -> PreferenceDataModule:
    opts: dict[str, object] = {"label_options": ["positive", "negative"], "chosen_template": " {chosen}",
                               "rejected_template": " {rejected}", "train_size": 16, "val_size": 8, "test_size": 0,
                               "control_size": 0, "batch_size": 4, "eval_batch_size": 8, "max_length": 48}  # fmt: skip
    opts.update(kwargs)
    return PreferenceDataModule(**opts)  # type: ignore[arg-type]


def test_the_loss_equals_the_formula_on_hand_made_logprobs() -> None:
    pc, pr = torch.tensor([-3.0, -1.0, -7.5]), torch.tensor([-4.0, -0.5, -2.0])
    rc, rr = torch.tensor([-3.5, -1.2, -6.0]), torch.tensor([-3.0, -0.7, -2.5])
    beta = 0.3
    z = beta * ((pc - rc) - (pr - rr))  # by hand: 0.3 * [0.5 + 1.0, 0.2 - 0.2, -1.5 - 0.5] = [0.45, 0.0, -0.6]
    torch.testing.assert_close(z, torch.tensor([0.45, 0.0, -0.6]))
    loss, margin = preference_loss(pc, pr, rc, rr, beta, "sigmoid")
    torch.testing.assert_close(margin, z)
    torch.testing.assert_close(loss, torch.log1p(torch.exp(-z)))
    hinge, _ = preference_loss(pc, pr, rc, rr, beta, "hinge")
    torch.testing.assert_close(hinge, torch.tensor([0.55, 1.0, 1.6]))
    smooth, _ = preference_loss(pc, pr, rc, rr, beta, "sigmoid", label_smoothing=0.1)
    torch.testing.assert_close(smooth, -0.9 * F.logsigmoid(z) - 0.1 * F.logsigmoid(-z))


def test_sequence_logprobs_sum_the_labelled_tokens_only() -> None:
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, -100, 4], [-100, -100, 0]])
    logp = logits.log_softmax(-1)
    expected = torch.stack([logp[0, 0, 1] + logp[0, 2, 4], logp[1, 2, 0]])
    torch.testing.assert_close(sequence_logprobs(logits, targets), expected)


def test_pairs_from_labels_and_the_collated_layout(tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    dm = _pairs(tokenizer=str(tiny_llama_dir))
    dm.setup("fit")
    record = dm._splits["train"][0]
    label = record["label"]
    other = {"positive": "negative", "negative": "positive"}[label]
    batch = next(iter(dm.train_dataloader()))
    assert batch["pair_role"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    first = dm._encoded["train"][0]
    for key, word in (("chosen", label), ("rejected", other)):
        labelled = [t for t in first[key]["labels"] if t != -100]
        assert tok.decode(labelled) == f" {word}"
    chosen, rejected = pair_halves(batch)
    assert chosen.tolist() == [0, 1, 2, 3] and rejected.tolist() == [4, 5, 6, 7]
    with pytest.raises(UserError, match="as many chosen as rejected rows"):
        pair_halves({"pair_role": torch.tensor([0, 0, 1])})
    with pytest.raises(ValueError, match="^PreferenceDataModule renders responses with chosen_template"):
        PreferenceDataModule(response_template=" {label}")


def test_with_identical_policy_and_reference_the_loss_is_log_2(tiny_llama_dir: Path) -> None:
    module = PreferenceCausalLM(model=str(tiny_llama_dir), output_dir="", warmup_steps=0)
    assert module.preference_reference == "copy"
    dm = _pairs(tokenizer=str(tiny_llama_dir))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module.snapshot_reference()
    with torch.no_grad():
        loss = module.compute_loss(batch)
    torch.testing.assert_close(loss, torch.tensor(math.log(2.0)))
    # the reference lives outside the module: not trained, not in the state dict
    assert all(not k.startswith("_reference") for k in module.state_dict())
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in module.backbone.parameters())


def test_the_lora_reference_equals_a_frozen_copy_of_the_base(tiny_llama_dir: Path) -> None:
    lora = PreferenceCausalLM(model=str(tiny_llama_dir), peft=LORA, output_dir="", warmup_steps=0)
    assert lora.preference_reference == "adapter"
    with torch.no_grad():  # a trained-looking adapter: the policy now differs from the base
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    full = PreferenceCausalLM(model=str(tiny_llama_dir), output_dir="", warmup_steps=0, reference="copy")
    full.snapshot_reference()
    dm = _pairs(tokenizer=str(tiny_llama_dir))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    torch.testing.assert_close(lora._reference_logprobs(batch), full._reference_logprobs(batch))
    with torch.no_grad():
        logits, targets, _ = lora.aligned_logits(batch)
    assert not torch.allclose(sequence_logprobs(logits, targets), lora._reference_logprobs(batch))


def test_the_reference_is_the_fit_start_model_after_a_resume(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """setup("fit") copies before the checkpoint is restored: a resumed run's reference is the starting model."""
    L.seed_everything(0)
    first = PreferenceCausalLM(model=str(tiny_llama_dir), output_dir="", learning_rate=1e-2, warmup_steps=0)
    trainer = make_trainer(tmp_path, 3, enable_checkpointing=True)
    trainer.fit(first, _pairs(tokenizer=str(tiny_llama_dir)))
    ckpt = tmp_path / "resume.ckpt"
    trainer.save_checkpoint(ckpt)
    second = PreferenceCausalLM(model=str(tiny_llama_dir), output_dir="", learning_rate=1e-2, warmup_steps=0)
    make_trainer(tmp_path, 4).fit(second, _pairs(tokenizer=str(tiny_llama_dir)), ckpt_path=str(ckpt))
    start = PreferenceCausalLM(model=str(tiny_llama_dir), output_dir="")
    for (name, ref), (_, base) in zip(second.reference_policy.model.named_parameters(), start.backbone.named_parameters()):  # type: ignore[union-attr]
        assert torch.equal(ref.cpu(), base), name


def test_bad_arguments_are_refused_in_one_sentence(tiny_llama_dir: Path) -> None:
    for kwargs, message in (
        ({"beta": 0.0}, "^beta=0.0 must be a positive number"),
        ({"loss_type": "ipo"}, "^loss_type='ipo' is not supported"),
        ({"label_smoothing": 0.1, "loss_type": "hinge"}, "^label_smoothing=0.1 must be in"),
        ({"reference": "previous"}, "^reference='previous' is not supported"),
    ):
        with pytest.raises(ValueError, match=message):
            PreferenceCausalLM(model=str(tiny_llama_dir), output_dir="", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="^reference='adapter' disables the LoRA adapter"):
        PreferenceCausalLM(model=str(tiny_llama_dir), output_dir="", reference="adapter")
    module = PreferenceCausalLM(model=str(tiny_llama_dir), output_dir="")
    plain = {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.ones(2, 4, dtype=torch.long)}
    with pytest.raises(UserError, match="^PreferenceLossMixin trains on preference pairs"):
        module.compute_loss(plain)


@pytest.mark.slow
def test_smollm2_dpo_raises_the_reward_accuracy_on_its_own_pairs(smollm2_dir: Path, tmp_path: Path) -> None:
    """LoRA DPO on review pairs (the label preferred to the other label): the held-out preference loss falls below
    log 2 and the reward accuracy rises from 0 (z = 0 at the start). beta 0.5 rather than the paper's 0.1, so that 8
    steps move the loss clearly (z scales with beta)."""
    L.seed_everything(0)
    module = PreferenceCausalLM(model=str(smollm2_dir), peft=LORA, learning_rate=2e-3, warmup_steps=0, output_dir="",
                                beta=0.5)  # fmt: skip
    dm = _pairs(train_size=24, val_size=16, batch_size=2, eval_batch_size=8, max_length=64)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    loaders = [dm._eval_loader("val")]
    before = module.evaluate(loaders)
    assert before["target_acc"] == 0.0 and before["target_loss"] == pytest.approx(math.log(2.0), abs=1e-5)
    make_trainer(tmp_path, 8).fit(module, dm)
    after = module.evaluate(loaders)
    assert after["target_loss"] < math.log(2.0) - 0.02, after  # measured at beta 0.1: 0.687, reward accuracy 0.875
    assert after["target_acc"] > 0.6, after
