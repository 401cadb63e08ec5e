r"""
Token-weighted SFT
^^^^^^^^^^^^^^^^^^

One weight hook, several weight providers. A provider gives each response token a loss weight; the
DataModule puts them into the batch as ``loss_weights`` and :class:`~lightning_ft.modules.CausalLMModule`
minimises ``sum_t w_t CE_t / sum_t w_t`` (``loss_normalization="weights"``) or ``/ N`` (``"tokens"``).

* :class:`KeyTokenWeights`: TL-Training "prioritise key tokens" (Ye et al., arXiv 2412.15495).
* :class:`DiffWeights`: FAIT fault-aware fine-tuning (Fan et al., arXiv 2503.16913): line- and token-level
  differences between a correct and a similar incorrect response.
* :class:`SpanWeights`: PTR thought masking (Du et al., arXiv 2410.13413): earlier attempts are context, the
  refined answer is the target.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from typing import Any, ClassVar

from lightning_ft.data.collate import IGNORE_INDEX
from lightning_ft.data.instruction import InstructionDataModule
from lightning_ft.objectives._common import check_fit_support
from lightning_ft.support import MethodSupport

__all__ = ["DiffWeights", "KeyTokenWeights", "SpanWeights", "TokenWeightedDataModule", "TokenWeighting"]

Offsets = Sequence[tuple[int, int]]


def _field(record: dict[str, Any], name: str, argument: str) -> Any:
    if name not in record:
        raise ValueError(
            f"{argument}={name!r} is not a field of the data (its fields are {sorted(record)}): "
            f"set {argument} to the field that holds it."
        )
    return record[name]


def _find(response: str, text: str) -> int:
    return response.find(text) if text else -1


def _overlaps(offsets: Offsets, spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Whether each token's character range ``[s, e)`` overlaps one of ``spans``."""
    return [e > s and any(s < b and e > a for a, b in spans) for s, e in offsets]


def _token_at(offsets: Offsets, char: int) -> int | None:
    """Index of the token that covers character ``char`` (``None`` when it is past the kept tokens)."""
    for i, (s, e) in enumerate(offsets):
        if e > char and e > s:
            return i
    return None


class TokenWeighting:
    """Base class of the weight providers: one weight per response token.

    Subclasses implement :meth:`response_weights`; a weight of 0 removes the token from the loss. The weights reach
    the loss of :class:`~lightning_ft.modules.CausalLMModule` through :class:`TokenWeightedDataModule`, whose
    ``setup("fit")`` checks the provider's declared support.
    """

    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "fsdp2", "quantized", "lora", "mixed"}),
        {},
        "Checked by TokenWeightedDataModule; under DDP and FSDP2 each process divides by its own batch's weight sum.",
    )

    def response_weights(self, record: dict[str, Any], response: str, offsets: Offsets) -> list[float]:
        """Weights of the response tokens.

        Args:
            record: The data record (all its fields).
            response: The rendered response text.
            offsets: ``(start, end)`` character range of each response token in ``response``.
        """
        raise NotImplementedError


class KeyTokenWeights(TokenWeighting):
    """TL-Training PKT: up-weight the tokens where the gold tool call could go wrong.

    Key tokens are the first response token and, for every other tool listed in the record, the token of
    the response where the gold tool name first differs from that tool's name. Key tokens get
    ``clamp(N_other / N_key, 1, max_weight)``, all other tokens 1 (``N_key``/``N_other``: key and other
    response tokens of the example; the lower bound 1 keeps short responses from down-weighting key tokens).

    Args:
        tools_field: Field listing the tools available in the prompt (a list of names, or one string
            separated by ``separator``).
        tool_field: Field holding the gold tool name; it must occur in the response.
        max_weight: Cap of the key-token weight (paper: 9); 1 gives the plain loss.
        separator: Separator of ``tools_field`` when it is a string.
    """

    def __init__(
        self, tools_field: str = "tools", tool_field: str = "tool", max_weight: float = 9.0, separator: str = ","
    ) -> None:
        if max_weight < 1:
            raise ValueError(f"max_weight={max_weight} must be at least 1 (1 gives the plain loss; the paper uses 9).")
        self.tools_field, self.tool_field, self.max_weight, self.separator = (
            tools_field,
            tool_field,
            max_weight,
            separator,
        )

    def key_tokens(self, record: dict[str, Any], response: str, offsets: Offsets) -> set[int]:
        """Indices of the key tokens of one response."""
        gold = str(_field(record, self.tool_field, "tool_field"))
        tools = _field(record, self.tools_field, "tools_field")
        names = [t.strip() for t in tools.split(self.separator)] if isinstance(tools, str) else [str(t) for t in tools]
        keys = {0} if offsets else set()
        start = _find(response, gold)
        if start < 0:
            return keys
        for other in names:
            if not other or other == gold:
                continue
            diverge = len(os.path.commonprefix([gold, other]))
            index = _token_at(offsets, start + min(diverge, len(gold)))
            if index is not None:
                keys.add(index)
        return keys

    def response_weights(self, record: dict[str, Any], response: str, offsets: Offsets) -> list[float]:
        keys = self.key_tokens(record, response, offsets)
        if not keys:
            return [1.0] * len(offsets)
        weight = min(max((len(offsets) - len(keys)) / len(keys), 1.0), self.max_weight)
        return [weight if i in keys else 1.0 for i in range(len(offsets))]


class DiffWeights(TokenWeighting):
    """FAIT: up-weight the parts of a correct response that a similar incorrect response gets wrong.

    The correct text (field ``correct_field``, found inside the rendered response) is diffed line by line
    against the incorrect one (``difflib``); inside changed lines a character diff marks the changed
    characters. Token ``j`` gets ``1 + line_weight * m_line + token_weight * m_tok`` where ``m_line`` says
    it lies on a changed (replaced or deleted) line and ``m_tok`` that it covers a changed character.
    Both weights 0 give the plain loss. The paper re-weights these segments "dynamically"; this provider is
    the static form, and its coefficients are a choice (the paper's values are not published with code).

    Args:
        incorrect_field: Field holding the similar but incorrect response.
        correct_field: Field holding the correct response (must occur in the rendered response).
        line_weight: ``alpha``, extra weight of tokens on changed lines.
        token_weight: ``beta``, extra weight of changed tokens.
    """

    def __init__(
        self,
        incorrect_field: str = "incorrect",
        correct_field: str = "response",
        line_weight: float = 1.0,
        token_weight: float = 1.0,
    ) -> None:
        if line_weight < 0 or token_weight < 0:
            raise ValueError(f"line_weight={line_weight} and token_weight={token_weight} must be zero or positive.")
        self.incorrect_field, self.correct_field = incorrect_field, correct_field
        self.line_weight, self.token_weight = line_weight, token_weight

    @staticmethod
    def changed_spans(correct: str, incorrect: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """``(changed line spans, changed character spans)`` of ``correct`` against ``incorrect`` (char offsets)."""
        ours, theirs = correct.splitlines(keepends=True), incorrect.splitlines(keepends=True)
        starts = [0]
        for line in ours:
            starts.append(starts[-1] + len(line))
        lines, chars = [], []
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ours, theirs, autojunk=False).get_opcodes():
            if tag in ("equal", "insert"):
                continue
            lines.append((starts[i1], starts[i2]))
            if tag == "delete":
                chars.append((starts[i1], starts[i2]))
                continue
            block, other = "".join(ours[i1:i2]), "".join(theirs[j1:j2])
            for op, a1, a2, _, _ in difflib.SequenceMatcher(None, block, other, autojunk=False).get_opcodes():
                if op in ("replace", "delete"):
                    chars.append((starts[i1] + a1, starts[i1] + a2))
                elif op == "insert":  # text missing here: mark the character it would follow
                    at = starts[i1] + max(a1 - 1, 0)
                    chars.append((at, at + 1))
        return lines, chars

    def response_weights(self, record: dict[str, Any], response: str, offsets: Offsets) -> list[float]:
        correct = str(_field(record, self.correct_field, "correct_field"))
        incorrect = str(_field(record, self.incorrect_field, "incorrect_field"))
        base = _find(response, correct)
        if base < 0:
            raise ValueError(
                f"correct_field={self.correct_field!r} does not occur in the rendered response: make "
                "response_template render that field verbatim."
            )
        lines, chars = self.changed_spans(correct, incorrect)
        on_line = _overlaps(offsets, [(base + a, base + b) for a, b in lines])
        on_char = _overlaps(offsets, [(base + a, base + b) for a, b in chars])
        return [1.0 + self.line_weight * m + self.token_weight * c for m, c in zip(on_line, on_char)]


class SpanWeights(TokenWeighting):
    """PTR: weight the thought spans (earlier attempts) and the refined answer separately.

    Tokens inside the rendered text of any ``thought_fields`` (a string or a list of strings, each found
    in the response) get ``thought_weight`` (default 0: context, not target); every other response token
    gets ``answer_weight``. PTR's released code masks the thoughts and weights the answer uniformly; the
    paper's further re-weighting is not published, so both weights are arguments.

    Args:
        thought_fields: Fields holding the thought/draft texts.
        thought_weight: Weight of thought tokens (0 removes them from the loss).
        answer_weight: Weight of the other response tokens.
    """

    def __init__(
        self, thought_fields: list[str] | None = None, thought_weight: float = 0.0, answer_weight: float = 1.0
    ) -> None:
        if thought_weight < 0 or answer_weight < 0:
            raise ValueError(
                f"thought_weight={thought_weight} and answer_weight={answer_weight} must be zero or positive."
            )
        self.thought_fields = list(thought_fields) if thought_fields is not None else ["thoughts"]
        self.thought_weight, self.answer_weight = thought_weight, answer_weight

    def response_weights(self, record: dict[str, Any], response: str, offsets: Offsets) -> list[float]:
        spans: list[tuple[int, int]] = []
        for name in self.thought_fields:
            value = _field(record, name, "thought_fields")
            for text in value if isinstance(value, list) else [value]:
                start = _find(response, str(text))
                if start >= 0:
                    spans.append((start, start + len(str(text))))
        inside = _overlaps(offsets, spans)
        return [self.thought_weight if m else self.answer_weight for m in inside]


class TokenWeightedDataModule(InstructionDataModule):
    """:class:`~lightning_ft.data.InstructionDataModule` whose examples carry per-token ``loss_weights``.

    Prompt tokens get weight 1 (they carry no loss with ``mask_prompt``); response tokens get the
    provider's weights. With ``ignore_zero_weight`` a token of weight 0 also gets the label ``-100``, so it
    leaves the token count of ``loss_normalization="tokens"`` as well. Needs a fast tokenizer (offsets).

    Args:
        weighting: The weight provider (``KeyTokenWeights``, ``DiffWeights``, ``SpanWeights`` or your own
            ``TokenWeighting``); its arguments name the data fields it reads.
        ignore_zero_weight: Label weight-0 tokens ``-100``.
        **kwargs: Arguments of :class:`~lightning_ft.data.InstructionDataModule`.
    """

    def __init__(self, weighting: TokenWeighting, ignore_zero_weight: bool = True, **kwargs: Any) -> None:
        if not isinstance(weighting, TokenWeighting):
            raise ValueError(
                f"weighting={weighting!r} is not a TokenWeighting: pass KeyTokenWeights, DiffWeights, SpanWeights "
                "or a subclass of lightning_ft.objectives.TokenWeighting."
            )
        super().__init__(**kwargs)
        for hparams in (self._hparams, self._hparams_initial):  # keep checkpoints loadable with weights_only=True
            hparams.pop("weighting", None)
        self.weighting = weighting
        self.ignore_zero_weight = ignore_zero_weight

    def check_weighting(self, trainer: Any) -> None:
        """Refuse in one sentence a feature of ``trainer``'s fit the weight provider does not support (no-op without
        a Trainer: a task of :class:`~lightning_ft.objectives.MultiTaskDataModule` is checked by the mixture)."""
        if trainer is not None:
            module = getattr(trainer, "lightning_module", None)
            check_fit_support(self.weighting, trainer, getattr(module, "backbone", None))

    def setup(self, stage: str | None = None) -> None:
        """Check the provider's support in ``fit``, then load, split and tokenise the data with weights."""
        if stage == "fit":
            self.check_weighting(self.trainer)
        super().setup(stage)

    def _encode_train(self, record: dict[str, Any]) -> dict[str, Any]:
        example = super()._encode_train(record)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(
                "TokenWeightedDataModule maps weights to tokens through character offsets, which needs a fast "
                "tokenizer: pass tokenizer=<a model folder with tokenizer.json>."
            )
        response = self._response(record)
        encoded = self.tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
        count = min(len(encoded["input_ids"]), max(1, self.hparams.max_length - 1))
        offsets = [tuple(o) for o in encoded["offset_mapping"][:count]]
        weights = [float(w) for w in self.weighting.response_weights(record, response, offsets)][:count]
        prompt = len(example["input_ids"]) - count
        example["loss_weights"] = [1.0] * prompt + weights
        if self.ignore_zero_weight:
            example["labels"] = [
                IGNORE_INDEX if w == 0 else t for t, w in zip(example["labels"], example["loss_weights"])
            ]
        return example
