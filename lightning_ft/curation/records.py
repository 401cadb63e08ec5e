"""The input pool and the output dataset of the ``lightning-ft data`` commands.

:func:`read_pool` reads a bundled dataset or a data file (through :func:`lightning_ft.data.files.load_records`, the
one reader of data files) and refuses, in one sentence, an empty pool or a record without a column the command needs.
:func:`write_dataset` writes the result as JSONL, which ``InstructionDataModule(dataset=<path>)`` reads directly, and
the command's report as ``<stem>.report.json`` beside it; both files are written atomically (a temporary sibling,
``fsync``, ``os.replace``), so an interrupted command leaves a previous result whole.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_ft.core.io import atomic_file
from lightning_ft.errors import UserError

__all__ = ["read_pool", "report_path", "to_json", "write_dataset"]

Record = dict[str, Any]


def read_pool(
    source: str,
    *,
    argument: str = "--data",
    fields: Sequence[str] = (),
    options: Mapping[str, str] | None = None,
) -> list[Record]:
    """The records of a bundled dataset or a data file, each holding every column in ``fields``.

    Args:
        source: A bundled dataset name (``rotten_tomatoes``, ``trivia``, ...) or the path of a data file.
        argument: The option that named ``source``, for the sentences.
        fields: The columns every record must hold (a value of ``None`` counts as missing); empty names are skipped.
        options: The option that named each field (``{"text": "--prompt-field"}``), for the sentences.

    Raises:
        UserError: The source is unknown or malformed, holds no records, or a record lacks one of ``fields``.
    """
    from lightning_ft.data.files import load_records  # imported here: lightning_ft.data imports torch and Lightning

    records = load_records(str(source), argument=argument)
    if not records:
        raise UserError(f"{argument} {source} holds no records: give a dataset with at least one record.")
    for name in (f for f in fields if f):
        missing = next((i for i, r in enumerate(records) if r.get(name) is None), None)
        if missing is not None:
            _refuse_missing(records, missing, name, source, argument, (options or {}).get(name))
    return records


def _refuse_missing(
    records: list[Record], index: int, name: str, source: str, argument: str, option: str | None
) -> None:
    record = records[index]
    if name in record:  # the column exists, its value is null
        raise UserError(f"{argument} {source}: record {index + 1} has no value in column {name!r}: fill it or drop "
                        "that record.")  # fmt: skip
    where = "its columns are" if index == 0 else f"record {index + 1} has only"
    fix = f"pass {option} with one of them" if option else f"give every record a {name!r} column"
    raise UserError(
        f"{argument} {source} has no column {name!r} ({where} {', '.join(sorted(record)) or 'none'}): {fix}."
    )


def report_path(path: str | os.PathLike[str]) -> Path:
    """Where :func:`write_dataset` writes the report of ``path``: ``<stem>.report.json`` beside it."""
    out = Path(path)
    return out.with_name(f"{out.stem}.report.json")


def to_json(value: Any) -> Any:
    """``value`` with numpy scalars and arrays, paths and tuples made JSON-safe (NaN and inf become ``None``)."""
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_json(v) for v in value]
    if isinstance(value, os.PathLike):
        return str(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays and scalars, tensors
        return to_json(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_dataset(records: Sequence[Record], path: str | os.PathLike[str], report: Mapping[str, Any]) -> Path:
    """Write ``records`` as JSONL to ``path`` and ``report`` as ``<stem>.report.json`` beside it (both atomically).

    Args:
        records: The output records (JSON-serialisable values; numpy values are converted).
        path: The ``.jsonl`` file; its folder is created.
        report: What the command did (counts, settings, statistics).

    Returns:
        The report's path.

    Raises:
        UserError: ``records`` is empty (an empty file is no dataset).
    """
    out = Path(path).expanduser()
    if not records:
        raise UserError(f"the result holds no records, so nothing was written to {out}: loosen the method's options.")
    with atomic_file(out) as tmp, open(tmp, "w", encoding="utf-8") as file:
        file.writelines(json.dumps(to_json(record), ensure_ascii=False) + "\n" for record in records)
    target = report_path(out)
    with atomic_file(target) as tmp:
        tmp.write_text(json.dumps(to_json(report), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return target


def import_callable(spec: str, option: str, expected: str) -> Any:
    """The object a ``package.module:name`` option names (``--judge``, ``--reward``), imported.

    Raises:
        UserError: ``spec`` is not ``module:name`` (the sentence says it must ``expected``), or cannot be imported.
    """
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise UserError(f"{option} {spec!r} must {expected}.")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise UserError(f"{option} {spec!r} cannot be imported ({err}): check the module path and name.") from None
