"""What :class:`~lightning_ft.callbacks.SparseFineTuning` writes: its artifact and its part of Lightning checkpoints.

The artifact (``sparse_delta.safetensors``, :class:`~lightning_ft.sparse.artifact.SparseDelta`) holds
theta - theta_0 at every entry a selection of the fit trained, and the dense tensors whole. The checkpoint entry
holds the masks, compact values and moments, the phase, the events and the selection counter.
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
        delta = self.export()
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

    def _default_artifact_path(self, trainer: L.Trainer) -> Path:
        ckpt = trainer.checkpoint_callback
        folder = getattr(ckpt, "dirpath", None) if ckpt is not None else None
        return Path(folder or trainer.default_root_dir) / ARTIFACT_NAME

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.phase == "setup":
            return {}
        return {
            "phase": self.phase,
            "events": list(self.events),
            "states": {n: s.state_dict() for n, s in self.states.items()},
            "ever": dict(self._ever),
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
        unknown = set(state["states"]).difference(self._params)
        if unknown:
            raise ValueError(f"the checkpoint selects entries of {min(unknown)!r}, which is not eligible here: "
                             "resume with the same model and `targets`.")  # fmt: skip
        self.phase = state["phase"]
        self.events = list(state["events"])
        self._last_selection_step = int(state["last_selection_step"])
        self.states = {n: CompactState.from_state_dict(s, self._params[n]) for n, s in state["states"].items()}
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
