"""One dispatch point per kernel: the CUDA kernel when the tensors are on CUDA and the library builds, the
pure-PyTorch reference otherwise.

The first fallback of each kernel for each reason is announced once (a warning on a CUDA tensor, where a
kernel was expected; an info log on CPU, where the reference is the normal path). ``LIGHTNING_FT_FORCE_REFERENCE=1``
forces the references everywhere (read at every call, so tests and benchmarks can flip it).
"""

from __future__ import annotations

import ctypes
import logging
import os
import warnings
from typing import Any, Literal

import torch

from lightning_ft.cuda_ext import _build, reference

__all__ = ["FORCE_REFERENCE_ENV", "backend", "copilot_error", "pack_bits", "sparse_adamw_", "unpack_bits"]

FORCE_REFERENCE_ENV = "LIGHTNING_FT_FORCE_REFERENCE"
Backend = Literal["kernel", "reference"]
_log = logging.getLogger(__name__)
_library: ctypes.CDLL | None = None
_library_error: str | None = None
_noticed: set[tuple[str, str]] = set()
_FLOATS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _notice(kernel: str, reason: str, on_cuda: bool) -> None:
    if (kernel, reason) in _noticed:
        return
    _noticed.add((kernel, reason))
    message = f"lightning_ft.cuda_ext: {kernel} uses the PyTorch reference ({reason})."
    if on_cuda:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    else:
        _log.info(message)


def _load() -> ctypes.CDLL | None:
    """Build (once per process) and load the kernel library for the current device; ``None`` if that fails."""
    global _library, _library_error
    if _library is None and _library_error is None:
        try:
            major, minor = torch.cuda.get_device_capability()
            _library = _build.load_library(_build.build(f"{major}{minor}"))
        except Exception as err:  # noqa: BLE001 - any build or load failure means: use the reference
            _library_error = f"the kernel build failed: {err}"
    return _library


def backend(kernel: str, *tensors: torch.Tensor) -> Backend:
    """Which implementation ``kernel`` uses for these tensors (announcing a fallback once)."""
    on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
    if os.environ.get(FORCE_REFERENCE_ENV, "0") not in ("", "0"):
        _notice(kernel, f"{FORCE_REFERENCE_ENV} is set", on_cuda)
        return "reference"
    if not on_cuda:
        _notice(kernel, "the tensors are not on a CUDA device", False)
        return "reference"
    if _load() is None:
        _notice(kernel, _library_error or "the kernel library is unavailable", True)
        return "reference"
    return "kernel"


def _launch(name: str, *args: Any) -> None:
    assert _library is not None
    code = getattr(_library, name)(*args)
    if code != 0:
        raise RuntimeError(f"lightning_ft.cuda_ext: {name} failed with cudaError {code}; set {FORCE_REFERENCE_ENV}=1 "
                           "to use the PyTorch reference.")  # fmt: skip


def _stream(t: torch.Tensor) -> int:
    return int(torch.cuda.current_stream(t.device).cuda_stream)


@torch.no_grad()
def sparse_adamw_(
    param: torch.Tensor, grad: torch.Tensor, state: reference.AdamWState, *, lr: float, beta1: float, beta2: float,
    eps: float, weight_decay: float, maximize: bool = False, compact_grad: bool = False,
) -> None:  # fmt: skip
    """Fused compact AdamW step (see :func:`lightning_ft.cuda_ext.reference.sparse_adamw_`, its reference).

    The kernel runs for fp32, bf16 and fp16 weights and gradients on CUDA with a contiguous weight and a dense
    gradient; a compact gradient (``compact_grad``: one value per selected entry) takes the reference's arithmetic,
    which is a handful of elementwise ops on the ``K`` selected entries on any device.
    """
    if compact_grad:
        reference.sparse_adamw_(param, grad, state, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                weight_decay=weight_decay, maximize=maximize, compact_grad=True)  # fmt: skip
        return
    kernel_ok = param.dtype in _FLOATS and grad.dtype in _FLOATS and param.is_contiguous()
    if not kernel_ok or backend("sparse_adamw", param, grad, state.indices) == "reference":
        reference.sparse_adamw_(param, grad, state, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                weight_decay=weight_decay, maximize=maximize)  # fmt: skip
        return
    g = grad.contiguous()
    idx = state.indices.contiguous()
    state.step += 1
    master = state.master.data_ptr() if state.master is not None else None
    _launch(
        "lft_sparse_adamw", param.data_ptr(), _FLOATS[param.dtype], g.data_ptr(), _FLOATS[g.dtype], idx.data_ptr(),
        int(idx.dtype == torch.int64), idx.numel(), state.exp_avg.data_ptr(), state.exp_avg_sq.data_ptr(), master,
        1 - beta1, beta2, 1 - beta2, eps, 1 - lr * weight_decay, lr / (1 - beta1**state.step),
        (1 - beta2**state.step) ** 0.5, int(maximize), _stream(param),
    )  # fmt: skip


@torch.no_grad()
def copilot_error(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = reference.IGNORE_INDEX,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``onehot(target) - softmax(logits)`` in fp32 per row, stored in ``dtype`` (bf16 by default); see
    :func:`lightning_ft.cuda_ext.reference.copilot_error`. Targets must be in ``[0, vocab)`` or ``ignore_index``."""
    kernel_ok = logits.dtype in _FLOATS and dtype in _FLOATS and logits.dim() >= 1
    if not kernel_ok or backend("copilot_error", logits, targets) == "reference":
        return reference.copilot_error(logits, targets, ignore_index, dtype)
    vocab = logits.shape[-1]
    rows2d = logits if logits.stride(-1) == 1 else logits.contiguous()
    rows2d = rows2d.reshape(-1, vocab)
    if rows2d.shape[0] > 1 and rows2d.stride(-1) != 1:
        rows2d = rows2d.contiguous()
    tgt = targets.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty((rows2d.shape[0], vocab), dtype=dtype, device=logits.device)
    row_stride = rows2d.stride(0) if rows2d.shape[0] > 1 else vocab
    _launch("lft_copilot_error", rows2d.data_ptr(), _FLOATS[rows2d.dtype], rows2d.shape[0], vocab, row_stride,
            tgt.data_ptr(), ignore_index, out.data_ptr(), _FLOATS[dtype], _stream(logits))  # fmt: skip
    return out.reshape(*logits.shape)


@torch.no_grad()
def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack ``bits`` (flattened; nonzero is 1) into uint8, 8 per byte, little bit order (ComPEFT's format)."""
    if backend("pack_bits", bits) == "reference":
        return reference.pack_bits(bits)
    flat = bits.reshape(-1)
    flat = (
        flat.contiguous().view(torch.uint8)
        if flat.dtype in (torch.bool, torch.uint8)
        else (flat != 0).view(torch.uint8)
    )
    flat = flat.contiguous()
    out = torch.empty((flat.numel() + 7) // 8, dtype=torch.uint8, device=bits.device)
    _launch("lft_pack_bits", flat.data_ptr(), flat.numel(), out.data_ptr(), _stream(bits))
    return out


@torch.no_grad()
def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` bits of ``packed`` (uint8, little bit order) as a boolean tensor."""
    if count > packed.numel() * 8:
        raise ValueError(f"count={count} exceeds the {packed.numel() * 8} bits of the packed tensor.")
    if backend("unpack_bits", packed) == "reference":
        return reference.unpack_bits(packed, count)
    src = packed.contiguous()
    out = torch.empty(count, dtype=torch.uint8, device=packed.device)
    _launch("lft_unpack_bits", src.data_ptr(), count, out.data_ptr(), _stream(packed))
    return out.view(torch.bool)
