r"""
Group-relative policy gradient with rule rewards (GRPO)
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

GRPO (Shao et al., "DeepSeekMath", arXiv 2402.03300) samples a group of :math:`G` completions :math:`o_i` per prompt
with the current policy, scores each with a reward :math:`r_i`, and normalises within the group,
:math:`\hat A_i = (r_i - \mathrm{mean}(r)) / (\mathrm{std}(r) + \epsilon)`. Every completion token then gets the
advantage of its completion and the per-token objective

.. math::

    \frac{1}{G}\sum_i \frac{1}{|o_i|}\sum_t \Big[\frac{\pi_\theta(o_{i,t})}{\pi_\theta(o_{i,t})\big|_\mathrm{no\,grad}}
    \hat A_i - \beta\,\mathbb{D}_\mathrm{KL}\Big],\qquad
    \mathbb{D}_\mathrm{KL} = \frac{\pi_\mathrm{ref}}{\pi_\theta} - \log\frac{\pi_\mathrm{ref}}{\pi_\theta} - 1

(one policy update per generation, so the PPO ratio is 1 with the gradient of :math:`\log\pi_\theta`, as TRL's
``GRPOTrainer`` with one iteration; the clip never binds). CLS-RL (classification with a rule-based reward) is this
objective on a classification task with the reward "the completion names the gold class":
:func:`label_match_reward`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, cast

import torch
from torch import nn
from typing_extensions import override

from lightning_ft.core.host import MixinBase, ModuleHost, require_host
from lightning_ft.data.collate import IGNORE_INDEX, pad_left, pad_right
from lightning_ft.errors import UserError
from lightning_ft.objectives._common import batch_generator, check_fit_support, log_train
from lightning_ft.objectives.preference import Reference, ReferencePolicy
from lightning_ft.support import MethodSupport

__all__ = ["GroupRelativeRewardMixin", "group_advantages", "label_match_reward"]

Reward = Callable[[list[str], list[str], list[str]], Sequence[float]]


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``[P, G]`` rewards -> advantages normalised within each group of ``G`` (mean 0, unbiased std 1, as TRL; a
    group whose rewards are all equal gets 0)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} need groups of at least 2 samples: [prompts, G].")
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def _first_word(text: str) -> str:
    match = re.search(r"[A-Za-z0-9]+", text)
    return match.group(0).lower() if match else ""


def label_match_reward(prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    """CLS-RL's rule reward: 1 when the completion's first word is the gold class (the reference's first word, case
    and punctuation ignored), else 0."""
    return [float(_first_word(c) == _first_word(r) != "") for c, r in zip(completions, references, strict=True)]


class GroupRelativeRewardMixin(MixinBase):
    """GRPO with a rule reward from a Python callable (see the module docstring).

    Mix into :class:`~lightning_ft.modules.CausalLMModule` (ready made as
    :class:`~lightning_ft.objectives.GroupRelativeCausalLM`) and train on ordinary instruction batches
    (:class:`~lightning_ft.data.InstructionDataModule` with prompt masking): each row's unlabelled prefix is the prompt
    and its labelled response the reference handed to the reward. ``G`` completions per prompt are sampled with the
    current weights (the draw depends only on ``seed``, the step, the batch index and the rank, so a resumed run samples
    as an uninterrupted one), rewarded, normalised per group, and trained with the KL to the fit-start model
    (:class:`~lightning_ft.objectives.preference.ReferencePolicy`: adapter-disabled on LoRA, else a frozen copy).
    Validation is the host's (e.g. ``val/target_acc`` on classification). ``train/reward`` and ``train/kl`` are
    logged. Defaults: ``G = 4`` (DeepSeekMath uses 64, TRL 8), ``beta = 0.04`` (DeepSeekMath), temperature 1.

    Args:
        reward: ``module:function`` (or the callable) taking ``(prompts, completions, references)`` and returning one
            float per completion; default :func:`label_match_reward`.
        group_size: ``G``, completions per prompt (at least 2).
        beta: KL coefficient ``beta`` (0 drops the KL term and the reference).
        max_new_tokens: Completion length.
        temperature: Sampling temperature.
        reference: ``auto``, ``copy`` or ``adapter`` (see :class:`~lightning_ft.objectives.PreferenceLossMixin`).
        seed: Seed of the sampling.
        **kwargs: Arguments of the LightningModule it is mixed into.
    """

    backbone: nn.Module
    tokenizer: Any
    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "quantized", "lora", "mixed"}),
        {
            "fsdp2": "{name} samples with generate() inside the training step and keeps an unsharded reference, which "
            "{strategy} does not support: use strategy='ddp'.",
        },
        "Each process samples its own prompts' groups (a group never spans processes).",
    )

    def __init__(
        self,
        *,
        reward: str | Reward = "lightning_ft.objectives.grpo:label_match_reward",
        group_size: int = 4,
        beta: float = 0.04,
        max_new_tokens: int = 8,
        temperature: float = 1.0,
        reference: Reference = "auto",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if group_size < 2:
            raise ValueError(f"group_size={group_size} must be at least 2: advantages are relative within a group.")
        if beta < 0:
            raise ValueError(f"beta={beta} must be 0 or positive (DeepSeekMath uses 0.04).")
        if max_new_tokens < 1 or not temperature > 0:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} must be at least 1 and temperature={temperature} positive."
            )
        super().__init__(**kwargs)
        require_host(self, GroupRelativeRewardMixin, ("backbone", "tokenizer", "aligned_logits"))
        if isinstance(reward, str):
            from lightning_ft.curation.records import import_callable

            reward = cast(Reward, import_callable(reward, "reward=", "be 'package.module:function'"))
        if not callable(reward):
            raise ValueError(
                f"reward={reward!r} is not callable: give a function of (prompts, completions, references)."
            )
        self.grpo_reward: Reward = reward
        self.grpo_group_size, self.grpo_beta = group_size, beta
        self.grpo_max_new_tokens, self.grpo_temperature, self.grpo_seed = max_new_tokens, temperature, seed
        self.reference_policy = ReferencePolicy(ReferencePolicy.resolve(reference, self.backbone))
        self._grpo_batch_idx = 0

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            check_fit_support(self, self.trainer, self.backbone)
            if self.grpo_beta > 0:
                self.reference_policy.snapshot(self.backbone)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        self._grpo_batch_idx = batch_idx
        return super().on_train_batch_start(batch, batch_idx)

    # ------------------------------------------------------------------ sampling
    def _prompts_and_references(self, batch: dict[str, Any]) -> tuple[list[list[int]], list[str]]:
        prompts, references = [], []
        mask = batch.get("attention_mask")
        for i, (ids, labels) in enumerate(zip(batch["input_ids"].tolist(), batch["labels"].tolist())):
            length = int(mask[i].sum()) if mask is not None else len(ids)
            labelled = [j for j in range(length) if labels[j] != IGNORE_INDEX]
            if not labelled or labelled[0] == 0:
                raise UserError(
                    "GroupRelativeRewardMixin samples completions after each row's prompt, and a batch row has no "
                    "unlabelled prompt before its labelled response: use an InstructionDataModule with mask_prompt."
                )
            prompts.append(ids[: labelled[0]])
            references.append(self.tokenizer.decode([ids[j] for j in labelled], skip_special_tokens=True))
        return prompts, references

    @torch.no_grad()
    def sample_groups(self, prompts: list[list[int]]) -> list[list[int]]:
        """``G`` sampled completions (token ids, cut after EOS) per prompt, group by group."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        device = next(self.backbone.parameters()).device
        ids = pad_left(prompts, pad).to(device)
        width = ids.shape[1]
        attention = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            attention[i, width - len(p) :] = 1
        seed = batch_generator(self.grpo_seed, self.global_step, self._grpo_batch_idx, self.global_rank).initial_seed()
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                out = self.backbone.generate(
                    input_ids=ids, attention_mask=attention, do_sample=True, temperature=self.grpo_temperature,
                    top_k=0, top_p=1.0, max_new_tokens=self.grpo_max_new_tokens,
                    num_return_sequences=self.grpo_group_size, pad_token_id=pad,
                )  # fmt: skip
        finally:
            self.backbone.train(was_training)
        eos = self.tokenizer.eos_token_id
        completions = []
        for row in out[:, width:].tolist():
            cut = row.index(eos) + 1 if eos in row else len(row)
            completions.append(row[:cut])
        return completions

    # ------------------------------------------------------------------ loss
    def grpo_terms(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Sample, reward and score one batch: ``loss``, ``rewards [P*G]``, ``advantages [P*G]``, ``kl``."""
        prompts, references = self._prompts_and_references(batch)
        g = self.grpo_group_size
        completions = self.sample_groups(prompts)
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        prompt_texts = [self.tokenizer.decode(p, skip_special_tokens=True) for p in prompts for _ in range(g)]
        refs = [r for r in references for _ in range(g)]
        values = [float(v) for v in self.grpo_reward(prompt_texts, texts, refs)]
        if len(values) != len(texts):
            raise UserError(f"the reward returned {len(values)} values for {len(texts)} completions: return one each.")
        device = batch["input_ids"].device
        rewards = torch.tensor(values, dtype=torch.float32, device=device)
        advantages = group_advantages(rewards.view(-1, g)).view(-1)
        rows = [prompts[i // g] + c for i, c in enumerate(completions)]
        labels = [[IGNORE_INDEX] * len(prompts[i // g]) + c for i, c in enumerate(completions)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        sampled = {"input_ids": pad_right(rows, pad).to(device), "labels": pad_right(labels, IGNORE_INDEX).to(device)}
        sampled["attention_mask"] = (pad_right(rows, -1) != -1).long().to(device)
        host = cast(ModuleHost, self)
        logits, targets, _ = host.aligned_logits(sampled)
        mask = (targets != IGNORE_INDEX).float()
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        per_token = torch.exp(logp - logp.detach()) * advantages[:, None]
        kl = torch.zeros_like(logp)
        if self.grpo_beta > 0:
            ref_logits, _ = self.reference_policy.aligned_logits(self, sampled)
            ref = (
                torch.log_softmax(ref_logits.float(), dim=-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            )
            kl = torch.exp(ref - logp) - (ref - logp) - 1
            per_token = per_token - self.grpo_beta * kl
        lengths = mask.sum(dim=1).clamp_min(1.0)
        loss = -((per_token * mask).sum(dim=1) / lengths).mean()
        mean_kl = ((kl * mask).sum(dim=1) / lengths).mean()
        return {"loss": loss, "rewards": rewards, "advantages": advantages, "kl": mean_kl.detach()}

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The GRPO loss of freshly sampled groups for the batch's prompts."""
        terms = self.grpo_terms(batch)
        n = terms["rewards"].numel()
        log_train(self, "train/reward", terms["rewards"].mean(), n)
        log_train(self, "train/kl", terms["kl"], n)
        return terms["loss"]
