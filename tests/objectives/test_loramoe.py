"""LoRAMoE (LoRAMoEMixin / LoRAMoECausalLM): the router sums to one; the localized balancing constraint equals the
formula on a hand case and is what the module adds to its loss; one expert is peft's LoRA with the same A and B; only
experts and routers train; the export reloads with identical logits (and merges exactly with one expert); refusals
are one sentence; a user's own LightningModule trains with it; on SmolLM2 the constraint routes each data type to its
own expert group. Resume, DDP, the FSDP2/quantized/LoRA refusals and the mixin on a user's module are the conformance
matrix's row ``loramoe`` (tests/conformance)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import make_trainer, token_batches

from lightning_ft.errors import UserError
from lightning_ft.modules import CausalLMModule
from lightning_ft.objectives.loramoe import (
    LoRAMoECausalLM,
    LoRAMoELinear,
    add_loramoe,
    balance_loss,
    load_loramoe,
    localized_balance_loss,
    loramoe_layers,
    mean_gates,
)

TINY = {"num_experts": 4, "expert_rank": 2, "expert_alpha": 4.0, "expert_dropout": 0.0, "output_dir": ""}


def _randomize_b(model: torch.nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in loramoe_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)


def _batch(n: int = 4, length: int = 10) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 200, (n, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding, left out of Q
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100),
            "task_types": torch.tensor([1, 0, 1, 0][:n])}  # fmt: skip


def test_the_router_sums_to_one_and_the_constraint_equals_the_formula() -> None:
    layer = LoRAMoELinear(torch.nn.Linear(8, 6), num_experts=4, rank=2, alpha=4.0, dropout=0.0)
    gates = layer.route(torch.randn(2, 3, 8))
    assert gates.shape == (2, 3, 4) and torch.allclose(gates.sum(-1), torch.ones(2, 3)) and bool((gates > 0).all())
    assert torch.equal(layer(torch.ones(1, 8)), layer.base_layer(torch.ones(1, 8)))  # B = 0: the base at first
    # 2 samples x 2 tokens x 2 experts; expert 0 is the knowledge group (k = 1); sample 1's last token is padding
    hand = torch.tensor([[[0.75, 0.25], [0.5, 0.5]], [[0.2, 0.8], [0.9, 0.1]]])
    mask, types = torch.tensor([[1, 1], [1, 0]]), torch.tensor([1, 0])
    # Q = [[1.25, 0.75], [0.2, 0.8]]; I = [[1.5, 0.5], [0.5, 1.5]] (delta 0.5): Z = 1.875, 0.375, 0.1, 1.2
    z = [1.875, 0.375, 0.1, 1.2]
    expected = statistics.variance(z) / statistics.mean(z) ** 2  # unbiased variance, as torch.var
    assert localized_balance_loss(hand, types, 1, 0.5, mask).item() == pytest.approx(expected, rel=1e-6)
    swapped = localized_balance_loss(hand, 1 - types, 1, 0.5, mask).item()  # other types: other importances
    z2 = [1.25 * 0.5, 0.75 * 1.5, 0.2 * 1.5, 0.8 * 0.5]
    assert swapped == pytest.approx(statistics.variance(z2) / statistics.mean(z2) ** 2, rel=1e-6)


def test_the_module_adds_beta_times_the_layers_constraints(tiny_llama_dir: Path) -> None:
    module = LoRAMoECausalLM(model=str(tiny_llama_dir), loramoe_beta=0.5, loramoe_delta=0.2, **TINY)
    assert len(loramoe_layers(module.backbone)) == 6  # gate, up, down of 2 blocks
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    assert len(names) == 18 and {n.split(".mlp.")[1].split(".", 1)[1] for n in names} == {
        "lora_A",
        "lora_B",
        "lora_router.weight",
    }  # only experts and routers train
    batch = _batch()
    with torch.no_grad():
        total = module.compute_loss(batch).item()
        plain = CausalLMModule.compute_loss(module, batch).item()  # the layers capture this pass's gates
        lbc, own = balance_loss(module.backbone, batch["task_types"], 0.2, batch["attention_mask"])
    assert lbc.item() > 0 and 0 < own.item() < 1
    assert total == pytest.approx(plain + 0.5 * lbc.item(), rel=1e-6)


def test_one_expert_equals_peft_lora_with_the_same_factors(tiny_llama_dir: Path) -> None:
    ours = LoRAMoECausalLM(model=str(tiny_llama_dir), **{**TINY, "num_experts": 1})
    lora = {"r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["gate_proj", "up_proj", "down_proj"]}
    peft = CausalLMModule(model=str(tiny_llama_dir), peft=lora, output_dir="")
    _randomize_b(ours.backbone)
    with torch.no_grad():
        for name, layer in loramoe_layers(ours.backbone):
            target = peft.backbone.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)
        batch = _batch()
        a = ours(batch["input_ids"], batch["attention_mask"]).logits
        b = peft(batch["input_ids"], batch["attention_mask"]).logits
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_the_export_reloads_identically_and_one_expert_merges_into_a_peft_adapter(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module = LoRAMoECausalLM(model=str(tiny_llama_dir), **TINY).eval()
    _randomize_b(module.backbone)
    batch = _batch()
    folder = module.save_pretrained(tmp_path / "hf_model")
    assert not (folder / "config.json").exists()  # never loads as the bare base model
    model, tokenizer = load_loramoe(folder)
    with torch.no_grad():
        expected = module(batch["input_ids"], batch["attention_mask"]).logits
        assert torch.equal(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, expected)
    assert tokenizer is not None
    one = LoRAMoECausalLM(model=str(tiny_llama_dir), merge_experts=True, **{**TINY, "num_experts": 1}).eval()
    _randomize_b(one.backbone)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                       one.save_pretrained(tmp_path / "one") / "merged").eval()  # fmt: skip
    with torch.no_grad():
        a = one(batch["input_ids"], batch["attention_mask"]).logits
        b = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_refusals_are_one_sentence(tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> None:
    module = LoRAMoECausalLM(model=str(tiny_llama_dir), **TINY)
    batch = {k: v for k, v in _batch().items() if k != "task_types"}
    with pytest.raises(UserError, match=r"^LoRAMoECausalLM's balancing constraint needs each example's type .* and "
                                        r"this batch has neither task_types nor task_id: train with MultiTask"):  # fmt: skip
        module.compute_loss(batch)
    with pytest.raises(UserError, match="has a task_id but knowledge_tasks is not set: .* set knowledge_tasks"):
        module.compute_loss({**batch, "task_id": torch.tensor([0, 1, 0, 1])})
    mapped = LoRAMoECausalLM(model=str(tiny_llama_dir), knowledge_tasks=[1], **TINY)
    assert torch.isfinite(mapped.compute_loss({**batch, "task_id": torch.tensor([0, 1, 0, 1])}))
    no_beta = LoRAMoECausalLM(model=str(tiny_llama_dir), loramoe_beta=0.0, **TINY)
    assert torch.isfinite(no_beta.compute_loss(batch))  # without the constraint no type is needed
    with pytest.raises(UserError, match="LoRAMoECausalLM trains its own routed LoRA experts .*: set peft to null."):
        LoRAMoECausalLM(model=str(tiny_llama_dir), peft={"r": 2}, **TINY)
    with pytest.raises(UserError, match="gradient checkpointing recomputes: set gradient_checkpointing to false"):
        LoRAMoECausalLM(model=str(tiny_llama_dir), gradient_checkpointing=True, **TINY)
    with pytest.raises(UserError, match=r"found no nn.Linear layer named \['gate_proj', 'up_proj', 'down_proj'\] in "
                                        "GPT2LMHeadModel .*: set loramoe_targets"):  # fmt: skip
        LoRAMoECausalLM(model=str(tiny_gpt2_dir), **TINY)
    with pytest.raises(ValueError, match=r"^knowledge_experts=5 must be between 0 and num_experts=4"):
        LoRAMoECausalLM(model=str(tiny_llama_dir), knowledge_experts=5, **TINY)


class UserLoRAMoE(L.LightningModule):
    """A user's own module: their HF model, LoRAMoE added by the drop-in function, their own loss."""

    def __init__(self, path: str) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.net = AutoModelForCausalLM.from_pretrained(path)
        self.net.train()  # from_pretrained returns eval mode
        add_loramoe(self.net, num_experts=4, rank=2, alpha=4.0, dropout=0.0, capture=True)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.net(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        types = torch.arange(batch["input_ids"].shape[0]) % 2  # the user's own notion of sample type
        return loss + 0.1 * balance_loss(self.net, types, delta=0.1)[0]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def test_a_users_own_module_trains_with_the_drop_in_layers(tiny_llama_dir: Path, tmp_path: Path) -> None:
    module = UserLoRAMoE(str(tiny_llama_dir))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    make_trainer(tmp_path, 3).fit(module, train_dataloaders=token_batches(n=12))
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in module.named_parameters() if p.requires_grad} and len(changed) == 18
    assert all("lora_" in n for n in changed)  # the base model stayed frozen


@pytest.mark.slow
def test_smollm2_the_constraint_separates_the_two_data_types(smollm2_dir: Path, tmp_path: Path) -> None:
    """Reviews (task, type 0) and trivia Q&A (world knowledge, type 1) mixed 1:1. The constraint's fixed point puts
    ``(1 - delta) / 2`` of a sample's router mass on the group its formula boosts (``I = 1 + delta``), so with
    ``delta = 0.5`` that share falls from ~0.5 towards 0.25 while the task loss falls; fixing the gates at their mean
    (the ``merge_experts`` export) then changes the logits, measured here."""
    from lightning_ft.objectives import MultiTaskDataModule

    module = LoRAMoECausalLM(model=str(smollm2_dir), knowledge_tasks=[1], loramoe_beta=1.0, loramoe_delta=0.5,
                             loramoe_targets=["down_proj"], learning_rate=5e-3, warmup_steps=0, output_dir="")  # fmt: skip
    common = {"label_options": None, "train_size": 16, "val_size": 0, "test_size": 0, "max_length": 32}
    task = {**common, "dataset": "rotten_tomatoes", "prompt_template": "Review: {text}\nSentiment:",
            "response_template": " {label}", "label_options": ["positive", "negative"]}  # fmt: skip
    trivia = {**common, "dataset": "trivia", "prompt_template": "Q: {prompt}\nA:", "response_template": " {response}"}
    data = MultiTaskDataModule(tasks=[task, trivia], epoch_size=32, batch_size=8, control=None)
    data.tokenizer = module.tokenizer
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    types = batch["task_id"].long()
    assert 0 < int(types.sum()) < 8

    def measure() -> tuple[float, float]:
        with torch.no_grad():
            loss = CausalLMModule.compute_loss(module, batch).item()
            return loss, balance_loss(module.backbone, types, 0.5, batch["attention_mask"])[1].item()

    loss_before, boosted_before = measure()
    make_trainer(tmp_path, 8, gradient_clip_val=1.0).fit(module, data)
    loss_after, boosted_after = measure()
    assert loss_after < loss_before - 0.1
    assert boosted_after < boosted_before - 0.03, (boosted_before, boosted_after)
    with torch.no_grad():  # routed against gates fixed at their mean (what merge_experts exports)
        module.eval()
        routed = torch.log_softmax(module(batch["input_ids"], batch["attention_mask"]).logits, -1)
        means = mean_gates(module.backbone, [batch], module.device)
        for name, layer in loramoe_layers(module.backbone):
            layer.route = lambda x, g=means[name]: g.expand(*x.shape[:-1], -1)  # type: ignore[method-assign]
        fixed = torch.log_softmax(module(batch["input_ids"], batch["attention_mask"]).logits, -1)
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    picked = [lp[:, :-1].gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)[keep] for lp in (routed, fixed)]
    gap = (picked[0] - picked[1]).abs().mean().item()  # on the response tokens
    print(f"loss {loss_before:.3f} -> {loss_after:.3f}; boosted-group share {boosted_before:.3f} -> "
          f"{boosted_after:.3f}; mean |log p(routed) - log p(mean gates)| on response tokens = {gap:.3f}")  # fmt: skip
    assert gap > 0
