"""The records of a dataset: a bundled dataset by name, or a local JSONL / JSON / CSV / TSV / parquet file.

A mistake in a file is answered with one sentence naming the file and the line, e.g. ``dataset file
'train.jsonl', line 18: not valid JSON (Expecting ',' delimiter at column 25): fix or remove that line.``
Files may be ``.gz`` or ``.bz2`` compressed; text must be UTF-8 (a byte-order mark is allowed).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_ft.assets import BUNDLED_DATASETS, load_dataset_records
from lightning_ft.errors import UserError

__all__ = ["DATA_FILE_TYPES", "load_records", "read_records", "record_field"]

Record = dict[str, Any]
DATA_FILE_TYPES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
_JSON_KINDS = {list: "list", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def load_records(source: str, *, argument: str = "dataset", shuffle_seed: int | None = None) -> list[Record]:
    """Load a bundled dataset or a local data file as a list of dicts.

    Args:
        source: A bundled name (``rotten_tomatoes``, ``chitchat``, ...) or the path of a data file.
        argument: The argument that named ``source`` (``dataset``, ``val_dataset``, ``control``), for the errors.
        shuffle_seed: If given, the records are shuffled with this seed (deterministically).

    Raises:
        UserError: An unknown name, a folder, an unsupported file type or a malformed file (naming the line).
    """
    if source in BUNDLED_DATASETS:
        return load_dataset_records(source, shuffle_seed=shuffle_seed)
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(
            f"{argument}={source!r} is neither a bundled dataset ({', '.join(sorted(BUNDLED_DATASETS))}) nor an "
            f"existing file: pass one of those names or the path of a {'/'.join(DATA_FILE_TYPES)} file."
        )
    if path.is_dir():
        raise UserError(f"{argument}={source!r} is a folder: pass the path of a {'/'.join(DATA_FILE_TYPES)} file in it.")
    records = read_records(path, argument)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(records)
    return records


def record_field(record: Mapping[str, Any], name: str, argument: str, source: str) -> Any:
    """``record[name]``, or one sentence naming the argument when a record of ``source`` lacks the field."""
    if name not in record:
        raise UserError(
            f"a record of {source!r} has no {name!r} field (its fields are {sorted(record)}): give every record a "
            f"{name!r}, or set {argument} to a field they all have."
        )
    return record[name]


def read_records(path: Path, argument: str = "dataset") -> list[Record]:
    """The records of one data file, in file order (see :func:`load_records`)."""
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2")]
    kind = suffixes[-1].lower() if suffixes else ""
    where = f"{argument} file {str(path)!r}"
    if kind not in DATA_FILE_TYPES:
        raise UserError(f"{where} has the unsupported type {kind or 'none'!r}: use {', '.join(DATA_FILE_TYPES)}.")
    if kind == ".parquet":
        return _read_parquet(path, where)
    text = _decode(_read_bytes(path, where), where)
    if kind == ".jsonl":
        return _read_jsonl(text, where)
    if kind == ".json":
        return _read_json(text, where)
    return _read_csv(text, where, "\t" if kind == ".tsv" else ",")


def _read_bytes(path: Path, where: str) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else bz2.open if path.suffix == ".bz2" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, ValueError) as err:  # BadGzipFile is an OSError; a truncated stream an EOFError
        if path.suffix in (".gz", ".bz2"):
            raise UserError(f"{where} is not a complete {path.suffix[1:]} file ({err}): compress it again.") from None
        raise


def _line_of(raw: bytes | str, offset: int) -> int:
    return raw.count(b"\n" if isinstance(raw, bytes) else "\n", 0, offset) + 1


def _decode(raw: bytes, where: str) -> str:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{where}, line {_line_of(raw, err.start)}: byte 0x{raw[err.start]:02x} is not UTF-8 text (a binary file, "
            "or another encoding?): save the file as UTF-8 text."
        ) from None
    nul = text.find("\x00")
    if nul >= 0:
        raise UserError(f"{where}, line {_line_of(text, nul)}: holds a NUL byte, so it is not a text file: save it as UTF-8 text.")
    return text


def _kind(value: Any) -> str:
    return _JSON_KINDS.get(type(value), type(value).__name__)


def _read_jsonl(text: str, where: str) -> list[Record]:
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{where}, line {number}: not valid JSON ({err.msg} at column {err.colno}): fix or remove that line."
            ) from None
        if not isinstance(value, dict):
            raise UserError(
                f"{where}, line {number}: holds a JSON {_kind(value)}, not an object: put one "
                '{"field": value, ...} object on each line.'
            )
        records.append(value)
    return records


def _read_json(text: str, where: str) -> list[Record]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}, line {err.lineno}: not valid JSON ({err.msg} at column {err.colno}).") from None
    if not isinstance(data, list):
        raise UserError(f"{where} must hold a JSON list of objects, not a JSON {_kind(data) if not isinstance(data, dict) else 'object'}: "
                        "use a list, or one object per line in a .jsonl file.")  # fmt: skip
    for number, value in enumerate(data, start=1):
        if not isinstance(value, dict):
            raise UserError(f"{where}: entry {number} of the list is a JSON {_kind(value)}, not an object of fields.")
    return data


def _read_csv(text: str, where: str, delimiter: str) -> list[Record]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    records: list[Record] = []
    try:
        header = next(reader, None)
        if header is None:
            return []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise UserError(
                    f"{where}, line {reader.line_num}: {len(row)} field{'s' * (len(row) != 1)} where the header has "
                    f"{len(header)}: quote the fields that hold a {delimiter!r} or a line break, or fix that row."
                )
            records.append(dict(zip(header, row)))
    except csv.Error as err:
        raise UserError(f"{where}, line {reader.line_num}: {err}: fix that row.") from None
    return records


def _read_parquet(path: Path, where: str) -> list[Record]:
    import pandas as pd

    try:
        return pd.read_parquet(path).to_dict(orient="records")
    except Exception as err:  # noqa: BLE001 - pyarrow's many error types all mean "not a readable parquet file"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{where} is not a readable parquet file ({reason}).") from None
