"""Where task vectors come from: HF folders, Lightning checkpoints, peft LoRA adapters, ComPEFT artifacts.

Every source is read lazily, one tensor at a time (safetensors handles, memory-mapped checkpoints), and
answers ``delta(key, base)``: the fp32 task vector of one base tensor, or ``None`` when it does not touch it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

__all__ = ["SafetensorsReader", "TensorSource", "open_source", "resolve_path"]

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_(?:embedding_)?[AB])\.weight$")
_SAVED_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.modules_to_save\.(?P<leaf>\w+)$")


def resolve_path(name: str | os.PathLike[str]) -> Path:
    """A local path, or the folder of a bundled model alias (``smollm2-135m``)."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    from lightning_ft.assets import is_bundled_model, resolve_model

    if is_bundled_model(str(name)):
        return Path(resolve_model(str(name)))
    raise FileNotFoundError(f"{name} does not exist: give a folder, a file or a bundled model alias.")


class SafetensorsReader:
    """Lazy reader of a safetensors file, a sharded index or a folder holding either."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        given = path = Path(path)
        if path.is_dir():
            single, index = path / "model.safetensors", path / "model.safetensors.index.json"
            path = single if single.is_file() else index
        if path.name.endswith(".index.json") and path.is_file():
            weight_map = json.loads(path.read_text())["weight_map"]
            self.files = {key: str(path.parent / shard) for key, shard in weight_map.items()}
        elif path.suffix == ".safetensors" and path.is_file():
            with safe_open(str(path), framework="pt") as handle:
                self.files = {key: str(path) for key in handle.keys()}
        else:
            what = ("a model folder (no model.safetensors or model.safetensors.index.json in it)" if given.is_dir()
                    else "a model folder or a .safetensors file")  # fmt: skip
            raise FileNotFoundError(
                f"{given} is not {what}: give a Hugging Face model folder saved with safetensors, or a bundled alias."
            )
        self.path = path
        self._handles: dict[str, Any] = {}

    def _handle(self, key: str) -> Any:
        file = self.files[key]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self.files)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of one tensor without reading it."""
        return tuple(self._handle(key).get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        """Dtype of one tensor without reading it."""
        return _DTYPES[self._handle(key).get_slice(key).get_dtype()]

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (CPU)."""
        return self._handle(key).get_tensor(key)


class TensorSource:
    """One ingredient of a merge: answers task vectors of base tensors.

    Attributes:
        name: The path, for messages and reports.
        kind: ``"hf"``, ``"ckpt"``, ``"lora"`` or ``"compeft"``.
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


class CheckpointSource(TensorSource):
    """A Lightning checkpoint (memory-mapped) of a module holding the model under some prefix."""

    kind = "ckpt"

    def __init__(self, path: Path, base_keys: list[str]) -> None:
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
        self.map = self._match(base_keys)

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


def _lora_from_folder(path: Path) -> LoRASource:
    config = json.loads((path / "adapter_config.json").read_text())
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{path} is a {config.get('peft_type')} adapter; only LoRA adapters can be merged.")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{path} has adapter_config.json but no adapter_model.safetensors.")
    reader = SafetensorsReader(weights)
    return LoRASource(str(path), config, reader.get, reader.keys())


def open_source(path: str | os.PathLike[str], base_keys: list[str]) -> TensorSource:
    """Open one merge ingredient, recognising its format from the path.

    Args:
        path: An HF folder, a peft adapter folder, a Lightning ``.ckpt``, a ComPEFT or a sparse fine-tuning
            ``.safetensors`` artifact.
        base_keys: Tensor names of the base model (to match checkpoint prefixes).

    Returns:
        The source.

    Raises:
        ValueError: If the format is not recognised.
    """
    p = resolve_path(path)
    if p.is_dir() and (p / "adapter_config.json").is_file():
        return _lora_from_folder(p)
    if p.is_dir() and ((p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()):
        return HFSource(p)
    if p.is_file() and p.suffix == ".ckpt":
        return CheckpointSource(p, base_keys)
    if p.is_file() and p.suffix == ".safetensors":
        from lightning_ft.merging.compeft import is_compeft_artifact, open_artifact

        if is_compeft_artifact(p):
            return open_artifact(p)
        from lightning_ft.sparse.artifact import SparseSource, is_sparse_artifact

        if is_sparse_artifact(p):
            return SparseSource(p)
    raise ValueError(
        f"{p} is not an HF folder (model.safetensors), a peft adapter folder, a Lightning .ckpt, a ComPEFT "
        "artifact or a sparse fine-tuning artifact (sparse_delta.safetensors)."
    )
