"""``CausalLMModule``: fine-tune any ``AutoModelForCausalLM`` (full, LoRA/peft, or quantized + peft)."""

from __future__ import annotations

import importlib
import inspect
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import nn

from lightning_ft.assets import BUNDLED_MODELS
from lightning_ft.data.collate import IGNORE_INDEX
from lightning_ft.errors import UserError
from lightning_ft.modules.backbone import export_path, is_peft_model, load_backbone, save_pretrained_atomic
from lightning_ft.modules.metrics import EvalMetrics, aligned_nll, option_logprobs, weighted_lm_loss
from lightning_ft.strategies.process_group import destroy_process_group_at_exit

__all__ = ["CHECKPOINT_KEY", "CausalLMModule", "build_optimizer", "check_checkpoint", "checkpoint_mismatch"]

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
    for key in _SHAPING_ARGS if init_args is not None else ():
        if key in hparams and key in init_args and not _same_value(hparams[key], init_args[key]):
            return f"{key}={hparams[key]!r}", f"{key}={init_args[key]!r}"
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
    decay, no_decay = [], []
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


class CausalLMModule(L.LightningModule):
    """Fine-tune a causal language model on prompt/response data.

    The loss covers the tokens whose label is not ``-100`` (the response, with prompt masking), and may be
    weighted per token by a ``loss_weights`` field of the batch. Validation reports target metrics
    (``val/target_acc`` for classification-as-generation, ``val/target_loss``) and the control perplexity
    ``val/control_ppl`` on general text. ``predict_step`` generates. At the end of ``fit`` the result is
    saved where ``transformers`` (and ``peft`` for adapters) loads it directly.

    Args:
        model: bundled alias (``smollm2-135m``), local folder or Hub id of an ``AutoModelForCausalLM``.
        dtype: dtype of the backbone's weights (``float32``, ``bfloat16``, ``float16``).
        peft: a peft config as a mapping, e.g. ``{peft_type: LORA, r: 8, lora_alpha: 16,
            target_modules: all-linear}``; ``None`` for full fine-tuning.
        quantization: ``nf4``, ``fp4`` or ``int8`` bitsandbytes quantization of the backbone (needs ``peft``).
        learning_rate: peak AdamW learning rate (used unless the CLI's ``--optimizer`` replaces it).
        weight_decay: AdamW weight decay on matrices (biases and norms get none).
        warmup_steps: linear warmup steps of the learning-rate schedule.
        schedule: decay after warmup: ``linear`` or ``cosine`` to zero at the last step, or ``constant``.
        gradient_checkpointing: trade compute for activation memory.
        output_dir: where ``on_fit_end`` saves the HF model; default ``<default_root_dir>/hf_model``;
            ``""`` disables saving.
        merge_adapter: for peft runs, also save the merged full model into ``<output_dir>/merged``.
        max_new_tokens: generation length in ``predict_step``.
        generation_kwargs: extra ``generate`` arguments (``do_sample``, ``temperature``, ``num_beams``...).
        loss_normalization: with per-token ``loss_weights``: divide by the weight sum (``weights``) or by the
            number of labelled tokens (``tokens``).
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        peft: dict[str, Any] | None = None,
        quantization: Literal["nf4", "fp4", "int8"] | None = None,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        schedule: Schedule = "linear",
        gradient_checkpointing: bool = False,
        output_dir: str | None = None,
        merge_adapter: bool = False,
        max_new_tokens: int = 32,
        generation_kwargs: dict[str, Any] | None = None,
        loss_normalization: Literal["weights", "tokens"] = "weights",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if learning_rate <= 0:
            raise ValueError(f"learning_rate={learning_rate} must be positive.")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps} must be zero or positive.")
        if model in BUNDLED_MODELS and BUNDLED_MODELS[model].kind != "causal-lm":
            raise UserError(
                f"model={model!r} is an encoder, not a causal language model: fine-tune it with "
                "SequenceClassificationModule (configs/classification.yaml), or give CausalLMModule a causal LM such "
                "as smollm2-135m."
            )
        from transformers import AutoModelForCausalLM

        self.backbone, self.tokenizer = load_backbone(
            AutoModelForCausalLM,
            model,
            dtype=dtype,
            quantization=quantization,
            peft=peft,
            task_type="CAUSAL_LM",
            gradient_checkpointing=gradient_checkpointing,
        )
        self.backbone.train()  # from_pretrained returns eval mode; Lightning keeps module modes as they are
        self.metrics = EvalMetrics()
        self._keeps_logits = _accepts_logits_to_keep(self.backbone)
        if is_peft_model(self.backbone):
            # Checkpoints then hold only the trainable (adapter) tensors; the frozen base is reloaded.
            self.strict_loading = False

    def setup(self, stage: str) -> None:
        destroy_process_group_at_exit()

    # ------------------------------------------------------------------ forward and loss
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def aligned_logits(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Logits and their targets at the positions that carry a label.

        Returns ``(logits [B, k, V], targets [B, k], weights [B, k] | None)`` where ``logits[:, j]``
        predicts ``targets[:, j]``. Only the positions some row needs go through the LM head when the
        backbone supports ``logits_to_keep`` (a large saving for short responses and a 49k vocabulary).
        """
        labels = batch["labels"]
        targets = labels[:, 1:]
        weights = batch.get("loss_weights")
        weights = weights[:, 1:] if weights is not None else None
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
        if self._keeps_logits and 0 < keep.numel() < targets.shape[1]:
            logits = self(batch["input_ids"], batch.get("attention_mask"), logits_to_keep=keep).logits
            return logits, targets[:, keep], (weights[:, keep] if weights is not None else None)
        logits = self(batch["input_ids"], batch.get("attention_mask")).logits[:, :-1]
        return logits, targets, weights

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The training loss of a batch; mixins override this to reshape the objective."""
        logits, targets, weights = self.aligned_logits(batch)
        return weighted_lm_loss(logits, targets, weights, self.hparams.loss_normalization)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    # ------------------------------------------------------------------ evaluation
    def eval_update(self, batch: dict[str, Any]) -> None:
        """Accumulate evaluation metrics for one target or control batch."""
        split = batch.get("split", "target")
        if "label_index" in batch:
            logits = self(batch["input_ids"], batch.get("attention_mask")).logits
            self.metrics.update_choice(option_logprobs(logits, batch), batch["label_index"])
            return
        logits, targets, _ = self.aligned_logits(batch)
        self.metrics.update_lm(aligned_nll(logits, targets), targets, "control" if split == "control" else "target")

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.eval_update(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.eval_update(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, prefix: str) -> None:
        for key, value in self.metrics.compute_and_reset().items():
            self.log(f"{prefix}/{key}", value, prog_bar=key in ("target_acc", "control_ppl"))

    @torch.no_grad()
    def evaluate(self, dataloaders: list[Any]) -> dict[str, float]:
        """Run the evaluation metrics over ``dataloaders`` outside the Trainer's loops (no logging)."""
        was_training = self.training
        self.eval()
        self.metrics.compute_and_reset()
        try:
            for loader in dataloaders:
                for batch in loader:
                    self.eval_update(_to_device(batch, self.device))
            return self.metrics.compute_and_reset()
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """``generate`` of the backbone with the module's defaults (greedy, ``max_new_tokens``)."""
        options = {"max_new_tokens": self.hparams.max_new_tokens, "do_sample": False}
        options.update(self.hparams.generation_kwargs or {})
        options.update(kwargs)
        options.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        return self.backbone.generate(input_ids=input_ids, attention_mask=attention_mask, **options)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        out = self.generate(batch["input_ids"], batch.get("attention_mask"))
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        prompts = batch.get("prompt") or [None] * len(texts)
        refs = batch.get("reference") or [None] * len(texts)
        return [{"prompt": p, "completion": t, "reference": r} for p, t, r in zip(prompts, texts, refs)]

    # ------------------------------------------------------------------ optimisation and saving
    def configure_optimizers(self) -> Any:
        h = self.hparams
        return build_optimizer(self, h.learning_rate, h.weight_decay, h.warmup_steps, h.schedule)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"module": _class_path(type(self))}
        if is_peft_model(self.backbone):
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint(self, checkpoint)

    def output_path(self) -> Path | None:
        """Where ``on_fit_end`` saves the HF model, or ``None`` when saving is disabled."""
        return export_path(self.hparams.output_dir, self._trainer, "hf_model")

    def on_fit_end(self) -> None:
        path = self.output_path()
        if path is not None and self.trainer.is_global_zero:
            self.save_pretrained(path)
        self.trainer.strategy.barrier("lightning_ft.save_pretrained")  # no rank leaves while rank 0 still writes

    def save_pretrained(self, path: str | os.PathLike[str]) -> Path:
        """Save the backbone (or its adapter) and tokenizer so that ``from_pretrained`` loads them."""
        target = save_pretrained_atomic(self.backbone, self.tokenizer, path)
        if self.hparams.merge_adapter and is_peft_model(self.backbone):
            import copy

            merged = copy.deepcopy(self.backbone).merge_and_unload()
            save_pretrained_atomic(merged, self.tokenizer, target / "merged")
        return target


def _accepts_logits_to_keep(backbone: nn.Module) -> bool:
    base = backbone.get_base_model() if is_peft_model(backbone) else backbone
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
