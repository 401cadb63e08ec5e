"""IST: importance-aware sparse tuning of layers (Yao et al., EMNLP 2024 Findings, arXiv 2410.11772).

PEFT modules sit in every layer (or the layers train whole); each optimizer step only a sampled subset of the layers
trains, and every ``interval`` steps a no-grad probe learns which layers matter. The reading implemented here is the
authors' released code (``antgroup/importance-aware-sparse-tuning-IST-paper``, ``ist.py``), the only precise statement
of the algorithm we could read; the paper's text (Algorithm 1) was not reachable from this workplace.

* Each selectable layer ``l`` has a score ``s_l`` (0 at the start). **Update**: every ``switch_every`` steps (1 in the
  released code), ``max(1, int(update_fraction * L))`` layers are drawn without replacement with probability
  proportional to ``sigmoid(-s_l)`` (``selection="sample"``; ``"top_k"`` takes the lowest scores instead) and only
  their PEFT parameters (their tensors, for a full model) train; everything outside the blocks keeps training.
* **Probe** (after each optimizer step that reaches a multiple of ``interval``, on the batch that step trained on,
  so the weights are those the next step starts from): ``probes`` times, draw ``int(suppress_fraction * L)`` layers
  with probability proportional to ``sigmoid(s_l)`` (each set distinct from the earlier ones), scale their PEFT
  output by ``suppression_factor`` (LoRA's ``scaling``; for a full model the layer's update, ``W0 + f (W - W0)``),
  and run the step's batch through the model in eval mode without gradients. With ``r_k = exp(-loss_k)`` and
  ``p = sigmoid(s)`` taken before the probes, every layer of set ``k`` gets
  ``s_l += score_lr * (r_k - mean(r)) * p_l (1 - p_l)`` (REINFORCE on the sampling logits).
  ``score_update="symmetric"`` also gives the layers outside set ``k`` the opposite update (a line the released code
  leaves commented out).

A high score therefore marks a layer whose suppression keeps the loss low: it is probed more and trained less. The
importance of a layer is ``sigmoid(-s_l)``, its weight in the update draw (:attr:`ImportanceLayerSampling.importance`).

Deviations from the released code, each for a stated reason: the probe reads the training batch of the step it
follows (the released code draws a separate shuffled batch of 16 training rows before the step; this needs no second
loader, and the scores are in the checkpoint written after that step, so a resumed run equals an uninterrupted one);
under DDP/FSDP2 the probe losses are averaged over the processes so that every process
keeps the same scores; a layer that switches off loses its optimizer state (the selection core's eviction: the
optimizer holds the active layers' state only, which the paper's memory claim needs; the released code keeps
Hugging Face's lazily created state of every layer).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from typing_extensions import override

from lightning_ft.callbacks.layerwise_schedule import sample_blocks
from lightning_ft.core.layer_map import LayerMap, keep_4bit_trainable
from lightning_ft.core.selection import SelectionCallback, draw_rng
from lightning_ft.core.shards import local
from lightning_ft.core.snapshot import PretrainedSnapshot
from lightning_ft.support import MethodSupport

__all__ = ["ImportanceLayerSampling"]

_MAX_RETRIES = 100  # distinct suppressed sets: give up (accept a repeat) when there are fewer sets than probes


class ImportanceLayerSampling(SelectionCallback):
    """IST: train a sampled subset of layers per step, drawn by scores a periodic suppression probe learns.

    See the module docstring for the algorithm and its source. On a LoRA backbone (its main use) the candidates are
    the adapters; on a full model, every block's tensors (embeddings, final norm and head keep training). Under DDP
    use ``strategy="ddp_find_unused_parameters_true"``.

    Args:
        update_fraction: Fraction of the layers that train at a time (``int(fraction * L)``, at least 1; the released
            code's 0.25).
        suppress_fraction: Fraction of the layers suppressed in one probe (``int(fraction * L)``, at least 1; 0.5).
        interval: Optimizer steps between probes (10).
        probes: Suppressed sets per probe (``rl_step``, 3).
        score_lr: Step size of the score update (``rl_lr``, 10).
        suppression_factor: Factor on a suppressed layer's PEFT output (0.25; 0 removes it).
        switch_every: Optimizer steps between two draws of the trained layers (1: every step).
        selection: ``sample`` (weights ``sigmoid(-s)``, the released code) or ``top_k`` (the lowest scores).
        score_update: ``suppressed`` (only the suppressed layers move, the released code) or ``symmetric``.
        seed: Seed of the draws (identical on every rank).
        module: Dotted attribute path to the transformers model; default: found automatically.
    """

    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "fsdp2", "quantized", "lora", "mixed"}),
        {},
        "Needs strategy='ddp_find_unused_parameters_true'; a LoRA-family adapter (its scaling suppresses a layer) or "
        "a full model; the probe losses are averaged over the processes.",
    )

    def __init__(
        self,
        update_fraction: float = 0.25,
        suppress_fraction: float = 0.5,
        interval: int = 10,
        probes: int = 3,
        score_lr: float = 10.0,
        suppression_factor: float = 0.25,
        switch_every: int = 1,
        selection: Literal["sample", "top_k"] = "sample",
        score_update: Literal["suppressed", "symmetric"] = "suppressed",
        seed: int = 0,
        module: str | None = None,
    ) -> None:
        super().__init__(module=module, seed=seed)
        for name, value in (("update_fraction", update_fraction), ("suppress_fraction", suppress_fraction)):
            if not 0 < value <= 1:
                raise ValueError(f"{name}={value} must be in (0, 1]: it is a fraction of the layers.")
        for name, count in (("interval", interval), ("probes", probes), ("switch_every", switch_every)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{name}={count!r} must be a positive integer.")
        if not 0 <= suppression_factor < 1:
            raise ValueError(f"suppression_factor={suppression_factor} must be in [0, 1): 1 would suppress nothing.")
        if not math.isfinite(score_lr) or score_lr <= 0:
            raise ValueError(f"score_lr={score_lr} must be a positive number.")
        if selection not in ("sample", "top_k"):
            raise ValueError(f"selection={selection!r} is not a known choice: use 'sample' or 'top_k'.")
        if score_update not in ("suppressed", "symmetric"):
            raise ValueError(f"score_update={score_update!r} is not a known choice: use 'suppressed' or 'symmetric'.")
        self.update_fraction = update_fraction
        self.suppress_fraction = suppress_fraction
        self.interval = interval
        self.probes = probes
        self.score_lr = score_lr
        self.suppression_factor = suppression_factor
        self.switch_every = switch_every
        self.selection_rule = selection
        self.score_update = score_update
        self.blocks: list[int] = []  # the selectable layers (blocks with a candidate), in order
        self.scores: list[float] = []
        self.current_blocks: list[int] = []
        self.next_probe = interval
        self.last_probe: dict[str, Any] = {}
        self._scaled: dict[int, list[torch.nn.Module]] = {}  # block -> its LoRA-family layers

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(seed=self.seed, module=self.module)

    @property
    def num_updated(self) -> int:
        """Layers trained at a time."""
        return max(1, int(self.update_fraction * len(self.blocks)))

    @property
    def num_suppressed(self) -> int:
        """Layers suppressed in one probe."""
        return max(1, int(self.suppress_fraction * len(self.blocks)))

    @property
    def importance(self) -> list[float]:
        """Each selectable layer's weight in the update draw, ``sigmoid(-s)`` (in :attr:`blocks` order)."""
        return [1.0 / (1.0 + math.exp(s)) for s in self.scores]

    @override
    def candidate_names(self, layer_map: LayerMap, trainable: set[str]) -> list[str]:
        names = super().candidate_names(layer_map, trainable)
        if any(layer_map[n].adapter is not None for n in names):  # a peft backbone: its adapters are the PEFT modules
            names = [n for n in names if layer_map[n].adapter is not None or layer_map[n].block is None]
        return names

    @override
    def check(self, trainer: L.Trainer, model: torch.nn.Module, layer_map: LayerMap) -> None:
        trainable = {info.name for info in layer_map if model.get_parameter(info.name).requires_grad}
        names = self.candidate_names(layer_map, trainable)
        self.blocks = sorted({layer_map[n].block for n in names if layer_map[n].block is not None})  # type: ignore[misc]
        if not self.blocks:
            raise ValueError(
                f"ImportanceLayerSampling found no trainable parameter inside {type(model).__name__}'s blocks: add "
                "PEFT modules to its layers (e.g. peft: {peft_type: LORA, ...}) or train the full model."
            )
        self._scaled = {}
        keep_4bit_trainable(model)  # a user's own QLoRA model too: the eval-mode probe must not cut its gradients
        if any(layer_map[n].adapter is not None for n in names):
            self._scaled = _scaled_layers(model, layer_map, self.blocks)
            missing = [b for b in self.blocks if not self._scaled.get(b)]
            if missing:
                raise ValueError(
                    f"ImportanceLayerSampling suppresses a layer through its adapters' LoRA scaling, which the adapters "
                    f"of block {missing[0]} do not have: use a LoRA-family peft adapter (LoRA, DoRA, AdaLoRA) or a "
                    "full model."
                )
        if len(self.scores) != len(self.blocks):
            self.scores = [0.0] * len(self.blocks)

    @override
    def reset_target(
        self, model: torch.nn.Module, layer_map: LayerMap, candidates: list[str]
    ) -> PretrainedSnapshot | None:
        # a full model's layer is suppressed towards theta_0, which therefore must be kept (none for adapters)
        return None if self._scaled else PretrainedSnapshot.of(model)

    @override
    def schedule_key(self, trainer: L.Trainer) -> Hashable:
        return trainer.global_step // self.switch_every

    @override
    def initial_selection(self, trainer: L.Trainer, pl_module: L.LightningModule) -> set[str]:
        self.key = None  # the first batch draws the first layers
        return self.with_blocks(())

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # the probe follows the optimizer step that reaches a multiple of ``interval``, on the batch it trained on:
        # the weights are those the next step starts from, and the scores are in that step's checkpoint
        if self.selection is not None and trainer.global_step >= self.next_probe:
            self._probe(trainer, batch, draw_rng(self.seed, -trainer.global_step))
            self.next_probe = (trainer.global_step // self.interval + 1) * self.interval

    @override
    def draw(self, index: int, trainer: L.Trainer, pl_module: L.LightningModule) -> set[str]:
        assert self.selection is not None and self.layer_map is not None
        if self.selection_rule == "top_k":
            order = sorted(range(len(self.blocks)), key=lambda i: (self.scores[i], i))
            picked = sorted(order[: self.num_updated])
        else:
            picked = sample_blocks(self.importance, self.num_updated, draw_rng(self.seed, index))
        self.current_blocks = [self.blocks[i] for i in picked]
        return self.with_blocks(self.current_blocks)

    # ------------------------------------------------------------------ the probe
    def _probe(self, trainer: L.Trainer, batch: Any, rng: Any) -> None:
        """Score update from ``probes`` suppressed forward passes of ``batch`` (module docstring)."""
        assert self.selection is not None
        if not isinstance(batch, dict) or "labels" not in batch or "input_ids" not in batch:
            raise ValueError(
                "ImportanceLayerSampling probes the model's own loss on the training batch, which needs 'input_ids' "
                "and 'labels' fields: give the batch those keys (our DataModules do)."
            )
        weights = [1.0 / (1.0 + math.exp(-s)) for s in self.scores]  # sigmoid(s): suppression draw
        sets: list[list[int]] = []
        for _ in range(self.probes):
            chosen = sample_blocks(weights, self.num_suppressed, rng)
            for _ in range(_MAX_RETRIES):
                if chosen not in sets:
                    break
                chosen = sample_blocks(weights, self.num_suppressed, rng)
            sets.append(chosen)
        model = self.selection.model
        losses = [self._suppressed_loss(model, batch, [self.blocks[i] for i in s]) for s in sets]
        loss_t = torch.tensor(losses, dtype=torch.float64)
        if trainer.world_size > 1:  # every process must keep the same scores: average the processes' losses
            reduced = trainer.strategy.reduce(loss_t.to(trainer.strategy.root_device), reduce_op="mean")
            loss_t = reduced.detach().to("cpu", torch.float64)
        rewards = torch.exp(-loss_t)
        advantage = (rewards - rewards.mean()).tolist()
        for k, chosen in enumerate(sets):
            inside = set(chosen)
            for i in range(len(self.blocks)):
                slope = weights[i] * (1.0 - weights[i]) * self.score_lr * advantage[k]
                if i in inside:
                    self.scores[i] += slope
                elif self.score_update == "symmetric":
                    self.scores[i] -= slope
        self.last_probe = {"step": trainer.global_step, "sets": sets, "losses": loss_t.tolist()}
        if trainer.is_global_zero and trainer.loggers:
            metrics = {"ist/probe_loss": float(loss_t.mean())}
            metrics.update({f"ist/importance_{b:02d}": v for b, v in zip(self.blocks, self.importance)})
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    @torch.no_grad()
    def _suppressed_loss(self, model: torch.nn.Module, batch: dict[str, Any], blocks: list[int]) -> float:
        """The model's loss on ``batch`` in eval mode with ``blocks``' PEFT output scaled by the suppression factor."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}
        was_training = model.training
        model.eval()
        try:
            with self._suppressed(model, blocks):
                loss = model(**inputs).loss
        finally:
            model.train(was_training)
        return float(loss)

    @contextmanager
    def _suppressed(self, model: torch.nn.Module, blocks: list[int]) -> Iterator[None]:
        factor = self.suppression_factor
        if self._scaled:
            layers = [layer for b in blocks for layer in self._scaled[b]]
            saved = [dict(layer.scaling) for layer in layers]
            try:
                for layer in layers:
                    layer.scaling = {name: value * factor for name, value in layer.scaling.items()}
                yield
            finally:
                for layer, scaling in zip(layers, saved):
                    layer.scaling = scaling
            return
        assert self.selection is not None and self.snapshot is not None and self.layer_map is not None
        on = set(blocks)
        names = [n for n in self.selection.candidates if self.layer_map[n].block in on]
        saved_t: dict[str, torch.Tensor] = {}
        try:
            for name in names:  # W0 + f (W - W0), on each process's own shard under FSDP2
                live = self.selection.params[name]
                mine = local(live)
                saved_t[name] = mine.detach().clone()
                mine.lerp_(self.snapshot.get_local(name, live).to(mine.dtype), 1.0 - factor)
            yield
        finally:
            for name, value in saved_t.items():
                local(self.selection.params[name]).copy_(value)

    # ------------------------------------------------------------------ state
    @override
    def extra_state(self) -> dict[str, Any]:
        return {"scores": list(self.scores), "next_probe": self.next_probe, "current_blocks": list(self.current_blocks)}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("scores") is not None:
            if len(state["scores"]) != len(self.blocks):
                raise ValueError(
                    f"The checkpoint's ImportanceLayerSampling scores cover {len(state['scores'])} layers, this model "
                    f"{len(self.blocks)}: resume with the same model and adapters."
                )
            self.scores = [float(s) for s in state["scores"]]
        self.next_probe = int(state.get("next_probe", self.interval))
        self.current_blocks = [int(b) for b in state.get("current_blocks", [])]


def _scaled_layers(model: torch.nn.Module, layer_map: LayerMap, blocks: list[int]) -> dict[int, list[torch.nn.Module]]:
    """Per block, its peft tuner layers that carry a LoRA-style ``scaling`` mapping (adapter name -> factor)."""
    wanted, found = set(blocks), {}
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if not isinstance(scaling, dict) or not scaling:
            continue
        block = next(
            (layer_map[f"{name}.{p}"].block for p, _ in module.named_parameters() if f"{name}.{p}" in layer_map), None
        )
        if block in wanted:
            found.setdefault(block, []).append(module)
    return found
