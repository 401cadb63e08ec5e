"""The arguments every DataModule shares: a control set of general text (the forgetting metric) and the tokenizer.

:class:`ControlDataModule` holds them once (their checks, defaults and docstrings); a DataModule derives from it and
forwards them with ``**kwargs``, which LightningCLI resolves, so ``--help`` and YAML list them flat beside the
DataModule's own arguments (``data.init_args.control_size``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from lightning_ft.data.files import load_records

__all__ = ["ControlDataModule", "resolve_tokenizer"]


def resolve_tokenizer(datamodule: L.LightningDataModule, name: str | None) -> Any:
    """Return the tokenizer named by ``name``, or the one of the attached LightningModule.

    Raises:
        ValueError: no name was given and the LightningModule has no ``tokenizer`` attribute.
    """
    if name is not None:
        from transformers import AutoTokenizer

        from lightning_ft.assets import resolve_model

        return AutoTokenizer.from_pretrained(resolve_model(name))
    trainer = getattr(datamodule, "trainer", None)
    module = trainer.lightning_module if trainer is not None else None
    tokenizer = getattr(module, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            f"{type(datamodule).__name__} needs a tokenizer: pass tokenizer=<model name or folder>, or use it "
            "with a LightningModule that has a `tokenizer` attribute."
        )
    return tokenizer


class ControlDataModule(L.LightningDataModule):
    """A DataModule with a control set of general text the task does not train on, and a tokenizer.

    The control texts measure forgetting (``val/control_ppl`` of a causal LM, ``val/control_drift`` of an encoder).
    Subclasses tokenise :meth:`control_texts` their own way and return the loader from ``control_dataloader``.
    The hyperparameters of the whole class chain are saved here (``self.hparams``).

    Args:
        control: bundled dataset or file of general text for the forgetting metric, or ``None``.
        control_field: the column of ``control`` holding the text.
        control_size: number of control texts.
        control_max_length: tokens per control text; ``None``: the DataModule's ``max_length``.
        tokenizer: tokenizer name or folder; default: the LightningModule's ``tokenizer``.
    """

    def __init__(
        self,
        control: str | None = "humaneval",
        control_field: str = "text",
        control_size: int = 64,
        control_max_length: int | None = 128,
        tokenizer: str | None = None,
    ) -> None:
        super().__init__()
        if control_size < 0:
            raise ValueError(f"control_size={control_size} must be zero or positive (0 turns the control set off).")
        if control_max_length is not None and control_max_length < 2:
            raise ValueError(f"control_max_length={control_max_length} must be at least 2 (or null for max_length).")
        self.save_hyperparameters()
        self.tokenizer: Any = None

    def setup_tokenizer(self) -> Any:
        """The tokenizer: the one set on ``self.tokenizer``, else the ``tokenizer`` argument's, else the module's."""
        if self.tokenizer is None:
            self.tokenizer = resolve_tokenizer(self, self.hparams.tokenizer)
        return self.tokenizer

    def control_texts(self, seed: int) -> list[str]:
        """The first ``control_size`` texts of ``control`` after a shuffle with ``seed`` (none without a control set).

        Raises:
            ValueError: ``control_field`` is not a column of ``control``.
        """
        h = self.hparams
        if h.control is None or h.control_size == 0:
            return []
        records = load_records(h.control, argument="control", shuffle_seed=seed)[: h.control_size]
        if records and h.control_field not in records[0]:
            raise ValueError(
                f"control_field={h.control_field!r} is not a column of control={h.control!r} "
                f"(columns: {sorted(records[0])}): set control_field to the text column."
            )
        return [str(r[h.control_field]) for r in records]

    def control_length(self, max_length: int) -> int:
        """Tokens per control text: ``control_max_length``, or the DataModule's ``max_length`` when that is ``None``."""
        limit = self.hparams.control_max_length
        return int(limit) if limit is not None else max_length

    def control_dataloader(self) -> DataLoader | None:
        """The control-text loader, or ``None`` without a control set (subclasses build it)."""
        return None

    def with_control(self, loader: DataLoader) -> list[DataLoader]:
        """``[loader]``, followed by the control loader when there is one (the validation and test loaders)."""
        control = self.control_dataloader()
        return [loader] + ([control] if control is not None else [])
