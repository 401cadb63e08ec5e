"""The declared support matrix: it drives the callbacks' setup() refusals (FSDP for every weight-selecting or
weight-editing callback: FSDP cannot run on CPU, so the refusal is what is tested), and the README's
compatibility table is exactly its rendering."""

from __future__ import annotations

import re
import types
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from lightning_ft.callbacks import HalfFineTuning, LayerFreezing, LayerwiseSampling, LiNeS, Magnitude, SparseFineTuning
from lightning_ft.core.layer_map import find_transformer
from lightning_ft.modules import CausalLMModule
from lightning_ft.support import GENERIC, SUPPORT, TABLE_BEGIN, TABLE_END, MethodSupport, check_support, render_table

ROOT = Path(__file__).resolve().parents[2]


def _callbacks() -> list[L.Callback]:
    return [SparseFineTuning(Magnitude()), HalfFineTuning(), LayerFreezing(freeze_bottom=1),
            LayerwiseSampling(num_active=1), LiNeS(alpha=0.5)]  # fmt: skip


def test_every_weight_editing_callback_is_declared() -> None:
    mixins = {"CopilotMixin"}  # module mixins declared in the same matrix (tested in tests/copilot)
    assert {type(c).__name__ for c in _callbacks()} | mixins == set(SUPPORT)


@pytest.mark.parametrize("strategy", [FSDPStrategy, ModelParallelStrategy], ids=["fsdp", "model_parallel"])
def test_sharded_strategies_are_refused_in_setup_with_one_sentence(tiny_llama_dir: Path, strategy: type) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    trainer = types.SimpleNamespace(strategy=strategy(), precision="bf16-mixed", callbacks=[], datamodule=None)
    for callback in _callbacks():
        with pytest.raises(ValueError) as err:
            callback.setup(trainer, module, "fit")  # type: ignore[arg-type]
        message = str(err.value)
        name = type(callback).__name__
        assert message.startswith(name) and strategy.__name__ in message, message
        assert "use strategy='ddp' (or a single device)." in message and message.count(". ") == 0, message


def test_declared_support_drives_the_refusals(tiny_llama_dir: Path) -> None:
    ddp = types.SimpleNamespace(strategy=type("DDPStrategy", (), {})(), precision="16-mixed")
    check_support("SparseFineTuning", ddp)  # DDP and mixed precision are declared supported
    lora = CausalLMModule(model=str(tiny_llama_dir), peft={"r": 2, "target_modules": ["q_proj"]}, output_dir="")
    with pytest.raises(ValueError, match=r"LoRA-wrapped \(peft\): drop `peft`"):
        check_support("SparseFineTuning", ddp, find_transformer(lora))
    check_support("LiNeS", ddp, find_transformer(lora))
    check_support("MyOwnSelection", ddp, find_transformer(lora))  # undeclared methods get the generic row
    assert "fsdp" not in GENERIC.supports
    with pytest.raises(ValueError, match="add one for 'fsdp'"):
        MethodSupport(frozenset({"ddp"}))


def test_readme_table_is_the_rendered_matrix() -> None:
    table = render_table()
    assert table.startswith(TABLE_BEGIN) and table.rstrip().endswith(TABLE_END)
    for name, spec in SUPPORT.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}` |"))
        assert row.count("| yes ") == len(spec.supports)
    assert (ROOT / "docs" / "support_table.md").read_text() == table, "regenerate docs/support_table.md"
    readme = (ROOT / "README.md").read_text()
    assert TABLE_BEGIN in readme, "README.md lacks the generated support table: paste docs/support_table.md into it"
    found = re.search(re.escape(TABLE_BEGIN) + ".*?" + re.escape(TABLE_END), readme, re.S)
    assert found is not None and found.group(0) + "\n" == table, "README's table drifted from lightning_ft.support"
