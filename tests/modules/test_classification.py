"""SequenceClassificationModule on a tiny random BERT: it shares FineTuningModule's evaluation loop (the metrics
logged by ``validate`` equal ``evaluate``, control drift included) and its export (``save_pretrained`` writes a folder
``from_pretrained`` loads identically, and refuses non-finite weights without touching the previous folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_ft.data import ClassificationDataModule
from lightning_ft.errors import UserError
from lightning_ft.modules import SequenceClassificationModule
from lightning_ft.modules.base import FineTuningModule
from helpers import make_trainer


def _fit(tmp_path: Path, model_dir: Path) -> tuple[SequenceClassificationModule, ClassificationDataModule]:
    module = SequenceClassificationModule(model=str(model_dir), learning_rate=1e-2, warmup_steps=0)
    dm = ClassificationDataModule(train_size=16, val_size=8, test_size=0, control_size=6, batch_size=4,
                                  eval_batch_size=4, max_length=24)  # fmt: skip
    make_trainer(tmp_path, 3).fit(module, dm)
    return module, dm


def test_shared_loop_validate_equals_evaluate_and_export_reloads(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    module, dm = _fit(tmp_path, tiny_bert_dir)
    assert isinstance(module, FineTuningModule) and module.hparams.num_labels == 2
    logged = make_trainer(tmp_path, 1, limit_val_batches=1.0).validate(module, dm, verbose=False)
    pooled = {k.split("/", 1)[1].split("/dataloader_idx")[0]: v for d in logged for k, v in d.items()}
    direct = module.evaluate([dm.val_dataloader()[0], dm.control_dataloader()])
    assert set(direct) == {"target_acc", "target_loss", "control_drift"} and direct["control_drift"] > 0
    assert direct == pytest.approx(pooled, rel=1e-5)

    batch = next(iter(dm.val_dataloader()[0]))
    module.eval()
    reloaded = AutoModelForSequenceClassification.from_pretrained(module.output_path()).eval()  # written at fit end
    with torch.no_grad():
        expected = module(batch["input_ids"], batch["attention_mask"]).logits
        assert torch.equal(
            reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, expected
        )


def test_save_pretrained_refuses_non_finite_weights_and_keeps_the_old_folder(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    module = SequenceClassificationModule(model=str(tiny_bert_dir), num_labels=3, output_dir="")
    target = module.save_pretrained(tmp_path / "export")
    before = sorted(p.name for p in target.iterdir())
    assert "config.json" in before and "tokenizer.json" in before
    with torch.no_grad():
        module.backbone.classifier.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN or inf"):
        module.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == before
