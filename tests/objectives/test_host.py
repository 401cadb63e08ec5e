"""The host contract (lightning_ft.core.host.ModuleHost) matches the host the library ships and every mixed module."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest

from lightning_ft.copilot import CopilotCausalLM
from lightning_ft.core.host import ModuleHost
from lightning_ft.modules import CausalLMModule
from lightning_ft.objectives import CAFTCausalLM, MaskedThoughtCausalLM, TaskBalancedCausalLM


@pytest.mark.parametrize(
    "cls", [CausalLMModule, CAFTCausalLM, MaskedThoughtCausalLM, TaskBalancedCausalLM, CopilotCausalLM]
)
def test_shipped_modules_satisfy_the_host_contract(cls: type, tiny_llama_dir: Path) -> None:
    extra = {"copilot_layers": 2, "copilot_init": "random"} if cls is CopilotCausalLM else {}
    module = cls(model=str(tiny_llama_dir), output_dir="", **extra)
    assert isinstance(module, ModuleHost)


def test_a_bare_lightning_module_is_not_a_host() -> None:
    assert not isinstance(L.LightningModule(), ModuleHost)
