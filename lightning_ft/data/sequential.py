"""A sequential (continual) run: train on task A, then task B, ... with a task-boundary signal.

``SequentialDataModule`` trains ``epochs_per_task`` epochs on each task in turn. Its ``task_index(epoch)``
method is the task-boundary signal: callbacks such as ``HalfFineTuning(redraw="task")`` call
:func:`current_task` and react when it changes. Any DataModule with a ``task_index(epoch)`` method works.
"""

from __future__ import annotations

from collections.abc import Sequence
import lightning as L
from torch.utils.data import DataLoader

from lightning_ft.data.instruction import InstructionDataModule

__all__ = ["SequentialDataModule", "current_task"]

# Typed (not Any) so that LightningCLI keeps templates such as "Review: {text}" as strings.
TaskArgs = dict[str, str | bool | int | float | list[str] | None]


def current_task(trainer: L.Trainer) -> int | None:
    """The task the Trainer trains on now, or ``None`` when its DataModule has no ``task_index(epoch)``."""
    task_index = getattr(trainer.datamodule, "task_index", None)
    return int(task_index(trainer.current_epoch)) if callable(task_index) else None


class SequentialDataModule(L.LightningDataModule):
    """Several instruction tasks trained one after the other.

    Epochs ``[i * epochs_per_task, (i + 1) * epochs_per_task)`` train on task ``i``; validation runs on
    the current task (plus its control set). The Trainer must reload loaders every epoch
    (``reload_dataloaders_every_n_epochs: 1``) and run ``len(tasks) * epochs_per_task`` epochs.

    Args:
        tasks: One mapping of ``InstructionDataModule`` arguments per task, in training order.
        epochs_per_task: Epochs spent on each task.
    """

    def __init__(self, tasks: list[TaskArgs], epochs_per_task: int = 1) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("tasks is empty: give one mapping of InstructionDataModule arguments per task.")
        if epochs_per_task < 1:
            raise ValueError(f"epochs_per_task={epochs_per_task} must be a positive integer.")
        self.save_hyperparameters()
        self.epochs_per_task = epochs_per_task
        self._task_args = [dict(task) for task in tasks]
        self.tasks: list[InstructionDataModule] = []  # built in setup: outside LightningCLI's hparams context

    def task_index(self, epoch: int) -> int:
        """The task trained in ``epoch`` (the last task after the schedule ends)."""
        return min(epoch // self.epochs_per_task, len(self._task_args) - 1)

    def _current(self) -> InstructionDataModule:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return self.tasks[self.task_index(epoch)]

    def setup(self, stage: str | None = None) -> None:
        """Set up every task (each one loads and tokenises its own data)."""
        if not self.tasks:
            self.tasks = [InstructionDataModule(**args) for args in self._task_args]
        for task in self.tasks:
            task.trainer = self.trainer
            task.setup(stage)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if len(self.tasks) > 1 and trainer is not None and trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError(
                "SequentialDataModule switches tasks between epochs, which needs the Trainer to rebuild its "
                "loaders each epoch: set trainer reload_dataloaders_every_n_epochs=1."
            )
        return self._current().train_dataloader()

    def val_dataloader(self) -> Sequence[DataLoader]:
        return self._current().val_dataloader()

    def test_dataloader(self) -> Sequence[DataLoader]:
        return self._current().test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self._current().predict_dataloader()
