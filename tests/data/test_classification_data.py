"""ClassificationDataModule: the training order follows ``shuffle_seed``; the splits follow ``split_seed`` only."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from lightning_ft.data import ClassificationDataModule


def _dm(tokenizer_dir: Path, **kwargs: object) -> ClassificationDataModule:
    dm = ClassificationDataModule(train_size=40, val_size=10, test_size=10, control_size=0, batch_size=4, **kwargs)  # type: ignore[arg-type]
    dm.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    dm.setup("fit")
    return dm


def _first_batches(dm: ClassificationDataModule) -> list[list[list[int]]]:
    return [b["input_ids"].tolist() for b, _ in zip(dm.train_dataloader(), range(4))]


def test_shuffle_seed_changes_the_batch_order_but_not_the_splits(tiny_tokenizer_dir: Path) -> None:
    default = _dm(tiny_tokenizer_dir)
    same = _dm(tiny_tokenizer_dir, shuffle_seed=1234)  # = split_seed
    other = _dm(tiny_tokenizer_dir, shuffle_seed=7)
    assert _first_batches(default) == _first_batches(same)
    assert _first_batches(default) != _first_batches(other)
    assert default._encoded == other._encoded  # the same splits, encoded the same
