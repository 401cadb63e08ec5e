r"""
Layer freezing and layer-wise sampling
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

``LayerFreezing`` trains a fixed layer-map selection: the top blocks (Telly, Shi et al., ISSTA 2023,
arXiv 2304.05216), only embeddings and head ("lightweight" fine-tuning, Zlotchevski et al.), or any kinds,
blocks or name pattern. ``LayerwiseSampling`` trains only ``gamma`` sampled blocks at a time and
resamples every ``interval`` steps: uniformly (LISA, Pan et al., arXiv 2403.17919) or with probability
proportional to each block's outlier ratio (OwLore, Li et al., arXiv 2405.18380).
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_ft.core.layer_map import LayerMap, ParamKind
from lightning_ft.core.selection import SelectionCallback, draw_rng

__all__ = ["LayerFreezing", "LayerwiseSampling", "outlier_ratios", "sample_blocks"]


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


def sample_blocks(probabilities: Sequence[float], gamma: int, rng: random.Random) -> list[int]:
    """Sample ``gamma`` distinct blocks, each pick proportional to ``probabilities`` among those left.

    This is ``numpy.random.choice(L, gamma, replace=False, p=probabilities)``'s scheme, driven by ``rng``.

    Args:
        probabilities: Non-negative weight per block (need not sum to one).
        gamma: Number of blocks to draw.
        rng: The draw's generator.

    Returns:
        Sorted block indices.
    """
    weights = [max(0.0, float(p)) for p in probabilities]
    left = list(range(len(weights)))
    picked: list[int] = []
    for _ in range(min(gamma, len(left))):
        total = sum(weights[i] for i in left)
        if total <= 0:
            choice = left[rng.randrange(len(left))]
        else:
            choice = rng.choices(left, weights=[weights[i] for i in left])[0]
        picked.append(choice)
        left.remove(choice)
    return sorted(picked)


def _input_dim(module: torch.nn.Module) -> int:
    """Which weight dimension multiplies the module's input features (Conv1D stores ``[in, out]``)."""
    return 0 if type(module).__name__ == "Conv1D" else 1


@torch.no_grad()
def outlier_ratios(
    model: torch.nn.Module,
    layer_map: LayerMap,
    batch: Mapping[str, Any] | None,
    threshold: float = 13.0,
    reduce: Any = None,
) -> list[float]:
    """OWL's layer-wise outlier ratio ``D_l`` of every block.

    Each block's score is ``A_ij = |W_ij| * ||X_j||_2`` over its attention and MLP matrices (Wanda, with
    ``X`` the matrix's input on ``batch``; ``|W_ij|`` alone when ``batch`` is ``None``), and ``D_l`` is
    the fraction of the block's scores above ``threshold`` times their mean.

    Args:
        model: The transformers model.
        layer_map: Its layer map.
        batch: A mapping with ``input_ids`` (and optionally ``attention_mask``), or ``None``.
        threshold: The outlier multiple ``M`` (13 in OwLore's scripts).
        reduce: Optional function summing a tensor across ranks (e.g. ``strategy.reduce``).

    Returns:
        ``D_l`` per block, in block order.
    """
    infos = [i for i in layer_map.select(kinds=["matrices"]) if i.is_matrix and i.name.endswith("weight")]
    modules = {i.name: model.get_submodule(i.name.rsplit(".", 1)[0]) for i in infos}
    norms = _input_norms(model, modules, batch, reduce) if batch is not None else {}
    by_block: dict[int, list[torch.Tensor]] = {}
    for info in infos:
        weight = model.get_parameter(info.name).detach().float().abs()
        if info.name in norms:
            dim = _input_dim(modules[info.name])
            scale = norms[info.name].to(weight.device)
            weight = weight * (scale.unsqueeze(0) if dim == 1 else scale.unsqueeze(1))
        assert info.block is not None
        by_block.setdefault(info.block, []).append(weight)
    ratios = []
    for block in range(layer_map.num_blocks):
        scores = by_block.get(block, [])
        count = sum(s.numel() for s in scores)
        if not count:
            ratios.append(0.0)
            continue
        mean = sum(float(s.sum()) for s in scores) / count
        ratios.append(sum(int((s > threshold * mean).sum()) for s in scores) / count)
    return ratios


def _input_norms(
    model: torch.nn.Module, modules: dict[str, torch.nn.Module], batch: Mapping[str, Any], reduce: Any
) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` of each module's input features over the batch's tokens."""
    if "input_ids" not in batch:
        raise ValueError(
            "LayerwiseSampling(sampling='outlier') calibrates on a training batch with an 'input_ids' entry: "
            "use outlier_metric='weight' or pass outlier_ratios for other batch formats."
        )
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules.items():

        def hook(mod: torch.nn.Module, args: tuple[Any, ...], key: str = name) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[key] = sums.get(key, 0) + (x * x).sum(0)

        handles.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    names = list(sums)
    flat = torch.cat([sums[n] for n in names])
    if reduce is not None:
        flat = reduce(flat)
    out, start = {}, 0
    for name in names:
        size = sums[name].numel()
        out[name] = flat[start : start + size].sqrt()
        start += size
    return out


class LayerwiseSampling(SelectionCallback):
    """Train only ``gamma`` sampled blocks at a time; resample every ``interval`` optimizer steps.

    ``sampling="uniform"`` is LISA; ``sampling="outlier"`` is OwLore's outlier-weighted sampling, where
    block ``l`` is drawn with probability ``D_l / sum(D)`` (OWL outlier ratio, computed once on the first
    training batch, or given as ``outlier_ratios``). Everything outside the blocks (embeddings, final
    norm, head) always trains. Blocks that switch off lose their gradients and optimizer state, so the
    optimizer holds ``gamma`` blocks' worth of state. Under DDP use
    ``strategy="ddp_find_unused_parameters_true"``. OwLore's GaLore projection is not part of this
    callback (combine with a low-rank optimizer if wanted).

    Args:
        num_active: ``gamma``, the number of blocks that train at a time.
        active_fraction: ``gamma`` as a fraction of the blocks (rounded, at least 1); overrides ``num_active``.
        interval: Optimizer steps between resamplings (``K``; 50 in OwLore and LISA).
        sampling: ``uniform`` (LISA) or ``outlier`` (OwLore).
        outlier_threshold: OWL's outlier multiple ``M``.
        outlier_metric: ``activation`` (Wanda score on the first batch) or ``weight`` (``|W|`` only).
        outlier_ratios: Precomputed ``D_l`` per block (skips the calibration).
        seed: Seed of the draws (identical on every rank).
        module: Dotted attribute path to the transformers model; default: found automatically.
    """

    def __init__(
        self,
        num_active: int = 2,
        active_fraction: float | None = None,
        interval: int = 50,
        sampling: Literal["uniform", "outlier"] = "uniform",
        outlier_threshold: float = 13.0,
        outlier_metric: Literal["activation", "weight"] = "activation",
        outlier_ratios: list[float] | None = None,
        seed: int = 0,
        module: str | None = None,
    ) -> None:
        super().__init__(module=module, seed=seed)
        if num_active < 1 or interval < 1:
            raise ValueError(f"num_active={num_active} and interval={interval} must be positive integers.")
        if active_fraction is not None and not 0 < active_fraction <= 1:
            raise ValueError(f"active_fraction={active_fraction} must be in (0, 1].")
        if sampling not in ("uniform", "outlier") or outlier_metric not in ("activation", "weight"):
            raise ValueError(f"sampling={sampling!r} / outlier_metric={outlier_metric!r} is not a known choice.")
        if outlier_ratios is not None and (any(r < 0 for r in outlier_ratios) or not any(outlier_ratios)):
            raise ValueError("outlier_ratios must be non-negative with at least one positive entry.")
        self.num_active = num_active
        self.active_fraction = active_fraction
        self.interval = interval
        self.sampling = sampling
        self.outlier_threshold = outlier_threshold
        self.outlier_metric = outlier_metric
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
        quantized = any(
            type(model.get_parameter(i.name)).__name__ in ("Params4bit", "Int8Params")
            for i in layer_map.select(kinds=["matrices"])
        )
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
        on = set(self.current_blocks)
        return {
            n for n in self.selection.candidates if self.layer_map[n].block in on or self.layer_map[n].block is None
        }

    def _calibrate(self, trainer: L.Trainer) -> list[float]:
        assert self.selection is not None and self.layer_map is not None
        batch = self._batch if self.outlier_metric == "activation" else None
        if batch is not None and not isinstance(batch, Mapping):
            raise ValueError(
                "LayerwiseSampling(sampling='outlier') calibrates on a training batch that is a mapping with "
                "'input_ids': use outlier_metric='weight' or pass outlier_ratios for other batch formats."
            )
        strategy = trainer.strategy
        reduce = (lambda t: strategy.reduce(t, reduce_op="sum")) if trainer.world_size > 1 else None
        ratios = outlier_ratios(self.selection.model, self.layer_map, batch, self.outlier_threshold, reduce)
        return [float(r) for r in strategy.broadcast(ratios, src=0)]

    @override
    def schedule_key(self, trainer: L.Trainer) -> Hashable:
        return trainer.global_step // self.interval

    @override
    def initial_selection(self, trainer: L.Trainer, pl_module: L.LightningModule) -> set[str]:
        assert self.selection is not None and self.layer_map is not None
        self.key = None  # the first batch draws the first blocks (after calibrating on it)
        return {n for n in self.selection.candidates if self.layer_map[n].block is None}

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
