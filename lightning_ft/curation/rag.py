"""RAG fine-tuning data (Jin et al. 2024, "Long-Context LLMs Meet RAG: Overcoming Challenges for Long Inputs in RAG").

The paper finds that answers first improve, then degrade as more retrieved passages are given, and blames the
retrieved *hard negatives* (highly scored passages that do not hold the answer). It proposes:

* **retrieval reordering** (training-free): put the highest-scored passages at the start and the end of the context
  and the lowest-scored in the middle, where long-context models attend least (:func:`reorder`: ranks 1, 3, 5, ...
  from the front, then ..., 6, 4, 2 to the back);
* **RAG-specific fine-tuning** on (question + retrieved passages, hard negatives included -> answer);
* **fine-tuning with an intermediate step**: the target first names the relevant passages, then answers
  (``Relevant passages: [1, 5]. Answer: ...``).

:class:`RetrievalAugmentedDataModule` builds those examples (``lightning-ft fit --config configs/rag.yaml``):
passages come from a collection (a bundled dataset or a data file and its text field, split into windows of
``passage_words`` words) and are scored by cosine similarity of the shared, disk-cached
``lightning_ft.curation.embedder.Embedder`` (all-MiniLM-L6-v2 by default). No BM25 package is installed, so the
retriever is dense only.

Where this differs from the paper: the paper retrieves from Wikipedia with e5 / BM25 and trains Gemma / Mistral on
NQ, TriviaQA, ... with long contexts; here the collection is small and a training context holds the
``num_positives`` best-scored passages that contain the answer plus the ``num_hard_negatives`` best-scored ones that
do not (set ``mix_hard_negatives: false`` for the paper's plain top-k retrieval). Validation, test and predict
contexts are always the plain top ``num_positives + num_hard_negatives`` (no answer is used to pick them). A
passage "contains" the answer when it mentions it as whole words, case-insensitively. The exact interleaving of
:func:`reorder` follows our reading of the paper's description (verified here: only that reordering exists).

No context-QA dataset is bundled: ``dataset: reuters_qa`` is the Reuters company QA of
:func:`lightning_ft.curation.kaft.reuters_company_qa`, and by default its contexts are the passage collection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, TypeVar

import numpy as np

from lightning_ft.assets import cache_dir
from lightning_ft.curation.kaft import load_context_qa, mentions
from lightning_ft.data.files import load_records, record_field
from lightning_ft.data.instruction import InstructionDataModule

__all__ = ["DenseRetriever", "RetrievalAugmentedDataModule", "chunk_words", "hard_negatives", "relevant_target",
           "reorder"]  # fmt: skip

T = TypeVar("T")
Record = dict[str, Any]


def reorder(passages: Sequence[T], scores: Sequence[float]) -> list[T]:
    """Retrieval reordering: the highest-scored passages at both ends of the context, the lowest in the middle.

    With the passages ranked by score (ties keep their order) as ``d1, d2, ..., dk``, the result is
    ``d1, d3, d5, ..., d6, d4, d2``: scores ``5, 4, 3, 2, 1`` come out as ``5, 3, 1, 2, 4``.
    """
    if len(passages) != len(scores):
        raise ValueError(f"reorder got {len(passages)} passages and {len(scores)} scores: give one score per passage.")
    ranked = sorted(range(len(passages)), key=lambda i: (-float(scores[i]), i))
    return [passages[i] for i in ranked[0::2]] + [passages[i] for i in ranked[1::2]][::-1]


def hard_negatives(passages: Sequence[str], scores: Sequence[float], answer: str, n: int) -> list[int]:
    """The indices of the ``n`` best-scored passages that do not contain ``answer``, best first."""
    ranked = sorted(range(len(passages)), key=lambda i: (-float(scores[i]), i))
    return [i for i in ranked if not mentions(passages[i], answer)][:n]


def relevant_target(passages: Sequence[str], answer: str) -> str:
    """The intermediate-step target: ``Relevant passages: [i, j]. Answer: <answer>`` with the 1-based positions of
    the passages that contain the answer (``[]`` when none does)."""
    found = [str(i + 1) for i, p in enumerate(passages) if mentions(p, answer)]
    return f"Relevant passages: [{', '.join(found)}]. Answer: {answer}"


def chunk_words(text: str, words: int | None) -> list[str]:
    """``text`` cut into windows of ``words`` words (the whole text when ``words`` is ``None``)."""
    tokens = str(text).split()
    if words is None:
        return [" ".join(tokens)] if tokens else []
    return [" ".join(tokens[i : i + words]) for i in range(0, len(tokens), words)]


class DenseRetriever:
    """Cosine similarity of unit sentence embeddings between queries and a fixed passage collection.

    Args:
        passages: the collection.
        embedder: a ``lightning_ft.curation.embedder.Embedder`` (anything with ``embed(texts) -> [n, dim]`` unit
            vectors).
    """

    def __init__(self, passages: Sequence[str], embedder: Any) -> None:
        self.passages = list(passages)
        self.embedder = embedder
        self.vectors = np.asarray(embedder.embed(self.passages), dtype=np.float32)

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """The ``[len(queries), len(passages)]`` cosine similarities."""
        return np.asarray(self.embedder.embed(list(queries)), dtype=np.float32) @ self.vectors.T


class RetrievalAugmentedDataModule(InstructionDataModule):
    """Question + retrieved passages -> answer, with hard negatives, reordering and an optional intermediate step.

    Every split's prompt shows passages retrieved for its question (rendered ``[1] ...`` one per line into the
    ``{passages}`` field), so ``predict`` uses the same retrieval and order as training.

    Args:
        dataset: the QA source: ``reuters_qa``, a bundled dataset or a data file with question and answer columns.
        question_field: the column holding the question (the retrieval query).
        answer_field: the column holding the answer.
        passages: the passage collection (a bundled dataset or a data file); ``None``: the ``passage_field`` of the
            dataset's own records in the splits.
        passage_field: the column of the collection holding the text.
        passage_words: words per passage (texts are cut into windows); ``None`` keeps each text whole.
        retriever_model: the Embedder's model (``minilm-l6`` or an encoder or causal-LM folder).
        embedding_cache: the Embedder's cache folder; default: ``curation/embeddings`` in the lightning-ft cache.
        num_positives: training passages that contain the answer (the best-scored ones).
        num_hard_negatives: training passages that do not (the best-scored ones: the hard negatives).
        mix_hard_negatives: build training contexts from positives and hard negatives; ``False``: the plain top
            ``num_positives + num_hard_negatives`` retrieved passages, as at evaluation.
        order: ``reorder`` (best at both ends, :func:`reorder`) or ``descending`` (best first).
        intermediate: targets first name the passages that contain the answer (:func:`relevant_target`).
        prompt_template: the prompt (``{passages}`` is the rendered context).
        response_template: the response (``{target}`` is the answer, or the intermediate-step target).
        **kwargs: the other arguments of :class:`InstructionDataModule` (``train_size``, ``batch_size``, ...).

    Example (YAML, see ``configs/rag.yaml``)::

        data:
          class_path: lightning_ft.curation.rag.RetrievalAugmentedDataModule
          init_args: {dataset: reuters_qa, passage_words: 24, num_hard_negatives: 3, intermediate: true}
    """

    def __init__(
        self,
        dataset: str = "reuters_qa",
        question_field: str = "question",
        answer_field: str = "answer",
        passages: str | None = None,
        passage_field: str = "context",
        passage_words: int | None = 24,
        retriever_model: str = "minilm-l6",
        embedding_cache: str | None = None,
        num_positives: int = 1,
        num_hard_negatives: int = 3,
        mix_hard_negatives: bool = True,
        order: Literal["reorder", "descending"] = "reorder",
        intermediate: bool = False,
        prompt_template: str = "{passages}\nQuestion: {question}\nAnswer:",
        response_template: str = " {target}",
        **kwargs: Any,
    ) -> None:
        if num_positives < 0 or num_hard_negatives < 0 or num_positives + num_hard_negatives < 1:
            raise ValueError(f"num_positives={num_positives} and num_hard_negatives={num_hard_negatives} must be zero "
                             "or positive and give at least one passage per question.")  # fmt: skip
        if passage_words is not None and passage_words < 1:
            raise ValueError(f"passage_words={passage_words} must be at least 1 (or null to keep each text whole).")
        if order not in ("reorder", "descending"):
            raise ValueError(f"order={order!r} is not an order of passages: use reorder or descending.")
        super().__init__(
            dataset=dataset, prompt_template=prompt_template, response_template=response_template, **kwargs
        )
        self.embedder: Any = None  # the Embedder, made on first use (or set it before setup)
        self.retriever: DenseRetriever | None = None  # the passage collection and its vectors, after setup

    def _read(self, source: str, argument: str) -> list[Record]:
        return load_context_qa(source, argument=argument, shuffle_seed=self.hparams.split_seed)

    def _load_splits(self, check_fields: bool = True) -> dict[str, list[Record]]:
        h = self.hparams
        splits = super()._load_splits(check_fields=False)  # the passages are added first; checked below
        for records in splits.values():
            for record in records:
                for argument in ("question_field", "answer_field"):
                    record_field(record, h[argument], argument, h.dataset)
        self.retriever = retriever = DenseRetriever(self._collection(splits), self._embedder())
        splits = {
            name: self._with_passages(records, retriever, train=name == "train") for name, records in splits.items()
        }
        self._check_fields(splits["train"][0], h.dataset)
        return splits

    def _collection(self, splits: dict[str, list[Record]]) -> list[str]:
        h = self.hparams
        if h.passages is None:
            source, argument = [r for records in splits.values() for r in records], "passage_field"
            where = h.dataset
        else:
            source, argument, where = load_records(h.passages, argument="passages"), "passage_field", h.passages
        texts = [str(record_field(r, h.passage_field, argument, where)) for r in source]
        chunks = list(dict.fromkeys(c for t in texts for c in chunk_words(t, h.passage_words)))
        if not chunks:
            raise ValueError(
                f"passages={h.passages!r} holds no text in {h.passage_field!r}: give a non-empty collection."
            )
        return chunks

    def _embedder(self) -> Any:
        if self.embedder is None:
            h = self.hparams
            cache = h.embedding_cache if h.embedding_cache is not None else str(cache_dir() / "curation" / "embeddings")
            from lightning_ft.curation.embedder import Embedder

            self.embedder = Embedder(h.retriever_model, cache_dir=cache)
        return self.embedder

    def _with_passages(self, records: list[Record], retriever: DenseRetriever, train: bool) -> list[Record]:
        h = self.hparams
        k = h.num_positives + h.num_hard_negatives
        out = []
        for start in range(0, len(records), 256):
            batch = records[start : start + 256]
            scores = retriever.scores([str(r[h.question_field]) for r in batch])
            for record, row in zip(batch, scores):
                answer = str(record[h.answer_field]).strip()
                ranked = [int(i) for i in np.argsort(-row, kind="stable")]
                if train and h.mix_hard_negatives:
                    positives = [i for i in ranked if mentions(retriever.passages[i], answer)][: h.num_positives]
                    chosen = positives + hard_negatives(retriever.passages, row, answer, h.num_hard_negatives)
                else:
                    chosen = ranked[:k]
                chosen_scores = [float(row[i]) for i in chosen]
                if h.order == "reorder":
                    chosen = reorder(chosen, chosen_scores)
                else:
                    chosen = sorted(chosen, key=lambda i: -float(row[i]))
                texts = [retriever.passages[i] for i in chosen]
                target = relevant_target(texts, answer) if h.intermediate else answer
                out.append({**record, "passages": "\n".join(f"[{n}] {t}" for n, t in enumerate(texts, 1)),
                            "target": target, "rag_passages": texts,
                            "rag_scores": [float(row[i]) for i in chosen]})  # fmt: skip
        return out
