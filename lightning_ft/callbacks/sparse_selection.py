"""What :class:`~lightning_ft.callbacks.SparseFineTuning` trains: eligible tensors, the budget and the selection.

The arguments ``targets`` and ``dense`` name tensors of the layer map; ``density``, ``count`` or ``rank`` is the
budget, spent globally or per matrix. A selection runs the rule under the budget on rank 0 and broadcasts it, so
every DDP rank trains the same entries; under FSDP2 every process scores its own rows and the top-k threshold is
agreed through all-reduced counts (:func:`~lightning_ft.sparse.topk.sharded_topk`), so the processes together choose
exactly what one process would. A re-selection keeps the moments of the entries that stay.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_ft.callbacks.sparse_stepping import _SparseStepping
from lightning_ft.core.layer_map import KIND_GROUPS, LayerMap, ParamInfo, ParamKind
from lightning_ft.core.shards import full_tensor, local, shard_info
from lightning_ft.monitors.panels import Panel
from lightning_ft.sparse.compact import CompactState
from lightning_ft.sparse.rules import SelectionContext, SelectionRule
from lightning_ft.sparse.topk import allocate, global_topk, sharded_topk, tensor_topk

__all__ = ["resolve_budget", "select_infos"]

_KIND_NAMES = {k.value for k in ParamKind} | set(KIND_GROUPS)


def select_infos(layer_map: LayerMap, spec: str | list[str] | None, argument: str) -> list[ParamInfo]:
    """Parameters named by a kind list, a kind/group name or a regex (base weights only)."""
    if spec is None:
        return []
    if isinstance(spec, str) and spec not in _KIND_NAMES:
        return layer_map.select(pattern=spec)
    kinds = [spec] if isinstance(spec, str) else list(spec)
    unknown = [k for k in kinds if k not in _KIND_NAMES]
    if unknown:
        raise ValueError(
            f"{argument}={spec!r} names {unknown[0]!r}, which is not a parameter kind: use kinds or groups from "
            f"{sorted(_KIND_NAMES)}, or one regular expression string."
        )
    return layer_map.select(kinds=kinds)


def resolve_budget(
    rule: SelectionRule,
    density: float | None,
    count: int | None,
    rank: int | None,
    allocation: Literal["global", "per_matrix"] | None,
) -> tuple[dict[str, float], str]:
    """The checked budget (the rule's default without one) and its allocation, from the callback's arguments."""
    if not isinstance(rule, SelectionRule):
        raise ValueError(
            f"rule must be a selection rule (LotteryTicket, PrincipalWeights, Sensitivity, Magnitude, Random), "
            f"got {type(rule).__name__}."
        )
    given = {k: v for k, v in {"density": density, "count": count, "rank": rank}.items() if v is not None}
    if len(given) > 1:
        raise ValueError(f"give one budget, not {' and '.join(given)}: density, count or rank.")
    if density is not None and not 0 < density <= 1:
        raise ValueError(f"density={density} must be in (0, 1].")
    if count is not None and count < 1:
        raise ValueError(f"count={count} must be a positive number of entries.")
    if rank is not None and rank < 1:
        raise ValueError(f"rank={rank} must be a positive LoRA-equivalent rank.")
    if allocation not in (None, "global", "per_matrix"):
        raise ValueError(f"allocation={allocation!r} must be 'global' or 'per_matrix'.")
    if rank is not None and allocation == "global":
        raise ValueError("a rank budget is per matrix: drop allocation='global' or give density/count instead.")
    budget: dict[str, float] = dict(given) if given else dict(rule.default_budget)
    return budget, "per_matrix" if "rank" in budget else (allocation or rule.default_allocation)


class _SparseSelection(_SparseStepping):
    """The eligible and dense tensors, and the selection of entries under the budget."""

    # ------------------------------------------------------------------ facts
    @property
    def selected(self) -> dict[str, torch.Tensor]:
        """Canonical name -> sorted flat indices of the entries that train (empty before the selection)."""
        return {n: s.indices.long() for n, s in self.states.items()}

    @property
    def state_bytes(self) -> int:
        """Bytes of the compact trainable state (indices, moments, master copies)."""
        return sum(s.nbytes for s in self.states.values())

    @property
    def eligible_numel(self) -> int:
        """Number of eligible entries."""
        return sum(p.numel() for p in self._params.values())

    # ------------------------------------------------------------------ eligible tensors
    def _choose_tensors(self, model: torch.nn.Module, layer_map: LayerMap) -> None:
        """Eligible (``targets``) and ``dense`` tensors keep ``requires_grad``; every other tensor is frozen."""
        eligible = select_infos(layer_map, self.targets, "targets")
        if not eligible:
            raise ValueError(f"targets={self.targets!r} matches no parameter of {type(model).__name__}: name kinds "
                             "such as ['attention', 'mlp'] or a regex that matches parameter names.")  # fmt: skip
        if self.rule.matrices_only:
            eligible = self._matrices(eligible)
        eligible_names = {i.name for i in eligible}
        dense = [i for i in select_infos(layer_map, self.dense, "dense") if i.name not in eligible_names]
        all_params = layer_map.parameters(model)
        keep = eligible_names | {i.name for i in dense}
        for name, param in all_params.items():
            if name not in keep:
                param.requires_grad_(False)
                param.grad = None
        for info in eligible:
            all_params[info.name].requires_grad_(True)
        self._model, self._layer_map = model, layer_map
        self._params = {i.name: all_params[i.name] for i in eligible}
        self._dense_params = {i.name: all_params[i.name] for i in dense if all_params[i.name].requires_grad}

    def _matrices(self, eligible: list[ParamInfo]) -> list[ParamInfo]:
        """A matrix rule's eligible tensors: the 2-D ones; 1-D ones (biases, norms) are skipped with one line."""
        rule = type(self.rule).__name__
        deep = next((i for i in eligible if len(i.shape) > 2), None)
        if deep is not None:
            raise ValueError(
                f"{rule} scores matrices, but targets include {deep.name} with shape {deep.shape}: give `targets` "
                "as a regular expression that leaves it out."
            )
        matrices = [i for i in eligible if len(i.shape) == 2]
        if not matrices:
            raise ValueError(f"targets={self.targets!r} matches no 2-D weight, and {rule} scores matrices: name "
                             "matrix kinds such as ['attention', 'mlp'].")  # fmt: skip
        flat = [i for i in eligible if len(i.shape) < 2]
        if flat:
            rank_zero_info(f"SparseFineTuning: {rule} scores matrices, so it skips {len(flat)} 1-D tensors of "
                           f"`targets` (e.g. {flat[0].name}); they stay frozen unless `dense` names them.")  # fmt: skip
        return matrices

    # ------------------------------------------------------------------ selection
    def _select(self, trainer: L.Trainer, pl_module: L.LightningModule, remap: bool) -> None:
        assert self._model is not None
        self._remove_sampled_grads()  # a rule that scores gradients (Sensitivity) runs its passes densely
        event = len([e for e in self.events if e["event"] == "select"])
        ctx = SelectionContext(self._model, self._params, self._snapshot, event, self.seed, trainer, pl_module)
        if self._sharded:  # every process chooses among its own rows, together (a collective)
            indices = self.choose(ctx)
        else:
            chosen = {n: i.cpu() for n, i in self.choose(ctx).items()} if trainer.is_global_zero else {}
            indices = trainer.strategy.broadcast(chosen, src=0)  # one selection for every rank
        new_states: dict[str, CompactState] = {}
        for name, param in self._params.items():
            held = local(param.detach())
            idx = indices[name].to(held.device)
            old = self.states.get(name)
            new_states[name] = old.remap(held, idx) if remap and old is not None else CompactState.create(held, idx)
        self.states = new_states
        for name, state in new_states.items():
            old_union = self._ever.get(name)
            fresh = state.indices.long().cpu()
            self._ever[name] = fresh if old_union is None else torch.unique(torch.cat([old_union, fresh]))
        self.phase = "sparse"
        self._last_selection_step = trainer.global_step
        self._cache_theta0()
        self._sync_comm_masks()
        self._sync_sampled_grads(trainer)
        self._log_event(trainer, "select", self._densities())

    def choose(self, ctx: SelectionContext) -> dict[str, torch.Tensor]:
        """Run the rule under the budget: canonical name -> sorted flat indices (int64)."""
        rule, params = self.rule, ctx.params
        rule.prepare(ctx)
        try:
            with torch.no_grad():
                if self._sharded:
                    scores = {n: self._shard_score(ctx, n, p) for n, p in params.items()}
                    return sharded_topk(
                        scores, self._global_k() if self.allocation == "global" else self._per_matrix_k()
                    )
                if self.allocation == "global":
                    k = self._global_k()
                    return global_topk({n: rule.score(ctx, n, p) for n, p in params.items()}, k)
                ks = self._per_matrix_k()
                return {n: tensor_topk(rule.score(ctx, n, p), ks[n]) for n, p in params.items()}
        finally:
            rule.finish()

    def _shard_score(self, ctx: SelectionContext, name: str, param: torch.Tensor) -> torch.Tensor:
        """The scores of this process's rows of a sharded parameter (a rule that needs the whole tensor scores it
        gathered, one tensor at a time, and keeps its rows)."""
        whole = full_tensor(param.detach()) if self.rule.whole_tensor else param
        score = local(self.rule.score(ctx, name, whole))
        rows = shard_info(param)
        if rows is not None and tuple(score.shape) == tuple(param.shape) != tuple(local(param).shape):
            score = score[rows[0] : rows[0] + rows[1]]
        return score

    def _global_k(self) -> int:
        if "count" in self.budget:
            return int(self.budget["count"])
        return max(1, round(self.budget["density"] * self.eligible_numel))

    def _per_matrix_k(self) -> dict[str, int]:
        numels = {n: p.numel() for n, p in self._params.items()}
        if "rank" in self.budget:
            r = int(self.budget["rank"])
            out = {}
            for n, p in self._params.items():
                rows, cols = p.shape[0], p.numel() // max(1, p.shape[0])
                out[n] = min((rows + cols) * r, p.numel())
            return out
        return allocate(numels, self._global_k())

    def _cache_theta0(self) -> None:
        """theta_0 at the selected entries (fp32), which the L1 pull needs; without an L1 pull nothing is read (a
        read of every eligible tensor from the snapshot at each selection costs time and, with the snapshot on disk,
        keeps the file's pages resident)."""
        assert self._snapshot is not None
        if not getattr(self.rule, "l1", 0.0) > 0:
            self._theta0_sel = {}
            return
        self._theta0_sel = {
            n: self._snapshot.get_local(n, self._params[n], dtype=torch.float32).reshape(-1)[s.indices.long()]
            for n, s in self.states.items()
        }

    # ------------------------------------------------------------------ logging
    def _densities(self) -> dict[str, float]:
        assert self._layer_map is not None
        per_block: dict[str, list[int]] = {}
        for name, state in self.states.items():
            info = self._layer_map[name]
            key = f"block_{info.block}" if info.block is not None else info.kind.value
            acc = per_block.setdefault(key, [0, 0])
            acc[0] += state.numel
            acc[1] += info.numel
        if self._sharded:  # each process counts its own rows: the totals over the processes
            counts = torch.tensor([v[0] for v in per_block.values()], dtype=torch.int64)
            torch.distributed.all_reduce(counts)
            per_block = {k: [int(c), v[1]] for (k, v), c in zip(per_block.items(), counts)}
        selected = sum(v[0] for v in per_block.values())
        out = {f"sparse/density/{k}": v[0] / v[1] for k, v in per_block.items()}
        out.update({"sparse/selected": float(selected), "sparse/density": selected / max(1, self.eligible_numel),
                    "sparse/state_mib": self.state_bytes / 2**20})  # fmt: skip
        return out

    def dashboard_panels(self) -> list[Panel]:
        """Mask density per block and matrix, and the density at each selection."""
        if not self.states or self._layer_map is None:
            return []
        cells: dict[tuple[str, str], list[int]] = {}
        for name, state in self.states.items():
            info = self._layer_map[name]
            row = f"{info.block:02d}" if info.block is not None else info.kind.value
            kind = name.removesuffix(".weight").rsplit(".", 1)[-1]
            acc = cells.setdefault((row, kind), [0, 0])
            acc[0] += state.numel
            acc[1] += info.numel
        rows, kinds = sorted({r for r, _ in cells}), sorted({k for _, k in cells})
        heat = [[cells[(r, k)][0] / cells[(r, k)][1] if (r, k) in cells else None for k in kinds] for r in rows]
        note = "Share of each matrix's entries in the mask (this process's shard under FSDP2)."
        panels = [Panel("sparse/density", "Sparse mask density per block and matrix", "heatmap", kinds, heat, rows=rows,
                        x_label="matrix", y_label="block", note=note)]  # fmt: skip
        events = [[e["step"], e.get("sparse/density")] for e in self.events if e.get("sparse/density") is not None]
        if events:
            panels.append(Panel("sparse/selections", "Sparse mask density at each selection", "lines", ["step", "density"], events))
        return panels

    def _log_event(self, trainer: L.Trainer, event: str, metrics: dict[str, float]) -> None:
        self.events.append({"event": event, "step": trainer.global_step, **metrics})
        count = len([e for e in self.events if e["event"] == "select"])
        for logger in trainer.loggers:
            logger.log_metrics({**metrics, "sparse/selections": float(count)}, step=trainer.global_step)
