"""FAFT: feedback text from the checker's verdicts, all-positive prompts at predict time, cached sampling, refused
checkers, the bundled sentiment checker, a CLI fit on a tiny Llama and a short SmolLM2 fit."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import make_trainer

from lightning_ft.curation.faft import FeedbackAwareDataModule, FeedbackAwareTargets
from lightning_ft.curation.faft_checks import sentiment_format
from lightning_ft.curation.generation import GenerationService
from lightning_ft.data.collate import IGNORE_INDEX
from lightning_ft.errors import UserError

CHECKER = "lightning_ft.curation.faft_checks:sentiment_format"
ALL_POSITIVE = "Feedback: one word: satisfied; label word: satisfied; lowercase: satisfied; no punctuation: satisfied"


def returns_list(answer: str, record: Mapping[str, Any]) -> list[bool]:
    return [True]


def returns_words(answer: str, record: Mapping[str, Any]) -> dict[str, str]:
    return {"short": "yes"}


def changes_names(answer: str, record: Mapping[str, Any]) -> dict[str, bool]:
    return {f"length {len(answer)}": True}


@pytest.fixture
def generations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of prompts of every batch GenerationService actually generates (cache misses only)."""
    calls: list[int] = []
    original = GenerationService._generate_batch

    def counted(self: GenerationService, prompts: list[str], *args: Any) -> list[list[str]]:
        calls.append(len(prompts))
        return original(self, prompts, *args)

    monkeypatch.setattr(GenerationService, "_generate_batch", counted)
    return calls


def _data(model_dir: Path, cache: Path, **kwargs: Any) -> FeedbackAwareDataModule:
    opts: dict[str, Any] = {"dataset": "rotten_tomatoes", "label_options": ["positive", "negative"], "train_size": 6,
                            "val_size": 4, "test_size": 2, "control_size": 0, "num_samples": 3, "max_length": 160,
                            "sample_max_new_tokens": 4, "tokenizer": str(model_dir), "batch_size": 4}  # fmt: skip
    opts.update(kwargs)
    data = FeedbackAwareDataModule(**opts)
    data.generator = GenerationService(str(model_dir), cache=cache, device="cpu")
    return data


def _feedback(verdicts: Mapping[str, bool]) -> str:
    return "Feedback: " + "; ".join(f"{k}: {'satisfied' if v else 'violated'}" for k, v in verdicts.items())


def test_feedback_text_is_the_checkers_verdicts(tiny_llama_dir: Path, tmp_path: Path, generations: list[int]) -> None:
    data = _data(tiny_llama_dir, tmp_path / "cache.jsonl")
    data.setup("fit")
    rows, records = data.rows, data._splits["train"]
    assert [r["kind"] for r in rows].count("gold") == len(records) == 6
    for row in rows:
        expected = ALL_POSITIVE if row["kind"] == "gold" else _feedback(sentiment_format(row["answer"], {}))
        assert row["feedback"] == expected
    samples = [r for r in rows if r["kind"] == "sample"]
    assert 6 <= len(samples) <= 18 and any("violated" in r["feedback"] for r in samples)
    tokenizer = data.tokenizer
    for row, example in zip(rows, data._encoded["train"]):
        prompt_ids = [t for t, label in zip(example["input_ids"], example["labels"]) if label == IGNORE_INDEX]
        answer_ids = [label for label in example["labels"] if label != IGNORE_INDEX]
        shown = tokenizer.decode(prompt_ids)  # feedback + prompt -> answer; a long prompt loses its start, not feedback
        assert shown.startswith(row["feedback"] + "\n") and row["prompt"].endswith(shown[len(row["feedback"]) + 1 :])
        assert shown.endswith("\nSentiment:") and len(shown) > len(row["feedback"]) + 20
        assert tokenizer.decode(answer_ids) == row["answer"]


def test_predict_and_eval_prompts_carry_all_positive_feedback(tiny_llama_dir: Path, tmp_path: Path) -> None:
    data = _data(tiny_llama_dir, tmp_path / "cache.jsonl")
    data.setup("fit")
    record = data._splits["test"][0]
    assert data._encoded["predict"][0]["prompt"] == f"{ALL_POSITIVE}\nReview: {record['text']}\nSentiment:"
    val_prompt = data.tokenizer.decode(data._encoded["val"][0]["prompt_ids"])
    assert val_prompt.startswith(ALL_POSITIVE + "\nReview: ")


def test_generation_is_cached_across_setups(tiny_llama_dir: Path, tmp_path: Path, generations: list[int]) -> None:
    cache = tmp_path / "cache.jsonl"
    first = _data(tiny_llama_dir, cache)
    first.setup("fit")
    assert sum(generations) == 6  # the 6 training prompts, once
    second = _data(tiny_llama_dir, cache)  # a new service: it reads the cache file
    second.setup("fit")
    assert sum(generations) == 6 and second.rows == first.rows
    predict = _data(tiny_llama_dir, tmp_path / "other.jsonl")
    predict.setup("predict")
    assert sum(generations) == 6 and not predict.rows  # prediction samples nothing
    assert predict._encoded["predict"][0]["prompt"].startswith(ALL_POSITIVE + "\n")


class _Stub:
    """Stands in for GenerationService: two fixed answers per prompt."""

    def generate(self, prompts: list[str], settings: Any) -> list[list[str]]:
        return [[" positive", " Positive!"] for _ in prompts]


@pytest.mark.parametrize(
    ("checker", "start"),
    [
        ("sentiment_format", "checker 'sentiment_format' must be module:function"),
        (
            "lightning_ft.curation.faft_checks:missing",
            "checker 'lightning_ft.curation.faft_checks:missing' cannot be imported",
        ),
        ("no_such_module_xyz:check", "checker 'no_such_module_xyz:check' cannot be imported"),
        ("tests.curation.test_faft:returns_list", "checker 'tests.curation.test_faft:returns_list' returned list"),
        ("tests.curation.test_faft:returns_words", "checker 'tests.curation.test_faft:returns_words' returned non-bool"),
        ("tests.curation.test_faft:changes_names", "checker 'tests.curation.test_faft:changes_names' returned the constraints"),
    ],
)
def test_bad_checker_is_refused_in_one_sentence(checker: str, start: str) -> None:
    with pytest.raises(UserError) as err:
        targets = FeedbackAwareTargets(checker, num_samples=2)
        targets([{"text": "fine"}], ["Review: fine\nSentiment:"], [" positive"], _Stub())
    message = str(err.value)
    assert message.startswith(start) and message.endswith(".") and "\n" not in message, message


def test_bad_options_are_refused_in_one_sentence() -> None:
    for kwargs, start in [({"num_samples": 0}, "num_samples=0"), ({"feedback_template": "{prompt}"}, "feedback_template"),
                          ({"feedback_template": "{feedback} {x}"}, "feedback_template")]:  # fmt: skip
        with pytest.raises(UserError, match=f"^{start}"):
            FeedbackAwareTargets(CHECKER, **kwargs)
    with pytest.raises(UserError, match=r"^generator=None samples with the LightningModule"):
        FeedbackAwareDataModule(dataset="rotten_tomatoes", train_size=2, val_size=1, test_size=0, control_size=0,
                                tokenizer="smollm2-135m", generation_cache="").setup("fit")  # fmt: skip


def test_bundled_sentiment_checker() -> None:
    assert sentiment_format(" positive", {}) == dict.fromkeys(
        ["one word", "label word", "lowercase", "no punctuation"], True
    )
    assert sentiment_format(" Negative.", {}) == {"one word": True, "label word": True, "lowercase": False,
                                                  "no punctuation": False}  # fmt: skip
    assert sentiment_format(" the review is positive", {}) == {"one word": False, "label word": False, "lowercase": True,
                                                               "no punctuation": True}  # fmt: skip
    assert sentiment_format(" great", {})["label word"] is False


def test_fit_from_yaml_samples_with_the_fitted_module(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from lightning_ft.cli import main

    cache = tmp_path / "generations.jsonl"
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 2, "default_root_dir": str(tmp_path / "runs"),
                    "limit_val_batches": 1, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
                    "val_check_interval": 2, "check_val_every_n_epoch": None, "enable_checkpointing": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}}},
        "model": {"class_path": "lightning_ft.modules.CausalLMModule",
                  "init_args": {"model": str(tiny_llama_dir), "learning_rate": 1e-3, "warmup_steps": 1, "output_dir": ""}},
        "data": {"class_path": "lightning_ft.curation.faft.FeedbackAwareDataModule",
                 "init_args": {"checker": CHECKER, "num_samples": 2, "sample_max_new_tokens": 3, "generation_cache": str(cache),
                               "label_options": ["positive", "negative"], "train_size": 4, "val_size": 4, "test_size": 0,
                               "batch_size": 4, "max_length": 160, "control_size": 0}},
    }  # fmt: skip
    path = tmp_path / "faft.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path), "--run_name", "faft"])
    assert len(cache.read_text().splitlines()) == 4  # one cache line per training prompt
    (metrics,) = tmp_path.glob("**/metrics.csv")
    header = metrics.read_text().splitlines()[0]
    assert "train/loss" in header and "val/target_acc" in header


def test_smollm2_faft_fit(smollm2_dir: Path, tmp_path: Path) -> None:
    """SmolLM2 (LoRA) on 4 short real reviews: 2 samples of at most 4 tokens each, 3 steps; the loss on a FAFT batch
    falls."""
    from lightning_ft.assets import load_dataset_records
    from lightning_ft.modules import CausalLMModule

    short = [r for r in load_dataset_records("rotten_tomatoes", shuffle_seed=0) if len(r["text"]) < 40][:4]
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in short))
    lora = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"}
    module = CausalLMModule(model=str(smollm2_dir), peft=lora, learning_rate=3e-3, warmup_steps=0, schedule="constant",
                            output_dir="")  # fmt: skip
    data = FeedbackAwareDataModule(dataset=str(reviews), label_options=["positive", "negative"], val_size=0,
                                   test_size=0, control_size=0, num_samples=2, sample_max_new_tokens=4, batch_size=2,
                                   max_length=64)  # fmt: skip
    data.tokenizer = module.tokenizer
    data.generator = GenerationService(module, cache=tmp_path / "cache.jsonl")
    data.setup("fit")
    assert {r["kind"] for r in data.rows} == {"sample", "gold"}
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        before = module.compute_loss(batch).item()
    make_trainer(tmp_path, 3).fit(module, datamodule=data)
    with torch.no_grad():
        after = module.compute_loss(batch).item()
    assert after < before - 0.3, (before, after)
