"""What :class:`~lightning_ft.callbacks.SparseFineTuning` writes: its artifact and its part of Lightning checkpoints.

The artifact (``sparse_delta.safetensors``, :class:`~lightning_ft.sparse.artifact.SparseDelta`) holds
theta - theta_0 at every entry a selection of the fit trained, and the dense tensors whole. The checkpoint entry
holds the masks, compact values and moments, the phase, the events and the selection counter.

Under FSDP2 each process holds the compact state of its own rows: the checkpoint entry (written by rank 0) holds
every process's part, gathered when the checkpoint is made, and each process takes back its own on resume; the
artifact is one file, each process sending rank 0 the differences at its rows' entries.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_ft.callbacks.sparse_phases import _SparsePhases
from lightning_ft.core.shards import full_tensor, local, shard_info
from lightning_ft.core.snapshot import PretrainedSnapshot
from lightning_ft.sparse.artifact import SparseDelta
from lightning_ft.sparse.compact import CompactState

__all__ = ["ARTIFACT_NAME"]

ARTIFACT_NAME = "sparse_delta.safetensors"


class _SparseStorage(_SparsePhases):
    """The artifact written at the end of a fit, and the callback's checkpoint state."""

    # ------------------------------------------------------------------ artifact
    def _save_artifact(self, trainer: L.Trainer) -> None:
        """Write the artifact after a fit that reached the sparse phase (unless ``save_path=""``)."""
        if self.phase != "sparse" or self.save_path == "":
            return
        path = Path(self.save_path) if self.save_path else self._default_artifact_path(trainer)
        delta = self._export_sharded() if self._sharded else self.export()
        if trainer.is_global_zero:
            delta.save(path)
            rank_zero_info(f"SparseFineTuning: wrote {delta.numel} entries ({delta.nbytes / 2**20:.1f} MiB) to {path}")
        trainer.strategy.barrier("sparse_fine_tuning_artifact")
        self.artifact_path = path

    def export(self) -> SparseDelta:
        """The sparse fine-tuning as an artifact: theta - theta_0 at every entry any selection of this fit trained
        (the union of the masks, since entries dropped by a re-selection keep their values), dense tensors whole."""
        assert self._model is not None and self._snapshot is not None and self._layer_map is not None
        lm, snap = self._layer_map, self._snapshot
        current = {lm[n].base_name: p for n, p in self._params.items()}
        names = {lm[n].base_name: n for n in self._ever}
        reference = _LazyTheta0(snap, names)  # one theta_0 tensor at a time, not a second copy of the model
        selected = {lm[n].base_name: idx for n, idx in self._ever.items()}  # every entry that may have moved
        dense = {lm[n].base_name: p for n, p in self._dense_params.items()}
        base = str(getattr(getattr(self._model, "config", None), "_name_or_path", ""))
        return SparseDelta.from_tensors(current, reference, selected, dense, base)

    def _export_sharded(self) -> SparseDelta:
        """:meth:`export` of a sharded model (a collective; the result is whole on rank 0 only): each process's
        differences at its rows' entries, in global flat indices, gathered on rank 0, one tensor at a time."""
        assert self._model is not None and self._snapshot is not None and self._layer_map is not None
        lm, rank = self._layer_map, torch.distributed.get_rank()
        base = str(getattr(getattr(self._model, "config", None), "_name_or_path", ""))
        out = SparseDelta(base=base)
        for name, idx in self._ever.items():
            param = self._params[name]
            held, rows = local(param.detach()), shard_info(param)
            flat = idx.to(held.device, torch.long)
            theta0 = self._snapshot.get_local(name, param, dtype=torch.float32).reshape(-1)[flat]
            diff = held.reshape(-1)[flat].float() - theta0
            keep = diff != 0
            offset = (rows[0] if rows is not None else 0) * (held[0].numel() if held.ndim and held.shape[0] else 0)
            parts: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, ((flat[keep] + offset).cpu(), diff[keep].cpu()))
            if rank == 0:
                key = lm[name].base_name
                out.shapes[key] = tuple(param.shape)
                out.indices[key] = torch.cat([p[0] for p in parts]).to(
                    torch.int32 if param.numel() < 2**31 else torch.int64
                )
                out.values[key] = torch.cat([p[1] for p in parts])
        for name, param in self._dense_params.items():
            whole = full_tensor(param.detach())
            if rank == 0:
                out.shapes[lm[name].base_name] = tuple(whole.shape)
                out.dense[lm[name].base_name] = whole.cpu().clone()
        return out

    def _default_artifact_path(self, trainer: L.Trainer) -> Path:
        ckpt = trainer.checkpoint_callback
        folder = getattr(ckpt, "dirpath", None) if ckpt is not None else None
        return Path(folder or trainer.default_root_dir) / ARTIFACT_NAME

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.phase == "setup":
            return {}
        own = {"states": {n: s.state_dict() for n, s in self.states.items()}, "ever": dict(self._ever)}
        if self._sharded:  # a collective: rank 0 writes the checkpoint entry, which must hold every process's rows
            parts: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, own)
            own = {"shards": parts}
        return {
            "phase": self.phase,
            "events": list(self.events),
            **own,
            "last_selection_step": self._last_selection_step,
            "budget": dict(self.budget),
            "rule": type(self.rule).__name__,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._restored = dict(state_dict)

    def _load(self, state: dict[str, Any]) -> None:
        if state.get("rule") != type(self.rule).__name__ or state.get("budget") != self.budget:
            raise ValueError(
                f"the checkpoint's sparse fine-tuning used {state.get('rule')} with budget {state.get('budget')}, "
                f"not {type(self.rule).__name__} with {self.budget}: resume with the same callback arguments."
            )
        if "shards" in state:  # written under FSDP2: this process's rows
            shards = state["shards"]
            world = torch.distributed.get_world_size() if self._sharded else 1
            if len(shards) != world:
                raise ValueError(f"the checkpoint's sparse fine-tuning was sharded over {len(shards)} processes, not "
                                 f"{world}: resume with {len(shards)} processes.")  # fmt: skip
            state = {**state, **shards[torch.distributed.get_rank() if self._sharded else 0]}
        elif self._sharded:
            raise ValueError("the checkpoint's sparse fine-tuning holds whole tensors, not shards: resume it with the "
                             "strategy it was written with (ddp or one process).")  # fmt: skip
        unknown = set(state["states"]).difference(self._params)
        if unknown:
            raise ValueError(f"the checkpoint selects entries of {min(unknown)!r}, which is not eligible here: "
                             "resume with the same model and `targets`.")  # fmt: skip
        self.phase = state["phase"]
        self.events = list(state["events"])
        self._last_selection_step = int(state["last_selection_step"])
        self.states = {n: CompactState.from_state_dict(s, local(self._params[n])) for n, s in state["states"].items()}
        self._ever = dict(state.get("ever", {}))
        if self.states:
            self._cache_theta0()


class _LazyTheta0(Mapping[str, torch.Tensor]):
    """Base key -> theta_0 (fp32), read from the shared snapshot only when asked for."""

    def __init__(self, snapshot: PretrainedSnapshot, names: dict[str, str]) -> None:
        self.snapshot, self.names = snapshot, names

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.snapshot.get(self.names[key], dtype=torch.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)
