"""Weight gradients at the selected entries only: sparse fine-tuning without dense weight gradients.

Between two selections :class:`~lightning_ft.callbacks.SparseFineTuning` trains a fixed set of entries of each
eligible matrix. For an ``nn.Linear`` (``Y = X W^T + b``) the gradient of entry ``(i, j)`` is
``sum_t dY[t, i] X[t, j]``: a sampled product of the output gradient and the input, ``K * T`` multiply-adds for
``K`` selected entries and ``T`` tokens instead of the dense product's ``out * in * T``.

:func:`install` replaces the forward of the ``nn.Linear`` modules that own an eligible weight by
:class:`_SampledLinear` (an instance attribute: parameter and state-dict names do not change, so checkpoints and
export are untouched). Its backward computes the input and bias gradients as ``nn.Linear`` does and the weight
gradient only at the selected entries (``torch.sparse.sampled_addmm`` on the mask's CSR pattern, in fp32),
accumulated into :attr:`SampledGrad.grad` (compact, in the order of the sorted flat indices); the weight's own
``.grad`` stays ``None``, so no dense weight gradient is ever allocated. :func:`remove` puts the module back.
"""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

__all__ = ["SampledGrad", "install", "linear_owners", "remove", "sampled_product"]

_SLOT = "_lft_sampled_grad"  # the module attribute that holds its SampledGrad while installed


@dataclass
class SampledGrad:
    """The selected entries of one weight matrix and their accumulated gradient.

    Attributes:
        indices: Sorted flat positions of the selected entries (the compact state's indices).
        shape: ``(out_features, in_features)`` of the weight.
        crow: CSR row pointers of the selection (``out_features + 1`` entries).
        col: CSR column of each selected entry.
        grad: The accumulated gradient at the selected entries (fp32, ``indices``' order), ``None`` until a
            backward reaches the weight and after the optimizer consumed it.
    """

    indices: torch.Tensor
    shape: tuple[int, int]
    crow: torch.Tensor
    col: torch.Tensor
    grad: torch.Tensor | None = None

    @classmethod
    def of(cls, weight: torch.Tensor, indices: torch.Tensor) -> SampledGrad:
        """The pattern of ``indices`` (sorted flat positions) in the 2-D ``weight``."""
        rows, cols = weight.shape
        flat = indices.to(device=weight.device, dtype=torch.int64)
        if flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()):
            raise ValueError("SampledGrad needs sorted, unique flat indices.")
        dtype = torch.int32 if weight.numel() < 2**31 else torch.int64
        crow = torch.zeros(rows + 1, dtype=torch.int64, device=weight.device)
        crow[1:] = torch.bincount(flat // cols, minlength=rows).cumsum(0)
        return cls(indices, (rows, cols), crow.to(dtype), (flat % cols).to(dtype))

    def accumulate(self, grad_output: torch.Tensor, inputs: torch.Tensor) -> None:
        """Add ``dY^T X`` at the selected entries (``grad_output``: ``[..., out]``, ``inputs``: ``[..., in]``)."""
        rows, cols = self.shape
        values = sampled_product(grad_output.reshape(-1, rows), inputs.reshape(-1, cols), self.crow, self.col)
        if self.grad is None:
            self.grad = values
        else:
            self.grad.add_(values)


def sampled_product(a: torch.Tensor, b: torch.Tensor, crow: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """``(a^T b)`` at the entries of a CSR pattern, in fp32: ``out[k] = sum_t a[t, row_k] * b[t, col_k]``.

    Args:
        a: ``[T, rows]`` (the output gradient).
        b: ``[T, cols]`` (the input).
        crow: CSR row pointers of the pattern (``rows + 1``).
        col: CSR columns of the pattern, row-major order.

    Returns:
        The ``K = col.numel()`` values in row-major (sorted flat index) order, fp32.
    """
    rows, cols = a.shape[1], b.shape[1]
    mat1 = a.t().to(torch.float32).contiguous()  # [rows, T]: each dot product reads contiguous memory
    mat2 = b.t().to(torch.float32).contiguous().t()  # [T, cols], column-major
    zeros = torch.zeros(col.numel(), dtype=torch.float32, device=a.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta state"
        pattern = torch.sparse_csr_tensor(crow, col, zeros, size=(rows, cols), check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, mat1, mat2, beta=0.0).values()


class _SampledLinear(torch.autograd.Function):
    """``F.linear`` whose backward gives the weight no gradient and accumulates it at the selected entries."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, slot: SampledGrad
    ) -> torch.Tensor:
        ctx.save_for_backward(inputs, weight)
        ctx.slot = slot
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return F.linear(inputs, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
        inputs, weight = ctx.saved_tensors
        grad_input = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output.matmul(weight.to(grad_output.dtype)).to(inputs.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[1]:
            ctx.slot.accumulate(grad_output, inputs)
        return grad_input, None, grad_bias, None


def _sampled_forward(self: torch.nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    slot: SampledGrad = getattr(self, _SLOT)
    if not (torch.is_grad_enabled() and self.weight.requires_grad):
        return F.linear(inputs, self.weight, self.bias)
    return _SampledLinear.apply(inputs, self.weight, self.bias, slot)


def linear_owners(model: torch.nn.Module) -> dict[int, list[torch.nn.Linear]]:
    """``id(weight)`` -> the ``nn.Linear`` modules of ``model`` that own it as their ``weight``, for weights that
    no other module holds (a weight tied to an embedding also gets the embedding's dense gradient: left out)."""
    owners: dict[int, list[torch.nn.Linear]] = {}
    shared: set[int] = set()
    for module in model.modules():
        plain = type(module) is torch.nn.Linear and "forward" not in vars(module)  # plain, unpatched layers only
        for key, param in module._parameters.items():
            if param is None:
                continue
            if plain and key == "weight":
                owners.setdefault(id(param), []).append(module)  # type: ignore[arg-type]
            else:
                shared.add(id(param))
    return {k: v for k, v in owners.items() if k not in shared}


def install(module: torch.nn.Linear, slot: SampledGrad) -> None:
    """Route ``module``'s weight gradient into ``slot`` (its forward becomes :class:`_SampledLinear`)."""
    setattr(module, _SLOT, slot)
    module.forward = types.MethodType(_sampled_forward, module)  # type: ignore[method-assign]


def remove(module: torch.nn.Linear) -> None:
    """Undo :func:`install`: the module's own forward again."""
    if _SLOT in vars(module):
        delattr(module, _SLOT)
        vars(module).pop("forward", None)
