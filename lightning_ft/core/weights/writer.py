"""Writing weights: an HF-loadable model folder, streamed tensor by tensor through the one atomic writer.

:func:`stream_hf_folder` opens the output (through :func:`lightning_ft.core.io.atomic_dir`), copies the base's
config and tokenizer files and yields an :class:`HFFolderWriter`. The writer is given the layout of the whole
model up front (name, dtype and shape of every tensor, all known before any is computed), so each safetensors
header is written first and each tensor's bytes go straight to their offset the moment it is written: nothing is
collected in memory. Up to ``max_shard_size`` bytes of tensors the folder holds one ``model.safetensors``; above,
HF shards ``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json``. A folder that was not given
every tensor of its layout is never put in place. :func:`save_hf_folder` writes a state dict through it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_ft.core.io import atomic_dir, check_output
from lightning_ft.core.weights.reader import _DTYPES, INDEX_FILE, SINGLE_FILE, resolve_path

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "HFFolderWriter", "TensorSpec", "save_hf_folder", "stream_hf_folder"]

DEFAULT_MAX_SHARD_SIZE = 5_000_000_000
"""Bytes of tensors per shard (transformers' ``save_pretrained`` default, ``"5GB"``)."""

_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of an output layout.

    Attributes:
        key: Its name.
        dtype: Its dtype.
        shape: Its shape.
    """

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of its data."""
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _shards(layout: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Split the layout, in its order, into shards of at most ``max_shard_size`` bytes (a bigger tensor alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in layout:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(shard: Sequence[TensorSpec]) -> tuple[bytes, dict[str, int]]:
    """A safetensors header for ``shard`` (data in its order, padded to 8 bytes) and each tensor's file offset."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in shard:
        if spec.dtype not in _NAMES:
            raise TypeError(f"tensor {spec.key!r} has dtype {spec.dtype}, which safetensors cannot store here.")
        entries[spec.key] = {"dtype": _NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}  # fmt: skip
        offset += spec.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    positions, offset = {}, 0
    for spec in shard:
        positions[spec.key] = start + offset
        offset += spec.nbytes
    return len(text).to_bytes(8, "little") + text, positions


def _pwrite(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _create_shard(header: bytes, path: Path, size: int) -> int:
    """Create one weight file of ``size`` bytes holding ``header``; returns its open descriptor for the tensors."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        _pwrite(fd, memoryview(header), 0)
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


class HFFolderWriter:
    """Writes the tensors of a planned layout into safetensors files as they come, in any order.

    Attributes:
        folder: The (temporary) folder written into.
        files: Tensor name -> the file name holding it.
    """

    def __init__(self, folder: Path, layout: Sequence[TensorSpec], max_shard_size: int = DEFAULT_MAX_SHARD_SIZE):
        """Create the weight files of ``layout`` in ``folder`` and write their headers.

        Args:
            folder: An empty folder (from :func:`stream_hf_folder`).
            layout: Every tensor the folder will hold, in file order.
            max_shard_size: Bytes of tensors above which the folder is sharded.

        Raises:
            ValueError: If ``max_shard_size`` is not positive or a name appears twice.
        """
        if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size < 1:
            raise ValueError(f"max_shard_size={max_shard_size!r} must be a positive number of bytes.")
        if len({spec.key for spec in layout}) != len(layout):
            raise ValueError("The output layout names a tensor twice: give each tensor once.")
        self.folder, self._specs = folder, {spec.key: spec for spec in layout}
        shards = _shards(layout, max_shard_size)
        names = [SINGLE_FILE] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]  # fmt: skip
        self.files: dict[str, str] = {}
        self._at: dict[str, tuple[int, int]] = {}
        self._fds: list[int] = []
        self._written: set[str] = set()
        for name, shard in zip(names, shards):
            header, positions = _header(shard)
            fd = _create_shard(header, folder / name, len(header) + sum(spec.nbytes for spec in shard))
            self._fds.append(fd)
            for spec in shard:
                self.files[spec.key], self._at[spec.key] = name, (fd, positions[spec.key])
        self._sharded = len(shards) > 1

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write one tensor of the layout at its place (the caller may drop it right after).

        Raises:
            ValueError: If ``key`` is not in the layout, was written already, or ``tensor`` has another dtype or shape.
        """
        spec = self._specs.get(key)
        if spec is None or key in self._written:
            why = "is not in the output layout" if spec is None else "was written already"
            raise ValueError(f"tensor {key!r} {why}: write each tensor of the layout once.")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"tensor {key!r} is {tensor.dtype} {tuple(tensor.shape)} but the layout planned "
                             f"{spec.dtype} {spec.shape}.")  # fmt: skip
        if tensor.numel():
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            fd, offset = self._at[key]
            _pwrite(fd, data.data.cast("B"), offset)
        self._written.add(key)

    def write_text(self, name: str, text: str) -> None:
        """Write one more text file into the folder (a report, a config)."""
        (self.folder / name).write_text(text)

    def finish(self) -> None:
        """Close the weight files and write the shard index; refuse a layout not written whole.

        Raises:
            ValueError: Naming the first tensor of the layout that was never written.
        """
        self.close()
        missing = next((key for key in self._specs if key not in self._written), None)
        if missing is not None:
            raise ValueError(f"tensor {missing!r} of the output layout was never written, so the folder is incomplete.")
        if self._sharded:
            total = sum(spec.nbytes for spec in self._specs.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.files.items()))}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def close(self) -> None:
        """Close the weight files (idempotent)."""
        while self._fds:
            os.close(self._fds.pop())


@contextlib.contextmanager
def stream_hf_folder(
    base: str | os.PathLike[str],
    output: str | os.PathLike[str],
    layout: Sequence[TensorSpec],
    *,
    dtype: torch.dtype | None = None,
    inputs: Sequence[str | os.PathLike[str]] = (),
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> Iterator[HFFolderWriter]:
    """Open an HF model folder to stream ``layout``'s tensors into; it appears at ``output`` whole, or not at all.

    The folder is written through :func:`lightning_ft.core.io.atomic_dir`: when the block raises, or does not
    write every tensor of ``layout``, a previous ``output`` is left byte-identical. An ``output`` that is, holds or
    sits inside the base or one of ``inputs`` is refused, and so is an existing non-empty one unless ``overwrite``.

    Args:
        base: The base model (folder or bundled alias) whose config and tokenizer files are copied (weight files
            are not).
        output: The folder to write.
        layout: Every tensor the folder will hold, in file order.
        dtype: The output dtype (when it was set), written into ``config.json``.
        inputs: The other inputs the output must not touch.
        overwrite: Replace an existing non-empty ``output``.
        max_shard_size: Bytes of tensors above which the weights are sharded (HF's index and shard names).

    Yields:
        The writer: :meth:`HFFolderWriter.write` each tensor of ``layout``, once, in any order.
    """
    src = resolve_path(base)
    check_output(output, [("base", src), *(("input", p) for p in inputs)], kind="folder", overwrite=overwrite,
                 argument="output", overwrite_flag="overwrite=True")  # fmt: skip
    with atomic_dir(output) as out:
        if src.is_dir():
            for item in src.iterdir():
                if item.is_file() and not item.name.endswith(_WEIGHT_FILES) and not item.name.endswith(".index.json"):
                    shutil.copy2(item, out / item.name)
        if dtype is not None and (out / "config.json").is_file():
            config = json.loads((out / "config.json").read_text())
            name = str(dtype).removeprefix("torch.")
            config.update({"dtype": name}, **({"torch_dtype": name} if "torch_dtype" in config else {}))
            (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        writer = HFFolderWriter(out, layout, max_shard_size)
        try:
            yield writer
            writer.finish()
        finally:
            writer.close()


def save_hf_folder(
    state: Mapping[str, torch.Tensor],
    base: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    extra_files: Mapping[str, str] | None = None,
    inputs: Sequence[str | os.PathLike[str]] = (),
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write ``state`` as ``model.safetensors`` (sharded above ``max_shard_size``) next to the base's config files.

    The folder is written whole or not at all (:func:`stream_hf_folder`): a failed write leaves a previous
    ``output`` byte-identical. An ``output`` that is, holds or sits inside the base or one of ``inputs`` is
    refused, and so is an existing non-empty one unless ``overwrite``.

    Args:
        state: The tensors to save.
        base: The base model (folder or bundled alias) whose config and tokenizer files are copied (weight files
            are not).
        output: The folder to write.
        dtype: The output dtype (when it was set), written into ``config.json``.
        extra_files: More text files to write into the folder (name -> text).
        inputs: The other inputs the output must not touch.
        overwrite: Replace an existing non-empty ``output``.
        max_shard_size: Bytes of tensors above which the weights are sharded.

    Returns:
        The output folder.
    """
    layout = [TensorSpec(key, value.dtype, tuple(value.shape)) for key, value in state.items()]
    with stream_hf_folder(base, output, layout, dtype=dtype, inputs=inputs, overwrite=overwrite,
                          max_shard_size=max_shard_size) as writer:  # fmt: skip
        for key, value in state.items():
            writer.write(key, value)
        for name, text in (extra_files or {}).items():
            writer.write_text(name, text)
    return Path(output)
