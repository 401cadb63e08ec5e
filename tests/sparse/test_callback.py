"""SparseFineTuning on a tiny Llama: each rule selects what it defines, the budgets and the compact optimizer
state, the dense-phase resume of LT-SFT, and bad combinations are refused. Only-selected-entries-change on every tiny
model and host, resume equality, the declared refusals and DDP of every rule are in tests/conformance."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers import Crash, CrashAt, SparseWatch, make_data, make_trainer
from helpers import one_thread  # noqa: F401  (autouse fixture: applies where imported)
from lightning_ft.callbacks import (
    HalfFineTuning,
    LotteryTicket,
    Magnitude,
    PrincipalWeights,
    Random,
    Sensitivity,
    SparseFineTuning,
)
from lightning_ft.core.layer_map import LayerMap
from lightning_ft.modules import CausalLMModule
from lightning_ft.sparse import SparseDelta


def _module(path: Path, **kwargs: Any) -> CausalLMModule:
    opts: dict[str, Any] = dict(learning_rate=1e-2, warmup_steps=2, weight_decay=0.1, output_dir="")
    opts.update(kwargs)
    return CausalLMModule(model=str(path), **opts)


def _theta0(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _assert_sparse(
    module: CausalLMModule, sft: SparseFineTuning, union: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
) -> None:
    """Eligible entries outside every mask and all non-eligible tensors equal theta_0 bit for bit."""
    lm = LayerMap.from_model(module.backbone)
    changed_any = False
    for info in lm:
        live = module.backbone.get_parameter(info.name).detach()
        ref = base[info.base_name]
        if info.name in sft._params:
            outside = ~union[info.name]
            assert torch.equal(live.reshape(-1)[outside], ref.reshape(-1)[outside]), info.name
            changed_any |= not torch.equal(live, ref)
        else:
            assert torch.equal(live, ref), f"{info.name} is not eligible but changed"
    assert changed_any


RULES = {
    "lottery_ticket": (lambda: LotteryTicket(dense_steps=4, l1=0.5), {"density": 0.05}),
    "principal_weights": (lambda: PrincipalWeights(filter_rank=4, reselect_every=3), {"rank": 2}),
    "sensitivity": (lambda: Sensitivity(batches=3), {"count": 700}),
    "magnitude": (lambda: Magnitude(), {"density": 0.05, "allocation": "per_matrix"}),
    "random": (lambda: Random(reselect_every=4), {"density": 0.05}),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_only_selected_entries_change_and_state_follows_the_mask(
    tiny_llama_dir: Path, tmp_path: Path, rule: str
) -> None:
    make_rule, budget = RULES[rule]
    sft = SparseFineTuning(make_rule(), **budget)
    watch = SparseWatch(sft)
    module = _module(tiny_llama_dir)
    trainer = make_trainer(tmp_path, 10, callbacks=[sft, watch], gradient_clip_val=0.5)
    trainer.fit(module, make_data())
    assert watch.checked >= 5
    _assert_sparse(module, sft, watch.union, _theta0(tiny_llama_dir))
    counts = {n: s.numel for n, s in sft.states.items()}
    total = sft.eligible_numel
    if "rank" in budget:
        for name, param in sft._params.items():
            m, n = param.shape
            assert counts[name] == min((m + n) * 2, m * n)
    elif "count" in budget:
        assert sum(counts.values()) == 700
    else:
        assert sum(counts.values()) == round(0.05 * total)
    # compact state: int32 index + two fp32 moments per selected entry, nothing for the rest
    assert sft.state_bytes == 12 * sum(counts.values())
    assert not any(p in trainer.optimizers[0].state for p in sft._params.values())
    artifact = SparseDelta.load(tmp_path / "sparse_delta.safetensors")
    assert artifact.numel <= sum(watch.union[n].sum().item() for n in watch.union)


def test_full_density_over_every_tensor_is_plain_adamw_bit_for_bit(tiny_llama_dir: Path, tmp_path: Path) -> None:
    def fit(callbacks: list[L.Callback]) -> CausalLMModule:
        torch.manual_seed(0)
        module = _module(tiny_llama_dir)
        make_trainer(tmp_path, 6, callbacks=callbacks, gradient_clip_val=0.5).fit(module, make_data())
        return module

    dense = fit([])
    # the dense, masked gradient: the compact AdamW's arithmetic is what this checks (the sampled gradient is only
    # allclose to the dense one, see test_sparse_grad.py)
    sparse = fit([SparseFineTuning(Magnitude(), targets=".*", density=1.0, save_path="", sparse_grad=False)])
    for (name, p), (_, q) in zip(dense.named_parameters(), sparse.named_parameters()):
        assert torch.equal(p, q), name


class _AtSwitch(L.Callback):
    """Keeps |theta - theta_0| of every eligible tensor right before LotteryTicket's switch."""

    def __init__(self, sft: SparseFineTuning, step: int) -> None:
        self.sft, self.step = sft, step
        self.moved: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step and not self.moved:
            snap = self.sft._snapshot
            assert snap is not None
            self.moved = {n: snap.delta(self.sft._model, n).abs().reshape(-1) for n in self.sft._params}


def test_lottery_ticket_keeps_the_most_moved_entries_rewinds_and_restarts(tiny_llama_dir: Path, tmp_path: Path) -> None:
    sft = SparseFineTuning(LotteryTicket(dense_steps=4), density=0.03)
    at = _AtSwitch(sft, 4)
    watch = SparseWatch(sft)
    module = _module(tiny_llama_dir)
    trainer = make_trainer(tmp_path, 9, callbacks=[at, sft, watch])  # _AtSwitch runs before the switch
    trainer.fit(module, make_data())
    chosen = torch.cat([torch.isin(torch.arange(at.moved[n].numel()), sft.selected[n]) for n in sft._params])
    moved = torch.cat([at.moved[n] for n in sft._params])
    assert int(chosen.sum()) == round(0.03 * moved.numel())
    assert moved[chosen].min() >= moved[~chosen].max()  # the top-k by |theta - theta_0|
    # rewind: after the switch every unselected eligible entry is theta_0 again (dense-phase moves undone)
    _assert_sparse(module, sft, watch.union, _theta0(tiny_llama_dir))
    # fresh schedule: the first sparse step uses the warmup's first learning rate again
    assert watch.lrs[4] == watch.lrs[0] and watch.lrs[1] != watch.lrs[0]
    assert [e["event"] for e in sft.events] == ["dense_phase", "select", "rewind"]


def test_principal_weights_are_the_largest_entries_of_the_low_rank_approximation(tiny_llama_dir: Path) -> None:
    from lightning_ft.sparse import SelectionContext

    module = _module(tiny_llama_dir)
    rule = PrincipalWeights(filter_rank=3)
    sft = SparseFineTuning(rule, rank=1)
    strategy = L.Trainer(accelerator="cpu", logger=False).strategy
    sft.setup(types.SimpleNamespace(strategy=strategy, callbacks=[sft]), module, "fit")  # type: ignore[arg-type]
    chosen = sft.choose(SelectionContext(sft._model, sft._params, sft._snapshot, 0, 0))
    flipped = SparseFineTuning(PrincipalWeights(filter_rank=3, largest=False), rank=1)
    flipped.setup(types.SimpleNamespace(strategy=strategy, callbacks=[flipped]), module, "fit")  # type: ignore[arg-type]
    smallest = flipped.choose(SelectionContext(sft._model, sft._params, sft._snapshot, 0, 0))
    for name, param in sft._params.items():
        u, s, vh = torch.linalg.svd(param.detach().double(), full_matrices=False)
        approx = ((u[:, :3] * s[:3]) @ vh[:3]).abs().reshape(-1)
        k = min(sum(param.shape), param.numel())
        assert chosen[name].numel() == k
        assert set(chosen[name].tolist()) == set(approx.topk(k).indices.tolist()), name
        assert set(smallest[name].tolist()) == set(approx.topk(k, largest=False).indices.tolist()), name


def test_sensitivity_ranks_by_summed_squared_gradients(tiny_llama_dir: Path, tmp_path: Path) -> None:
    # oracle: the first two batches of a fresh loader, gradients squared and summed, one global top-300
    reference = _module(tiny_llama_dir)
    oracle_data = make_data()
    oracle_data.tokenizer = reference.tokenizer
    oracle_data.setup("fit")
    sft = SparseFineTuning(Sensitivity(batches=2), count=300, save_path="")
    module = _module(tiny_llama_dir)
    make_trainer(tmp_path, 1, callbacks=[sft]).fit(module, make_data())
    names = list(sft._params)
    grads = {n: torch.zeros_like(reference.backbone.get_parameter(n)) for n in names}
    for _, batch in zip(range(2), oracle_data.train_dataloader()):
        reference.zero_grad()
        reference.compute_loss(batch).backward()
        for n in names:
            grads[n] += reference.backbone.get_parameter(n).grad ** 2
    flat = torch.cat([grads[n].reshape(-1) for n in names])
    offsets = [0, *torch.tensor([grads[n].numel() for n in names]).cumsum(0).tolist()]
    got = {offsets[i] + j for i, n in enumerate(names) for j in sft.selected[n].tolist()}
    assert len(got) == 300
    assert flat[list(got)].min() >= flat[[j for j in range(flat.numel()) if j not in got]].max()
    assert sft.events[0]["event"] == "select" and sft.events[0]["step"] == 0


@pytest.mark.parametrize(
    ("rule", "crash"), [("lottery_ticket", 3)], ids=["lt-dense-phase"]
)  # the sparse phase and LIFT's re-selection: tests/conformance
def test_resumed_run_equals_uninterrupted(tiny_llama_dir: Path, tmp_path: Path, rule: str, crash: int) -> None:
    make_rule = {"lottery_ticket": lambda: LotteryTicket(dense_steps=4, l1=0.5),
                 "principal_weights": lambda: PrincipalWeights(filter_rank=4, reselect_every=3)}[rule]  # fmt: skip
    budget = {"lottery_ticket": {"density": 0.05}, "principal_weights": {"rank": 2}}[rule]

    def run(
        root: Path, ckpt: str | None = None, crash_at: int | None = None
    ) -> tuple[CausalLMModule, SparseFineTuning]:
        L.seed_everything(0)
        module = _module(tiny_llama_dir)
        sft = SparseFineTuning(make_rule(), **budget)
        callbacks: list[L.Callback] = [
            sft,
            ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1),
        ]
        if crash_at is not None:
            callbacks.append(CrashAt(crash_at))
        trainer = make_trainer(root, 10, enable_checkpointing=True, callbacks=callbacks, gradient_clip_val=0.5)
        trainer.fit(module, make_data(), ckpt_path=ckpt)
        return module, sft

    full, full_sft = run(tmp_path / "a")
    with pytest.raises(Crash):
        run(tmp_path / "b", crash_at=crash)
    resumed, resumed_sft = run(tmp_path / "c", ckpt=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    assert [e["event"] for e in full_sft.events] == [e["event"] for e in resumed_sft.events]
    for name, state in full_sft.states.items():
        other = resumed_sft.states[name]
        assert torch.equal(state.indices, other.indices) and torch.equal(state.exp_avg_sq, other.exp_avg_sq)
        assert state.step == other.step


def test_selection_events_and_densities_reach_the_logger(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from helpers import Recorder

    recorder = Recorder()
    sft = SparseFineTuning(PrincipalWeights(filter_rank=2, reselect_every=2), rank=1, save_path="")
    make_trainer(tmp_path, 4, callbacks=[sft], logger=recorder).fit(_module(tiny_llama_dir), make_data())
    events = [(step, m) for step, m in recorder.metrics if "sparse/selections" in m]
    assert [int(m["sparse/selections"]) for _, m in events] == [1, 2, 3]
    assert [step for step, _ in events] == [0, 1, 3]  # after step s when (s + 1) % 2 == 0; none after the last
    first = events[0][1]
    assert {"sparse/density/block_0", "sparse/density/block_1", "sparse/density", "sparse/state_mib"} <= set(first)
    assert 0 < first["sparse/density/block_0"] < 1


def test_artifact_applied_to_the_base_reproduces_the_fine_tuned_model(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from lightning_ft.sparse import apply_sparse

    sft = SparseFineTuning(PrincipalWeights(filter_rank=4, reselect_every=2), rank=1)  # masks change: union saved
    module = _module(tiny_llama_dir, output_dir=str(tmp_path / "hf"))
    trainer = make_trainer(
        tmp_path, 5, callbacks=[sft, ModelCheckpoint(dirpath=tmp_path / "ckpt")], enable_checkpointing=True
    )
    trainer.fit(module, make_data())
    assert sft.artifact_path == tmp_path / "ckpt" / "sparse_delta.safetensors"
    out = apply_sparse(str(tiny_llama_dir), [sft.artifact_path], tmp_path / "applied")
    applied = AutoModelForCausalLM.from_pretrained(out).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    for key, value in trained.items():
        torch.testing.assert_close(applied[key], value, rtol=0, atol=1e-6, msg=key)


def test_bf16_mixed_precision_keeps_unselected_entries_exact(tiny_llama_dir: Path, tmp_path: Path) -> None:
    sft = SparseFineTuning(Random(), density=0.05, save_path="")
    watch = SparseWatch(sft)
    module = _module(tiny_llama_dir)
    make_trainer(tmp_path, 4, callbacks=[sft, watch], precision="bf16-mixed").fit(module, make_data())
    _assert_sparse(module, sft, watch.union, _theta0(tiny_llama_dir))


def test_refusals_are_one_sentence(tiny_llama_dir: Path, tmp_path: Path) -> None:
    def one_sentence(err: pytest.ExceptionInfo[BaseException]) -> None:
        assert "\n" not in str(err.value) and str(err.value).count(". ") == 0

    with pytest.raises(ValueError, match="give one budget, not density and rank") as err:
        SparseFineTuning(Magnitude(), density=0.1, rank=4)
    one_sentence(err)
    with pytest.raises(ValueError, match=r"density=1.5 must be in \(0, 1\]"):
        SparseFineTuning(Magnitude(), density=1.5)
    with pytest.raises(ValueError, match="dense_steps=0 must be at least 1"):
        LotteryTicket(dense_steps=0)
    module = _module(tiny_llama_dir)
    trainer = make_trainer(tmp_path, 1)
    with pytest.raises(ValueError, match="not a parameter kind") as err:
        SparseFineTuning(Magnitude(), targets=["attention", "mlpp"]).setup(trainer, module, "fit")
    one_sentence(err)
    with pytest.raises(ValueError, match=r"targets='norm' matches no 2-D weight, and PrincipalWeights scores") as err:
        SparseFineTuning(PrincipalWeights(), targets="norm").setup(trainer, module, "fit")
    one_sentence(err)
    mixed = SparseFineTuning(PrincipalWeights(), targets=["matrices", "norm"])  # norms are skipped, not refused
    mixed.setup(trainer, module, "fit")
    assert mixed._params and all(p.ndim == 2 for p in mixed._params.values())
    with pytest.raises(ValueError, match="matches no parameter"):
        SparseFineTuning(Magnitude(), targets=r"nothing\.here").setup(trainer, module, "fit")
    both = make_trainer(tmp_path, 1, callbacks=[SparseFineTuning(Magnitude()), HalfFineTuning()])
    with pytest.raises(ValueError, match="SparseFineTuning and HalfFineTuning both decide which weights train"):
        both.fit(_module(tiny_llama_dir), make_data())
    # FSDP, LoRA and quantized backbones: the declared refusals, tests/conformance
    sgd = make_trainer(tmp_path, 1, callbacks=[SparseFineTuning(Magnitude(), save_path="")])
    plain = _module(tiny_llama_dir)
    plain.configure_optimizers = lambda: torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=0.1)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="use Adam or AdamW in configure_optimizers"):
        sgd.fit(plain, make_data())


@pytest.mark.slow
def test_encoder_classifier_trains_a_new_head_densely_and_the_encoder_sparsely(tmp_path: Path) -> None:
    from lightning_ft.data import ClassificationDataModule
    from lightning_ft.modules import SequenceClassificationModule

    L.seed_everything(0)
    module = SequenceClassificationModule(
        model="minilm-l6", num_labels=2, learning_rate=1e-3, warmup_steps=2, output_dir=""
    )
    sft = SparseFineTuning(Sensitivity(batches=2), density=0.01, dense="head", save_path="")
    dm = ClassificationDataModule(train_size=64, val_size=16, test_size=0, control_size=0, batch_size=8)
    before = {n: p.detach().clone() for n, p in module.backbone.named_parameters()}
    make_trainer(tmp_path, 4, callbacks=[sft]).fit(module, dm)
    live = dict(module.backbone.named_parameters())
    assert any("classifier" in n for n in sft._dense_params)
    for name in sft._dense_params:  # the new head (and anything else the layer map calls head) trains densely
        assert not torch.equal(live[name], before[name]), name
    moved = sum(int((live[n] != before[n]).sum()) for n in sft._params)
    assert 0 < moved <= sum(s.numel for s in sft.states.values())
    frozen = [n for n in live if n not in sft._params and n not in sft._dense_params]
    assert frozen and all(torch.equal(live[n], before[n]) for n in frozen)  # embeddings, norms, biases
