"""LiST self-training (``lightning-ft self-train``): the re-weighting formulas, label-word pseudo-labels, the student
loss, resume after an interrupted iteration, and one-sentence refusals of bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_ft.curation import self_training as st
from lightning_ft.curation.self_training import (
    PromptClassifier,
    class_probabilities,
    confidence_weights,
    meta_weights,
    pseudo_label,
    student_loss,
)
from lightning_ft.errors import UserError

WORDS = [" a", " the"]  # one token each for the tiny tokenizer (" positive" is six)


def test_confidence_weights_keep_the_confident_examples_normalised() -> None:
    probs = torch.tensor([[0.95, 0.05], [0.6, 0.4], [0.2, 0.8], [0.01, 0.99]])
    assert torch.allclose(confidence_weights(probs, 0.9), torch.tensor([0.5, 0.0, 0.0, 0.5]))
    assert torch.allclose(confidence_weights(probs, 0.7), torch.tensor([1 / 3, 0.0, 1 / 3, 1 / 3]))
    assert torch.equal(confidence_weights(probs, 0.999), torch.zeros(4))


def test_meta_weights_are_the_clamped_normalised_gradient_alignment() -> None:
    torch.manual_seed(0)
    weight = torch.randn(3, 5, requires_grad=True)
    x_l, y_l = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    x_u, y_u = torch.randn(8, 5), torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    w = meta_weights(x_l @ weight.T, y_l, x_u @ weight.T, y_u, [weight])

    g_l = torch.autograd.grad(F.cross_entropy(x_l @ weight.T, y_l), weight)[0]
    dots = torch.stack([(torch.autograd.grad(F.cross_entropy(x_u[i : i + 1] @ weight.T, y_u[i : i + 1]), weight)[0]
                         * g_l).sum() for i in range(8)])  # fmt: skip
    expected = dots.clamp_min(0) / dots.clamp_min(0).sum()
    assert (dots < 0).any() and (dots > 0).any()  # the case exercises the clamp
    assert torch.allclose(w, expected, atol=1e-6)

    # The meaning of the weight: one SGD step on the top-weighted example lowers the labelled loss, on a zero-weighted
    # one (negative alignment) it raises it.
    def after_step(i: int) -> float:
        grad = torch.autograd.grad(F.cross_entropy(x_u[i : i + 1] @ weight.T, y_u[i : i + 1]), weight)[0]
        return float(F.cross_entropy(x_l @ (weight.detach() - 1e-3 * grad).T, y_l))

    before = float(F.cross_entropy(x_l @ weight.detach().T, y_l))
    assert after_step(int(w.argmax())) < before < after_step(int(dots.argmin()))


def test_student_loss_uses_the_weights_exactly() -> None:
    logits_l, y_l = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    logits_u, y_u = torch.tensor([[1.0, 0.0], [0.0, 3.0], [5.0, -5.0]]), torch.tensor([1, 1, 0])
    w = torch.tensor([0.25, 0.75, 0.0])
    ce_l = -torch.log_softmax(logits_l, -1)[torch.arange(2), y_l]
    ce_u = -torch.log_softmax(logits_u, -1)[torch.arange(3), y_u]
    expected = ce_l.mean() + (w * ce_u).sum()
    assert torch.allclose(student_loss(logits_l, y_l, logits_u, y_u, w), expected)
    assert torch.allclose(student_loss(logits_l, y_l), ce_l.mean())
    changed = logits_u.clone()
    changed[2] = torch.tensor([-9.0, 9.0])  # a zero-weight example does not count
    assert torch.allclose(student_loss(logits_l, y_l, changed, y_u, w), expected)


def test_pseudo_labels_are_the_argmax_of_the_label_word_probabilities(tiny_llama_dir: Path) -> None:
    model = PromptClassifier(str(tiny_llama_dir), WORDS, seed=1)
    texts = [
        "Review: a fine film\nSentiment:",
        "Review: dull\nSentiment:",
        "Review: long and slow and it drags\nSentiment:",
    ]
    labels, probs = pseudo_label(model, texts, batch_size=2)
    ids = torch.tensor([model.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in WORDS])
    with torch.no_grad():  # one text at a time, no padding: the full LM logits of the next token
        full = torch.stack([model.backbone(**model.encode([t])).logits[0, -1, ids].softmax(-1) for t in texts])
    assert torch.allclose(probs, full, atol=1e-5)
    assert torch.equal(labels, full.argmax(-1))
    assert torch.allclose(class_probabilities(model, texts, batch_size=3), probs, atol=1e-5)


def test_encoder_head_starts_from_the_label_word_embeddings(tiny_bert_dir: Path) -> None:
    model = PromptClassifier(str(tiny_bert_dir), WORDS, seed=0)
    ids = [model.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in WORDS]
    embeddings = model.backbone.get_base_model().get_input_embeddings().weight
    assert model.head is not None and torch.equal(model.head.weight, embeddings[ids])
    assert {"head.weight", "head.bias"} <= set(model.trainable_state())
    assert class_probabilities(model, ["good", "bad film"]).shape == (2, 2)


def _data(tmp_path: Path, labelled: int = 6, unlabeled: int = 10) -> tuple[Path, Path]:
    from lightning_ft.assets import load_dataset_records

    rows = [{"text": r["text"], "label": r["label"]} for r in load_dataset_records("rotten_tomatoes", shuffle_seed=3)]
    data, pool = tmp_path / "labelled.jsonl", tmp_path / "pool.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:labelled]))
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows[labelled : labelled + unlabeled]))
    return data, pool


def _argv(model: Path, data: Path, pool: Path, work: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--unlabeled", str(pool), "--eval-data", str(data),
            "--iterations", "2", "--teacher-epochs", "1", "--batch-size", "4", "--max-length", "32",
            "--reweight", "meta", "--meta-scope", "all", "--label-words", *WORDS, "--work-dir", str(work), *extra]  # fmt: skip


def test_a_run_killed_in_iteration_2_resumes_without_redoing_iteration_1(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, pool = _data(tmp_path)
    whole = st.run(st._parser().parse_args(_argv(tiny_llama_dir, data, pool, tmp_path / "whole")))

    train = st.train_classifier
    calls: list[int] = []

    def crash_in_iteration_2(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        train(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(st, "train_classifier", crash_in_iteration_2)
    work = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        st.run(st._parser().parse_args(_argv(tiny_llama_dir, data, pool, work)))
    state = json.loads((work / "state.json").read_text())
    assert [e["iteration"] for e in state["iterations"]] == [0, 1]
    stamps = {p: p.stat().st_mtime_ns for p in work.glob("iteration_[01]/*")}

    calls.clear()
    report = st.run(st._parser().parse_args(_argv(tiny_llama_dir, data, pool, work)))
    assert len(calls) == 1  # only iteration 2's student trained
    assert {p: p.stat().st_mtime_ns for p in work.glob("iteration_[01]/*")} == stamps
    assert [e["role"] for e in report["iterations"]] == ["teacher", "student", "student"]
    resumed, straight = torch.load(report["final_model"]), torch.load(whole["final_model"])
    assert resumed.keys() == straight.keys()
    assert all(torch.allclose(resumed[k], straight[k]) for k in resumed)
    rows = [json.loads(x) for x in (work / "iteration_2" / "pseudo_labels.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and {r["pseudo_label"] for r in rows} <= {"negative", "positive"}


def test_other_settings_in_the_work_dir_are_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    data, pool = _data(tmp_path, 4, 4)
    argv = _argv(tiny_llama_dir, data, pool, tmp_path / "w", "--iterations", "0")
    st.run(st._parser().parse_args(argv))
    with pytest.raises(UserError, match="other settings \\(seed differ\\)"):
        st.run(st._parser().parse_args([*argv, "--seed", "5"]))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("empty_pool", "--unlabeled .* holds no records: self-training needs unlabeled texts"),
        ("long_word", "--label-words ' very positive indeed' is [0-9]+ tokens for this tokenizer, not one"),
        ("no_labels", "--num-labeled 0 must be at least 1"),
        ("same_words", "--label-words .* map two classes to the same token"),
    ],
)
def test_bad_inputs_are_refused_in_one_sentence(tiny_llama_dir: Path, tmp_path: Path, change: str, match: str) -> None:
    data, pool = _data(tmp_path, 4, 4)
    extra: list[str] = []
    if change == "empty_pool":
        pool.write_text("")
    elif change == "long_word":
        extra = ["--label-words", " very positive indeed", " negative"]
    elif change == "no_labels":
        extra = ["--num-labeled", "0"]
    else:
        extra = ["--label-words", " a", " a"]
    with pytest.raises(UserError, match=match) as err:
        st.run(st._parser().parse_args(_argv(tiny_llama_dir, data, pool, tmp_path / "w", *extra)))
    message = str(err.value)
    assert "\n" not in message and message.endswith(".") and ": " in message
    assert not (tmp_path / "w" / "state.json").exists()


def test_help_names_inputs_and_outputs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        st.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("--data", "--unlabeled", "--label-words", "--reweight", "--iterations", "--work-dir"):
        assert option in out
