"""``CausalLMModule``: fine-tune any ``AutoModelForCausalLM`` (full, LoRA/peft, or quantized + peft)."""

from __future__ import annotations

import copy
import inspect
import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lightning_ft.assets import BUNDLED_MODELS
from lightning_ft.data.collate import IGNORE_INDEX
from lightning_ft.errors import UserError
from lightning_ft.modules.backbone import is_peft_model, load_backbone, save_pretrained_atomic
from lightning_ft.modules.base import (  # CHECKPOINT_KEY and the checkpoint helpers: re-exported, their old home
    CHECKPOINT_KEY,
    FineTuningModule,
    Schedule,
    build_optimizer,
    check_checkpoint,
    checkpoint_mismatch,
)
from lightning_ft.modules.metrics import aligned_nll, option_logprobs, weighted_lm_loss

__all__ = ["CHECKPOINT_KEY", "CausalLMModule", "build_optimizer", "check_checkpoint", "checkpoint_mismatch"]


class CausalLMModule(FineTuningModule):
    """Fine-tune a causal language model on prompt/response data.

    Built on :class:`~lightning_ft.modules.base.FineTuningModule` (evaluation loop, logging, optimizer, export).

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

    progress_metrics = ("target_acc", "control_ppl")

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
        self._keeps_logits = _accepts_logits_to_keep(self.backbone)
        if is_peft_model(self.backbone):
            # Checkpoints then hold only the trainable (adapter) tensors; the frozen base is reloaded.
            self.strict_loading = False

    # ------------------------------------------------------------------ loss
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

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """``generate`` of the backbone with the module's defaults (greedy, ``max_new_tokens``).

        Under FSDP2 every forward pass is a collective, so a process whose rows have all finished keeps running
        forward passes until every process has finished (transformers' ``synced_gpus``, which it sets by itself only
        for its own FSDP wrapping).
        """
        from lightning_ft.core.shards import is_sharded

        options = {"max_new_tokens": self.hparams.max_new_tokens, "do_sample": False}
        options.update(self.hparams.generation_kwargs or {})
        options.update(kwargs)
        options.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1 and is_sharded(self.backbone):
            options.setdefault("synced_gpus", True)
        return self.backbone.generate(input_ids=input_ids, attention_mask=attention_mask, **options)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        out = self.generate(batch["input_ids"], batch.get("attention_mask"))
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        prompts = batch.get("prompt") or [None] * len(texts)
        refs = batch.get("reference") or [None] * len(texts)
        return [{"prompt": p, "completion": t, "reference": r} for p, t, r in zip(prompts, texts, refs)]

    # ------------------------------------------------------------------ checkpoints and saving
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if is_peft_model(self.backbone):
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def save_pretrained(self, path: str | os.PathLike[str]) -> Path:
        """Save the backbone (or its adapter) and tokenizer so that ``from_pretrained`` loads them."""
        target = super().save_pretrained(path)
        if self.hparams.merge_adapter and is_peft_model(self.backbone):
            merged = copy.deepcopy(self.backbone).merge_and_unload()
            save_pretrained_atomic(merged, self.tokenizer, target / "merged")
        return target


def _accepts_logits_to_keep(backbone: nn.Module) -> bool:
    base = backbone.get_base_model() if is_peft_model(backbone) else backbone
    return "logits_to_keep" in inspect.signature(base.forward).parameters
