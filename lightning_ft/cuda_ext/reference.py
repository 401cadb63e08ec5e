"""Pure-PyTorch references of the kernels: the ground truth the kernels are tested against, and the fallback.

They import nothing from lightning_ft outside ``cuda_ext`` (the methods call them through
:mod:`~lightning_ft.cuda_ext.dispatch`), so their math lives here:

* :func:`sparse_adamw_`: AdamW's arithmetic on a compact state (:class:`AdamWState`, e.g.
  :class:`lightning_ft.sparse.compact.CompactState`), operation for operation that of ``torch.optim.AdamW``'s
  single-tensor path, so at density 1 it reproduces AdamW bit for bit.
* :func:`copilot_error`: ``onehot(target) - softmax(logits)`` in fp32 per row, stored compactly.
* :func:`pack_bits` / :func:`unpack_bits`: ComPEFT's bit packing (nonzero -> 1, 8 per byte, little bit order:
  the bytes of ``numpy.packbits(..., bitorder="little")``), kept on the input's device.
"""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["IGNORE_INDEX", "AdamWState", "copilot_error", "pack_bits", "sparse_adamw_", "unpack_bits"]

IGNORE_INDEX = -100


@torch.no_grad()
def copilot_error(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """The per-token error the copilot learns from: ``onehot(target) - softmax(logits)`` over the vocabulary.

    The softmax is computed in fp32 and only the result is rounded to ``dtype``: bf16 by default, which halves
    the bytes of the error log against fp32 while every entry keeps 8 significant bits (entries lie in [-1, 1]).
    Rows whose target is ``ignore_index`` (prompt or padding tokens) are all zero.

    Args:
        logits: ``[..., vocab]`` in any floating dtype and layout.
        targets: ``[...]`` integer token ids in ``[0, vocab)`` or ``ignore_index``.
        ignore_index: Target value of rows that carry no error.
        dtype: Storage dtype of the result (``bfloat16``, ``float16`` or ``float32``).

    Returns:
        ``[..., vocab]`` in ``dtype``, contiguous.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    valid = targets != ignore_index
    onehot = torch.zeros_like(probs)
    onehot.scatter_(-1, torch.where(valid, targets, 0).long().unsqueeze(-1), 1.0)
    error = torch.where(valid.unsqueeze(-1), onehot - probs, torch.zeros((), dtype=probs.dtype, device=probs.device))
    return error.to(dtype).contiguous()


class AdamWState(Protocol):
    """The compact optimizer state of one tensor that :func:`sparse_adamw_` updates in place.

    Attributes:
        indices: Flat positions of the selected entries (int32 or int64).
        exp_avg: First moment per selected entry (fp32).
        exp_avg_sq: Second moment per selected entry (fp32).
        step: Steps taken (bias correction); incremented by each step.
        master: fp32 values of the selected entries when the weight is not fp32, else ``None``.
    """

    indices: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int
    master: torch.Tensor | None


@torch.no_grad()
def sparse_adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: AdamWState,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    compact_grad: bool = False,
) -> None:
    """One AdamW step on the selected entries of ``param``; every other entry is left untouched.

    Args:
        param: The dense weight (contiguous), updated in place at ``state.indices`` only.
        grad: Its dense gradient (same shape), or with ``compact_grad`` the gradient at the selected entries only
            (one value per index, in ``state.indices``' order).
        state: The compact state, updated in place.
        lr: Learning rate.
        beta1: First-moment decay.
        beta2: Second-moment decay.
        eps: Denominator term.
        weight_decay: Decoupled weight decay, applied to the selected entries only.
        maximize: Ascend instead of descend.
        compact_grad: ``grad`` holds the selected entries only (no dense gradient exists).
    """
    flat = param.view(-1)
    idx = state.indices
    g = grad.reshape(-1).float() if compact_grad else grad.reshape(-1)[idx].float()
    if maximize:
        g = -g
    values = state.master if state.master is not None else flat[idx]
    state.step += 1
    if weight_decay != 0:
        values.mul_(1 - lr * weight_decay)
    state.exp_avg.lerp_(g, 1 - beta1)
    state.exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**state.step
    bias_correction2 = 1 - beta2**state.step
    step_size = lr / bias_correction1
    denom = (state.exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    values.addcdiv_(state.exp_avg, denom, value=-step_size)
    flat[idx] = values.to(param.dtype)


_BIT_WEIGHTS = tuple(1 << i for i in range(8))


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack ``bits`` (flattened; nonzero is 1) into uint8, 8 per byte, little bit order, on ``bits``' device.

    Byte ``j`` holds bits ``8j .. 8j+7``, bit ``8j + i`` in its ``2**i`` place; the last byte is padded with 0.
    """
    flat = (bits.detach().reshape(-1) != 0).to(torch.uint8)
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % 8)).view(-1, 8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bits.device)
    return (padded * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` bits of ``packed`` as a boolean tensor on its device."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.detach().reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:count].to(torch.bool)
