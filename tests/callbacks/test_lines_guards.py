"""LiNeS refuses what it cannot do well: alpha/beta outside the documented range (NaN and infinities
included), an edit whose result is not finite (nothing is written), and ``alpha="auto"`` without control data."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ft.callbacks.lines import LiNeS
from lightning_ft.modules import CausalLMModule
from helpers import make_data, make_trainer
from helpers import one_thread  # noqa: F401  (autouse fixture: applies where imported)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(alpha=2.0), "LiNeS alpha=2.0 must be a finite number in [0, 1] or 'auto'."),
        (dict(alpha=-0.1), "LiNeS alpha=-0.1 must be a finite number in [0, 1] or 'auto'."),
        (dict(alpha=math.nan), "LiNeS alpha=nan must be a finite number in [0, 1] or 'auto'."),
        (dict(alpha=math.inf), "LiNeS alpha=inf must be a finite number in [0, 1] or 'auto'."),
        (dict(alpha="best"), "LiNeS alpha='best' must be a number in [0, 1] or 'auto'."),
        (dict(alpha=0.5, beta=math.nan), "LiNeS beta=nan must be a finite number in [0, 1]."),
        (dict(alpha=0.5, beta=-0.2), "LiNeS beta=-0.2 must be a finite number in [0, 1]."),
        (dict(alpha=0.3, beta=0.8), "LiNeS beta=0.8 with alpha=0.3 gives the last block the factor 1.1 > 1: "
                                    "choose beta in [0, 0.7] (1 - alpha) or leave it unset."),
        (dict(alpha="auto", alphas=[0.2, 0.6], beta=0.5), "LiNeS beta=0.5 with the largest of alphas=0.6 gives "
                                                          "the last block the factor 1.1 > 1: choose beta in "
                                                          "[0, 0.4] (1 - alpha) or leave it unset."),
        (dict(alpha="auto", alphas=[0.5, math.nan]), "LiNeS alphas=[0.5, nan] must be a non-empty list of finite "
                                                     "numbers in [0, 1]."),
        (dict(alpha="auto", alphas=[]), "LiNeS alphas=[] must be a non-empty list of finite numbers in [0, 1]."),
        (dict(alpha=0.5, head_scale=math.inf), "LiNeS head_scale=inf must be a finite number in [0, 1]."),
        (dict(alpha=0.5, target_weight=math.nan), "LiNeS target_weight=nan must be a finite number >= 0 "
                                                  "(official: 2)."),
    ],
)  # fmt: skip
def test_out_of_range_or_non_finite_arguments_are_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        LiNeS(**kwargs)
    assert str(err.value) == message


def test_documented_range_edges_are_accepted() -> None:
    assert LiNeS(alpha=0.7, beta=0.3).beta == 0.3  # 0.7 + 0.3 is 0.9999999999999999 or 1.0: the last block gets 1
    assert LiNeS(alpha=0.0, beta=1.0).alpha == 0.0 and LiNeS(alpha=1, beta=0).alpha == 1.0
    assert LiNeS(alpha="auto", alphas=[0.0, 0.5], beta=0.5, head_scale=0.0).alphas == [0.0, 0.5]


class _Record(L.Callback):
    """Placed before LiNeS: keeps the fine-tuned weights as they are just before the edit."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.theta = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


class _Poison(_Record):
    """Placed before LiNeS: one fine-tuned entry becomes infinite just before the edit."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with torch.no_grad():
            pl_module.backbone.model.layers[1].mlp.up_proj.weight[0, 0] = math.inf
        super().on_train_end(trainer, pl_module)


def test_a_non_finite_edit_is_refused_and_nothing_is_written(tiny_llama_dir: Path, tmp_path: Path) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=1e-2, warmup_steps=0,
                            output_dir=str(tmp_path / "hf"))  # fmt: skip
    poison, ckpt = _Poison(), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    trainer = make_trainer(tmp_path, 2, enable_checkpointing=True, callbacks=[poison, LiNeS(alpha=0.3), ckpt])
    with pytest.raises(FloatingPointError, match=r"^LiNeS\(alpha=0.3\) would write NaN or infinity into "
                                                 r"model\.layers\.1\.mlp\.up_proj\.weight ") as err:
        trainer.fit(module, make_data())
    assert "\n" not in str(err.value)
    for name, param in module.named_parameters():  # no tensor edited, the poisoned one included
        assert torch.equal(param.detach(), poison.theta[name]), name
    assert not (tmp_path / "hf").exists()  # the HF folder is not written
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)  # last.ckpt is step 2's, before LiNeS
    assert last["global_step"] == 2 and all(torch.isfinite(t).all() for t in last["state_dict"].values())
    assert last["callbacks"][LiNeS(alpha=0.3).state_key]["applied_step"] is None


_NO_CONTROL = (
    "LiNeS(alpha='auto') scores forgetting with the control perplexity (`control_ppl` from `evaluate`), so it "
    "needs control data: set the DataModule's `control` (e.g. `data.control: humaneval`) or give a fixed alpha "
    "(e.g. alpha: 0.2)."
)


def test_auto_without_control_data_is_refused_before_training(tiny_llama_dir: Path, tmp_path: Path) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=1e-2, warmup_steps=0, output_dir="")
    trainer = make_trainer(tmp_path, 2, callbacks=[LiNeS(alpha="auto", alphas=[1.0, 0.0])])
    with pytest.raises(ValueError) as err:
        trainer.fit(module, make_data(control=None))
    assert str(err.value) == _NO_CONTROL and trainer.global_step == 0


def test_auto_with_target_loaders_only_is_refused_before_editing(tiny_llama_dir: Path, tmp_path: Path) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=1e-2, warmup_steps=0, output_dir="")
    dm = make_data(control=None)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    record = _Record()
    lines = LiNeS(alpha="auto", alphas=[1.0, 0.0])
    trainer = make_trainer(tmp_path, 2, limit_val_batches=2, callbacks=[record, lines])
    with pytest.raises(ValueError) as err:  # no DataModule to ask up front: refused when the sweep starts
        trainer.fit(module, train_dataloaders=dm.train_dataloader(), val_dataloaders=dm.val_dataloader())
    assert str(err.value) == _NO_CONTROL
    for name, param in module.named_parameters():  # left as fine-tuned: no alpha applied, no theta_0 restored
        assert torch.equal(param.detach(), record.theta[name]), name
