"""Evaluation shared by the modules: token NLL, option scoring, target and control metrics."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from lightning_ft.data.collate import IGNORE_INDEX


def aligned_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood, fp32, 0 where the target is ignored.

    ``logits[:, j]`` predicts ``targets[:, j]`` (already shifted; see :func:`token_nll`).
    """
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return nll.view(targets.shape)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token NLL ``[B, T-1]`` of unshifted causal-LM logits: ``logits[:, t]`` predicts ``labels[:, t + 1]``."""
    return aligned_nll(logits[:, :-1], labels[:, 1:])


def weighted_lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None, normalize: str = "weights"
) -> torch.Tensor:
    """Mean cross-entropy over labelled tokens, optionally weighted per token (aligned inputs).

    With ``weights`` ``w`` (aligned with ``targets``) the loss is ``sum w_t CE_t / sum w_t``
    (``normalize="weights"``) or ``sum w_t CE_t / N`` over the N labelled tokens (``normalize="tokens"``).
    """
    nll = aligned_nll(logits, targets)
    mask = (targets != IGNORE_INDEX).float()
    if weights is None:
        return (nll * mask).sum() / mask.sum().clamp_min(1.0)
    w = weights.float() * mask
    denom = w.sum() if normalize == "weights" else mask.sum()
    return (nll * w).sum() / denom.clamp_min(1e-12)


class EvalMetrics(nn.Module):
    """Target accuracy / NLL and control perplexity, accumulated over batches and synced across ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.target_acc = MeanMetric()
        self.target_nll = MeanMetric()
        self.control_nll = MeanMetric()
        self.control_drift = MeanMetric()
        self._seen: set[str] = set()

    def update_choice(self, option_logprobs: torch.Tensor, gold: torch.Tensor) -> None:
        """Update from ``[B, K]`` option log-likelihoods and ``[B]`` gold indices."""
        correct = (option_logprobs.argmax(dim=-1) == gold).float()
        self.target_acc.update(correct)
        self.target_nll.update(-option_logprobs.gather(1, gold[:, None]).squeeze(1))
        self._seen.add("choice")

    def update_pairs(self, correct: torch.Tensor, loss: torch.Tensor) -> None:
        """Update from preference pairs: ``[P]`` whether the chosen response won, ``[P]`` the pair losses (reported as
        ``target_acc`` and ``target_loss``)."""
        self.target_acc.update(correct.float())
        self.target_nll.update(loss.float())
        self._seen.add("choice")

    def update_lm(self, nll: torch.Tensor, targets: torch.Tensor, which: str) -> None:
        """Update target or control NLL from aligned per-token NLL and targets (token-weighted mean)."""
        mask = targets != IGNORE_INDEX
        count = mask.sum()
        if count == 0:
            return
        metric = self.control_nll if which == "control" else self.target_nll
        metric.update(nll[mask].sum() / count, weight=count.float())
        self._seen.add(which)

    def update_drift(self, drift: torch.Tensor) -> None:
        """Update the control representation drift (``1 - cos`` to the pretrained embeddings), per text."""
        self.control_drift.update(drift)
        self._seen.add("drift")

    def compute_and_reset(self) -> dict[str, float]:
        """Return ``target_acc``, ``target_loss``, ``target_ppl``, ``control_ppl``, ``control_drift`` (those that saw data)."""
        out: dict[str, float] = {}
        if "choice" in self._seen:
            out["target_acc"] = float(self.target_acc.compute())
        if "choice" in self._seen or "target" in self._seen:
            loss = float(self.target_nll.compute())
            out["target_loss"] = loss
            if "target" in self._seen:
                out["target_ppl"] = math.exp(min(loss, 50.0))
        if "control" in self._seen:
            control = float(self.control_nll.compute())
            out["control_loss"] = control
            out["control_ppl"] = math.exp(min(control, 50.0))
        if "drift" in self._seen:
            out["control_drift"] = float(self.control_drift.compute())
        for metric in (self.target_acc, self.target_nll, self.control_nll, self.control_drift):
            metric.reset()
        self._seen.clear()
        return out


def option_logprobs(model_logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """``[B, K]`` log-likelihood of each option from a choice batch (see ``ChoiceCollator``)."""
    if "option_token_ids" in batch:
        rows = torch.arange(model_logits.shape[0], device=model_logits.device)
        last = model_logits[rows, batch["last_index"]].float().log_softmax(dim=-1)
        return last[:, batch["option_token_ids"]]
    nll = token_nll(model_logits, batch["labels"])
    per_seq = -nll.sum(dim=1)
    return per_seq.view(-1, int(batch["num_options"]))
