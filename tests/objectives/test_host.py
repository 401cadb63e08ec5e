"""The host contract (lightning_ft.core.host.ModuleHost) matches the host the library ships and every mixed module,
and a mixin on a module without it is refused in one sentence (require_host) instead of an AttributeError inside."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_ft.copilot import CopilotCausalLM, CopilotMixin
from lightning_ft.core.host import ModuleHost
from lightning_ft.modules import CausalLMModule
from lightning_ft.objectives import (
    CAFTCausalLM,
    MaskedThoughtCausalLM,
    MaskedThoughtMixin,
    MultiTokenHeadsMixin,
    TaskBalancedCausalLM,
    TaskBalancedLossMixin,
)


@pytest.mark.parametrize(
    "cls", [CausalLMModule, CAFTCausalLM, MaskedThoughtCausalLM, TaskBalancedCausalLM, CopilotCausalLM]
)
def test_shipped_modules_satisfy_the_host_contract(cls: type, tiny_llama_dir: Path) -> None:
    extra = {"copilot_layers": 2, "copilot_init": "random"} if cls is CopilotCausalLM else {}
    module = cls(model=str(tiny_llama_dir), output_dir="", **extra)
    assert isinstance(module, ModuleHost)


def test_a_bare_lightning_module_is_not_a_host() -> None:
    assert not isinstance(L.LightningModule(), ModuleHost)


@pytest.mark.parametrize(
    ("mixin", "member"),
    [(MaskedThoughtMixin, "backbone"), (MultiTokenHeadsMixin, "backbone"), (TaskBalancedLossMixin, "compute_loss"),
     (CopilotMixin, "backbone")],
)  # fmt: skip
def test_a_mixin_on_a_module_without_the_host_contract_is_refused_in_one_sentence(mixin: type, member: str) -> None:
    bare = type("MyModule", (mixin, L.LightningModule), {})
    with pytest.raises(TypeError) as err:
        bare()
    assert str(err.value) == (
        f"{mixin.__name__} needs its host module's `{member}`, which MyModule lacks: mix it into CausalLMModule (or a "
        f"subclass), or give your module `{member}` as lightning_ft.core.host.ModuleHost describes it."
    )


def test_a_host_missing_only_a_later_member_is_named_by_it(tiny_llama_dir: Path) -> None:
    """A host with ``backbone`` but none of the evaluation hooks: CAFT names the first one it lacks."""

    class Partial(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = torch.nn.Linear(2, 2)

        def compute_loss(self, batch: dict) -> torch.Tensor:
            return torch.zeros(())

    with pytest.raises(TypeError, match=r"^MultiTokenHeadsMixin needs its host module's `eval_update`, which Mixed "):
        type("Mixed", (MultiTokenHeadsMixin, Partial), {})()
    TaskBalanced = type("TaskBalanced", (TaskBalancedLossMixin, Partial), {})
    with pytest.raises(TypeError, match=r"`aligned_logits`, which TaskBalanced lacks"):
        TaskBalanced()
