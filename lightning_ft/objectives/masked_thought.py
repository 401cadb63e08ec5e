r"""
Masked Thought
^^^^^^^^^^^^^^

Masked Thought (Chen et al., "Masked Thought: Simply Masking Partial Reasoning Steps Can Improve Mathematical
Reasoning Learning of Language Models", arXiv 2403.02178): during training, each response token's *input* id is
replaced by a mask or a random token with a probability that ramps up over training; the labels stay the
original tokens, so the model learns to predict the reasoning from a corrupted history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

import torch
from torch import nn
from typing_extensions import override

from lightning_ft.core.anatomy import input_embeddings
from lightning_ft.core.host import MixinBase, ModuleHost, require_host
from lightning_ft.data.collate import IGNORE_INDEX
from lightning_ft.objectives._common import (
    batch_generator,
    check_fit_support,
    log_train,
    training_progress,
)
from lightning_ft.support import MethodSupport

__all__ = ["MaskedThoughtMixin", "MaskedThoughtSettings", "mask_response_tokens", "masked_thought_rate"]

Replacement = Literal["random", "mask"]


def masked_thought_rate(step: int, total: int, max_rate: float, warmup: float) -> float:
    """``p_t = p_max * min(1, t / (w * T))``; ``p_max`` throughout when ``w == 0`` or ``T`` is unknown."""
    if warmup <= 0 or total <= 0:
        return max_rate
    return max_rate * min(1.0, step / (warmup * total))


def mask_response_tokens(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    rate: float,
    generator: torch.Generator,
    vocab_size: int,
    mask_token_id: int | None = None,
) -> torch.Tensor:
    """A copy of ``input_ids`` in which each response token (label not ``-100``) is replaced with probability ``rate``.

    Replacements are uniform random ids in ``[0, vocab_size)`` or, with ``mask_token_id``, that id. Prompt
    tokens and padding (label ``-100``) are never touched. The draw comes from ``generator`` (CPU) only.
    """
    response = labels != IGNORE_INDEX
    draw = torch.rand(input_ids.shape, generator=generator).to(input_ids.device)
    chosen = response & (draw < rate)
    if mask_token_id is None:
        fill = torch.randint(0, vocab_size, input_ids.shape, generator=generator).to(input_ids.device)
    else:
        fill = torch.full_like(input_ids, mask_token_id)
    return torch.where(chosen, fill, input_ids)


@dataclass(frozen=True)
class MaskedThoughtSettings:
    """The settings of :class:`MaskedThoughtMixin`, as its arguments, once the mask id and vocabulary are resolved.

    Attributes:
        max_rate: ``p_max``.
        warmup: ``w``.
        mask_token_id: The replacement id, or ``None`` for uniform random ids.
        seed: Seed of the masking draws.
        vocab_size: Random replacements are drawn from ``[0, vocab_size)``.
    """

    max_rate: float
    warmup: float
    mask_token_id: int | None
    seed: int
    vocab_size: int


class MaskedThoughtMixin(MixinBase):
    """Masked Thought: corrupt response inputs with a ramped probability; labels unchanged (training only).

    Mix into :class:`~lightning_ft.modules.CausalLMModule` (ready made as
    :class:`~lightning_ft.objectives.MaskedThoughtCausalLM`). At optimizer step ``t`` of ``T`` each token
    whose label is not ``-100`` has its input id replaced with probability ``p_t = max_rate * min(1, t /
    (warmup * T))``. Validation, test and prediction see the real inputs. The draw depends only on
    ``seed``, the step, the batch index and the rank, so a resumed run masks exactly as an uninterrupted one.
    ``train/mask_rate`` logs ``p_t``. Defaults follow the paper's GSM8K recipe (``p_max = 0.4``,
    ``w = 2/3``, random tokens); its MetaMath/MAmmoTH recipes use ``max_rate=0.2, warmup=0,
    replacement="mask"``. Paper: https://arxiv.org/abs/2403.02178

    Args:
        max_rate: ``p_max``, the final masking probability; 0 gives the plain loss.
        warmup: ``w``, the fraction of training over which the rate ramps from 0 to ``max_rate``
            (0: constant ``max_rate``).
        replacement: ``random`` (uniform vocabulary ids) or ``mask`` (``mask_token_id``).
        mask_token_id: Id used by ``replacement="mask"``; default: the tokenizer's mask, then unk token.
        seed: Seed of the masking draws.
        **kwargs: Arguments of the LightningModule it is mixed into.
    """

    backbone: nn.Module
    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "fsdp2", "quantized", "lora", "mixed"}),
        {},
        "The masking draw depends on the rank, so DDP and FSDP2 mask other tokens than one process.",
    )

    def __init__(
        self,
        *,
        max_rate: float = 0.4,
        warmup: float = 2 / 3,
        replacement: Replacement = "random",
        mask_token_id: int | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if not 0 <= max_rate <= 1:
            raise ValueError(f"max_rate={max_rate} is a probability: use a value in [0, 1] (the paper uses 0.2-0.4).")
        if warmup < 0:
            raise ValueError(f"warmup={warmup} is a fraction of training: use 0 (constant rate) or a positive value.")
        if replacement not in ("random", "mask"):
            raise ValueError(f"replacement={replacement!r} is not supported: use 'random' or 'mask'.")
        super().__init__(**kwargs)
        require_host(self, MaskedThoughtMixin, ("backbone", "compute_loss"))
        tokenizer = getattr(self, "tokenizer", None)
        if replacement == "mask" and mask_token_id is None:
            mask_token_id = getattr(tokenizer, "mask_token_id", None)
            if mask_token_id is None:
                mask_token_id = getattr(tokenizer, "unk_token_id", None)
            if mask_token_id is None:
                raise ValueError(
                    "replacement='mask' needs a mask token, and the tokenizer has neither a mask nor an unk token: "
                    "set mask_token_id or use replacement: random."
                )
        vocab = len(tokenizer) if tokenizer is not None else 0
        rows = input_embeddings(self.backbone).num_embeddings
        self.masked_thought_settings = MaskedThoughtSettings(
            max_rate=max_rate, warmup=warmup, mask_token_id=mask_token_id if replacement == "mask" else None, seed=seed,
            vocab_size=min(vocab, rows) if vocab else rows,
        )  # fmt: skip
        self._mt_batch_idx = 0

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            check_fit_support(self, self.trainer, self.backbone)

    def mask_rate(self) -> float:
        """``p_t`` at the current optimizer step."""
        step, total = training_progress(self)
        settings = self.masked_thought_settings
        return masked_thought_rate(step, total, settings.max_rate, settings.warmup)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        self._mt_batch_idx = batch_idx
        return super().on_train_batch_start(batch, batch_idx)

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The wrapped loss on a batch whose response inputs are masked (only while training)."""
        if getattr(self, "training", False):
            rate = self.mask_rate()
            log_train(self, "train/mask_rate", rate, batch["input_ids"].shape[0])
            if rate > 0:
                cfg = self.masked_thought_settings
                generator = batch_generator(cfg.seed, self.global_step, self._mt_batch_idx, self.global_rank)
                masked = mask_response_tokens(
                    batch["input_ids"], batch["labels"], rate, generator, cfg.vocab_size, cfg.mask_token_id
                )
                batch = {**batch, "input_ids": masked}
        return cast(ModuleHost, super()).compute_loss(batch)
