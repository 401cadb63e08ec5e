"""The declared support matrix: each method class declares its support in its own body (inherited by subclasses);
it drives the callbacks' setup() refusals (FSDP2 where a method needs whole tensors; the legacy FSDPStrategy and
DeepSpeed for every declared method, naming the strategy to use instead) and the CLI's early check, and the README's
compatibility table is exactly its rendering over the exported classes."""

from __future__ import annotations

import atexit
import re
import types
from pathlib import Path
from typing import ClassVar

import lightning as L
import pytest
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from lightning_ft.callbacks import (
    S2FT,
    CoFiTune,
    CorDAInit,
    HalfFineTuning,
    ImportanceLayerSampling,
    LayerFreezing,
    LayerwiseSampling,
    LiNeS,
    Magnitude,
    SparseFineTuning,
)
from lightning_ft.copilot import CopilotMixin
from lightning_ft.core import process_group
from lightning_ft.core.layer_map import find_transformer
from lightning_ft.modules import CausalLMModule
from lightning_ft.decoding import LogitsFusionMixin
from lightning_ft.monitors import (
    ContextAwareness,
    ImplicitInferenceProbes,
    IntruderDimensions,
    RepresentationShift,
    RunDashboard,
)
from lightning_ft.objectives import (
    GroupRelativeRewardMixin,
    KaSALossMixin,
    LoFiTMixin,
    LoRAMoEMixin,
    MaskedThoughtMixin,
    MultiTokenHeadsMixin,
    PreferenceLossMixin,
    TaskBalancedLossMixin,
    TokenWeighting,
)
from lightning_ft.support import (
    FEATURES,
    GENERIC,
    TABLE_BEGIN,
    TABLE_END,
    MethodSupport,
    check_strategy_support,
    check_support,
    declared_methods,
    legacy_refusal,
    render_table,
    support_of,
)

ROOT = Path(__file__).resolve().parents[2]
_LEGACY = (
    "{} does not run under FSDPStrategy, which flattens the parameters into sharded pieces: use "
    "strategy='fsdp2' (Lightning's ModelParallelStrategy with FSDP2) or strategy='ddp'."
)


def _callbacks() -> list[L.Callback]:
    return [SparseFineTuning(Magnitude()), HalfFineTuning(), LayerFreezing(freeze_bottom=1),
            LayerwiseSampling(num_active=1), ImportanceLayerSampling(), LiNeS(alpha=0.5)]  # fmt: skip


def _trainer(strategy: object, precision: str = "bf16-mixed") -> types.SimpleNamespace:
    return types.SimpleNamespace(strategy=strategy, precision=precision, callbacks=[], datamodule=None)


def _ddp() -> object:
    return type("DDPStrategy", (), {})()


class MyHFT(HalfFineTuning):
    """A user's subclass: it inherits HalfFineTuning's declaration."""


class MySparse(SparseFineTuning):
    """A user's subclass of a callback that is not a SelectionCallback."""


class EverywhereHFT(HalfFineTuning):
    """A subclass that overrides the declaration it would inherit."""

    support: ClassVar[MethodSupport] = MethodSupport(frozenset(FEATURES), notes="supports everything")


class Undeclared:
    """A method class without a support declaration (it gets GENERIC's)."""


def test_the_exported_declared_classes_are_the_weight_editing_methods_and_the_objectives() -> None:
    expected = {SparseFineTuning, HalfFineTuning, LayerFreezing, LayerwiseSampling, ImportanceLayerSampling, LiNeS, S2FT,
                CoFiTune, CorDAInit, CopilotMixin, KaSALossMixin, LoFiTMixin, LoRAMoEMixin, MaskedThoughtMixin,
                MultiTokenHeadsMixin, TaskBalancedLossMixin, TokenWeighting, PreferenceLossMixin,
                GroupRelativeRewardMixin, IntruderDimensions, RepresentationShift, ImplicitInferenceProbes,
                ContextAwareness, RunDashboard, LogitsFusionMixin}  # fmt: skip
    assert set(declared_methods()) == expected
    assert all(support_of(cls) is vars(cls)["support"] for cls in expected)
    assert support_of(CausalLMModule) is GENERIC and support_of(object()) is GENERIC  # no declaration in the MRO


def test_legacy_sharded_strategies_are_refused_in_setup_naming_fsdp2(tiny_llama_dir: Path) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    for callback in _callbacks():
        with pytest.raises(ValueError) as err:
            callback.setup(_trainer(FSDPStrategy()), module, "fit")  # type: ignore[arg-type]
        expected = legacy_refusal(support_of(callback), type(callback).__name__, "FSDPStrategy")
        assert str(err.value) == expected and expected.count(". ") == 0
        assert ("strategy='fsdp2'" in expected) == ("fsdp2" in support_of(callback).supports), expected
    deepspeed = type("DeepSpeedStrategy", (), {})()
    with pytest.raises(ValueError) as err:
        check_support(LiNeS(alpha=0.5), _trainer(deepspeed))
    assert str(err.value).startswith("LiNeS does not run under DeepSpeedStrategy, which flattens") and (
        "use strategy='fsdp2'" in str(err.value)
    )
    with pytest.raises(ValueError) as err:  # a method that does not run sharded (here: declares nothing) names ddp
        check_support(Undeclared, _trainer(FSDPStrategy()))
    assert str(err.value).endswith("use strategy='ddp' (this method does not run sharded).")


def test_fsdp2_is_refused_only_where_declared(tiny_llama_dir: Path) -> None:
    fsdp2 = _trainer(ModelParallelStrategy(), "32-true")
    for callback in (HalfFineTuning(), LayerFreezing(freeze_bottom=1), LayerwiseSampling(num_active=1), LiNeS(0.5),
                     SparseFineTuning(Magnitude())):  # fmt: skip
        check_support(callback, fsdp2)  # works on shards
    for method in (MultiTokenHeadsMixin, CopilotMixin, MaskedThoughtMixin, TaskBalancedLossMixin, TokenWeighting):
        check_support(method, fsdp2)
    with pytest.raises(ValueError) as err:  # a method that has not declared FSDP2 (e.g. a user's own) is refused
        check_support(Undeclared, fsdp2)
    message = str(err.value)
    assert message == ("Undeclared has not declared that it works on parameter shards, which ModelParallelStrategy "
                       "shards across processes: use strategy='ddp' (or a single device).")  # fmt: skip


def test_a_users_subclass_is_refused_with_the_declaration_it_inherits_named_as_itself(tiny_llama_dir: Path) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    with pytest.raises(ValueError) as err:
        MyHFT().setup(_trainer(FSDPStrategy()), module, "fit")  # type: ignore[arg-type]
    assert str(err.value) == _LEGACY.format("MyHFT")
    with pytest.raises(ValueError) as err:
        MySparse(Magnitude()).setup(_trainer(FSDPStrategy()), module, "fit")  # type: ignore[arg-type]
    assert str(err.value).startswith("MySparse does not run under FSDPStrategy"), str(err.value)
    check_support(MySparse(Magnitude()), _trainer(ModelParallelStrategy(), "32-true"))  # FSDP2: inherited support
    with pytest.raises(ValueError) as err:  # the generic row would have let a LoRA backbone through
        check_support(MyHFT(), _trainer(_ddp()), find_transformer(_lora(tiny_llama_dir)))
    assert str(err.value).startswith("MyHFT trains half of the base weights, but every base weight of "), str(err.value)
    with pytest.raises(ValueError) as err:  # the CLI's check before anything is built
        check_strategy_support([MyHFT], "fsdp")
    assert str(err.value) == _LEGACY.format("MyHFT")


def test_a_subclass_may_override_the_declaration(tiny_llama_dir: Path) -> None:
    assert support_of(EverywhereHFT) is EverywhereHFT.support is not HalfFineTuning.support
    assert support_of(EverywhereHFT()) is EverywhereHFT.support
    lora = find_transformer(_lora(tiny_llama_dir))
    check_support(EverywhereHFT(), _trainer(_ddp()), lora)  # its own row: a LoRA backbone is supported
    with pytest.raises(ValueError, match=re.escape("HalfFineTuning trains half of the base weights")):
        check_support(HalfFineTuning(), _trainer(_ddp()), lora)


def _lora(model_dir: Path) -> CausalLMModule:
    return CausalLMModule(model=str(model_dir), peft={"r": 2, "target_modules": ["q_proj"]}, output_dir="")


def test_declared_support_drives_the_refusals(tiny_llama_dir: Path) -> None:
    ddp = _trainer(_ddp(), "16-mixed")
    check_support(SparseFineTuning, ddp)  # DDP and mixed precision are declared supported
    lora = find_transformer(_lora(tiny_llama_dir))
    with pytest.raises(ValueError, match=r"^SparseFineTuning trains .* LoRA-wrapped \(peft\): drop `peft`"):
        check_support(SparseFineTuning(Magnitude()), ddp, lora)
    check_support(LiNeS(alpha=0.5), ddp, lora)

    class MyOwnSelection(L.Callback):
        pass

    check_support(MyOwnSelection(), ddp, lora)  # an undeclared method gets the generic row
    with pytest.raises(ValueError, match="^MyOwnSelection has not declared that it works on parameter shards, which "
                                         "ModelParallelStrategy shards"):  # fmt: skip
        check_support(MyOwnSelection(), _trainer(ModelParallelStrategy()))
    with pytest.raises(ValueError, match="^MyOwnSelection does not run under FSDPStrategy, which flattens"):
        check_support(MyOwnSelection(), _trainer(FSDPStrategy()))
    check_strategy_support([MyOwnSelection, CausalLMModule], "fsdp")  # the CLI checks declared classes only
    assert "fsdp2" not in GENERIC.supports
    with pytest.raises(ValueError, match="add one for 'fsdp2'"):
        MethodSupport(frozenset({"ddp"}))


def test_setup_registers_the_exit_hook_which_check_support_does_not(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registered: list[object] = []
    monkeypatch.setattr(atexit, "register", registered.append)
    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    for callback in _callbacks():
        monkeypatch.setattr(process_group, "_registered", False)
        registered.clear()
        check_support(callback, _trainer(_ddp()))
        assert registered == [], type(callback).__name__
        with pytest.raises(ValueError):  # refused, but the hook is registered first, also in a user's own module
            callback.setup(_trainer(FSDPStrategy()), module, "fit")  # type: ignore[arg-type]
        assert registered == [process_group._destroy], type(callback).__name__


def test_readme_table_is_the_rendered_matrix_of_the_exported_classes() -> None:
    table = render_table()
    assert table.startswith(TABLE_BEGIN) and table.rstrip().endswith(TABLE_END)
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [cls.__name__ for cls in declared_methods()]
    for row, cls in zip(rows, declared_methods()):
        assert row.count("| yes ") == len(cls.support.supports) and row.endswith(f"| {cls.support.notes} |")
    assert (ROOT / "docs" / "support_table.md").read_text() == table, "regenerate docs/support_table.md"
    readme = (ROOT / "README.md").read_text()
    assert TABLE_BEGIN in readme, "README.md lacks the generated support table: paste docs/support_table.md into it"
    found = re.search(re.escape(TABLE_BEGIN) + ".*?" + re.escape(TABLE_END), readme, re.DOTALL)
    assert found is not None and found.group(0) + "\n" == table, "README's table drifted from lightning_ft.support"


def test_composed_mixins_combine_their_declarations_and_an_override_replaces_its_base() -> None:
    """Masked Thought supports a quantized backbone and CAFT does not: composed, the module refuses it with CAFT's
    sentence whichever mixin comes first; a subclass's own declaration still replaces the one it derives from."""
    from lightning_ft.support import support_of

    class ThoughtFirst(MaskedThoughtMixin, MultiTokenHeadsMixin, CausalLMModule):
        pass

    class HeadsFirst(MultiTokenHeadsMixin, MaskedThoughtMixin, CausalLMModule):
        pass

    caft = MultiTokenHeadsMixin.support.refusal("quantized", "X", "S", "M")
    assert caft is not None and MaskedThoughtMixin.support.refusal("quantized", "X", "S", "M") is None
    for composed in (ThoughtFirst, HeadsFirst):
        assert support_of(composed).refusal("quantized", "X", "S", "M") == caft
        assert support_of(composed).refusal("lora", "X", "S", "M") is None  # both support it

    class Everything(MultiTokenHeadsMixin, CausalLMModule):
        support = MaskedThoughtMixin.support

    assert support_of(Everything).refusal("quantized", "X", "S", "M") is None
