"""Shared helpers of the objective tests: a first batch, one (possibly crashed or resumed) run, two data setups
and a module with every objective mixin."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L

from lightning_ft.modules import CausalLMModule
from lightning_ft.objectives import MaskedThoughtMixin, MultiTokenHeadsMixin, TaskBalancedLossMixin
from helpers import CrashAt, make_data, make_trainer  # noqa: F401  (re-exported)


def first_batch(module: Any, dm: Any | None = None, **data: Any) -> dict[str, Any]:
    """The first training batch of ``dm`` (default: ``make_data(**data)``) tokenised for ``module``."""
    dm = dm if dm is not None else make_data(**data)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def run_once(
    make_module: Callable[[], L.LightningModule],
    make_dm: Callable[[], L.LightningDataModule],
    root: Path,
    steps: int,
    ckpt: str | None = None,
    crash: int | None = None,
) -> L.LightningModule:
    """Fit ``steps`` optimizer steps with a checkpoint after every step (and a crash after step ``crash``)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    module = make_module()
    callbacks: list[L.Callback] = [ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1)]
    if crash is not None:
        callbacks.append(CrashAt(crash))
    trainer = make_trainer(root, steps, enable_checkpointing=True, callbacks=callbacks)
    trainer.fit(module, make_dm(), ckpt_path=ckpt)
    return module


def two_tasks(**kwargs: Any) -> Any:
    """Reviews as classification (task 0) and Chit-Chat replies as free-form text (task 1), mixed 3:1, given as
    the YAML-style task mappings."""
    from lightning_ft.objectives import MultiTaskDataModule

    reviews = dict(label_options=["positive", "negative"], train_size=40, val_size=8, test_size=0, max_length=48)
    chat = dict(
        dataset="chitchat",
        prompt_template="{prompt}\n",
        response_template="{response}",
        label_options=None,
        train_size=40,
        val_size=4,
        test_size=0,
        max_length=48,
    )
    opts: dict[str, Any] = dict(tasks=[reviews, chat], weights=[3.0, 1.0], epoch_size=40, batch_size=4, control_size=4)
    opts.update(kwargs)
    return MultiTaskDataModule(**opts)


def thought_records(path: Path, n: int = 24) -> Path:
    """A JSONL file of PTR-style records: a query, a draft ("thoughts") and a refined answer."""
    import json

    rows = [
        {"query": f"what is {i} plus {i}", "thoughts": f"Draft: maybe {i + 1}", "answer": f"{2 * i}"} for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def thought_data(path: Path, **kwargs: Any) -> Any:
    """A TokenWeightedDataModule over :func:`thought_records` with PTR span weights (thoughts 0, answer 2)."""
    from lightning_ft.objectives import SpanWeights, TokenWeightedDataModule

    opts: dict[str, Any] = dict(
        dataset=str(path),
        prompt_template="Q: {query}\nA:",
        response_template=" {thoughts}\nFinal: {answer}",
        label_options=None,
        val_size=4,
        test_size=0,
        control_size=0,
        batch_size=4,
        max_length=48,
    )
    opts.update(kwargs)
    return TokenWeightedDataModule(weighting=SpanWeights(thought_fields=["thoughts"], answer_weight=2.0), **opts)


class AllObjectives(MaskedThoughtMixin, MultiTokenHeadsMixin, TaskBalancedLossMixin, CausalLMModule):
    """Every objective mixin at once (Masked Thought -> CAFT heads -> task-balanced loss -> module)."""
