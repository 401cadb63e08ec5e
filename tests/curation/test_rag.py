"""RAG fine-tuning data: retrieval reordering, hard negatives, the intermediate target, refusals, a SmolLM2 fit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import make_trainer

from lightning_ft.curation.embedder import Embedder
from lightning_ft.curation.kaft import mentions, reuters_company_qa
from lightning_ft.curation.rag import (
    RetrievalAugmentedDataModule,
    chunk_words,
    hard_negatives,
    relevant_target,
    reorder,
)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Embedder:
    """The bundled all-MiniLM-L6-v2, caching into a temporary folder."""
    return Embedder("minilm-l6", cache_dir=tmp_path_factory.mktemp("embeddings"))


def _data(tokenizer: Path, embedder: Embedder, **kwargs: Any) -> RetrievalAugmentedDataModule:
    opts: dict[str, Any] = {"train_size": 12, "val_size": 4, "test_size": 0, "control_size": 0, "passage_words": 12,
                            "num_hard_negatives": 2, "tokenizer": str(tokenizer)}  # fmt: skip
    opts.update(kwargs)
    data = RetrievalAugmentedDataModule(**opts)
    data.embedder = embedder
    data.setup("fit")
    return data


def test_reorder_puts_the_best_at_both_ends() -> None:
    assert reorder(["a", "b", "c", "d", "e"], [5, 4, 3, 2, 1]) == ["a", "c", "e", "d", "b"]  # scores 5, 3, 1, 2, 4
    assert reorder(["e", "c", "a", "b", "d"], [1, 3, 5, 4, 2]) == ["a", "c", "e", "d", "b"]  # any input order
    assert reorder([1, 2, 3, 4], [0.9, 0.8, 0.7, 0.6]) == [1, 3, 4, 2]
    assert reorder(["x", "y"], [0.5, 0.5]) == ["x", "y"] and reorder([], []) == []
    assert hard_negatives(["has X", "no", "X again", "none"], [4, 3, 2, 1], "x", 5) == [1, 3]
    assert chunk_words("a b c d e", 2) == ["a b", "c d", "e"] and chunk_words("a b", None) == ["a b"]
    with pytest.raises(ValueError, match=r"^reorder got 2 passages and 1 scores: give one score per passage\.$"):
        reorder(["a", "b"], [1.0])


def test_contexts_hold_the_top_positive_and_the_hard_negatives_in_reordered_order(
    tiny_tokenizer_dir: Path, embedder: Embedder
) -> None:
    data = _data(tiny_tokenizer_dir, embedder, intermediate=True)
    retriever = data.retriever
    assert retriever is not None
    for record in data._splits["train"]:
        answer, shown = record["answer"], record["rag_passages"]
        scores = embedder.embed([record["question"]])[0] @ embedder.embed(retriever.passages).T
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
        positives = [retriever.passages[i] for i in ranked if mentions(retriever.passages[i], answer)][:1]
        negatives = [retriever.passages[i] for i in ranked if not mentions(retriever.passages[i], answer)][:2]
        assert sorted(shown) == sorted([*positives, *negatives])  # the top positive and the top non-answer passages
        assert all(not mentions(p, answer) for p in negatives)
        by_score = sorted(shown, key=lambda p: -scores[retriever.passages.index(p)])
        assert shown == reorder(by_score, list(range(len(shown), 0, -1)))  # best first, second best last
        np.testing.assert_allclose(
            record["rag_scores"], [scores[retriever.passages.index(p)] for p in shown], atol=1e-5
        )
        named = [i + 1 for i, p in enumerate(shown) if mentions(p, answer)]
        assert named == [shown.index(p) + 1 for p in positives]  # exactly the passages that hold the answer
        assert record["target"] == f"Relevant passages: [{', '.join(map(str, named))}]. Answer: {answer}"
        assert record["target"] == relevant_target(shown, answer)
        assert record["passages"].splitlines() == [f"[{n}] {p}" for n, p in enumerate(shown, 1)]
    assert sum(bool(r["rag_passages"]) and any(mentions(p, r["answer"]) for p in r["rag_passages"])
               for r in data._splits["train"]) >= 8  # most answers survive the 12-word windows  # fmt: skip
    for record in data._splits["val"]:  # evaluation: the plain top 3, no answer used to pick them
        scores = embedder.embed([record["question"]])[0] @ embedder.embed(retriever.passages).T
        top = [retriever.passages[i] for i in np.argsort(-scores, kind="stable")[:3]]
        assert record["rag_passages"] == reorder(top, [3, 2, 1])
        assert record["target"].endswith(f"Answer: {record['answer']}")


def test_descending_order_and_plain_answers(tiny_tokenizer_dir: Path, embedder: Embedder) -> None:
    data = _data(tiny_tokenizer_dir, embedder, order="descending", mix_hard_negatives=False)
    for record in data._splits["train"]:
        assert record["rag_scores"] == sorted(record["rag_scores"], reverse=True) and len(record["rag_scores"]) == 3
        assert record["target"] == record["answer"]


def test_refusals_are_one_sentence(tiny_tokenizer_dir: Path, embedder: Embedder, tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"^num_positives=0 and num_hard_negatives=0 must be zero or positive and give"
    ):
        RetrievalAugmentedDataModule(num_positives=0, num_hard_negatives=0)
    with pytest.raises(ValueError, match=r"^passage_words=0 must be at least 1 \(or null"):
        RetrievalAugmentedDataModule(passage_words=0)
    with pytest.raises(ValueError, match=r"^order='random' is not an order of passages: use reorder or descending\.$"):
        RetrievalAugmentedDataModule(order="random")  # type: ignore[arg-type]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"query": r["question"], "answer": r["answer"], "context": r["context"]}) + "\n"
                          for r in reuters_company_qa()[:20]))  # fmt: skip
    with pytest.raises(ValueError, match=r"has no 'question' field .*: give every record a 'question', or set "
                                         r"question_field to a field they all have\.$"):  # fmt: skip
        _data(tiny_tokenizer_dir, embedder, dataset=str(qa))
    with pytest.raises(ValueError, match=r"has no 'body' field .*or set passage_field to a field they all have\.$"):
        _data(tiny_tokenizer_dir, embedder, dataset=str(qa), question_field="query", passages=str(qa),
              passage_field="body")  # fmt: skip


@pytest.mark.slow
def test_rag_fit_on_smollm2_lowers_the_loss(smollm2_dir: Path, embedder: Embedder, tmp_path: Path) -> None:
    """6 steps of batch 2 (three epochs of 4 short questions, each with its best answer passage and its hardest
    negative of 8 words, reordered, and the intermediate-step target), LoRA on the top four blocks: under 40 s on two
    CPU cores."""
    from lightning_ft.modules import CausalLMModule

    peft = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
            "layers_to_transform": [26, 27, 28, 29]}  # fmt: skip
    module = CausalLMModule(model=str(smollm2_dir), learning_rate=2e-3, warmup_steps=0, output_dir="", peft=peft)
    source = tmp_path / "qa.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in reuters_company_qa(context_words=32, question_words=6)))
    data = RetrievalAugmentedDataModule(dataset=str(source), train_size=4, val_size=0, test_size=0, control_size=0,
                                        passage_words=8, num_hard_negatives=1, intermediate=True, batch_size=2,
                                        max_length=96)  # fmt: skip
    data.tokenizer, data.embedder = module.tokenizer, embedder
    data.setup("fit")
    batches = list(data.train_dataloader())
    assert max(b["input_ids"].shape[1] for b in batches) <= 96

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(module.compute_loss(b).item() for b in batches) / len(batches)

    before = mean_loss()
    make_trainer(tmp_path, 6).fit(module, datamodule=data)
    after = mean_loss()
    assert after < 0.7 * before, (before, after)
