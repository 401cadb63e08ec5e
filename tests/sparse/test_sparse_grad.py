"""The sampled weight gradient (``sparse_grad``) against the dense, masked reference: the op itself, whole fits of
each rule on a tiny Llama (identical masks, allclose gradients and weights, no dense weight gradient ever), where it
applies, and real SmolLM2 shapes. Resume equality with the sampled path (the default) is
tests/sparse/test_callback.py::test_resumed_run_equals_uninterrupted and the conformance matrix."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import (
    make_data,
    make_trainer,
    one_thread,  # noqa: F401  (autouse fixture: applies where imported)
)

from lightning_ft.callbacks import LotteryTicket, PrincipalWeights, Sensitivity, SparseFineTuning
from lightning_ft.core.layer_map import LayerMap
from lightning_ft.modules import CausalLMModule
from lightning_ft.sparse import CompactState
from lightning_ft.sparse.sampled import SampledGrad, install, linear_owners, remove


def test_sampled_linear_gives_the_dense_gradient_at_the_selected_entries_only() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 40)
    x = torch.randn(2, 7, 24, requires_grad=True)
    idx = torch.randperm(40 * 24)[:150].sort().values
    grads = []
    for _ in range(2):  # two backwards accumulate, as .grad does
        x.grad = None
        (layer(x).tanh().sum() + layer(x * 2).square().mean()).backward()
        grads.append((x.grad.clone(), layer.bias.grad.clone()))
    dense_w = layer.weight.grad.clone()
    layer.zero_grad(set_to_none=True)
    slot = SampledGrad.of(layer.weight.detach(), idx.int())
    install(layer, slot)
    for x_grad, _ in grads:
        x.grad = None
        (layer(x).tanh().sum() + layer(x * 2).square().mean()).backward()
        torch.testing.assert_close(x.grad, x_grad, rtol=0, atol=0)
    assert layer.weight.grad is None  # no dense weight gradient
    torch.testing.assert_close(layer.bias.grad, grads[1][1], rtol=0, atol=0)
    assert slot.grad is not None and slot.grad.dtype == torch.float32
    torch.testing.assert_close(slot.grad, dense_w.reshape(-1)[idx], rtol=1e-5, atol=1e-6)
    remove(layer)
    assert "forward" not in vars(layer) and not any(k.startswith("_lft") for k in vars(layer))


def test_a_weight_tied_to_an_embedding_keeps_the_dense_path() -> None:
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(10, 4)
    model.head = torch.nn.Linear(4, 10, bias=False)
    model.proj = torch.nn.Linear(4, 4)
    model.head.weight = model.embed.weight
    owners = linear_owners(model)
    assert id(model.proj.weight) in owners and id(model.embed.weight) not in owners


class _Probe(L.Callback):
    """Per optimizer step (before clipping): each eligible tensor's gradient at its selected entries, whether a
    dense weight gradient exists, and the masks; after the fit, the weights."""

    def __init__(self, sft: SparseFineTuning) -> None:
        self.sft = sft
        self.grads: list[dict[str, torch.Tensor]] = []
        self.dense_grad: list[set[str]] = []
        self.masks: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self.sft.phase != "sparse":
            return
        grads, dense = {}, set()
        for name, param in self.sft._params.items():
            slot = self.sft._slots.get(name)
            if param.grad is not None:
                dense.add(name)
                grads[name] = param.grad.reshape(-1)[self.sft.states[name].indices].clone()
            if slot is not None and slot.grad is not None:
                grads[name] = slot.grad.clone()
        self.grads.append(grads)
        self.dense_grad.append(dense)
        self.masks.append({n: i.clone() for n, i in self.sft.selected.items()})


RULES = {
    "lift": (lambda: PrincipalWeights(filter_rank=4, reselect_every=3), {"rank": 2}, {}),
    "lt_sft_l1_value_clip": (
        lambda: LotteryTicket(dense_steps=3, l1=0.5),
        {"density": 0.05},
        {"gradient_clip_algorithm": "value"},
    ),
    "sensitivity_accumulate": (lambda: Sensitivity(batches=2), {"count": 700}, {"accumulate_grad_batches": 2}),
}


def _fit(path: Path, root: Path, rule: str, sparse_grad: bool) -> tuple[CausalLMModule, _Probe]:
    make_rule, budget, trainer_kwargs = RULES[rule]
    L.seed_everything(0)
    module = CausalLMModule(model=str(path), learning_rate=1e-2, warmup_steps=2, weight_decay=0.1, output_dir="")
    sft = SparseFineTuning(make_rule(), save_path="", sparse_grad=sparse_grad, **budget)
    probe = _Probe(sft)
    make_trainer(root, 8, callbacks=[sft, probe], gradient_clip_val=0.05, **trainer_kwargs).fit(module, make_data())
    return module, probe


@pytest.mark.parametrize("rule", list(RULES))
def test_the_sampled_gradient_fit_equals_the_dense_reference(tiny_llama_dir: Path, tmp_path: Path, rule: str) -> None:
    dense, dense_probe = _fit(tiny_llama_dir, tmp_path / "dense", rule, sparse_grad=False)
    sampled, sampled_probe = _fit(tiny_llama_dir, tmp_path / "sampled", rule, sparse_grad=True)
    assert len(sampled_probe.masks) == len(dense_probe.masks) >= 4
    for step, (a, b) in enumerate(zip(dense_probe.masks, sampled_probe.masks)):
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), f"masks differ at step {step}"
    eligible = set(sampled_probe.grads[0])
    assert eligible and all(not d for d in sampled_probe.dense_grad), "a dense weight gradient on the sampled path"
    assert all(d == eligible for d in dense_probe.dense_grad)
    for step, (a, b) in enumerate(zip(dense_probe.grads, sampled_probe.grads)):
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=f"{name} at step {step}")
    for (name, p), (_, q) in zip(dense.named_parameters(), sampled.named_parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-4, msg=name)
    # the layers have their own forward back after the fit
    assert not any("forward" in vars(m) for m in sampled.backbone.modules())


def test_sparse_grad_is_checked_and_refused_where_it_cannot_apply(tiny_llama_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"^sparse_grad='yes' must be 'auto', True or False\.$"):
        SparseFineTuning(PrincipalWeights(), sparse_grad="yes")  # type: ignore[arg-type]
    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    two_ranks = types.SimpleNamespace(strategy=None, precision="32-true", world_size=2,
                                      precision_plugin=types.SimpleNamespace(scaler=None))  # fmt: skip
    scaled = types.SimpleNamespace(strategy=None, precision="16-mixed", world_size=1,
                                   precision_plugin=types.SimpleNamespace(scaler=object()))  # fmt: skip
    for trainer, reason in ((two_ranks, "DDP's reducer"), (scaled, "gradient scaler")):
        auto = SparseFineTuning(PrincipalWeights(), sparse_grad="auto")
        auto._choose_tensors(module.backbone, LayerMap.from_model(module.backbone))
        auto.phase = "sparse"
        auto.states = {n: CompactState.create(p.detach(), torch.arange(3)) for n, p in auto._params.items()}
        auto._sync_sampled_grads(trainer)  # type: ignore[arg-type]
        assert not auto._slots  # auto: the dense path
        forced = SparseFineTuning(PrincipalWeights(), sparse_grad=True)
        forced._model, forced.phase = module.backbone, "sparse"
        with pytest.raises(ValueError, match=rf"^sparse_grad=True computes .* but .*{reason}.*: pass sparse_grad="):
            forced._sync_sampled_grads(trainer)  # type: ignore[arg-type]


@pytest.mark.slow
def test_sampled_gradients_on_smollm2_equal_the_dense_ones(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, torch_dtype=torch.float32)
    model.requires_grad_(False)
    layers = model.model.layers[:2]  # two blocks' matrices: every shape of the model
    linears = {n: m for n, m in layers.named_modules() if isinstance(m, torch.nn.Linear)}
    for m in linears.values():
        m.weight.requires_grad_(True)
    tokens = torch.randint(0, model.config.vocab_size, (2, 48))
    model(tokens, labels=tokens).loss.backward()
    dense = {n: m.weight.grad.clone() for n, m in linears.items()}
    model.zero_grad(set_to_none=True)
    slots = {}
    for name, m in linears.items():
        rows, cols = m.weight.shape
        idx = torch.randperm(rows * cols)[: (rows + cols) * 8].sort().values  # LIFT's rank-8 count
        slots[name] = (idx, SampledGrad.of(m.weight.detach(), idx.int()))
        install(m, slots[name][1])
    model(tokens, labels=tokens).loss.backward()
    for name, (idx, slot) in slots.items():
        assert linears[name].weight.grad is None
        assert slot.grad is not None
        torch.testing.assert_close(slot.grad, dense[name].reshape(-1)[idx], rtol=1e-4, atol=1e-7, msg=name)


def test_lift_reads_no_theta0_during_its_fit(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an L1 pull no selection needs theta_0: reading every eligible tensor from the snapshot at each
    selection cost time and kept the snapshot file's pages resident (peak RSS)."""
    from lightning_ft.core.snapshot import PretrainedSnapshot

    reads: list[str] = []
    original = PretrainedSnapshot.get
    monkeypatch.setattr(
        PretrainedSnapshot, "get", lambda self, name, *a, **k: reads.append(name) or original(self, name, *a, **k)
    )
    sft = SparseFineTuning(PrincipalWeights(filter_rank=4, reselect_every=2), rank=2, save_path="")
    module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=1e-2, output_dir="")
    make_trainer(tmp_path, 4, callbacks=[sft]).fit(module, make_data())
    assert len([e for e in sft.events if e["event"] == "select"]) == 3  # at the start, after steps 1 and 3
    assert reads == [] and sft._theta0_sel == {}
