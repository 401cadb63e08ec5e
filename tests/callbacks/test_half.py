"""HalfFineTuning: the per-block counts of the draw, exactly the chosen half trains, half-reset, redraw
schedules (steps, epoch, task boundary), logging, ``module=``, refusals and SmolLM2. Only-the-half-changes, resume
equality (redraw fit and steps), the declared refusals and DDP of every method are in tests/conformance."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import (
    Crash,
    CrashAt,
    Recorder,
    SelectionWatch,
    UserModule,
    first_batch_loss,
    make_data,
    make_trainer,
    one_thread,  # noqa: F401  (autouse fixture: applies where imported)
    token_batches,
)

from lightning_ft.callbacks.half import HalfFineTuning, hft_frozen
from lightning_ft.core.layer_map import LayerMap, ParamKind
from lightning_ft.modules import CausalLMModule


def _llama_map(blocks: int = 4) -> LayerMap:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=blocks,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LayerMap.from_model(LlamaForCausalLM(cfg))


def test_draw_has_the_hft_counts_per_block() -> None:
    lm = _llama_map(6)
    names = lm.names
    draws = []
    for index in range(5):
        frozen = hft_frozen(lm, names, seed=3, index=index)
        draws.append(frozenset(frozen))
        mlp_counts = Counter()
        for block in range(6):
            infos = [i for i in lm if i.block == block and i.name in frozen]
            kinds = Counter(i.kind for i in infos)
            assert sum(kinds[k] for k in (ParamKind.ATTN_Q, ParamKind.ATTN_K, ParamKind.ATTN_V, ParamKind.ATTN_O)) == 2
            assert kinds[ParamKind.NORM] == 1
            mlp_counts[sum(kinds[k] for k in (ParamKind.MLP_GATE, ParamKind.MLP_UP, ParamKind.MLP_DOWN))] += 1
        assert mlp_counts == {2: 3, 1: 3}  # 2 of 3 frozen in half of the blocks, 1 in the other half
        assert not any(lm[n].block is None for n in frozen)  # embeddings, final norm and head train
        assert frozen == hft_frozen(lm, names, seed=3, index=index)  # a pure function of (seed, index)
    assert len(set(draws)) == 5  # each stage draws a new half
    outside = hft_frozen(lm, names, seed=3, index=0, freeze_outside=["embedding", "head"])
    assert {lm[n].kind for n in outside if lm[n].block is None} == {ParamKind.EMBEDDING, ParamKind.HEAD}


def test_draw_halves_other_layouts(tiny_gpt2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    lm = LayerMap.from_model(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir))
    frozen = hft_frozen(lm, lm.names, seed=0, index=0)
    for block in range(lm.num_blocks):
        modules = {n.rsplit(".", 1)[0] for n in frozen if lm[n].block == block}
        assert len(modules) == 3  # 1 of {c_attn, attn.c_proj}, 1 of {c_fc, mlp.c_proj}, 1 of {ln_1, ln_2}
        assert all(f"{m}.bias" in frozen for m in modules if f"{m}.bias" in lm)  # weight and bias together


@pytest.mark.parametrize("reset", [False, True])
def test_exactly_the_drawn_half_trains_and_frozen_stay_put(tiny_llama_dir: Path, tmp_path: Path, reset: bool) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=1e-2, warmup_steps=0, weight_decay=0.1, output_dir="")
    hft = HalfFineTuning(redraw="steps", every_n_steps=2, reset=reset, seed=1)
    watch = SelectionWatch(hft, reset=reset)
    recorder = Recorder()
    make_trainer(tmp_path, 6, callbacks=[hft, watch], logger=recorder, log_every_n_steps=1).fit(module, make_data())
    assert watch.steps_checked == 6 and hft.draws == 3
    assert len({active for _, active in watch.history}) == 3  # three different halves
    assert all(p.requires_grad for p in module.parameters())  # every tensor trainable again after fit
    logged = [m for _, m in recorder.metrics if "selection/trainable_fraction" in m]
    assert len(logged) >= 6 and {"selection/block_00", "selection/block_01", "selection/blocks_on"} <= set(logged[0])
    assert 0.4 < logged[0]["selection/trainable_fraction"] < 1.0  # embeddings (tied head) dominate the tiny model


def test_default_stage_freezes_before_the_optimizer_is_built(tiny_llama_dir: Path, tmp_path: Path) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=1e-2, warmup_steps=0, output_dir="")
    hft = HalfFineTuning(seed=2)
    watch = SelectionWatch(hft)
    make_trainer(tmp_path, 3, callbacks=[hft, watch]).fit(module, make_data())
    assert hft.draws == 1 and len({a for _, a in watch.history}) == 1
    optimizer = module.trainer.optimizers[0]
    n_opt = sum(len(g["params"]) for g in optimizer.param_groups)
    first = watch.history[0][1]
    assert n_opt == len(first) < len(hft.selection.candidates)  # the optimizer never held the frozen half
    watch = SelectionWatch(hft)
    make_trainer(tmp_path, 2, callbacks=[hft, watch]).fit(module, make_data())  # a second stage: a new half
    assert hft.draws == 2 and watch.history[0][1] != first


def _run(root: Path, model: Path, make_cb: Any, steps: int, ckpt: str | None = None, crash: int | None = None) -> tuple:
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    module = CausalLMModule(model=str(model), learning_rate=5e-3, warmup_steps=2, output_dir="")
    selector = make_cb()
    watch = SelectionWatch(selector, reset=selector.reset)
    callbacks: list[L.Callback] = [ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1),
                                   selector, watch]
    if crash is not None:
        callbacks.append(CrashAt(crash))
    trainer = make_trainer(root, steps, enable_checkpointing=True, callbacks=callbacks)
    trainer.fit(module, make_data(train_size=16), ckpt_path=ckpt)  # 4 batches per epoch: crosses epochs
    return module, selector, watch


@pytest.mark.parametrize("redraw", ["epoch"])  # fit and steps: tests/conformance
def test_resumed_run_equals_uninterrupted(tiny_llama_dir: Path, tmp_path: Path, redraw: str) -> None:
    def make() -> HalfFineTuning:
        steps = 3 if redraw == "steps" else None
        return HalfFineTuning(redraw=redraw, every_n_steps=steps, reset=redraw != "fit", seed=5)  # type: ignore[arg-type]

    full, full_cb, full_watch = _run(tmp_path / "a", tiny_llama_dir, make, 9)
    with pytest.raises(Crash):  # last.ckpt is from step 6 (ModelCheckpoint runs after the other callbacks)
        _run(tmp_path / "b", tiny_llama_dir, make, 9, crash=7)
    resumed, cb, watch = _run(tmp_path / "c", tiny_llama_dir, make, 9, ckpt=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    assert (cb.draws, cb.key) == (full_cb.draws, full_cb.key)
    assert [s for s, _ in watch.history] == [6, 7, 8]
    assert watch.history == full_watch.history[6:]  # same selection at every resumed step (a redraw at step 6)
    assert watch.requires_grad == full_watch.requires_grad[6:]  # requires_grad restored (Lightning's own loses it)


def test_task_boundary_redraw_in_a_sequential_run(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from lightning_ft.data.sequential import SequentialDataModule

    task = dict(label_options=["positive", "negative"], train_size=8, val_size=4, test_size=0, control_size=0,
                batch_size=4, max_length=48)
    data = SequentialDataModule(tasks=[task, dict(task, split_seed=99, prompt_template="Text: {text}\nLabel:")])
    module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=1e-2, warmup_steps=0, output_dir="")
    hft = HalfFineTuning(redraw="task", reset=True)
    watch = SelectionWatch(hft, reset=True)
    trainer = make_trainer(tmp_path, -1, max_epochs=2, reload_dataloaders_every_n_epochs=1, callbacks=[hft, watch])
    trainer.fit(module, data)
    steps = [(s, a) for s, a in watch.history]
    assert hft.draws == 2 and hft.key == 1 and len(steps) == 4
    assert steps[0][1] == steps[1][1] != steps[2][1] == steps[3][1]  # redraw exactly at the task boundary
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs=1"):
        make_trainer(tmp_path, 1).fit(CausalLMModule(model=str(tiny_llama_dir), output_dir=""), SequentialDataModule([task, task]))


@pytest.mark.parametrize("attr", ["nets.lm"])  # module=None: tests/conformance
def test_drop_in_on_a_user_module(tiny_llama_dir: Path, tmp_path: Path, attr: str | None) -> None:
    module = UserModule(str(tiny_llama_dir))
    hft = HalfFineTuning(module=attr, redraw="steps", every_n_steps=2)
    watch = SelectionWatch(hft)
    make_trainer(tmp_path, 4, callbacks=[hft, watch]).fit(module, token_batches())
    assert watch.steps_checked == 4 and hft.selection.model is module.nets["lm"]


def test_refusals_are_one_sentence(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="every_n_steps=None goes with redraw='steps'"):
        HalfFineTuning(redraw="steps")
    with pytest.raises(ValueError, match="freeze_outside"):
        HalfFineTuning(freeze_outside=["attention"])
    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")  # LoRA, nf4, FSDP: tests/conformance
    ddp = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    with pytest.raises(ValueError, match="use strategy='ddp_find_unused_parameters_true'"):
        HalfFineTuning(redraw="epoch").setup(ddp, module, "fit")
    with pytest.raises(ValueError, match="redraw='task' needs a DataModule with a task_index"):
        HalfFineTuning(redraw="task").setup(make_trainer(tmp_path, 1), module, "fit")


class _FirstSelection(L.Callback):
    def __init__(self, hft: HalfFineTuning) -> None:
        self.hft, self.active = hft, frozenset()

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.active = self.active or frozenset(self.hft.selection.active)


@pytest.mark.slow
def test_smollm2_hft_learns_with_half_the_blocks(smollm2_dir: Path, tmp_path: Path) -> None:
    module = CausalLMModule(model=str(smollm2_dir), learning_rate=1e-4, warmup_steps=0, output_dir="")
    data, batch, loss_before = first_batch_loss(module, train_size=48, batch_size=4, max_length=40)
    before = {n: p.detach().clone() for n, p in module.backbone.named_parameters() if ".layers.3." in n}
    hft = HalfFineTuning()
    first = _FirstSelection(hft)
    make_trainer(tmp_path, 12, callbacks=[hft, first], gradient_clip_val=1.0).fit(module, data)
    with torch.no_grad():
        loss_after = module.compute_loss(batch).item()
    matrices = [n for n in hft.selection.candidates if hft.layer_map[n].is_matrix]
    assert sum(n in first.active for n in matrices) * 2 == len(matrices)  # exactly half of the 7 x 30 matrices
    for name, value in before.items():  # block 3: the frozen half is untouched, the trained half moved
        moved = not torch.equal(value, module.backbone.get_parameter(name))
        assert moved == (name in first.active), name
    assert loss_after < loss_before - 0.1


class _BackwardProducts(L.Callback):
    """Counts the matrix products of each backward pass and records which candidates hold a gradient after it."""

    def __init__(self, selector: Any) -> None:
        self.selector = selector
        self.products: list[int] = []
        self.with_grad: list[frozenset[str]] = []
        self.active: list[frozenset[str]] = []
        self._mode: Any = None

    def on_before_backward(self, *args: Any) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.products

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                counts[-1] += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)
                return func(*args, **(kwargs or {}))

        self.products.append(0)
        self._mode = Count()
        self._mode.__enter__()

    def on_after_backward(self, *args: Any) -> None:
        self._mode.__exit__(None, None, None)
        sel = self.selector.selection if self.selector is not None else None
        if sel is not None:
            self.with_grad.append(frozenset(n for n in sel.candidates if sel.params[n].grad is not None))
            self.active.append(frozenset(sel.active))


def _selectors() -> dict[str, Any]:
    from lightning_ft.callbacks import LayerFreezing, LayerwiseSampling

    return {
        "hft": lambda: HalfFineTuning(seed=1),
        "hft_steps": lambda: HalfFineTuning(redraw="steps", every_n_steps=1, seed=1),
        "lisa": lambda: LayerwiseSampling(num_active=1, interval=1, seed=1),
        "freezing": lambda: LayerFreezing(train_kinds=["embedding"], train_blocks=[-1]),
    }


@pytest.mark.parametrize("method", list(_selectors()))
def test_frozen_tensors_cost_no_weight_gradient(tiny_llama_dir: Path, tmp_path: Path, method: str) -> None:
    """The speed of the selection methods: a frozen matrix skips its weight-gradient product (one of the two products
    of its backward) and no frozen tensor receives a gradient, not even one dropped before the optimizer step.

    The (tied) embedding trains in every case, so the backward reaches the bottom block and only the weight-gradient
    products can be saved."""
    counts: dict[str, _BackwardProducts] = {}
    for name, make in (("full", None), (method, _selectors()[method])):
        L.seed_everything(0)
        module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=1e-2, warmup_steps=0, output_dir="")
        selector = make() if make is not None else None
        counts[name] = _BackwardProducts(selector)
        callbacks = [selector, counts[name]] if selector is not None else [counts[name]]
        make_trainer(tmp_path / name, 3, callbacks=callbacks, gradient_clip_val=1.0).fit(module, make_data())
    full, run = counts["full"], counts[method]
    layer_map = run.selector.layer_map
    assert len(full.products) == len(run.products) == 3 and len(set(full.products)) == 1
    for products, active, with_grad in zip(run.products, run.active, run.with_grad):
        frozen_matrices = [n for n in run.selector.selection.candidates if n not in active and layer_map[n].is_matrix]
        assert frozen_matrices and with_grad == active  # gradients exactly on the trainable tensors
        assert products == full.products[0] - len(frozen_matrices)  # one product saved per frozen matrix
