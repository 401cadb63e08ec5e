"""Fused evaluation and decoding: the Pilot's predictions rectified by the Copilot, scored beside the Pilot's own,
the sweep that chooses ``lambda`` at the end of ``fit``, and ``generate`` with the fusion."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

import torch
from typing_extensions import override

from lightning_ft.copilot.decoder import DecoderCache, pack_stream
from lightning_ft.copilot.fusion import CopilotLogitsProcessor, PilotCapture, fuse_log_probs
from lightning_ft.copilot.rounds import target_columns
from lightning_ft.copilot.training import CopilotTraining
from lightning_ft.core.host import ModuleHost
from lightning_ft.data.collate import IGNORE_INDEX
from lightning_ft.modules.metrics import EvalMetrics
from lightning_ft.monitors.panels import Panel

__all__ = ["CopilotEvaluation", "ErrorFit"]


class CopilotEvaluation(CopilotTraining):
    """Fused metrics in validation and test, the ``lambda`` sweep, the fit-end export and fused ``generate``."""

    def eval_update(self, batch: dict[str, Any]) -> None:
        """The Pilot's metrics, and on target batches the fused ones (``fused_target_acc``, ``fused_target_loss``)."""
        host = cast(ModuleHost, super())
        if not self.copilot_settings.fused_eval or batch.get("split") == "control":
            host.eval_update(batch)
            return
        with PilotCapture(self.backbone, logits=True) as capture:
            host.eval_update(batch)
        parts = self._fusion_parts(batch, capture)
        if parts is not None:
            _update_fused(self.fused_metrics, parts, self.copilot_lambda)
            self.error_fit.update_from(parts)

    @torch.no_grad()
    def _fusion_parts(self, batch: dict[str, Any], capture: PilotCapture) -> dict[str, Any] | None:
        """The Pilot's probabilities and the Copilot's rectifications at the scored positions of one batch."""
        if capture.logits is None or capture.embeds is None:
            return None
        logits, input_ids = capture.logits, batch["input_ids"]
        b, t = input_ids.shape
        mask = batch.get("attention_mask")
        valid = mask.bool() if mask is not None else torch.ones(b, t, dtype=torch.bool, device=input_ids.device)
        kind: dict[str, Any]
        if "option_token_ids" in batch:  # one token per option: the prediction after the prompt's last token
            where = torch.zeros(b, t, dtype=torch.bool, device=input_ids.device)
            where[torch.arange(b, device=input_ids.device), batch["last_index"]] = True
            probs_at = logits[torch.arange(b, device=input_ids.device), batch["last_index"]]
            kind = {"kind": "option_tokens", "option_ids": batch["option_token_ids"], "gold": batch["label_index"]}
        else:
            labels = batch["labels"]
            columns = target_columns(labels, logits.shape[1] if logits.shape[1] < t else t - 1)
            aligned = logits if logits.shape[1] < t else logits[:, :-1]
            targets = labels[:, 1:][:, columns]
            labelled = targets != IGNORE_INDEX
            where = torch.zeros(b, t, dtype=torch.bool, device=input_ids.device)
            where[:, columns] = labelled
            probs_at = aligned[labelled]
            kind = {"kind": "sequences" if "label_index" in batch else "tokens", "targets": targets[labelled],
                    "rows": labelled.nonzero()[:, 0], "batch": b}  # fmt: skip
            if "label_index" in batch:
                kind.update(gold=batch["label_index"], num_options=int(batch["num_options"]))
        rect = self.copilot_rollout(capture.embeds, capture.hidden, valid, where)
        return {**kind, "scores": probs_at.float(), "rect": rect}

    @torch.no_grad()
    def copilot_rollout(
        self, embeds: torch.Tensor, hidden: torch.Tensor, valid: torch.Tensor, where: torch.Tensor
    ) -> torch.Tensor:
        """The Copilot's rectifications ``[N, V]`` at the positions ``where`` (row-major), decoding as at inference:
        the Copilot's stream is each row's scored positions, and each element's input is the Copilot's own output at the
        element before (zero for the first)."""
        cp = self.copilot
        dtype = cp.dtype
        b = valid.shape[0]
        if not bool(where.any()):
            return torch.zeros(0, cp.cfg.vocab_size, device=valid.device)
        positions, kept = pack_stream(where)
        embeds, hidden = embeds.to(dtype), hidden.to(dtype)
        zeros = torch.zeros(b, 1, cp.cfg.hidden_size, dtype=dtype, device=valid.device)
        if positions.shape[1] == 1:  # one scored position per row: no feedback
            return cp.rectify(cp(zeros, embeds, hidden, valid, stream=(positions, kept))[kept[:, 0], 0])
        cache, rects = DecoderCache(), []
        state = cp(zeros, embeds, hidden, valid, cache, stream=(positions[:, :1], kept[:, :1]))[:, 0]
        none = embeds[:, :0]
        for j in range(positions.shape[1]):
            rects.append(cp.rectify(state))  # [B, V] at each row's j-th scored position
            if j + 1 == positions.shape[1]:
                break
            nxt = (positions[:, j + 1 : j + 2], kept[:, j + 1 : j + 2])
            state = cp(cp.feedback(state)[:, None].to(dtype), none, none, valid[:, :0], cache, stream=nxt)[:, 0]
        return torch.stack(rects, dim=1)[kept]  # row-major, as where.nonzero()

    def _log_eval(self, prefix: str) -> None:
        cast(ModuleHost, super())._log_eval(prefix)
        for key, value in self.fused_metrics.compute_and_reset().items():
            if key.startswith("target"):
                self.log(f"{prefix}/fused_{key}", value, prog_bar=key == "target_acc")
        for key, value in self.error_fit.compute_and_reset().items():
            self.log(f"{prefix}/{key}", value)

    @torch.no_grad()
    def evaluate(self, dataloaders: list[Any]) -> dict[str, float]:
        """The module's evaluation outside the Trainer, plus ``fused_target_*`` at the current ``copilot_lambda``."""
        self.fused_metrics.compute_and_reset()
        self.error_fit.compute_and_reset()
        out = cast(ModuleHost, super()).evaluate(dataloaders)
        fused = {f"fused_{k}": v for k, v in self.fused_metrics.compute_and_reset().items() if k.startswith("target")}
        return {**out, **fused, **self.error_fit.compute_and_reset()}

    @torch.no_grad()
    def sweep_lambda(self, dataloaders: list[Any], grid: tuple[float, ...] | None = None) -> list[dict[str, float]]:
        """Fused target metrics for each weight of ``grid`` (and 0, the Pilot alone) on target batches; one pass."""
        grid = tuple(grid or self.copilot_settings.lambda_grid)
        weights = (0.0, *grid)
        metrics = {lam: EvalMetrics() for lam in weights}
        was_training = self.training
        self.eval()
        try:
            for loader in dataloaders:
                for raw in loader:
                    batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in raw.items()}
                    if batch.get("split") == "control":
                        continue
                    with PilotCapture(self.backbone, logits=True) as capture:
                        self._pilot_forward_for(batch)
                    parts = self._fusion_parts(batch, capture)
                    if parts is not None:
                        for lam in weights:
                            _update_fused(metrics[lam], parts, lam)
        finally:
            self.train(was_training)
        return [{"lambda": lam, **metrics[lam].compute_and_reset()} for lam in weights]

    def _pilot_forward_for(self, batch: dict[str, Any]) -> None:
        if "label_index" in batch:
            self(batch["input_ids"], batch.get("attention_mask"))
        else:
            self.aligned_logits(batch)

    def choose_lambda(self, rows: list[dict[str, float]]) -> float:
        """The weight among 0 and the grid that is best on ``lambda_metric``: the highest fused accuracy (ties: the
        lower fused target loss, then the smaller weight) or the lowest fused target loss (ties: the smaller weight).
        """
        settings = self.copilot_settings
        grid = [r for r in rows if r["lambda"] == 0 or r["lambda"] in settings.lambda_grid]
        if not grid or not any("target_acc" in r or "target_loss" in r for r in grid):
            raise ValueError("copilot_lambda='auto' found no target batches in the validation data: give the DataModule a "
                             "validation split or set copilot_lambda to a number.")  # fmt: skip
        metric = settings.lambda_metric or ("target_acc" if "target_acc" in grid[0] else "target_loss")
        if metric not in grid[0]:
            raise ValueError(f"lambda_metric={metric!r} is not measured on this validation data (it has "
                             f"{sorted(k for k in grid[0] if k.startswith('target'))}): set lambda_metric to one of "
                             "those.")  # fmt: skip
        loss = lambda r: r.get("target_loss", 0.0)
        key = (
            (lambda r: (-r["target_acc"], loss(r), r["lambda"]))
            if metric == "target_acc"
            else (lambda r: (r["target_loss"], r["lambda"]))
        )
        return float(min(grid, key=key)["lambda"])

    @override
    def on_fit_end(self) -> None:
        """Export the Pilot as the module does; choose ``lambda`` if ``auto``; write the Copilot beside it."""
        super().on_fit_end()
        trainer = self.trainer
        if self.copilot_settings.auto_lambda:
            loaders = fit_datamodule(trainer).val_dataloader()  # there is one: setup refuses auto lambda without
            rows = self.sweep_lambda(list(loaders) if isinstance(loaders, (list, tuple)) else [loaders])
            chosen = torch.tensor([self.choose_lambda(rows)], dtype=torch.float64)
            chosen = trainer.strategy.broadcast(chosen, src=0)
            self.copilot_lambda, self.lambda_sweep = float(chosen[0]), rows
            for logger in trainer.loggers:
                logger.log_metrics({"copilot/lambda": self.copilot_lambda}, step=trainer.global_step)
                if hasattr(logger, "log_table"):
                    columns = list(rows[0])
                    logger.log_table(
                        key="copilot/lambda_sweep", columns=columns, data=[[r.get(c) for c in columns] for r in rows]
                    )
            self._record_lambda_in_last_checkpoint(trainer)
        path = self.copilot_output_path()
        if path is not None and trainer.is_global_zero:
            self.save_copilot(path)
        trainer.strategy.barrier("lightning_ft.save_copilot")

    def dashboard_panels(self) -> list[Panel]:
        """The lambda sweep (when ``lambda`` was chosen at the end of ``fit``)."""
        if not self.lambda_sweep:
            return []
        columns = list(self.lambda_sweep[0])
        return [Panel("copilot/lambda_sweep", "Copilot lambda sweep", "lines", columns,
                      [[r.get(c) for c in columns] for r in self.lambda_sweep], x_label="lambda",
                      note=f"Chosen lambda = {self.copilot_lambda:g}; the error RMSE is in the curves (val/copilot_rmse).")]  # fmt: skip

    def _record_lambda_in_last_checkpoint(self, trainer: Any) -> None:
        """The last checkpoint was written before ``lambda`` was chosen: put the choice into it, so that
        ``validate``/``predict --ckpt_path last.ckpt`` decode with it.

        Written through :func:`lightning_ft.core.io.atomic_file`: a failed write leaves the checkpoint whole, and a
        ``last.ckpt`` link (``save_last="link"``) stays a link to the rewritten checkpoint."""
        from lightning_ft.core.io import atomic_file

        callback = trainer.checkpoint_callback
        last = Path(getattr(callback, "last_model_path", "") or "")
        if last.is_dir():  # a distributed checkpoint (FSDP2): its metadata file holds the entry
            from lightning.fabric.utilities.load import _METADATA_FILENAME

            last = last / _METADATA_FILENAME  # on_load_checkpoint applies it after the sharded weights
        if trainer.is_global_zero and last.is_file():
            checkpoint = torch.load(last, map_location="cpu", weights_only=False)
            checkpoint["copilot"] = {**checkpoint.get("copilot", {}), "lambda": self.copilot_lambda,
                                     "lambda_sweep": self.lambda_sweep}  # fmt: skip
            if "copilot_lambda_value" in checkpoint.get("state_dict", {}):
                checkpoint["state_dict"]["copilot_lambda_value"] = self.copilot_lambda_value.detach().cpu().clone()
            with atomic_file(last) as tmp:
                torch.save(checkpoint, tmp)
        trainer.strategy.barrier("lightning_ft.copilot_lambda")

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The module's ``generate`` with the Copilot fused at every step (``copilot_lambda=0``: the Pilot alone).

        ``copilot_lambda`` may be passed to override the module's weight for this call.
        """
        host = cast(ModuleHost, super())
        lam = float(kwargs.pop("copilot_lambda", self.copilot_lambda))
        if lam == 0:
            return host.generate(input_ids, attention_mask, **kwargs)
        from transformers import LogitsProcessorList

        beams = kwargs.get("num_beams") or getattr(getattr(self.backbone, "generation_config", None), "num_beams", 1)
        # the readout shares the Pilot's head product: the [vocab, d] weight is read once for both rows (see
        # few_rows_product for the CPU's form of that product)
        share = (beams or 1) == 1
        with CopilotLogitsProcessor(self, lam, attention_mask, share_head=share) as fuse:
            processors = LogitsProcessorList([fuse, *(kwargs.pop("logits_processor", None) or [])])
            return host.generate(input_ids, attention_mask, logits_processor=processors, **kwargs)


def fit_datamodule(trainer: Any) -> Any:
    """The fit's DataModule, or ``None`` (``Trainer.datamodule`` is set by ``fit``, unknown to type checkers)."""
    return getattr(trainer, "datamodule", None)


class ErrorFit(torch.nn.Module):
    """Whether the Copilot predicts the Pilot's error on held-out data: the RMSE of its rectification ``f`` against
    the true error ``onehot(y) - softmax(pilot logits)`` over every (scored token, vocabulary) entry
    (``copilot_rmse``), and the RMSE of the zero predictor (``copilot_zero_rmse``, the error's own root mean
    square). Scored tokens are the answer positions of the gold option (choice data) or the labelled targets
    (token data); ``f`` is decoded as at inference."""

    def __init__(self) -> None:
        super().__init__()
        from torchmetrics import SumMetric

        self.squared, self.zero_squared, self.count = SumMetric(), SumMetric(), SumMetric()

    @torch.no_grad()
    def update(self, rectification: torch.Tensor, gold: torch.Tensor, scores: torch.Tensor) -> None:
        """Add ``[N, V]`` rectifications against the errors of ``[N]`` gold tokens under ``[N, V]`` Pilot scores."""
        error = -torch.softmax(scores.float(), dim=-1)
        error[torch.arange(gold.shape[0], device=gold.device), gold] += 1.0
        self.squared.update((rectification.float() - error).pow(2).sum())
        self.zero_squared.update(error.pow(2).sum())
        self.count.update(float(error.numel()))

    def update_from(self, parts: dict[str, Any]) -> None:
        """Update from the parts of one batch that :meth:`CopilotEvaluation._fusion_parts` returns."""
        scores, rect = parts["scores"], parts["rect"]
        if parts["kind"] == "option_tokens":
            self.update(rect, parts["option_ids"][parts["gold"]], scores)
            return
        keep = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
        if parts["kind"] == "sequences":  # only the gold option's sequence holds the true next tokens
            k = parts["num_options"]
            keep = parts["rows"] % k == parts["gold"][parts["rows"] // k]
        self.update(rect[keep], parts["targets"][keep], scores[keep])

    def compute_and_reset(self) -> dict[str, float]:
        """``{copilot_rmse, copilot_zero_rmse}`` since the last call (empty when nothing was scored)."""
        import warnings

        with warnings.catch_warnings():  # every rank computes (a collective under DDP), updated or not
            warnings.filterwarnings("ignore", message=".*compute.*before the ``update``")
            count, squared, zero = (float(m.compute()) for m in (self.count, self.squared, self.zero_squared))
        out = {}
        if count > 0:
            out = {"copilot_rmse": math.sqrt(squared / count), "copilot_zero_rmse": math.sqrt(zero / count)}
        for metric in (self.squared, self.zero_squared, self.count):
            metric.reset()
        return out


def _update_fused(metrics: EvalMetrics, parts: dict[str, Any], lam: float) -> None:
    logp = fuse_log_probs(parts["scores"], parts["rect"], lam)
    tiny = math.log(torch.finfo(torch.float32).tiny)
    logp = logp.clamp_min(tiny)  # a fused probability of zero scores as the smallest float, not -inf
    if parts["kind"] == "option_tokens":
        metrics.update_choice(logp[:, parts["option_ids"]], parts["gold"])
        return
    token = logp.gather(1, parts["targets"][:, None]).squeeze(1)
    if parts["kind"] == "sequences":
        per_row = torch.zeros(parts["batch"], device=token.device).index_add_(0, parts["rows"], token)
        metrics.update_choice(per_row.view(-1, parts["num_options"]), parts["gold"])
        return
    metrics.update_lm(-token, parts["targets"], "target")
