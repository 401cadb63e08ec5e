"""CLEAR: score every (prompt, response) pair's confidence, drop the doubtful ones, optionally correct them.

Confidence-based LLM Evaluation And Rectification (Chen & Mueller 2024, https://arxiv.org/abs/2403.12776) scores
each pair with BSDetector (Chen & Mueller 2023, https://arxiv.org/abs/2308.16175), offline, with any local model:

* **observed consistency** ``O``: the model samples ``k`` answers to the prompt (BSDetector: k = 5, temperature 1);
  each sample ``s_i`` agrees with the given response ``y`` by ``o_i = α·sim(y, s_i) + (1 − α)·match(y, s_i)``
  (α = 0.8), and ``O`` is their mean;
* **self-reflection certainty** ``S``: the model is asked whether ``y`` answers the prompt correctly, "(A) Correct
  (B) Incorrect (C) I am not sure", scored 1 / 0 / 0.5, in BSDetector's two wordings (the second: "Are you really
  sure ...?"), averaged;
* **confidence** ``C = β·O + (1 − β)·S`` with β = 0.7.

These are BSDetector's weights (uqlm's implementation of it uses the same: 0.56 = 0.7·0.8 on non-contradiction,
0.14 = 0.7·0.2 on exact match, 0.30 on the self-judge). Two choices are ours, because no NLI model is bundled:

* ``sim`` replaces BSDetector's NLI non-contradiction probability. For label-like data (every response at most
  three words, at most 20 distinct ones: sentiment labels, short factoid answers) a sample agrees when the first
  label it names is the response's, and ``sim = match``. Otherwise ``sim`` is the cosine of the two answers'
  sentence embeddings (all-MiniLM-L6-v2, clipped at 0; ``--similarity embedding``) or SQuAD's token F1
  (``--similarity overlap``), and ``match`` is normalised exact equality.
* ``S`` is, by default, the *expected* score under the model's probabilities of the letters A, B and C
  (``P(A) + 0.5·P(C)``, renormalised over the three), which is smoother than reading the one letter a small model
  writes; ``--reflection letter`` scores the likeliest letter 1 / 0 / 0.5 instead. The model's reply is started
  with ``Answer: (`` and the three letters are read from one forward pass (:func:`choice_logprobs`).

Auto-filter drops the pairs below ``--threshold``. Auto-correct (``--auto-correct``) generates a replacement
response greedily (by ``--model`` or ``--correction-model``, e.g. a model fine-tuned on the filtered data, as the
paper does), scores it the same way against the same samples, and replaces the response only when the new
confidence exceeds the old by more than ``--margin`` and is at or above the threshold. For label-like data the
replacement is the label the generated answer names (none: no replacement).

A caution measured on SmolLM2-135M (``tests/curation/test_clear.py``): on reviews with flipped labels its
confidence separates flipped from intact pairs through observed consistency, while its self-reflection hardly
does (it calls nearly everything correct); a small model is a weak judge of its own data.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_ft.curation.judges import normalize_answer, use_chat_template
from lightning_ft.curation.s3ft import add_prompt_arguments, render_prompts
from lightning_ft.errors import UserError

__all__ = [
    "ALPHA",
    "BETA",
    "ConfidenceScorer",
    "LabelSpace",
    "Scores",
    "add_arguments",
    "choice_logprobs",
    "combine",
    "curate",
    "letter_score",
    "observed_consistency",
    "run",
    "score_some",
    "should_replace",
    "token_f1",
]

ALPHA = 0.8  # BSDetector: weight of the (NLI) similarity against exact match inside observed consistency
BETA = 0.7  # BSDetector: weight of observed consistency against self-reflection certainty
_QUESTION = "Question: {prompt}\nProposed answer: {response}\n\n"
_CHOICES = "\n(A) Correct\n(B) Incorrect\n(C) I am not sure"
REFLECTION_PROMPTS = (  # BSDetector's two self-reflection questions
    _QUESTION + "Is the proposed answer:" + _CHOICES,
    _QUESTION + "Are you really sure the proposed answer is correct? Choose again:" + _CHOICES,
)
ANSWER_START = "Answer: ("  # the start of the model's reply, so that its next token is the letter
LETTER_SCORES = np.array([1.0, 0.0, 0.5])  # A correct, B incorrect, C unsure
MAX_LABELS = 20
MAX_LABEL_WORDS = 3


@dataclass(frozen=True)
class Scores:
    """Per-pair confidence and its two parts, each an array with one value per pair."""

    confidence: np.ndarray
    consistency: np.ndarray
    reflection: np.ndarray


def combine(consistency: np.ndarray | float, reflection: np.ndarray | float, beta: float = BETA) -> np.ndarray:
    """BSDetector's confidence ``β·O + (1 − β)·S``."""
    return beta * np.asarray(consistency, dtype=np.float64) + (1.0 - beta) * np.asarray(reflection, dtype=np.float64)


def observed_consistency(similarities: Sequence[float], matches: Sequence[float], alpha: float = ALPHA) -> float:
    """Mean over the samples of ``α·sim + (1 − α)·match`` (0 when there are no samples)."""
    if len(similarities) == 0:
        return 0.0
    return float(np.mean(alpha * np.asarray(similarities, float) + (1.0 - alpha) * np.asarray(matches, float)))


def token_f1(a: str, b: str) -> float:
    """SQuAD's token F1 between two normalised answers."""
    x, y = normalize_answer(a).split(), normalize_answer(b).split()
    common = sum((Counter(x) & Counter(y)).values())
    if not x or not y or common == 0:
        return float(x == y)
    precision, recall = common / len(x), common / len(y)
    return 2 * precision * recall / (precision + recall)


class LabelSpace:
    """The answers of a label-like pool; reads which of them a free-form sample names first."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = sorted(set(labels), key=lambda s: (-len(s.split()), s))  # longest first: "not good" > "good"
        alternatives = "|".join(re.escape(label) for label in self.labels)
        self._pattern = re.compile(rf"(?<!\S)(?:{alternatives})(?!\S)")

    @classmethod
    def of(cls, responses: Sequence[str]) -> LabelSpace | None:
        """The label space of ``responses`` if they look like labels (short, few distinct), else ``None``."""
        normalised = {normalize_answer(r) for r in responses}
        if not normalised or len(normalised) > MAX_LABELS or "" in normalised:
            return None
        if any(len(label.split()) > MAX_LABEL_WORDS for label in normalised):
            return None
        return cls(sorted(normalised))

    def label_of(self, text: str) -> str | None:
        """The first label ``text`` names (normalised), or ``None``."""
        found = self._pattern.search(normalize_answer(text))
        return found.group() if found else None


class ConfidenceScorer:
    """BSDetector confidence of (prompt, response) pairs with one local model (see the module docstring).

    Args:
        service: The :class:`~lightning_ft.curation.generation.GenerationService` that samples and reflects.
        num_samples: Sampled answers per prompt (``k``).
        temperature: Sampling temperature.
        max_new_tokens: Length of each sample.
        alpha: Weight of ``sim`` against ``match`` in observed consistency.
        beta: Weight of observed consistency against self-reflection.
        similarity: ``auto`` (labels when the pool looks like labels, else ``embedding``), ``match``, ``overlap``
            or ``embedding``.
        reflection: ``probability`` (expected letter score) or ``letter`` (score of the likeliest letter).
        questions: How many of BSDetector's two self-reflection questions to ask (1: only the first).
        chat_template: Wrap prompts in the tokenizer's chat template.
        seed: Sampling seed.
        embedder: Builds the :class:`~lightning_ft.curation.embedder.Embedder` for ``embedding`` (called once, lazily).
    """

    def __init__(self, service: Any, *, num_samples: int = 5, temperature: float = 1.0, max_new_tokens: int = 64,
                 alpha: float = ALPHA, beta: float = BETA, similarity: str = "auto", reflection: str = "probability",
                 questions: int = 2, chat_template: bool = True, seed: int = 0,
                 embedder: Callable[[], Any] | None = None) -> None:  # fmt: skip
        for name, value in (("--alpha", alpha), ("--beta", beta)):
            if not 0.0 <= value <= 1.0:
                raise UserError(f"{name} {value} must be between 0 and 1.")
        if num_samples < 1:
            raise UserError(f"--num-samples {num_samples} must be at least 1.")
        if questions not in (1, 2):
            raise UserError(f"--reflection-questions {questions} must be 1 or 2.")
        self.service = service
        self.num_samples = num_samples
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.alpha, self.beta = alpha, beta
        self.similarity = similarity
        self.reflection_mode = reflection
        self.questions = questions
        self.chat_template = chat_template
        self.seed = seed
        self._embedder_factory = embedder
        self._embedder: Any = None
        self.labels: LabelSpace | None = None

    def fit_labels(self, responses: Sequence[str]) -> str:
        """Choose the similarity for this pool (label space or free text) and return its name."""
        self.labels = LabelSpace.of(responses) if self.similarity in ("auto", "match") else None
        if self.similarity == "auto":
            return "label" if self.labels is not None else "embedding"
        return self.similarity

    def sample(self, prompts: Sequence[str]) -> list[list[str]]:
        """``num_samples`` sampled answers per prompt (cached by the service)."""
        from lightning_ft.curation.generation import GenerationSettings

        chat = use_chat_template(self.service, self.chat_template)
        settings = GenerationSettings(max_new_tokens=self.max_new_tokens, do_sample=True, temperature=self.temperature,
                                      num_samples=self.num_samples, seed=self.seed, chat_template=chat)  # fmt: skip
        return [[s.strip() for s in samples] for samples in self.service.generate(list(prompts), settings)]

    def consistency(self, responses: Sequence[str], samples: Sequence[Sequence[str]]) -> np.ndarray:
        """Observed consistency of each response with its samples."""
        kind = self.similarity if self.similarity != "auto" else ("label" if self.labels else "embedding")
        if kind in ("label", "match") and self.labels is not None:
            return np.array([self._label_consistency(r, s) for r, s in zip(responses, samples)])
        matches = [[float(normalize_answer(r) == normalize_answer(x)) for x in s] for r, s in zip(responses, samples)]
        if kind == "match":
            sims = matches
        elif kind == "overlap":
            sims = [[token_f1(r, x) for x in s] for r, s in zip(responses, samples)]
        else:
            sims = self._cosines(responses, samples)
        return np.array([observed_consistency(s, m, self.alpha) for s, m in zip(sims, matches)])

    def _label_consistency(self, response: str, samples: Sequence[str]) -> float:
        assert self.labels is not None
        label = self.labels.label_of(response)
        agree = [float(label is not None and self.labels.label_of(s) == label) for s in samples]
        return observed_consistency(agree, agree, self.alpha)

    def _cosines(self, responses: Sequence[str], samples: Sequence[Sequence[str]]) -> list[list[float]]:
        if self._embedder is None:
            self._embedder = self._embedder_factory() if self._embedder_factory else _default_embedder()
        texts = list(responses) + [x for s in samples for x in s]
        vectors = np.asarray(self._embedder.embed(texts), dtype=np.float64)
        heads, rest = vectors[: len(responses)], vectors[len(responses) :]
        out, start = [], 0
        for i, s in enumerate(samples):
            block = rest[start : start + len(s)]
            out.append([max(0.0, float(v)) for v in block @ heads[i]])
            start += len(s)
        return out

    def reflection(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Self-reflection certainty: the mean over the questions asked of the letter score (see ``reflection``)."""
        chat, scores = use_chat_template(self.service, self.chat_template), []
        for template in REFLECTION_PROMPTS[: self.questions]:
            asked = [template.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
            scores.append(letter_score(choice_logprobs(self.service, asked, chat=chat), self.reflection_mode))
        return np.mean(scores, axis=0)

    def score(self, prompts: Sequence[str], responses: Sequence[str], samples: Sequence[Sequence[str]]) -> Scores:
        """Confidence of each (prompt, response) pair against the prompt's samples."""
        consistency = self.consistency(responses, samples)
        reflection = self.reflection(prompts, responses)
        return Scores(combine(consistency, reflection, self.beta), consistency, reflection)


def choice_logprobs(service: Any, questions: Sequence[str], choices: Sequence[str] = ("A", "B", "C"), *,
                    chat: bool = False) -> np.ndarray:  # fmt: skip
    """``log p(choice | question, "Answer: (")`` for each question (rows) and choice (columns).

    The model's reply is started with ``Answer: (`` so that the next token is the letter. Single-token choices are
    read from one forward pass per question; otherwise (or for a service without a loaded model) each choice is
    scored with :meth:`~lightning_ft.curation.generation.GenerationService.answer_logprob`.
    """
    render = getattr(service, "render", None)
    asked = [(render(q, chat) if callable(render) else q + "\n") + ANSWER_START for q in questions]
    tokenizer, model = getattr(service, "tokenizer", None), getattr(service, "model", None)
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices] if tokenizer is not None else []
    if model is None or not hasattr(service, "next_token_logprobs") or not ids or any(len(i) != 1 for i in ids):
        return np.stack([service.answer_logprob(asked, [c] * len(asked)) for c in choices], axis=1)
    return service.next_token_logprobs(asked, [i[0] for i in ids])


def letter_score(logps: np.ndarray, mode: str = "probability") -> np.ndarray:
    """Scores from the log-likelihoods of the letters A, B, C (one row per question).

    ``probability``: ``P(A) + 0.5·P(C)`` with the probabilities renormalised over the three letters;
    ``letter``: 1, 0 or 0.5 for the likeliest letter.
    """
    logps = np.asarray(logps, dtype=np.float64)
    if mode == "letter":
        return LETTER_SCORES[np.argmax(logps, axis=1)]
    shifted = np.exp(logps - logps.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)) @ LETTER_SCORES


def _default_embedder() -> Any:
    from lightning_ft.curation.embedder import Embedder

    return Embedder("minilm-l6")


# ------------------------------------------------------------------------------------------------ decisions
def should_replace(old: float, new: float, threshold: float, margin: float) -> bool:
    """Auto-correct's rule: the replacement's confidence exceeds the original's by more than ``margin`` and is at or
    above ``threshold``."""
    return bool(new - old > margin and new >= threshold)


def curate(records: Sequence[Mapping[str, Any]], field: str, scores: Scores, threshold: float, *,
           replacements: Sequence[str | None] | None = None, replacement_scores: Scores | None = None,
           margin: float = 0.1) -> tuple[list[dict], dict]:  # fmt: skip
    """Auto-correct, then auto-filter: the kept rows (with ``clear_*`` columns) and the counts.

    A row is replaced when :func:`should_replace` holds (the original response moves to ``original_<field>``); a
    row is kept when its final confidence is at or above ``threshold``.
    """
    rows, corrected, dropped = [], 0, 0
    final = np.array(scores.confidence, dtype=np.float64)
    for i, record in enumerate(records):
        row = dict(record, clear_consistency=float(scores.consistency[i]), clear_reflection=float(scores.reflection[i]))
        row["clear_corrected"] = False
        new = replacements[i] if replacements is not None else None
        if (
            new is not None
            and replacement_scores is not None
            and should_replace(scores.confidence[i], replacement_scores.confidence[i], threshold, margin)
        ):
            row.update({f"original_{field}": record[field], field: new, "clear_corrected": True,
                        "clear_original_confidence": float(scores.confidence[i]),
                        "clear_consistency": float(replacement_scores.consistency[i]),
                        "clear_reflection": float(replacement_scores.reflection[i])})  # fmt: skip
            final[i] = replacement_scores.confidence[i]
            corrected += 1
        row["clear_confidence"] = float(final[i])
        if final[i] >= threshold:
            rows.append(row)
        else:
            dropped += 1
    counts = {"examples": len(records), "kept": len(rows), "dropped": dropped, "corrected": corrected}
    return rows, {"counts": counts, "final_confidence": final}


def histogram(values: np.ndarray, bins: int = 10) -> dict:
    """Counts of ``values`` in ``bins`` equal bins over [0, 1]."""
    counts, edges = np.histogram(np.clip(values, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    return {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts]}


# ------------------------------------------------------------------------------------------------ command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lightning-ft data curate`` (the common ones come from the command)."""
    parser.description = (
        "Confidence-based LLM Evaluation And Rectification (Chen & Mueller 2024) with BSDetector's confidence "
        "(0.7 x observed consistency of k sampled answers + 0.3 x self-reflection). Reads --prompt-field (or "
        "--prompt-template) and --response-field of every record. Writes the records whose confidence is at or "
        "above --threshold, with clear_confidence, clear_consistency, clear_reflection and clear_corrected (and, "
        "for corrected ones, original_<field> and clear_original_confidence); the report gives the counts kept, "
        "dropped and corrected and a histogram of the confidences."
    )
    group = parser.add_argument_group("CLEAR")
    group.add_argument("--threshold", type=float, default=0.5,
                       help="drop pairs whose confidence is below this (0-1; see the report's histogram; "
                            "default: 0.5)")  # fmt: skip
    group.add_argument(
        "--auto-correct",
        action="store_true",
        help="generate a replacement response and use it when it is confidently better",
    )
    group.add_argument(
        "--margin",
        type=float,
        default=0.1,
        help="auto-correct: how much more confident the replacement must be (default: 0.1)",
    )
    group.add_argument("--correction-model", default=None,
                       help="auto-correct: the model that writes replacements, e.g. one fine-tuned on the filtered "
                            "data (bundled alias or folder; default: --model)")  # fmt: skip
    group.add_argument("--num-samples", type=int, default=5,
                       help="sampled answers per prompt for observed consistency (BSDetector: 5)")  # fmt: skip
    group.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    group.add_argument("--max-new-tokens", type=int, default=64, help="length of samples and replacements")
    group.add_argument("--similarity", choices=("auto", "match", "overlap", "embedding"), default="auto",
                       help="how a sample agrees with the response: match (labels / normalised equality), overlap "
                            "(token F1), embedding (MiniLM cosine); auto: labels for label-like data, else "
                            "embedding")  # fmt: skip
    group.add_argument("--reflection", choices=("probability", "letter"), default="probability",
                       help="self-reflection score: expected A/B/C score under the model (probability) or the "
                            "likeliest letter's 1/0/0.5 (letter)")  # fmt: skip
    group.add_argument("--reflection-questions", type=int, choices=(1, 2), default=2,
                       help="self-reflection questions asked: 2 (BSDetector's two wordings, averaged) or 1 (the "
                            "first only, half the cost)")  # fmt: skip
    group.add_argument("--beta", type=float, default=BETA,
                       help=f"weight of observed consistency against self-reflection (BSDetector: {BETA})")  # fmt: skip
    group.add_argument("--alpha", type=float, default=ALPHA,
                       help=f"weight of similarity against exact match (BSDetector: {ALPHA})")  # fmt: skip
    add_prompt_arguments(group)


def _service(args: argparse.Namespace, model: str) -> Any:
    from lightning_ft.curation.generation import GenerationService

    cache = Path(args.cache_dir).expanduser() / "generations" if args.cache_dir else None
    return GenerationService(model, cache=cache, batch_size=args.batch_size, progress=True)


def _embedder(args: argparse.Namespace) -> Callable[[], Any]:
    def build() -> Any:
        from lightning_ft.curation.embedder import Embedder

        cache = Path(args.cache_dir).expanduser() / "embeddings" if args.cache_dir else None
        return Embedder("minilm-l6", cache_dir=cache, batch_size=max(1, args.batch_size))

    return build


def _check(args: argparse.Namespace) -> None:
    if not 0.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold {args.threshold} must be between 0 and 1 (confidences are).")
    if args.margin < 0:
        raise UserError(f"--margin {args.margin} must be 0 or more.")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be at least 1.")


def run(args: argparse.Namespace) -> dict:
    """Score ``--data`` with CLEAR, filter (and correct), write ``--output`` and its report; returns the report."""
    from lightning_ft.curation.records import read_pool, write_dataset

    _check(args)
    field = args.response_field
    records = read_pool(args.data, argument="--data", fields=(args.prompt_field, field),
                        options={args.prompt_field: "--prompt-field", field: "--response-field"})  # fmt: skip
    prompts = render_prompts(records, args.prompt_template, args.prompt_field)
    responses = [str(r[field]) for r in records]
    service = _service(args, args.model)
    scorer = ConfidenceScorer(service, num_samples=args.num_samples, temperature=args.temperature,
                              max_new_tokens=args.max_new_tokens, alpha=args.alpha, beta=args.beta,
                              similarity=args.similarity, reflection=args.reflection,
                              questions=args.reflection_questions, chat_template=args.chat_template,
                              seed=args.seed, embedder=_embedder(args))  # fmt: skip
    similarity = scorer.fit_labels(responses)
    samples = scorer.sample(prompts)
    scores = scorer.score(prompts, responses, samples)
    replacements, replacement_scores = None, None
    if args.auto_correct:
        replacements = correct(args, service, scorer, prompts)
        replacement_scores = score_some(scorer, prompts, replacements, samples)
    rows, outcome = curate(records, field, scores, args.threshold, replacements=replacements,
                           replacement_scores=replacement_scores, margin=args.margin)  # fmt: skip
    report = build_report(args, scores, outcome, similarity, getattr(service, "fingerprint", str(args.model)))
    write_dataset(rows, args.output, report)
    return report


def correct(
    args: argparse.Namespace, service: Any, scorer: ConfidenceScorer, prompts: Sequence[str]
) -> list[str | None]:
    """Greedy replacement responses (for label-like data: the label each names, ``None`` when it names none)."""
    from lightning_ft.curation.generation import GenerationSettings

    writer = service if args.correction_model in (None, args.model) else _service(args, args.correction_model)
    chat = use_chat_template(writer, args.chat_template)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, seed=args.seed, chat_template=chat)
    texts = [samples[0].strip() for samples in writer.generate(list(prompts), settings)]
    if scorer.labels is None:
        return [t or None for t in texts]
    return [scorer.labels.label_of(t) for t in texts]


def score_some(scorer: ConfidenceScorer, prompts: Sequence[str], responses: Sequence[str | None],
               samples: Sequence[Sequence[str]]) -> Scores:  # fmt: skip
    """Scores of the responses that exist; a missing one gets confidence ``-inf`` (never chosen) and NaN parts."""
    index = [i for i, r in enumerate(responses) if r is not None]
    found = Scores(*(np.full(len(responses), fill) for fill in (-np.inf, np.nan, np.nan)))
    if index:
        some = scorer.score(
            [prompts[i] for i in index], [str(responses[i]) for i in index], [samples[i] for i in index]
        )
        for full, part in zip((found.confidence, found.consistency, found.reflection),
                              (some.confidence, some.consistency, some.reflection)):  # fmt: skip
            full[index] = part
    return found


def build_report(args: argparse.Namespace, scores: Scores, outcome: dict, similarity: str, model: str) -> dict:
    """Counts, confidence histograms (before and after correction) and the settings."""
    return {
        "method": "clear",
        "data": str(args.data),
        "output": str(args.output),
        "model": model,
        **outcome["counts"],
        "threshold": args.threshold,
        "auto_correct": bool(args.auto_correct),
        "margin": args.margin,
        "similarity": similarity,
        "reflection": args.reflection,
        "reflection_questions": args.reflection_questions,
        "alpha": args.alpha,
        "beta": args.beta,
        "num_samples": args.num_samples,
        "temperature": args.temperature,
        "mean_confidence": float(np.mean(scores.confidence)) if len(scores.confidence) else None,
        "histogram": histogram(scores.confidence),
        "final_histogram": histogram(outcome["final_confidence"]),
    }
