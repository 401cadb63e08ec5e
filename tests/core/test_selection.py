"""ParameterSelection: requires_grad and grad None, optimizer groups and state follow the trainable set,
re-added tensors go back to their own group in their own order, half-reset to theta_0, optimizer
state_dict round trip after a switch, and counter-based draws."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_ft.core.layer_map import LayerMap
from lightning_ft.core.selection import ParameterSelection, draw_rng
from lightning_ft.core.snapshot import PretrainedSnapshot


def _model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def _optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-2)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    ids = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_switch_freezes_evicts_and_readds_in_order(tiny_llama_dir: Path) -> None:
    model = _model(tiny_llama_dir)
    lm = LayerMap.from_model(model)
    sel = ParameterSelection(model, lm, lm.names)
    optimizer = _optimizer(model)
    original = [[id(p) for p in g["params"]] for g in optimizer.param_groups]
    sel.bind([optimizer], require_all=True)
    _step(model, optimizer)
    block1 = {i.name for i in lm.select(blocks=[1])}
    on, off = sel.apply(set(lm.names) - block1)
    assert on == [] and off == [n for n in lm.names if n in block1]
    for name in lm.names:
        param = model.get_parameter(name)
        assert param.requires_grad == (name not in block1) and (name not in block1 or param.grad is None)
    grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert grouped == {id(model.get_parameter(n)) for n in lm.names if n not in block1}
    assert {id(p) for p in optimizer.state} == grouped  # state of the switched-off block is freed
    frozen_before = {n: model.get_parameter(n).detach().clone() for n in block1}
    _step(model, optimizer)
    assert all(torch.equal(v, model.get_parameter(n)) for n, v in frozen_before.items())
    sel.apply(lm.names)
    assert [[id(p) for p in g["params"]] for g in optimizer.param_groups] == original  # home group, home order
    with pytest.raises(KeyError, match="not a selectable parameter"):
        sel.apply(["nope.weight"])


def test_reset_restores_theta0_of_newly_frozen(tiny_llama_dir: Path) -> None:
    model = _model(tiny_llama_dir)
    lm = LayerMap.from_model(model)
    snapshot = PretrainedSnapshot.of(model)
    sel = ParameterSelection(model, lm, lm.names)
    optimizer = _optimizer(model)
    sel.bind([optimizer])
    _step(model, optimizer)
    target = "model.layers.0.self_attn.q_proj.weight"
    kept = "model.layers.0.self_attn.k_proj.weight"
    moved = model.get_parameter(kept).detach().clone()
    sel.apply(set(lm.names) - {target, kept}, snapshot=snapshot)
    assert torch.equal(model.get_parameter(target), snapshot.get(target))
    assert torch.equal(model.get_parameter(kept), snapshot.get(kept)) and not torch.equal(moved, snapshot.get(kept))
    sel.apply(set(lm.names) - {target}, snapshot=snapshot)  # switching on never resets
    assert torch.equal(model.get_parameter(kept), snapshot.get(kept))


def test_optimizer_state_round_trip_after_a_switch(tiny_llama_dir: Path) -> None:
    def build() -> tuple[torch.nn.Module, ParameterSelection, torch.optim.Optimizer]:
        model = _model(tiny_llama_dir)
        lm = LayerMap.from_model(model)
        sel = ParameterSelection(model, lm, lm.names)
        optimizer = _optimizer(model)
        sel.bind([optimizer], require_all=True)
        sel.apply({i.name for i in lm if i.block != 0})
        return model, sel, optimizer

    model, sel, optimizer = build()
    _step(model, optimizer)
    saved = optimizer.state_dict()
    model2, sel2, optimizer2 = build()
    optimizer2.load_state_dict(saved)  # same groups, same order: loads without a size mismatch
    for p, q in zip(model.parameters(), model2.parameters()):
        if p in optimizer.state:
            torch.testing.assert_close(optimizer.state[p]["exp_avg"], optimizer2.state[q]["exp_avg"], rtol=0, atol=0)


def test_homeless_candidates_are_refused(tiny_llama_dir: Path) -> None:
    model = _model(tiny_llama_dir)
    lm = LayerMap.from_model(model)
    sel = ParameterSelection(model, lm, lm.names)
    optimizer = torch.optim.SGD([model.get_parameter(lm.names[0])], lr=0.1)
    with pytest.raises(ValueError, match="configure_optimizers must include every parameter"):
        sel.bind([optimizer], require_all=True)


def test_draws_are_a_function_of_seed_and_index() -> None:
    assert draw_rng(1, 2).random() == draw_rng(1, 2).random()
    assert len({draw_rng(1, i).random() for i in range(20)} | {draw_rng(2, 0).random()}) == 21
