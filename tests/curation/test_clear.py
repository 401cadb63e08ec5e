"""CLEAR: BSDetector's confidence formula on hand values, the filter's threshold, auto-correct's replacement rule,
and a small real run with SmolLM2 on Rotten Tomatoes reviews with some labels flipped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lightning_ft.curation.clear import (
    ALPHA,
    BETA,
    ConfidenceScorer,
    LabelSpace,
    Scores,
    combine,
    curate,
    letter_score,
    observed_consistency,
    score_some,
    should_replace,
    token_f1,
)
from lightning_ft.curation.cli import main
from lightning_ft.data.files import load_records
from lightning_ft.errors import UserError


def test_bsdetector_weights_and_formula_on_hand_values() -> None:
    assert (ALPHA, BETA) == (0.8, 0.7)
    confidence = combine(np.array([1.0, 0.5, 0.0]), np.array([0.0, 1.0, 0.5]))
    np.testing.assert_allclose(confidence, [0.7, 0.65, 0.15])
    np.testing.assert_allclose(combine(0.4, 0.9, beta=0.5), 0.65)
    # o_i = 0.8 sim + 0.2 match, averaged over the samples
    assert observed_consistency([1.0, 0.5], [1.0, 0.0]) == pytest.approx((1.0 + 0.4) / 2)
    assert observed_consistency([], []) == 0.0


def test_letter_scores() -> None:
    logps = np.log(np.array([[0.6, 0.2, 0.2], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]))
    np.testing.assert_allclose(letter_score(logps), [0.6 + 0.1, 0.1 + 0.05, 0.2 + 0.3])
    np.testing.assert_allclose(letter_score(logps, "letter"), [1.0, 0.0, 0.5])
    np.testing.assert_allclose(letter_score(logps - 5.0), letter_score(logps))  # renormalised over A, B, C


def test_label_space_and_token_f1() -> None:
    space = LabelSpace.of(["positive", "Negative", "negative."])
    assert space is not None and space.labels == ["negative", "positive"]
    assert space.label_of("This review is positive. The acting ...") == "positive"
    assert space.label_of("Negative, not positive") == "negative"
    assert space.label_of("The sentiment of this") is None
    assert LabelSpace.of(["a long free-form answer with many words"]) is None
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * (1.0 * 2 / 3) / (1.0 + 2 / 3))
    assert token_f1("cat", "dog") == 0.0


class _StubService:
    """Fixed samples, and letter likelihoods that call "positive" correct and anything else incorrect."""

    tokenizer = None

    def __init__(self, samples: dict[str, list[str]]) -> None:
        self.samples = samples

    def generate(self, prompts: list[str], settings: object) -> list[list[str]]:
        return [self.samples[p] for p in prompts]

    def answer_logprob(self, prompts: list[str], answers: list[str], chat_template: bool = False) -> np.ndarray:
        probs = {True: {"A": 0.8, "B": 0.1, "C": 0.1}, False: {"A": 0.1, "B": 0.8, "C": 0.1}}
        return np.log([probs["answer: positive" in p.lower()][a] for p, a in zip(prompts, answers)])


def test_scorer_combines_consistency_and_reflection_with_stub_model() -> None:
    service = _StubService({"r1": ["Positive!", "positive", "negative"], "r2": ["positive", "Negative.", "bad"]})
    scorer = ConfidenceScorer(service, num_samples=3, chat_template=False)
    assert scorer.fit_labels(["positive", "negative"]) == "label"
    prompts = ["r1", "r2"]
    scores = scorer.score(prompts, ["positive", "negative"], scorer.sample(prompts))
    np.testing.assert_allclose(scores.consistency, [2 / 3, 1 / 3])
    np.testing.assert_allclose(scores.reflection, [0.85, 0.15])
    np.testing.assert_allclose(scores.confidence, 0.7 * scores.consistency + 0.3 * scores.reflection)
    overlap = ConfidenceScorer(service, num_samples=3, similarity="overlap", chat_template=False)
    overlap.fit_labels(["positive", "negative"])
    expected = np.mean([0.8 * 1 + 0.2 * 1, 0.8 * 1 + 0.2 * 1, 0.0])
    np.testing.assert_allclose(overlap.consistency(["positive"], [service.samples["r1"]]), [expected])
    some = score_some(scorer, prompts, [None, "negative"], scorer.sample(prompts))  # replacements that exist
    assert some.confidence[0] == -np.inf and not should_replace(0.0, some.confidence[0], 0.0, 0.0)
    np.testing.assert_allclose(some.confidence[1], scores.confidence[1])
    with pytest.raises(UserError, match="--beta"):
        ConfidenceScorer(service, beta=1.5)


def _scores(confidence: list[float]) -> Scores:
    values = np.array(confidence)
    return Scores(values, values, values)


def test_filter_keeps_exactly_the_records_at_or_above_threshold() -> None:
    records = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(6)]
    confidence = [0.1, 0.49999, 0.5, 0.51, 0.9, 0.3]
    rows, outcome = curate(records, "response", _scores(confidence), threshold=0.5)
    assert [r["prompt"] for r in rows] == ["p2", "p3", "p4"]
    assert [r["clear_confidence"] for r in rows] == [0.5, 0.51, 0.9]
    assert not any(r["clear_corrected"] for r in rows)
    assert outcome["counts"] == {"examples": 6, "kept": 3, "dropped": 3, "corrected": 0}


def test_replacement_only_when_confidently_higher() -> None:
    assert should_replace(0.2, 0.45, threshold=0.4, margin=0.2)
    assert not should_replace(0.2, 0.39, threshold=0.3, margin=0.2)  # not higher by more than the margin
    assert not should_replace(0.1, 0.35, threshold=0.4, margin=0.2)  # higher, but below the threshold
    assert not should_replace(0.5, 0.5, threshold=0.0, margin=0.0)  # equal is not better
    records = [{"prompt": f"p{i}", "response": f"old{i}"} for i in range(4)]
    old = _scores([0.2, 0.2, 0.1, 0.8])
    new = _scores([0.7, 0.3, 0.45, 0.95])
    rows, outcome = curate(records, "response", old, 0.5, replacements=["new0", "new1", "new2", None],
                           replacement_scores=new, margin=0.1)  # fmt: skip
    assert [(r["prompt"], r["response"], r["clear_corrected"]) for r in rows] == [("p0", "new0", True),
                                                                                  ("p3", "old3", False)]  # fmt: skip
    assert rows[0]["original_response"] == "old0" and rows[0]["clear_original_confidence"] == 0.2
    assert rows[0]["clear_confidence"] == 0.7
    assert outcome["counts"] == {"examples": 4, "kept": 2, "dropped": 2, "corrected": 1}


FEW_SHOT = (
    "Review: dull mess.\nSentiment: negative\nReview: warm and funny.\nSentiment: positive\nReview: {text}\nSentiment:"
)


@pytest.mark.slow
def test_smollm2_flipped_labels_get_lower_confidence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Eight short Rotten Tomatoes reviews (four of each label), two of each label flipped, scored by SmolLM2-135M
    (2 one-token samples after a two-shot prompt, one self-reflection question). What happens: the flipped pairs
    score lower on average (0.27 against 0.63 when written), and nearly all of the gap comes from observed
    consistency (0.75 against 0.25: the sampled labels agree with the true ones more often than not); the 135M
    model's self-reflection barely tells them apart (0.31 against 0.33: it puts most of its mass on "(A) Correct"
    whatever the label)."""
    short = sorted(load_records("rotten_tomatoes", shuffle_seed=0)[:400], key=lambda r: len(r["text"]))
    pool = [r for r in short if r["label"] == "positive"][:8:2] + [r for r in short if r["label"] == "negative"][:8:2]
    flipped = [i % 2 == 1 for i in range(len(pool))]  # two of each true label
    other = {"positive": "negative", "negative": "positive"}
    rows = [dict(r, label=other[r["label"]] if f else r["label"], flipped=f) for r, f in zip(pool, flipped)]
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "curated.jsonl"
    main(["curate", "--data", str(data), "--output", str(out), "--cache-dir", str(tmp_path / "cache"),
          "--prompt-field", "text", "--response-field", "label", "--prompt-template", FEW_SHOT, "--no-chat-template",
          "--num-samples", "2", "--max-new-tokens", "1", "--reflection-questions", "1", "--threshold", "0",
          "--batch-size", "12"])  # fmt: skip
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    report = json.loads((tmp_path / "curated.report.json").read_text())
    assert report["similarity"] == "label" and report["examples"] == report["kept"] == len(kept) == len(rows)
    assert sum(report["histogram"]["counts"]) == len(rows)
    confidence = np.array([r["clear_confidence"] for r in kept])
    consistency = np.array([r["clear_consistency"] for r in kept])
    reflection = np.array([r["clear_reflection"] for r in kept])
    np.testing.assert_allclose(confidence, 0.7 * consistency + 0.3 * reflection)
    assert ((confidence >= 0) & (confidence <= 1)).all()
    is_flipped = np.array([r["flipped"] for r in kept])
    gap = consistency[~is_flipped].mean() - consistency[is_flipped].mean()
    with capsys.disabled():  # shown with -s
        print(f"\nconfidence intact {confidence[~is_flipped].mean():.3f} flipped {confidence[is_flipped].mean():.3f}; "
              f"consistency gap {gap:.3f}; reflection intact {reflection[~is_flipped].mean():.3f} "
              f"flipped {reflection[is_flipped].mean():.3f}")  # fmt: skip
    assert confidence[is_flipped].mean() < confidence[~is_flipped].mean() and gap > 0
    # the filter on these real scores keeps exactly the pairs at or above the threshold
    threshold = float(np.median(confidence))
    scores = Scores(confidence, consistency, reflection)
    filtered, outcome = curate(kept, "label", scores, threshold)
    assert [r["text"] for r in filtered] == [r["text"] for r, c in zip(kept, confidence) if c >= threshold]
    assert outcome["counts"]["kept"] + outcome["counts"]["dropped"] == len(kept)
    assert "kept: 8" in capsys.readouterr().out


class _Embedder:
    """Two-dimensional embeddings: texts with "yes" point one way, the others the orthogonal way."""

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.array([[1.0, 0.0] if "yes" in t else [0.0, 1.0] for t in texts])


def test_embedding_similarity_pairs_each_response_with_its_own_samples() -> None:
    scorer = ConfidenceScorer(_StubService({}), similarity="embedding", embedder=_Embedder, chat_template=False)
    assert scorer.fit_labels(["yes indeed", "no"]) == "embedding"
    consistency = scorer.consistency(["yes indeed", "no way"], [["yes", "nope"], ["no", "never", "yes"]])
    # o_i = 0.8 cos + 0.2 exact match; response 1: cos 1 and 0; response 2: cos 1, 1, 0 (no exact match anywhere)
    np.testing.assert_allclose(consistency, [(0.8 + 0.0) / 2, (0.8 + 0.8 + 0.0) / 3])


def test_tiny_model_auto_correct_and_errors(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """Plumbing of the command on free text with a tiny random model: auto-correct writes its columns and counts."""
    records = load_records("trivia")[:4]
    data = tmp_path / "trivia.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "curated.jsonl"
    common = ["--data", str(data), "--output", str(out), "--model", str(tiny_llama_dir), "--cache-dir",
              str(tmp_path / "cache"), "--max-new-tokens", "3", "--num-samples", "2", "--reflection-questions", "1",
              "--overwrite"]  # fmt: skip
    main(["curate", *common, "--similarity", "overlap", "--threshold", "0", "--margin", "0", "--auto-correct"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    report = json.loads((tmp_path / "curated.report.json").read_text())
    assert report["similarity"] == "overlap" and report["kept"] == len(rows) == 4
    assert report["corrected"] == sum(r["clear_corrected"] for r in rows)
    for row, record in zip(rows, records):
        assert row["clear_corrected"] == ("original_response" in row)
        assert row.get("original_response", row["response"]) == record["response"]
    with pytest.raises(UserError, match="no column 'answer'"):
        main(["curate", *common, "--response-field", "answer"])
    with pytest.raises(UserError, match="--threshold 1.5"):
        main(["curate", *common, "--threshold", "1.5"])


def test_help_states_inputs_outputs_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["curate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--threshold", "--auto-correct", "--margin", "--correction-model", "--num-samples", "--data",
                   "--output", "clear_confidence", "original_<field>", "histogram"):  # fmt: skip
        assert option in text
