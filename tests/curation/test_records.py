"""The pool reader and the dataset writer of the data commands: one-sentence refusals, atomic JSONL and report that
the instruction DataModule reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lightning_ft.assets import load_dataset_records
from lightning_ft.curation.records import read_pool, report_path, write_dataset
from lightning_ft.data import InstructionDataModule
from lightning_ft.errors import UserError


def test_missing_column_names_the_column_the_option_and_the_columns_there() -> None:
    with pytest.raises(UserError) as err:
        read_pool("rotten_tomatoes", fields=("prompt",), options={"prompt": "--prompt-field"})
    assert str(err.value) == (
        "--data rotten_tomatoes has no column 'prompt' (its columns are label, movie, text): pass --prompt-field with "
        "one of them."
    )


def test_a_later_record_without_the_column_or_with_null_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pool.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(UserError, match=r"has no column 'response' \(record 2 has only prompt\): give every record"):
        read_pool(str(path), fields=("prompt", "response"))
    path.write_text('{"prompt": "a", "response": null}\n')
    with pytest.raises(UserError, match=r"record 1 has no value in column 'response': fill it or drop that record"):
        read_pool(str(path), fields=("prompt", "response"))


def test_empty_pool_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(UserError, match=r"^--data .*empty.jsonl holds no records: give a dataset with at least one"):
        read_pool(str(path))


def test_written_dataset_is_read_by_the_instruction_datamodule(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    pool = read_pool("trivia", fields=("prompt", "response"))[:12]
    rows = [{**r, "score": np.float32(0.5), "rank": np.int64(i)} for i, r in enumerate(pool)]  # numpy values too
    report = write_dataset(
        rows, tmp_path / "out" / "kept.jsonl", {"counts": {"kept": 12}, "band": np.array([1.0, 2.0])}
    )
    assert report == tmp_path / "out" / "kept.report.json" == report_path(tmp_path / "out" / "kept.jsonl")
    assert json.loads(report.read_text()) == {"counts": {"kept": 12}, "band": [1.0, 2.0]}
    data = InstructionDataModule(dataset=str(tmp_path / "out" / "kept.jsonl"), prompt_template="Q: {prompt}\nA:",
                                 response_template=" {response}", val_size=2, test_size=0, control_size=0,
                                 split_seed=0, tokenizer=str(tiny_tokenizer_dir))  # fmt: skip
    data.setup("fit")
    records = data._splits["train"] + data._splits["val"]
    assert len(data._splits["train"]) == 10
    assert sorted(r["prompt"] for r in records) == sorted(r["prompt"] for r in pool)
    assert {r["score"] for r in records} == {0.5}


def test_a_failed_write_leaves_the_previous_output_whole(tmp_path: Path) -> None:
    out = tmp_path / "kept.jsonl"
    write_dataset([{"text": "old"}], out, {"n": 1})
    before = out.read_bytes(), report_path(out).read_bytes()
    with pytest.raises(TypeError):
        write_dataset([{"text": "new"}, {"text": object()}], out, {"n": 2})  # the second record cannot be written
    assert (out.read_bytes(), report_path(out).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.jsonl", "kept.report.json"]  # no temporary left
    with pytest.raises(UserError, match="the result holds no records, so nothing was written"):
        write_dataset([], out, {})


def test_bundled_pool_is_the_bundled_dataset() -> None:
    assert read_pool("trivia") == load_dataset_records("trivia")
