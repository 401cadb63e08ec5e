"""ComPEFT: sparsify a task vector to its top-k magnitudes and ternarise it, stored compactly.

The artifact is one ``.safetensors`` file. For each compressed tensor ``K`` it holds ``K::signs`` (the
signs of the kept entries, packed 8 per byte), the kept positions as either ``K::mask`` (a packed bitmask)
or ``K::index`` (int32 flat indices), whichever is smaller, and ``K::scale`` (one float). The JSON
metadata records shapes, dtypes, the settings and, for LoRA, the adapter config. Following the official
code, ``scope="global"`` picks the top-k over the whole update and uses one ``alpha * std(tau)`` for all
tensors; ``scope="tensor"`` does both per tensor. A LoRA adapter is compressed as its A and B tensors
(reference zero), as in the paper.

Unchanged entries are never kept: ``k`` is at most the number of non-zero entries of the update (in the
chosen scope), so every entry with ``tau == 0`` decompresses to exactly 0, as ``sign(0) = 0`` gives in the
official code. A fine-tune that leaves most entries alone (sparse, layer-frozen, HFT) therefore keeps
fewer than ``floor(density * n)`` entries.

Bits are packed and unpacked by :func:`lightning_ft.cuda_ext.pack_bits` / :func:`~lightning_ft.cuda_ext.unpack_bits`
(the CUDA kernel for CUDA tensors, else the PyTorch reference), whose bytes are those of
``numpy.packbits(..., bitorder="little")``, the format of every artifact written so far. Importing this module
registers the format with :func:`lightning_ft.core.weights.register_format`, so ``open_source`` opens artifacts.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_ft.core.io import atomic_file, check_output
from lightning_ft.core.weights import (
    LoRASource,
    SafetensorsReader,
    TensorSource,
    open_source,
    register_format,
    resolve_path,
)
from lightning_ft.cuda_ext import pack_bits, unpack_bits
from lightning_ft.merging.ops import ternarize

FORMAT = "lightning_ft.compeft"
Scope = Literal["global", "tensor"]

__all__ = ["CompressReport", "compress", "is_compeft_artifact", "open_artifact", "pack_bits", "unpack_bits"]


@dataclass
class CompressReport:
    """What ``compress`` wrote: sizes in bytes and their ratio."""

    path: str
    kind: str
    tensors: int
    kept: int
    total: int
    dense_bytes: int
    artifact_bytes: int

    @property
    def ratio(self) -> float:
        """Dense update bytes / artifact bytes."""
        return self.dense_bytes / max(self.artifact_bytes, 1)

    def markdown(self) -> str:
        """A short report table."""
        return (
            "| ComPEFT | value |\n|---|---|\n"
            f"| artifact | {self.path} |\n| update | {self.kind}, {self.tensors} tensors |\n"
            f"| kept entries | {self.kept} / {self.total} ({self.kept / max(self.total, 1):.2%}) |\n"
            f"| dense bytes | {self.dense_bytes} |\n| artifact bytes | {self.artifact_bytes} |\n"
            f"| compression ratio | {self.ratio:.1f}x |\n"
        )


def _updates(source: TensorSource, base: SafetensorsReader) -> Iterator[tuple[str, torch.Tensor, torch.dtype]]:
    """Yield ``(name, fp32 update, dtype)``: adapter tensors for LoRA, task vectors otherwise."""
    if isinstance(source, LoRASource):
        for key in source.raw_keys():
            tensor = source.raw(key)
            yield key, tensor.float(), tensor.dtype
        return
    for key in base.keys():
        if key in source.keys():
            delta = source.delta(key, base.get(key))
            if delta is not None:
                yield key, delta, base.dtype(key)


def _global_stats(source: TensorSource, base: SafetensorsReader, density: float) -> tuple[float, float]:
    """``(std over the whole unpruned update, magnitude threshold of the global top-k)``."""
    total, s1, s2, mags = 0, 0.0, 0.0, []
    for _, tau, _ in _updates(source, base):
        d = tau.double()
        total, s1, s2 = total + tau.numel(), s1 + float(d.sum()), s2 + float((d * d).sum())
        mags.append(tau.abs().flatten())
    if total < 2:
        raise ValueError("The update has fewer than two entries; there is nothing to compress.")
    std = math.sqrt(max(s2 - s1 * s1 / total, 0.0) / (total - 1))
    flat = torch.cat(mags)
    keep = min(math.floor(density * total + 1e-9), int(torch.count_nonzero(flat)))
    threshold = float(torch.topk(flat, keep).values[-1]) if keep > 0 else math.inf
    return std, threshold


def _kept(tau: torch.Tensor, density: float, scope: Scope, threshold: float) -> torch.Tensor:
    """Mask of the kept entries of one tensor: the top-k magnitudes, never an entry with ``tau == 0``.

    ``scope="global"`` keeps what reaches the global threshold (entries tied with it included); ``"tensor"``
    keeps the ``min(floor(density * n), nnz)`` largest entries of this tensor.
    """
    nonzero = tau != 0
    if scope == "global":
        return (tau.abs() >= threshold) & nonzero
    keep = min(math.floor(density * tau.numel() + 1e-9), int(nonzero.sum()))
    order = torch.sort(tau.abs().flatten(), descending=True, stable=True).indices  # ties by position
    mask = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
    mask[order[:keep]] = True
    return mask.view(tau.shape)


def compress(
    base: str | os.PathLike[str],
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    density: float = 0.1,
    alpha: float = 1.0,
    scope: Scope = "global",
    overwrite: bool = False,
) -> CompressReport:
    """Compress the update of ``model`` (HF folder, ``.ckpt`` or LoRA adapter) over ``base``.

    The artifact is written whole or not at all (:func:`lightning_ft.core.io.atomic_file`); an ``output`` that is,
    holds or sits inside ``base`` or ``model`` is refused, and so is an existing one unless ``overwrite``.

    Args:
        base: The pretrained HF folder or bundled alias.
        model: The fine-tuned result.
        output: Artifact path (``.safetensors``).
        density: Fraction ``k`` of entries kept (by magnitude).
        alpha: Scale multiplier: kept entries become ``alpha * std(tau) * sign(tau)``.
        scope: ``"global"`` (official: one top-k and one std over the whole update) or ``"tensor"``.
        overwrite: Replace an existing artifact at ``output``.

    Returns:
        Sizes and the compression ratio.
    """
    if scope not in ("global", "tensor"):
        raise ValueError(f"scope={scope!r} must be 'global' or 'tensor'.")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density} must be in (0, 1].")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha={alpha} must be a finite number.")
    check_output(output, [("base", resolve_path(base)), ("model", resolve_path(model))], kind="file",
                 overwrite=overwrite, argument="output", overwrite_flag="overwrite=True")  # fmt: skip
    reader = SafetensorsReader(resolve_path(base))
    source = open_source(model, reader.keys())
    if source.kind == "compeft":
        raise ValueError(f"{model} is already a ComPEFT artifact.")
    std, threshold = _global_stats(source, reader, density) if scope == "global" else (0.0, 0.0)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    kept = total = dense = 0
    for key, tau, dtype in _updates(source, reader):
        mask = _kept(tau, density, scope, threshold)
        if scope == "global":
            scale = alpha * std
        else:
            scale = alpha * float(tau.std()) if tau.numel() > 1 else alpha * float(tau.abs().sum())
        count = int(mask.sum())
        kept, total = kept + count, total + tau.numel()
        dense += tau.numel() * torch.empty((), dtype=dtype).element_size()
        meta[key] = {"shape": list(tau.shape), "dtype": str(dtype).removeprefix("torch."), "count": count}
        if count == 0:
            continue
        flat = mask.flatten()
        tensors[f"{key}::signs"] = pack_bits(tau.flatten()[flat] > 0)
        bitmask = pack_bits(flat)
        index = flat.nonzero().squeeze(1).to(torch.int32)
        if bitmask.numel() <= index.numel() * 4:
            tensors[f"{key}::mask"] = bitmask
        else:
            tensors[f"{key}::index"] = index
        tensors[f"{key}::scale"] = torch.tensor([scale], dtype=torch.float32)
    kind = "lora" if isinstance(source, LoRASource) else "full"
    header = {
        "kind": kind,
        "density": density, "alpha": alpha, "scope": scope, "base": str(base), "source": str(model),
        "tensors": meta, "lora_config": getattr(source, "config", None),
    }  # fmt: skip
    out = Path(output)
    with atomic_file(out) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "compeft": json.dumps(header)})
    return CompressReport(str(out), kind, len(meta), kept, total, dense, out.stat().st_size)


def is_compeft_artifact(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a ComPEFT artifact written by :func:`compress` (checked from its metadata only)."""
    if not Path(path).is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - any unreadable file is simply not an artifact
        return False


class _Artifact:
    """Reads and reconstructs the tensors of one artifact."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with safe_open(str(path), framework="pt") as handle:
            self.header = json.loads(handle.metadata()["compeft"])
            self.stored = set(handle.keys())
        self._handle = safe_open(str(path), framework="pt")

    def tensor(self, key: str) -> torch.Tensor:
        """Reconstructed fp32 update of ``key``: ``scale * sign`` on the kept positions."""
        info = self.header["tensors"][key]
        shape, count = info["shape"], info["count"]
        numel = math.prod(shape)
        if count == 0:
            return torch.zeros(shape, dtype=torch.float32)
        if f"{key}::mask" in self.stored:
            mask = unpack_bits(self._handle.get_tensor(f"{key}::mask"), numel)
        else:
            mask = torch.zeros(numel, dtype=torch.bool)
            mask[self._handle.get_tensor(f"{key}::index").long()] = True
        signs = unpack_bits(self._handle.get_tensor(f"{key}::signs"), count)
        values = torch.zeros(numel, dtype=torch.float32)
        values[mask] = torch.where(signs, 1.0, -1.0)
        return ternarize(values, mask, float(self._handle.get_tensor(f"{key}::scale")[0])).view(shape)


class CompeftSource(TensorSource):
    """A ComPEFT artifact of a full task vector, as a merge ingredient."""

    kind = "compeft"
    full = False

    def __init__(self, artifact: _Artifact) -> None:
        self.name, self.artifact = str(artifact.path), artifact

    def keys(self) -> list[str]:
        return list(self.artifact.header["tensors"])

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.artifact.header["tensors"][key]["shape"])

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor | None:
        return self.artifact.tensor(key) if key in self.artifact.header["tensors"] else None


def open_artifact(path: str | os.PathLike[str]) -> TensorSource:
    """Open a ComPEFT artifact as a merge ingredient (a LoRA artifact yields ``B @ A * scaling`` deltas)."""
    artifact = _Artifact(Path(path))
    if artifact.header["kind"] == "lora":
        source = LoRASource(
            str(path), artifact.header["lora_config"], artifact.tensor, list(artifact.header["tensors"])
        )
        source.kind = "compeft"
        return source
    return CompeftSource(artifact)


register_format("compeft", is_compeft_artifact, open_artifact, "a ComPEFT artifact")
