"""Selection rules of :class:`~lightning_ft.callbacks.SparseFineTuning`: which entries of each eligible tensor train.

A rule scores every entry (non-negative, larger = keep); the callback turns the scores into indices under the
budget (a global top-k, or a top-k per matrix). Rules also say *when* they select:

* :class:`LotteryTicket` (LT-SFT, Ansell et al. 2022): after ``dense_steps`` of dense training, |theta - theta_0|;
  the callback then rewinds every trained tensor to theta_0 and builds a fresh optimizer and schedule for the
  sparse phase.
* :class:`PrincipalWeights` (LIFT, Liu et al. 2025): |W'| of a rank-``filter_rank`` approximation of each
  matrix, re-selected every ``reselect_every`` steps (default 200, the official CLI's) with the moments of kept
  entries carried over.

Re-selection follows the official LIFT optimizer: after optimizer step ``s`` (counted from 1) when
``(s + 1) % reselect_every == 0``, i.e. after steps ``every - 1``, ``2 * every - 1``...
* :class:`Sensitivity` (SPT-style, He et al. 2023): the sum of squared gradients over ``batches`` training
  batches, before training.
* :class:`Magnitude` and :class:`Random`: baselines.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import lightning as L
import torch

from lightning_ft.core.shards import local
from lightning_ft.core.snapshot import PretrainedSnapshot

__all__ = [
    "LotteryTicket",
    "Magnitude",
    "PrincipalWeights",
    "Random",
    "SelectionContext",
    "SelectionRule",
    "Sensitivity",
]


@dataclass
class SelectionContext:
    """What a rule may look at when it scores.

    Attributes:
        model: The transformers model.
        params: Canonical name -> eligible parameter, in model order.
        snapshot: The shared theta_0.
        event: The selection number (0 for the first selection of the run).
        seed: The callback's seed.
        trainer: The Trainer (``None`` when scoring outside a fit).
        pl_module: The LightningModule (``None`` outside a fit).
    """

    model: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    snapshot: PretrainedSnapshot | None
    event: int
    seed: int
    trainer: L.Trainer | None = None
    pl_module: L.LightningModule | None = None


class SelectionRule:
    """Base class: score entries; optionally train densely first or re-select periodically.

    Attributes:
        default_budget: Budget used when the callback is given none (``density``, ``count`` or ``rank``).
        default_allocation: ``global`` (one top-k over all eligible entries) or ``per_matrix``.
        matrices_only: Whether every eligible tensor must be 2-D.
        whole_tensor: Whether scoring needs each tensor whole (see below).

    Under FSDP2 a parameter is a row-sharded ``DTensor``: a rule scores this process's rows (``local(param)``) unless
    it sets ``whole_tensor``; a score with the parameter's full shape is cut to the process's rows by the callback.
    """

    default_budget: ClassVar[dict[str, float]] = {"density": 0.01}
    default_allocation: ClassVar[str] = "global"
    matrices_only: ClassVar[bool] = False
    #: whether :meth:`score` needs each whole tensor: under FSDP2 the callback then gathers one tensor at a time and
    #: keeps its process's rows of the scores; otherwise :meth:`score` gets the sharded parameter and scores the
    #: process's own rows (``local``)
    whole_tensor: ClassVar[bool] = False

    @property
    def dense_steps(self) -> int:
        """Optimizer steps of dense training before the first selection (0: select when fit starts)."""
        return 0

    @property
    def reselect_every(self) -> int | None:
        """Re-select every this many optimizer steps (``None``: never), after step ``s`` when
        ``(s + 1) % reselect_every == 0``."""
        return None

    def prepare(self, ctx: SelectionContext) -> None:
        """Gather what scoring needs (e.g. gradients) before :meth:`score` is called."""

    def score(self, ctx: SelectionContext, name: str, param: torch.Tensor) -> torch.Tensor:
        """Non-negative fp32 scores with ``param``'s shape; larger scores are kept first."""
        raise NotImplementedError

    def finish(self) -> None:
        """Release what :meth:`prepare` gathered."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Magnitude(SelectionRule):
    """Keep the largest |theta| (of the weights when the selection happens)."""

    def score(self, ctx: SelectionContext, name: str, param: torch.Tensor) -> torch.Tensor:
        return local(param.detach()).float().abs()


class Random(SelectionRule):
    """Keep uniformly random entries: a pure function of (seed, selection number, tensor name).

    Args:
        reselect_every: Draw a new random mask every this many optimizer steps (``None``: once).
    """

    default_allocation: ClassVar[str] = "per_matrix"

    def __init__(self, reselect_every: int | None = None) -> None:
        if reselect_every is not None and reselect_every < 1:
            raise ValueError(f"reselect_every={reselect_every} must be a positive number of steps or None.")
        self._every = reselect_every

    @property
    def reselect_every(self) -> int | None:
        return self._every

    def score(self, ctx: SelectionContext, name: str, param: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(zlib.crc32(f"{ctx.seed}/{ctx.event}/{name}".encode()))
        return torch.rand(param.shape, generator=gen).to(param.device)


class LotteryTicket(SelectionRule):
    """LT-SFT: dense phase, keep the entries that moved most from theta_0, rewind, train only those.

    Args:
        dense_steps: Optimizer steps of the dense phase (the sparse phase is the rest of ``max_steps``).
        l1: Weight of the L1 pull toward theta_0, ``l1 * sum |theta - theta_0| / N`` over the eligible entries
            with N the model's parameter count (as in the official code), added to the gradient once per
            optimizer step (official default 0.0; its MLM scripts use 0.1).
        l1_phase: Apply the L1 pull in the ``dense`` phase, the ``sparse`` phase or ``both``.
    """

    def __init__(self, dense_steps: int = 100, l1: float = 0.0, l1_phase: Literal["dense", "sparse", "both"] = "both"):
        if dense_steps < 1:
            raise ValueError(
                f"dense_steps={dense_steps} must be at least 1: LotteryTicket selects after a dense phase."
            )
        if l1 < 0:
            raise ValueError(f"l1={l1} must be zero or positive.")
        if l1_phase not in ("dense", "sparse", "both"):
            raise ValueError(f"l1_phase={l1_phase!r} must be 'dense', 'sparse' or 'both'.")
        self._dense_steps = dense_steps
        self.l1 = l1
        self.l1_phase = l1_phase

    @property
    def dense_steps(self) -> int:
        return self._dense_steps

    def score(self, ctx: SelectionContext, name: str, param: torch.Tensor) -> torch.Tensor:
        assert ctx.snapshot is not None
        theta0 = ctx.snapshot.get_local(name, param, dtype=torch.float32)
        return (local(param.detach()).float() - theta0).abs_()


class PrincipalWeights(SelectionRule):
    """LIFT: keep the largest entries of a rank-``filter_rank`` approximation of each matrix.

    Only 2-D tensors are scored: 1-D tensors among the callback's ``targets`` (e.g. Qwen2's q/k/v biases) are
    skipped with one logged line and stay frozen.

    Args:
        filter_rank: Rank r of the approximation W' = U_r S_r V_r^T (fp32 SVD).
        reselect_every: Re-select every this many optimizer steps (default 200, the official CLI's
            ``update_interval``; its released configs use 400 or 2000; ``None``: select once), after step ``s``
            when ``(s + 1) % reselect_every == 0`` as the official optimizer; moments of entries kept in both
            masks carry over, new entries start at zero, bias correction continues.
        largest: Keep the largest |W'| (the paper). ``False`` keeps the smallest, which is what the official
            code's released configs do (its ``lift_sparse`` mask type contains no "largest"); for reproduction only.
        svd: ``full`` (exact ``torch.linalg.svd``) or ``lowrank`` (``torch.svd_lowrank`` with 2r columns, for large
            matrices).
    """

    default_budget: ClassVar[dict[str, float]] = {"rank": 8}
    default_allocation: ClassVar[str] = "per_matrix"
    matrices_only: ClassVar[bool] = True
    whole_tensor: ClassVar[bool] = True  # the SVD of the whole matrix

    def __init__(
        self,
        filter_rank: int = 32,
        reselect_every: int | None = 200,
        largest: bool = True,
        svd: Literal["full", "lowrank"] = "full",
    ) -> None:
        if filter_rank < 1:
            raise ValueError(f"filter_rank={filter_rank} must be at least 1.")
        if reselect_every is not None and reselect_every < 1:
            raise ValueError(f"reselect_every={reselect_every} must be a positive number of steps or None.")
        if svd not in ("full", "lowrank"):
            raise ValueError(f"svd={svd!r} must be 'full' or 'lowrank'.")
        self.filter_rank = filter_rank
        self._every = reselect_every
        self.largest = largest
        self.svd = svd

    @property
    def reselect_every(self) -> int | None:
        return self._every

    def low_rank(self, weight: torch.Tensor) -> torch.Tensor:
        """The rank-``filter_rank`` approximation of a matrix, in fp32."""
        w = weight.detach().float()
        r = min(self.filter_rank, *w.shape)
        if self.svd == "lowrank" and 2 * r < min(w.shape):
            gen_state = torch.random.get_rng_state()
            torch.manual_seed(0)  # svd_lowrank is randomized: fix it so that every rank and run agree
            try:
                u, s, v = torch.svd_lowrank(w, q=2 * r, niter=4)
            finally:
                torch.random.set_rng_state(gen_state)
            return (u[:, :r] * s[:r]) @ v[:, :r].T
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return (u[:, :r] * s[:r]) @ vh[:r]

    def score(self, ctx: SelectionContext, name: str, param: torch.Tensor) -> torch.Tensor:
        approx = self.low_rank(param).abs_()
        return approx if self.largest else approx.max() - approx


class Sensitivity(SelectionRule):
    """SPT-style sensitivity: the sum over ``batches`` training batches of each entry's squared gradient.

    The batches come from a fresh iterator over the training data (so the fit's own data order is untouched),
    the model stays in train mode, gradients are squared in fp32, and the global random state is left as it was.

    Args:
        batches: Number of training batches (the SPT code uses 16).
    """

    def __init__(self, batches: int = 16) -> None:
        if batches < 1:
            raise ValueError(f"batches={batches} must be at least 1.")
        self.batches = batches
        self._grad_sq: dict[str, torch.Tensor] = {}

    def prepare(self, ctx: SelectionContext) -> None:
        if ctx.trainer is None or ctx.pl_module is None:
            raise ValueError("Sensitivity scores from training batches, so it can only select inside a fit.")
        module, trainer = ctx.pl_module, ctx.trainer
        self._grad_sq = {n: torch.zeros_like(local(p), dtype=torch.float32) for n, p in ctx.params.items()}
        saved = {n: p.grad for n, p in ctx.params.items()}
        devices = [module.device] if module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.manual_seed(ctx.seed)
            for i, batch in zip(range(self.batches), _fresh_batches(trainer)):
                batch = trainer.strategy.batch_to_device(batch)
                for p in ctx.params.values():
                    p.grad = None
                _loss(module, batch).backward()
                for n, p in ctx.params.items():
                    if p.grad is not None:
                        grad = local(p.grad).float()  # under FSDP2: this process's rows of the averaged gradient
                        self._grad_sq[n].addcmul_(grad, grad)
        for n, p in ctx.params.items():
            p.grad = saved[n]
        for p in module.parameters():  # frozen or non-eligible tensors must not carry this pass's gradients
            if p.grad is not None and not any(p is q for q in ctx.params.values()):
                p.grad = None

    def score(self, ctx: SelectionContext, name: str, param: torch.Tensor) -> torch.Tensor:
        return self._grad_sq[name]

    def finish(self) -> None:
        self._grad_sq = {}


def _fresh_batches(trainer: L.Trainer) -> Iterator[Any]:
    """A new iterator over the fit's training data (datamodule or dataloader passed to ``fit``)."""
    datamodule = trainer.datamodule
    if datamodule is not None:
        loader = datamodule.train_dataloader()
    else:
        loader = trainer.fit_loop._data_source.dataloader()
    return iter(loader)


def _loss(module: L.LightningModule, batch: Any) -> torch.Tensor:
    """The module's training loss for one batch, without logging."""
    compute = getattr(module, "compute_loss", None)
    if callable(compute):
        return compute(batch)
    raise ValueError(
        f"Sensitivity needs {type(module).__name__}.compute_loss(batch) -> loss to score entries without running "
        "training_step: add that method (CausalLMModule and SequenceClassificationModule have it)."
    )
