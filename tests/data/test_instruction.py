"""InstructionDataModule: prompt masking, truncation, splits, option scoring layout, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lightning_ft.data import InstructionDataModule
from lightning_ft.data.collate import IGNORE_INDEX, ChoiceCollator, encode_example


def _dm(tokenizer_dir: Path, **kwargs: object) -> InstructionDataModule:
    defaults: dict[str, object] = dict(label_options=["positive", "negative"], val_size=20, test_size=10, control_size=8)
    defaults.update(kwargs)
    dm = InstructionDataModule(**defaults)  # type: ignore[arg-type]
    dm.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    dm.setup("fit")
    return dm


def test_prompt_tokens_are_masked_and_response_is_labelled(tiny_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ex = encode_example(tok, "Review: fine\nSentiment:", " positive", max_length=64)
    n_prompt = len(tok("Review: fine\nSentiment:")["input_ids"])
    response = tok(" positive", add_special_tokens=False)["input_ids"]
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == response == ex["input_ids"][n_prompt:]
    unmasked = encode_example(tok, "Review: fine\nSentiment:", " positive", max_length=64, mask_prompt=False)
    assert unmasked["labels"] == unmasked["input_ids"]


def test_truncation_keeps_the_response_and_the_prompt_end(tiny_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    long_prompt = "word " * 200 + "Sentiment:"
    ex = encode_example(tok, long_prompt, " negative", max_length=16)
    response = tok(" negative", add_special_tokens=False)["input_ids"]
    assert len(ex["input_ids"]) == 16
    assert ex["input_ids"][-len(response):] == response
    end = tok("Sentiment:", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][-len(response) - len(end) : -len(response)] == end


def test_splits_are_disjoint_deterministic_and_sized(tiny_tokenizer_dir: Path) -> None:
    a = _dm(tiny_tokenizer_dir, train_size=50)
    b = _dm(tiny_tokenizer_dir, train_size=50)
    texts = {k: [r["text"] for r in a._splits[k]] for k in ("train", "val", "test")}
    assert [len(texts[k]) for k in ("train", "val", "test")] == [50, 20, 10]
    assert not set(texts["val"]) & set(texts["train"]) and not set(texts["test"]) & set(texts["train"])
    assert texts["val"] == [r["text"] for r in b._splits["val"]]


def test_shuffle_seed_changes_the_batch_order_but_not_the_splits(tiny_tokenizer_dir: Path) -> None:
    def first_batches(dm: InstructionDataModule) -> list[list[list[int]]]:
        return [b["input_ids"].tolist() for b, _ in zip(dm.train_dataloader(), range(3))]

    default = _dm(tiny_tokenizer_dir, train_size=40, batch_size=4)
    same = _dm(tiny_tokenizer_dir, train_size=40, batch_size=4, shuffle_seed=1234)  # = split_seed
    other = _dm(tiny_tokenizer_dir, train_size=40, batch_size=4, shuffle_seed=7)
    assert first_batches(default) == first_batches(same)
    assert first_batches(default) != first_batches(other)
    for split in ("train", "val", "test"):
        assert default._splits[split] == other._splits[split]


def test_batches_have_the_expected_layout(tiny_tokenizer_dir: Path) -> None:
    dm = _dm(tiny_tokenizer_dir, train_size=16, batch_size=4, eval_batch_size=5)
    train = next(iter(dm.train_dataloader()))
    assert train["input_ids"].shape == train["labels"].shape and train["input_ids"].shape[0] == 4
    assert (train["labels"] != IGNORE_INDEX).sum(1).min() >= 1
    val, control = dm.val_dataloader()
    vb = next(iter(val))
    assert vb["split"] == "target" and vb["label_index"].shape == (5,)
    cb = next(iter(control))
    assert cb["split"] == "control" and (cb["labels"] == cb["input_ids"]).logical_or(cb["labels"] == IGNORE_INDEX).all()
    pred = next(iter(dm.predict_dataloader()))
    assert (pred["attention_mask"][:, -1] == 1).all()  # left padded for generation


def test_multi_token_options_use_candidate_layout(tiny_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    options = [tok(" very positive", add_special_tokens=False)["input_ids"], tok(" no", add_special_tokens=False)["input_ids"]]
    collate = ChoiceCollator(pad_token_id=1, option_ids=options)
    assert not collate.single_token
    batch = collate([{"prompt_ids": [5, 6, 7], "label_index": 0}, {"prompt_ids": [8, 9], "label_index": 1}])
    assert batch["input_ids"].shape[0] == 4 and batch["num_options"] == 2
    assert batch["labels"][0].tolist()[3 : 3 + len(options[0])] == options[0]
    assert (batch["labels"][0, :3] == IGNORE_INDEX).all()


def test_missing_field_names_the_argument(tiny_tokenizer_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"prompt_template=.*uses the field 'review'.*rename the field"):
        _dm(tiny_tokenizer_dir, prompt_template="Review: {review}\nSentiment:")
    with pytest.raises(ValueError, match=r"label_field='stars' is not a column"):
        _dm(tiny_tokenizer_dir, label_field="stars")
    with pytest.raises(ValueError, match=r"label 'negative' .* is not among label_options"):
        _dm(tiny_tokenizer_dir, label_options=["positive"])


def test_local_file_and_chat_template(tiny_tokenizer_dir: Path, sentiment_jsonl: Path, smollm2_dir: Path) -> None:
    dm = InstructionDataModule(dataset=str(sentiment_jsonl), label_options=["positive", "negative"], val_size=10,
                               test_size=0, chat_template=True, control=None)
    dm.tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    dm.setup("fit")
    assert len(dm._splits["train"]) == 290 and dm.control_dataloader() is None
    ex = dm._encoded["train"][0]
    text = dm.tokenizer.decode(ex["input_ids"])
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_end|>")
    labelled = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX]
    assert dm.tokenizer.decode(labelled).strip() in ("positive<|im_end|>", "negative<|im_end|>")


def test_no_tokenizer_is_one_sentence() -> None:
    dm = InstructionDataModule()
    with pytest.raises(ValueError, match="needs a tokenizer: pass tokenizer="):
        dm.setup("fit")
