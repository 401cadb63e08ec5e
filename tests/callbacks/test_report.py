"""ForgettingReport refuses, in one sentence, a fit it could not measure (instead of writing an empty report)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from helpers import make_data, make_trainer
from helpers import one_thread  # noqa: F401  (autouse fixture: applies where imported)
from lightning_ft.callbacks import ForgettingReport
from lightning_ft.modules import CausalLMModule


class _NoEvaluate(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.layer(batch).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_refuses_a_module_without_evaluate_and_a_fit_without_datamodule(tiny_llama_dir: Path, tmp_path: Path) -> None:
    loader = torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=4)
    with pytest.raises(ValueError, match="which _NoEvaluate lacks: add that method") as err:
        make_trainer(tmp_path, 1, callbacks=[ForgettingReport()]).fit(_NoEvaluate(), loader)
    assert "\n" not in str(err.value)
    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    data = make_data()
    data.tokenizer = module.tokenizer
    data.setup("fit")
    with pytest.raises(ValueError, match="pass `datamodule=` to fit"):
        make_trainer(tmp_path, 1, callbacks=[ForgettingReport()]).fit(module, data.train_dataloader())
