"""LoFiT (LoFiTMixin / LoFiTCausalLM): the pre-hook changes the attention output projection's input exactly as
``(1 + a) * o + v`` on the chosen heads only; the top-k choice is exact (ties: lower layer, then head, first); stage 2
trains exactly the selected heads' ``[k_l, d_head]`` offsets; the L1 term is the formula; the exported hf_model/
reloads with the same logits (Llama: a plain model with o_proj biases; Mistral: offsets beside it and a loader);
refusals are one sentence; a user's own module hosts it; on SmolLM2 stage 1 then stage 2 learn. Resume, DDP, the
FSDP2/quantized/peft refusals and the user's plain module are the conformance rows ``lofit-heads`` and ``lofit``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import first_batch_loss, make_trainer, token_batches

from lightning_ft.errors import UserError
from lightning_ft.modules import CausalLMModule
from lightning_ft.objectives.lofit import (
    OFFSETS_FILE,
    LoFiTCausalLM,
    LoFiTMixin,
    load_lofit_model,
    rank_heads,
    top_k_count,
)


def _module(path: Path, **kwargs: Any) -> LoFiTCausalLM:
    return LoFiTCausalLM(model=str(path), output_dir="", **kwargs)


def _o_proj_inputs(module: LoFiTCausalLM, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(before, after)``: each attention output projection's input before and after LoFiT's hook, in one forward
    (a hook prepended to LoFiT's sees its input, one appended sees its result)."""
    before: list[torch.Tensor] = []
    after: list[torch.Tensor] = []
    handles = []
    for out in module._outputs:
        handles.append(out.module.register_forward_pre_hook(lambda m, a: before.append(a[0].clone()), prepend=True))
        handles.append(out.module.register_forward_pre_hook(lambda m, a: after.append(a[0].clone())))
    with torch.no_grad():
        module(ids)
    for h in handles:
        h.remove()
    return before, after


IDS = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(1))


def test_the_hook_applies_one_plus_scale_times_o_plus_bias_on_the_chosen_heads_only(tiny_llama_dir: Path) -> None:
    module = _module(tiny_llama_dir, heads=[[0, 1], [1, 3], [1, 0]], train_scales=True, init_std=0.5)
    before, after = _o_proj_inputs(module, IDS)
    assert sorted(module.lofit) == ["0", "1"]
    for layer, heads in ((0, [1]), (1, [0, 3])):
        vec = module.lofit[str(layer)]
        assert vec.index.tolist() == heads and vec.bias.shape == vec.scale.shape == (len(heads), 8)
        o, edited = before[layer].view(2, 7, 4, 8), after[layer].view(2, 7, 4, 8)
        expected = o.clone()
        expected[:, :, heads] = (1 + vec.scale.detach()) * o[:, :, heads] + vec.bias.detach()
        torch.testing.assert_close(edited, expected, rtol=0, atol=1e-6)
        others = [h for h in range(4) if h not in heads]
        assert torch.equal(edited[:, :, others], o[:, :, others])  # untouched heads: bit for bit
    with torch.no_grad():
        module.lofit["0"].bias.zero_()
        module.lofit["0"].scale.zero_()
    before, after = _o_proj_inputs(module, IDS)
    assert torch.equal(before[0], after[0])  # zero vectors: exactly the plain model


def test_top_k_is_exact_on_hand_set_scales_with_ties_in_layer_then_head_order(tiny_llama_dir: Path) -> None:
    module = _module(tiny_llama_dir, stage="heads", top_k=3)
    norms = {(0, 0): 1.0, (0, 1): 3.0, (0, 2): 2.0, (0, 3): 0.0, (1, 0): 2.0, (1, 1): 0.5, (1, 2): 3.0, (1, 3): 0.0}
    with torch.no_grad():
        for (layer, head), norm in norms.items():
            scale = module.lofit[str(layer)].scale
            scale[head] = 0
            scale[head, head] = -norm  # the L2 norm, whatever the sign
    assert module.ranked_heads() == [(0, 1), (1, 2), (0, 2), (1, 0), (0, 0), (1, 1), (0, 3), (1, 3)]
    assert rank_heads(torch.tensor([[1.0, 1.0], [2.0, 1.0]])) == [(1, 0), (0, 0), (0, 1), (1, 1)]
    assert top_k_count(1024, None, 0.03) == 31 and top_k_count(270, None, 0.03) == 8 and top_k_count(8, 2, 0.5) == 2


def test_stage_two_trains_exactly_the_selected_heads_offsets_from_the_heads_file(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    heads = _module(tiny_llama_dir, stage="heads", top_k=3, init_std=0.0)
    with torch.no_grad():
        heads.lofit["1"].scale[2, 0] = 0.3
        heads.lofit["0"].scale[0, 1] = 0.2
        heads.lofit["1"].scale[1, 5] = -0.1
    file = heads.save_heads(tmp_path / "heads.safetensors")
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        meta = json.loads(f.metadata()["lofit"])
        assert f.get_tensor("ranking")[:3].tolist() == [[1, 2], [0, 0], [1, 1]]
        torch.testing.assert_close(f.get_tensor("norms")[1], torch.tensor([0.0, 0.1, 0.3, 0.0]))
        assert f.get_tensor("scales.0").shape == (4, 8)
    assert meta["selected"] == [[1, 2], [0, 0], [1, 1]] and meta["top_k"] == 3
    module = _module(tiny_llama_dir, heads_path=str(file), top_k=3)
    trainable = {n: tuple(p.shape) for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"lofit.0.bias": (1, 8), "lofit.1.bias": (2, 8)}
    assert module.lofit["0"].index.tolist() == [0] and module.lofit["1"].index.tolist() == [1, 2]
    assert module.lofit["0"].scale is None  # the stage-1 scales are not kept (the paper keeps only the offsets)


def test_the_l1_term_is_the_formula_and_is_added_to_the_loss(tiny_llama_dir: Path) -> None:
    module = _module(tiny_llama_dir, stage="heads", init_std=0.01)
    expected = sum(module.lofit[k].scale.abs().sum() for k in ("0", "1"))
    torch.testing.assert_close(module.l1_term(), expected)
    assert module.l1_lambda == 5e-4 and _module(tiny_llama_dir, heads=[[0, 0]]).l1_lambda == 0.0
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": IDS}
    with torch.no_grad():
        plain = CausalLMModule.compute_loss(module, batch)
        torch.testing.assert_close(module.compute_loss(batch), plain + 5e-4 * expected)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()  # no dropout
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_the_exported_llama_is_a_plain_hf_model_with_the_same_logits(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    module = _module(tiny_llama_dir, heads=[[1, 3], [1, 0]], init_std=0.3)  # offsets only (Mistral's test: scales)
    out = module.save_pretrained(tmp_path / "hf")
    assert not (out / OFFSETS_FILE).exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.attention_bias is True and reloaded.model.layers[1].self_attn.o_proj.bias.abs().sum() > 0
    assert (
        not reloaded.model.layers[0].self_attn.o_proj.bias.any()
        and not reloaded.model.layers[1].self_attn.q_proj.bias.any()
    )
    torch.testing.assert_close(_logits(reloaded), _logits(module.backbone), rtol=0, atol=1e-5)
    assert module.backbone.config.attention_bias is False  # the live model's config is left as it was


def test_an_architecture_without_an_o_proj_bias_gets_the_offsets_beside_it_and_a_loader(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    MistralForCausalLM(cfg).save_pretrained(tmp_path / "mistral")
    module = type("UserLoFiT", (LoFiTMixin, _Host), {})(path=str(tmp_path / "mistral"), heads=[[1, 2]],
                                                        train_scales=True, init_std=0.3)  # fmt: skip
    out = module.save_pretrained(tmp_path / "hf")
    assert (out / OFFSETS_FILE).is_file()
    plain = AutoModelForCausalLM.from_pretrained(out)  # the scales are folded; the offsets need the loader
    assert plain.model.layers[1].self_attn.o_proj.bias is None
    torch.testing.assert_close(_logits(load_lofit_model(out)), _logits(module.backbone), rtol=0, atol=1e-5)


class _Host(L.LightningModule):
    """A user's own module: a transformers model as ``backbone``, its own loss and optimizer."""

    def __init__(self, path: str) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.backbone = AutoModelForCausalLM.from_pretrained(path).train()

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.backbone(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.compute_loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def test_a_users_own_module_with_a_backbone_and_a_loss_hosts_lofit(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    module = type("UserLoFiT", (LoFiTMixin, _Host), {})(path=str(tiny_gpt2_dir), heads=[[1, 0]])
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    make_trainer(tmp_path, 3).fit(module, token_batches(n=12))
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"lofit.1.bias"}  # GPT-2's attn.c_proj (Conv1D) is found by the layer map
    out = module.save_pretrained(tmp_path / "hf")  # c_proj has a bias: the offsets fold into it
    from transformers import AutoModelForCausalLM

    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out)), _logits(module.backbone),
                               rtol=0, atol=1e-5)  # fmt: skip


def test_missing_or_mismatched_heads_files_and_bad_arguments_are_one_sentence(
    tiny_llama_dir: Path, tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match=r"^heads_path='nope' is not a file: run the head-selection stage first"):
        _module(tiny_llama_dir, heads_path="nope")
    gpt2_heads = _module(tiny_gpt2_dir, stage="heads").save_heads(tmp_path / "gpt2.safetensors")
    with pytest.raises(UserError, match=r"ranks the heads of a model .*'num_heads': 2.* but this backbone has .*"
                                        r"'num_heads': 4.*: run the head-selection stage"):  # fmt: skip
        _module(tiny_llama_dir, heads_path=str(gpt2_heads))
    with pytest.raises(ValueError, match=r"^stage='bias' tunes the heads .* not both\.$"):
        _module(tiny_llama_dir)
    with pytest.raises(ValueError, match=r"^heads names head \[2, 0\], which this model does not have"):
        _module(tiny_llama_dir, heads=[[2, 0]])
    with pytest.raises(ValueError, match=r"^top_k=9 must be between 1 and the model's 8 attention heads\.$"):
        _module(tiny_llama_dir, stage="heads", top_k=9).save_heads(tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match=r"^stage='heads' scores every head"):
        _module(tiny_llama_dir, stage="heads", heads=[[0, 0]])


def test_smollm2_stage_one_selects_the_top_heads_and_stage_two_learns_with_k_offsets(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    file = tmp_path / "heads.safetensors"
    heads = LoFiTCausalLM(model=str(smollm2_dir), stage="heads", learning_rate=5e-3, warmup_steps=0, output_dir="",
                          heads_output=str(file), top_k=8)  # fmt: skip
    data, batch, loss_before = first_batch_loss(heads, train_size=8, batch_size=2, max_length=32)
    make_trainer(tmp_path, 3).fit(heads, data)
    with torch.no_grad():
        assert CausalLMModule.compute_loss(heads, batch).item() < loss_before - 0.5  # 270 x 64 scales learn fast
    norms = heads.head_norms()
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        chosen = sorted(tuple(p) for p in json.loads(f.metadata()["lofit"])["selected"])
    assert norms.shape == (30, 9) and len(chosen) == 8
    flat = sorted(((float(norms[l, h]), l, h) for l in range(30) for h in range(9)), reverse=True)
    assert chosen == sorted((l, h) for _, l, h in flat[:8]) and flat[7][0] > flat[8][0]  # exact, no tie at the cut
    bias = LoFiTCausalLM(model=str(smollm2_dir), heads_path=str(file), top_k=8, learning_rate=1e-2, warmup_steps=0,
                         output_dir="")  # fmt: skip
    assert sorted((int(l), h) for l, v in bias.lofit.items() for h in v.index.tolist()) == chosen
    assert sum(p.numel() for p in bias.parameters() if p.requires_grad) == 8 * 64  # k * d_head, nothing else
    with torch.no_grad():
        loss_before = bias.compute_loss(batch).item()
    make_trainer(tmp_path, 4).fit(bias, data)
    with torch.no_grad():
        assert bias.compute_loss(batch).item() < loss_before - 0.1
