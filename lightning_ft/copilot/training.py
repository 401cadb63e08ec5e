"""The two-optimizer training step: the Pilot's loss and round, the Copilot's loss on a drawn round, one backward,
then the Pilot's step and the Copilot's (with the Trainer's accumulation and clipping honoured by hand)."""

from __future__ import annotations

from typing import Any, cast

import torch
from typing_extensions import override

from lightning_ft.copilot.fusion import PilotCapture
from lightning_ft.copilot.rounds import CopilotRounds
from lightning_ft.core.host import ModuleHost
from lightning_ft.core.shards import average_gradients
from lightning_ft.strategies.fsdp2 import is_model_parallel

__all__ = ["CopilotTraining"]


class CopilotTraining(CopilotRounds):
    """Manual optimisation of the Pilot and the Copilot (see :class:`~lightning_ft.copilot.CopilotMixin`)."""

    @override
    def configure_optimizers(self) -> Any:
        from lightning_ft.modules.causal_lm import build_optimizer

        h, cs = self.hparams, self.copilot_settings
        mine = {id(p) for p in self.copilot.parameters()}
        pilot = [(n, p) for n, p in self.named_parameters() if p.requires_grad and id(p) not in mine]
        copilot = [(n, p) for n, p in self.copilot.named_parameters() if p.requires_grad]
        warmup = cs.copilot_warmup_steps if cs.copilot_warmup_steps is not None else h["warmup_steps"]
        first = build_optimizer(self, h["learning_rate"], h["weight_decay"], h["warmup_steps"], h["schedule"], pilot)
        second = build_optimizer(
            self, cs.copilot_learning_rate, cs.copilot_weight_decay, warmup, h["schedule"], copilot
        )
        return [first["optimizer"], second["optimizer"]], [first["lr_scheduler"], second["lr_scheduler"]]

    @override
    def on_fit_start(self) -> None:
        super().on_fit_start()
        if len(self.trainer.optimizers) != 2:
            raise ValueError(
                "CopilotMixin builds its own two optimizers (Pilot and Copilot), but this fit replaced them: remove "
                "--optimizer/--lr_scheduler and set learning_rate and copilot_learning_rate instead."
            )

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        from lightning_ft.objectives._common import batch_generator

        trainer = self.trainer
        size = batch["input_ids"].shape[0]
        self._round_store = {}
        try:
            with PilotCapture(self.backbone) as capture:
                pilot_loss = cast(ModuleHost, self).compute_loss(batch)
            entry = self._record_round(batch, capture)
        finally:
            self._round_store = None
        self.mistake_log.push(entry)
        draw = batch_generator(self.copilot_settings.copilot_seed, trainer.global_step, batch_idx, trainer.global_rank)
        copilot_loss = self.copilot_step_loss(self.mistake_log.sample(draw))
        accumulate = trainer.accumulate_grad_batches
        self.manual_backward((pilot_loss + copilot_loss) / accumulate if accumulate > 1 else pilot_loss + copilot_loss)
        if not trainer.fit_loop._should_accumulate():
            self._step_both(trainer)
        self.log("train/loss", pilot_loss.detach(), prog_bar=True, batch_size=size)
        self.log("train/copilot_loss", copilot_loss.detach(), prog_bar=True, batch_size=size)
        self.log("copilot/buffer_mib", self.mistake_log.nbytes / 2**20, batch_size=size)
        self.log("copilot/buffer_rounds", float(len(self.mistake_log)), batch_size=size)
        return pilot_loss.detach()

    def _step_both(self, trainer: Any) -> None:
        pilot_opt, copilot_opt = cast(list[Any], self.optimizers())
        pilot_sched, copilot_sched = cast(list[Any], self.lr_schedulers())
        clip, algorithm = trainer.gradient_clip_val, trainer.gradient_clip_algorithm
        if clip:
            self.clip_gradients(pilot_opt, gradient_clip_val=clip, gradient_clip_algorithm=algorithm)
        pilot_opt.step()
        pilot_opt.zero_grad()
        pilot_sched.step()
        # the Copilot's optimizer steps outside Lightning's wrapper: global_step counts Pilot steps, and callbacks
        # that act on the Pilot's optimizer (on_before_optimizer_step) never see the Copilot's
        raw = copilot_opt.optimizer
        params = [p for g in raw.param_groups for p in g["params"]]
        if is_model_parallel(trainer.strategy):  # FSDP2 shards the Pilot only: the replicated Copilot averages by hand
            average_gradients(params)
        if clip:
            if algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, clip)
            else:
                torch.nn.utils.clip_grad_norm_(params, clip)
        raw.step()
        raw.zero_grad(set_to_none=True)
        copilot_sched.step()
