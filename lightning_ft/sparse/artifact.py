"""The sparse fine-tuning artifact: theta - theta_0 at the selected entries, stored compactly in safetensors.

A :class:`SparseDelta` holds, per base tensor (plain transformers key), the sorted flat indices of the entries
that changed and their fp32 differences; tensors that were trained densely (a new classification head, say) are
kept as absolute values (``dense``), as in Composable SFT. Deltas are added to a base model and compose by
addition (language + task): :func:`apply_sparse` writes an HF-loadable folder, and ``lightning-ft sparse-apply``
does the same from the command line. The file is written whole or not at all, and never with a NaN or inf value.

File layout (one ``.safetensors``): ``<key>::indices`` (int32, or int64 for tensors of 2**31 entries or more),
``<key>::values`` (fp32), ``<key>::dense`` (the tensor's own dtype); metadata ``format``, ``version``,
``shapes`` and ``base`` (the model it was trained from). Importing this module registers the format with
:func:`lightning_ft.core.weights.register_format`, so ``open_source`` (merging) opens artifacts as ingredients.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_ft.core.io import atomic_file, check_finite, check_output
from lightning_ft.core.layer_map import plain_name
from lightning_ft.core.weights import (
    SafetensorsReader,
    TensorSource,
    TensorSpec,
    register_format,
    resolve_path,
    stream_hf_folder,
)
from lightning_ft.errors import UserError

__all__ = ["FORMAT", "SparseDelta", "SparseSource", "apply_sparse", "is_sparse_artifact"]

FORMAT = "lightning-ft/sparse-delta"
_VERSION = "1"


@dataclass
class SparseDelta:
    """Sparse differences (and dense replacements) against a base model.

    Attributes:
        shapes: Base key -> full shape of every tensor the delta touches.
        indices: Base key -> sorted flat indices of the changed entries.
        values: Base key -> fp32 differences at those indices.
        dense: Base key -> absolute values of densely trained tensors.
        base: Name or path of the model the delta was trained from (informative).
    """

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    indices: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    base: str = ""

    # ------------------------------------------------------------------ build
    @classmethod
    def from_tensors(
        cls,
        current: Mapping[str, torch.Tensor],
        reference: Mapping[str, torch.Tensor],
        selected: Mapping[str, torch.Tensor],
        dense: Mapping[str, torch.Tensor] | None = None,
        base: str = "",
    ) -> SparseDelta:
        """The delta of ``current`` against ``reference`` at ``selected`` indices.

        Args:
            current: Base key -> fine-tuned tensor.
            reference: Base key -> theta_0 tensor.
            selected: Base key -> flat indices to record (entries whose difference is exactly 0 are dropped).
            dense: Base key -> tensors to store whole (absolute values).
            base: The base model's name, stored as metadata.

        Returns:
            The delta, on CPU.
        """
        out = cls(base=base)
        for key, idx in selected.items():
            cur, ref = current[key].detach(), reference[key].detach()
            flat_idx = idx.to(device=cur.device, dtype=torch.long)
            diff = cur.reshape(-1)[flat_idx].float() - ref.to(cur.device).reshape(-1)[flat_idx].float()
            keep = diff != 0
            out.shapes[key] = tuple(cur.shape)
            out.indices[key] = flat_idx[keep].cpu().to(_index_dtype(cur.numel()))
            out.values[key] = diff[keep].cpu()
        for key, tensor in (dense or {}).items():
            out.shapes[key] = tuple(tensor.shape)
            out.dense[key] = tensor.detach().cpu().clone()
        return out

    # ------------------------------------------------------------------ facts
    @property
    def numel(self) -> int:
        """Number of stored sparse entries (dense tensors not counted)."""
        return sum(v.numel() for v in self.values.values())

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors."""
        tensors = [*self.indices.values(), *self.values.values(), *self.dense.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def density(self) -> float:
        """Stored sparse entries over the elements of the tensors they belong to."""
        total = sum(_prod(self.shapes[k]) for k in self.values)
        return self.numel / total if total else 0.0

    def delta(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """The dense fp32 difference of one key (``None`` when the key is dense or untouched)."""
        if key not in self.values:
            return None
        out = torch.zeros(_prod(self.shapes[key]), dtype=dtype)
        out[self.indices[key].long()] = self.values[key].to(dtype)
        return out.view(self.shapes[key])

    # ------------------------------------------------------------------ edit
    @torch.no_grad()
    def apply_to(self, tensors: Mapping[str, torch.Tensor], scale: float = 1.0, with_dense: bool = True) -> None:
        """Add ``scale`` times the delta to ``tensors`` in place (and copy dense tensors when ``with_dense``).

        Args:
            tensors: Base key -> live tensor (a state dict or named parameters).
            scale: Multiplier of the differences (-1 reverts).
            with_dense: Also overwrite the densely trained tensors.

        Raises:
            KeyError: If a key of the delta is missing from ``tensors``.
            ValueError: If a shape differs.
        """
        for key in [*self.values, *(self.dense if with_dense else {})]:
            if key not in tensors:
                raise KeyError(f"the sparse delta touches {key!r}, which the model does not have: apply it to the "
                               "model it was trained from.")  # fmt: skip
            if tuple(tensors[key].shape) != self.shapes[key]:
                raise ValueError(
                    f"the sparse delta's {key!r} has shape {self.shapes[key]} but the model's has "
                    f"{tuple(tensors[key].shape)}: apply it to the model it was trained from."
                )
        for key in self.shapes:
            if key in tensors:
                self.apply_key(key, tensors[key], scale, with_dense)

    @torch.no_grad()
    def apply_key(self, key: str, target: torch.Tensor, scale: float = 1.0, with_dense: bool = True) -> None:
        """Apply the delta of one key to ``target`` in place (shape already checked)."""
        if key in self.values:
            flat = target.view(-1)
            idx = self.indices[key].to(target.device).long()
            flat[idx] = (flat[idx].float() + scale * self.values[key].to(target.device)).to(target.dtype)
        elif with_dense and key in self.dense:
            target.copy_(self.dense[key].to(target.device, target.dtype))

    def apply(self, model: torch.nn.Module, scale: float = 1.0, with_dense: bool = True) -> torch.nn.Module:
        """Add the delta to a transformers model in place; returns the model."""
        self.apply_to(_model_tensors(model), scale, with_dense)
        return model

    def revert(self, model: torch.nn.Module) -> torch.nn.Module:
        """Subtract the sparse differences again (dense tensors cannot be reverted and are left)."""
        self.apply_to(_model_tensors(model), -1.0, with_dense=False)
        return model

    def __add__(self, other: SparseDelta) -> SparseDelta:
        """Compose two deltas: differences add on the union of their entries; ``other``'s dense tensors win."""
        out = SparseDelta(base=self.base or other.base)
        for key in dict.fromkeys([*self.values, *other.values]):
            shape = self.shapes.get(key, other.shapes.get(key))
            if key in self.shapes and key in other.shapes and self.shapes[key] != other.shapes[key]:
                raise ValueError(f"cannot compose sparse deltas: {key!r} has shapes {self.shapes[key]} and "
                                 f"{other.shapes[key]}.")  # fmt: skip
            assert shape is not None
            dense = torch.zeros(_prod(shape), dtype=torch.float32)
            seen = torch.zeros(_prod(shape), dtype=torch.bool)
            for part in (self, other):
                if key in part.values:
                    idx = part.indices[key].long()
                    dense[idx] += part.values[key]
                    seen[idx] = True
            idx = seen.nonzero().squeeze(1)
            out.shapes[key] = shape
            out.indices[key] = idx.to(_index_dtype(_prod(shape)))
            out.values[key] = dense[idx]
        for part in (self, other):
            for key, value in part.dense.items():
                out.shapes[key], out.dense[key] = part.shapes[key], value
        return out

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the artifact whole or not at all (:func:`lightning_ft.core.io.atomic_file`); returns the path.

        Raises:
            UserError: A value is NaN or inf (a fit that diverged): nothing is written and a previous file stays.
        """
        check_finite({**self.values, **self.dense}, f"the sparse delta {path}")
        tensors: dict[str, torch.Tensor] = {}
        for key in self.values:
            tensors[f"{key}::indices"] = self.indices[key].contiguous()
            tensors[f"{key}::values"] = self.values[key].contiguous()
        for key, value in self.dense.items():
            tensors[f"{key}::dense"] = value.contiguous()
        metadata = {
            "format": FORMAT, "version": _VERSION, "base": self.base,
            "shapes": json.dumps({k: list(v) for k, v in self.shapes.items()}),
        }  # fmt: skip
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SparseDelta:
        """Read an artifact written by :meth:`save`.

        Raises:
            ValueError: If the file is not a sparse fine-tuning artifact.
        """
        p = Path(path)
        if not is_sparse_artifact(p):
            raise UserError(f"{p} is not a lightning-ft sparse fine-tuning artifact (.safetensors written by "
                            "SparseFineTuning or SparseDelta.save).")  # fmt: skip
        with safe_open(str(p), framework="pt") as handle:
            meta = handle.metadata()
            out = cls(base=meta.get("base", ""))
            out.shapes = {k: tuple(v) for k, v in json.loads(meta["shapes"]).items()}
            for name in handle.keys():
                key, _, part = name.rpartition("::")
                getattr(out, part)[key] = handle.get_tensor(name)
        return out


def is_sparse_artifact(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a sparse fine-tuning artifact (checked from its metadata only)."""
    p = Path(path)
    if not p.is_file() or p.suffix != ".safetensors":
        return False
    try:
        with safe_open(str(p), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - any unreadable file is simply not an artifact
        return False


class SparseSource(TensorSource):
    """A sparse fine-tuning artifact as a merge ingredient (task vector = the sparse delta)."""

    kind = "sparse"
    full = False

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.name = str(path)
        self.artifact = SparseDelta.load(path)

    def keys(self) -> list[str]:
        return list(self.artifact.shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.artifact.shapes[key]

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor | None:
        if key in self.artifact.dense:
            return self.artifact.dense[key].float() - base.float()
        return self.artifact.delta(key)


def apply_sparse(
    base: str | os.PathLike[str],
    artifacts: Sequence[str | os.PathLike[str] | SparseDelta],
    output: str | os.PathLike[str],
    scales: Sequence[float] | None = None,
    with_dense: bool = True,
    overwrite: bool = False,
) -> Path:
    """Add one or more sparse deltas to a base model and write an HF-loadable folder.

    Streams the base tensor by tensor from its safetensors into the output's
    (:func:`~lightning_ft.core.weights.stream_hf_folder`), so peak memory is about one tensor plus the deltas;
    dtypes are preserved. The folder is written whole or not at all; an ``output`` that is, holds or sits inside
    an input is refused, and so is an existing non-empty one unless ``overwrite``.

    Args:
        base: HF folder or bundled alias (``smollm2-135m``).
        artifacts: Artifact paths (or loaded deltas), composed by addition in order.
        output: The folder to write (config and tokenizer files are copied from the base).
        scales: One multiplier per artifact (default 1.0 each).
        with_dense: Also copy densely trained tensors (heads); the last artifact's wins.
        overwrite: Replace an existing non-empty ``output``.

    Returns:
        The output folder.

    Raises:
        ValueError: If ``scales`` does not match ``artifacts`` or an artifact does not fit the base.
    """
    paths = [a for a in artifacts if not isinstance(a, SparseDelta)]
    check_output(output, [("base", resolve_path(base)), *(("artifact", p) for p in paths)], kind="folder",
                 overwrite=overwrite, argument="output", overwrite_flag="overwrite=True")  # fmt: skip
    deltas = [a if isinstance(a, SparseDelta) else SparseDelta.load(a) for a in artifacts]
    factors = list(scales) if scales is not None else [1.0] * len(deltas)
    if len(factors) != len(deltas):
        raise ValueError(f"scales has {len(factors)} values for {len(deltas)} artifacts: give one per artifact.")
    reader = SafetensorsReader(resolve_path(base))
    keys = set(reader.keys())
    for delta in deltas:
        for key, shape in delta.shapes.items():
            if key not in keys or reader.shape(key) != shape:
                found = f"shape {reader.shape(key)}" if key in keys else "no such tensor"
                raise ValueError(f"the sparse delta's {key!r} ({shape}) does not fit {base} ({found}): apply it to "
                                 "the model it was trained from.")  # fmt: skip
    report = {"base": str(base), "artifacts": [str(a) if not isinstance(a, SparseDelta) else "<in memory>"
                                               for a in artifacts], "scales": factors}  # fmt: skip
    names = reader.keys()
    layout = [TensorSpec(key, reader.dtype(key), reader.shape(key)) for key in names]
    with stream_hf_folder(str(base), output, layout, inputs=paths, overwrite=overwrite) as writer:
        for key in names:
            tensor = reader.get(key)  # a fresh tensor: the deltas are added to it in place
            for delta, factor in zip(deltas, factors):
                if key in delta.shapes:
                    delta.apply_key(key, tensor, factor, with_dense)
            writer.write(key, tensor)
            del tensor
        writer.write_text("sparse_apply.json", json.dumps(report, indent=2))
    return Path(output)


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Plain transformers key -> live tensor (peft and tied aliases resolved through the state dict)."""
    return {plain_name(k): v for k, v in model.state_dict(keep_vars=True).items()}


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def _prod(shape: Iterable[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


register_format("sparse", is_sparse_artifact, SparseSource,
                "a sparse fine-tuning artifact (sparse_delta.safetensors)")  # fmt: skip
