"""``SequenceClassificationModule``: fine-tune an encoder (e.g. the bundled all-MiniLM-L6-v2) with a new head."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from lightning_ft.modules.backbone import load_backbone
from lightning_ft.modules.base import FineTuningModule, Schedule, _to_device

__all__ = ["SequenceClassificationModule"]


class SequenceClassificationModule(FineTuningModule):
    """Sequence classification with any ``AutoModelForSequenceClassification``.

    Validation logs ``val/target_acc`` and ``val/target_loss`` and, as the control (forgetting) metric,
    ``val/control_drift``: the mean ``1 - cos`` between the current and the pretrained mean-pooled
    last-layer embeddings of general text (0 before training). The pretrained embeddings are measured in
    ``setup()``, before any checkpoint is restored. Built on :class:`~lightning_ft.modules.base.FineTuningModule`
    (evaluation loop, logging, optimizer, export).

    Args:
        model: bundled alias (``minilm-l6``), local folder or Hub id.
        num_labels: number of classes; default: the DataModule's ``num_labels``.
        dtype: weight dtype.
        peft: peft config mapping (e.g. LoRA; ``task_type`` defaults to ``SEQ_CLS`` so the head trains).
        quantization: ``nf4``/``fp4``/``int8`` backbone (needs ``peft``).
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW weight decay on matrices.
        warmup_steps: warmup steps.
        schedule: ``linear``, ``cosine`` or ``constant`` after warmup.
        output_dir: where ``on_fit_end`` saves the HF model; default ``<default_root_dir>/hf_model``; ``""`` disables.
    """

    def __init__(
        self,
        model: str = "minilm-l6",
        num_labels: int | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        peft: dict[str, Any] | None = None,
        quantization: Literal["nf4", "fp4", "int8"] | None = None,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        schedule: Schedule = "linear",
        output_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = _tokenizer_for(model)
        self._reference: list[torch.Tensor] = []
        if num_labels is not None:
            self._build(num_labels)

    def _build(self, num_labels: int) -> None:
        from transformers import AutoModelForSequenceClassification

        h = self.hparams
        self.backbone, _ = load_backbone(
            AutoModelForSequenceClassification,
            h.model,
            dtype=h.dtype,
            quantization=h.quantization,
            peft=h.peft,
            task_type="SEQ_CLS",
            num_labels=num_labels,
        )
        self.backbone.train()
        self.hparams.num_labels = num_labels

    def materialize(self) -> None:
        """Build the backbone now if it waits for the DataModule's ``num_labels``.

        Lightning runs the callbacks' ``setup`` before the module's, after the DataModule's; a callback that
        needs the model then (LiNeS, HFT, sparse fine-tuning, ...) gets it through
        :func:`~lightning_ft.core.layer_map.find_transformer`, which calls this.
        """
        if self.backbone is not None:
            return
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        n = getattr(datamodule, "num_labels", 0) if datamodule is not None else 0
        if not n:
            raise ValueError("num_labels is unknown: pass num_labels= or a DataModule with `num_labels`.")
        self._build(n)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        self.materialize()
        control = getattr(datamodule, "control_dataloader", lambda: None)() if datamodule is not None else None
        if control is not None and not self._reference:
            self._reference = [self._embed(_to_device(b, self.device)).cpu() for b in control]

    @torch.no_grad()
    def _embed(self, batch: dict[str, Any]) -> torch.Tensor:
        was = self.training
        self.eval()
        try:
            out = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        finally:
            self.train(was)
        hidden = out.hidden_states[-1].float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The training loss of a batch (cross-entropy over the labels)."""
        logits = self(batch["input_ids"], batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"])

    def eval_update(self, batch: dict[str, Any], batch_idx: int = 0) -> None:
        """Accumulate target accuracy/loss, or the control drift of the ``batch_idx``-th control batch."""
        if batch.get("split") == "control":
            if batch_idx < len(self._reference):
                ref = self._reference[batch_idx].to(self.device)
                self.metrics.update_drift(1.0 - F.cosine_similarity(self._embed(batch), ref, dim=-1))
            return
        logits = self(batch["input_ids"], batch["attention_mask"]).logits
        self.metrics.update_choice(logits.float().log_softmax(-1), batch["labels"])

    def _eval_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.eval_update(batch, batch_idx)  # the control drift compares batch i with the pretrained batch i


def _tokenizer_for(model: str) -> Any:
    from transformers import AutoTokenizer

    from lightning_ft.assets import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model))
