"""Sequence-classification DataModule (encoders such as the bundled all-MiniLM-L6-v2)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from lightning_ft.data.collate import pad_right
from lightning_ft.data.control import ControlDataModule
from lightning_ft.data.files import load_records, record_field
from lightning_ft.data.sampling import train_loader

__all__ = ["ClassificationDataModule"]


class _Collator:
    def __init__(self, pad_token_id: int, split: str) -> None:
        self.pad_token_id, self.split = pad_token_id, split

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        ids = [it["input_ids"] for it in items]
        input_ids = pad_right(ids, self.pad_token_id)
        mask = torch.zeros_like(input_ids)
        for i, seq in enumerate(ids):
            mask[i, : len(seq)] = 1
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "split": self.split}
        if "label" in items[0]:
            batch["labels"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
        return batch


class ClassificationDataModule(ControlDataModule):
    """Text classification from a bundled dataset or a local file, with a control set of general text.

    Args:
        dataset: bundled dataset name (``rotten_tomatoes``, ``reuters_r8``) or a data file.
        text_field: column with the text.
        label_field: column with the class label.
        labels: the class values in index order; default: the sorted distinct values of the data.
        train_size: cap on training records.
        val_size: held-out validation records.
        test_size: held-out test records.
        split_seed: seed of the fixed shuffle that defines the splits.
        shuffle_seed: seed of the training-batch order; default ``split_seed``.
        max_length: tokens per text.
        batch_size: training batch size.
        eval_batch_size: evaluation batch size.
        control: general text for the representation-drift control metric (``val/control_drift``), or ``None``.
        **kwargs: the rest of the control set and the tokenizer (``control_field``, ``control_size``,
            ``tokenizer``) of :class:`~lightning_ft.data.control.ControlDataModule`; control texts are truncated
            to ``max_length``.
    """

    def __init__(
        self,
        dataset: str = "rotten_tomatoes",
        text_field: str = "text",
        label_field: str = "label",
        labels: list[str] | None = None,
        train_size: int | None = None,
        val_size: int = 400,
        test_size: int = 400,
        split_seed: int = 1234,
        shuffle_seed: int | None = None,
        max_length: int = 64,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        control: str | None = "hamlet",
        **kwargs: Any,
    ) -> None:
        if "control_max_length" in kwargs:
            raise TypeError(
                "ClassificationDataModule truncates control texts to max_length: set max_length instead of "
                "control_max_length."
            )
        super().__init__(control=control, control_max_length=None, **kwargs)  # None: control texts get max_length
        self.labels: list[str] = list(labels) if labels else []
        self._encoded: dict[str, list[dict[str, Any]]] = {}

    @property
    def num_labels(self) -> int:
        """Number of classes (after ``setup``, or from ``labels``)."""
        return len(self.labels)

    def setup(self, stage: str | None = None) -> None:
        """Load, split and tokenise (deterministic on every rank)."""
        if self._encoded:
            return
        h = self.hparams
        self.setup_tokenizer()
        records = load_records(h.dataset, shuffle_seed=h.split_seed)
        if not records:
            raise ValueError(f"dataset={h.dataset!r} holds no records.")
        for field, arg in ((h.text_field, "text_field"), (h.label_field, "label_field")):
            if records and field not in records[0]:
                raise ValueError(
                    f"{arg}={field!r} is not a column of dataset {h.dataset!r} (columns: {sorted(records[0])}): "
                    f"set {arg} to the right column."
                )
        if not self.labels:
            self.labels = sorted({str(record_field(r, h.label_field, "label_field", h.dataset)) for r in records})
        val, rest = records[: h.val_size], records[h.val_size :]
        test, train = rest[: h.test_size], rest[h.test_size :]
        train = train[: h.train_size] if h.train_size is not None else train
        self._encoded = {name: [self._encode(r) for r in part] for name, part in (("train", train), ("val", val), ("test", test))}
        self._encoded["control"] = self._encode_control()

    def _encode(self, record: Mapping[str, Any]) -> dict[str, Any]:
        h = self.hparams
        label = str(record_field(record, h.label_field, "label_field", h.dataset))
        if label not in self.labels:
            raise ValueError(f"label {label!r} is not among labels={self.labels}: list every class value in labels.")
        text = str(record_field(record, h.text_field, "text_field", h.dataset))
        ids = self.tokenizer(text, truncation=True, max_length=h.max_length)
        return {"input_ids": ids["input_ids"], "label": self.labels.index(label)}

    def _encode_control(self) -> list[dict[str, Any]]:
        limit = self.control_length(self.hparams.max_length)
        texts = self.control_texts(self.hparams.split_seed)
        return [{"input_ids": self.tokenizer(text, truncation=True, max_length=limit)["input_ids"]} for text in texts]

    def _loader(self, split: str) -> DataLoader:
        pad = self.tokenizer.pad_token_id or 0
        size = self.hparams.batch_size if split == "train" else self.hparams.eval_batch_size
        name = "target" if split in ("val", "test") else split
        return DataLoader(self._encoded[split], batch_size=size, collate_fn=_Collator(pad, name))

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        return train_loader(
            self._encoded["train"], h.batch_size, h.split_seed if h.shuffle_seed is None else h.shuffle_seed, self.trainer,
            collate_fn=_Collator(self.tokenizer.pad_token_id or 0, "train"),
        )

    def control_dataloader(self) -> DataLoader | None:
        """The control-text loader, or ``None``."""
        return self._loader("control") if self._encoded.get("control") else None

    def val_dataloader(self) -> list[DataLoader]:
        return self.with_control(self._loader("val"))

    def test_dataloader(self) -> list[DataLoader]:
        return self.with_control(self._loader("test" if self._encoded["test"] else "val"))
