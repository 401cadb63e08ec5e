"""The update of :class:`~lightning_ft.callbacks.SparseFineTuning`'s selected entries: compact AdamW and DDP.

The optimizers that hold an eligible tensor get their ``step`` wrapped: after the closure and clipping, the selected
entries get an AdamW step on compact state (:func:`lightning_ft.cuda_ext.sparse_adamw_`, with the hyperparameters of
the param group the tensor sits in), the tensor's ``grad`` is set to ``None`` and the module's own optimizer steps
the remaining (dense) tensors. Under DDP a communication hook all-reduces only the selected entries' gradients.

With ``sparse_grad`` (``"auto"``: in the sparse phase of a single-process fit without a gradient scaler), the
``nn.Linear`` layers that own an eligible weight compute that weight's gradient only at the selected entries
(:mod:`lightning_ft.sparse.sampled`): the compact gradient goes to gradient clipping (the precision plugin's clipping
is wrapped to include it) and to the compact AdamW step, and no dense weight gradient exists.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from lightning_ft.core.layer_map import LayerMap
from lightning_ft.core.shards import guard_optimizer_state_init, initializing_optimizer_state, is_sharded, local
from lightning_ft.core.snapshot import PretrainedSnapshot
from lightning_ft.cuda_ext import sparse_adamw_
from lightning_ft.sparse.compact import CompactState, mask_gradient_
from lightning_ft.sparse.rules import SelectionRule
from lightning_ft.sparse.sampled import SampledGrad, install, linear_owners, remove
from lightning_ft.strategies.sparse_ddp import SparseCommState, sparse_allreduce_hook
from lightning_ft.support import used_features

__all__: list[str] = []  # a private part of SparseFineTuning


class _SparseStepping(L.Callback):
    """The state :class:`~lightning_ft.callbacks.SparseFineTuning` keeps (declared here for every part of it), the
    optimizer binding with its compact AdamW step, the gradient mask and the sparse DDP hook."""

    rule: SelectionRule
    targets: str | list[str]
    budget: dict[str, float]
    allocation: str
    dense: str | list[str] | None
    module: str | None
    seed: int
    save_path: str | None
    reset_schedule: bool
    sparse_ddp: bool
    sparse_grad: bool | Literal["auto"]
    comm_state: SparseCommState | None
    phase: Literal["setup", "dense", "sparse"]
    events: list[dict[str, Any]]
    states: dict[str, CompactState]
    artifact_path: Path | None
    _model: torch.nn.Module | None
    _layer_map: LayerMap | None
    _snapshot: PretrainedSnapshot | None
    _params: dict[str, torch.nn.Parameter]
    _dense_params: dict[str, torch.nn.Parameter]
    _groups: dict[str, tuple[torch.optim.Optimizer, int]]
    _restore_steps: list[tuple[torch.optim.Optimizer, Callable[..., Any]]]
    _restored: dict[str, Any] | None
    _last_selection_step: int
    _theta0_sel: dict[str, torch.Tensor]
    _ever: dict[str, torch.Tensor]
    _model_numel: int
    _slots: dict[str, SampledGrad]
    _patched: list[torch.nn.Module]
    _clip_restore: list[tuple[Any, str, Any]]

    # ------------------------------------------------------------------ FSDP2
    @property
    def _sharded(self) -> bool:
        """Whether the model's parameters are FSDP2 shards: each process then selects, keeps compact state for and
        steps the entries of its own rows (flat indices into its shard)."""
        return self._model is not None and is_sharded(self._model)

    def _refresh_params(self) -> None:
        """Look the eligible and dense tensors up again by name: ``fully_shard`` (``configure_model``, after
        ``setup``) replaces every parameter with a sharded one."""
        assert self._model is not None and self._layer_map is not None
        params = self._layer_map.parameters(
            self._model, [self._layer_map[n] for n in [*self._params, *self._dense_params]]
        )
        self._params = {n: params[n] for n in self._params}
        self._dense_params = {n: params[n] for n in self._dense_params}

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
        guard_optimizer_state_init()
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
            if initializing_optimizer_state():  # torch's zero-gradient step before a distributed checkpoint
                if self.phase == "sparse":  # the compact state needs none, and no dense state is made
                    for param in self._params.values():
                        param.grad = None
                return original(**kwargs)  # (a dense phase's tensors get their AdamW state, which the load fills)
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
            slot = self._slots.get(name)
            grad = param.grad if slot is None else slot.grad
            if grad is None:
                continue
            group = self._group(name)
            beta1, beta2 = group["betas"]
            sparse_adamw_(
                local(param.data), local(grad), self.states[name], lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2),
                eps=float(group["eps"]), weight_decay=float(group.get("weight_decay", 0.0)),
                maximize=bool(group.get("maximize", False)), compact_grad=slot is not None,
            )  # fmt: skip
            param.grad = None
            if slot is not None:
                slot.grad = None

    def _mask_gradients(self) -> None:
        """Zero each eligible tensor's gradient outside its mask, so clipping sees only the selected entries."""
        for name, param in self._params.items():
            if param.grad is not None:
                mask_gradient_(local(param.grad), self.states[name].indices)

    # ------------------------------------------------------------------ DDP
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

    # ------------------------------------------------------------------ sampled weight gradients
    def _sparse_grad_obstacle(self, trainer: L.Trainer) -> str | None:
        """Why this fit must keep dense weight gradients (``None``: the sampled path works)."""
        if "ddp" in used_features(trainer) or trainer.world_size > 1:
            return "DDP's reducer all-reduces a dense gradient of every trained tensor"
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return "fp16 mixed precision's gradient scaler unscales dense gradients only"
        return None

    def _sync_sampled_grads(self, trainer: L.Trainer) -> None:
        """Route each selected ``nn.Linear`` weight's gradient into a compact :class:`SampledGrad` (sparse phase
        with ``sparse_grad`` on or ``"auto"``), or give every layer its own forward back."""
        self._remove_sampled_grads()
        obstacle = self._sparse_grad_obstacle(trainer)
        if obstacle is not None and self.sparse_grad is True:
            raise ValueError(f"sparse_grad=True computes weight gradients at the selected entries only, but "
                             f"{obstacle}: pass sparse_grad='auto' or False.")  # fmt: skip
        if self.sparse_grad is False or obstacle is not None or self.phase != "sparse" or self._model is None:
            return
        owners = linear_owners(self._model)
        for name, state in self.states.items():
            param = self._params[name]
            modules = owners.get(id(param), [])
            if not modules or param.dim() != 2:
                continue  # not a plain nn.Linear weight (e.g. GPT-2's Conv1D): the dense gradient, masked
            slot = SampledGrad.of(param.detach(), state.indices)
            for module in modules:
                install(module, slot)
            self._slots[name] = slot
            self._patched.extend(modules)
        if self._slots:
            self._wrap_clipping(trainer.precision_plugin)

    def _remove_sampled_grads(self) -> None:
        for module in self._patched:
            remove(module)
        for plugin, attr, previous in self._clip_restore:
            if previous is None:
                vars(plugin).pop(attr, None)
            else:
                setattr(plugin, attr, previous)
        self._patched, self._slots, self._clip_restore = [], {}, []

    def _compact_grads(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        """The accumulated compact gradients of the eligible tensors ``optimizer`` holds."""
        return [
            slot.grad for name, slot in self._slots.items() if slot.grad is not None and self._groups[name][0] is optimizer
        ]  # fmt: skip

    def _wrap_clipping(self, plugin: Any) -> None:
        """Make the precision plugin's gradient clipping see the compact gradients (norm: one total norm over the
        dense and the compact gradients, as ``clip_grad_norm_``; value: each compact value clamped too)."""
        norm_original, value_original = plugin.clip_grad_by_norm, plugin.clip_grad_by_value

        def clip_grad_by_norm(optimizer: torch.optim.Optimizer, clip_val: float) -> None:
            compact = self._compact_grads(optimizer)
            if not compact:
                return norm_original(optimizer, clip_val)
            grads = [p.grad for p in plugin.main_params(optimizer) if p.grad is not None] + compact
            total = torch.nn.utils.get_total_norm(grads, 2.0)
            coef = torch.clamp(float(clip_val) / (total + 1e-6), max=1.0)
            for grad in grads:
                grad.mul_(coef.to(grad.device))
            return None

        def clip_grad_by_value(optimizer: torch.optim.Optimizer, clip_val: float) -> None:
            for grad in self._compact_grads(optimizer):
                grad.clamp_(-float(clip_val), float(clip_val))
            if any(p.grad is not None for p in plugin.main_params(optimizer)):  # torch refuses an empty list
                value_original(optimizer, clip_val)

        for attr, wrapped in (("clip_grad_by_norm", clip_grad_by_norm), ("clip_grad_by_value", clip_grad_by_value)):
            self._clip_restore.append((plugin, attr, vars(plugin).get(attr)))
            setattr(plugin, attr, wrapped)
