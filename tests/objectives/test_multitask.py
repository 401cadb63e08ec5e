"""Multi-task mixing and the task-balanced loss: mixture counts and task ids, the mean of per-task means by hand,
the plain loss in token mode, and one-sentence errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from objective_checks import first_batch, thought_records, two_tasks

from lightning_ft.data.collate import IGNORE_INDEX
from lightning_ft.modules import CausalLMModule
from lightning_ft.modules.metrics import aligned_nll
from lightning_ft.objectives import TaskBalancedCausalLM, mix_counts, task_balanced_loss


def test_mix_counts_are_proportional_and_exact() -> None:
    assert mix_counts([3, 1], 40) == [30, 10]
    assert mix_counts([1, 1, 1], 10) == [4, 3, 3] and sum(mix_counts([0.2, 0.5, 0.3], 7)) == 7
    assert mix_counts([1, 0], 5) == [5, 0]


def test_mixture_has_the_weighted_counts_and_task_ids(tiny_llama_dir: Path) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    dm = two_tasks()
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    assert dm.task_sizes() == [30, 10]
    batches = list(dm.train_dataloader())
    ids = torch.cat([b["task_id"] for b in batches])
    assert ids.tolist().count(0) == 30 and ids.tolist().count(1) == 10
    other = two_tasks()
    other.tokenizer = module.tokenizer
    other.setup("fit")
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, other.train_dataloader()))
    assert len(dm.val_dataloader()) == 3  # one per task + control


def test_a_task_can_be_any_instruction_datamodule_subclass(tiny_llama_dir: Path, tmp_path: Path) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    path = thought_records(tmp_path / "thoughts.jsonl")
    weighted = {
        "class_path": "lightning_ft.objectives.TokenWeightedDataModule",
        "init_args": {
            "weighting": {"class_path": "lightning_ft.objectives.SpanWeights", "init_args": {"answer_weight": 2.0}},
            "dataset": str(path),
            "prompt_template": "Q: {query}\nA:",
            "response_template": " {thoughts}\nFinal: {answer}",
            "label_options": None,
            "val_size": 4,
            "test_size": 0,
            "max_length": 48,
        },
    }
    dm = two_tasks(
        tasks=[{"label_options": ["positive", "negative"], "train_size": 16, "val_size": 4, "test_size": 0}, weighted],
        weights=[1.0, 1.0],
        epoch_size=8,
        batch_size=8,
    )
    batch = first_batch(module, dm)
    assert batch["task_id"].tolist().count(1) == 4
    weights = batch["loss_weights"][batch["task_id"] == 0]
    assert torch.equal(weights, (weights > 0).float())  # the unweighted task gets weight 1 on its tokens
    rows = batch["task_id"] == 1
    labelled = batch["labels"][rows] != IGNORE_INDEX
    assert set(batch["loss_weights"][rows][labelled].tolist()) == {2.0} and (batch["loss_weights"][rows] == 0).any()
    with pytest.raises(ValueError, match=r"tasks entry .* is not a valid InstructionDataModule config"):
        first_batch(module, two_tasks(tasks=[{"datasett": "x"}], weights=None))


def test_task_balanced_loss_is_the_mean_of_per_task_means() -> None:
    torch.manual_seed(0)
    nll = torch.rand(5, 6)
    targets = torch.randint(0, 9, (5, 6))
    targets[0, 3:] = IGNORE_INDEX
    targets[3, :5] = IGNORE_INDEX
    task = torch.tensor([0, 2, 0, 2, 0])
    mask = targets != IGNORE_INDEX
    per_task = [nll[task == t][mask[task == t]].mean() for t in (0, 2)]
    assert task_balanced_loss(nll, targets, task).item() == pytest.approx(sum(per_task).item() / 2, rel=1e-6)
    weighted = task_balanced_loss(nll, targets, task, task_weights=[1.0, 0.0, 3.0])
    assert weighted.item() == pytest.approx((per_task[0] + 3 * per_task[1]).item() / 4, rel=1e-6)
    per_sample = [nll[b][mask[b]].mean() for b in range(5)]
    assert task_balanced_loss(nll, targets, task, mode="sample").item() == pytest.approx(
        sum(per_sample).item() / 5, rel=1e-6
    )
    token_weights = torch.rand(5, 6)
    w0 = (token_weights * mask)[task == 0]
    expected0 = (nll[task == 0] * w0).sum() / w0.sum()
    single = task_balanced_loss(nll[task == 0], targets[task == 0], task[task == 0] * 0, token_weights[task == 0])
    assert single.item() == pytest.approx(expected0.item(), rel=1e-6)


def test_module_balances_a_mixed_batch_and_token_mode_is_the_plain_loss(tiny_llama_dir: Path) -> None:
    module = TaskBalancedCausalLM(model=str(tiny_llama_dir), output_dir="")
    batch = first_batch(module, two_tasks(batch_size=8))
    assert set(batch["task_id"].tolist()) == {0, 1}
    with torch.no_grad():
        logits = module(batch["input_ids"], batch["attention_mask"]).logits[:, :-1]
    nll, targets = aligned_nll(logits, batch["labels"][:, 1:]), batch["labels"][:, 1:]
    means = []
    for t in (0, 1):
        rows = batch["task_id"] == t
        means.append(nll[rows][targets[rows] != IGNORE_INDEX].mean())
    assert module.compute_loss(batch).item() == pytest.approx(sum(means).item() / 2, rel=1e-5)
    token = TaskBalancedCausalLM(model=str(tiny_llama_dir), output_dir="", task_balance="token")
    plain = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    assert torch.equal(token.compute_loss(batch), plain.compute_loss(batch))


def test_errors_are_one_sentence(tiny_llama_dir: Path) -> None:
    module = TaskBalancedCausalLM(model=str(tiny_llama_dir), output_dir="")
    with pytest.raises(ValueError, match=r"task_balance='task' needs a task_id.*MultiTaskDataModule"):
        module.compute_loss(first_batch(module))
    with pytest.raises(ValueError, match=r"task_balance='mean' is not supported"):
        TaskBalancedCausalLM(model=str(tiny_llama_dir), task_balance="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"weights=\[1.0\] must hold one non-negative weight per task \(2 tasks\)"):
        two_tasks(weights=[1.0])


def test_a_weighted_task_without_training_examples_is_refused(tiny_llama_dir: Path) -> None:
    """A task whose training pool is empty (e.g. every record dropped at encoding) used to loop forever."""
    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    dm = two_tasks()
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    dm.tasks[1]._encoded["train"] = []
    with pytest.raises(ValueError, match=r"Task 1 \(chitchat\) has weight 1.0 but no training examples"):
        dm._mixture()
    dm.weights = [1.0, 0.0]
    assert len(dm._mixture()) == 40  # an empty task with weight 0 is fine
    zero = two_tasks(tasks=[dict(label_options=["positive", "negative"], train_size=0)], weights=None)
    zero.tokenizer = module.tokenizer
    with pytest.raises(ValueError, match=r"train_size=0 must be at least 1"):
        zero.setup("fit")
