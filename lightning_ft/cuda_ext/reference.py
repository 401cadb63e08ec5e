"""Pure-PyTorch references of the kernels: the ground truth the kernels are tested against, and the fallback.

* :func:`sparse_adamw_` is :func:`lightning_ft.sparse.compact.sparse_adamw_` (AdamW's arithmetic, operation for
  operation, on the compact state).
* :func:`copilot_error` is written here: ``onehot(target) - softmax(logits)`` in fp32 per row, stored compactly.
* :func:`pack_bits` / :func:`unpack_bits` are ComPEFT's (:mod:`lightning_ft.merging.compeft`), kept on the input's
  device.
"""

from __future__ import annotations

import torch

from lightning_ft.merging import compeft
from lightning_ft.sparse.compact import sparse_adamw_

__all__ = ["IGNORE_INDEX", "copilot_error", "pack_bits", "sparse_adamw_", "unpack_bits"]

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


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """ComPEFT's :func:`~lightning_ft.merging.compeft.pack_bits` (nonzero -> 1, 8 per byte, little bit order),
    returned on ``bits``' device."""
    return compeft.pack_bits(bits.detach()).to(bits.device)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """ComPEFT's :func:`~lightning_ft.merging.compeft.unpack_bits`, returned on ``packed``' device."""
    return compeft.unpack_bits(packed.detach().cpu().contiguous(), count).to(packed.device)
