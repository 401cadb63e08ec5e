"""Test helpers shared by every test module: a quiet CPU Trainer, tiny review data, a simulated crash, a user's
own LightningModule, tiny token batches, a recording logger and the per-step checker of a selection callback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

from lightning_ft.data import InstructionDataModule


def make_trainer(root: Path, steps: int, **kwargs: Any) -> L.Trainer:
    """A CPU Trainer without logger, checkpointing, progress bar or validation (override any by keyword)."""
    opts: dict[str, Any] = dict(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=str(root),
    )  # fmt: skip
    opts.update(kwargs)
    return L.Trainer(**opts)


def make_data(**kwargs: Any) -> InstructionDataModule:
    """Real review data, a small slice of it: 40 training records in batches of 4 (override any by keyword)."""
    opts: dict[str, Any] = dict(label_options=["positive", "negative"], train_size=40, val_size=8, test_size=0,
                                control_size=0, batch_size=4, max_length=48)  # fmt: skip
    opts.update(kwargs)
    return InstructionDataModule(**opts)


def first_batch_loss(module: Any, **data_kwargs: Any) -> tuple[InstructionDataModule, dict[str, Any], float]:
    """Real review data tokenized for ``module`` (``make_data`` with ``data_kwargs``), its first training batch and the
    module's loss on it now: a SmolLM2 behaviour test fits, then checks the loss on that batch fell."""
    data = make_data(**data_kwargs)
    data.tokenizer = module.tokenizer
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        return data, batch, module.compute_loss(batch).item()


class Crash(RuntimeError):
    """The simulated crash raised by :class:`CrashAt`."""


class CrashAt(L.Callback):
    """Raises :class:`Crash` after optimizer step ``step``.

    ``ModelCheckpoint`` runs after the other callbacks, so ``last.ckpt`` is then the one of step ``step - 1``.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"simulated crash at step {self.step}")


class UserModule(L.LightningModule):
    """How a user might wrap an HF model: inside a ModuleDict, with its own loss and optimizer.

    ``kind="causal"`` loads an ``AutoModelForCausalLM`` trained on its own inputs; ``kind="classifier"`` an
    ``AutoModelForSequenceClassification`` with two labels trained on ``batch["labels"]``.
    """

    def __init__(self, path: str, optimizer: str = "adamw", kind: str = "causal") -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        if kind == "causal":
            net = AutoModelForCausalLM.from_pretrained(path)
        else:
            net = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        self.nets = torch.nn.ModuleDict({"lm": net})
        self.optimizer = optimizer
        self.kind = kind

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        labels = batch["input_ids"] if self.kind == "causal" else batch["labels"]
        return self.nets["lm"](input_ids=batch["input_ids"], labels=labels).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=0.5)
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def token_batches(n: int = 32, length: int = 12, vocab: int = 300, batch_size: int = 4) -> torch.utils.data.DataLoader:
    """Random token rows (``input_ids`` only), in a fixed order."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (n, length), generator=generator)
    return torch.utils.data.DataLoader([{"input_ids": row} for row in ids], batch_size=batch_size)


class Recorder(Logger):
    """Keeps every ``log_metrics`` call in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> str:
        return "0"

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        return None


class SelectionWatch(L.Callback):
    """Checks the defining properties of a selection callback (``SelectionCallback``) at every optimizer step.

    Frozen tensors: ``requires_grad`` off, ``grad is None`` before the step, absent from the optimizer's
    groups and state, and equal to their value when they were frozen (theta_0 when ``reset``). Exactly the
    active tensors change in each step, and each of them then holds optimizer state.
    """

    def __init__(self, selector: Any, reset: bool = False, stateful_optimizer: bool = True) -> None:
        self.selector = selector
        self.reset = reset
        self.stateful_optimizer = stateful_optimizer
        self.frozen_at: dict[str, torch.Tensor] = {}
        self.history: list[tuple[int, frozenset[str]]] = []
        self.requires_grad: list[tuple[int, frozenset[str]]] = []
        self.steps_checked = 0
        self._before: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        sel = self.selector.selection
        assert sel is not None
        self.history.append((trainer.global_step, frozenset(sel.active)))
        self.requires_grad.append((trainer.global_step, frozenset(n for n, p in sel.params.items() if p.requires_grad)))
        for name in sel.candidates:
            param = sel.params[name]
            assert param.requires_grad == (name in sel.active), name
            if name in sel.active:
                self.frozen_at.pop(name, None)
            elif name not in self.frozen_at:
                if self.reset:
                    assert self.selector.snapshot is not None
                    theta0 = self.selector.snapshot.get(name, device=param.device, dtype=param.dtype)
                    assert torch.equal(param.detach(), theta0), f"{name} was not reset to theta_0"
                self.frozen_at[name] = param.detach().clone()
            else:
                assert torch.equal(param.detach(), self.frozen_at[name]), f"frozen {name} moved"
        in_groups = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        for name in sel.candidates:
            assert (id(sel.params[name]) in in_groups) == (name in sel.active), f"{name} param-group membership"
        with_state = {id(p) for opt in trainer.optimizers for p in opt.state}
        assert not {id(sel.params[n]) for n in sel.candidates if n not in sel.active} & with_state, "state of frozen"
        self._before = {n: p.detach().clone() for n, p in sel.params.items()}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        sel = self.selector.selection
        assert sel is not None
        for name in sel.candidates:
            grad = sel.params[name].grad
            assert (grad is not None) == (name in sel.active), f"{name} grad presence"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        sel = self.selector.selection
        assert sel is not None
        changed = {n for n, p in sel.params.items() if not torch.equal(p.detach(), self._before[n])}
        assert changed == set(sel.active), f"changed {sorted(changed ^ set(sel.active))[:3]}"
        if self.stateful_optimizer:
            with_state = {id(p) for opt in trainer.optimizers for p in opt.state}
            assert {n for n in sel.candidates if id(sel.params[n]) in with_state} == set(sel.active)
        self.steps_checked += 1


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a small shared CPU, thread contention makes the tiny-model tests ~5x slower.

    Autouse only where the name is imported (``from helpers import one_thread``), so it touches no other test file.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SparseWatch(L.Callback):
    """Checks SparseFineTuning at every optimizer step: the optimizer holds no state for its eligible tensors
    (the compact state lives in the callback), and no eligible entry outside the masks so far moves.

    ``union`` holds, per eligible tensor, a flat mask of every entry selected so far.
    """

    def __init__(self, sft: Any) -> None:
        self.sft = sft
        self.union: dict[str, torch.Tensor] = {}
        self.lrs: list[float] = []
        self.checked = 0
        self._before: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])
        held = {id(p) for p in optimizer.state}
        assert not any(id(p) in held for p in self.sft._params.values()) or self.sft.phase == "dense"
        if self.sft.phase != "sparse":
            return
        for name, idx in self.sft.selected.items():
            mask = self.union.setdefault(name, torch.zeros(self.sft._params[name].numel(), dtype=torch.bool))
            mask[idx] = True
        self._before = {n: p.detach().clone() for n, p in self.sft._params.items()}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not self._before:
            return
        for name in self.sft.selected:
            outside = torch.ones(self.sft._params[name].numel(), dtype=torch.bool)
            outside[self.union[name]] = False
            now = self.sft._params[name].detach().reshape(-1)
            assert torch.equal(now[outside], self._before[name].reshape(-1)[outside]), name
        self.checked += 1
        self._before = {}
