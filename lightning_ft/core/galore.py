"""GaLore: Adam moments of chosen matrices kept in a rank-``r`` subspace of their gradient.

GaLore (Zhao et al., ICML 2024, arXiv 2403.03507) projects the gradient ``G`` (``m x n``) of a weight
matrix onto ``r`` singular vectors of ``G``, refreshed every ``update_proj_gap`` steps, runs Adam on the
projected gradient and projects the normalised update back. ``proj_type="std"`` projects the smaller
side: for ``m >= n`` the basis is ``P = V_r^T`` (``r x n``, rows of ``Vh``), the low-rank gradient
``R = G P^T`` is ``m x r`` and the update is ``N P``; for ``m < n`` the basis is ``P = U_r`` (``m x r``),
``R = P^T G`` is ``r x n`` and the update is ``P N``. Each moment then holds ``r * max(m, n)`` entries
instead of ``m * n``, plus the ``r * min(m, n)`` basis.

:class:`GaLoreProjection` adds this to the ``torch.optim.Adam`` / ``AdamW`` a module already built: a
step pre-hook wraps the optimizer's closure, so after the backward pass and Lightning's gradient clipping
it updates the managed matrices itself (with their param group's learning rate, betas, eps and weight
decay, so the learning-rate schedule applies as usual) and hides their gradients from the optimizer's own
step. The low-rank moments and the basis live in ``optimizer.state[param]``, so they are saved and
restored with the optimizer, and evicting a parameter's state (layer sampling) evicts them too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from lightning_ft.core.shards import (
    gather_rows,
    guard_optimizer_state_init,
    initializing_optimizer_state,
    is_dtensor,
    local,
    rows_like,
    shard_info,
)

__all__ = ["GaLoreProjection", "galore_basis", "project", "project_back"]

BASIS_KEY = "galore_basis"


def galore_basis(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-``rank`` basis of ``grad`` on its smaller side (GaLore ``std``).

    Args:
        grad: A 2-D gradient ``m x n``.
        rank: The projection rank ``r`` (at most ``min(m, n)``).

    Returns:
        ``V_r^T`` (``r x n``) when ``m >= n``, else ``U_r`` (``m x r``), in float32.
    """
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    # a row-major copy: a slice would keep the whole min(m, n)^2 SVD factor alive as long as the basis is kept, and
    # LAPACK's factors are column-major, which a broadcast (raw storage) would read transposed on the other ranks
    return (vh[:rank] if grad.shape[0] >= grad.shape[1] else u[:, :rank]).clone(memory_format=torch.contiguous_format)


def project(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The low-rank gradient: ``G P^T`` (``m x r``) for ``m >= n``, else ``P^T G`` (``r x n``)."""
    grad = grad.float()
    return grad @ basis.T if grad.shape[0] >= grad.shape[1] else basis.T @ grad


def project_back(low_rank: torch.Tensor, basis: torch.Tensor, shape: torch.Size, scale: float) -> torch.Tensor:
    """The full-size update ``scale * N P`` (``m >= n``) or ``scale * P N`` (``m < n``) for a weight of ``shape``."""
    full = low_rank @ basis if shape[0] >= shape[1] else basis @ low_rank
    return full * scale


class GaLoreProjection:
    """GaLore for chosen 2-D parameters of an existing ``torch.optim.Adam`` / ``AdamW``.

    Attach it to the optimizer once it exists (``on_fit_start``); only parameters of ``params`` that have
    a gradient at a step are updated by it, so frozen ones cost nothing. The Adam arithmetic is torch's
    (``eps`` added to ``sqrt(v_hat)``; decoupled weight decay ``p *= 1 - lr * wd`` before the update for
    ``AdamW``, L2 added to the gradient before the projection for ``Adam``); the moments and the basis are
    kept through a basis refresh, as in GaLore.

    Args:
        rank: Projection rank ``r``. A matrix whose smaller side is not above ``r`` would not save memory
            and is left to the optimizer's plain Adam (see :meth:`eligible`).
        update_proj_gap: Steps between two SVDs of a matrix's gradient (its own step count: the first
            step and every ``update_proj_gap``-th after it).
        scale: Factor on the projected-back update (GaLore's ``scale``).
    """

    def __init__(self, rank: int, update_proj_gap: int = 100, scale: float = 1.0) -> None:
        if rank < 1 or update_proj_gap < 1:
            raise ValueError(
                f"galore_rank={rank} and galore_update_proj_gap={update_proj_gap} must be positive integers."
            )
        if not scale > 0:
            raise ValueError(f"galore_scale={scale} must be positive.")
        self.rank = rank
        self.update_proj_gap = update_proj_gap
        self.scale = float(scale)
        self._managed: dict[int, torch.nn.Parameter] = {}
        self._handles: list[RemovableHandle] = []

    def eligible(self, param: torch.Tensor) -> bool:
        """Whether ``param`` is a matrix whose rank-``r`` projection is smaller than itself."""
        return param.ndim == 2 and min(param.shape) > self.rank

    def attach(self, optimizers: Iterable[torch.optim.Optimizer], params: Iterable[torch.nn.Parameter]) -> int:
        """Manage the eligible ``params`` in every optimizer that holds them.

        Args:
            optimizers: The optimizers built by ``configure_optimizers``.
            params: Candidate parameters; those that fail :meth:`eligible` are left to the optimizer.

        Returns:
            The number of managed parameters an optimizer holds (what GaLore will update).

        Raises:
            TypeError: If an optimizer holding a managed parameter is not ``Adam`` / ``AdamW``.
            ValueError: If such an optimizer uses ``amsgrad``, ``maximize`` or ``differentiable``.
        """
        self.detach()
        self._managed = {id(p): p for p in params if self.eligible(p)}
        if any(is_dtensor(p) for p in self._managed.values()):
            guard_optimizer_state_init()  # tell torch's state-initialising checkpoint step from a real one
        count = 0
        for optimizer in optimizers:
            held = [p for g in optimizer.param_groups for p in g["params"] if id(p) in self._managed]
            if not held:
                continue
            _check_optimizer(optimizer, self.rank)
            self._handles.append(optimizer.register_step_pre_hook(self._pre_hook))
            count += len(held)
        return count

    def detach(self) -> None:
        """Remove the hooks (the optimizer steps every parameter itself again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre_hook(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer itself
        if closure is None:  # gradients are ready (e.g. AMP's scaler calls step() after unscaling, or manual steps)
            self.step(optimizer)
            return None

        def wrapped() -> Any:
            loss = closure()
            self.step(optimizer)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": wrapped}
        return (args[0], wrapped, *args[2:]), kwargs

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Update every managed parameter of ``optimizer`` that has a gradient, then hide that gradient."""
        for group in optimizer.param_groups:
            for param in group["params"]:
                if id(param) in self._managed and param.grad is not None:
                    self._update(param, optimizer.state[param], group)
                    param.grad = None

    def _update(self, param: torch.nn.Parameter, state: dict[str, Any], group: dict[str, Any]) -> None:
        lr, (beta1, beta2), eps, decay = float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
        weight = local(param)  # this process's rows under FSDP2, else the whole matrix
        grad = local(param.grad).float()
        decoupled = group.get("decoupled_weight_decay", False)
        if decay and not decoupled:
            grad = grad + decay * weight.float()
        if initializing_optimizer_state():  # torch's zero-gradient step before a distributed checkpoint
            if not state:
                self._shaped_state(param, state)
            return
        if not state:
            state["step"] = torch.tensor(0.0)
        step = int(state["step"])
        if step % self.update_proj_gap == 0 or BASIS_KEY not in state:
            state[BASIS_KEY] = self._basis(param, grad)
        basis = local(state[BASIS_KEY]).float()
        tall = param.shape[0] >= param.shape[1]
        low = grad @ basis.T if tall else basis.T @ grad  # a wide matrix's P^T G sums over every process's rows
        if not tall and is_dtensor(param):
            torch.distributed.all_reduce(low, group=param.device_mesh.get_group())
        if "exp_avg" not in state:
            state["exp_avg"] = self._moment(param, low.shape)
            state["exp_avg_sq"] = self._moment(param, low.shape)
        state["step"] += 1
        step += 1
        exp_avg, exp_avg_sq = local(state["exp_avg"]), local(state["exp_avg_sq"])
        exp_avg.lerp_(low.to(exp_avg.dtype), 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(low.to(exp_avg_sq.dtype), low.to(exp_avg_sq.dtype), value=1 - beta2)
        bias1, bias2 = 1 - beta1**step, 1 - beta2**step
        normalised = exp_avg.float() / bias1 / ((exp_avg_sq.float() / bias2).sqrt() + eps)
        if decay and decoupled:
            weight.mul_(1 - lr * decay)
        update = normalised @ basis if tall else basis @ normalised  # this process's rows of N P or P N
        weight.add_((update * self.scale).to(weight.dtype), alpha=-lr)

    def _basis(self, param: torch.nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
        """The new basis of ``param`` from its (this process's rows of the) gradient ``grad``.

        Under FSDP2 the SVD needs the whole gradient: the rows are gathered (one matrix at a time), the first process
        of the mesh computes the basis and sends it to the others (so no two processes hold different bases), and a
        wide matrix keeps its own rows of ``U_r``, sharded like the weight; a tall one's ``V_r^T`` is replicated.
        """
        if not is_dtensor(param):
            return galore_basis(grad, self.rank).to(param.dtype)
        group = param.device_mesh.get_group()
        whole = gather_rows(grad, param)
        tall = param.shape[0] >= param.shape[1]
        shape = (self.rank, param.shape[1]) if tall else (param.shape[0], self.rank)
        first = torch.distributed.get_global_rank(group, 0)
        if torch.distributed.get_rank() == first:
            basis = galore_basis(whole, self.rank)
        else:
            basis = torch.empty(shape, dtype=torch.float32, device=whole.device)
        del whole
        torch.distributed.broadcast(basis, src=first, group=group)
        basis = basis.to(param.dtype)
        if tall:
            return basis
        start, rows = shard_info(param)  # type: ignore[misc]
        return rows_like(basis[start : start + rows].clone(), param, shape)

    def _moment(self, param: torch.nn.Parameter, low_shape: torch.Size) -> torch.Tensor:
        """A zero moment for the low-rank gradient: a tall matrix's ``m x r`` is sharded by rows like the weight."""
        zeros = torch.zeros(low_shape, dtype=param.dtype, device=local(param).device)
        if is_dtensor(param) and param.shape[0] >= param.shape[1]:
            return rows_like(zeros, param, (param.shape[0], self.rank))
        return zeros

    def _shaped_state(self, param: torch.nn.Parameter, state: dict[str, Any]) -> None:
        """State of the right shapes and placements (zeros, step 0) for a distributed checkpoint to load into."""
        m, n = param.shape
        rows = local(param).shape[0]
        tall = m >= n
        basis = torch.zeros(
            (self.rank, n) if tall else (rows, self.rank), dtype=param.dtype, device=local(param).device
        )
        state["step"] = torch.tensor(0.0)
        state[BASIS_KEY] = basis if tall or not is_dtensor(param) else rows_like(basis, param, (m, self.rank))
        low = torch.Size((rows, self.rank) if tall else (self.rank, n))
        state["exp_avg"], state["exp_avg_sq"] = self._moment(param, low), self._moment(param, low)


def _check_optimizer(optimizer: torch.optim.Optimizer, rank: int) -> None:
    if not isinstance(optimizer, torch.optim.Adam):  # AdamW subclasses Adam
        raise TypeError(
            f"galore_rank={rank} keeps Adam moments in the low-rank space and needs a torch.optim.AdamW or Adam from "
            f"configure_optimizers, got {type(optimizer).__name__}: return AdamW or set galore_rank=None."
        )
    for group in optimizer.param_groups:
        unsupported = [k for k in ("amsgrad", "maximize", "differentiable") if group.get(k)]
        if unsupported:
            raise ValueError(
                f"galore_rank={rank} does not support the optimizer's {unsupported[0]}=True: turn it off or set "
                "galore_rank=None."
            )
