"""The phases of :class:`~lightning_ft.callbacks.SparseFineTuning` over a fit: LT-SFT's switch and LIFT's re-selection.

* LT-SFT (:class:`~lightning_ft.sparse.LotteryTicket`): a dense phase of ``dense_steps`` optimizer steps, then the
  selection, a rewind of every trained tensor to theta_0 and a fresh optimizer and learning-rate schedule sized for
  the sparse phase (the official code's second ``train()``); the optional L1 pull toward theta_0.
* Periodic re-selection (LIFT): after optimizer step ``s`` when ``(s + 1) % reselect_every == 0`` (the official
  ``SparseAdamW``'s timing); the moments of the kept entries carry over.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from lightning_ft.callbacks.sparse_selection import _SparseSelection
from lightning_ft.core.shards import local
from lightning_ft.sparse.compact import CompactState
from lightning_ft.sparse.rules import LotteryTicket

__all__: list[str] = []  # a private part of SparseFineTuning


class _SparsePhases(_SparseSelection):
    """The per-step hooks: the L1 pull and the gradient mask before each step, the phase switch and the
    re-selections after it."""

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
        self._mask_gradients()

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

    # ------------------------------------------------------------------ LT-SFT switch
    def _rewind(self, trainer: L.Trainer) -> None:
        """Every trained tensor back to theta_0; a fresh optimizer and schedule (or, without ``reset_schedule``,
        the same optimizer with its state cleared)."""
        assert self._snapshot is not None and self._model is not None
        self._snapshot.restore(self._model, [*self._params, *self._dense_params])
        self.states = {
            n: CompactState.create(local(self._params[n].detach()), s.indices) for n, s in self.states.items()
        }
        self._ever = {n: s.indices.long().cpu() for n, s in self.states.items()}
        self._sync_comm_masks()
        self._sync_sampled_grads(trainer)
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

    def _add_l1(self, weight: float) -> None:
        assert self._snapshot is not None
        scale = weight / max(1, self._model_numel)
        for name, param in self._params.items():
            slot = self._slots.get(name)
            if slot is not None:  # the sampled path: the compact gradient, in fp32
                if slot.grad is not None:
                    theta = local(param.detach()).reshape(-1)[self.states[name].indices].float()
                    slot.grad += scale * torch.sign(theta - self._theta0_sel[name])
                continue
            if param.grad is None:
                continue
            grad, theta = local(param.grad), local(param.detach())  # under FSDP2: this process's rows
            if self.phase == "sparse":
                idx = self.states[name].indices
                grad.view(-1)[idx] += (scale * torch.sign(theta.reshape(-1)[idx].float() - self._theta0_sel[name])).to(
                    grad.dtype
                )
            else:
                theta0 = self._snapshot.get_local(name, param, dtype=torch.float32)
                grad.add_((scale * torch.sign(theta.float() - theta0)).to(grad.dtype))
