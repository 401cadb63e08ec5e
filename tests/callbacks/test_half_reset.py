"""HalfFineTuning's reset (issue #14 item 4): the paper's Half-Reset toward a distinct base model, the reset at
each redraw, the default target of a later stage (its own starting weights), fresh Adam state for reset tensors,
and refusals of a bad ``reset_to``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from helpers import SelectionWatch, make_data, make_trainer
from helpers import one_thread  # noqa: F401  (autouse fixture: applies where imported)

from lightning_ft.callbacks.half import HalfFineTuning, hft_frozen
from lightning_ft.modules import CausalLMModule


def _save_llama(tiny_llama_dir: Path, path: Path, seed: int, **changes: Any) -> Path:
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norms start at one in every random Llama: make every tensor distinct
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A distinct "base" of the tiny Llama (the "chat" model): same config, another seed."""
    return _save_llama(tiny_llama_dir, tmp_path_factory.mktemp("base") / "base", seed=1)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


class ResetCheck(L.Callback):
    """At every batch start: tensors frozen at the draw that just happened hold ``target`` exactly, every other
    candidate holds its value from the end of the previous step (fit start: ``start``). After every step, each
    active tensor's AdamW ``step`` counts the steps since it last became active (state of a reset tensor is gone).
    """

    def __init__(self, hft: HalfFineTuning, start: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
        self.hft, self.target = hft, target
        self.prev = {n: t.clone() for n, t in start.items()}
        self.prev_active: set[str] | None = None
        self.age: dict[str, int] = {}
        self.reset: set[str] = set()
        self.reactivated: set[str] = set()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        sel = self.hft.selection
        was = set(sel.candidates) if self.prev_active is None else self.prev_active
        for name in sel.candidates:
            live = sel.params[name].detach()
            if name in was and name not in sel.active:
                assert torch.equal(live, self.target[name]), f"{name} was not reset to the target"
                self.reset.add(name)
            else:
                assert torch.equal(live, self.prev[name]), f"{name} changed at the draw"
        for name in sel.candidates:
            if name not in sel.active:
                self.age.pop(name, None)
            elif name not in self.age and self.prev_active is not None and name in self.reset:
                self.reactivated.add(name)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        sel = self.hft.selection
        state = trainer.optimizers[0].state
        for name in sel.active:
            self.age[name] = self.age.get(name, 0) + 1
            assert int(state[sel.params[name]]["step"]) == self.age[name], f"{name} kept stale Adam state"
        self.prev = {n: p.detach().clone() for n, p in sel.params.items()}
        self.prev_active = set(sel.active)


def test_fit_draw_is_the_papers_half_reset(tiny_llama_dir: Path, base_dir: Path, tmp_path: Path) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), output_dir=str(tmp_path / "out"))
    hft = HalfFineTuning(reset=True, reset_to=str(base_dir), seed=3)
    make_trainer(tmp_path, 0, callbacks=[hft]).fit(module, make_data())  # no training: the Half-Reset alone
    frozen = hft_frozen(hft.layer_map, hft.selection.candidates, seed=3, index=0)
    chat, base, saved = _weights(tiny_llama_dir), _weights(base_dir), _weights(tmp_path / "out")
    assert 0 < len(frozen) < len(hft.selection.candidates) and saved.keys() == chat.keys()
    assert not any(torch.equal(chat[key], base[key]) for key in chat)  # a distinct base: every tensor differs
    for key, value in saved.items():
        assert torch.equal(value, base[key] if key in frozen else chat[key]), key


def test_each_redraw_resets_the_newly_frozen_tensors_to_the_base(
    tiny_llama_dir: Path, base_dir: Path, tmp_path: Path
) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=1e-2, warmup_steps=0, output_dir="")
    hft = HalfFineTuning(redraw="steps", every_n_steps=2, reset=True, reset_to=str(base_dir), seed=1)
    check = ResetCheck(hft, _weights(tiny_llama_dir), _weights(base_dir))
    make_trainer(tmp_path, 6, callbacks=[hft, check, SelectionWatch(hft, reset=True)]).fit(module, make_data())
    assert hft.draws == 3 and check.reset and check.reactivated  # reset at 3 draws; some reset tensors trained again


@pytest.mark.parametrize("redraw", ["fit", "steps"])
def test_a_later_stage_resets_to_its_own_start_not_to_the_first_load(
    tiny_llama_dir: Path, tmp_path: Path, redraw: str
) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=1e-2, warmup_steps=0, output_dir="")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps = 2 if redraw == "steps" else None
        hft = HalfFineTuning(redraw=redraw, every_n_steps=steps, reset=True, seed=1)  # type: ignore[arg-type]
    loaded = _weights(tiny_llama_dir)
    check = ResetCheck(hft, loaded, loaded)
    make_trainer(tmp_path, 4, callbacks=[hft, check]).fit(module, make_data())  # stage one
    stage_start = {n: p.detach().clone() for n, p in hft.selection.params.items()}
    check = ResetCheck(hft, stage_start, stage_start)
    make_trainer(tmp_path, 4, callbacks=[hft, check]).fit(module, make_data())  # stage two
    trained_in_stage_one = {n for n in check.reset if not torch.equal(stage_start[n], loaded[n])}
    assert trained_in_stage_one  # stage two froze tensors that stage one trained, and kept their trained values
    no_op = ["HalfFineTuning(reset=True, redraw='fit') without reset_to changes nothing: the half frozen at the draw "
             "already holds this stage's starting weights; set reset_to to the base model for the paper's Half-Reset."]
    assert [str(w.message) for w in caught] == (no_op if redraw == "fit" else [])


def test_bad_reset_to_is_refused_in_one_sentence(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^reset_to='x' is the target of the half-reset: set reset=True as well\.$"):
        HalfFineTuning(reset_to="x")
    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    trainer = make_trainer(tmp_path, 1)
    missing = str(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"reset_to='.*missing' is neither a folder nor a bundled model alias"):
        HalfFineTuning(reset=True, reset_to=missing).setup(trainer, module, "fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"cannot be the reset target of LlamaForCausalLM: .*empty holds no model"):
        HalfFineTuning(reset=True, reset_to=str(tmp_path / "empty")).setup(trainer, module, "fit")
    wide = _save_llama(tiny_llama_dir, tmp_path / "wide", seed=2, intermediate_size=48)
    with pytest.raises(ValueError, match=r"cannot be the reset target .*'model\.layers\.0\.mlp\.\w+_proj\.weight' has "
                                         r"shape \(\d+, \d+\) in .*wide but \(\d+, \d+\) in the model; give a model"):
        HalfFineTuning(redraw="epoch", reset=True, reset_to=str(wide)).setup(trainer, module, "fit")
