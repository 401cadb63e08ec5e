"""S2FT: the co-permutation preserves a grouped-query model's function, only the chosen units' slices train (dense
deltas: no gradient on the frozen weights), the fused and permuted-back model equals the trained permuted one, the
budget is the official floor(ratio * blocks * units), each rule chooses by its score, and bad settings are refused.
Resume, DDP and the user's own module are the conformance matrix's rows (tests/conformance)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import first_batch_loss, make_trainer

from lightning_ft.callbacks import S2FT
from lightning_ft.core.layer_map import LayerMap
from lightning_ft.core.structured import block_units, order_for, permute_block
from lightning_ft.modules import CausalLMModule


def _rows(n: int = 8, length: int = 10) -> torch.utils.data.DataLoader:
    ids = torch.randint(3, 300, (n, length), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
    return torch.utils.data.DataLoader(rows, batch_size=4)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_permuting_groups_and_channels_keeps_a_gqa_models_function(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)  # 4 query heads in 2 key/value groups
    before = _logits(model)
    units = block_units(model, LayerMap.from_model(model), model.config)
    assert [(u.groups, u.group_rows, u.kv_rows, u.channels) for u in units] == [(2, 16, 8, 64)] * 2
    orders = [([1, 0], torch.randperm(64, generator=torch.Generator().manual_seed(b)).tolist()) for b in range(2)]
    for u, (attention, ffn) in zip(units, orders):
        permute_block(u, attention, ffn)
    assert not torch.equal(model.model.layers[0].self_attn.k_proj.weight[:8], units[0].k.weight[8:])  # moved
    torch.testing.assert_close(_logits(model), before, atol=1e-5, rtol=0)
    # the official order over query heads applied to key/value rows is not function-preserving under GQA
    q = units[0].q.weight
    q.data = q.data.reshape(4, 8, -1)[[1, 0, 2, 3]].reshape(32, -1)
    assert not torch.allclose(_logits(model), before, atol=1e-3)


def test_order_puts_each_slice_contiguously() -> None:
    order, a, b, c = order_for([5, 1, 3], [3, 7], 8)
    assert order == [1, 5, 3, 7, 0, 2, 4, 6] and (a, b, c) == (2, 1, 1)
    assert set(order[: a + b]) == {1, 3, 5} and set(order[a : a + b + c]) == {3, 7}


@pytest.fixture(scope="module")
def fitted(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 4-step S2FT fit (every kind, random rule) with a probe of the permuted model's logits before the fusion."""
    from transformers import AutoModelForCausalLM

    class Probe(L.Callback):
        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # runs before S2FT's
            self.logits = _logits(pl_module.backbone)
            self.trainable = {n for n, p in pl_module.named_parameters() if p.requires_grad}
            self.grads = {n for n, p in pl_module.named_parameters() if p.grad is not None}
            state = trainer.optimizers[0].state.values()
            self.state_numel = sum(t.numel() for s in state for k, t in s.items() if k != "step")

    L.seed_everything(0)
    out = tmp_path_factory.mktemp("s2ft")
    module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=1e-2, warmup_steps=0,
                            output_dir=str(out / "hf_model"))  # fmt: skip
    method, probe = S2FT(v_ratio=0.5, o_ratio=0.25, u_ratio=0.1, d_ratio=0.1, seed=3), Probe()
    trainer = make_trainer(out, 4, callbacks=[probe, method])
    trainer.fit(module, train_dataloaders=_rows())
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    exported = AutoModelForCausalLM.from_pretrained(out / "hf_model")
    return {"module": module, "method": method, "probe": probe, "base": base, "exported": exported}


def test_the_budget_is_the_official_floor_over_all_blocks(fitted: dict) -> None:
    method = fitted["method"]
    assert method.counts() == {"v": 2, "o": 1, "u": 12, "d": 12}  # floor(r * 2 blocks * 2 groups | 64 channels)
    assert {k: sum(len(b) for b in v) for k, v in method.selection.items()} == method.counts()


def test_only_the_chosen_slices_train_as_dense_deltas(fitted: dict) -> None:
    probe, method = fitted["probe"], fitted["method"]
    assert probe.trainable and all(n.endswith(".s2_delta") for n in probe.trainable)
    assert probe.grads <= probe.trainable  # the frozen weights never got a (dense) gradient
    assert probe.state_numel == 2 * (2 * 8 * 32 + 16 * 32 + 12 * 32 + 12 * 32)  # AdamW's moments: the slices only
    assert not any(n.endswith("s2_delta") for n, _ in fitted["module"].named_parameters())  # fused: plain again
    masks = method.allowed_masks()
    changed = {n for n, p in fitted["base"].named_parameters()
               if not torch.equal(p, fitted["module"].backbone.get_parameter(n))}  # fmt: skip
    assert changed == set(masks)  # every chosen slice moved, nothing else did
    for name in changed:
        moved = (fitted["base"].get_parameter(name) != fitted["module"].backbone.get_parameter(name)).reshape(-1)
        assert not (moved & ~masks[name]).any(), name


def test_the_export_is_plain_and_equals_the_trained_permuted_model(fitted: dict) -> None:
    for name, param in fitted["exported"].named_parameters():
        assert torch.equal(param, fitted["module"].backbone.get_parameter(name)), name
    torch.testing.assert_close(_logits(fitted["exported"]), fitted["probe"].logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule", ["weight", "activation", "weight_activation", "gradient"])
def test_each_rule_chooses_the_units_with_the_highest_scores(tiny_llama_dir: Path, tmp_path: Path, rule: str) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    method = S2FT(v_ratio=0.5, o_ratio=0.0, u_ratio=0.0, d_ratio=0.1, rule=rule, calibration_samples=8)
    trainer = make_trainer(tmp_path, 1)
    trainer.fit_loop._data_source.instance = _rows()  # what trainer.fit attaches, without fitting
    method._model = module.backbone
    method._units = block_units(module.backbone, LayerMap.from_model(module.backbone), module.backbone.config)
    scores = method._scores(trainer, module)
    chosen = method._select(trainer, module)
    for kind, count in (("v", 2), ("d", 12)):
        flat = scores[kind].reshape(-1)
        per_block = scores[kind].shape[1]
        picked = [b * per_block + u for b, units in enumerate(chosen[kind]) for u in units]
        assert len(picked) == count and flat[picked].min() >= flat.topk(count).values.min()
    if rule == "weight":  # a unit's score is its slice's norm: the v rows of a key/value head
        v = module.backbone.model.layers[1].self_attn.v_proj.weight
        torch.testing.assert_close(scores["v"][1], v.reshape(2, -1).norm(dim=1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"o_ratio": 1.5}, "o_ratio=1.5 must be a fraction in [0, 1]."),
        ({"o_ratio": 0.0, "d_ratio": 0.0}, ("v_ratio, o_ratio, u_ratio and d_ratio are all 0, so S2FT would train "
                                            "nothing: set one.")),
        ({"rule": "magnitude"}, ("rule='magnitude' is not an S2FT rule: use random, weight, activation, "
                                 "weight_activation or gradient.")),
    ],
)
def test_bad_settings_are_refused_in_one_sentence(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        S2FT(**kwargs)
    assert str(err.value) == message


def test_gpt2_is_refused_in_one_sentence(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    module = CausalLMModule(model=str(tiny_gpt2_dir), output_dir="")
    trainer = make_trainer(tmp_path, 1, callbacks=[S2FT()])
    with pytest.raises(ValueError, match=r"^S2FT needs separate nn.Linear q/k/v/o and up/down projections .* use a "
                                         r"Llama-style model\.$"):  # fmt: skip
        trainer.fit(module, train_dataloaders=_rows())


def test_a_budget_that_chooses_nothing_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    trainer = make_trainer(tmp_path, 1, callbacks=[S2FT(o_ratio=0.1, d_ratio=0.0)])  # floor(0.1 * 4 groups) = 0
    with pytest.raises(ValueError, match=r"choose no unit of this 2-block model: raise them\.$"):
        trainer.fit(module, train_dataloaders=_rows())


@pytest.mark.slow
def test_smollm2_s2ft_learns_with_its_slices_and_exports_the_same_model(smollm2_dir: Path, tmp_path: Path) -> None:
    module = CausalLMModule(model=str(smollm2_dir), learning_rate=1e-3, warmup_steps=0, output_dir="")
    data, batch, loss_before = first_batch_loss(module, train_size=48, batch_size=4, max_length=40)
    base = {n: p.detach().clone() for n, p in module.backbone.named_parameters() if ".layers." in n}

    class Before(L.Callback):  # the permuted model with its deltas, just before S2FT fuses them
        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            with torch.no_grad():
                self.logits = pl_module.backbone(input_ids=batch["input_ids"][:2]).logits

    s2ft, before = S2FT(), Before()  # the paper's Llama-2 ratios: 4 of 90 groups' o_proj, 921 down_proj channels
    make_trainer(tmp_path, 12, callbacks=[before, s2ft], gradient_clip_val=1.0).fit(module, data)
    assert s2ft.counts() == {"v": 0, "o": 4, "u": 0, "d": 921}
    with torch.no_grad():
        loss_after = module.compute_loss(batch).item()
        logits = module.backbone(input_ids=batch["input_ids"][:2]).logits
    torch.testing.assert_close(logits, before.logits, atol=1e-4, rtol=1e-4)  # fused and permuted back: same model
    masks = s2ft.allowed_masks()
    for name, value in base.items():
        moved = (value != module.backbone.get_parameter(name)).reshape(-1)
        assert not (moved & ~masks[name]).any() if name in masks else not moved.any(), name
    assert loss_after < loss_before - 0.1


def test_lines_in_the_same_fit_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from lightning_ft.callbacks import LiNeS

    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    trainer = make_trainer(tmp_path, 1, callbacks=[S2FT(), LiNeS(alpha=0.5)])
    with pytest.raises(ValueError, match=r"^S2FT keeps the blocks permuted .* run LiNeS in a second fit on S2FT's "
                                         r"hf_model\.$"):  # fmt: skip
        trainer.fit(module, train_dataloaders=_rows())
