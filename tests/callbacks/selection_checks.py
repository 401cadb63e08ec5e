"""Shared helpers for the selection callbacks' tests: trainer/data factories, an invariant checker, a crash
callback, a recording logger and a user-style LightningModule that wraps a tiny HF model its own way."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

from lightning_ft.core.selection import SelectionCallback
from helpers import Crash, CrashAt, make_data, make_trainer  # noqa: F401  (re-exported for the callback tests)


class SelectionWatch(L.Callback):
    """Checks the defining properties of a selection callback at every optimizer step.

    Frozen tensors: ``requires_grad`` off, ``grad is None`` before the step, absent from the optimizer's
    groups and state, and equal to their value when they were frozen (theta_0 when ``reset``). Exactly the
    active tensors change in each step, and each of them then holds optimizer state.
    """

    def __init__(self, selector: SelectionCallback, reset: bool = False, stateful_optimizer: bool = True) -> None:
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


class UserModule(L.LightningModule):
    """How a user might wrap an HF model: inside a ModuleDict, with its own loss and optimizer."""

    def __init__(self, path: str, optimizer: str = "adamw") -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.nets = torch.nn.ModuleDict({"lm": AutoModelForCausalLM.from_pretrained(path)})
        self.optimizer = optimizer

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.nets["lm"](input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=0.5)
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def token_batches(n: int = 32, length: int = 12, vocab: int = 300) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (n, length), generator=generator)
    return torch.utils.data.DataLoader([{"input_ids": row} for row in ids], batch_size=4)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a small shared CPU, thread contention makes the tiny-model tests ~5x slower.

    Imported by the test modules (an autouse fixture applies where it is imported), not a conftest, so it
    touches no other test file.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
