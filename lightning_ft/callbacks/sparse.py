"""``SparseFineTuning``: train a chosen sparse set of weight entries; every other entry stays bit-for-bit theta_0.

Mechanics (Lightning hook order: backward -> ``on_before_optimizer_step`` -> gradient clipping -> step):

* ``setup``: eligible tensors (default: the attention and MLP matrices) and ``dense`` tensors keep
  ``requires_grad``; every other tensor of the model is frozen, so the module's optimizer never holds them.
* ``on_fit_start``: the rule selects (or, for :class:`~lightning_ft.sparse.LotteryTicket`, a dense phase
  starts). Rank 0's selection is broadcast, so every DDP rank trains the same entries. Under DDP the
  sparse communication hook (:mod:`lightning_ft.strategies.sparse_ddp`) is installed: only the selected
  entries' gradients are all-reduced.
* ``on_before_optimizer_step``: the gradient of each eligible tensor is zeroed outside its mask, so clipping
  sees only the selected entries (and the optional L1 pull toward theta_0 is added).
* The optimizer's ``step`` is wrapped: after the closure and clipping, the selected entries get an AdamW step on
  compact state (:func:`lightning_ft.cuda_ext.sparse_adamw_`: the fused kernel on CUDA, else its reference
  :func:`~lightning_ft.sparse.compact.sparse_adamw_`, with the lr, betas, eps and weight decay
  of the param group the tensor sits in, so schedulers apply), then the tensor's ``grad`` is set to ``None`` and
  the module's own optimizer steps the remaining (dense) tensors. It never holds state for eligible tensors:
  optimizer memory follows the mask.
* ``on_train_batch_end``: LT-SFT's switch (select, rewind every trained tensor to theta_0, then a fresh
  optimizer and a fresh learning-rate schedule sized for the sparse phase, as the official code's second
  ``train()``) and periodic re-selection (LIFT; moments of kept entries carry over) after optimizer step ``s``
  when ``(s + 1) % reselect_every == 0``, the official ``SparseAdamW``'s timing.
* ``on_fit_end``: the sparse fine-tuning is written as its own artifact (``sparse_delta.safetensors``).

The masks, compact values and moments, the phase and the selection counter are part of the checkpoint; a run
resumed in LT-SFT's sparse phase builds the sparse phase's optimizer and schedule again before Lightning loads
their states, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_ft.core.layer_map import KIND_GROUPS, LayerMap, ParamInfo, ParamKind, find_transformer
from lightning_ft.core.selection import SelectionCallback
from lightning_ft.core.snapshot import PretrainedSnapshot
from lightning_ft.cuda_ext import sparse_adamw_
from lightning_ft.sparse.artifact import SparseDelta
from lightning_ft.sparse.compact import CompactState, mask_gradient_
from lightning_ft.sparse.rules import LotteryTicket, SelectionContext, SelectionRule
from lightning_ft.sparse.topk import allocate, global_topk, tensor_topk
from lightning_ft.strategies.sparse_ddp import SparseCommState, sparse_allreduce_hook
from lightning_ft.strategies.process_group import destroy_process_group_at_exit
from lightning_ft.support import MethodSupport, check_support, sharded_refusal, used_features

__all__ = ["SparseFineTuning"]

_KIND_NAMES = {k.value for k in ParamKind} | set(KIND_GROUPS)
ARTIFACT_NAME = "sparse_delta.safetensors"


def _select_infos(layer_map: LayerMap, spec: str | list[str] | None, argument: str) -> list[ParamInfo]:
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


class SparseFineTuning(L.Callback):
    """Train only a sparse set of weight entries, chosen by a pluggable rule; memory follows the mask.

    Args:
        rule: How entries are chosen: ``LotteryTicket`` (LT-SFT), ``PrincipalWeights`` (LIFT), ``Sensitivity``
            (SPT-style), ``Magnitude`` or ``Random``.
        targets: Eligible tensors: a list of kinds/groups from the layer map (``attention``, ``mlp``,
            ``matrices``, ``attn_q``...), one such name, or a regular expression on parameter names.
        density: Budget as a fraction of the eligible entries.
        count: Budget as a number of entries.
        rank: Budget per matrix of LoRA-rank equivalent ``min((m + n) * rank, m * n)`` entries.
        allocation: ``global`` (one top-k over all eligible entries) or ``per_matrix`` (each matrix gets its
            share of ``density``/``count``); default: the rule's. A ``rank`` budget is always per matrix.
        dense: Tensors trained densely by the module's optimizer (e.g. ``head`` for a new classification
            head): kinds or a regex, as ``targets``. Every tensor that is neither eligible nor dense is frozen.
        module: Dotted path from the LightningModule to the transformers model (default: found automatically).
        seed: Seed of random selections.
        save_path: Where ``on_fit_end`` writes the artifact; default ``sparse_delta.safetensors`` in the
            checkpoint folder (or ``default_root_dir`` without checkpointing); ``""`` disables it.
        reset_schedule: At LotteryTicket's switch, build the module's optimizer and schedule again for the sparse
            phase's own length (the official code's fresh optimizer and scheduler): ``configure_optimizers`` is
            called while the Trainer reports the sparse phase's steps as its step budget (``max_steps`` and
            ``estimated_stepping_batches``), so a schedule sized from them restarts with its warmup and ends with
            the fit. ``False`` keeps the optimizer (its state cleared) and continues the whole fit's schedule.
        sparse_ddp: Under DDP, all-reduce only the selected entries' gradients (a communication hook; bytes
            follow the mask). ``False`` keeps DDP's dense all-reduce.

    Without a budget the rule's default is used (``density=0.01``; ``rank=8`` for ``PrincipalWeights``).
    """

    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "mixed"}),
        {
            "fsdp": sharded_refusal("keeps masks over whole tensors"),
            "quantized": "{name} adds fp32 differences to the weights, which a quantized backbone cannot hold: load "
            "the model without `quantization` (bf16 weights work).",
            "lora": "{name} trains the backbone's own weights, but this backbone is LoRA-wrapped (peft): drop `peft` "
            "from the module (sparse fine-tuning already keeps optimizer state for the selected entries only).",
        },
        "DDP all-reduces only the selected entries (sparse communication hook); bf16 weights keep fp32 masters.",
    )

    def __init__(
        self,
        rule: SelectionRule,
        targets: str | list[str] = "matrices",
        density: float | None = None,
        count: int | None = None,
        rank: int | None = None,
        allocation: Literal["global", "per_matrix"] | None = None,
        dense: str | list[str] | None = None,
        module: str | None = None,
        seed: int = 0,
        save_path: str | None = None,
        reset_schedule: bool = True,
        sparse_ddp: bool = True,
    ) -> None:
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
        self.rule = rule
        self.targets = targets
        self.budget: dict[str, float] = dict(given) if given else dict(rule.default_budget)
        self.allocation = "per_matrix" if "rank" in self.budget else (allocation or rule.default_allocation)
        self.dense = dense
        self.module = module
        self.seed = seed
        self.save_path = save_path
        self.reset_schedule = reset_schedule
        self.sparse_ddp = sparse_ddp
        self.comm_state: SparseCommState | None = None  # the DDP hook's state (masks, bytes sent) while fitting
        # run state
        self.phase: Literal["setup", "dense", "sparse"] = "setup"
        self.events: list[dict[str, Any]] = []
        self.states: dict[str, CompactState] = {}
        self.artifact_path: Path | None = None
        self._model: torch.nn.Module | None = None
        self._layer_map: LayerMap | None = None
        self._snapshot: PretrainedSnapshot | None = None
        self._params: dict[str, torch.nn.Parameter] = {}
        self._dense_params: dict[str, torch.nn.Parameter] = {}
        self._groups: dict[str, tuple[torch.optim.Optimizer, int]] = {}
        self._restore_steps: list[tuple[torch.optim.Optimizer, Callable[..., Any]]] = []
        self._restored: dict[str, Any] | None = None
        self._last_selection_step = -1
        self._theta0_sel: dict[str, torch.Tensor] = {}
        self._ever: dict[
            str, torch.Tensor
        ] = {}  # union of every mask since theta_0 (re-selection drops keep their values)
        self._model_numel = 0

    @property
    @override
    def state_key(self) -> str:
        return f"SparseFineTuning[{type(self.rule).__name__}]"

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

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        others = [type(c).__name__ for c in trainer.callbacks if isinstance(c, (SelectionCallback, SparseFineTuning))
                  and c is not self]  # fmt: skip
        if others:
            raise ValueError(
                f"SparseFineTuning and {others[0]} both decide which weights train: use one of them per fit."
            )
        destroy_process_group_at_exit()  # a clean gloo exit, also for this callback in a user's own module
        model = find_transformer(pl_module, self.module)
        check_support(self, trainer, model)
        layer_map = LayerMap.from_model(model)
        eligible = _select_infos(layer_map, self.targets, "targets")
        if not eligible:
            raise ValueError(f"targets={self.targets!r} matches no parameter of {type(model).__name__}: name kinds "
                             "such as ['attention', 'mlp'] or a regex that matches parameter names.")  # fmt: skip
        if self.rule.matrices_only:
            eligible = self._matrices(eligible)
        eligible_names = {i.name for i in eligible}
        dense = [i for i in _select_infos(layer_map, self.dense, "dense") if i.name not in eligible_names]
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
        self._snapshot = PretrainedSnapshot.of(model)
        self._model_numel = sum(i.numel for i in layer_map)
        if "rank" not in self.budget and self.budget.get("count", 0) > self.eligible_numel:
            raise ValueError(f"count={int(self.budget['count'])} exceeds the {self.eligible_numel} eligible entries: "
                             "lower it or widen `targets`.")  # fmt: skip
        if self.states and self._restored is None:  # a second fit on the same callback starts over
            self.states, self.phase, self.events, self._ever = {}, "setup", [], {}

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

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._bind(trainer)
        self._install_comm_hook(trainer)
        if self._restored is not None:
            self._load(self._restored)
            self._restored = None
            if self.reset_schedule and self._rewound:  # Lightning loads the checkpoint's states into these next
                self._fresh_optimizers(trainer)
        else:
            if self.rule.dense_steps > 0:
                self.phase = "dense"
                self._log_event(trainer, "dense_phase", {})
            else:
                self._select(trainer, pl_module, remap=False)
        self._sync_comm_masks()

    def _install_comm_hook(self, trainer: L.Trainer) -> None:
        """Under DDP, register the sparse all-reduce hook on the wrapped model (unless ``sparse_ddp=False``)."""
        from torch.nn.parallel import DistributedDataParallel

        self.comm_state = None
        wrapped = getattr(trainer.strategy, "model", None)
        if not (self.sparse_ddp and "ddp" in used_features(trainer) and isinstance(wrapped, DistributedDataParallel)):
            return
        if getattr(trainer.strategy, "_ddp_comm_hook", None) is not None:
            raise ValueError(
                "SparseFineTuning installs its sparse all-reduce hook under DDP, but the strategy already has a "
                "ddp_comm_hook: drop that hook or pass sparse_ddp=False."
            )
        self.comm_state = SparseCommState(process_group=wrapped.process_group)
        wrapped.register_comm_hook(self.comm_state, sparse_allreduce_hook)

    def _sync_comm_masks(self) -> None:
        """Point the DDP hook at the current masks (none outside the sparse phase: everything is averaged)."""
        if self.comm_state is not None:
            sparse = self.phase == "sparse"
            self.comm_state.masks = {id(self._params[n]): s.indices for n, s in self.states.items()} if sparse else {}

    # ------------------------------------------------------------------ per step
    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        l1 = getattr(self.rule, "l1", 0.0)
        phase_ok = isinstance(self.rule, LotteryTicket) and self.rule.l1_phase in ("both", self.phase)
        if l1 > 0 and phase_ok:
            self._add_l1(float(l1))
        if self.phase != "sparse":
            return
        for name, param in self._params.items():
            if param.grad is not None:
                mask_gradient_(param.grad, self.states[name].indices)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.phase == "dense" and step >= self.rule.dense_steps:
            self._select(trainer, pl_module, remap=False)
            self._rewind(trainer)
            return
        if self.phase == "sparse" and step != self._last_selection_step and self._reselects_after(trainer, step):
            self._select(trainer, pl_module, remap=True)

    def _reselects_after(self, trainer: L.Trainer, step: int) -> bool:
        """Whether the rule re-selects after optimizer step ``step`` (counted from 1).

        As the official LIFT ``SparseAdamW``: after step ``s`` when ``(s + 1) % reselect_every == 0``, so the first
        mask trains ``reselect_every - 1`` steps and every later one ``reselect_every``; never after the fit's last
        step, where the new mask would train nothing.
        """
        every = self.rule.reselect_every
        if not every or step < 1 or (step + 1) % every:
            return False
        total = trainer.estimated_stepping_batches
        return not (math.isfinite(total) and step >= total)

    # ------------------------------------------------------------------ end
    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._unbind()
        if self.phase != "sparse" or self.save_path == "":
            return
        path = Path(self.save_path) if self.save_path else self._default_artifact_path(trainer)
        delta = self.export()
        if trainer.is_global_zero:
            delta.save(path)
            rank_zero_info(f"SparseFineTuning: wrote {delta.numel} entries ({delta.nbytes / 2**20:.1f} MiB) to {path}")
        trainer.strategy.barrier("sparse_fine_tuning_artifact")
        self.artifact_path = path

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._unbind()

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

    # ------------------------------------------------------------------ selection
    def _select(self, trainer: L.Trainer, pl_module: L.LightningModule, remap: bool) -> None:
        assert self._model is not None
        event = len([e for e in self.events if e["event"] == "select"])
        ctx = SelectionContext(self._model, self._params, self._snapshot, event, self.seed, trainer, pl_module)
        chosen = {n: i.cpu() for n, i in self.choose(ctx).items()} if trainer.is_global_zero else {}
        indices = trainer.strategy.broadcast(chosen, src=0)  # one selection for every rank
        new_states: dict[str, CompactState] = {}
        for name, param in self._params.items():
            idx = indices[name].to(param.device)
            old = self.states.get(name)
            new_states[name] = (
                old.remap(param.detach(), idx)
                if remap and old is not None
                else CompactState.create(param.detach(), idx)
            )
        self.states = new_states
        for name, state in new_states.items():
            old_union = self._ever.get(name)
            fresh = state.indices.long().cpu()
            self._ever[name] = fresh if old_union is None else torch.unique(torch.cat([old_union, fresh]))
        self.phase = "sparse"
        self._last_selection_step = trainer.global_step
        self._cache_theta0()
        self._sync_comm_masks()
        self._log_event(trainer, "select", self._densities())

    def choose(self, ctx: SelectionContext) -> dict[str, torch.Tensor]:
        """Run the rule under the budget: canonical name -> sorted flat indices (int64)."""
        rule, params = self.rule, ctx.params
        rule.prepare(ctx)
        try:
            with torch.no_grad():
                if self.allocation == "global":
                    k = self._global_k()
                    return global_topk({n: rule.score(ctx, n, p) for n, p in params.items()}, k)
                ks = self._per_matrix_k()
                return {n: tensor_topk(rule.score(ctx, n, p), ks[n]) for n, p in params.items()}
        finally:
            rule.finish()

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

    def _densities(self) -> dict[str, float]:
        assert self._layer_map is not None
        per_block: dict[str, list[int]] = {}
        for name, state in self.states.items():
            info = self._layer_map[name]
            key = f"block_{info.block}" if info.block is not None else info.kind.value
            acc = per_block.setdefault(key, [0, 0])
            acc[0] += state.numel
            acc[1] += info.numel
        selected = sum(s.numel for s in self.states.values())
        out = {f"sparse/density/{k}": v[0] / v[1] for k, v in per_block.items()}
        out.update({"sparse/selected": float(selected), "sparse/density": selected / max(1, self.eligible_numel),
                    "sparse/state_mib": self.state_bytes / 2**20})  # fmt: skip
        return out

    def _log_event(self, trainer: L.Trainer, event: str, metrics: dict[str, float]) -> None:
        self.events.append({"event": event, "step": trainer.global_step, **metrics})
        count = len([e for e in self.events if e["event"] == "select"])
        for logger in trainer.loggers:
            logger.log_metrics({**metrics, "sparse/selections": float(count)}, step=trainer.global_step)

    # ------------------------------------------------------------------ LT-SFT switch
    def _rewind(self, trainer: L.Trainer) -> None:
        """Every trained tensor back to theta_0; a fresh optimizer and schedule (or, without ``reset_schedule``,
        the same optimizer with its state cleared)."""
        assert self._snapshot is not None and self._model is not None
        self._snapshot.restore(self._model, [*self._params, *self._dense_params])
        self.states = {n: CompactState.create(self._params[n].detach(), s.indices) for n, s in self.states.items()}
        self._ever = {n: s.indices.long().cpu() for n, s in self.states.items()}
        self._sync_comm_masks()
        self._log_event(trainer, "rewind", {})
        if self.reset_schedule:
            self._fresh_optimizers(trainer)
        else:
            for optimizer in trainer.optimizers:
                optimizer.state.clear()

    @property
    def _rewound(self) -> bool:
        return any(e["event"] == "rewind" for e in self.events)

    def _fresh_optimizers(self, trainer: L.Trainer) -> None:
        """The module's optimizers and schedules built again for the sparse phase, which runs from the rewind to
        the end of the fit: ``configure_optimizers`` runs while the Trainer's step budget is the sparse phase's."""
        start = next(e["step"] for e in reversed(self.events) if e["event"] == "rewind")
        total = trainer.estimated_stepping_batches
        loop = trainer.fit_loop.epoch_loop
        budget = loop.max_steps
        if math.isfinite(total):  # estimated_stepping_batches = min(epochs' steps, max_steps) = the sparse steps
            loop.max_steps = max(1, int(total) - start)
        try:
            trainer.strategy.setup_optimizers(trainer)
        finally:
            loop.max_steps = budget
        self._bind(trainer)

    def _cache_theta0(self) -> None:
        """theta_0 at the selected entries (fp32): the L1 pull and the rewind of master copies need it."""
        assert self._snapshot is not None
        self._theta0_sel = {
            n: self._snapshot.get(n, dtype=torch.float32).reshape(-1)[s.indices.long().cpu()].to(s.indices.device)
            for n, s in self.states.items()
        }

    def _add_l1(self, weight: float) -> None:
        assert self._snapshot is not None
        scale = weight / max(1, self._model_numel)
        for name, param in self._params.items():
            if param.grad is None:
                continue
            if self.phase == "sparse":
                idx = self.states[name].indices
                theta = param.detach().reshape(-1)[idx].float()
                param.grad.view(-1)[idx] += (scale * torch.sign(theta - self._theta0_sel[name])).to(param.grad.dtype)
            else:
                theta0 = self._snapshot.get(name, device=param.device, dtype=torch.float32)
                param.grad.add_((scale * torch.sign(param.detach().float() - theta0)).to(param.grad.dtype))

    # ------------------------------------------------------------------ optimizer binding
    def _bind(self, trainer: L.Trainer) -> None:
        """Find each eligible tensor's param group and wrap the optimizers that hold them."""
        self._unbind()
        self._groups = {}
        ids = {id(p): n for n, p in self._params.items()}
        holders: list[torch.optim.Optimizer] = []
        for optimizer in trainer.optimizers:
            for index, group in enumerate(optimizer.param_groups):
                for param in group["params"]:
                    name = ids.get(id(param))
                    if name is not None:
                        self._groups[name] = (optimizer, index)
                        if optimizer not in holders:
                            holders.append(optimizer)
        missing = [n for n in self._params if n not in self._groups]
        if missing:
            raise ValueError(
                f"SparseFineTuning found {missing[0]!r} in no optimizer param group: configure_optimizers must "
                "include every parameter that requires grad when fit starts."
            )
        for name in self._groups:
            group = self._group(name)
            if "betas" not in group or "eps" not in group:
                raise ValueError(
                    f"SparseFineTuning updates the selected entries with AdamW, but {name!r} sits in a param group "
                    "without betas/eps (not an Adam-family optimizer): use Adam or AdamW in configure_optimizers."
                )
            if group.get("amsgrad"):
                raise ValueError("SparseFineTuning's compact AdamW has no AMSGrad: set amsgrad=False.")
        for optimizer in holders:
            original = optimizer.step
            optimizer.step = self._wrap_step(original)  # type: ignore[method-assign]
            self._restore_steps.append((optimizer, original))

    def _group(self, name: str) -> dict[str, Any]:
        """The live param group of an eligible tensor (``load_state_dict`` replaces the group dicts on resume)."""
        optimizer, index = self._groups[name]
        return optimizer.param_groups[index]

    def _unbind(self) -> None:
        for optimizer, original in self._restore_steps:
            optimizer.step = original  # type: ignore[method-assign]
        self._restore_steps = []

    def _wrap_step(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def step(closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if self.phase == "sparse":
                self._sparse_step()
            original(**kwargs)
            return loss

        if hasattr(original, "_wrapped_by_lr_sched"):  # keep torch's "step before scheduler" bookkeeping intact
            step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        return step

    def _sparse_step(self) -> None:
        for name, param in self._params.items():
            grad = param.grad
            if grad is None:
                continue
            group = self._group(name)
            beta1, beta2 = group["betas"]
            sparse_adamw_(
                param.data, grad, self.states[name], lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2),
                eps=float(group["eps"]), weight_decay=float(group.get("weight_decay", 0.0)),
                maximize=bool(group.get("maximize", False)),
            )  # fmt: skip
            param.grad = None

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
            raise ValueError(f"the checkpoint selects entries of {sorted(unknown)[0]!r}, which is not eligible here: "
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
