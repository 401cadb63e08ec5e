"""The mixins keep their settings as typed fields named as their arguments (no dicts under renamed keys)."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from lightning_ft.copilot import CopilotCausalLM, CopilotMixin
from lightning_ft.copilot.settings import CopilotSettings
from lightning_ft.objectives import CAFTCausalLM, MaskedThoughtCausalLM, MultiTokenHeadsMixin
from lightning_ft.objectives.heads import CAFTSettings
from lightning_ft.objectives.masked_thought import MaskedThoughtSettings


@pytest.mark.parametrize(("mixin", "settings"), [(CopilotMixin, CopilotSettings), (MultiTokenHeadsMixin, CAFTSettings)])
def test_settings_fields_are_the_constructor_arguments(mixin: type, settings: type) -> None:
    arguments = inspect.signature(mixin.__init__).parameters
    assert [f.name for f in dataclasses.fields(settings)] == [n for n in arguments if n not in ("self", "kwargs")]
    assert {f.name: f.default for f in dataclasses.fields(settings)} == {
        n: p.default for n, p in arguments.items() if n not in ("self", "kwargs")
    }


def test_copilot_settings_hold_the_given_arguments(tiny_llama_dir: Path) -> None:
    given = dict(copilot_layers=2, copilot_init="random", copilot_learning_rate=3e-4, copilot_weight_decay=0.1,
                 copilot_warmup_steps=0, copilot_lambda="auto", lambda_grid=(1, 0.5), copilot_loss="token_rmse",
                 error_storage="topk", error_topk=7, copilot_seed=5, fused_eval=False, copilot_output="")  # fmt: skip
    module = CopilotCausalLM(model=str(tiny_llama_dir), output_dir="", **given)
    assert module.copilot_settings == CopilotSettings(**{**given, "lambda_grid": (1.0, 0.5)})
    assert module.copilot_settings.auto_lambda and module.copilot_lambda == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        module.copilot_settings.copilot_seed = 6  # type: ignore[misc]


def test_caft_and_masked_thought_settings_hold_the_given_arguments(tiny_llama_dir: Path) -> None:
    caft = CAFTCausalLM(model=str(tiny_llama_dir), output_dir="", num_heads=2, heads_coefficient=0.5, decay=0.5,
                        ce_chunk_size=3, heads_schedule="linear", heads_output="")  # fmt: skip
    assert caft.caft_settings == CAFTSettings(num_heads=2, heads_coefficient=0.5, decay=0.5, ce_chunk_size=3,
                                              heads_schedule="linear", heads_output="")  # fmt: skip
    assert caft.head_weights() == [0.5 * 0.5 * 1.0, 0.25 * 0.5 * 1.0]  # decay^k * alpha * s(t), s = 1 without a run
    masked = MaskedThoughtCausalLM(model=str(tiny_llama_dir), output_dir="", max_rate=0.3, warmup=0.0,
                                   replacement="mask", mask_token_id=3, seed=9)  # fmt: skip
    rows = masked.backbone.get_input_embeddings().num_embeddings
    assert masked.masked_thought_settings == MaskedThoughtSettings(
        max_rate=0.3, warmup=0.0, mask_token_id=3, seed=9, vocab_size=min(len(masked.tokenizer), rows)
    )
