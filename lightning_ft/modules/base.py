"""``FineTuningModule``: what both LightningModules share.

The evaluation loop (``validation_step``, ``test_step`` and :meth:`FineTuningModule.evaluate` outside the
Trainer), epoch-end logging, the optimizer, the checkpoint guard and the fit-end export (written atomically through
:mod:`lightning_ft.core.io`, refusing non-finite weights) live here once; ``CausalLMModule`` and
``SequenceClassificationModule`` add only what differs: how the backbone is built, the loss and one evaluation batch.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import nn

from lightning_ft.assets import resolve_model
from lightning_ft.errors import UserError
from lightning_ft.modules.backbone import export_path, is_peft_model, save_pretrained_atomic
from lightning_ft.modules.metrics import EvalMetrics
from lightning_ft.strategies.fsdp2 import is_model_parallel, is_sharded, save_sharded_pretrained, shard_backbone
from lightning_ft.core.process_group import destroy_process_group_at_exit

__all__ = [
    "CHECKPOINT_KEY", "FineTuningModule", "Schedule", "build_optimizer", "check_checkpoint", "checkpoint_mismatch",
]  # fmt: skip

Schedule = Literal["linear", "cosine", "constant"]
CHECKPOINT_KEY = "lightning_ft"  # our modules record their class here (``{"module": "<module>.<class>"}``)
_SHAPING_ARGS = ("model", "peft", "quantization")  # the arguments that decide which tensors a checkpoint holds


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _import_class(path: str) -> type | None:
    module, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return found if isinstance(found, type) else None


def _same_value(a: Any, b: Any) -> bool:
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and Path(a).expanduser().exists() and Path(b).expanduser().exists():
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return False


def checkpoint_mismatch(
    checkpoint: Mapping[str, Any], module_class: type, init_args: Mapping[str, Any] | None = None
) -> tuple[str, str] | None:
    """Why ``checkpoint`` cannot be loaded into ``module_class`` (built with ``init_args``), or ``None``.

    The checkpoint's module class (recorded by our modules under :data:`CHECKPOINT_KEY`, or by LightningCLI as
    ``hyper_parameters["_class_path"]``) must be ``module_class``, a subclass or a base of it; with ``init_args``,
    the arguments that decide the weights (``model``, ``peft``, ``quantization``) must be equal where both give them.

    Returns:
        ``(what the checkpoint is, what it is loaded into)``, e.g. ``("SequenceClassificationModule",
        "CausalLMModule")`` or ``("model='a'", "model='b'")``.
    """
    hparams = checkpoint.get("hyper_parameters") or {}
    stored = (checkpoint.get(CHECKPOINT_KEY) or {}).get("module") or hparams.get("_class_path")
    if stored and stored != _class_path(module_class):
        other = _import_class(str(stored))
        if other is None or not (issubclass(other, module_class) or issubclass(module_class, other)):
            return str(stored).rpartition(".")[2], module_class.__name__
    given = init_args if init_args is not None else {}
    for key in _SHAPING_ARGS:
        if key in hparams and key in given and not _same_value(hparams[key], given[key]):
            return f"{key}={hparams[key]!r}", f"{key}={given[key]!r}"
    return None


def check_checkpoint(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Refuse, in ``on_load_checkpoint``, a checkpoint of another module class or of a differently shaped model.

    Raises:
        UserError: Naming both classes, or the first tensor whose shape differs and both models.
    """
    mismatch = checkpoint_mismatch(checkpoint, type(module))
    if mismatch is not None:
        raise UserError(
            f"the checkpoint was written by {mismatch[0]}, but it is being loaded into {mismatch[1]}: load it into a "
            f"{mismatch[0]}, or pass a checkpoint of a {mismatch[1]} run."
        )
    own = module.state_dict()
    for key, tensor in (checkpoint.get("state_dict") or {}).items():
        if key in own and hasattr(tensor, "shape") and tuple(tensor.shape) != tuple(own[key].shape):
            trained = (checkpoint.get("hyper_parameters") or {}).get("model")
            raise UserError(
                f"the checkpoint's {key} has shape {list(tensor.shape)} but this module's has {list(own[key].shape)} "
                f"(the checkpoint was trained with model={trained!r}, this module loads "
                f"model={module.hparams.get('model')!r}): build the module with the model the checkpoint was trained with."
            )


def build_optimizer(
    module: L.LightningModule,
    learning_rate: float,
    weight_decay: float,
    warmup_steps: int,
    schedule: str,
    parameters: list[tuple[str, nn.Parameter]] | None = None,
) -> dict[str, Any]:
    """AdamW over the trainable parameters (no decay on biases and norms) with a step-wise warmup schedule.

    ``parameters`` (named) restricts it to a subset, e.g. one of two models stepped by hand; default: all of
    ``module``'s.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, param in parameters if parameters is not None else module.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError(f"{type(module).__name__} has no trainable parameters: unfreeze some or add an adapter.")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate)
    total = _total_steps(module)

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or total <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _total_steps(module: L.LightningModule) -> int:
    trainer = module._trainer
    if trainer is None:
        return 0
    total = trainer.estimated_stepping_batches
    return int(total) if math.isfinite(total) else 0


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class FineTuningModule(L.LightningModule):
    """The shared base of the fine-tuning modules: a transformers ``backbone`` with its ``tokenizer``.

    A subclass builds ``self.backbone`` and ``self.tokenizer``, saves its hyperparameters (``learning_rate``,
    ``weight_decay``, ``warmup_steps``, ``schedule`` and ``output_dir`` are read here) and defines
    :meth:`compute_loss` and :meth:`eval_update`. The base gives it the training step, the evaluation loop
    (``val/*`` and ``test/*`` metrics of :class:`~lightning_ft.modules.metrics.EvalMetrics`, logged at epoch end),
    :meth:`evaluate` outside the Trainer, AdamW with a warmup schedule, the checkpoint guard and the fit-end
    export to :meth:`output_path`.
    """

    #: the metrics shown in the progress bar
    progress_metrics: tuple[str, ...] = ("target_acc",)

    def __init__(self) -> None:
        super().__init__()
        self.backbone: Any = None
        self.tokenizer: Any = None
        self.metrics = EvalMetrics()
        #: The peft adapter's state dict as initialised, set by an initialisation that rewrites the base weights
        #: (:class:`~lightning_ft.callbacks.CorDAInit`): the ``hf_model/`` export then converts the trained adapter
        #: into a plain LoRA over the original base model (peft's ``path_initial_model_for_weight_conversion``).
        self.initial_adapter_state: dict[str, torch.Tensor] | None = None

    def setup(self, stage: str) -> None:
        destroy_process_group_at_exit()

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (FSDP2): ``fully_shard`` each block of the backbone, then the backbone
        (:func:`~lightning_ft.strategies.fsdp2.shard_backbone`); a no-op under any other strategy.

        Only data parallelism is supported (``tensor_parallel_size=1``); :meth:`sharded_modules` names the modules
        a mixin calls outside the backbone's forward, which get their own group.
        """
        trainer = self._trainer
        if trainer is None or not is_model_parallel(trainer.strategy):
            return
        if self.hparams.get("merge_adapter") and self.is_peft:
            raise UserError(
                "merge_adapter=True merges the adapter into a whole copy of the model, which FSDP2 keeps sharded "
                "across processes: set merge_adapter to false (hf_model/ then holds the adapter, which peft's "
                "merge_and_unload merges on one process) or use strategy='ddp'."
            )
        mesh = self.device_mesh
        if mesh is None or "data_parallel" not in (mesh.mesh_dim_names or ()):
            return
        if "tensor_parallel" in mesh.mesh_dim_names and mesh["tensor_parallel"].size() > 1:
            raise UserError(
                f"{type(self).__name__} shards data-parallel only, but the strategy asks for tensor_parallel_size="
                f"{mesh['tensor_parallel'].size()}: use ModelParallelStrategy(data_parallel_size=<world size>, "
                "tensor_parallel_size=1)."
            )
        shard_backbone(self.backbone, mesh["data_parallel"], self.sharded_modules())

    def sharded_modules(self) -> list[nn.Module]:
        """Modules a mixin's training step calls outside the backbone's forward (each gets its own FSDP2 group)."""
        return []

    # ------------------------------------------------------------------ forward and loss
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The training loss of a batch; mixins override this to reshape the objective."""
        raise NotImplementedError(f"{type(self).__name__} must define compute_loss(batch).")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    # ------------------------------------------------------------------ evaluation
    def eval_update(self, batch: dict[str, Any]) -> None:
        """Accumulate the evaluation metrics of one target or control batch into ``self.metrics``."""
        raise NotImplementedError(f"{type(self).__name__} must define eval_update(batch).")

    def _eval_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One evaluation batch (the ``batch_idx``-th of its loader); the one place the three loops call."""
        self.eval_update(batch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, prefix: str) -> None:
        for key, value in self.metrics.compute_and_reset().items():
            self.log(f"{prefix}/{key}", value, prog_bar=key in self.progress_metrics)

    @torch.no_grad()
    def evaluate(self, dataloaders: list[Any]) -> dict[str, float]:
        """Run the evaluation metrics over ``dataloaders`` outside the Trainer's loops (no logging)."""
        was_training = self.training
        self.eval()
        self.metrics.compute_and_reset()
        try:
            for loader in dataloaders:
                for batch_idx, batch in enumerate(loader):
                    self._eval_step(_to_device(batch, self.device), batch_idx)
            return self.metrics.compute_and_reset()
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ optimisation and checkpoints
    def configure_optimizers(self) -> Any:
        h = self.hparams
        return build_optimizer(self, h.learning_rate, h.weight_decay, h.warmup_steps, h.schedule)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"module": _class_path(type(self))}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint(self, checkpoint)

    # ------------------------------------------------------------------ export
    @property
    def is_peft(self) -> bool:
        """Whether the backbone is peft-wrapped."""
        return self.backbone is not None and is_peft_model(self.backbone)

    def output_path(self) -> Path | None:
        """Where ``on_fit_end`` saves the HF model, or ``None`` when saving is disabled."""
        return export_path(self.hparams.output_dir, self._trainer, "hf_model")

    def on_fit_end(self) -> None:
        path = self.output_path()
        if path is not None and self.backbone is not None and is_sharded(self.backbone):
            source = str(resolve_model(self.hparams.model, weights=False))
            save_sharded_pretrained(self.backbone, self.tokenizer, source, path, self.trainer.is_global_zero)
        elif path is not None and self.trainer.is_global_zero:
            self.save_pretrained(path)
        self.trainer.strategy.barrier("lightning_ft.save_pretrained")  # no rank leaves while rank 0 still writes

    def save_pretrained(self, path: str | os.PathLike[str]) -> Path:
        """Save the backbone (or its adapter) and tokenizer so that ``from_pretrained`` loads them.

        Written atomically (a failed save leaves the previous folder whole); weights holding NaN or inf are
        refused before anything is written.
        """
        return save_pretrained_atomic(self.backbone, self.tokenizer, path, self.initial_adapter_state)
