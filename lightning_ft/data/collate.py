"""Tokenisation and padding for instruction data: prompt masking, option scoring, control text."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100

Batch = dict[str, Any]


def render(template: str, record: Mapping[str, Any], argument: str) -> str:
    """Fill ``template`` with the fields of ``record``; a missing field names the argument to fix."""
    try:
        return template.format_map(dict(record))
    except KeyError as err:
        raise ValueError(
            f"{argument}={template!r} uses the field {err.args[0]!r}, which the dataset does not have "
            f"(its fields are {sorted(record)}): rename the field in {argument} or in the data."
        ) from None


def encode_example(
    tokenizer: Any, prompt: str, response: str, max_length: int, mask_prompt: bool = True
) -> dict[str, list[int]]:
    """Tokenise one prompt/response pair for causal-LM training.

    The prompt is truncated from the left (its end, which usually holds the question, is kept) so that
    the response fits in ``max_length``; the response is truncated from the right only when it alone
    exceeds ``max_length - 1``. With ``mask_prompt`` the labels of prompt tokens are ``-100``.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"][: max(1, max_length - 1)]
    room = max_length - len(response_ids)
    if len(prompt_ids) > room:
        prompt_ids = prompt_ids[len(prompt_ids) - room :] if room > 0 else []
    labels = ([IGNORE_INDEX] * len(prompt_ids) if mask_prompt else list(prompt_ids)) + list(response_ids)
    return {"input_ids": list(prompt_ids) + list(response_ids), "labels": labels}


def encode_prompt(tokenizer: Any, prompt: str, max_length: int) -> list[int]:
    """Tokenise a prompt alone, keeping its last ``max_length`` tokens."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return list(ids[-max_length:])


def pad_right(sequences: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Stack integer sequences into a right-padded ``[B, T]`` tensor."""
    width = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), max(width, 1)), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def pad_left(sequences: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Stack integer sequences into a left-padded ``[B, T]`` tensor (for generation)."""
    width = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), max(width, 1)), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            out[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
    return out


def _lengths_mask(sequences: Sequence[Sequence[int]], width: int, left: bool = False) -> torch.Tensor:
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if left:
            mask[i, width - len(seq) :] = 1
        else:
            mask[i, : len(seq)] = 1
    return mask


class LMCollator:
    """Pads ``input_ids``/``labels`` examples into a causal-LM batch (used for training and control text).

    Optional per-example fields pass through: ``loss_weights`` (per token, zero-padded) and ``task_id``.
    """

    def __init__(self, pad_token_id: int, split: str = "train") -> None:
        self.pad_token_id = pad_token_id
        self.split = split

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> Batch:
        ids = [it["input_ids"] for it in items]
        input_ids = pad_right(ids, self.pad_token_id)
        batch: Batch = {
            "input_ids": input_ids,
            "attention_mask": _lengths_mask(ids, input_ids.shape[1]),
            "labels": pad_right([it["labels"] for it in items], IGNORE_INDEX),
            "split": self.split,
        }
        if "loss_weights" in items[0]:
            weights = [it["loss_weights"] for it in items]
            width = input_ids.shape[1]
            batch["loss_weights"] = torch.stack(
                [torch.nn.functional.pad(torch.tensor(w, dtype=torch.float), (0, width - len(w))) for w in weights]
            )
        if "task_id" in items[0]:  # multi-task mixtures tag each example with its task
            batch["task_id"] = torch.tensor([int(it["task_id"]) for it in items], dtype=torch.long)
        return batch


class ChoiceCollator:
    """Batches prompts with a gold option index, for accuracy by comparing the options' log-likelihoods.

    When every option is a single token, the batch holds only the prompts (right-padded) and the option
    token ids: one forward pass scores all options. Otherwise each prompt is repeated once per option
    with the option appended, and labels mark the option tokens (``candidates`` layout).
    """

    def __init__(self, pad_token_id: int, option_ids: Sequence[Sequence[int]]) -> None:
        self.pad_token_id = pad_token_id
        self.option_ids = [list(o) for o in option_ids]
        self.single_token = all(len(o) == 1 for o in self.option_ids)

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> Batch:
        prompts = [it["prompt_ids"] for it in items]
        gold = torch.tensor([it["label_index"] for it in items], dtype=torch.long)
        if self.single_token:
            input_ids = pad_right(prompts, self.pad_token_id)
            return {
                "input_ids": input_ids,
                "attention_mask": _lengths_mask(prompts, input_ids.shape[1]),
                "last_index": torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long),
                "option_token_ids": torch.tensor([o[0] for o in self.option_ids], dtype=torch.long),
                "label_index": gold,
                "split": "target",
            }
        seqs, labels = [], []
        for prompt in prompts:
            for option in self.option_ids:
                seqs.append(list(prompt) + option)
                labels.append([IGNORE_INDEX] * len(prompt) + option)
        input_ids = pad_right(seqs, self.pad_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": _lengths_mask(seqs, input_ids.shape[1]),
            "labels": pad_right(labels, IGNORE_INDEX),
            "num_options": len(self.option_ids),
            "label_index": gold,
            "split": "target",
        }


class PromptCollator:
    """Left-pads prompts for generation; keeps the prompt text for the prediction writer."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> Batch:
        prompts = [it["prompt_ids"] for it in items]
        input_ids = pad_left(prompts, self.pad_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": _lengths_mask(prompts, input_ids.shape[1], left=True),
            "prompt": [it["prompt"] for it in items],
            "reference": [it.get("reference") for it in items],
            "split": "predict",
        }
