"""Easy-to-hard curriculum (iTool's warm-up): stage order, bucket contents, later epochs, resume and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lightning_ft.data import CurriculumDataModule, CurriculumSampler
from lightning_ft.data.curriculum import difficulty_buckets
from lightning_ft.data.sampling import EpochShuffleSampler
from lightning_ft.modules import CausalLMModule
from helpers import Crash, CrashAt, make_trainer


def test_buckets_rank_by_difficulty_with_near_equal_sizes() -> None:
    scores = [5.0, 1.0, 3.0, 3.0, 9.0, 0.0, 7.0]
    buckets = difficulty_buckets(scores, 3)
    assert [b.tolist() for b in buckets] == [[5, 1, 2], [3, 0], [6, 4]]  # ties (indices 2, 3) keep their order


@pytest.mark.parametrize("seed", [0, 7])
def test_sequential_epoch_holds_every_example_once_easiest_bucket_first(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=50).tolist()
    sampler = CurriculumSampler(scores, stages=4, mode="sequential", seed=seed)
    order = list(sampler)
    assert sorted(order) == list(range(50)) and len(sampler) == 50
    ranks = np.argsort(np.argsort(scores, kind="stable"), kind="stable")
    stage_of = np.searchsorted([13, 26, 38], ranks, side="right")  # array_split of 50 into 4: 13, 13, 12, 12
    assert [int(stage_of[i]) for i in order] == sorted(int(stage_of[i]) for i in order)
    for part in sampler.stage_slices():  # within a stage the order is shuffled, not sorted
        assert len(set(stage_of[order[part]].tolist())) == 1


def test_cumulative_stages_draw_only_from_easier_or_equal_buckets() -> None:
    scores = list(range(60))
    sampler = CurriculumSampler(scores, stages=3, mode="cumulative", seed=3)
    order = sampler.order(0)
    assert len(order) == 60
    for k, part in enumerate(sampler.stage_slices()):
        chosen = order[part]
        assert len(chosen) == 20 and len(set(chosen)) == 20 and max(chosen) < 20 * (k + 1)
    assert max(order[:20]) < 20  # the first stage is the easy bucket alone
    assert any(i < 20 for i in order[40:])  # easy examples are revisited in the last stage


def test_later_epochs_are_the_plain_seeded_permutation_and_orders_replay() -> None:
    scores = list(range(30))[::-1]
    sampler = CurriculumSampler(scores, stages=3, curriculum_epochs=2, seed=11)
    assert sampler.order(0) != sampler.order(1)  # each curriculum epoch shuffles within its buckets anew
    assert sampler.order(2) == list(EpochShuffleSampler(30, seed=11, epoch=2))
    assert sampler.order(1) == CurriculumSampler(scores, stages=3, curriculum_epochs=2, seed=11, epoch=1).order(1)
    assert list(CurriculumSampler(scores, stages=1, curriculum_epochs=0, seed=4)) == list(EpochShuffleSampler(30, 4))


def _records(path: Path, n: int = 24) -> Path:
    """Reviews with a ``hardness`` column: the record's position reversed, so the easiest records come last."""
    from lightning_ft.assets import load_dataset_records

    rows = load_dataset_records("rotten_tomatoes")[:n]
    with path.open("w") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({"text": row["text"], "label": row["label"], "hardness": n - i}) + "\n")
    return path


def _data(source: Path, tokenizer: object, **kwargs: object) -> CurriculumDataModule:
    opts: dict[str, object] = dict(dataset=str(source), difficulty="hardness", stages=3, label_options=["positive", "negative"],
                                   val_size=0, test_size=0, control_size=0, batch_size=4, max_length=48, split_seed=0)  # fmt: skip
    opts.update(kwargs)
    data = CurriculumDataModule(**opts)
    data.tokenizer = tokenizer
    data.setup("fit")
    return data


def test_datamodule_trains_easy_bucket_first_by_a_column_or_by_length(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    data = _data(_records(tmp_path / "r.jsonl"), tokenizer)
    hardness = [r["hardness"] for r in data._splits["train"]]
    seen = [hardness[i] for i in data.train_dataloader().sampler]
    assert sorted(seen[:8]) == sorted(hardness)[:8] and sorted(seen[16:]) == sorted(hardness)[16:]
    by_length = _data(tmp_path / "r.jsonl", tokenizer, difficulty="tokens")
    lengths = [len(e["input_ids"]) for e in by_length._encoded["train"]]
    first = [lengths[i] for i in list(by_length.train_dataloader().sampler)[:8]]
    assert max(first) <= sorted(lengths)[7]
    by_response = _data(tmp_path / "r.jsonl", tokenizer, difficulty="response_tokens")
    expected = [len(tokenizer(f" {r['label']}", add_special_tokens=False)["input_ids"]) for r in by_response._splits["train"]]
    assert by_response.difficulties() == [float(n) for n in expected]


def test_bad_settings_are_refused_in_one_sentence(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    source = _records(tmp_path / "r.jsonl")
    with pytest.raises(ValueError, match=r"difficulty='rating' is not a column of training record 0 .* name a numeric"):
        _data(source, tokenizer, difficulty="rating")
    with pytest.raises(ValueError, match=r"difficulty='text' of training record 0 is .* not a finite number"):
        _data(source, tokenizer, difficulty="text")
    with pytest.raises(ValueError, match=r"stages=40 must be between 1 and the number of training examples \(24\)"):
        _data(source, tokenizer, stages=40).train_dataloader()
    with pytest.raises(ValueError, match=r"mode='random' is not a curriculum mode; use one of sequential, cumulative"):
        CurriculumDataModule(mode="random")
    with pytest.raises(ValueError, match=r"stages=0 must be at least 1"):
        CurriculumDataModule(stages=0)


@pytest.mark.parametrize("crash", [4, 6], ids=["mid-epoch", "epoch-end"])
def test_resumed_run_equals_uninterrupted(tiny_llama_dir: Path, tmp_path: Path, crash: int) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    source = _records(tmp_path / "r.jsonl")

    def run(root: Path, ckpt: str | None = None, crash: int | None = None) -> CausalLMModule:
        L.seed_everything(0)
        module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=5e-3, warmup_steps=2, output_dir="")
        callbacks: list[L.Callback] = [ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1)]
        if crash is not None:
            callbacks.append(CrashAt(crash))
        data = CurriculumDataModule(dataset=str(source), difficulty="hardness", stages=3, mode="cumulative",
                                    label_options=["positive", "negative"], val_size=0, test_size=0, control_size=0,
                                    batch_size=4, max_length=48, split_seed=0, curriculum_epochs=1)  # fmt: skip
        trainer = make_trainer(root, 9, enable_checkpointing=True, callbacks=callbacks)
        trainer.fit(module, data, ckpt_path=ckpt)  # 6 batches per epoch: crosses from the curriculum to plain epochs
        return module

    full = run(tmp_path / "a")
    with pytest.raises(Crash):
        run(tmp_path / "b", crash=crash)
    resumed = run(tmp_path / "c", ckpt=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
