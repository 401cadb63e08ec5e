"""Loss of context-awareness (Wang et al. 2024, "On the Loss of Context-awareness in General Instruction
Fine-tuning"; code ``YihanWang617/context_awareness``).

The paper finds that chat fine-tuning makes a model attend less to the user's prompt, and measures it with the *user
attention ratio*: for each response token, the attention mass on the user-prompt tokens at one layer (layer 15 of a
32-layer model), the maximum over heads, averaged over the response tokens (:func:`user_attention_ratio`). Its
mitigation marks the training dialogues that depend on their context: a probe model computes each turn's ratio, and
user turns whose ratio exceeds a threshold (0.6) get an indicator token ``[IND]`` appended
(:func:`annotate_indicator`); the model is fine-tuned on the annotated data and, at inference, the indicator is
appended to context-dependent queries (:func:`append_indicator`).

:class:`ContextAwareness` is the monitoring callback: on probe dialogues (default: real human chit-chat turns) it logs
the mean ratio ``context/user_attention_ratio`` and the share of dialogues above the threshold
``context/above_threshold`` every ``every_n_validations`` validations, before the first training step (``baseline``)
and at the end of ``fit``, through every logger; it keeps the history (``history``, restored on resume) and writes
``context_awareness.json`` into the run folder at the end of ``fit``. Attention weights need the eager attention
implementation: the probe batches alone run with it (:func:`eager_attention` switches a model loaded with ``sdpa`` and
switches it back), on global rank 0, and nothing runs on the other steps.

The indicator should be one token: add it to the tokenizer (``tokenizer.add_special_tokens({"additional_special_tokens":
["[IND]"]})`` and ``model.resize_token_embeddings``) before fine-tuning on annotated data.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn
from typing_extensions import override

from lightning_ft.core.support import MethodSupport
from lightning_ft.errors import UserError
from lightning_ft.monitors.base import RANK_ZERO_SHARDED, MonitorCallback, module_tokenizer

__all__ = [
    "ContextAwareness",
    "annotate_indicator",
    "append_indicator",
    "default_layer",
    "dialogue_ratios",
    "eager_attention",
    "encode_dialogue",
    "user_attention_ratio",
]

INDICATOR = "[IND]"


def _pretrained(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _num_layers(model: nn.Module) -> int:
    config = _pretrained(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)


def default_layer(model: nn.Module) -> int:
    """The middle block, ``(num_layers - 1) // 2``: layer 15 of a 32-layer model, as in the paper."""
    return (_num_layers(model) - 1) // 2


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with the eager attention implementation inside the block (the only one that returns attention
    weights), and switch back to the one it had (``sdpa``, a flash kernel) on the way out, even on an error."""
    base = _pretrained(model)
    previous = getattr(getattr(base, "config", None), "_attn_implementation", None)
    if previous in (None, "eager") or not hasattr(base, "set_attn_implementation"):
        yield
        return
    base.set_attn_implementation("eager")
    try:
        yield
    finally:
        base.set_attn_implementation(previous)


@torch.no_grad()
def user_attention_ratio(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    user_mask: torch.Tensor,
    response_mask: torch.Tensor,
    layer: int,
) -> torch.Tensor:
    """``[B]`` user attention ratio of each row: at attention layer ``layer``, the attention of each response token on
    the user-prompt tokens (summed over those columns), the maximum over heads, averaged over the response tokens.

    Args:
        model: a causal LM (or peft model); run once with eager attention and ``output_attentions=True``.
        input_ids: ``[B, T]`` token ids (right-padded).
        attention_mask: ``[B, T]``, 1 for real tokens.
        user_mask: ``[B, T]``, true on the user-prompt tokens (the columns whose attention mass counts).
        response_mask: ``[B, T]``, true on the response tokens (the rows averaged).
        layer: index into the model's attention layers (0-based; negative counts from the end).

    Returns:
        The ratios in ``[0, 1]`` (float64, on the CPU); ``nan`` for a row without response tokens.
    """
    with eager_attention(model):
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True, use_cache=False)
    attentions = getattr(out, "attentions", None)
    if not attentions or attentions[layer] is None:
        raise UserError(f"{type(_pretrained(model)).__name__} returned no attention weights: load it with "
                        "attn_implementation='eager' (its attention cannot be switched at run time).")  # fmt: skip
    attn = attentions[layer].detach().double().cpu()  # [B, H, T, T]
    user = user_mask.bool().cpu()[:, None, None, :]
    per_head = (attn * user).sum(dim=-1)  # [B, H, T]: mass on the user columns of each row
    best = per_head.amax(dim=1)  # [B, T]
    rows = response_mask.bool().cpu()
    count = rows.sum(dim=1)
    ratio = (best * rows).sum(dim=1) / count.clamp_min(1)
    return torch.where(count > 0, ratio, torch.full_like(ratio, math.nan))


def encode_dialogue(
    tokenizer: Any,
    prompt: str,
    response: str,
    chat_template: bool | None = None,
    template: str = "User: {prompt}\nAssistant: ",
    max_length: int = 256,
) -> dict[str, list[Any]]:
    """Token ids of one user turn and its response, with the masks of the user-prompt tokens (those holding some of the
    prompt's own text, not the chat template's role markers or system prompt) and of the response tokens (those
    holding some of the response: a token that joins a template space to the response's first word counts).

    With ``chat_template`` (default: when the tokenizer has one) the prompt is the tokenizer's chat rendering of the
    user turn with the generation prompt; otherwise ``template``. A fast tokenizer's offsets place the tokens; a
    sequence longer than ``max_length`` loses its end.
    """
    if chat_template is None:
        chat_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template:
        prefix = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               tokenize=False)  # fmt: skip
    else:
        prefix = template.format(prompt=prompt)
    start = prefix.rfind(prompt)
    if start < 0:
        raise ValueError(f"the rendered turn {prefix!r} does not hold the prompt text: use a template with {{prompt}}.")
    end = start + len(prompt)
    enc = tokenizer(prefix + response, add_special_tokens=not chat_template, return_offsets_mapping=True,
                    truncation=True, max_length=max_length)  # fmt: skip
    offsets = enc["offset_mapping"]
    return {
        "input_ids": list(enc["input_ids"]),
        "user_mask": [e > start and s < end for s, e in offsets],
        "response_mask": [e > len(prefix) for _, e in offsets],
    }


def _pad_right(rows: Sequence[Sequence[Any]], value: Any, dtype: torch.dtype) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([list(row) + [value] * (width - len(row)) for row in rows], dtype=dtype)


@torch.no_grad()
def dialogue_ratios(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    layer: int | None = None,
    prompt_field: str = "prompt",
    response_field: str = "response",
    batch_size: int = 4,
    max_length: int = 256,
    chat_template: bool | None = None,
) -> list[float]:
    """The user attention ratio of each record's response to its prompt (``nan`` when the response was cut off),
    computed in batches of ``batch_size`` (layer default: :func:`default_layer`)."""
    layer = default_layer(model) if layer is None else layer
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out: list[float] = []
    for begin in range(0, len(records), batch_size):
        items = [encode_dialogue(tokenizer, str(r[prompt_field]), str(r[response_field]), chat_template,
                                 max_length=max_length) for r in records[begin : begin + batch_size]]  # fmt: skip
        input_ids = _pad_right([it["input_ids"] for it in items], pad, torch.long).to(device)
        mask = _pad_right([[1] * len(it["input_ids"]) for it in items], 0, torch.long).to(device)
        user = _pad_right([it["user_mask"] for it in items], False, torch.bool)
        response = _pad_right([it["response_mask"] for it in items], False, torch.bool)
        out.extend(float(r) for r in user_attention_ratio(model, input_ids, mask, user, response, layer))
    return out


def append_indicator(prompt: str, indicator: str = INDICATOR) -> str:
    """``prompt`` with the indicator appended, as the paper writes it: a full stop after a final letter or digit, then
    a space and the indicator. A prompt that already ends with the indicator is returned as it is.

    Use it at inference on context-dependent queries, as on the annotated training turns (:func:`annotate_indicator`).
    """
    if prompt.endswith(indicator):
        return prompt
    if prompt and prompt[-1].isalnum():
        prompt += "."
    return f"{prompt} {indicator}"


def annotate_indicator(
    records: Sequence[Mapping[str, Any]],
    ratios: Sequence[float],
    threshold: float = 0.6,
    indicator: str = INDICATOR,
    prompt_field: str = "prompt",
) -> list[dict[str, Any]]:
    """Copies of ``records`` whose user turn (``prompt_field``) gets the indicator (:func:`append_indicator`) where its
    precomputed user attention ratio exceeds ``threshold``; the others (and ``nan`` ratios) are unchanged copies.

    Raises:
        ValueError: ``records`` and ``ratios`` differ in length.
    """
    if len(records) != len(ratios):
        raise ValueError(f"ratios has {len(ratios)} values for {len(records)} records: give one ratio per record.")
    out = []
    for record, ratio in zip(records, ratios):
        copy = dict(record)
        if ratio > threshold:  # False for nan
            copy[prompt_field] = append_indicator(str(copy[prompt_field]), indicator)
        out.append(copy)
    return out


class ContextAwareness(MonitorCallback):
    """Logs the user attention ratio of the model on probe dialogues during fine-tuning (see the module docstring).

    Args:
        dataset: a bundled dataset name or a data file of prompt/response records (default: chit-chat turns).
        prompt_field: the user-turn column.
        response_field: the response column.
        num_dialogues: probe dialogues (drawn with ``seed``).
        layer: the attention layer measured (default: the middle block, ``(num_layers - 1) // 2``; paper: 15 of 32).
        threshold: the ratio above which a dialogue counts as context-dependent (paper: 0.6).
        chat_template: render the user turn with the tokenizer's chat template (default: when it has one).
        every_n_validations: measure after every n-th validation run (0: only at the start and end of ``fit``).
        baseline: measure the model before its first training step too (skipped when resuming).
        batch_size: probe dialogues per forward pass.
        max_length: tokens per probe dialogue.
        seed: the seed of the choice of probe dialogues.
        tokenizer: a model name or folder whose tokenizer renders the probes (default: the module's ``tokenizer``).
        filename: the JSON written into ``trainer.default_root_dir`` at the end of ``fit`` (``None``: none).
        module: attribute path of the transformers model inside the LightningModule (default: found).

    Example::

        trainer = L.Trainer(callbacks=[ContextAwareness(dataset="chitchat", num_dialogues=16, every_n_validations=1)])
    """

    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "lora", "mixed", "quantized"}),
        {"fsdp2": RANK_ZERO_SHARDED},
        notes="A monitor: it changes no weight; its probe batches alone run with eager attention, on global rank 0.",
    )
    prefix: ClassVar[str] = "context"

    def __init__(
        self,
        dataset: str = "chitchat",
        prompt_field: str = "prompt",
        response_field: str = "response",
        num_dialogues: int = 16,
        layer: int | None = None,
        threshold: float = 0.6,
        chat_template: bool | None = None,
        every_n_validations: int = 1,
        baseline: bool = True,
        batch_size: int = 4,
        max_length: int = 256,
        seed: int = 0,
        tokenizer: str | None = None,
        filename: str | None = "context_awareness",
        module: str | None = None,
    ) -> None:
        super().__init__(every_n_validations, baseline, filename, module)
        if num_dialogues < 1:
            raise ValueError(f"num_dialogues={num_dialogues} must be at least 1 (probe dialogues).")
        if layer is not None and layer < 0:
            raise ValueError(f"layer={layer} must be 0 or more (an attention layer index), or null for the middle one.")
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold={threshold} must be in [0, 1]: it bounds an attention share (paper: 0.6).")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1 (probe dialogues per forward pass).")
        if max_length < 4:
            raise ValueError(f"max_length={max_length} must be at least 4 (a prompt and a response token).")
        self.dataset, self.prompt_field, self.response_field = dataset, prompt_field, response_field
        self.num_dialogues, self.layer, self.threshold = num_dialogues, layer, float(threshold)
        self.chat_template, self.batch_size, self.max_length = chat_template, batch_size, max_length
        self.seed, self.tokenizer_name = seed, tokenizer
        self.dialogues: list[dict[str, Any]] = []
        self._tokenizer: Any = None
        self._layer: int | None = layer

    @property
    @override
    def state_key(self) -> str:
        return f"ContextAwareness[dataset={self.dataset}, layer={self.layer}]"

    @override
    def prepare(self, trainer: L.Trainer, pl_module: L.LightningModule, model: nn.Module) -> None:
        from lightning_ft.data.files import load_records

        self._tokenizer = module_tokenizer(pl_module, self.tokenizer_name, type(self).__name__, model)
        count = _num_layers(model)
        self._layer = (count - 1) // 2 if self.layer is None else self.layer
        if self._layer >= count:
            raise UserError(f"layer={self.layer} is past the last attention layer of {type(_pretrained(model)).__name__}: "
                            f"pick one of 0 .. {count - 1}.")  # fmt: skip
        records = load_records(self.dataset, argument="dataset")
        fields = (self.prompt_field, self.response_field)
        usable = [r for r in records if all(str(r.get(f) or "").strip() for f in fields)]
        if not usable:
            raise UserError(f"dataset={self.dataset!r} has no records with non-empty {self.prompt_field!r} and "
                            f"{self.response_field!r}: set prompt_field and response_field to its columns.")  # fmt: skip
        self.dialogues = random.Random(self.seed).sample(usable, min(self.num_dialogues, len(usable)))

    def ratios(self) -> list[float]:
        """The user attention ratio of each probe dialogue, for the model as it is now."""
        assert self._model is not None and self.dialogues, "call setup('fit') first (on global rank 0)"
        return dialogue_ratios(self._model, self._tokenizer, self.dialogues, self._layer, self.prompt_field,
                               self.response_field, self.batch_size, self.max_length, self.chat_template)  # fmt: skip

    @override
    def measure(self) -> dict[str, float]:
        ratios = [r for r in self.ratios() if not math.isnan(r)]
        if not ratios:
            return {"user_attention_ratio": math.nan, "above_threshold": math.nan}
        return {"user_attention_ratio": sum(ratios) / len(ratios),
                "above_threshold": sum(r > self.threshold for r in ratios) / len(ratios)}  # fmt: skip

    @override
    def settings(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "dialogues": len(self.dialogues), "layer": self._layer,
                "threshold": self.threshold}  # fmt: skip
