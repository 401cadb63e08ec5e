r"""
Multi-task mixing and the task-balanced loss
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

:class:`MultiTaskDataModule` mixes several instruction datasets by given weights (the "cocktail" of domain
tasks, general instructions and maths of Brief et al., arXiv 2410.01109) and tags each example with its task id.
:class:`TaskBalancedLossMixin` averages the loss per task instead of per token (MFTCoder, Liu et al.,
arXiv 2311.02303, ``case3``), so a task with long responses does not dominate one with short ones.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, cast

import torch
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_ft.core.host import MixinBase, ModuleHost, require_host
from lightning_ft.data.collate import IGNORE_INDEX, LMCollator, PromptCollator
from lightning_ft.data.control import ControlDataModule
from lightning_ft.data.instruction import InstructionDataModule
from lightning_ft.data.sampling import train_loader
from lightning_ft.modules.metrics import aligned_nll
from lightning_ft.objectives._common import check_fit_support
from lightning_ft.objectives.weights import TokenWeightedDataModule
from lightning_ft.support import MethodSupport

__all__ = [
    "MultiTaskDataModule",
    "build_task",
    "TaskBalance",
    "TaskBalancedLossMixin",
    "mix_counts",
    "task_balanced_loss",
]

TaskBalance = Literal["token", "sample", "task"]
# the arguments of the InstructionDataModule that loads the mixture's control set
_CONTROL_ARGS = ("control", "control_field", "control_size", "control_max_length", "eval_batch_size", "num_workers")


def mix_counts(weights: Sequence[float], total: int) -> list[int]:
    """Split ``total`` examples across tasks in proportion to ``weights`` (largest remainders, exact sum)."""
    norm = sum(weights)
    raw = [w / norm * total for w in weights]
    counts = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[i] += 1
    return counts


def build_task(spec: dict[str, Any] | InstructionDataModule) -> InstructionDataModule:
    """An instruction DataModule from its init arguments, or a ``{class_path, init_args}`` mapping (YAML).

    Built outside LightningCLI's instantiation (in ``setup``), so that each task keeps its own hyperparameters.
    """
    if isinstance(spec, InstructionDataModule):
        return spec
    from jsonargparse import ArgumentParser

    if not isinstance(spec, dict):
        raise ValueError(f"tasks entry {spec!r} is not a mapping: give each task as InstructionDataModule arguments.")
    spec = (
        dict(spec)
        if "class_path" in spec
        else {"class_path": "lightning_ft.data.InstructionDataModule", "init_args": dict(spec)}
    )
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(InstructionDataModule, "task", fail_untyped=False)
    try:
        config = parser.parse_object({"task": spec})
    except Exception as err:  # noqa: BLE001 - jsonargparse raises several types; the message names the field
        raise ValueError(
            f"tasks entry {spec} is not a valid InstructionDataModule config ({err}): fix its arguments."
        ) from None
    return parser.instantiate_classes(config).task


class MultiTaskDataModule(ControlDataModule):
    """Several instruction tasks mixed by weight into one training stream, each example tagged ``task_id``.

    Each task is given as the arguments of an :class:`~lightning_ft.data.InstructionDataModule` (a mapping of
    its init arguments, or ``{class_path, init_args}`` for a subclass such as
    :class:`~lightning_ft.objectives.TokenWeightedDataModule`; DataModule objects also work from Python);
    it defines the data, templates and splits, while its batch sizes and control set are ignored here. An
    epoch holds ``epoch_size`` examples, of which task ``i`` contributes ``weights[i] / sum(weights)``
    (drawn once, with ``seed``, without replacement while the task has enough examples, then cycling), so
    the mixture is fixed and a resumed run sees the same batches. Validation and test run every task's
    loader (their metrics are pooled) plus the control set.

    Args:
        tasks: The tasks, in task-id order.
        weights: Mixing weights (default: equal); any positive scale.
        epoch_size: Examples per epoch (default: all training examples of all tasks).
        seed: Seed of the mixture draw and of the shuffling.
        batch_size: Training batch size.
        eval_batch_size: Validation/test batch size.
        num_workers: DataLoader workers.
        **kwargs: the control set and tokenizer (``control``, ``control_field``, ``control_size``,
            ``control_max_length``, ``tokenizer``) of :class:`~lightning_ft.data.control.ControlDataModule`; the
            control set is evaluated as ``val/control_ppl``.
    """

    def __init__(
        self,
        tasks: list[dict[str, Any]],
        weights: list[float] | None = None,
        epoch_size: int | None = None,
        seed: int = 1234,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        if not tasks:
            raise ValueError("tasks is empty: list at least one task (InstructionDataModule arguments) under tasks.")
        if weights is not None and (len(weights) != len(tasks) or any(w < 0 for w in weights) or sum(weights) <= 0):
            raise ValueError(
                f"weights={weights} must hold one non-negative weight per task ({len(tasks)} tasks) "
                "with a positive sum."
            )
        if epoch_size is not None and epoch_size < 1:
            raise ValueError(f"epoch_size={epoch_size} must be at least 1 (or null for all training examples).")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch_size={batch_size} and eval_batch_size={eval_batch_size} must be at least 1.")
        super().__init__(**kwargs)
        for hparams in (self._hparams, self._hparams_initial):  # keep checkpoints loadable with weights_only=True
            hparams.pop("tasks", None)
        self.task_specs = list(tasks)
        self.tasks: list[InstructionDataModule] = []
        self.weights = list(weights) if weights is not None else [1.0] * len(tasks)
        self.epoch_size, self.seed = epoch_size, seed
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.control_args = {name: self.hparams[name] for name in _CONTROL_ARGS}
        self._control: InstructionDataModule | None = None
        self._train: list[dict[str, Any]] = []

    def setup(self, stage: str | None = None) -> None:
        """Build and prepare every task (same tokenizer) and draw the training mixture."""
        if self._train:
            return
        self.setup_tokenizer()
        self.tasks = [build_task(spec) for spec in self.task_specs]
        for task in self.tasks:
            if stage == "fit" and isinstance(task, TokenWeightedDataModule):
                task.check_weighting(self.trainer)
            task.tokenizer = self.tokenizer
            task.hparams["control"] = None  # the mixture's own control set is used
            task.setup(stage)
        self._control = InstructionDataModule(**self.control_args)
        self._control.tokenizer = self.tokenizer
        self._control._encoded = {"control": self._control._encode_control()}
        self._train = self._mixture()

    def _mixture(self) -> list[dict[str, Any]]:
        pools = [task._encoded["train"] for task in self.tasks]
        total = self.epoch_size or sum(len(p) for p in pools)
        rng = random.Random(self.seed)
        weighted = any("loss_weights" in ex for pool in pools for ex in pool[:1])
        mixed = []
        for task_id, (pool, count) in enumerate(zip(pools, mix_counts(self.weights, total))):
            if count > 0 and not pool:
                name = self.task_specs[task_id].get("dataset", "rotten_tomatoes")
                raise ValueError(
                    f"Task {task_id} ({name}) has weight {self.weights[task_id]} but no training examples: give it "
                    "training data (check its train_size and split sizes) or set its weight to 0."
                )
            order: list[int] = []
            while len(order) < count:
                order += rng.sample(range(len(pool)), len(pool))
            for index in order[:count]:
                example = {**pool[index], "task_id": task_id}
                if weighted and "loss_weights" not in example:
                    example["loss_weights"] = [1.0] * len(example["input_ids"])
                mixed.append(example)
        return mixed

    def task_sizes(self) -> list[int]:
        """Training examples per task in one epoch of the mixture."""
        sizes = [0] * len(self.tasks)
        for example in self._train:
            sizes[example["task_id"]] += 1
        return sizes

    @property
    def pad_token_id(self) -> int:
        """Padding id of the shared tokenizer."""
        return self.tasks[0].pad_token_id

    @property
    def label_options(self) -> list[str] | None:
        """The class values of the first task (for reports)."""
        return self.tasks[0].label_options

    def control_dataloader(self) -> DataLoader | None:
        """The control (forgetting) text loader, or ``None``."""
        return self._control.control_dataloader() if self._control is not None else None

    def train_dataloader(self) -> DataLoader:
        return train_loader(
            self._train, self.batch_size, self.seed, self.trainer,
            collate_fn=LMCollator(self.pad_token_id), num_workers=self.num_workers,
        )  # fmt: skip

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        loaders = []
        for task in self.tasks:
            task.hparams["eval_batch_size"] = self.eval_batch_size
            name = split if task._encoded[split] else "val"
            loaders.append(task._eval_loader(name))
        control = self.control_dataloader()
        return loaders + ([control] if control is not None else [])

    def val_dataloader(self) -> Sequence[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> Sequence[DataLoader]:
        return self._eval_loaders("test")

    def predict_dataloader(self) -> DataLoader:
        task = self.tasks[0]
        return DataLoader(
            task._encoded["predict"], batch_size=self.eval_batch_size, collate_fn=PromptCollator(self.pad_token_id)
        )


def task_balanced_loss(
    nll: torch.Tensor,
    targets: torch.Tensor,
    task_id: torch.Tensor,
    weights: torch.Tensor | None = None,
    task_weights: Sequence[float] | None = None,
    mode: str = "task",
    normalize: str = "weights",
) -> torch.Tensor:
    """Per-token NLL ``[B, T]`` reduced per sample or per task instead of per token.

    ``sample``: the mean of the per-sample means. ``task``: ``sum_t w_t L_t / sum_t w_t`` over the tasks
    present in the batch, ``L_t`` the token mean over the task's examples (MFTCoder ``case3``); with
    ``task_weights`` ``None`` every ``w_t = 1``, i.e. the mean of the per-task means. Per-token
    ``weights`` (aligned with ``targets``) weight the tokens inside each mean, which then divides by the
    weight sum (``normalize="weights"``) or the token count (``"tokens"``).
    """
    mask = (targets != IGNORE_INDEX).to(nll.dtype)
    w = mask if weights is None else weights.to(nll.dtype) * mask
    sums = (nll * w).sum(dim=1)
    counts = w.sum(dim=1) if normalize == "weights" else mask.sum(dim=1)
    if mode == "sample":
        present = counts > 0
        return (sums[present] / counts[present]).mean() if bool(present.any()) else sums.sum() * 0.0
    size = int(task_id.max()) + 1 if task_weights is None else len(task_weights)
    if task_weights is not None and int(task_id.max()) >= size:
        raise ValueError(
            f"task_weights has {size} entries, but the batch holds task id {int(task_id.max())}: "
            "give one weight per task."
        )
    task_sums = torch.zeros(size, dtype=nll.dtype, device=nll.device).index_add(0, task_id, sums)
    task_counts = torch.zeros(size, dtype=nll.dtype, device=nll.device).index_add(0, task_id, counts)
    tw = (
        torch.ones(size, dtype=nll.dtype, device=nll.device)
        if task_weights is None
        else torch.tensor(list(task_weights), dtype=nll.dtype, device=nll.device)
    )
    present = task_counts > 0
    if not bool(present.any()):
        return sums.sum() * 0.0
    return (tw[present] * task_sums[present] / task_counts[present]).sum() / tw[present].sum()


class TaskBalancedLossMixin(MixinBase):
    """MFTCoder's balanced losses: average per task (or per sample), not per token.

    Mix into :class:`~lightning_ft.modules.CausalLMModule` (ready made as
    :class:`~lightning_ft.objectives.TaskBalancedCausalLM`) and train on batches with a ``task_id`` per
    example (:class:`MultiTaskDataModule`). ``task``: ``sum_t w_t L_t / sum_t w_t`` over the tasks present
    in the (per-device) batch, ``L_t`` the token-mean loss of task ``t``; ``sample``: mean of per-sample
    means; ``token``: the module's own loss. Under DDP each rank balances its own batch and the gradients
    are averaged, as in MFTCoder. Paper: https://arxiv.org/abs/2311.02303

    Args:
        task_balance: ``task`` (MFTCoder case3), ``sample`` (case2) or ``token`` (case1, the plain loss).
        task_weights: ``w_t`` per task id (default: all 1).
        **kwargs: Arguments of the LightningModule it is mixed into.
    """

    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "fsdp2", "quantized", "lora", "mixed"}),
        {},
        "Under DDP and FSDP2 each process balances its own batch, as MFTCoder does.",
    )

    def __init__(
        self, *, task_balance: TaskBalance = "task", task_weights: list[float] | None = None, **kwargs: Any
    ) -> None:
        if task_balance not in ("token", "sample", "task"):
            raise ValueError(f"task_balance={task_balance!r} is not supported: use 'task', 'sample' or 'token'.")
        if task_weights is not None and (any(w < 0 for w in task_weights) or sum(task_weights) <= 0):
            raise ValueError(f"task_weights={task_weights} must be non-negative with a positive sum.")
        super().__init__(**kwargs)
        require_host(self, TaskBalancedLossMixin, ("compute_loss", "aligned_logits"))
        self.task_balance = task_balance
        self.task_weights = list(task_weights) if task_weights is not None else None

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            check_fit_support(self, self.trainer, getattr(self, "backbone", None))

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The task- or sample-balanced loss of the batch (``token``: the wrapped module's loss)."""
        if self.task_balance == "token":
            return cast(ModuleHost, super()).compute_loss(batch)
        if self.task_balance == "task" and "task_id" not in batch:
            raise ValueError(
                "task_balance='task' needs a task_id per example, which this batch lacks: train with "
                "MultiTaskDataModule or set task_balance to 'sample' or 'token'."
            )
        logits, targets, weights = cast(ModuleHost, self).aligned_logits(batch)
        nll = aligned_nll(logits, targets)
        task_id = batch.get("task_id", torch.zeros(targets.shape[0], dtype=torch.long, device=targets.device))
        normalize = self.hparams["loss_normalization"]
        return task_balanced_loss(nll, targets, task_id, weights, self.task_weights, self.task_balance, normalize)
