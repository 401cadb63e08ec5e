"""KAFT, knowledge-aware fine-tuning (Li et al. 2022, "Large Language Models with Controllable Working Memory").

The paper adds counterfactual and irrelevant contexts to a context-QA training set, so that the model learns the
priority *relevant context > its own world knowledge > irrelevant context*:

* **relevant**: the record's own context; the target is the gold answer;
* **counterfactual**: the context with the answer entity swapped for another entity of the same type; the target
  is that counterfactual answer (the model must follow the context, not its memory);
* **irrelevant**: the context of another record; the target is the model's own closed-book answer (the model must
  ignore the context and answer from memory).

:class:`KnowledgeAwareContexts` is that records transform and :class:`KnowledgeAwareDataModule` the DataModule that
applies it to the training split (``lightning-ft fit --config configs/kaft.yaml``).

Where this differs from the paper: the paper builds on large QA sets (SQuAD, TriviaQA, ...) with an NER-style
answer typer and the pretrained model's answers on T5 / PaLM, and also mixes in empty contexts. Here entity types
come from the small rule-based :func:`entity_type` (year / number / month / organisation / label word / capitalised
name); a record whose answer has no type, or is not in its context, or has no other entity of its type in the data is
not made counterfactual. Each source record yields exactly one example, and the three kinds are assigned to exact
counts (largest remainder of ``fraction * records``). The default proportions (a third each) and the wording of the
optional explanation are reconstructions: the abstract (checked) names the three kinds and the priority, not a mix.

No context-QA dataset is bundled, so ``dataset: reuters_qa`` builds one from the bundled Reuters R8 news
(:func:`reuters_company_qa`). The closed-book answers come from the shared, disk-cached
``lightning_ft.curation.generation.GenerationService`` (generated once; a rebuild generates nothing).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from lightning_ft.assets import cache_dir
from lightning_ft.data.files import load_records
from lightning_ft.data.instruction import InstructionDataModule

__all__ = [
    "CONTEXT_QA_DATASETS",
    "KAFT_KINDS",
    "KnowledgeAwareContexts",
    "KnowledgeAwareDataModule",
    "entity_type",
    "exact_counts",
    "load_context_qa",
    "mentions",
    "reuters_company_qa",
    "substitute",
]

Record = dict[str, Any]
KAFT_KINDS = ("relevant", "counterfactual", "irrelevant")
_NUMBERS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand million billion"
)
_NUMBER_WORDS = frozenset(_NUMBERS.split())
_MONTH_NAMES = "january february march april may june july august september october november december"
_MONTHS = frozenset(_MONTH_NAMES.split())
_ORG_SUFFIXES = frozenset(("inc", "corp", "co", "ltd", "plc", "llc", "ag", "sa", "nv"))
_EXPLAINED = {
    "relevant": "{answer} (the context says so)",
    "counterfactual": "{answer} (the context says so)",
    "irrelevant": "{answer} (the context is irrelevant; answered from memory)",
}


# ---------------------------------------------------------------------------------------------- entities
def entity_type(answer: str, label_words: Collection[str] = ()) -> str | None:
    """The type of an answer entity, by the first rule that matches, or ``None`` (untyped).

    ``label`` (one of ``label_words``, case-insensitive), ``year`` (1500-2099), ``number`` (digits, or number words
    such as "two" or "five hundred"), ``month`` (a month's name), ``organisation`` (ends in Inc / Corp / Co / Ltd /
    Plc / LLC / AG / SA / NV), ``name`` (every word capitalised, e.g. "Barack Obama").
    """
    text = str(answer).strip()
    words = text.lower().replace("-", " ").split()
    if not words:
        return None
    if text.lower() in {w.lower() for w in label_words}:
        return "label"
    if re.fullmatch(r"(1[5-9]|20)\d\d", text):
        return "year"
    if re.fullmatch(r"[+-]?\d[\d,]*(\.\d+)?%?", text) or all(w in _NUMBER_WORDS or w == "and" for w in words):
        return "number"
    if text.lower() in _MONTHS:
        return "month"
    if len(words) > 1 and words[-1].rstrip(".") in _ORG_SUFFIXES:
        return "organisation"
    if re.fullmatch(r"[A-Z][\w.'&-]*(?: [A-Z][\w.'&-]*)*", text):
        return "name"
    return None


@lru_cache(maxsize=4096)
def _pattern(phrase: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(phrase.strip()) + r"(?!\w)", re.IGNORECASE)


def mentions(text: str, phrase: str) -> bool:
    """Whether ``text`` holds ``phrase`` as whole words, case-insensitively ("one" is not in "someone")."""
    return bool(phrase.strip()) and _pattern(phrase).search(text) is not None


def substitute(text: str, old: str, new: str) -> str:
    """``text`` with every whole-word, case-insensitive mention of ``old`` replaced by ``new``."""
    return _pattern(old).sub(lambda _: new, text)


def exact_counts(total: int, fractions: Sequence[float]) -> list[int]:
    """Integer counts summing to ``total`` in the given proportions (largest remainder; ties to the earlier one)."""
    raw = [f * total for f in fractions]
    counts = [int(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


# ---------------------------------------------------------------------------------------------- data
def reuters_company_qa(context_words: int = 48, question_words: int = 10) -> list[Record]:
    """Context-QA records built from the bundled Reuters R8 news articles (lower-cased, digits removed).

    A Reuters article opens with a headline that starts with the company's name, and its body repeats the name with
    its legal suffix: ``champion products ch approves stock split champion products inc said its board ...``. For
    each article whose first 1-4 words recur as ``<name> <inc|corp|co|ltd> said``, one record: ``context`` = the
    article's first ``context_words`` words (the mention must lie inside them), ``question`` = "Which company said
    <the next ``question_words`` words>?", ``answer`` = ``<name> <suffix>`` (an ``organisation``), ``label`` = the
    article's topic. Articles whose answer is already taken or recurs in its question are skipped (786 records).
    """
    seen: set[str] = set()
    out: list[Record] = []
    for record in load_records("reuters_r8"):
        words = str(record["text"]).split()[:context_words]
        for j in range(1, len(words) - question_words - 1):
            if words[j] not in ("inc", "corp", "co", "ltd") or words[j + 1] != "said":
                continue
            k = next((k for k in (4, 3, 2, 1) if k <= j and words[j - k : j] == words[:k]), 0)
            if k:
                answer, said = " ".join(words[j - k : j + 1]), " ".join(words[j + 2 : j + 2 + question_words])
                if answer not in seen and not mentions(said, answer):
                    seen.add(answer)
                    out.append({"context": " ".join(words), "question": f"Which company said {said}?",
                                "answer": answer, "label": record["label"]})  # fmt: skip
                break
    return out


CONTEXT_QA_DATASETS: dict[str, Callable[[], list[Record]]] = {"reuters_qa": reuters_company_qa}


def load_context_qa(source: str, *, argument: str = "dataset", shuffle_seed: int | None = None) -> list[Record]:
    """The records of a context-QA source: ``reuters_qa`` (:func:`reuters_company_qa`), or what
    :func:`~lightning_ft.data.files.load_records` reads (a bundled dataset or a data file)."""
    if source not in CONTEXT_QA_DATASETS:
        return load_records(source, argument=argument, shuffle_seed=shuffle_seed)
    records = CONTEXT_QA_DATASETS[source]()
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(records)
    return records


def generation_module() -> Any:
    """:mod:`lightning_ft.curation.generation` (the shared generation service)."""
    from lightning_ft.curation import generation

    return generation


def closed_book_answer(completion: str) -> str:
    """The answer in a closed-book completion: its first non-empty line, stripped (``unknown`` if there is none)."""
    lines = [line.strip() for line in str(completion).splitlines() if line.strip()]
    return lines[0] if lines else "unknown"


# ---------------------------------------------------------------------------------------------- the transform
@dataclass
class KnowledgeAwareContexts:
    """The KAFT records transform: relevant, counterfactual and irrelevant contexts in set proportions.

    Each input record yields one output record (a copy, in input order) whose ``context_field`` holds the context
    shown to the model and ``target_field`` the answer to train on, plus ``kaft_kind``, ``kaft_answer`` (the answer
    alone, without explanation) and ``kaft_gold`` (the record's own answer). Records are assigned to kinds by a
    seeded shuffle; counterfactual ones come from the records that can have one (see the module docstring).

    Args:
        context_field: the column holding the context.
        question_field: the column holding the question.
        answer_field: the column holding the gold answer.
        target_field: the column written with the training target.
        relevant: the fraction of relevant examples.
        counterfactual: the fraction of counterfactual examples.
        irrelevant: the fraction of irrelevant examples (the three must sum to 1).
        explanation: append a short explanation to each target, e.g. "Paris (the context says so)".
        label_words: answers typed ``label`` (e.g. a classification task's class names).
        closed_book_template: the prompt of the closed-book answer (fields: the record's columns).
        max_new_tokens: tokens generated at most per closed-book answer (greedy decoding).
        seed: the seed of the assignment and of the choices of swapped entities and irrelevant contexts.

    Example::

        kaft = KnowledgeAwareContexts(relevant=0.5, counterfactual=0.25, irrelevant=0.25)
        examples = kaft(records, GenerationService("smollm2-135m", cache="~/.cache/lightning_ft/curation"))
    """

    context_field: str = "context"
    question_field: str = "question"
    answer_field: str = "answer"
    target_field: str = "target"
    relevant: float = 1 / 3
    counterfactual: float = 1 / 3
    irrelevant: float = 1 / 3
    explanation: bool = False
    label_words: Sequence[str] = field(default_factory=tuple)
    closed_book_template: str = "Question: {question}\nAnswer:"
    max_new_tokens: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        fractions = self.fractions
        if any(not 0 <= f <= 1 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
            raise ValueError(
                f"relevant={self.relevant}, counterfactual={self.counterfactual} and irrelevant={self.irrelevant} "
                f"sum to {sum(fractions):g}: give three fractions between 0 and 1 that sum to 1."
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1.")

    @property
    def fractions(self) -> tuple[float, float, float]:
        """``(relevant, counterfactual, irrelevant)``."""
        return (float(self.relevant), float(self.counterfactual), float(self.irrelevant))

    def counts(self, n: int) -> dict[str, int]:
        """The number of examples of each kind for ``n`` records."""
        return dict(zip(KAFT_KINDS, exact_counts(n, self.fractions)))

    def __call__(self, records: Sequence[Record], generator: Any = None) -> list[Record]:
        """The KAFT examples of ``records``; ``generator`` (a ``GenerationService``) gives the closed-book answers
        and is needed only when there are irrelevant examples."""
        self._check_columns(records)
        counts = self.counts(len(records))
        rng = random.Random(self.seed)
        order = list(range(len(records)))
        rng.shuffle(order)
        pools = self._entity_pools(records)
        swaps: dict[int, str] = {}
        for i in order:
            if len(swaps) == counts["counterfactual"]:
                break
            options = self._swap_options(records[i], pools)
            if options:
                swaps[i] = rng.choice(options)
        if len(swaps) < counts["counterfactual"]:
            raise ValueError(
                f"counterfactual={self.counterfactual} needs {counts['counterfactual']} records whose answer is in "
                f"their context and has another entity of the same type in the data, but only {len(swaps)} of "
                f"{len(records)} do: lower counterfactual, add records, or list more label_words."
            )
        rest = [i for i in order if i not in swaps]
        irrelevant = set(rest[: counts["irrelevant"]])
        memory = self._closed_book(records, sorted(irrelevant), generator)
        out = []
        for i, record in enumerate(records):
            gold = str(record[self.answer_field]).strip()
            context = str(record[self.context_field])
            if i in swaps:
                kind, answer, context = "counterfactual", swaps[i], substitute(context, gold, swaps[i])
            elif i in irrelevant:
                kind, answer, context = "irrelevant", memory[i], self._other_context(records, i, rng)
            else:
                kind, answer = "relevant", gold
            target = _EXPLAINED[kind].format(answer=answer) if self.explanation else answer
            out.append({**record, self.context_field: context, self.target_field: target, "kaft_kind": kind,
                        "kaft_answer": answer, "kaft_gold": gold})  # fmt: skip
        return out

    def _check_columns(self, records: Sequence[Record]) -> None:
        if not records:
            raise ValueError("KnowledgeAwareContexts got no records: give it a non-empty context-QA dataset.")
        for argument in ("context_field", "question_field", "answer_field"):
            name = getattr(self, argument)
            for record in records:
                if name not in record:
                    raise ValueError(
                        f"{argument}={name!r} is not a column of every record (one has the columns "
                        f"{sorted(record)}): set {argument} to the column that holds the "
                        f"{argument.removesuffix('_field')}."
                    )

    def _entity_pools(self, records: Sequence[Record]) -> dict[str, list[str]]:
        """Type -> the distinct answers of that type in the data (first spelling kept, in data order)."""
        pools: dict[str, dict[str, str]] = {}
        for record in records:
            answer = str(record[self.answer_field]).strip()
            kind = entity_type(answer, self.label_words)
            if kind is not None:
                pools.setdefault(kind, {}).setdefault(answer.lower(), answer)
        return {kind: list(by_key.values()) for kind, by_key in pools.items()}

    def _swap_options(self, record: Record, pools: dict[str, list[str]]) -> list[str]:
        """The same-type entities that can replace the record's answer in its context ([] when none can)."""
        gold, context = str(record[self.answer_field]).strip(), str(record[self.context_field])
        kind = entity_type(gold, self.label_words)
        if kind is None or not mentions(context, gold):
            return []
        options = []
        for other in pools.get(kind, []):
            if mentions(other, gold) or mentions(gold, other) or mentions(context, other):
                continue  # the gold would survive the swap, or the new answer was already in the context
            swapped = substitute(context, gold, other)
            if mentions(swapped, other) and not mentions(swapped, gold):
                options.append(other)
        return options

    def _other_context(self, records: Sequence[Record], i: int, rng: random.Random) -> str:
        gold = str(records[i][self.answer_field]).strip()
        candidates = [
            j for j in range(len(records)) if j != i and not mentions(str(records[j][self.context_field]), gold)
        ]
        if not candidates:
            raise ValueError(
                f"record {i} has no irrelevant context: every other record's context mentions its answer {gold!r}; "
                "add records with other contexts, or set irrelevant=0."
            )
        return str(records[rng.choice(candidates)][self.context_field])

    def _closed_book(self, records: Sequence[Record], chosen: list[int], generator: Any) -> dict[int, str]:
        if not chosen:
            return {}
        if generator is None:
            raise ValueError(
                f"irrelevant={self.irrelevant} needs the model's closed-book answers: pass a GenerationService as "
                "generator, or set irrelevant=0."
            )
        from lightning_ft.data.collate import render

        prompts = [render(self.closed_book_template, records[i], "closed_book_template") for i in chosen]
        settings = generation_module().GenerationSettings(max_new_tokens=self.max_new_tokens)
        completions = generator.generate(prompts, settings)
        return {i: closed_book_answer(c[0]) for i, c in zip(chosen, completions)}


# ---------------------------------------------------------------------------------------------- the DataModule
class KnowledgeAwareDataModule(InstructionDataModule):
    """Instruction data whose training split is rebuilt by :class:`KnowledgeAwareContexts` (KAFT).

    Validation and test records keep their own context and gold answer (``kaft_kind: relevant``). The closed-book
    answers of the irrelevant examples are generated once, greedily, by ``closed_book_model`` (default: the
    LightningModule being fitted, before training: the paper's "pretrained model's answer") and cached on disk.

    Args:
        dataset: a context-QA source: ``reuters_qa`` (built from bundled Reuters news, see
            :func:`reuters_company_qa`), another bundled dataset, or a data file.
        context_field: the column holding the context.
        question_field: the column holding the question.
        answer_field: the column holding the gold answer.
        relevant: the fraction of relevant training examples.
        counterfactual: the fraction of counterfactual training examples.
        irrelevant: the fraction of irrelevant training examples (the three must sum to 1).
        explanation: append a short explanation to each target.
        label_words: answers typed ``label`` for the counterfactual swap.
        kaft_seed: the seed of the KAFT choices; default ``split_seed``.
        closed_book_model: the model of the closed-book answers (alias or folder); default: the fitted module.
        closed_book_cache: the generation cache (a folder or ``.jsonl`` file); default: ``curation/generations`` in
            the lightning-ft cache (``$LIGHTNING_FT_CACHE`` or ``~/.cache/lightning_ft``), shared with the
            ``lightning-ft data`` commands.
        closed_book_template: the closed-book prompt (fields: the record's columns).
        closed_book_max_new_tokens: tokens per closed-book answer.
        prompt_template: the training prompt (``{context}`` is the KAFT context); rename fields to match the columns.
        response_template: the training response (``{target}`` is the KAFT target).
        **kwargs: the other arguments of :class:`InstructionDataModule` (``train_size``, ``batch_size``, ...).

    Example (YAML, see ``configs/kaft.yaml``)::

        data:
          class_path: lightning_ft.curation.kaft.KnowledgeAwareDataModule
          init_args: {dataset: reuters_qa, relevant: 0.4, counterfactual: 0.3, irrelevant: 0.3}
    """

    def __init__(
        self,
        dataset: str = "reuters_qa",
        context_field: str = "context",
        question_field: str = "question",
        answer_field: str = "answer",
        relevant: float = 1 / 3,
        counterfactual: float = 1 / 3,
        irrelevant: float = 1 / 3,
        explanation: bool = False,
        label_words: list[str] | None = None,
        kaft_seed: int | None = None,
        closed_book_model: str | None = None,
        closed_book_cache: str | None = None,
        closed_book_template: str = "Question: {question}\nAnswer:",
        closed_book_max_new_tokens: int = 16,
        prompt_template: str = "Context: {context}\nQuestion: {question}\nAnswer:",
        response_template: str = " {target}",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            dataset=dataset, prompt_template=prompt_template, response_template=response_template, **kwargs
        )
        self.transform = KnowledgeAwareContexts(
            context_field=context_field, question_field=question_field, answer_field=answer_field,
            relevant=relevant, counterfactual=counterfactual, irrelevant=irrelevant, explanation=explanation,
            label_words=tuple(label_words or ()), closed_book_template=closed_book_template,
            max_new_tokens=closed_book_max_new_tokens, seed=self.hparams.split_seed if kaft_seed is None else kaft_seed,
        )  # fmt: skip
        self.generator: Any = None  # the GenerationService, made on first use (or set it before setup)

    def _read(self, source: str, argument: str) -> list[Record]:
        return load_context_qa(source, argument=argument, shuffle_seed=self.hparams.split_seed)

    def _load_splits(self, check_fields: bool = True) -> dict[str, list[Record]]:
        splits = super()._load_splits(check_fields=False)  # the transform adds the target field the templates name
        kaft = self.transform
        if kaft.counts(len(splits["train"]))["irrelevant"] and self.generator is None:
            self.generator = self._closed_book_service()
        splits["train"] = kaft(splits["train"], self.generator)
        for name in ("val", "test"):
            if splits[name]:
                kaft._check_columns(splits[name])
            splits[name] = [{**r, kaft.target_field: str(r[kaft.answer_field]).strip(), "kaft_kind": "relevant"}
                            for r in splits[name]]  # fmt: skip
        self._check_fields(splits["train"][0], self.hparams.dataset)
        return splits

    def _closed_book_service(self) -> Any:
        h = self.hparams
        cache = (
            h.closed_book_cache if h.closed_book_cache is not None else str(cache_dir() / "curation" / "generations")
        )
        service = generation_module().GenerationService
        if h.closed_book_model is not None:
            return service(h.closed_book_model, cache=cache)
        module = self.trainer.lightning_module if getattr(self, "trainer", None) is not None else None
        if module is None or getattr(module, "tokenizer", None) is None:
            raise ValueError(
                "closed_book_model=None answers with the LightningModule being fitted, but none with a tokenizer is "
                "attached: set closed_book_model to a model name or folder (e.g. smollm2-135m), or set irrelevant=0."
            )
        return service(module, cache=cache)
