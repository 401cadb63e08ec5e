"""Parameter selection: which whole tensors train, applied to ``requires_grad`` and to the optimizer.

Every method that decides, over time, which parameters train (Half Fine-Tuning, layer freezing, LISA /
OwLore layer sampling) delegates the mechanics to this module, so they behave the same way:

* :class:`ParameterSelection` turns a set of trainable names into ``requires_grad`` flags (frozen tensors
  get ``grad = None``, so AdamW neither decays nor moves them), removes switched-off tensors from the
  optimizer's param groups and evicts their state (memory follows the trainable set), re-adds switched-on
  tensors to the group they came from, and can reset newly frozen tensors to a reset target (theta_0 by
  default).
* :class:`SelectionCallback` is the Lightning side: it finds the model, refuses strategies that cannot
  work and a second weight-selecting callback in the same fit (two selections would silently intersect),
  applies the first selection at the right moment (``setup`` for a static selection, so DDP and
  ``configure_optimizers`` only ever see the trainable tensors; ``on_fit_start`` for a schedule that
  changes, so that every candidate has an optimizer group to come back to), redraws whenever the
  subclass's schedule key changes (only at optimizer-step boundaries), logs what trains, and saves /
  restores the selection, the draw counter and the schedule position.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from lightning_ft.core.layer_map import LayerMap, find_transformer
from lightning_ft.core.process_group import destroy_process_group_at_exit
from lightning_ft.core.snapshot import PretrainedSnapshot
from lightning_ft.core.support import check_support
from lightning_ft.errors import UserError

__all__ = ["ParameterSelection", "SelectionCallback", "WeightSelecting", "draw_rng", "refuse_second_selection"]


class WeightSelecting:
    """Marks a callback that decides which weights train (the selection callbacks, ``SparseFineTuning``, ``S2FT``):
    two in one fit would silently intersect, so :func:`refuse_second_selection` refuses the second."""


def refuse_second_selection(method: object, trainer: Any) -> None:
    """Raise the one-sentence ``UserError`` if another :class:`WeightSelecting` callback is in this fit."""
    others = [c for c in getattr(trainer, "callbacks", None) or [] if isinstance(c, WeightSelecting) and c is not method]
    if others:  # two selections would silently intersect: their composition is not defined
        raise UserError(
            f"{type(method).__name__} and {type(others[0]).__name__} both decide which weights train: use one of them "
            "per fit (or one per stage of a multi-stage run)."
        )


def draw_rng(seed: int, index: int) -> random.Random:
    """The random generator of draw number ``index``: a pure function of ``(seed, index)``.

    Counter-based seeding makes every draw reproducible on every rank and after a resume from the draw
    counter alone.

    Args:
        seed: The method's seed.
        index: The draw number (0 for the first draw of the first fit).

    Returns:
        A fresh ``random.Random``.
    """
    return random.Random(f"lightning-ft/{seed}/{index}")


class ParameterSelection:
    """The trainable subset of a model's candidate parameters.

    Args:
        model: The model that owns the parameters.
        layer_map: Its layer map.
        candidates: Canonical names this selection manages; other parameters are never touched.
    """

    def __init__(self, model: torch.nn.Module, layer_map: LayerMap, candidates: Sequence[str]) -> None:
        self.model = model
        self.layer_map = layer_map
        self.candidates: list[str] = list(candidates)
        self.params: dict[str, torch.nn.Parameter] = layer_map.parameters(model, [layer_map[n] for n in candidates])
        self.active: set[str] = {n for n in self.candidates if self.params[n].requires_grad}
        self._ids = {id(p): n for n, p in self.params.items()}
        self._homes: list[tuple[torch.optim.Optimizer, list[list[torch.nn.Parameter]]]] = []

    def refresh(self) -> None:
        """Look the candidates' parameters up again by name: FSDP2's ``fully_shard`` (run in ``configure_model``,
        after ``setup``) replaces every parameter with a sharded one, which keeps its ``requires_grad`` flag."""
        self.params = self.layer_map.parameters(self.model, [self.layer_map[n] for n in self.candidates])
        self._ids = {id(p): n for n, p in self.params.items()}

    def bind(self, optimizers: Iterable[torch.optim.Optimizer], require_all: bool = False) -> None:
        """Remember each optimizer's param groups as built: the home of every tensor switched on later.

        Args:
            optimizers: The optimizers built by ``configure_optimizers``.
            require_all: Raise when a candidate is in no param group (it could never train again).

        Raises:
            ValueError: If ``require_all`` and a candidate is in no param group.
        """
        self._homes = [(opt, [list(g["params"]) for g in opt.param_groups]) for opt in optimizers]
        if require_all and self._homes:
            grouped = {id(p) for _, homes in self._homes for home in homes for p in home}
            homeless = [n for n in self.candidates if id(self.params[n]) not in grouped]
            if homeless:
                raise ValueError(
                    f"{len(homeless)} selectable parameters (e.g. {homeless[0]!r}) are in no optimizer param group: "
                    "configure_optimizers must include every parameter that requires grad when fit starts."
                )

    def apply(self, active: Iterable[str], snapshot: PretrainedSnapshot | None = None) -> tuple[list[str], list[str]]:
        """Make exactly ``active`` (among the candidates) trainable.

        Args:
            active: Canonical names to train; any other candidate is frozen.
            snapshot: When given, tensors that switch off are reset to their theta_0 value.

        Returns:
            ``(switched_on, switched_off)`` canonical names, in model order.

        Raises:
            KeyError: If a name is not a candidate.
        """
        wanted = set(active)
        unknown = wanted.difference(self.params)
        if unknown:
            raise KeyError(f"{sorted(unknown)[0]!r} is not a selectable parameter of this selection.")
        on = [n for n in self.candidates if n in wanted and n not in self.active]
        off = [n for n in self.candidates if n not in wanted and n in self.active]
        for name in self.candidates:
            param = self.params[name]
            param.requires_grad_(name in wanted)
            if name not in wanted:
                param.grad = None
        if snapshot is not None and off:
            snapshot.restore(self.model, off)
        self.active = wanted
        self.sync_optimizers()
        return on, off

    def sync_optimizers(self) -> None:
        """Make each bound optimizer's groups hold exactly the active candidates; evict the others' state."""
        for optimizer, homes in self._homes:
            for group, home in zip(optimizer.param_groups, homes):
                home_ids = {id(p) for p in home}
                extra = [p for p in group["params"] if id(p) not in home_ids]
                group["params"] = [p for p in home if self._keeps(p)] + [p for p in extra if self._keeps(p)]
            for param in list(optimizer.state):
                if not self._keeps(param):
                    del optimizer.state[param]

    def _keeps(self, param: torch.Tensor) -> bool:
        name = self._ids.get(id(param))
        return name is None or name in self.active

    def numel(self, names: Iterable[str] | None = None) -> int:
        """Element count of ``names`` (the active set by default)."""
        chosen = self.active if names is None else names
        return sum(self.layer_map[n].numel for n in chosen)


class SelectionCallback(WeightSelecting, L.Callback):
    """Base class of callbacks that decide which whole parameters train.

    Subclasses implement :meth:`candidate_names` and :meth:`draw`, and may override :meth:`schedule_key`
    (a value that changes exactly when a new selection must be drawn), :attr:`dynamic` and
    :meth:`reset_target` (what ``reset`` restores).

    Args:
        module: Dotted attribute path from the LightningModule to the transformers model; default: the
            outermost ``PreTrainedModel`` / ``PeftModel`` found among its submodules.
        seed: Seed of the draws; every rank draws the same selection from it.
        reset: Reset a tensor to its :meth:`reset_target` value (theta_0 by default) whenever it becomes frozen.
    """

    def __init__(self, module: str | None = None, seed: int = 0, reset: bool = False) -> None:
        self.module = module
        self.seed = seed
        self.reset = reset
        self.selection: ParameterSelection | None = None
        self.layer_map: LayerMap | None = None
        self.snapshot: PretrainedSnapshot | None = None
        self.draws = 0
        self.key: Any = None
        self._pending: tuple[set[str], bool] | None = None  # (active, reset newly frozen) not yet applied
        self._restored: dict[str, Any] | None = None
        self._bound = False
        self._total_numel = 0
        self._switched = False
        self._logged_step = -1

    # ------------------------------------------------------------------ subclass API
    @property
    def dynamic(self) -> bool:
        """Whether the selection can change during a fit (then DDP needs ``find_unused_parameters``)."""
        return True

    def candidate_names(self, layer_map: LayerMap, trainable: set[str]) -> list[str]:
        """Canonical names this method selects from (default: all that require grad at setup)."""
        return [n for n in layer_map.names if n in trainable]

    def draw(self, index: int, trainer: L.Trainer, pl_module: L.LightningModule) -> set[str]:
        """Return the trainable set of draw number ``index`` (a subset of the candidates)."""
        raise NotImplementedError

    def initial_selection(self, trainer: L.Trainer, pl_module: L.LightningModule) -> set[str]:
        """The trainable set at the start of a fit (default: the next draw)."""
        active = self.draw(self.draws, trainer, pl_module)
        self.draws += 1
        return active

    def schedule_key(self, trainer: L.Trainer) -> Hashable:
        """A value that changes exactly when a new selection must be drawn (``None``: once per fit)."""
        return None

    def reset_target(
        self, model: torch.nn.Module, layer_map: LayerMap, candidates: list[str]
    ) -> PretrainedSnapshot | None:
        """The values newly frozen tensors are reset to, taken in ``setup`` (``None``: no reset).

        Default: the shared theta_0 of the model (its weights when first snapshotted) when ``reset``.
        """
        return PretrainedSnapshot.of(model) if self.reset else None

    def check(self, trainer: L.Trainer, model: torch.nn.Module, layer_map: LayerMap) -> None:
        """Raise a one-sentence ``ValueError`` for a combination the method cannot train."""

    def with_blocks(self, blocks: Iterable[int]) -> set[str]:
        """The candidates inside ``blocks`` plus every candidate outside the blocks (embeddings, final norm, head):
        the trainable set of a method that samples whole blocks (LISA / OwLore, IST)."""
        assert self.selection is not None and self.layer_map is not None
        on = set(blocks)
        return {
            n for n in self.selection.candidates if self.layer_map[n].block in on or self.layer_map[n].block is None
        }

    def extra_state(self) -> dict[str, Any]:
        """Subclass state saved next to the selection."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` saved."""

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(self).__name__
        refuse_second_selection(self, trainer)
        model = find_transformer(pl_module, self.module)
        destroy_process_group_at_exit()  # a clean gloo exit, also for this callback in a user's own module
        check_support(self, trainer, model)  # the declared support matrix (lightning_ft.support)
        if self.dynamic and _is_ddp(trainer) and not trainer.strategy._ddp_kwargs.get("find_unused_parameters"):
            raise ValueError(
                f"{name} changes the trainable set during training, which DDP allows only with unused-parameter "
                "detection: use strategy='ddp_find_unused_parameters_true' (or 'ddp_spawn_find_unused_parameters_true')."
            )
        layer_map = LayerMap.from_model(model)
        self.check(trainer, model, layer_map)
        if self.selection is not None and self.selection.model is model:
            self.selection.apply(self.selection.candidates)  # a new fit (stage) on the same model: start unfrozen
        trainable = {info.name for info in layer_map if model.get_parameter(info.name).requires_grad}
        candidates = self.candidate_names(layer_map, trainable)
        if not candidates:
            raise ValueError(
                f"{name} found no trainable parameters to select from in {type(model).__name__}: "
                "unfreeze the model (full fine-tuning) or point `module=` at the right submodule."
            )
        self.layer_map = layer_map
        self.snapshot = self.reset_target(model, layer_map, candidates)
        self.selection = ParameterSelection(model, layer_map, candidates)
        self._total_numel = sum(info.numel for info in layer_map)
        self._bound = False
        self._logged_step = -1
        if self._restored is not None:
            self._load(self._restored)
            return
        self.key = self.schedule_key(trainer)
        self._stage(self.initial_selection(trainer, pl_module), reset=self.reset)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.selection is None:
            return
        self.selection.refresh()
        self.selection.bind(trainer.optimizers, require_all=self.dynamic)
        self._bound = True
        self._flush()

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.selection is None:
            return
        key = self.schedule_key(trainer)
        if key != self.key:  # keys only change at optimizer-step boundaries (global_step / epoch / task based)
            self.key = key
            active = self.draw(self.draws, trainer, pl_module)
            self.draws += 1
            self._stage(active, reset=self.reset)
            self._switched = True
        self._log(trainer)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.selection is not None:  # leave every candidate trainable so that a next stage can redraw
            self.selection.bind([])
            self.selection.apply(self.selection.candidates)
        self._bound = False

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.selection is None:
            return {}
        pending = self._pending[0] if self._pending is not None else self.selection.active
        return {
            "active": sorted(pending),
            "candidates": list(self.selection.candidates),
            "draws": self.draws,
            "key": self.key,
            "seed": self.seed,
            "extra": self.extra_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._restored = dict(state_dict)
        if self.selection is not None:
            self._load(self._restored)

    def _load(self, state: dict[str, Any]) -> None:
        assert self.selection is not None
        missing = set(state["active"]).difference(self.selection.params)
        if missing:
            raise ValueError(
                f"The checkpoint's {type(self).__name__} selection names {sorted(missing)[0]!r}, which is not "
                "selectable in this model: resume with the same model and callback arguments."
            )
        self.draws, self.key = int(state["draws"]), _as_key(state["key"])
        self.load_extra_state(state.get("extra", {}))
        self._restored = None
        self._stage(set(state["active"]), reset=False)  # weights come from the checkpoint: never reset them

    # ------------------------------------------------------------------ internals
    def _stage(self, active: set[str], reset: bool) -> None:
        """Apply now when allowed (static selection or optimizers bound), else at ``on_fit_start``."""
        self._pending = (active, reset)
        if self._bound or not self.dynamic:
            self._flush()

    def _flush(self) -> None:
        if self._pending is None or self.selection is None:
            return
        active, reset = self._pending
        self._pending = None
        self.selection.apply(active, self.snapshot if reset else None)
        self._switched = True

    def trainable_fraction(self) -> float:
        """Fraction of all model elements that train now (1.0 before setup)."""
        if self.selection is None or not self._total_numel:
            return 1.0
        frozen = self.selection.numel(set(self.selection.candidates) - self.selection.active)
        return 1.0 - frozen / self._total_numel

    def block_activity(self) -> dict[int, float]:
        """Per block, the fraction of its selectable elements that train now."""
        if self.selection is None or self.layer_map is None:
            return {}
        totals: dict[int, list[int]] = {}
        for name in self.selection.candidates:
            info = self.layer_map[name]
            if info.block is not None:
                entry = totals.setdefault(info.block, [0, 0])
                entry[0] += info.numel if name in self.selection.active else 0
                entry[1] += info.numel
        return {b: on / total for b, (on, total) in sorted(totals.items()) if total}

    def _log(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        due = self._switched or step % max(1, trainer.log_every_n_steps) == 0
        if not trainer.loggers or not due or step == self._logged_step:  # once per optimizer step
            return
        self._switched, self._logged_step = False, step
        blocks = self.block_activity()
        metrics = {"selection/trainable_fraction": self.trainable_fraction(), "selection/draws": float(self.draws)}
        metrics["selection/blocks_on"] = float(sum(1 for v in blocks.values() if v > 0))
        metrics.update({f"selection/block_{b:02d}": v for b, v in blocks.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)


def _is_ddp(trainer: L.Trainer) -> bool:
    from lightning.pytorch.strategies import DDPStrategy

    return isinstance(trainer.strategy, DDPStrategy)


def _as_key(value: Any) -> Hashable:
    """Checkpoints may turn tuples into lists; keys must stay hashable and comparable."""
    return tuple(value) if isinstance(value, list) else value
