"""Where task vectors come from: the :class:`TensorSource` interface, the built-in sources (HF folders,
Lightning checkpoints, peft LoRA adapters) and the registry of artifact formats.

Every source is read lazily, one tensor at a time (safetensors handles, memory-mapped checkpoints), and answers
``delta(key, base)``: the fp32 task vector of one base tensor, or ``None`` when it does not touch it.

Artifact formats written by methods above ``core`` (ComPEFT, sparse deltas) plug in with :func:`register_format`
when their module is imported; :func:`open_source` first imports the modules named in :data:`FORMAT_MODULES`
(by name, with :mod:`importlib`, so ``core`` imports nothing above it), then asks every registered format, then
falls back to the built-in sources.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_ft.core.weights.reader import INDEX_FILE, SINGLE_FILE, SafetensorsReader, resolve_path

__all__ = [
    "FORMAT_MODULES",
    "ArtifactFormat",
    "CheckpointSource",
    "HFSource",
    "LoRASource",
    "TensorSource",
    "lora_from_folder",
    "open_source",
    "register_format",
    "registered_formats",
]

FORMAT_MODULES = ("lightning_ft.merging.compeft", "lightning_ft.sparse.artifact")
"""Modules that register an artifact format when imported; :func:`open_source` imports them first."""

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_(?:embedding_)?[AB])\.weight$")
_SAVED_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.modules_to_save\.(?P<leaf>\w+)$")


class TensorSource:
    """One ingredient of a merge: answers task vectors of base tensors.

    Attributes:
        name: The path, for messages and reports.
        kind: ``"hf"``, ``"ckpt"``, ``"lora"`` or the name of an artifact format (``"compeft"``, ``"sparse"``).
        full: Whether it holds every base tensor (full models) or only some (adapters, sparse artifacts).
    """

    name: str = ""
    kind: str = ""
    full: bool = True

    def keys(self) -> list[str]:
        """Base tensor names this source provides."""
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of the task vector of ``key`` (that of the base tensor)."""
        raise NotImplementedError

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor | None:
        """fp32 task vector of ``key`` given the base tensor, or ``None`` when untouched."""
        raise NotImplementedError

    def touches(self, key: str, base: torch.Tensor) -> bool:
        """Whether :meth:`delta` of ``key`` (one of :meth:`keys`) is not ``None``; full models answer without
        reading the tensor."""
        return self.delta(key, base) is not None


class HFSource(TensorSource):
    """A full fine-tuned model saved as an HF folder."""

    kind = "hf"

    def __init__(self, path: Path) -> None:
        self.name, self.reader = str(path), SafetensorsReader(path)

    def keys(self) -> list[str]:
        return self.reader.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.reader.shape(key)

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor | None:
        return self.reader.get(key).float() - base.float()

    def touches(self, key: str, base: torch.Tensor) -> bool:
        return True


class CheckpointSource(TensorSource):
    """A Lightning checkpoint (memory-mapped) of a module holding the model under some prefix."""

    kind = "ckpt"

    def __init__(self, path: Path, base_keys: Sequence[str]) -> None:
        self.name = str(path)
        loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
        if not isinstance(state, dict) or not state:
            raise ValueError(f"{path} holds no state_dict: give a Lightning checkpoint of a full fine-tune.")
        if any(".lora_" in k for k in state):
            raise ValueError(
                f"{path} is a LoRA run's checkpoint (adapter tensors only): merge the adapter folder the run saved."
            )
        self.state = state
        self.map = self._match(list(base_keys))

    def _match(self, base_keys: list[str]) -> dict[str, str]:
        base = set(base_keys)
        for ckpt_key in self.state:
            for key in base_keys:
                if ckpt_key.endswith(key) and (len(ckpt_key) == len(key) or ckpt_key[-len(key) - 1] == "."):
                    prefix = ckpt_key[: len(ckpt_key) - len(key)]
                    mapped = {
                        k[len(prefix) :]: k for k in self.state if k.startswith(prefix) and k[len(prefix) :] in base
                    }
                    if mapped:
                        return mapped
        return {}

    def keys(self) -> list[str]:
        return list(self.map)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state[self.map[key]].shape)

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor | None:
        return self.state[self.map[key]].float() - base.float()

    def touches(self, key: str, base: torch.Tensor) -> bool:
        return True


class LoRASource(TensorSource):
    """A peft LoRA adapter: the task vector of a wrapped weight is ``B @ A * scaling`` (merged, not A and B)."""

    kind = "lora"
    full = False

    def __init__(self, name: str, config: dict[str, Any], tensors: Callable[[str], torch.Tensor], keys: list[str]):
        self.name, self.config, self._get = name, config, tensors
        if config.get("use_dora"):
            raise ValueError(f"{name} is a DoRA adapter, whose update is not B @ A: merge it with peft first.")
        parts: dict[str, dict[str, str]] = {}
        self._saved: dict[str, str] = {}
        for key in keys:
            lora, saved = _LORA_KEY.match(key), _SAVED_KEY.match(key)
            if lora:
                parts.setdefault(lora["module"], {})[lora["part"]] = key
            elif saved:
                self._saved[f"{saved['module']}.{saved['leaf']}"] = key
            else:
                raise ValueError(f"{name} holds adapter tensor {key!r}, which is not LoRA A/B: only LoRA is merged.")
        self._pairs = {f"{m}.weight": p for m, p in parts.items()}
        self._raw = list(keys)

    def raw_keys(self) -> list[str]:
        """The adapter's own tensor names (A, B and saved modules)."""
        return list(self._raw)

    def raw(self, key: str) -> torch.Tensor:
        """One adapter tensor as stored."""
        return self._get(key)

    def keys(self) -> list[str]:
        return list(self._pairs) + list(self._saved)

    def _scaling(self, module: str) -> float:
        r, alpha = self.config.get("r", 8), self.config.get("lora_alpha", 8)
        for pattern, value in (self.config.get("rank_pattern") or {}).items():
            if re.match(rf"(.*\.)?{pattern}$", module):
                r = value
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?{pattern}$", module):
                alpha = value
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def _product(self, key: str) -> torch.Tensor:
        pair, module = self._pairs[key], key[: -len(".weight")]
        if "lora_embedding_A" in pair:
            a, b = self._get(pair["lora_embedding_A"]).float(), self._get(pair["lora_embedding_B"]).float()
            return (b @ a).T * self._scaling(module)
        delta = self._get(pair["lora_B"]).float() @ self._get(pair["lora_A"]).float() * self._scaling(module)
        return delta.T if self.config.get("fan_in_fan_out") else delta

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._saved:
            return tuple(self._get(self._saved[key]).shape)
        return tuple(self._product(key).shape)

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor | None:
        if key in self._saved:
            return self._get(self._saved[key]).float() - base.float()
        if key in self._pairs:
            return self._product(key)
        return None

    def touches(self, key: str, base: torch.Tensor) -> bool:
        return key in self._saved or key in self._pairs


def lora_from_folder(path: Path) -> LoRASource:
    """Open a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) as a LoRA source.

    Raises:
        ValueError: If the adapter is not LoRA.
        FileNotFoundError: If the folder has no ``adapter_model.safetensors``.
    """
    config = json.loads((path / "adapter_config.json").read_text())
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{path} is a {config.get('peft_type')} adapter; only LoRA adapters can be merged.")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{path} has adapter_config.json but no adapter_model.safetensors.")
    reader = SafetensorsReader(weights)
    return LoRASource(str(path), config, reader.get, reader.keys())


@dataclass(frozen=True)
class ArtifactFormat:
    """One artifact format :func:`open_source` recognises.

    Attributes:
        name: Short name (the formats are asked in the order of their names).
        description: What it is, for the sentence of an unrecognised path (``"a ComPEFT artifact"``).
        detect: Whether a resolved path is such an artifact (cheap: metadata only; ``False`` on anything else).
        open: Open one as a merge ingredient.
    """

    name: str
    description: str
    detect: Callable[[Path], bool]
    open: Callable[[Path], TensorSource]


_FORMATS: dict[str, ArtifactFormat] = {}


def register_format(
    name: str, detect: Callable[[Path], bool], open: Callable[[Path], TensorSource], description: str
) -> None:
    """Make :func:`open_source` recognise an artifact format (registering a name again replaces it).

    Args:
        name: Short name of the format.
        detect: Whether a path is such an artifact.
        open: Opens one as a :class:`TensorSource`.
        description: What it is, for messages (``"a sparse fine-tuning artifact (sparse_delta.safetensors)"``).
    """
    _FORMATS[name] = ArtifactFormat(name, description, detect, open)


def registered_formats() -> list[ArtifactFormat]:
    """Every artifact format, the modules of :data:`FORMAT_MODULES` imported first, in name order."""
    for module in FORMAT_MODULES:
        importlib.import_module(module)
    return [_FORMATS[name] for name in sorted(_FORMATS)]


def _builtin_folder(path: Path) -> TensorSource | None:
    """A peft adapter folder or an HF model folder as a source, else ``None``."""
    if (path / "adapter_config.json").is_file():
        return lora_from_folder(path)
    if (path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file():
        return HFSource(path)
    return None


def open_source(path: str | os.PathLike[str], base_keys: Sequence[str]) -> TensorSource:
    """Open one merge ingredient, recognising its format from the path.

    Args:
        path: A registered artifact (a ComPEFT or a sparse fine-tuning ``.safetensors``), a peft adapter folder,
            an HF folder or a Lightning ``.ckpt``; a bundled alias names its folder.
        base_keys: Tensor names of the base model (to match checkpoint prefixes).

    Artifacts are single files, so an HF or peft folder that no format registered so far claims is opened
    without importing the modules of :data:`FORMAT_MODULES` (a merge of HF folders stays light: importing
    :mod:`lightning_ft.sparse` brings Lightning, about 150 MB of resident memory).

    Returns:
        The source.

    Raises:
        ValueError: If the format is not recognised.
    """
    p = resolve_path(path)
    if p.is_dir() and not any(fmt.detect(p) for fmt in _FORMATS.values()):
        builtin = _builtin_folder(p)  # an HF or peft folder: no need to import the artifact formats' modules
        if builtin is not None:
            return builtin
    formats = registered_formats()
    for fmt in formats:
        if fmt.detect(p):
            return fmt.open(p)
    if p.is_dir() and (p / "adapter_config.json").is_file():
        return lora_from_folder(p)
    if p.is_dir() and ((p / SINGLE_FILE).is_file() or (p / INDEX_FILE).is_file()):
        return HFSource(p)
    if p.is_file() and p.suffix == ".ckpt":
        return CheckpointSource(p, base_keys)
    known = ["an HF folder (model.safetensors)", "a peft adapter folder", "a Lightning .ckpt",
             *(fmt.description for fmt in formats)]  # fmt: skip
    raise ValueError(f"{p} is not {', '.join(known[:-1])} or {known[-1]}.")
