"""The shared pretrained snapshot (theta_0) of a model.

Many fine-tuning methods compare the current weights with the pretrained
ones.  :class:`PretrainedSnapshot` keeps one snapshot per model object in a
weak registry, so every callback that asks for it gets the same object and
the pretrained weights are never held twice.  In disk mode the snapshot keeps
nothing in memory and re-reads each tensor from the safetensors file(s) the
model was loaded from; tensors that are not in the file, or differ from it at
capture time, are copied to CPU memory instead.  Which file holds which tensor is
resolved by :func:`lightning_ft.core.weights.safetensors_index`, the one resolution of a
folder, a single file or a sharded index.
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open

from lightning_ft.core.layer_map import LayerMap, ParamInfo, is_quantized_param, plain_name
from lightning_ft.core.shards import local, shard_info
from lightning_ft.core.weights import INDEX_FILE, SINGLE_FILE, safetensors_index

Storage = Literal["auto", "disk", "memory"]


@dataclass(frozen=True)
class _DiskRef:
    """Where a tensor of theta_0 lives on disk."""

    file: str
    key: str
    dtype: torch.dtype


def _candidate_sources(model: torch.nn.Module) -> list[str]:
    """Paths the model may have been loaded from, most specific first."""
    models = [model]
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        models.append(get_base())
    found = []
    for item in models:
        config = getattr(item, "config", None)
        for value in (getattr(config, "_name_or_path", None), getattr(item, "name_or_path", None)):
            if isinstance(value, (str, os.PathLike)) and str(value) and str(value) not in found:
                found.append(str(value))
    return found


def _resolve_index(
    model: torch.nn.Module, source: str | os.PathLike[str] | None
) -> tuple[str, dict[str, str]] | None:
    """Return ``(path, key -> file map)`` of ``source`` or of the model's own folder."""
    candidates = [os.fspath(source)] if source is not None else _candidate_sources(model)
    for candidate in candidates:
        index = safetensors_index(Path(candidate).expanduser())
        if index is not None:
            return candidate, index
    return None


def _cpu_copy(param: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy of ``param`` with the same dtype."""
    return param.detach().to("cpu", copy=True)


def _file_matches(stored: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether a tensor read from disk equals the live parameter exactly."""
    if stored.shape != param.shape:
        return False
    return torch.equal(stored.to(device=param.device, dtype=param.dtype), param.detach())


class _FileHandles:
    """Lazily opened ``safe_open`` handles, one per file."""

    def __init__(self) -> None:
        self._handles: dict[str, Any] = {}
        self._lock = threading.Lock()

    def read(self, file: str, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor) from ``file``; with ``rows = (start, count)`` only those rows."""
        with self._lock:
            handle = self._handles.get(file)
            if handle is None:
                handle = safe_open(file, framework="pt")
                self._handles[file] = handle
        if rows is None:
            return handle.get_tensor(key)
        return handle.get_slice(key)[rows[0] : rows[0] + rows[1]]

    def close(self) -> None:
        """Drop every open handle."""
        with self._lock:
            self._handles.clear()


class PretrainedSnapshot:
    """theta_0 of one model, shared by every callback through :meth:`of`.

    Attributes:
        storage: ``"disk"`` or ``"memory"`` (``"auto"`` is resolved at capture).
        names: Canonical parameter names (tied weights listed once).
        layer_map: The model's :class:`LayerMap`.
        source: The folder or file theta_0 is read from in disk mode, else ``None``.
    """

    _registry: weakref.WeakKeyDictionary[torch.nn.Module, PretrainedSnapshot] = weakref.WeakKeyDictionary()
    _registry_lock = threading.Lock()

    def __init__(self, layer_map: LayerMap, found: tuple[str, dict[str, str]] | None = None) -> None:
        """Create an empty snapshot; use :meth:`of` to capture one.

        Args:
            layer_map: The model's layer map.
            found: ``(source path, safetensors key -> file map)`` for disk
                mode, ``None`` for memory mode.
        """
        self.layer_map = layer_map
        self.storage = "disk" if found is not None else "memory"
        self.source: str | None = found[0] if found is not None else None
        self._index: dict[str, str] = found[1] if found is not None else {}
        self.names: list[str] = [info.name for info in layer_map]
        self._memory: dict[str, torch.Tensor] = {}
        self._memory_rows: dict[str, tuple[int, int] | None] = {}  # the rows a copy of a shard holds (FSDP2)
        self._disk: dict[str, _DiskRef] = {}
        self._files = _FileHandles()

    @classmethod
    def of(
        cls,
        model: torch.nn.Module,
        *,
        source: str | os.PathLike[str] | None = None,
        storage: Storage = "auto",
    ) -> PretrainedSnapshot:
        """Return the shared snapshot of ``model``, capturing it now if none exists.

        Call it before training changes the weights (e.g. in ``setup()``).
        When a snapshot already exists it is returned as is, whatever
        ``source`` and ``storage`` say.

        Args:
            model: The model (the transformers / peft model itself).
            source: Folder or file with the safetensors the model was loaded
                from; defaults to the model's ``name_or_path`` when local.
            storage: ``"disk"`` re-reads tensors from ``source`` lazily,
                ``"memory"`` keeps a CPU copy of everything, ``"auto"`` picks
                disk when a source is found.

        Returns:
            The snapshot.

        Raises:
            ValueError: If ``storage="disk"`` and no safetensors source is found.
        """
        with cls._registry_lock:
            existing = cls._registry.get(model)
            if existing is None:
                existing = cls._capture(model, source, storage)
                cls._registry[model] = existing
            elif storage != "auto" and storage != existing.storage:
                warnings.warn(
                    f"Reusing the existing {existing.storage!r} snapshot; storage={storage!r} was ignored.",
                    stacklevel=2,
                )
        return existing

    @classmethod
    def release(cls, model: torch.nn.Module) -> None:
        """Drop the shared snapshot of ``model`` (no-op when there is none)."""
        with cls._registry_lock:
            snapshot = cls._registry.pop(model, None)
        if snapshot is not None:
            snapshot._files.close()

    @classmethod
    def _capture(
        cls, model: torch.nn.Module, source: str | os.PathLike[str] | None, storage: Storage
    ) -> PretrainedSnapshot:
        """Build a new snapshot of ``model``'s current weights."""
        if storage not in ("auto", "disk", "memory"):
            raise ValueError(f"storage must be 'auto', 'disk' or 'memory', got {storage!r}.")
        found = _resolve_index(model, source) if storage != "memory" else None
        if storage == "disk" and found is None:
            raise ValueError(
                "storage='disk' needs `source=` to name a local folder (or file) holding "
                f"{SINGLE_FILE} or {INDEX_FILE}, and none was found."
            )
        snapshot = cls(LayerMap.from_model(model), found)
        params = snapshot.layer_map.parameters(model)
        with torch.no_grad():
            for info in snapshot.layer_map:
                snapshot._capture_one(info, params[info.name])
        snapshot._files.close()  # the comparison read every tensor: its pages need not stay resident; reads reopen
        return snapshot

    @classmethod
    def capture(cls, model: torch.nn.Module) -> PretrainedSnapshot:
        """A new snapshot of ``model``'s weights now, not shared through :meth:`of`.

        For a method whose reference is the weights at the start of each ``fit`` rather than at loading:
        tensors still equal to the file the model was loaded from are re-read from it, the others (e.g.
        trained by an earlier fit in the same process) are copied to CPU memory.

        Args:
            model: The model (the transformers / peft model itself).

        Returns:
            The snapshot.
        """
        return cls._capture(model, None, "auto")

    @classmethod
    def from_folder(
        cls, model: torch.nn.Module, source: str | os.PathLike[str], names: Iterable[str]
    ) -> PretrainedSnapshot:
        """A snapshot whose theta_0 is another model's weights (e.g. the base of a chat model), read lazily.

        Each of ``names`` maps to the safetensors key of its base name (or of a tied alias) in ``source``;
        nothing is read until :meth:`get` / :meth:`restore`, which cast to the live parameter's dtype.
        The result is not shared through :meth:`of`.

        Args:
            model: The model whose parameters the snapshot stands for.
            source: A folder holding ``model.safetensors`` or a sharded index, or such a file.
            names: Canonical names (or aliases) the snapshot must provide.

        Returns:
            The snapshot, in disk mode, holding exactly ``names``.

        Raises:
            ValueError: If ``source`` holds no safetensors, or lacks one of ``names``, or holds it with
                another shape than the model's (the message names the first such tensor).
        """
        index = safetensors_index(Path(source).expanduser())
        if index is None:
            raise ValueError(f"{os.fspath(source)} holds no {SINGLE_FILE} or {INDEX_FILE}")
        snapshot = cls(LayerMap.from_model(model), (os.fspath(source), index))
        params = snapshot.layer_map.parameters(model)
        chosen = [snapshot.layer_map.canonical(n) for n in names]
        shapes: dict[str, tuple[int, ...]] = {}
        for file in sorted(set(index.values())):
            with safe_open(file, framework="pt") as handle:
                shapes.update({k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()})
        for name in chosen:
            info, param = snapshot.layer_map[name], params[name]
            key = next((k for k in [info.base_name, *map(plain_name, info.aliases)] if k in index), None)
            if key is None:
                raise ValueError(f"{os.fspath(source)} has no tensor {info.base_name!r}")
            shape = shapes[key]
            if shape != tuple(param.shape):
                raise ValueError(
                    f"{key!r} has shape {shape} in {os.fspath(source)} but {tuple(param.shape)} in the model"
                )
            snapshot._disk[name] = _DiskRef(index[key], key, param.dtype)
        snapshot.names = chosen
        return snapshot

    def _capture_one(self, info: ParamInfo, param: torch.Tensor) -> None:
        """Reference ``param`` on disk when the file matches it, else copy it (this rank's rows of a shard)."""
        ref = self._find_on_disk(info, param)
        if ref is not None:
            self._disk[info.name] = ref
        else:
            self._memory[info.name] = _cpu_copy(local(param))
            self._memory_rows[info.name] = shard_info(param)

    def _find_on_disk(self, info: ParamInfo, param: torch.Tensor) -> _DiskRef | None:
        """Return the file tensor equal to ``param``, or ``None``."""
        if not self._index or info.adapter is not None or is_quantized_param(param):
            return None
        for key in [info.base_name, *map(plain_name, info.aliases)]:
            file = self._index.get(key)
            if file is None:
                continue
            if _file_matches(self._files.read(file, key, shard_info(param)), local(param)):
                return _DiskRef(file, key, param.dtype)
        return None

    @property
    def memory_bytes(self) -> int:
        """Bytes held in memory by this snapshot (0 in pure disk mode)."""
        return sum(t.numel() * t.element_size() for t in self._memory.values())

    @property
    def memory_names(self) -> list[str]:
        """Canonical names whose theta_0 is held in memory."""
        return list(self._memory)

    def get(
        self,
        name: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Return a fresh tensor holding theta_0 of one parameter.

        Args:
            name: Canonical parameter name or an alias.
            device: Target device (CPU by default).
            dtype: Target dtype (the parameter's dtype at capture by default).
            rows: ``(start, count)``: only these rows of dim 0 (a shard's, read alone from disk).

        Returns:
            A new tensor, never shared with the snapshot.

        Raises:
            KeyError: If ``name`` was not a parameter at capture time.
        """
        canonical = self.layer_map.canonical(name)
        if canonical in self._memory:
            held = self._memory_rows.get(canonical)
            if held is not None and rows != held:
                raise ValueError(f"theta_0 of {canonical} was captured from a shard (rows {held}), not {rows}.")
            tensor = self._memory[canonical]
            if rows is not None and held is None:
                tensor = tensor[rows[0] : rows[0] + rows[1]]
            return tensor.to(device=device, dtype=dtype, copy=True)
        ref = self._disk[canonical]
        tensor = self._files.read(ref.file, ref.key, rows)
        return tensor.to(device=device, dtype=dtype or ref.dtype)

    def get_local(self, name: str, param: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """theta_0 of this process's part of ``param``: all of it, or the rows of its shard when ``param`` is a
        row-sharded ``DTensor`` (FSDP2), read from disk without reading the rest; on ``param``'s device, in
        ``dtype`` (default: ``param``'s)."""
        held = local(param)
        return self.get(name, device=held.device, dtype=dtype or held.dtype, rows=shard_info(param))

    def delta(self, model: torch.nn.Module, name: str) -> torch.Tensor:
        """Return the live parameter minus theta_0, on the parameter's device.

        Args:
            model: The snapshotted model.
            name: Canonical parameter name or an alias.

        Returns:
            A new tensor with the live parameter's dtype and device (this process's rows of a sharded one).
        """
        live = model.get_parameter(self.layer_map.canonical(name))
        return local(live.detach()) - self.get_local(name, live)

    def restore(self, model: torch.nn.Module, names: Iterable[str] | None = None) -> None:
        """Copy theta_0 back into the live parameters, in place.

        Args:
            model: The snapshotted model.
            names: Parameters to restore (canonical names or aliases); all by default.
        """
        chosen = self.names if names is None else [self.layer_map.canonical(n) for n in names]
        with torch.no_grad():
            for name in chosen:
                live = model.get_parameter(name)
                local(live).copy_(self.get_local(name, live))

    def __repr__(self) -> str:
        return (
            f"PretrainedSnapshot(storage={self.storage!r}, params={len(self.names)}, "
            f"in_memory={len(self._memory)}, memory_bytes={self.memory_bytes})"
        )
