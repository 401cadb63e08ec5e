"""CorDA (CorDAInit): the adapters equal peft's own CorDA initialisation on the same covariance, in both modes; the
output is unchanged at initialisation; the exported adapter applies the fine-tuning update to the *original* base
model; a user's own module with a peft model works; bad settings, a module without LoRA and a resume with other
settings are refused in one sentence; on SmolLM2 the knowledge-preserved adapter is the part of each weight the
context uses least. Resume, DDP and the declared refusals are the conformance matrix's row ``corda``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import make_data, make_trainer

from lightning_ft.callbacks import CorDAInit
from lightning_ft.callbacks.corda import context_covariances, corda_initialise, lora_layers
from lightning_ft.errors import UserError
from lightning_ft.modules import CausalLMModule

TARGETS = ["q_proj", "v_proj", "down_proj"]
PEFT = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": TARGETS}


def _batches(module: CausalLMModule, count: int = 3) -> list[dict[str, Any]]:
    data = make_data(train_size=4 * count, batch_size=4, max_length=32)
    data.tokenizer = module.tokenizer
    data.setup("fit")
    return [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in data.train_dataloader()]


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_the_adapters_equal_peft_corda_on_the_same_covariance(mode: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda
    from transformers import AutoModelForCausalLM

    module = CausalLMModule(model=str(tiny_llama_dir), peft=PEFT, output_dir="")
    model = module.backbone
    batches = _batches(module)
    with torch.no_grad():
        before = [model(**b).logits for b in batches]
    layers = {name: layer for name, layer, _ in lora_layers(model)}
    assert len(layers) == 6  # q, v and down of 2 blocks
    covariances = context_covariances(model, layers, batches)
    for name, layer in layers.items():
        corda_initialise(layer, "default", covariances[name], mode)  # type: ignore[arg-type]

    # peft's own CorDA: preprocess_corda over the same covariance (its covariance file), then get_peft_model
    prefix = "base_model.model."
    cov_file = tmp_path / "covariance.pt"
    torch.save({name[len(prefix) :]: c for name, c in covariances.items()}, cov_file)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                        corda_config=CordaConfig(corda_method=mode, covariance_file=str(cov_file)))  # fmt: skip
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    preprocess_corda(reference, config)
    reference = get_peft_model(reference, config)
    ours = dict(model.named_parameters())
    compared = 0
    for name, value in reference.named_parameters():
        assert torch.allclose(ours[name], value, atol=1e-6, rtol=0), name
        compared += ("lora_" in name) + (name.endswith("base_layer.weight"))
    assert compared == 18  # A, B and the residual base weight of each of the 6 layers
    with torch.no_grad():  # W = residual + scaling * B A: the same function at initialisation
        after = [model(**b).logits for b in batches]
    assert max((a - b).abs().max().item() for a, b in zip(before, after)) < 1e-4
    assert all(layer.lora_B["default"].weight.abs().sum() > 0 for layer in layers.values())


def test_knowledge_preserved_takes_the_smallest_components_and_instruction_previewed_the_largest(
    tiny_llama_dir: Path,
) -> None:
    norms = {}
    for mode in ("kpm", "ipm"):
        module = CausalLMModule(model=str(tiny_llama_dir), peft=PEFT, output_dir="")
        model = module.backbone
        batches = _batches(module)
        layers = {name: layer for name, layer, _ in lora_layers(model)}
        covariances = context_covariances(model, layers, batches)
        name, layer = next(iter(layers.items()))
        weight = layer.get_base_layer().weight.detach().clone()
        corda_initialise(layer, "default", covariances[name], mode)  # type: ignore[arg-type]
        update = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        # the context-weighted norm ||(B A) C^(1/2)|| the adapter carries: its components' singular values of W C
        c = covariances[name] + 0.01 * covariances[name].diagonal().mean() * torch.eye(weight.shape[1])
        singular = torch.linalg.svdvals(weight @ c)
        norms[mode] = (torch.linalg.svdvals(update @ c), singular)
    kpm, singular = norms["kpm"]
    ipm, _ = norms["ipm"]
    assert torch.allclose(ipm[:4], singular[:4], rtol=1e-3)
    assert torch.allclose(kpm[:4].sort(descending=True).values, singular[-4:].sort(descending=True).values, rtol=1e-2)


def test_the_export_applies_the_update_to_the_original_base_model(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module = CausalLMModule(model=str(tiny_llama_dir), peft=PEFT, learning_rate=1e-2, warmup_steps=0,
                            output_dir=str(tmp_path / "hf_model"), merge_adapter=True)  # fmt: skip
    original = {n: p.detach().clone() for n, p in module.backbone.named_parameters()}
    assert module.initial_adapter_state is None
    corda = CorDAInit(mode="kpm", data="train", batches=2)
    make_trainer(tmp_path, 3, callbacks=[corda]).fit(module, make_data(train_size=12, batch_size=4, max_length=32))
    assert module.initial_adapter_state is corda.initial_adapter
    rewritten = [n for n, p in module.backbone.named_parameters() if n.endswith("base_layer.weight")]
    assert rewritten and all(not torch.equal(module.backbone.get_parameter(n), original[n]) for n in rewritten)
    batch = _batches(module, 1)[0]
    module.eval()
    with torch.no_grad():
        trained = module.backbone(**batch).logits
        base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))  # the original weights, not the residual
        exported = PeftModel.from_pretrained(base, str(tmp_path / "hf_model")).eval()
        assert exported.peft_config["default"].r == 8  # [A | A0], [B | -B0]
        assert (exported(**batch).logits - trained).abs().max().item() < 1e-4
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_model" / "merged")).eval()
        assert (merged(**batch).logits - trained).abs().max().item() < 1e-4
    assert not (tmp_path / "hf_model" / "initial_adapter").exists()


class PeftUser(L.LightningModule):
    """A user's own module: a peft model in an attribute of its own name, its own loss and optimizer."""

    def __init__(self, path: str) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        self.net = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=4, target_modules=TARGETS))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"]).loss  # fmt: skip

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def test_a_users_own_module_with_a_peft_model_is_initialised(tiny_llama_dir: Path, tmp_path: Path) -> None:
    user = PeftUser(str(tiny_llama_dir))
    start = copy.deepcopy(user.net)
    corda = CorDAInit(mode="ipm", data="train", batches=2)
    data = make_data(train_size=12, batch_size=4, max_length=32, tokenizer=str(tiny_llama_dir))
    make_trainer(tmp_path, 2, callbacks=[corda]).fit(user, data)
    assert corda.initial_adapter is not None and len(corda.initial_adapter) == 12  # A and B of 6 layers
    changed = {n for n, p in user.net.named_parameters() if not torch.equal(p, start.get_parameter(n))}
    assert {n for n in changed if "lora_" not in n} == {n for n, _ in start.named_parameters()
                                                        if n.endswith("base_layer.weight")}  # fmt: skip


def test_bad_settings_a_module_without_lora_and_a_resume_with_other_settings_are_refused(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"^mode='svd' must be 'kpm' \(knowledge-preserved\) or 'ipm'"):
        CorDAInit(mode="svd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^batches=0 must be a positive integer\.$"):
        CorDAInit(batches=0)
    plain = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    with pytest.raises(UserError, match=r"^CorDAInit initialises LoRA adapters, and CausalLMModule has none: give"):
        make_trainer(tmp_path, 1, callbacks=[CorDAInit(data="train")]).fit(plain, make_data(train_size=8))
    with pytest.raises(ValueError, match=r"^CorDAInit\(data='control'\) reads general text, and this fit's DataModule"):
        module = CausalLMModule(model=str(tiny_llama_dir), peft=PEFT, output_dir="")
        make_trainer(tmp_path, 1, callbacks=[CorDAInit(mode="kpm")]).fit(module, make_data(train_size=8))
    data = make_data(train_size=8, batch_size=4, max_length=32)
    module = CausalLMModule(model=str(tiny_llama_dir), peft=PEFT, output_dir="")
    make_trainer(tmp_path / "a", 1, callbacks=[CorDAInit(mode="kpm", data="train", batches=1)],
                 enable_checkpointing=True).fit(module, data)  # fmt: skip
    ckpt = next((tmp_path / "a").rglob("*.ckpt"))
    module = CausalLMModule(model=str(tiny_llama_dir), peft=PEFT, output_dir="")
    with pytest.raises(UserError, match=r"^CorDAInit's initialisation differs from the checkpoint's \(mode, data or"):
        make_trainer(tmp_path / "b", 2, callbacks=[CorDAInit(mode="ipm", data="train", batches=1)]).fit(
            module, data, ckpt_path=str(ckpt)
        )


@pytest.mark.slow
def test_smollm2_knowledge_preserved_adapters_are_what_the_context_uses_least(smollm2_dir: Path) -> None:
    """On real weights and real general text (HumanEval, the control set), the KPM adapter carries a small share of
    each layer's response to that text and the IPM adapter a large one, with the output unchanged either way."""
    peft = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
            "layers_to_transform": list(range(0, 30, 6))}  # 5 of the 30 blocks: 10 decompositions per mode
    module = CausalLMModule(model=str(smollm2_dir), peft=peft, output_dir="")
    data = make_data(train_size=8, control="humaneval", control_size=24, control_max_length=64, max_length=64)
    data.tokenizer = module.tokenizer
    data.setup("fit")
    context = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in data.control_dataloader()]
    model = module.backbone
    layers = {name: layer for name, layer, _ in lora_layers(model)}
    assert len(context) >= 2
    covariances = context_covariances(model, layers, context[:-1])
    with torch.no_grad():
        before = model(**context[-1]).logits
    shares: dict[str, float] = {}
    for mode in ("ipm", "kpm"):
        state = {n: p.detach().clone() for n, p in model.named_parameters()}
        for name, layer in layers.items():
            corda_initialise(layer, "default", covariances[name], mode)  # type: ignore[arg-type]
        with torch.no_grad():
            assert (model(**context[-1]).logits - before).abs().max().item() < 2e-3
            ratios = []
            for name, layer in layers.items():  # ||scaling B A C^(1/2)||_F^2 / ||W C^(1/2)||_F^2 = tr(U C U^T) / ...
                update = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
                whole = update + layer.get_base_layer().weight
                c = covariances[name]
                ratios.append(((update @ c) * update).sum().item() / ((whole @ c) * whole).sum().item())
        assert len(ratios) == 10
        shares[mode] = sum(ratios) / len(ratios)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(state[n])
    assert shares["kpm"] < 1e-3, shares
    assert shares["ipm"] > 0.1, shares
