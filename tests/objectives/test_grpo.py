"""GRPO with rule rewards (GroupRelativeRewardMixin): group-normalised advantages, the loss's formula, sampling
groups per prompt deterministically, and CLS-RL on the bundled sentiment task."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import make_data, make_trainer

from lightning_ft.errors import UserError
from lightning_ft.objectives import GroupRelativeCausalLM, group_advantages, label_match_reward


def test_advantages_are_normalised_within_each_group() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0]])
    adv = group_advantages(rewards, eps=0.0)
    torch.testing.assert_close(adv[:2].mean(dim=1), torch.zeros(2))
    torch.testing.assert_close(adv[:2].std(dim=1), torch.ones(2))
    torch.testing.assert_close(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]) / torch.tensor(1 / 3).sqrt() / 2)
    assert torch.equal(group_advantages(rewards)[2], torch.zeros(4))  # one reward for the whole group: no signal
    with pytest.raises(ValueError, match="groups of at least 2"):
        group_advantages(torch.ones(3, 1))


def test_label_match_reward_is_the_gold_class_as_first_word() -> None:
    assert label_match_reward(["p"] * 4, [" Positive.", " negative", " it is positive", ""], [" positive"] * 4) == [
        1.0, 0.0, 0.0, 0.0]  # fmt: skip


def _reward_length(prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    return [float(len(c)) for c in completions]


def test_the_loss_equals_the_formula_and_groups_are_sampled_per_prompt(tiny_llama_dir: Path) -> None:
    module = GroupRelativeCausalLM(model=str(tiny_llama_dir), output_dir="", reward=_reward_length, group_size=3,
                                   beta=0.1, max_new_tokens=5, reference="copy")  # fmt: skip
    dm = make_data(tokenizer=str(tiny_llama_dir), batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module.reference_policy.snapshot(module.backbone)
    with torch.no_grad():  # a policy away from the reference, so the KL term is not zero
        for p in module.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts, refs = module._prompts_and_references(batch)
    first = module.sample_groups(prompts)
    assert len(first) == 6 and module.sample_groups(prompts) == first  # seeded by (seed, step, batch, rank)
    terms = module.grpo_terms(batch)
    texts = module.tokenizer.batch_decode(first, skip_special_tokens=True)
    torch.testing.assert_close(terms["rewards"], torch.tensor([float(len(t)) for t in texts]))
    torch.testing.assert_close(terms["advantages"], group_advantages(terms["rewards"].view(2, 3)).view(-1))
    # the loss by hand: -mean_i (1/|o_i|) sum_t [A_i - beta * KL_t] (the ratio is 1 in value)
    total = torch.tensor(0.0)
    for i, completion in enumerate(first):
        ids = torch.tensor([prompts[i // 3] + completion])
        with torch.no_grad():
            logp = module.backbone(ids).logits[0, :-1].log_softmax(-1)
            ref = module.reference_policy.model(ids).logits[0, :-1].log_softmax(-1)
        start = len(prompts[i // 3]) - 1
        pos = torch.arange(start, start + len(completion))
        tok = torch.tensor(completion)
        delta = ref[pos, tok] - logp[pos, tok]
        kl = torch.exp(delta) - delta - 1
        total += (terms["advantages"][i] - 0.1 * kl).mean()
    torch.testing.assert_close(terms["loss"].detach(), -total / 6, rtol=1e-4, atol=1e-5)


def test_bad_arguments_are_refused_in_one_sentence(tiny_llama_dir: Path) -> None:
    for kwargs, message in (({"group_size": 1}, "^group_size=1 must be at least 2"),
                            ({"beta": -1.0}, "^beta=-1.0 must be 0 or positive"),
                            ({"temperature": 0.0}, "temperature=0.0 positive")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            GroupRelativeCausalLM(model=str(tiny_llama_dir), output_dir="", **kwargs)  # type: ignore[arg-type]
    module = GroupRelativeCausalLM(model=str(tiny_llama_dir), output_dir="")
    unmasked = make_data(tokenizer=str(tiny_llama_dir), mask_prompt=False)
    unmasked.setup("fit")
    with pytest.raises(UserError, match="no unlabelled prompt before its labelled response"):
        module.compute_loss(next(iter(unmasked.train_dataloader())))


def _always_positive(prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    return [float(c.strip().lower().startswith("positive")) for c in completions]


@pytest.mark.slow
def test_smollm2_grpo_makes_the_rewarded_answer_likelier(smollm2_dir: Path, tmp_path: Path) -> None:
    """With a rule reward for answering " positive", a few GRPO steps with LoRA raise the held-out probability of that
    answer: the policy gradient moves probability towards the rewarded completions (CLS-RL's mechanism)."""
    L.seed_everything(0)
    lora = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    module = GroupRelativeCausalLM(model=str(smollm2_dir), peft=lora, output_dir="", learning_rate=1e-2,
                                   warmup_steps=0, reward=_always_positive, group_size=8, max_new_tokens=1)  # fmt: skip
    dm = make_data(train_size=16, val_size=12, batch_size=2, control_size=0)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")

    def p_positive() -> float:
        loader = dm._eval_loader("val")
        with torch.no_grad():
            scores = [module(b["input_ids"], b.get("attention_mask")).logits for b in loader]
        from lightning_ft.modules.metrics import option_logprobs

        probs = [option_logprobs(s, b).softmax(-1)[:, 0] for s, b in zip(scores, loader)]
        return float(torch.cat(probs).mean())

    module.eval()
    before = p_positive()
    make_trainer(tmp_path, 6).fit(module, dm)
    module.eval()
    after = p_positive()
    assert after > before + 0.05, (before, after)
