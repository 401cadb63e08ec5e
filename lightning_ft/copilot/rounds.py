"""The mistake-log rounds: recording the Pilot's errors of a training batch, and the Copilot's loss on a round."""

from __future__ import annotations

from typing import Any, cast

import torch

from lightning_ft.copilot.decoder import pack_stream
from lightning_ft.copilot.fusion import PilotCapture
from lightning_ft.copilot.log import Round
from lightning_ft.copilot.storage import CopilotStorage
from lightning_ft.core.host import ModuleHost
from lightning_ft.data.collate import IGNORE_INDEX

__all__ = ["CopilotRounds", "target_columns"]


def target_columns(labels: torch.Tensor, kept: int) -> torch.Tensor:
    """Columns ``t`` (predicting ``labels[:, t + 1]``) the aligned logits cover: every one, or those some row needs
    (``CausalLMModule.aligned_logits`` keeps only those when the backbone supports ``logits_to_keep``)."""
    targets = labels[:, 1:]
    if kept == targets.shape[1]:
        return torch.arange(kept, device=labels.device)
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    if keep.numel() != kept:
        raise RuntimeError(f"the Pilot's aligned logits cover {kept} positions, the labels {keep.numel()}.")
    return keep


class CopilotRounds(CopilotStorage):
    """The Pilot's round of a training batch (input embeddings, pooled hidden states, token errors) and the
    Copilot's RMSE on a round drawn from the log."""

    def aligned_logits(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The module's aligned logits; while a round is being recorded, also keep them (detached) for the log."""
        logits, targets, weights = cast(ModuleHost, super()).aligned_logits(batch)
        if self._round_store is not None:
            self._round_store["logits"], self._round_store["targets"] = logits.detach(), targets
        return logits, targets, weights

    def _record_round(self, batch: dict[str, Any], capture: PilotCapture) -> Round:
        from lightning_ft.cuda_ext import copilot_error

        store = self._round_store or {}
        if "logits" not in store or capture.embeds is None:
            raise RuntimeError(
                "CopilotMixin saw no Pilot logits in this training step: compute_loss must go through aligned_logits."
            )
        logits, targets = store["logits"], store["targets"]
        labels = batch["labels"]
        b, t = labels.shape
        columns = target_columns(labels, logits.shape[1])
        error_mask = torch.zeros(b, t, dtype=torch.bool, device=labels.device)
        labelled = targets != IGNORE_INDEX
        error_mask[:, columns] = labelled
        rows = logits[labelled]
        tgt = targets[labelled]
        indices = None
        if self.copilot_settings.error_storage == "topk":
            full = copilot_error(rows, tgt, dtype=torch.float32)
            k = min(self.copilot_settings.error_topk, full.shape[-1])
            picked = full.abs().topk(k, dim=-1).indices
            errors, indices = full.gather(1, picked).to(torch.bfloat16), picked.to(torch.int32)
        else:
            errors = copilot_error(rows, tgt, dtype=torch.bfloat16)
        mask = batch.get("attention_mask")
        valid = mask.bool() if mask is not None else torch.ones(b, t, dtype=torch.bool, device=labels.device)
        entry = Round(
            capture.embeds.to(torch.bfloat16), capture.hidden.to(torch.bfloat16), valid, error_mask, errors, indices
        )
        return entry.to("cpu")

    def copilot_outputs(self, entry: Round) -> tuple[torch.Tensor, torch.Tensor]:
        """The Copilot's teacher-forced outputs at a round's error positions and the logged errors, both ``[N, V]``
        fp32. The Copilot's stream is the row's error positions in order: each element's input is the error of the
        element before (zero for the first), so the output at a position sees the errors of earlier ones only."""
        cp = self.copilot
        entry = entry.to(self.device)
        hidden, _ = self._teacher_forced(entry)
        if hidden.shape[0] == 0:  # zero rows, still connected to every parameter
            return hidden.sum().float().expand(0, cp.cfg.vocab_size), torch.zeros(
                0, cp.cfg.vocab_size, device=hidden.device
            )
        return cp.rectify(hidden), entry.dense_errors(cp.cfg.vocab_size)

    def _teacher_forced(self, entry: Round) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The Copilot's final hidden states ``[N, hidden]`` at a round's error positions (row-major) and the errors
        read through its embeddings ``[N, embed]`` (``None`` without errors: then ``hidden`` is an empty tensor still
        connected to every parameter, so DDP sees them all)."""
        cp = self.copilot
        dtype = cp.dtype
        b = entry.valid.shape[0]
        embeds, states = entry.embeds.to(dtype), entry.hidden.to(dtype)
        if not bool(entry.error_mask.any()):
            zeros = torch.zeros(b, 1, cp.cfg.hidden_size, dtype=dtype, device=entry.valid.device)
            first = torch.zeros(b, 1, dtype=torch.long, device=entry.valid.device)
            out = cp(zeros, embeds, states, entry.valid, stream=(first, torch.ones_like(first, dtype=torch.bool)))
            empty = (out.sum() + cp.head_weight.sum()) * 0.0
            return empty.expand(0, cp.cfg.hidden_size), None
        positions, kept = pack_stream(entry.error_mask)
        reading = cp.read_sparse(entry.errors, entry.indices) if entry.indices is not None else cp.read(entry.errors)
        packed = torch.zeros(b, positions.shape[1], cp.cfg.hidden_size, dtype=dtype, device=reading.device)
        packed[kept] = cp.input_proj(reading).to(dtype)  # row-major, as the errors are stored
        inputs = torch.cat((torch.zeros_like(packed[:, :1]), packed[:, :-1]), dim=1)  # shifted right by one element
        out = cp(inputs, embeds, states, entry.valid, stream=(positions, kept))
        return out[kept], reading

    def copilot_step_loss(self, entry: Round) -> torch.Tensor:
        """RMSE between the Copilot's output and the logged errors of one round (on the module's device).

        With the tied head the squared error of each row comes from :meth:`CopilotDecoder.tied_squared_error`
        (the same value, without the ``[N, vocab]`` rectification and its backward); with the full head from the
        dense difference."""
        cp = self.copilot
        vocab = cp.cfg.vocab_size
        entry = entry.to(self.device)
        if cp.cfg.head == "tied":
            hidden, reading = self._teacher_forced(entry)
            if reading is None:
                return hidden.sum().float()  # zero, connected to every parameter
            norm_sq = entry.errors.float().pow(2).sum(-1)  # topk: the entries kept are the whole target
            per_row = cp.tied_squared_error(hidden, reading, norm_sq) / vocab
        else:
            out, target = self.copilot_outputs(entry)
            if out.shape[0] == 0:
                return out.sum()  # zero, connected to every parameter
            per_row = (out - target).pow(2).mean(-1)
        if self.copilot_settings.copilot_loss == "token_rmse":
            return per_row.add(1e-12).sqrt().mean().float()
        return per_row.mean().add(1e-12).sqrt().float()
