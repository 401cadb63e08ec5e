"""Embedder: MiniLM sentence embeddings (unit norm, paraphrases close), causal-LM mean pooling, and the on-disk cache
(a rerun embeds nothing, an interrupted run resumes with the missing batches only, a torn index line is ignored)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lightning_ft.assets import load_dataset_records
from lightning_ft.curation.embedder import Embedder


class Interrupted(RuntimeError):
    """The simulated crash of an embedding run."""


def _count_forwards(embedder: Embedder, monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> list[int]:
    """Record the batch size of every forward pass of ``embedder``; raise :class:`Interrupted` at call ``fail_at``."""
    calls: list[int] = []
    real = embedder._forward

    def forward(texts: list[str]) -> Any:
        if fail_at is not None and len(calls) + 1 == fail_at:
            raise Interrupted("simulated crash")
        calls.append(len(texts))
        return real(texts)

    monkeypatch.setattr(embedder, "_forward", forward)
    return calls


@pytest.fixture(scope="module")
def reviews() -> list[str]:
    return [r["text"] for r in load_dataset_records("rotten_tomatoes", shuffle_seed=3)[:7]]


@pytest.fixture(scope="module")
def plain() -> Embedder:
    """MiniLM without a cache: the reference vectors."""
    return Embedder("minilm-l6", batch_size=3)


def test_minilm_vectors_are_unit_norm_and_paraphrases_closer_than_unrelated_text(plain: Embedder) -> None:
    business = next(r["text"] for r in load_dataset_records("reuters_r8") if len(r["text"].split()) > 20)
    texts = ["This movie was a wonderful, moving experience.", "A touching and beautiful film.", business]
    vectors = plain.embed(texts)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32 and plain.dim == 384
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sim = vectors @ vectors.T
    assert sim[0, 1] > 0.5 > max(sim[0, 2], sim[1, 2])
    assert plain.pooling == "mean"  # the bundled folder's 1_Pooling/config.json (sentence-transformers' recipe)


def test_cached_rerun_embeds_nothing_and_equals_uncached(
    tmp_path: Path, plain: Embedder, reviews: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = plain.embed(reviews)
    first = Embedder("minilm-l6", cache_dir=tmp_path, batch_size=3)
    calls = _count_forwards(first, monkeypatch)
    np.testing.assert_allclose(first.embed(reviews), reference, atol=1e-6)
    assert calls == [3, 3, 1]
    rerun = Embedder("minilm-l6", cache_dir=tmp_path, batch_size=3)  # a new process: only the disk cache is shared
    calls = _count_forwards(rerun, monkeypatch)
    again = rerun.embed([*reviews[::-1], reviews[0]])
    assert calls == []
    np.testing.assert_allclose(again, np.concatenate([reference[::-1], reference[:1]]), atol=1e-6)


def test_interrupted_run_resumes_with_only_the_missing_batches(
    tmp_path: Path, plain: Embedder, reviews: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    crashing = Embedder("minilm-l6", cache_dir=tmp_path, batch_size=3)
    calls = _count_forwards(crashing, monkeypatch, fail_at=2)
    with pytest.raises(Interrupted):
        crashing.embed(reviews)
    assert calls == [3]  # the first batch finished (and was stored) before the crash
    with open(tmp_path / "index.jsonl", "a") as index:
        index.write('{"shard": "torn')  # an index line cut by the crash
    resumed = Embedder("minilm-l6", cache_dir=tmp_path, batch_size=3)
    calls = _count_forwards(resumed, monkeypatch)
    vectors = resumed.embed(reviews)
    assert calls == [3, 1]  # only the 4 texts the crash left: 7 = 3 stored + 3 + 1
    np.testing.assert_allclose(vectors, plain.embed(reviews), atol=1e-6)
    assert len(Embedder("minilm-l6", cache_dir=tmp_path).cache.where) == len(reviews)  # nothing lost after the tear


def test_embed_batches_streams_chunks(plain: Embedder, reviews: list[str]) -> None:
    stream = (text for text in reviews)  # a generator: the pool is never a list in memory
    chunks = list(plain.embed_batches(stream, batch_size=2))
    assert [len(c) for c in chunks] == [2, 2, 2, 1]
    np.testing.assert_allclose(np.concatenate(chunks), plain.embed(reviews), atol=1e-6)


def test_causal_lm_is_mean_pooled_over_real_tokens_only(tiny_llama_dir: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    embedder = Embedder(str(tiny_llama_dir), batch_size=4)
    assert embedder.pooling == "causal-mean" and embedder.dim == 32
    texts = ["a short review", "a much longer review of a film that goes on and on about its plot"]
    vectors = embedder.embed(texts)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    model, tok = AutoModel.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)
    with torch.no_grad():  # the short text alone, unpadded: its padded row in the batch must equal it
        hidden = model(**tok(texts[0], return_tensors="pt")).last_hidden_state[0]
    alone = torch.nn.functional.normalize(hidden.mean(0), dim=0).numpy()
    np.testing.assert_allclose(vectors[0], alone, atol=1e-5)
