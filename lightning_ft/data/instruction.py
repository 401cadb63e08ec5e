"""Instruction-tuning DataModule with prompt masking, classification-as-generation and a control set."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import DataLoader

from lightning_ft.data.collate import (
    ChoiceCollator,
    LMCollator,
    PromptCollator,
    encode_example,
    encode_prompt,
    render,
)
from lightning_ft.data.control import ControlDataModule, resolve_tokenizer  # resolve_tokenizer: re-exported
from lightning_ft.data.files import load_records, record_field
from lightning_ft.data.sampling import train_loader

__all__ = ["InstructionDataModule", "resolve_tokenizer"]


class InstructionDataModule(ControlDataModule):
    """Prompt/response fine-tuning data from a bundled dataset or a local JSONL/CSV/parquet file.

    Each record is rendered through ``prompt_template`` and ``response_template`` (``str.format``
    fields are the record's columns). The loss covers response tokens only when ``mask_prompt``.
    With ``label_options`` the task is classification-as-generation: validation reports
    ``val/target_acc`` by comparing the log-likelihoods of the rendered options. A control set of
    general text the task does not train on is evaluated alongside (``val/control_ppl``).

    Args:
        dataset: bundled dataset name or path of a data file.
        prompt_template: format string for the prompt, e.g. ``"Review: {text}\\nSentiment:"``.
        response_template: format string for the target response, e.g. ``" {label}"``.
        label_field: the column holding the class label (used with ``label_options``).
        label_options: the possible values of ``label_field``; each is rendered through
            ``response_template`` and scored. ``None`` for free-form generation tasks.
        val_dataset: a separate validation source; default: ``val_size`` records split off ``dataset``.
        train_size: cap on training records (``None``: all remaining).
        val_size: number of held-out validation records.
        test_size: number of held-out test records (split after validation).
        split_seed: seed of the shuffle that defines the splits (fixed, so splits never change).
        shuffle_seed: seed of the training-batch order; default ``split_seed``. Change it (not ``split_seed``)
            to repeat a run on the same splits with another data order.
        chat_template: wrap the prompt in the tokenizer's chat template and end the response with EOS.
        max_length: maximum tokens per training example (prompt truncated from the left).
        mask_prompt: compute the loss on response tokens only.
        append_eos: append the EOS token to responses (without chat template).
        batch_size: training batch size.
        eval_batch_size: validation/test/predict batch size.
        num_workers: DataLoader workers.
        **kwargs: the control set and tokenizer (``control``, ``control_field``, ``control_size``,
            ``control_max_length``, ``tokenizer``) of :class:`~lightning_ft.data.control.ControlDataModule`.
    """

    def __init__(
        self,
        dataset: str = "rotten_tomatoes",
        prompt_template: str = "Review: {text}\nSentiment:",
        response_template: str = " {label}",
        label_field: str = "label",
        label_options: list[str] | None = None,
        val_dataset: str | None = None,
        train_size: int | None = None,
        val_size: int = 400,
        test_size: int = 400,
        split_seed: int = 1234,
        shuffle_seed: int | None = None,
        chat_template: bool = False,
        max_length: int = 96,
        mask_prompt: bool = True,
        append_eos: bool = False,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        for name, value in (("val_size", val_size), ("test_size", test_size), ("max_length", max_length)):
            if value < 0 or (name == "max_length" and value < 2):
                raise ValueError(f"{name}={value} must be a positive integer.")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch_size={batch_size} and eval_batch_size={eval_batch_size} must be at least 1.")
        super().__init__(**kwargs)
        self._splits: dict[str, list[dict[str, Any]]] = {}
        self._encoded: dict[str, list[dict[str, Any]]] = {}
        self._option_ids: list[list[int]] = []

    # ------------------------------------------------------------------ preparation
    def setup(self, stage: str | None = None) -> None:
        """Load, split and tokenise the data (deterministically, on every rank)."""
        if self._encoded:
            return
        h = self.hparams
        self.setup_tokenizer()
        self._splits = self._load_splits()
        if h.label_options:
            self._option_ids = [
                self.tokenizer(self._response({h.label_field: opt}), add_special_tokens=False)["input_ids"]
                for opt in h.label_options
            ]
        self._encoded = {
            "train": [self._encode_train(r) for r in self._splits["train"]],
            "val": [self._encode_eval(r) for r in self._splits["val"]],
            "test": [self._encode_eval(r) for r in self._splits["test"]],
            "predict": [self._encode_predict(r) for r in self._splits["test"] or self._splits["val"]],
        }
        self._encoded["control"] = self._encode_control()

    def _read(self, source: str, argument: str) -> list[dict[str, Any]]:
        """The records of ``source`` (named by ``argument``), shuffled with ``split_seed``; a subclass that reads
        other sources overrides this alone."""
        return load_records(source, argument=argument, shuffle_seed=self.hparams.split_seed)

    def _load_splits(self, check_fields: bool = True) -> dict[str, list[dict[str, Any]]]:
        """The train/val/test splits; ``check_fields=False`` skips the template check (for a subclass whose
        transform adds the fields the templates name)."""
        h = self.hparams
        records = self._read(h.dataset, "dataset")
        if not records:
            raise ValueError(f"dataset={h.dataset!r} holds no records.")
        if check_fields:
            self._check_fields(records[0], h.dataset)
        if h.val_dataset is not None:
            val = self._read(h.val_dataset, "val_dataset")[: h.val_size or None]
            if not val:
                raise ValueError(f"val_dataset={h.val_dataset!r} holds no records (or val_size is 0).")
            if check_fields:
                self._check_fields(val[0], h.val_dataset)
            rest = records
        else:
            val, rest = records[: h.val_size], records[h.val_size :]
        test, train = rest[: h.test_size], rest[h.test_size :]
        if h.train_size is not None:
            if h.train_size < 1:
                raise ValueError(f"train_size={h.train_size} must be at least 1 (or null for all remaining records).")
            train = train[: h.train_size]
        if not train:
            raise ValueError(
                f"dataset={h.dataset!r} has {len(records)} records, none left for training after val_size="
                f"{h.val_size} and test_size={h.test_size}: lower those or use a larger dataset."
            )
        return {"train": train, "val": val, "test": test}

    def _check_fields(self, record: dict[str, Any], source: str) -> None:
        h = self.hparams
        render(h.prompt_template, record, "prompt_template")
        render(h.response_template, record, "response_template")
        if h.label_options:
            if h.label_field not in record:
                raise ValueError(
                    f"label_field={h.label_field!r} is not a column of {source!r} (columns: {sorted(record)}): "
                    "set label_field to the column that holds the class label."
                )

    def _prompt(self, record: dict[str, Any]) -> str:
        text = render(self.hparams.prompt_template, record, "prompt_template")
        if self.hparams.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
        return text

    def _response(self, record: dict[str, Any]) -> str:
        text = render(self.hparams.response_template, record, "response_template")
        if self.hparams.chat_template or self.hparams.append_eos:
            text += self.tokenizer.eos_token or ""
        return text

    def _encode_train(self, record: dict[str, Any]) -> dict[str, Any]:
        h = self.hparams
        return encode_example(self.tokenizer, self._prompt(record), self._response(record), h.max_length, h.mask_prompt)

    def _encode_eval(self, record: dict[str, Any]) -> dict[str, Any]:
        h = self.hparams
        if not h.label_options:
            return self._encode_train(record)
        label = str(record_field(record, h.label_field, "label_field", h.dataset))
        if label not in h.label_options:
            raise ValueError(
                f"label {label!r} in column {h.label_field!r} is not among label_options={list(h.label_options)}: "
                "list every class value in label_options."
            )
        longest = max(len(o) for o in self._option_ids)
        prompt_ids = encode_prompt(self.tokenizer, self._prompt(record), max(1, h.max_length - longest))
        return {"prompt_ids": prompt_ids, "label_index": list(h.label_options).index(label)}

    def _encode_predict(self, record: dict[str, Any]) -> dict[str, Any]:
        prompt = self._prompt(record)
        return {
            "prompt": prompt,
            "prompt_ids": encode_prompt(self.tokenizer, prompt, self.hparams.max_length),
            "reference": render(self.hparams.response_template, record, "response_template"),
        }

    def _encode_control(self) -> list[dict[str, Any]]:
        limit = self.control_length(self.hparams.max_length)
        out = []
        for text in self.control_texts(self.hparams.split_seed):
            ids = self.tokenizer(text, add_special_tokens=True)["input_ids"][:limit]
            if len(ids) >= 2:
                out.append({"input_ids": ids, "labels": list(ids)})
        return out

    # ------------------------------------------------------------------ loaders
    @property
    def pad_token_id(self) -> int:
        """Padding id (falls back to EOS when the tokenizer has no pad token)."""
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id or 0)

    @property
    def label_options(self) -> list[str] | None:
        """The class values scored by ``val/target_acc``, or ``None``."""
        return list(self.hparams.label_options) if self.hparams.label_options else None

    def _eval_loader(self, split: str) -> DataLoader:
        h = self.hparams
        collate = (
            ChoiceCollator(self.pad_token_id, self._option_ids)
            if h.label_options
            else LMCollator(self.pad_token_id, split="target")
        )
        return DataLoader(self._encoded[split], batch_size=h.eval_batch_size, collate_fn=collate, num_workers=h.num_workers)

    def control_dataloader(self) -> DataLoader | None:
        """The control (forgetting) text loader, or ``None`` without a control set."""
        if not self._encoded.get("control"):
            return None
        h = self.hparams
        return DataLoader(
            self._encoded["control"],
            batch_size=h.eval_batch_size,
            collate_fn=LMCollator(self.pad_token_id, split="control"),
            num_workers=h.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        return train_loader(
            self._encoded["train"], h.batch_size, h.split_seed if h.shuffle_seed is None else h.shuffle_seed, self.trainer,
            collate_fn=LMCollator(self.pad_token_id), num_workers=h.num_workers,
        )

    def val_dataloader(self) -> Sequence[DataLoader]:
        return self.with_control(self._eval_loader("val"))

    def test_dataloader(self) -> Sequence[DataLoader]:
        return self.with_control(self._eval_loader("test" if self._encoded["test"] else "val"))

    def predict_dataloader(self) -> DataLoader:
        h = self.hparams
        return DataLoader(
            self._encoded["predict"], batch_size=h.eval_batch_size, collate_fn=PromptCollator(self.pad_token_id)
        )
