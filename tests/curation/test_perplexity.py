"""The perplexity filter (POINTS' data step) on real reviews under SmolLM2: every kept example lies in the band and
every dropped one outside, the values are exp(mean NLL) by hand, and a band that keeps nothing is refused."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lightning_ft.assets import load_dataset_records
from lightning_ft.curation import perplexity
from lightning_ft.curation.generation import GenerationService
from lightning_ft.errors import UserError


@pytest.fixture(scope="module")
def smollm2() -> GenerationService:
    return GenerationService("smollm2-135m", batch_size=8, max_length=96, device="cpu")


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 short real reviews (4 to 7 words: SmolLM2 costs about 10 ms of CPU per token) as a local JSONL file."""
    reviews = load_dataset_records("rotten_tomatoes", shuffle_seed=5)
    rows = [{"text": r["text"], "label": r["label"]} for r in reviews if 4 <= len(r["text"].split()) <= 7][:24]
    path = tmp_path_factory.mktemp("pool") / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(pool: Path, output: Path, **kwargs: Any) -> argparse.Namespace:
    args = argparse.Namespace(data=str(pool), output=str(output), prompt_field="prompt", response_field="response",
                              model="smollm2-135m", cache_dir=None, seed=0, batch_size=8, text_field="text",
                              min_ppl=None, max_ppl=None, keep_quantiles=None, max_length=96, chat_template=False)  # fmt: skip
    vars(args).update(kwargs)
    return args


def test_band_keeps_inside_and_drops_outside_with_hand_checked_values(
    tmp_path: Path, pool: Path, smollm2: GenerationService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(perplexity, "_service", lambda args: smollm2)  # the fixture's model, loaded once
    scored: list[np.ndarray] = []
    real = smollm2.mean_token_nll
    monkeypatch.setattr(smollm2, "mean_token_nll", lambda *a, **k: scored.append(real(*a, **k)) or scored[-1])
    out = tmp_path / "band.jsonl"
    report = perplexity.run(_args(pool, out, keep_quantiles=[0.25, 0.75]))
    records = [json.loads(line) for line in pool.read_text().splitlines()]
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    low, high = report["band"]["min"], report["band"]["max"]
    [nll] = scored
    values = np.exp(nll)  # the perplexity of every pool record, as the filter saw it
    assert low == pytest.approx(np.quantile(values, 0.25)) and high == pytest.approx(np.quantile(values, 0.75))
    inside = [r["text"] for r, v in zip(records, values) if low <= v <= high]
    assert [r["text"] for r in kept] == inside  # every kept one inside, in pool order; every other one outside
    assert all(low <= r["perplexity"] <= high for r in kept) and 10 <= len(kept) <= 14
    counts = report["counts"]
    assert counts == {"pool": 24, "kept": len(kept), "below": int((values < low).sum()),
                      "above": int((values > high).sum()), "unscored": 0}  # fmt: skip
    assert counts["kept"] + counts["below"] + counts["above"] == 24 and counts["below"] > 0 and counts["above"] > 0
    assert sum(report["histogram"]["counts"]) == 24 and json.loads(out.with_suffix(".report.json").read_text())
    ids = smollm2.tokenizer(kept[0]["text"])["input_ids"][:96]  # exp(mean NLL) of one record, by hand
    with torch.no_grad():
        logp = smollm2.model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    nll = -np.mean([logp[t - 1, ids[t]].item() for t in range(1, len(ids))])
    assert kept[0]["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)


def test_response_given_prompt_scores_the_response_tokens_only(smollm2: GenerationService) -> None:
    records = load_dataset_records("trivia")[:2]
    values = perplexity.perplexities(smollm2, records, prompt_field="prompt", response_field="response")
    lengths = [len(smollm2.tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in records]
    logprob = smollm2.answer_logprob([r["prompt"] for r in records], [r["response"] for r in records])
    np.testing.assert_allclose(values, np.exp(-logprob / np.array(lengths)), rtol=1e-6)


def test_a_band_that_keeps_nothing_is_refused(
    tmp_path: Path, pool: Path, smollm2: GenerationService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(perplexity, "_service", lambda args: smollm2)
    small = tmp_path / "four.jsonl"
    small.write_text("".join(pool.read_text().splitlines(keepends=True)[:4]))
    with pytest.raises(
        UserError, match=r"keeps none of the 4 examples .*: widen --min-ppl/--max-ppl or --keep-quantiles"
    ):
        perplexity.run(_args(small, tmp_path / "none.jsonl", min_ppl=1e9))
    assert not (tmp_path / "none.jsonl").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "needs a band: give --min-ppl and/or --max-ppl, or --keep-quantiles"),
        ({"min_ppl": 5.0, "quantiles": (0.1, 0.9)}, "--keep-quantiles replaces --min-ppl/--max-ppl"),
        ({"min_ppl": 5.0, "max_ppl": 2.0}, "--min-ppl 5.0 is above --max-ppl 2.0"),
        ({"quantiles": (0.9, 0.1)}, "must satisfy 0 <= LOW < HIGH <= 1"),
    ],
)
def test_band_options_are_checked(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        perplexity.band(np.array([1.0, 2.0]), **kwargs)


def test_open_band_and_unscored_examples() -> None:
    ppl = np.array([3.0, float("nan"), 50.0, 8.0])
    assert perplexity.band(ppl, max_ppl=10.0) == (-math.inf, 10.0)
    groups = perplexity.split_by_band(ppl, -math.inf, 10.0)
    assert {k: v.tolist() for k, v in groups.items()} == {"kept": [0, 3], "below": [], "above": [2], "unscored": [1]}
