"""Forgetting via implicit inference (Kotha et al., ICLR 2024, "Understanding Catastrophic Forgetting in Language
Models via Implicit Inference").

The paper's claim: fine-tuning does not erase a capability outside the fine-tuning task so much as change which task
the model *infers* a prompt to be. A prompt that still looks like the fine-tuning distribution is read as that task;
the same request moved away from it (the paper translates it into another language, a "conjugate" prompt) recovers
much of the pretrained ability. A capability probe whose accuracy falls under its original format but holds up under
the conjugate one is suppressed, not lost: ``gap = conjugate - original`` grows during fine-tuning.

:class:`ImplicitInferenceProbes` is the monitoring callback. Its probe is few-shot classification on a bundled dataset
other than the fine-tuning one (default: Reuters-R8 news topics; the default fine-tuning data is movie-review
sentiment), scored by option log-likelihood: each label word is appended to the prompt, the sum of its tokens'
log-probabilities is its score, and the prediction is the best-scoring option. Every ``every_n_validations``
validations, at the start of training (``baseline``) and at the end of ``fit`` it measures the accuracy under the
original format and under the conjugate format, logs ``probes/original_acc``, ``probes/conjugate_acc`` and
``probes/gap`` through every logger, keeps the history (``history``, restored on resume) and writes ``probes.json``
into the run folder at the end of ``fit``. It costs nothing on the steps where it does not run; when it runs, the
forward passes run on global rank 0 only, in eval mode and without gradients.

**Conjugation offline.** Translation needs a translation model or service, which an offline run does not have, so a
conjugation here is a prompt format: a template, an answer template and a string transform applied to the whole rendered
prompt and to every option (:data:`CONJUGATIONS`: ``identity``, ``uppercase``, ``rot13``, ``swapcase``; any callable
``str -> str`` works too). The default conjugate is the same request under another template (a question/answer
layout instead of the ``Field: value`` layout shared with the fine-tuning prompts such as ``Review: ...\\nSentiment:``),
in upper case: like a translation it keeps the request answerable by the pretrained model (upper-case news wires and
Q/A layouts are common pre-training text) while changing nearly every token id of the prompt, so it sits far from the
fine-tuning distribution. A cipher such as ``rot13`` moves it further but leaves a small model near chance even before
fine-tuning, and then the gap means nothing. Measured once on the bundled SmolLM2-135M-Instruct before fine-tuning
(Reuters-R8 earnings/acquisition/oil/trade, 4 shots, 3 queries per topic, 16 words per text): 0.50 under both formats,
chance 0.25, so the gap starts at 0. Upper case about doubles the prompt's token count, and so the conjugate's cost.

:func:`build_probe_prompts` is the pure function that renders the prompts and options; :func:`option_scores` scores
them; :func:`select_probe_records` picks the shots and the label-balanced queries.
"""

from __future__ import annotations

import codecs
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn
from typing_extensions import override

from lightning_ft.core.support import MethodSupport
from lightning_ft.errors import UserError
from lightning_ft.monitors.base import RANK_ZERO_SHARDED, MonitorCallback, module_tokenizer

__all__ = [
    "CONJUGATIONS",
    "ImplicitInferenceProbes",
    "ProbeFormat",
    "ProbeSet",
    "build_probe_prompts",
    "option_scores",
    "select_probe_records",
]

Transform = Callable[[str], str]

#: the named string transforms a conjugate format can apply to its rendered prompts and options
CONJUGATIONS: dict[str, Transform] = {
    "identity": lambda text: text,
    "uppercase": str.upper,
    "swapcase": str.swapcase,
    "rot13": lambda text: codecs.encode(text, "rot13"),
}

#: plain words for the Reuters-R8 topic codes (a model cannot know what ``acq`` or ``money-fx`` stand for)
R8_WORDS: dict[str, str] = {"earn": "earnings", "acq": "acquisition", "crude": "oil", "trade": "trade",
                            "money-fx": "currency", "interest": "interest", "ship": "shipping", "grain": "grain"}  # fmt: skip


@dataclass(frozen=True)
class ProbeFormat:
    """How one probe example is written.

    Attributes:
        template: the question part of an example; ``{text}`` is the record's (shortened) text.
        answer: the answer part; ``{label}`` is the label word. Options are the answers of every label.
        separator: between the few-shot examples and before the query.
        transform: a name in :data:`CONJUGATIONS` or a callable, applied to the whole prompt and to each option.
    """

    template: str = "Article: {text}\nTopic:"
    answer: str = " {label}"
    separator: str = "\n\n"
    transform: str | Transform = "identity"

    def apply(self, text: str) -> str:
        """``text`` under this format's transform."""
        fn = CONJUGATIONS[self.transform] if isinstance(self.transform, str) else self.transform
        return fn(text)


#: the default conjugate format: a question/answer layout, in upper case (see the module docstring)
CONJUGATE_FORMAT = ProbeFormat(template="Q: Which subject is this news story about?\n{text}\nA:", answer=" {label}",
                               separator="\n\n", transform="uppercase")  # fmt: skip


@dataclass(frozen=True)
class ProbeSet:
    """Rendered probes: one prompt per query, the options shared by all of them, the gold option of each query."""

    prompts: list[str]
    options: list[str]
    gold: list[int]


def _shorten(text: str, max_words: int | None) -> str:
    words = str(text).split()
    return " ".join(words if max_words is None else words[:max_words])


def build_probe_prompts(
    shots: Sequence[Mapping[str, Any]],
    queries: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
    fmt: ProbeFormat = ProbeFormat(),
    *,
    label_words: Mapping[str, str] | None = None,
    text_field: str = "text",
    label_field: str = "label",
    max_words: int | None = 32,
) -> ProbeSet:
    """Render few-shot probe prompts (a pure function).

    Each prompt is the ``shots`` (template + answer of their label word) joined by ``fmt.separator``, then the
    separator and the query's template; the options are ``fmt.answer`` for each of ``labels``; the whole prompt and
    each option go through ``fmt.transform``. Texts are cut to their first ``max_words`` words.

    Args:
        shots: the in-context examples (records with ``text_field`` and ``label_field``), the same for every query.
        queries: the records to classify.
        labels: the classes, in option order.
        fmt: the prompt format.
        label_words: the word written for each label (default: the label itself).
        text_field: the records' text column.
        label_field: the records' label column.
        max_words: words kept of each text (``None``: all).
    """
    words = dict(label_words or {})

    def word(label: Any) -> str:
        return words.get(str(label), str(label))

    def question(record: Mapping[str, Any]) -> str:
        return fmt.template.format(text=_shorten(record[text_field], max_words))

    context = "".join(question(s) + fmt.answer.format(label=word(s[label_field])) + fmt.separator for s in shots)
    prompts = [fmt.apply(context + question(q)) for q in queries]
    options = [fmt.apply(fmt.answer.format(label=word(label))) for label in labels]
    gold = [list(labels).index(str(q[label_field])) for q in queries]
    return ProbeSet(prompts, options, gold)


def select_probe_records(
    records: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
    shots: int,
    per_label: int,
    seed: int = 0,
    label_field: str = "label",
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """The few-shot examples (round-robin over ``labels``, so that they cover as many classes as they can) and
    ``per_label`` queries of each label, disjoint from the shots, drawn with ``seed`` (deterministic)."""
    pool: dict[str, list[Mapping[str, Any]]] = {label: [] for label in labels}
    for record in records:
        label = str(record.get(label_field))
        if label in pool:
            pool[label].append(record)
    rng = random.Random(seed)
    for label in labels:
        rng.shuffle(pool[label])
    chosen_shots = [pool[labels[i % len(labels)]].pop() for i in range(shots) if pool[labels[i % len(labels)]]]
    queries = [r for label in labels for r in pool[label][:per_label]]
    rng.shuffle(queries)
    return chosen_shots, queries


@torch.no_grad()
def option_scores(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], options: Sequence[str], max_length: int = 512
) -> torch.Tensor:
    """``[N, K]`` log-likelihood of each option after each prompt: the sum of the option tokens' log-probabilities.

    The prompt is tokenized with the tokenizer's special tokens, each option without them; a prompt too long for
    ``max_length`` loses its start. The prompt runs once (its KV cache is then shared by the ``K`` options, which
    run together for their later tokens), and only the logits that score an option are computed.
    """
    option_ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
    if any(not ids for ids in option_ids):
        raise ValueError("every option must be at least one token: check the answer template and the label words.")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    longest = max(len(ids) for ids in option_ids)
    rest = [(k, ids) for k, ids in enumerate(option_ids) if len(ids) > 1]
    width = max((len(ids) - 1 for _, ids in rest), default=0)
    rows = []
    for prompt in prompts:
        prompt_ids = tokenizer(prompt)["input_ids"][-max(1, max_length - longest) :]
        out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=bool(rest), logits_to_keep=1)
        first = out.logits[0, -1].float().log_softmax(dim=-1)
        scores = [float(first[ids[0]]) for ids in option_ids]
        if rest:  # each option's later tokens, after the shared prompt: token j predicts token j + 1
            cache = out.past_key_values
            cache.batch_repeat_interleave(len(rest))
            feed = [ids[:-1] + [pad] * (width - len(ids) + 1) for _, ids in rest]
            mask = [[1] * (len(prompt_ids) + len(ids) - 1) + [0] * (width - len(ids) + 1) for _, ids in rest]
            logits = model(input_ids=torch.tensor(feed, device=device), attention_mask=torch.tensor(mask, device=device),
                           past_key_values=cache, use_cache=False).logits.float().log_softmax(dim=-1)  # fmt: skip
            for row, (k, ids) in enumerate(rest):
                scores[k] += sum(float(logits[row, j, ids[j + 1]]) for j in range(len(ids) - 1))
        rows.append(scores)
    return torch.tensor(rows, dtype=torch.float64)


def _check_format(fmt: ProbeFormat, argument: str) -> None:
    try:
        fmt.template.format(text="x")
        fmt.answer.format(label="x")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"{argument} may name only {{text}} (template) and {{label}} (answer), not {err}: write the "
                         "other fields out.") from None  # fmt: skip
    if "{text}" not in fmt.template or "{label}" not in fmt.answer:
        raise ValueError(f"{argument} must hold {{text}} in its template and {{label}} in its answer: the probe "
                         "shows the text and scores the label.")  # fmt: skip
    if isinstance(fmt.transform, str) and fmt.transform not in CONJUGATIONS:
        raise ValueError(f"{argument} transform {fmt.transform!r} is unknown: use one of {sorted(CONJUGATIONS)} or a "
                         "callable str -> str.")  # fmt: skip


class ImplicitInferenceProbes(MonitorCallback):
    """Few-shot capability probes outside the fine-tuning task, under the original and a conjugate prompt format
    (see the module docstring).

    Args:
        dataset: a bundled dataset name or a data file with a text and a label column (default: Reuters-R8 topics).
        text_field: the text column.
        label_field: the label column.
        labels: the classes probed (default: every label in the data, sorted).
        label_words: the word written for each label (default: the label; for ``reuters_r8``, :data:`R8_WORDS`).
        shots: in-context examples in every prompt (round-robin over the labels).
        per_label: queries of each label (the probe has ``per_label * len(labels)`` queries).
        max_words: words kept of each text.
        template: the original format's question part (``{text}``), close to the fine-tuning prompts' layout.
        answer: the original format's answer part (``{label}``).
        conjugate_template: the conjugate format's question part.
        conjugate_answer: the conjugate format's answer part.
        conjugation: the string transform of the conjugate format: a name in :data:`CONJUGATIONS` or a callable.
        every_n_validations: measure after every n-th validation run (0: only at the start and end of ``fit``).
        baseline: measure the model before its first training step too (skipped when resuming).
        max_length: tokens per scored sequence (a longer prompt loses its start).
        seed: the seed of the choice of shots and queries.
        tokenizer: a model name or folder whose tokenizer renders the probes (default: the module's ``tokenizer``).
        filename: the JSON written into ``trainer.default_root_dir`` at the end of ``fit`` (``None``: none).
        module: attribute path of the transformers model inside the LightningModule (default: found).

    Example::

        trainer = L.Trainer(callbacks=[ImplicitInferenceProbes(dataset="reuters_r8", shots=4, every_n_validations=1)])
    """

    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "lora", "mixed", "quantized"}),
        {"fsdp2": RANK_ZERO_SHARDED},
        notes="A monitor: it changes no weight; the probes run on global rank 0 only.",
    )
    prefix: ClassVar[str] = "probes"

    def __init__(
        self,
        dataset: str = "reuters_r8",
        text_field: str = "text",
        label_field: str = "label",
        labels: list[str] | None = None,
        label_words: dict[str, str] | None = None,
        shots: int = 4,
        per_label: int = 4,
        max_words: int = 32,
        template: str = ProbeFormat.template,
        answer: str = ProbeFormat.answer,
        conjugate_template: str = CONJUGATE_FORMAT.template,
        conjugate_answer: str = CONJUGATE_FORMAT.answer,
        conjugation: str | Transform = "uppercase",
        every_n_validations: int = 1,
        baseline: bool = True,
        max_length: int = 512,
        seed: int = 0,
        tokenizer: str | None = None,
        filename: str | None = "probes",
        module: str | None = None,
    ) -> None:
        super().__init__(every_n_validations, baseline, filename, module)
        if shots < 0:
            raise ValueError(f"shots={shots} must be 0 (zero-shot) or more.")
        if per_label < 1:
            raise ValueError(f"per_label={per_label} must be at least 1 (queries of each label).")
        if max_words < 1:
            raise ValueError(f"max_words={max_words} must be at least 1 (words kept of each text).")
        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be at least 2 (a prompt token and an option token).")
        if labels is not None and len(set(labels)) < 2:
            raise ValueError(f"labels={labels} must name at least two distinct classes to choose between.")
        self.original = ProbeFormat(template, answer, "\n\n", "identity")
        self.conjugate = ProbeFormat(conjugate_template, conjugate_answer, "\n\n", conjugation)
        _check_format(self.original, "template/answer")
        _check_format(self.conjugate, "conjugate_template/conjugate_answer/conjugation")
        if self.original == self.conjugate:
            raise ValueError("conjugation='identity' with the original template and answer makes the conjugate "
                             "format the original one (a gap of 0 by construction): change one of them.")  # fmt: skip
        if label_words is None and dataset == "reuters_r8":
            label_words = dict(R8_WORDS)
        self.dataset, self.text_field, self.label_field = dataset, text_field, label_field
        self.labels, self.label_words = labels, label_words
        self.shots, self.per_label, self.max_words = shots, per_label, max_words
        self.max_length, self.seed, self.tokenizer_name = max_length, seed, tokenizer
        self.probes: dict[str, ProbeSet] = {}
        self._tokenizer: Any = None

    @property
    @override
    def state_key(self) -> str:
        return f"ImplicitInferenceProbes[dataset={self.dataset}, seed={self.seed}]"

    @override
    def check_model(self, model: nn.Module) -> None:
        if model.get_output_embeddings() is None:
            raise ValueError(
                f"ImplicitInferenceProbes scores answer options by their log-likelihood under a causal LM, and "
                f"{type(model).__name__} has no LM head: monitor an AutoModelForCausalLM."
            )

    @override
    def prepare(self, trainer: L.Trainer, pl_module: L.LightningModule, model: nn.Module) -> None:
        from lightning_ft.data.files import load_records

        self._tokenizer = module_tokenizer(pl_module, self.tokenizer_name, type(self).__name__, model)
        records = load_records(self.dataset, argument="dataset")
        missing = [f for f in (self.text_field, self.label_field) if records and f not in records[0]]
        if not records or missing:
            raise UserError(f"dataset={self.dataset!r} has no column {missing[0] if missing else self.text_field!r} "
                            "(or no records): set text_field and label_field to its text and label columns.")  # fmt: skip
        labels = self.labels or sorted({str(r[self.label_field]) for r in records})
        shots, queries = select_probe_records(records, labels, self.shots, self.per_label, self.seed, self.label_field)
        if not queries:
            raise UserError(f"dataset={self.dataset!r} holds no records of labels={labels}: name labels it has.")
        opts: dict[str, Any] = {"label_words": self.label_words, "text_field": self.text_field,
                                "label_field": self.label_field, "max_words": self.max_words}  # fmt: skip
        self.probes = {"original": build_probe_prompts(shots, queries, labels, self.original, **opts),
                       "conjugate": build_probe_prompts(shots, queries, labels, self.conjugate, **opts)}  # fmt: skip

    def accuracy(self, kind: str) -> float:
        """The probe accuracy under the ``"original"`` or ``"conjugate"`` format, of the model as it is now."""
        assert self._model is not None and self.probes, "call setup('fit') first (on global rank 0)"
        probe = self.probes[kind]
        scores = option_scores(self._model, self._tokenizer, probe.prompts, probe.options, self.max_length)
        return float((scores.argmax(dim=1) == torch.tensor(probe.gold)).double().mean())

    @override
    def measure(self) -> dict[str, float]:
        original, conjugate = self.accuracy("original"), self.accuracy("conjugate")
        return {"original_acc": original, "conjugate_acc": conjugate, "gap": conjugate - original}

    @override
    def settings(self) -> dict[str, Any]:
        transform = self.conjugate.transform
        return {"dataset": self.dataset, "shots": self.shots, "per_label": self.per_label,
                "queries": len(self.probes["original"].gold) if self.probes else 0,
                "original": {"template": self.original.template, "answer": self.original.answer},
                "conjugate": {"template": self.conjugate.template, "answer": self.conjugate.answer,
                              "transform": transform if isinstance(transform, str) else repr(transform)}}  # fmt: skip
