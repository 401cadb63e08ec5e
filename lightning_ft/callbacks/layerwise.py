r"""
Layer freezing and layer-wise sampling
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

``LayerFreezing`` trains a fixed layer-map selection: the top blocks (Telly, Shi et al., ISSTA 2023,
arXiv 2304.05216), only embeddings and head ("lightweight" fine-tuning, Zlotchevski et al.), or any kinds,
blocks or name pattern. ``LayerwiseSampling`` trains only ``gamma`` sampled blocks at a time and
resamples every ``interval`` steps: uniformly (LISA, Pan et al., arXiv 2403.17919) or with probability
proportional to each block's outlier ratio (OwLore, Li et al., arXiv 2405.18380), optionally with the
GaLore projection of the active blocks' gradients that OwLore pairs with it (``preset="owlore"``).

LayerwiseSampling's parts live beside this module (their names stay importable from here): the sampling schedule
and OwLore's preset (:mod:`~lightning_ft.callbacks.layerwise_schedule`), OwLore's outlier scores and their
calibration batches (:mod:`~lightning_ft.callbacks.layerwise_outliers`) and the GaLore wiring
(:mod:`~lightning_ft.callbacks.layerwise_galore`).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_ft.callbacks.layerwise_galore import attach_galore
from lightning_ft.callbacks.layerwise_outliers import calibration_batches, input_norms, outlier_ratios
from lightning_ft.callbacks.layerwise_schedule import OWLORE_ACTIVE_FRACTION, owlore_preset, sample_blocks
from lightning_ft.core.galore import GaLoreProjection
from lightning_ft.core.layer_map import LayerMap, ParamKind, is_quantized_param
from lightning_ft.core.selection import SelectionCallback, draw_rng
from lightning_ft.support import MethodSupport

__all__ = [  # the schedule's and the outlier scores' names: re-exported, their old home
    "OWLORE_ACTIVE_FRACTION", "LayerFreezing", "LayerwiseSampling", "calibration_batches", "input_norms",
    "outlier_ratios", "sample_blocks",
]


class LayerFreezing(SelectionCallback):
    """Train a fixed part of the model and freeze the rest for the whole fit.

    Give ``freeze_bottom`` (Telly: freeze the bottom N blocks, and the embeddings unless
    ``freeze_embeddings=False``), or any of ``train_kinds`` / ``train_blocks`` / ``train_pattern``: the
    union of what they match trains, e.g. ``train_kinds: [embedding, head]`` for lightweight fine-tuning or
    ``train_blocks: [-1]`` for the last block only. The selection is applied in ``setup``, so
    ``configure_optimizers`` and DDP only see the trainable tensors.

    Args:
        freeze_bottom: Number of bottom blocks to freeze (Telly-K).
        freeze_embeddings: With ``freeze_bottom``, freeze the embeddings too.
        train_kinds: Layer-map kinds or groups that train (``embedding``, ``head``, ``attention``, ``mlp``...).
        train_blocks: Block indices that train; negative indices count from the top.
        train_pattern: Regex searched in parameter names; matches train.
        module: Dotted attribute path to the transformers model; default: found automatically.
    """

    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "fsdp2", "quantized", "lora", "mixed"}),
        {},
        "With a LoRA backbone it freezes or trains the adapters of the chosen blocks.",
    )

    def __init__(
        self,
        freeze_bottom: int | None = None,
        freeze_embeddings: bool = True,
        train_kinds: list[str] | None = None,
        train_blocks: list[int] | None = None,
        train_pattern: str | None = None,
        module: str | None = None,
    ) -> None:
        super().__init__(module=module)
        selective = train_kinds is not None or train_blocks is not None or train_pattern is not None
        if (freeze_bottom is None) == (not selective):
            raise ValueError(
                "LayerFreezing needs either freeze_bottom or train_kinds/train_blocks/train_pattern: give exactly one of the two."
            )
        if freeze_bottom is not None and freeze_bottom < 0:
            raise ValueError(f"freeze_bottom={freeze_bottom} must be zero or positive.")
        self.freeze_bottom = freeze_bottom
        self.freeze_embeddings = freeze_embeddings
        self.train_kinds = train_kinds
        self.train_blocks = train_blocks
        self.train_pattern = train_pattern

    @property
    @override
    def dynamic(self) -> bool:
        return False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            freeze_bottom=self.freeze_bottom,
            train_kinds=self.train_kinds,
            train_blocks=self.train_blocks,
            train_pattern=self.train_pattern,
            module=self.module,
        )

    @override
    def check(self, trainer: L.Trainer, model: torch.nn.Module, layer_map: LayerMap) -> None:
        blocks = layer_map.num_blocks
        if self.freeze_bottom is not None and self.freeze_bottom > blocks:
            raise ValueError(f"freeze_bottom={self.freeze_bottom} exceeds the model's {blocks} blocks.")
        if any(not -blocks <= b < blocks for b in self.train_blocks or []):
            raise ValueError(f"train_blocks={self.train_blocks} has an index outside the model's {blocks} blocks.")

    @override
    def draw(self, index: int, trainer: L.Trainer, pl_module: L.LightningModule) -> set[str]:
        assert self.selection is not None and self.layer_map is not None
        lm, candidates = self.layer_map, set(self.selection.candidates)
        if self.freeze_bottom is not None:
            frozen = {i.name for i in lm if i.block is not None and i.block < self.freeze_bottom}
            if self.freeze_embeddings:
                frozen |= {i.name for i in lm if i.kind == ParamKind.EMBEDDING}
            return candidates - frozen
        chosen: set[str] = set()
        for adapters in (False, True):
            if self.train_kinds is not None:
                chosen |= {i.name for i in lm.select(kinds=self.train_kinds, adapters=adapters)}
            if self.train_blocks is not None:
                blocks = [b % lm.num_blocks for b in self.train_blocks]
                chosen |= {i.name for i in lm.select(blocks=blocks, adapters=adapters)}
            if self.train_pattern is not None:
                chosen |= {i.name for i in lm.select(pattern=self.train_pattern, adapters=adapters)}
        if not chosen & candidates:
            raise ValueError(
                f"LayerFreezing's train_kinds={self.train_kinds}, train_blocks={self.train_blocks}, "
                f"train_pattern={self.train_pattern!r} match no trainable parameter: widen the selection."
            )
        return candidates & chosen


class LayerwiseSampling(SelectionCallback):
    """Train only ``gamma`` sampled blocks at a time; resample every ``interval`` optimizer steps.

    ``sampling="uniform"`` is LISA; ``sampling="outlier"`` is OwLore's outlier-weighted sampling, where
    block ``l`` is drawn with probability ``D_l / sum(D)`` (OWL outlier ratio, measured once before the
    first draw on ``calibration_samples`` training sequences, padding left out; or given as
    ``outlier_ratios``). Everything outside the blocks (embeddings, final norm, head) always trains.
    Blocks that switch off lose their gradients and optimizer state, so the optimizer holds ``gamma``
    blocks' worth of state. Under DDP use ``strategy="ddp_find_unused_parameters_true"``.

    ``galore_rank`` adds GaLore (:class:`~lightning_ft.core.galore.GaLoreProjection`) to the module's
    ``Adam`` / ``AdamW``: the attention and MLP matrices of the active blocks keep their Adam moments in a
    rank-``galore_rank`` subspace of their gradient (refreshed by SVD every ``galore_update_proj_gap`` of
    their steps) and get the projected-back update times ``galore_scale``. A matrix whose smaller side is
    not above the rank trains with plain Adam (no memory to save). Their state is evicted with the block.

    ``preset="owlore"`` gives OwLore's own settings (``pixeli99/OwLore`` scripts), each unless set
    explicitly: outlier sampling with ``M = 13`` on 128 calibration sequences (OWL's count), ``interval``
    50, ``gamma = max(1, round(5/32 * blocks))`` (5 of LLaMA-2-7B's 32; the paper only used 32-block
    models, so other depths keep the same fraction: 5 of SmolLM2's 30), and GaLore with rank 256,
    ``update_proj_gap`` 100 and scale 1.0 (``galore_rank=0`` turns it off). The paper's learning rate
    (3e-4) belongs to the module.

    Args:
        num_active: ``gamma``, the number of blocks that train at a time (default 2, LISA's).
        active_fraction: ``gamma`` as a fraction of the blocks (rounded, at least 1); overrides ``num_active``.
        interval: Optimizer steps between resamplings (``K``; default 50, as in OwLore and LISA).
        sampling: ``uniform`` (LISA, the default) or ``outlier`` (OwLore).
        outlier_threshold: OWL's outlier multiple ``M``.
        outlier_metric: ``activation`` (Wanda score on training sequences) or ``weight`` (``|W|`` only).
        outlier_ratios: Precomputed ``D_l`` per block (skips the calibration).
        calibration_samples: Training sequences the activation norms are summed over (OWL: 128); under DDP
            the ranks share them.
        galore_rank: GaLore rank for the active blocks' matrices; ``None``/``0``: plain optimizer.
        galore_update_proj_gap: Optimizer steps of a matrix between two SVDs of its gradient.
        galore_scale: Factor on GaLore's projected-back update.
        preset: ``owlore`` for the paper's settings (explicit arguments win).
        seed: Seed of the draws (identical on every rank).
        module: Dotted attribute path to the transformers model; default: found automatically.
    """

    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "fsdp2", "quantized", "lora", "mixed"}),
        {},
        "Needs strategy='ddp_find_unused_parameters_true'; outlier scores of a quantized backbone must be given; "
        "under FSDP2, GaLore gathers one matrix's gradient at a time for its SVD.",
    )

    def __init__(
        self,
        num_active: int | None = None,
        active_fraction: float | None = None,
        interval: int | None = None,
        sampling: Literal["uniform", "outlier"] | None = None,
        outlier_threshold: float = 13.0,
        outlier_metric: Literal["activation", "weight"] = "activation",
        outlier_ratios: list[float] | None = None,
        calibration_samples: int = 128,
        galore_rank: int | None = None,
        galore_update_proj_gap: int = 100,
        galore_scale: float = 1.0,
        preset: Literal["owlore"] | None = None,
        seed: int = 0,
        module: str | None = None,
    ) -> None:
        super().__init__(module=module, seed=seed)
        num_active, active_fraction, interval, sampling, galore_rank = owlore_preset(
            preset, num_active, active_fraction, interval, sampling, galore_rank
        )
        if num_active < 1 or interval < 1:
            raise ValueError(f"num_active={num_active} and interval={interval} must be positive integers.")
        if active_fraction is not None and not 0 < active_fraction <= 1:
            raise ValueError(f"active_fraction={active_fraction} must be in (0, 1].")
        if sampling not in ("uniform", "outlier") or outlier_metric not in ("activation", "weight"):
            raise ValueError(f"sampling={sampling!r} / outlier_metric={outlier_metric!r} is not a known choice.")
        if outlier_ratios is not None and (any(r < 0 for r in outlier_ratios) or not any(outlier_ratios)):
            raise ValueError("outlier_ratios must be non-negative with at least one positive entry.")
        if calibration_samples < 1:
            raise ValueError(f"calibration_samples={calibration_samples} must be a positive integer.")
        if galore_rank is not None and galore_rank < 0:
            raise ValueError(f"galore_rank={galore_rank} must be positive (or 0 / None for no GaLore).")
        self.preset = preset
        self.num_active = num_active
        self.active_fraction = active_fraction
        self.interval = interval
        self.sampling = sampling
        self.outlier_threshold = outlier_threshold
        self.outlier_metric = outlier_metric
        self.calibration_samples = calibration_samples
        self.galore = GaLoreProjection(galore_rank, galore_update_proj_gap, galore_scale) if galore_rank else None
        self.ratios: list[float] | None = list(outlier_ratios) if outlier_ratios is not None else None
        self.current_blocks: list[int] = []
        self._batch: Any = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(sampling=self.sampling, seed=self.seed, module=self.module)

    @property
    def gamma(self) -> int:
        """Number of blocks trained at a time (needs the model's block count for ``active_fraction``)."""
        if self.active_fraction is None or self.layer_map is None:
            return self.num_active
        return max(1, round(self.active_fraction * self.layer_map.num_blocks))

    @property
    def probabilities(self) -> list[float]:
        """Sampling probability of each block (uniform until outlier ratios are known)."""
        blocks = self.layer_map.num_blocks if self.layer_map is not None else 0
        if self.sampling == "uniform" or self.ratios is None or not sum(self.ratios):
            return [1.0 / blocks] * blocks if blocks else []
        total = sum(self.ratios)
        return [r / total for r in self.ratios]

    @override
    def check(self, trainer: L.Trainer, model: torch.nn.Module, layer_map: LayerMap) -> None:
        self.layer_map = layer_map
        if not 1 <= self.gamma <= layer_map.num_blocks:
            raise ValueError(
                f"num_active={self.gamma} must be between 1 and the model's {layer_map.num_blocks} blocks."
            )
        quantized = any(is_quantized_param(model.get_parameter(i.name)) for i in layer_map.select(kinds=["matrices"]))
        if self.sampling == "outlier" and self.ratios is None and quantized:
            raise ValueError(
                "LayerwiseSampling cannot score outliers on quantized weights: pass outlier_ratios "
                "(computed on the unquantized model) or use sampling='uniform'."
            )
        if self.ratios is not None and len(self.ratios) != layer_map.num_blocks:
            raise ValueError(
                f"outlier_ratios has {len(self.ratios)} entries for {layer_map.num_blocks} blocks: give one per block."
            )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.galore is not None and self.selection is not None:  # before the groups shrink to the first draw
            assert self.layer_map is not None
            self.selection.refresh()  # FSDP2's sharded parameters, which the optimizer holds
            attach_galore(self.galore, self.selection, self.layer_map, trainer.optimizers)
        super().on_fit_start(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.galore is not None:
            self.galore.detach()
        super().on_fit_end(trainer, pl_module)

    @override
    def draw(self, index: int, trainer: L.Trainer, pl_module: L.LightningModule) -> set[str]:
        assert self.selection is not None and self.layer_map is not None
        if self.sampling == "outlier" and self.ratios is None:
            self.ratios = self._calibrate(trainer)
            if not sum(self.ratios):
                rank_zero_warn(
                    f"No block has outliers above {self.outlier_threshold}x the mean score; LayerwiseSampling "
                    "samples uniformly: lower outlier_threshold to weight the blocks."
                )
        self.current_blocks = sample_blocks(self.probabilities, self.gamma, draw_rng(self.seed, index))
        return self.with_blocks(self.current_blocks)

    def _calibrate(self, trainer: L.Trainer) -> list[float]:
        assert self.selection is not None and self.layer_map is not None
        batches = None
        if self.outlier_metric == "activation":
            batches = calibration_batches(trainer, self.calibration_samples, self._batch)
        strategy = trainer.strategy
        reduce = (lambda t: strategy.reduce(t, reduce_op="sum")) if trainer.world_size > 1 else None
        ratios = outlier_ratios(self.selection.model, self.layer_map, batches, self.outlier_threshold, reduce)
        return [float(r) for r in strategy.broadcast(ratios, src=0)]

    @override
    def schedule_key(self, trainer: L.Trainer) -> Hashable:
        return trainer.global_step // self.interval

    @override
    def initial_selection(self, trainer: L.Trainer, pl_module: L.LightningModule) -> set[str]:
        self.key = None  # the first batch draws the first blocks (after calibrating on it)
        return self.with_blocks(())

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch
        try:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        finally:
            self._batch = None

    @override
    def extra_state(self) -> dict[str, Any]:
        return {"ratios": self.ratios, "current_blocks": list(self.current_blocks)}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("ratios") is not None:
            self.ratios = [float(r) for r in state["ratios"]]
        self.current_blocks = [int(b) for b in state.get("current_blocks", [])]
