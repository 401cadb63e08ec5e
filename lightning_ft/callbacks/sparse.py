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
* In the sparse phase (``sparse_grad``, on by default where it applies), the ``nn.Linear`` layers owning an
  eligible weight compute its gradient only at the selected entries (:mod:`lightning_ft.sparse.sampled`): no dense
  weight gradient exists, gradient clipping and the compact AdamW step take the compact gradient; the dense
  gradient (masked as above) remains the path of the dense phase, of selections and of DDP.
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

The parts live beside this module, each a private mixin deriving from the one before: the state and the compact
AdamW step with the DDP hook (:mod:`~lightning_ft.callbacks.sparse_stepping`), the eligible tensors, the budget and
the selection (:mod:`~lightning_ft.callbacks.sparse_selection`), LT-SFT's phases and LIFT's re-selection
(:mod:`~lightning_ft.callbacks.sparse_phases`), and the artifact with the checkpoint state
(:mod:`~lightning_ft.callbacks.sparse_storage`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from typing_extensions import override

from lightning_ft.callbacks.sparse_selection import resolve_budget
from lightning_ft.callbacks.sparse_storage import ARTIFACT_NAME, _SparseStorage  # ARTIFACT_NAME: re-exported
from lightning_ft.core.layer_map import LayerMap, find_transformer
from lightning_ft.core.process_group import destroy_process_group_at_exit
from lightning_ft.core.selection import WeightSelecting, refuse_second_selection
from lightning_ft.core.snapshot import PretrainedSnapshot
from lightning_ft.sparse.compact import CompactState
from lightning_ft.sparse.rules import SelectionRule
from lightning_ft.sparse.sampled import SampledGrad
from lightning_ft.strategies.sparse_ddp import SparseCommState
from lightning_ft.support import MethodSupport, check_support

__all__ = ["ARTIFACT_NAME", "SparseFineTuning"]


class SparseFineTuning(WeightSelecting, _SparseStorage):
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
        sparse_grad: In the sparse phase, compute each eligible ``nn.Linear`` weight's gradient only at the selected
            entries (a sampled product of the output gradient and the input) instead of densely then masked, so no
            dense weight gradient is allocated. ``"auto"`` (default): wherever it applies, i.e. a single-process fit
            without fp16's gradient scaler (DDP keeps the dense gradient and the sparse all-reduce); ``True``: the
            same, and a fit where it cannot apply is refused; ``False``: always the dense, masked gradient (the
            reference). Other layer types (e.g. GPT-2's ``Conv1D``) always take the dense path.

    Without a budget the rule's default is used (``density=0.01``; ``rank=8`` for ``PrincipalWeights``).
    """

    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "fsdp2", "mixed"}),
        {
            "quantized": "{name} adds fp32 differences to the weights, which a quantized backbone cannot hold: load "
            "the model without `quantization` (bf16 weights work).",
            "lora": "{name} trains the backbone's own weights, but this backbone is LoRA-wrapped (peft): drop `peft` "
            "from the module (sparse fine-tuning already keeps optimizer state for the selected entries only).",
        },
        "DDP all-reduces only the selected entries (sparse communication hook); bf16 weights keep fp32 masters. "
        "Under FSDP2 each process selects among, keeps state for and steps its own rows (one global top-k).",
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
        sparse_grad: bool | Literal["auto"] = "auto",
    ) -> None:
        if not (isinstance(sparse_grad, bool) or sparse_grad == "auto"):
            raise ValueError(f"sparse_grad={sparse_grad!r} must be 'auto', True or False.")
        self.budget, self.allocation = resolve_budget(rule, density, count, rank, allocation)
        self.rule = rule
        self.targets = targets
        self.dense = dense
        self.module = module
        self.seed = seed
        self.save_path = save_path
        self.reset_schedule = reset_schedule
        self.sparse_ddp = sparse_ddp
        self.sparse_grad = sparse_grad
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
        self._slots: dict[str, SampledGrad] = {}  # the sampled path's compact gradients while installed
        self._patched: list[torch.nn.Module] = []
        self._clip_restore: list[tuple[Any, str, Any]] = []
        self._started: L.Trainer | None = None  # the fit whose on_fit_start ran (FSDP2 restores after it)

    @property
    @override
    def state_key(self) -> str:
        return f"SparseFineTuning[{type(self.rule).__name__}]"

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_second_selection(self, trainer)
        destroy_process_group_at_exit()  # a clean gloo exit, also for this callback in a user's own module
        model = find_transformer(pl_module, self.module)
        check_support(self, trainer, model)
        layer_map = LayerMap.from_model(model)
        self._choose_tensors(model, layer_map)
        self._snapshot = PretrainedSnapshot.of(model)
        self._model_numel = sum(i.numel for i in layer_map)
        if "rank" not in self.budget and self.budget.get("count", 0) > self.eligible_numel:
            raise ValueError(f"count={int(self.budget['count'])} exceeds the {self.eligible_numel} eligible entries: "
                             "lower it or widen `targets`.")  # fmt: skip
        if self.states and self._restored is None:  # a second fit on the same callback starts over
            self.states, self.phase, self.events, self._ever = {}, "setup", [], {}

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._refresh_params()  # FSDP2 replaced them with shards in configure_model
        self._bind(trainer)
        self._install_comm_hook(trainer)
        self._started = trainer
        if self._restored is not None:
            self._restore(trainer, after_fit_start=False)
        else:
            if self.rule.dense_steps > 0:
                self.phase = "dense"
                self._log_event(trainer, "dense_phase", {})
            else:
                self._select(trainer, pl_module, remap=False)
        self._sync_comm_masks()
        self._sync_sampled_grads(trainer)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self._restored is not None and self._started is not None:  # FSDP2 restores after on_fit_start
            self._restore(self._started, after_fit_start=True)

    def _restore(self, trainer: L.Trainer, after_fit_start: bool) -> None:
        """Take the checkpoint's masks, compact state and phase; in LT-SFT's sparse phase, the sparse phase's
        optimizers and schedules (Lightning loads their states next; under FSDP2 they were already loaded into the
        previous optimizers, whose states carry over)."""
        assert self._restored is not None
        self._load(self._restored)
        self._restored = None
        if self.reset_schedule and self._rewound:
            loaded = [optimizer.state_dict() for optimizer in trainer.optimizers] if after_fit_start else []
            self._fresh_optimizers(trainer)
            for optimizer, state in zip(trainer.optimizers, loaded):
                optimizer.load_state_dict(state)
        if after_fit_start:
            if self.phase == "sparse":  # torch's state initialisation before the load gave them dense state
                for optimizer in trainer.optimizers:
                    for param in self._params.values():
                        optimizer.state.pop(param, None)
            self._sync_comm_masks()
            self._sync_sampled_grads(trainer)

    # ------------------------------------------------------------------ end
    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = None
        self._unbind()
        self._remove_sampled_grads()
        self._save_artifact(trainer)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._started = None
        self._unbind()
        self._remove_sampled_grads()
