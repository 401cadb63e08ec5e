"""Two weight-selecting callbacks in one fit are refused in one sentence naming both (they used to intersect
silently: HalfFineTuning's half of what LayerwiseSampling left trainable), before either freezes anything."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from helpers import make_data, make_trainer

from lightning_ft.callbacks import S2FT, HalfFineTuning, LayerFreezing, LayerwiseSampling, Magnitude, SparseFineTuning
from lightning_ft.errors import UserError
from lightning_ft.modules import CausalLMModule


@pytest.mark.parametrize(
    ("callbacks", "first", "second"),
    [
        ([HalfFineTuning(), LayerwiseSampling(num_active=1)], "HalfFineTuning", "LayerwiseSampling"),
        ([LayerFreezing(freeze_bottom=1), HalfFineTuning()], "LayerFreezing", "HalfFineTuning"),
        ([S2FT(), SparseFineTuning(Magnitude())], "S2FT", "SparseFineTuning"),
        ([HalfFineTuning(), S2FT()], "HalfFineTuning", "S2FT"),
    ],
    ids=["hft-lisa", "freezing-hft", "s2ft-sparse", "hft-s2ft"],
)
def test_a_second_weight_selecting_callback_is_refused(
    callbacks: list[L.Callback], first: str, second: str, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    with pytest.raises(UserError) as err:
        make_trainer(tmp_path, 1, callbacks=callbacks).fit(module, make_data(train_size=8))
    assert str(err.value) == (f"{first} and {second} both decide which weights train: use one of them per fit (or one "
                              "per stage of a multi-stage run).")  # fmt: skip
    assert all(p.requires_grad for p in module.backbone.parameters())  # refused before anything was frozen
