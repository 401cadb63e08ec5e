"""``PreferenceDataModule``: (prompt, chosen, rejected) pairs for the preference objectives."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from lightning_ft.data.collate import Batch, LMCollator, encode_example, encode_prompt, render
from lightning_ft.data.instruction import InstructionDataModule
from lightning_ft.data.sampling import train_loader

__all__ = ["PreferenceCollator", "PreferenceDataModule"]


class PreferenceCollator:
    """Stacks pairs into one causal-LM batch: every chosen row, then every rejected row, with ``pair_role`` 0 / 1
    (the layout :class:`~lightning_ft.objectives.PreferenceLossMixin` reads: the k-th chosen row pairs with the k-th
    rejected row). One forward pass then scores both responses of every pair."""

    def __init__(self, pad_token_id: int, split: str = "train") -> None:
        self.inner = LMCollator(pad_token_id, split)

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> Batch:
        rows = [it["chosen"] for it in items] + [it["rejected"] for it in items]
        batch = self.inner(rows)
        batch["pair_role"] = torch.tensor([0] * len(items) + [1] * len(items), dtype=torch.long)
        return batch


class PreferenceDataModule(InstructionDataModule):
    """Preference pairs from a bundled dataset or a JSONL/CSV/parquet file, for
    :class:`~lightning_ft.objectives.PreferenceLossMixin` (DPO) and SPIN.

    Each record is rendered to a prompt (``prompt_template``), a chosen response (``chosen_template``) and a rejected
    one (``rejected_template``). Training and validation batches hold both responses of each pair
    (:class:`PreferenceCollator`); validation then reports the reward accuracy and preference loss, beside the control
    perplexity. ``predict`` generates from the prompts with the chosen response as the reference.

    A labelled classification dataset becomes preference data with ``label_options``: a record without ``chosen`` and
    ``rejected`` columns gets its label as ``chosen`` and the next label option (cyclically) as ``rejected``, e.g.
    Rotten Tomatoes reviews with " positive" preferred to " negative" for a positive review.

    Args:
        chosen_template: format string of the preferred response, e.g. ``" {chosen}"``.
        rejected_template: format string of the dispreferred response, e.g. ``" {rejected}"``.
        **kwargs: Arguments of :class:`~lightning_ft.data.InstructionDataModule` (``dataset``, ``prompt_template``,
            ``label_field``, ``label_options``, sizes, ``max_length``, ``batch_size`` in pairs, the control set...);
            the gold response of ``predict`` is the chosen one.
    """

    def __init__(
        self, chosen_template: str = " {chosen}", rejected_template: str = " {rejected}", **kwargs: Any
    ) -> None:
        if "response_template" in kwargs:
            raise ValueError(
                "PreferenceDataModule renders responses with chosen_template and rejected_template: drop "
                "response_template."
            )
        super().__init__(response_template=chosen_template, **kwargs)

    # ------------------------------------------------------------------ preparation
    def _with_pair(self, record: dict[str, Any], index: int = 0) -> dict[str, Any]:
        h = self.hparams
        if ("chosen" in record and "rejected" in record) or not h.label_options:
            return record
        options = [str(o) for o in h.label_options]
        label = str(record.get(h.label_field))
        if label not in options:
            raise ValueError(
                f"label {label!r} in column {h.label_field!r} is not among label_options={options}: list every class "
                "value in label_options."
            )
        rejected = options[(options.index(label) + 1) % len(options)]
        return {**record, "chosen": label, "rejected": rejected}

    def _check_fields(self, record: dict[str, Any], source: str) -> None:
        h = self.hparams
        if h.label_options and len(h.label_options) < 2:
            raise ValueError(f"label_options={list(h.label_options)} needs at least two values to form pairs.")
        pair = self._with_pair(record)
        render(h.prompt_template, pair, "prompt_template")
        render(h.chosen_template, pair, "chosen_template")
        render(h.rejected_template, pair, "rejected_template")

    def _render(self, template: str, record: dict[str, Any], argument: str) -> str:
        text = render(template, self._with_pair(record), argument)
        if self.hparams.chat_template or self.hparams.append_eos:
            text += self.tokenizer.eos_token or ""
        return text

    def _response(self, record: dict[str, Any]) -> str:
        return self._render(self.hparams.chosen_template, record, "chosen_template")

    def _encode_train(self, record: dict[str, Any]) -> dict[str, Any]:
        h = self.hparams
        prompt = self._prompt(record)
        chosen = self._response(record)
        rejected = self._render(h.rejected_template, record, "rejected_template")
        if chosen == rejected:
            raise ValueError(
                f"a record's chosen and rejected responses are the same text ({chosen!r}): a pair needs two different "
                "responses; fix the data or the templates."
            )
        return {
            "chosen": encode_example(self.tokenizer, prompt, chosen, h.max_length, h.mask_prompt),
            "rejected": encode_example(self.tokenizer, prompt, rejected, h.max_length, h.mask_prompt),
        }

    def _encode_eval(self, record: dict[str, Any]) -> dict[str, Any]:
        return self._encode_train(record)

    def _encode_predict(self, record: dict[str, Any]) -> dict[str, Any]:
        prompt = self._prompt(record)
        return {
            "prompt": prompt,
            "prompt_ids": encode_prompt(self.tokenizer, prompt, self.hparams.max_length),
            "reference": render(self.hparams.chosen_template, self._with_pair(record), "chosen_template"),
        }

    # ------------------------------------------------------------------ loaders
    def _eval_loader(self, split: str) -> DataLoader:
        h = self.hparams
        return DataLoader(
            self._encoded[split], batch_size=h.eval_batch_size, collate_fn=PreferenceCollator(self.pad_token_id, "target"),
            num_workers=h.num_workers,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        return train_loader(
            self._encoded["train"], h.batch_size, h.split_seed if h.shuffle_seed is None else h.shuffle_seed, self.trainer,
            collate_fn=PreferenceCollator(self.pad_token_id), num_workers=h.num_workers,
        )  # fmt: skip
