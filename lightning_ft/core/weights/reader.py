"""Reading weights: where a model's safetensors are, and a lazy reader of them.

:func:`safetensors_index` is the one resolution of a folder (``model.safetensors`` or the sharded
``model.safetensors.index.json``), a ``.safetensors`` file or an index file into a key -> file map;
:class:`SafetensorsReader` reads through it one tensor at a time, and :func:`resolve_path` turns a path or a
bundled model alias (``smollm2-135m``) into a local path.

A tensor is read with a plain positioned file read of its bytes into a fresh tensor (the header's offsets), not
through a memory map: the pages of a mapped file count in the process's resident set for as long as the map
lives, so a streamed merge over memory-mapped inputs would end up with every input byte resident. Read this way,
only the tensors the caller still holds are resident (the kernel's page cache is not the process's memory).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lightning_ft.assets import is_bundled_model, resolve_model

__all__ = ["INDEX_FILE", "SINGLE_FILE", "SafetensorsReader", "read_header", "resolve_path", "safetensors_index"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_HEADER_LIMIT = 100_000_000  # the safetensors format's own bound on the header


def read_header(file: str | os.PathLike[str]) -> tuple[dict[str, dict[str, Any]], int]:
    """The tensor entries of a safetensors file's header and where its data starts.

    Returns:
        ``(entries, data_start)``: key -> ``{"dtype", "shape", "data_offsets"}`` (offsets relative to
        ``data_start``), and the byte offset of the data area.

    Raises:
        ValueError: If the file is not a safetensors file.
    """
    with open(file, "rb") as handle:
        head = handle.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < size <= _HEADER_LIMIT:
            raise ValueError(f"{file} is not a safetensors file (its header length is invalid).")
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def resolve_path(name: str | os.PathLike[str]) -> Path:
    """A local path, or the folder of a bundled model alias (``smollm2-135m``).

    Raises:
        FileNotFoundError: If ``name`` is neither an existing path nor a bundled alias.
    """
    path = Path(name).expanduser()
    if path.exists():
        return path
    if is_bundled_model(str(name)):
        return Path(resolve_model(str(name)))
    raise FileNotFoundError(f"{name} does not exist: give a folder, a file or a bundled model alias.")


def safetensors_index(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """Map each tensor key to the safetensors file holding it.

    Args:
        path: A folder holding ``model.safetensors`` (preferred) or a sharded ``model.safetensors.index.json``,
            a ``.safetensors`` file, or a ``.safetensors.index.json`` file.

    Returns:
        Key -> file path (in file order), or ``None`` when ``path`` holds no safetensors.
    """
    path = Path(path)
    if path.is_dir():
        single, index = path / SINGLE_FILE, path / INDEX_FILE
        path = single if single.is_file() else index
    if not path.is_file():
        return None
    if path.name.endswith(".index.json"):
        weight_map = json.loads(path.read_text())["weight_map"]
        return {key: str(path.parent / shard) for key, shard in weight_map.items()}
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            return {key: str(path) for key in handle.keys()}
    return None


class SafetensorsReader:
    """Lazy reader of a safetensors file, a sharded index or a folder holding either.

    Attributes:
        path: The path it was given.
        files: Tensor key -> the file holding it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Index ``path`` (no tensor is read).

        Raises:
            FileNotFoundError: If ``path`` holds no safetensors (one sentence naming what to give).
        """
        given = Path(path)
        files = safetensors_index(given)
        if files is None:
            what = (f"a model folder (no {SINGLE_FILE} or {INDEX_FILE} in it)" if given.is_dir()
                    else "a model folder or a .safetensors file")  # fmt: skip
            raise FileNotFoundError(
                f"{given} is not {what}: give a Hugging Face model folder saved with safetensors, or a bundled alias."
            )
        self.path, self.files = given, files
        self._handles: dict[str, Any] = {}
        self._headers: dict[str, tuple[dict[str, dict[str, Any]], int]] = {}

    def _handle(self, key: str) -> Any:
        file = self.files[key]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self.files)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of one tensor without reading it (from the header)."""
        return tuple(self._entry(key)[0]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        """Dtype of one tensor without reading it (from the header)."""
        return _DTYPES[self._entry(key)[0]["dtype"]]

    def _entry(self, key: str) -> tuple[dict[str, Any], int]:
        file = self.files[key]
        if file not in self._headers:
            self._headers[file] = read_header(file)
        header, start = self._headers[file]
        return header[key], start

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (CPU) into memory of its own: a positioned read of its bytes, no memory map kept."""
        entry, start = self._entry(key)
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:  # a dtype without a torch name here: let safetensors decode it
            return self._handle(key).get_tensor(key)
        begin, end = entry["data_offsets"]
        raw = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            with open(self.files[key], "rb", buffering=0) as handle:
                handle.seek(start + begin)
                view, done = raw.numpy().data, 0
                while done < end - begin:
                    count = handle.readinto(view[done:])
                    if not count:
                        raise ValueError(
                            f"{self.files[key]} is truncated: tensor {key!r} ends past the end of the file."
                        )
                    done += count
        return raw.view(dtype).reshape(entry["shape"])
