"""Reading local data files: every format gives the same records, and every malformed file is one sentence naming
the file and the line."""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

import pytest

from lightning_ft.data.files import load_records, read_records
from lightning_ft.errors import UserError

RECORDS = [{"text": "a fine, warm film", "label": "positive"}, {"text": 'a "dull"\nfilm', "label": "negative"}]


def _csv(delimiter: str) -> str:
    def field(value: str) -> str:
        return '"' + value.replace('"', '""') + '"' if any(c in value for c in f'{delimiter}"\n') else value

    return "text" + delimiter + "label\n" + "".join(delimiter.join(field(r[k]) for k in ("text", "label")) + "\n"
                                                   for r in RECORDS)  # fmt: skip


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv", "d.tsv", "d.jsonl.gz", "d.csv.bz2", "d.parquet", "bom.csv"])
def test_every_format_reads_the_same_records(tmp_path: Path, name: str) -> None:
    text = {".jsonl": "".join(json.dumps(r) + "\n" for r in RECORDS), ".json": json.dumps(RECORDS),
            ".csv": _csv(","), ".tsv": _csv("\t")}  # fmt: skip
    path = tmp_path / name
    kind = [s for s in path.suffixes if s not in (".gz", ".bz2")][-1]
    if kind == ".parquet":
        import pandas as pd

        pd.DataFrame(RECORDS).to_parquet(path)
    else:
        data = (("\ufeff" if name.startswith("bom") else "") + text[kind]).encode("utf-8")
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else bz2.compress(data) if name.endswith(".bz2") else data)
    assert read_records(path) == RECORDS
    shuffled = load_records(str(path), shuffle_seed=1)
    assert sorted(shuffled, key=str) == sorted(RECORDS, key=str)


def _lines(n: int) -> list[str]:
    return [json.dumps({"text": f"review {i}", "label": "positive"}) for i in range(n)]


BAD_FILES = [
    ("line-18.jsonl", "\n".join(_lines(17) + ['{"text": "a fine film!" "label": "positive"}'] + _lines(3)),
     "line 18: not valid JSON (Expecting ',' delimiter at column 25): fix or remove that line."),
    ("crlf.jsonl", "\r\n".join(_lines(2) + ["{oops}"]), "line 3: not valid JSON (Expecting property name enclosed in "
                                                        "double quotes at column 2): fix or remove that line."),
    ("not-object.jsonl", "\n".join(_lines(4) + ["[1, 2]"]),
     'line 5: holds a JSON list, not an object: put one {"field": value, ...} object on each line.'),
    ("bad.json", '[{"text": "a"},\n {"text": }]', "line 2: not valid JSON (Expecting value at column 11)."),
    ("object.json", '{"text": "a"}', "must hold a JSON list of objects, not a JSON object: use a list, or one object "
                                     "per line in a .jsonl file."),
    ("strings.json", '[{"text": "a"}, "b"]', "entry 2 of the list is a JSON string, not an object of fields."),
    ("fields.csv", "text,label\ngood,positive\nbad, worse,negative\n",
     "line 3: 3 fields where the header has 2: quote the fields that hold a ',' or a line break, or fix that row."),
    ("open-quote.csv", 'text,label\n"good,positive\n', "line 2: unexpected end of data: fix that row."),
    ("latin1.csv", "text,label\ncaf\xe9,positive\n".encode("latin-1"),
     "line 2: byte 0xe9 is not UTF-8 text (a binary file, or another encoding?): save the file as UTF-8 text."),
    ("nul.tsv", "text\tlabel\nok\tpositive\nbad\x00\tnegative\n",
     "line 3: holds a NUL byte, so it is not a text file: save it as UTF-8 text."),
    ("notes.txt", "hello", "has the unsupported type '.txt': use .jsonl, .json, .csv, .tsv, .parquet."),
    ("cut.jsonl.gz", gzip.compress(b'{"text": "a"}\n')[:-8], "is not a complete gz file"),
    ("broken.parquet", b"PAR1 not really", "is not a readable parquet file ("),
]  # fmt: skip


@pytest.mark.parametrize(("name", "content", "sentence"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_malformed_file_is_one_sentence_naming_file_and_line(
    tmp_path: Path, name: str, content: str | bytes, sentence: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(UserError) as err:
        load_records(str(path), argument="val_dataset")
    message = str(err.value)
    assert message.startswith(f"val_dataset file {str(path)!r}"), message
    assert sentence in message and "\n" not in message, message


def test_a_missing_file_or_a_folder_names_the_argument(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^control='.*nowhere\.jsonl' is neither a bundled dataset \(chitchat, "):
        load_records(str(tmp_path / "nowhere.jsonl"), argument="control")
    with pytest.raises(UserError, match=r"^dataset='.*' is a folder: pass the path of a \.jsonl/\.json/\.csv/\.tsv/"):
        load_records(str(tmp_path))


def test_a_record_without_the_label_field_names_the_argument(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    from lightning_ft.data import ClassificationDataModule

    rows = [{"text": f"review {i}", "label": "positive"} for i in range(6)] + [{"text": "no label"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ClassificationDataModule(dataset=str(tmp_path / "d.jsonl"), val_size=2, test_size=0, control=None,
                                    tokenizer=str(tiny_tokenizer_dir))  # fmt: skip
    with pytest.raises(UserError) as err:
        data.setup("fit")
    assert str(err.value) == (
        f"a record of {str(tmp_path / 'd.jsonl')!r} has no 'label' field (its fields are ['text']): give every record "
        "a 'label', or set label_field to a field they all have."
    )
