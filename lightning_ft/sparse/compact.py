"""Compact trainable state of a sparse fine-tuning: the selected entries of one tensor and their AdamW moments.

Only the selected entries hold optimizer state: flat indices (int32 when the tensor has fewer than 2**31
elements), the two AdamW moments in fp32 and, for weights stored in a low-precision dtype, an fp32 master copy
of the selected values. At density d the state is about ``(8 + 4) * d`` bytes per weight instead of AdamW's 8.

:func:`sparse_adamw_` is :func:`lightning_ft.cuda_ext.sparse_adamw_`, the one dispatch of the compact AdamW step
(the fused kernel on CUDA, else its reference :func:`lightning_ft.cuda_ext.reference.sparse_adamw_`): gather the
gradient at the indices, AdamW on the compact values and moments, write the values back. Its arithmetic is the one
of ``torch.optim.AdamW``'s single-tensor path, operation for operation, so at density 1 it reproduces AdamW bit for
bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_ft.cuda_ext import sparse_adamw_

__all__ = ["CompactState", "mask_gradient_", "sparse_adamw_"]


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


@dataclass
class CompactState:
    """The selected entries of one parameter and their optimizer state.

    Attributes:
        indices: Sorted flat positions of the selected entries (int32 or int64).
        exp_avg: First AdamW moment per selected entry (fp32).
        exp_avg_sq: Second AdamW moment per selected entry (fp32).
        step: Optimizer steps taken by this parameter (bias correction); kept across re-selections.
        master: fp32 values of the selected entries when the weight is not fp32, else ``None``.
    """

    indices: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int = 0
    master: torch.Tensor | None = None

    @classmethod
    def create(cls, param: torch.Tensor, indices: torch.Tensor) -> CompactState:
        """Fresh state (zero moments, step 0) for ``indices`` of ``param``."""
        idx = indices.to(device=param.device, dtype=_index_dtype(param.numel()))
        k = idx.numel()
        zeros = torch.zeros(k, dtype=torch.float32, device=param.device)
        master = None if param.dtype == torch.float32 else param.detach().reshape(-1)[idx].float()
        return cls(idx, zeros, zeros.clone(), 0, master)

    @property
    def numel(self) -> int:
        """Number of selected entries."""
        return self.indices.numel()

    @property
    def nbytes(self) -> int:
        """Bytes held: indices, moments and the master copy."""
        tensors = [self.indices, self.exp_avg, self.exp_avg_sq] + ([self.master] if self.master is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def remap(self, param: torch.Tensor, indices: torch.Tensor) -> CompactState:
        """The state for a new selection: entries kept in both keep their moments, new entries start at zero.

        The step count is kept (LIFT's Algorithm 1 does not reset bias correction when the mask changes).
        """
        new = CompactState.create(param, indices)
        dense = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
        for old_m, new_m in ((self.exp_avg, new.exp_avg), (self.exp_avg_sq, new.exp_avg_sq)):
            dense.zero_()
            dense[self.indices] = old_m
            new_m.copy_(dense[new.indices])
        if self.master is not None and new.master is not None:
            kept = torch.zeros(param.numel(), dtype=torch.bool, device=param.device)
            kept[self.indices] = True
            dense[self.indices] = self.master
            take = kept[new.indices]
            new.master[take] = dense[new.indices][take]
        new.step = self.step
        return new

    def state_dict(self) -> dict[str, Any]:
        """CPU tensors and the step, for checkpoints."""
        out: dict[str, Any] = {
            "indices": self.indices.cpu(), "exp_avg": self.exp_avg.cpu(), "exp_avg_sq": self.exp_avg_sq.cpu(),
            "step": self.step,
        }  # fmt: skip
        if self.master is not None:
            out["master"] = self.master.cpu()
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], param: torch.Tensor) -> CompactState:
        """Rebuild on ``param``'s device."""
        dev = param.device
        master = state.get("master")
        return cls(
            state["indices"].to(dev), state["exp_avg"].to(dev), state["exp_avg_sq"].to(dev), int(state["step"]),
            master.to(dev) if master is not None else None,
        )  # fmt: skip


@torch.no_grad()
def mask_gradient_(grad: torch.Tensor, indices: torch.Tensor) -> None:
    """Zero every gradient entry outside ``indices``, in place."""
    flat = grad.view(-1)
    kept = flat[indices]
    flat.zero_()
    flat[indices] = kept
