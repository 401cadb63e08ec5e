"""UL2's mixture of denoisers (Tay et al. 2022, arXiv 2205.05131) for decoder-only models, under a prefix-LM mask.

What the paper does: every pre-training example is corrupted by one denoiser drawn from a mixture. An R-denoiser
("regular") is T5 span corruption: about 15% of the tokens in short spans (mean 3 or 8), each span replaced by a
sentinel; the target lists the sentinels, each followed by the tokens it hid. An X-denoiser ("extreme") corrupts long
spans (mean 64) or half of the text (rate 50%). The S-denoiser ("sequential") is prefix LM: the text is cut once and
the target is its end. A mode token ([R], [X] or [S]) in front of the input names the denoiser, so that a fine-tuned
model can be switched into the matching mode later. The final UL2 mixture has seven denoisers: R(mu=3, r=0.15),
R(mu=8, r=0.15), S(r=0.25), X(mu=3, r=0.5), X(mu=8, r=0.5), X(mu=64, r=0.15), X(mu=64, r=0.5)
(:data:`PAPER_MIXTURE`). For a decoder-only model the input (mode token and corrupted text) is a bidirectional
prefix and the target is generated causally after it; the loss covers the target only.

What was verified and what was reconstructed: the seven (mu, r) settings, the three mode tokens and the prefix-LM
layout for decoder-only models were checked against secondary sources that quote the paper (the llm-foundry
``MixtureOfDenoisersCollator`` docstring and the unify-learning-paradigms README); the paper itself could not be read
here. The share of S-denoised examples is reconstructed: the weights give S 20% of the examples (weight 1.5 against 1
for each of the six span denoisers; sampling the seven denoisers uniformly would give it 14%). Span lengths follow
T5's ``random_spans_noise_mask`` (``round(L * r)`` noise tokens cut into ``round(L * r / mu)`` spans at uniformly drawn
points), where the paper describes span lengths drawn around the mean mu; with short texts the span count is at
least 1, so a long-span denoiser then hides one span of ``round(L * r)`` tokens. The S-denoiser's target length is
uniform on ``1 .. 2rL - 1`` (mean ``r * L``; with ``r = 0.5`` the split point is uniform over the whole text).

Where this differs from the paper: mode tokens and sentinels are plain text (``[R]``, ``[X]``, ``[S]`` and
``<0>``, ``<1>``, ...), tokenised by the model's own tokenizer, so the vocabulary and the embedding matrix stay as
they are (no new tokens to train from scratch, and the saved model loads unchanged); a tokenizer that already holds
such strings as special tokens (T5's ``<extra_id_0>`` with ``sentinel_template="<extra_id_{i}>"``) maps each to one
id. The target ends with the tokenizer's EOS token.

The batch's ``attention_mask`` is the 4D additive prefix-LM mask ``[B, 1, T, T]`` (0 where a query may attend, the
float32 minimum elsewhere), the form the Hugging Face Llama and GPT-2 models take as given (transformers'
``masking_utils`` returns a 4D mask as it is). :class:`~lightning_ft.modules.CausalLMModule` passes the batch's
``attention_mask`` to the backbone unchanged, so nothing needs wiring: a float32 or bfloat16 model on CPU takes the
float32 mask under both SDPA and eager attention (tested). Where an attention kernel wants the mask in the query's
dtype (CUDA kernels were not available to test here), mix :class:`PrefixLMMaskMixin` into the module: it casts the
mask to the backbone's dtype. FlashAttention-2 is not expected to honour a custom 4D mask (not tested): use
``sdpa`` or ``eager``.
"""

from __future__ import annotations

import inspect
import itertools
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from lightning_ft.data.collate import IGNORE_INDEX, pad_right
from lightning_ft.data.instruction import InstructionDataModule
from lightning_ft.data.sampling import train_loader

__all__ = [
    "DEFAULT_MODE_TOKENS",
    "PAPER_MIXTURE",
    "Denoiser",
    "DenoisingDataModule",
    "MixtureOfDenoisersCollator",
    "PrefixLMCollator",
    "PrefixLMMaskMixin",
    "noise_spans",
    "prefix_lm_mask",
]

Mode = Literal["R", "X", "S"]
DEFAULT_MODE_TOKENS: dict[str, str] = {"R": "[R]", "X": "[X]", "S": "[S]"}


@dataclass(frozen=True)
class Denoiser:
    """One denoiser of the mixture.

    Args:
        mode: ``R`` (regular span corruption), ``X`` (extreme span corruption) or ``S`` (prefix LM).
        rate: the share of the text corrupted (for ``S``: the mean share of the text that is the target).
        mean_span: the mean length of a corrupted span (``R`` and ``X`` only).
        weight: the relative frequency of this denoiser in the mixture.
    """

    mode: Mode
    rate: float
    mean_span: float | None = None
    weight: float = 1.0


PAPER_MIXTURE: tuple[Denoiser, ...] = (
    Denoiser("R", 0.15, 3),
    Denoiser("R", 0.15, 8),
    Denoiser("S", 0.25, None, weight=1.5),
    Denoiser("X", 0.5, 3),
    Denoiser("X", 0.5, 8),
    Denoiser("X", 0.15, 64),
    Denoiser("X", 0.5, 64),
)


def _as_denoiser(value: Denoiser | Mapping[str, Any], index: int) -> Denoiser:
    """A checked :class:`Denoiser` from a Denoiser or a mapping (a YAML entry)."""
    where = f"denoisers[{index}]"
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {f.name for f in fields(Denoiser)})
        if unknown or "mode" not in value or "rate" not in value:
            raise ValueError(f"{where}={dict(value)!r} must be a mapping with mode (R, X or S), rate, and for R and X "
                             f"mean_span, optionally weight{f' (unknown keys: {unknown})' if unknown else ''}.")  # fmt: skip
        value = Denoiser(**value)
    elif not isinstance(value, Denoiser):
        raise TypeError(f"{where}={value!r} must be a mapping such as {{mode: R, rate: 0.15, mean_span: 3}}.")
    if value.mode not in ("R", "X", "S"):
        raise ValueError(f"{where}.mode={value.mode!r} must be R (regular), X (extreme) or S (prefix LM).")
    if not 0 < float(value.rate) < 1:
        raise ValueError(
            f"{where}.rate={value.rate} must lie strictly between 0 and 1 (the share of tokens corrupted)."
        )
    if value.mode != "S" and (value.mean_span is None or float(value.mean_span) < 1):
        raise ValueError(f"{where}.mean_span={value.mean_span} must be at least 1 for an {value.mode}-denoiser.")
    if not float(value.weight) > 0:
        raise ValueError(f"{where}.weight={value.weight} must be positive (drop the denoiser to leave it out).")
    return value


def _check_texts(mode_tokens: Mapping[str, str] | None, sentinel_template: str) -> dict[str, str]:
    """The mode tokens' texts (defaults filled in), after checking them and the sentinel template."""
    modes = {**DEFAULT_MODE_TOKENS, **(mode_tokens or {})}
    if set(modes) != set(DEFAULT_MODE_TOKENS) or not all(isinstance(t, str) and t for t in modes.values()):
        raise ValueError(
            f"mode_tokens={dict(mode_tokens or {})!r} must map only the modes R, X and S to non-empty texts."
        )
    if "{i}" not in sentinel_template:
        raise ValueError(f"sentinel_template={sentinel_template!r} must contain {{i}} (the sentinel's number).")
    return modes


# ---------------------------------------------------------------------------------------------------- corruption
def _segments(total: int, count: int, rng: random.Random) -> list[int]:
    """``total`` items cut into ``count`` non-empty runs at uniformly drawn points."""
    cuts = sorted(rng.sample(range(1, total), count - 1)) if count > 1 else []
    bounds = [0, *cuts, total]
    return [b - a for a, b in itertools.pairwise(bounds)]


def noise_spans(length: int, rate: float, mean_span: float, rng: random.Random) -> list[tuple[int, int]]:
    """The corrupted ``[start, end)`` spans of a text of ``length`` tokens (T5's ``random_spans_noise_mask``).

    ``round(length * rate)`` tokens (at least 1, at most ``length - 1``) are corrupted in
    ``max(1, round(noise / mean_span))`` spans; span and gap lengths are random cuts, the text starts with a gap.
    """
    noise = min(max(round(length * rate), 1), length - 1)
    count = max(1, min(round(noise / mean_span), noise, length - noise))
    spans, pos = [], 0
    for keep, hide in zip(_segments(length - noise, count, rng), _segments(noise, count, rng)):
        pos += keep
        spans.append((pos, pos + hide))
        pos += hide
    return spans


def prefix_lm_mask(prefix_lengths: torch.Tensor, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 4D additive prefix-LM mask ``[B, 1, width, width]``: 0 where query ``i`` may attend to key ``j``.

    A query attends to every key before or at it (causal), and a query inside the prefix also to every prefix key
    (bidirectional prefix). Keys after a row's last real token are only reachable from padding queries, whose
    outputs carry no label.
    """
    pos = torch.arange(width)
    causal = pos[None, :] <= pos[:, None]
    inside = pos[None, :] < prefix_lengths[:, None]  # [B, T]
    allowed = causal[None] | (inside[:, :, None] & inside[:, None, :])
    mask = torch.zeros((len(prefix_lengths), 1, width, width), dtype=dtype)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


class PrefixLMCollator:
    """Pads prefix-LM examples (``input_ids``, ``labels``, ``prefix_length``) into a batch with the 4D mask.

    The batch holds ``input_ids`` and ``labels`` (right-padded), ``attention_mask`` (:func:`prefix_lm_mask`),
    ``prefix_mask`` ``[B, T]`` (1 on the bidirectional prefix), ``padding_mask`` ``[B, T]`` (1 on real tokens),
    ``denoiser`` (the index of each row's denoiser in the mixture, ``-1`` if unknown) and ``split``.
    """

    def __init__(self, pad_token_id: int, split: str = "train") -> None:
        self.pad_token_id, self.split = pad_token_id, split

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        ids = [e["input_ids"] for e in examples]
        input_ids = pad_right(ids, self.pad_token_id)
        width = input_ids.shape[1]
        prefix = torch.tensor([int(e["prefix_length"]) for e in examples], dtype=torch.long)
        pos = torch.arange(width)[None, :]
        return {
            "input_ids": input_ids,
            "labels": pad_right([e["labels"] for e in examples], IGNORE_INDEX),
            "attention_mask": prefix_lm_mask(prefix, width),
            "prefix_mask": (pos < prefix[:, None]).long(),
            "padding_mask": (pos < torch.tensor([len(s) for s in ids])[:, None]).long(),
            "denoiser": torch.tensor([int(e.get("denoiser", -1)) for e in examples], dtype=torch.long),
            "split": self.split,
        }


class MixtureOfDenoisersCollator:
    """Corrupts plain-text token sequences with UL2's mixture of denoisers and batches them for a decoder-only LM.

    Each item is a mapping with ``input_ids`` (the text's tokens, without special tokens) and optionally ``index``;
    one denoiser is drawn per item with probability proportional to its ``weight``. An example is laid out as
    ``[BOS] mode-token corrupted-text | sentinel_0 span_0 sentinel_1 span_1 ... EOS`` for R and X and
    ``[BOS] [S] text-start | text-end EOS`` for S; the part before ``|`` is the bidirectional prefix, the part after
    it the target (the only labelled tokens). A text longer than fits in ``max_length`` is cut to a window at a
    random start. Batches come from :class:`PrefixLMCollator` (4D ``attention_mask``, see the module docstring).

    Randomness: an item with an ``index`` is corrupted by a generator seeded with ``(seed, epoch, index)``
    (``epoch`` from ``sampler.epoch`` when a sampler is attached), so a resumed run corrupts as an uninterrupted one
    and DataLoader workers draw independently; items without ``index`` draw from one generator seeded with ``seed``.

    Args:
        tokenizer: the model's tokenizer (for the mode tokens, sentinels, BOS/EOS and padding).
        max_length: tokens per example, prefix and target together.
        denoisers: the mixture (:class:`Denoiser` objects or mappings with the same keys); default
            :data:`PAPER_MIXTURE`.
        mode_tokens: the text of each mode token, ``{R: "[R]", X: "[X]", S: "[S]"}`` by default (the released UL2
            checkpoints use ``[NLU]``, ``[NLG]`` and ``[S2S]``).
        sentinel_template: the text of the ``i``-th sentinel (``str.format`` with ``i``).
        seed: the seed of the corruption.
        split: the ``split`` tag of the batches.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int,
        denoisers: Sequence[Denoiser | Mapping[str, Any]] | None = None,
        mode_tokens: Mapping[str, str] | None = None,
        sentinel_template: str = "<{i}>",
        seed: int = 0,
        split: str = "train",
    ) -> None:
        chosen = PAPER_MIXTURE if denoisers is None else denoisers
        if not chosen:
            raise ValueError("denoisers=[] is empty: give at least one denoiser, or null for the UL2 paper's mixture.")
        self.denoisers = [_as_denoiser(d, i) for i, d in enumerate(chosen)]
        modes = _check_texts(mode_tokens, sentinel_template)
        self.tokenizer, self.max_length, self.seed = tokenizer, max_length, seed
        self.sentinel_template = sentinel_template
        self.lead = list(tokenizer("", add_special_tokens=True)["input_ids"])
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.mode_ids = {m: list(tokenizer(t, add_special_tokens=False)["input_ids"]) for m, t in modes.items()}
        self._sentinels: dict[int, list[int]] = {}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.batcher = PrefixLMCollator(int(pad or 0), split)
        self.sampler: Any = None  # set by the DataModule: its ``epoch`` reseeds the corruption each epoch
        self._rng = random.Random(seed)
        shortest = len(self.lead) + max(len(v) for v in self.mode_ids.values()) + 2 * len(self.sentinel(0)) + 3
        if max_length < shortest:
            raise ValueError(f"max_length={max_length} leaves no room for text after the mode token and a sentinel: "
                             f"use at least {shortest}.")  # fmt: skip
        total = sum(float(d.weight) for d in self.denoisers)
        self.probabilities = [float(d.weight) / total for d in self.denoisers]

    def sentinel(self, i: int) -> list[int]:
        """The token ids of the ``i``-th sentinel."""
        if i not in self._sentinels:
            text = self.sentinel_template.format(i=i)
            self._sentinels[i] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._sentinels[i]

    def draw(self, rng: random.Random) -> int:
        """The index of a denoiser drawn from the mixture."""
        return rng.choices(range(len(self.denoisers)), weights=self.probabilities)[0]

    def corrupt(self, ids: Sequence[int], rng: random.Random, which: int | None = None) -> dict[str, Any]:
        """One prefix-LM example from the token ids of a text (denoiser ``which``, or one drawn from the mixture).

        Returns ``input_ids``, ``labels`` (``-100`` on the prefix), ``prefix_length``, ``denoiser`` (its index) and
        ``noise_spans`` (the corrupted spans in the kept window of the text, ``[(start, end)]``; for S the target).
        """
        which = self.draw(rng) if which is None else which
        den = self.denoisers[which]
        head = self.lead + self.mode_ids[den.mode]
        room = self.max_length - len(head) - len(self.eos)
        length = min(len(ids), room)
        while True:
            start = rng.randrange(len(ids) - length + 1)
            text = list(ids[start : start + length])
            prefix, target, spans = self._denoise(text, den, rng)
            over = len(prefix) + len(target) - room
            if over <= 0 or length <= 2:
                break
            length = max(2, length - over)
        prefix, target = head + prefix, target + self.eos
        return {"input_ids": prefix + target, "labels": [IGNORE_INDEX] * len(prefix) + target,
                "prefix_length": len(prefix), "denoiser": which, "noise_spans": spans}  # fmt: skip

    def _denoise(self, text: list[int], den: Denoiser, rng: random.Random) -> tuple[list[int], list[int], list]:
        if len(text) < 2:
            return text, [], []
        if den.mode == "S":
            longest = min(len(text) - 1, max(1, round(2 * den.rate * len(text)) - 1))
            cut = len(text) - rng.randint(1, longest)
            return text[:cut], text[cut:], [(cut, len(text))]
        spans = noise_spans(len(text), den.rate, float(den.mean_span or 1), rng)
        prefix: list[int] = []
        target: list[int] = []
        last = 0
        for k, (a, b) in enumerate(spans):
            prefix += text[last:a] + self.sentinel(k)
            target += self.sentinel(k) + text[a:b]
            last = b
        return prefix + text[last:], target, spans

    def rng_for(self, item: Mapping[str, Any]) -> random.Random:
        """The generator that corrupts ``item`` (see the class docstring)."""
        if "index" not in item:
            return self._rng
        epoch = int(getattr(self.sampler, "epoch", 0) or 0)
        return random.Random(f"{self.seed}\0{epoch}\0{int(item['index'])}")

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return self.batcher([self.corrupt(it["input_ids"], self.rng_for(it)) for it in items])


class PrefixLMMaskMixin:
    """Casts a 4D additive ``attention_mask`` to the backbone's dtype before the forward pass.

    Mix it in front of a LightningModule whose ``forward(input_ids, attention_mask, **kwargs)`` calls a Hugging Face
    ``backbone`` (e.g. ``class UL2CausalLM(PrefixLMMaskMixin, CausalLMModule)``), for a bfloat16/float16 backbone
    whose attention kernel wants the mask in the query's dtype (:class:`PrefixLMCollator` builds it in float32).
    """

    backbone: torch.nn.Module

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if attention_mask is not None and attention_mask.dim() == 4:
            dtype = getattr(self.backbone, "dtype", torch.float32)
            dtype = dtype if dtype.is_floating_point else torch.float32
            if attention_mask.dtype != dtype:
                blocked = attention_mask < 0 if attention_mask.is_floating_point() else ~attention_mask.bool()
                attention_mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
                attention_mask = attention_mask.masked_fill(blocked, torch.finfo(dtype).min)
        return super().forward(input_ids, attention_mask, **kwargs)  # type: ignore[misc]


class DenoisingDataModule(InstructionDataModule):
    """Continued pre-training on plain text with UL2's mixture of denoisers (see the module docstring).

    The training loader corrupts each text anew every epoch with :class:`MixtureOfDenoisersCollator`; validation
    and test examples are corrupted once, by a generator seeded with ``denoise_seed`` and the text, so ``val/target_loss``
    is the denoising loss on the same examples at every evaluation. Prediction continues the start of each
    validation/test text in S mode (the prompt is the S mode token and the text's first half).

    Example (YAML)::

        data:
          class_path: lightning_ft.data.ul2.DenoisingDataModule
          init_args: {dataset: hamlet, text_field: text, max_length: 128,
                      denoisers: [{mode: R, rate: 0.15, mean_span: 3}, {mode: S, rate: 0.25}]}

    Args:
        dataset: bundled dataset name or path of a data file of plain text.
        text_field: the column that holds the text.
        denoisers: the mixture, a list of ``{mode, rate, mean_span, weight}`` mappings; ``None``: the UL2 paper's
            seven denoisers (:data:`PAPER_MIXTURE`).
        mode_tokens: the text of the mode tokens per mode; default ``{R: "[R]", X: "[X]", S: "[S]"}``.
        sentinel_template: the text of the ``i``-th sentinel (``str.format`` with ``i``).
        denoise_seed: the seed of the corruption (not ``seed``: a LightningModule may have its own).
        max_length: tokens per example, prefix and target together.
        train_size, val_size, test_size, split_seed, shuffle_seed, batch_size, eval_batch_size, num_workers: as in
            :class:`~lightning_ft.data.InstructionDataModule`.
        **kwargs: the control set and tokenizer of :class:`~lightning_ft.data.control.ControlDataModule`.
    """

    def __init__(
        self,
        dataset: str = "hamlet",
        text_field: str = "text",
        denoisers: list[dict[str, Any]] | None = None,
        mode_tokens: dict[str, str] | None = None,
        sentinel_template: str = "<{i}>",
        denoise_seed: int = 0,
        max_length: int = 128,
        train_size: int | None = None,
        val_size: int = 16,
        test_size: int = 0,
        split_seed: int = 1234,
        shuffle_seed: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        if not text_field or "{" in text_field or "}" in text_field:
            raise ValueError(f"text_field={text_field!r} must name a column of the dataset, e.g. text.")
        for name in ("chat_template", "append_eos"):
            if kwargs.get(name):
                raise ValueError(f"{name}=True does not apply to DenoisingDataModule (plain text; targets end with EOS): "
                                 "leave it out.")  # fmt: skip
        super().__init__(
            dataset=dataset, prompt_template="{" + text_field + "}", response_template="", label_options=None,
            train_size=train_size, val_size=val_size, test_size=test_size, split_seed=split_seed,
            shuffle_seed=shuffle_seed, max_length=max_length, mask_prompt=True, batch_size=batch_size,
            eval_batch_size=eval_batch_size, num_workers=num_workers, **kwargs,
        )  # fmt: skip
        # Under LightningCLI the hparams are the config's init_args alone: add the InstructionDataModule arguments
        # this class fixes or leaves at their defaults, which its methods read from self.hparams.
        forced = {"prompt_template": "{" + text_field + "}", "response_template": "", "label_options": None,
                  "mask_prompt": True, "chat_template": False, "append_eos": False}  # fmt: skip
        for name, param in inspect.signature(InstructionDataModule.__init__).parameters.items():
            if name in forced or (param.default is not param.empty and name not in self.hparams):
                self.hparams[name] = forced.get(name, param.default)
        _ = [_as_denoiser(d, i) for i, d in enumerate(denoisers or [])]  # refuse bad options before any loading
        if denoisers is not None and not denoisers:
            raise ValueError("denoisers=[] is empty: give at least one denoiser, or null for the UL2 paper's mixture.")
        _check_texts(mode_tokens, sentinel_template)
        self._collator: MixtureOfDenoisersCollator | None = None

    @property
    def collator(self) -> MixtureOfDenoisersCollator:
        """The training collator (built from the tokenizer on first use)."""
        if self._collator is None:
            h = self.hparams
            self._collator = MixtureOfDenoisersCollator(self.setup_tokenizer(), h.max_length, h.denoisers,
                                                        h.mode_tokens, h.sentinel_template, h.denoise_seed)  # fmt: skip
        return self._collator

    def setup(self, stage: str | None = None) -> None:
        """Load, split and tokenise the texts; texts of fewer than two tokens are left out of training."""
        if self._encoded:
            return
        _ = self.collator  # checks max_length against the mode tokens and sentinels first
        super().setup(stage)
        train = [dict(e, index=i) for i, e in enumerate(e for e in self._encoded["train"] if len(e["input_ids"]) >= 2)]
        if not train:
            raise ValueError(f"dataset={self.hparams.dataset!r} has no training text of two tokens or more in column "
                             f"{self.hparams.text_field!r}: choose the column that holds the text.")  # fmt: skip
        self._encoded["train"] = train

    def _check_fields(self, record: dict[str, Any], source: str) -> None:
        field = self.hparams.text_field
        if field not in record:
            raise ValueError(f"text_field={field!r} is not a column of {source!r} (columns: {sorted(record)}): set "
                             "text_field to the column that holds the text.")  # fmt: skip

    def _text_ids(self, record: dict[str, Any]) -> list[int]:
        return list(self.tokenizer(self._prompt(record), add_special_tokens=False)["input_ids"])

    def _encode_train(self, record: dict[str, Any]) -> dict[str, Any]:
        return {"input_ids": self._text_ids(record)}

    def _encode_eval(self, record: dict[str, Any]) -> dict[str, Any]:
        ids = self._text_ids(record)
        example = self.collator.corrupt(ids, random.Random(f"{self.hparams.denoise_seed}\0{self._prompt(record)}"))
        example.pop("noise_spans")
        return example

    def _encode_predict(self, record: dict[str, Any]) -> dict[str, Any]:
        ids = self._text_ids(record)
        cut = max(1, len(ids) // 2)
        head = self.collator.lead + self.collator.mode_ids["S"]
        prompt_ids = head + ids[:cut][-(self.hparams.max_length - len(head)) :]
        return {"prompt": self.tokenizer.decode(prompt_ids), "prompt_ids": prompt_ids,
                "reference": self.tokenizer.decode(ids[cut:])}  # fmt: skip

    def _eval_loader(self, split: str) -> DataLoader:
        h = self.hparams
        return DataLoader(self._encoded[split], batch_size=h.eval_batch_size, num_workers=h.num_workers,
                          collate_fn=PrefixLMCollator(self.pad_token_id, split="target"))  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        loader = train_loader(
            self._encoded["train"], h.batch_size, h.split_seed if h.shuffle_seed is None else h.shuffle_seed,
            self.trainer, collate_fn=self.collator, num_workers=h.num_workers,
        )  # fmt: skip
        self.collator.sampler = loader.sampler
        return loader
