r"""
Half Fine-Tuning
^^^^^^^^^^^^^^^^

HFT (Hui et al., "HFT: Half Fine-Tuning for Large Language Models", arXiv 2404.18466, ACL 2025): in each
training stage, freeze a random half of the parameters at the category level and train the other half,
which forgets less of the pretrained knowledge at about the same target performance.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from typing_extensions import override

from lightning_ft.core.layer_map import KIND_GROUPS, LayerMap, ParamKind
from lightning_ft.core.selection import SelectionCallback, draw_rng
from lightning_ft.core.snapshot import PretrainedSnapshot
from lightning_ft.core.weights import resolve_path
from lightning_ft.data.sequential import current_task
from lightning_ft.support import MethodSupport

__all__ = ["HalfFineTuning", "hft_frozen"]

Redraw = Literal["fit", "epoch", "steps", "task"]
_CATEGORIES = ("attention", "mlp", "norm")


def _unit(layer_map: LayerMap, name: str) -> tuple[str, str] | None:
    """``(category, unit)`` of an in-block base parameter, ``None`` when HFT does not select it.

    A unit is what is frozen as a whole: one projection kind (weight and bias, all experts of an MoE
    block together) for attention and MLP, one norm module for norms.
    """
    info = layer_map[name]
    if info.block is None or info.adapter is not None:
        return None
    if info.kind in KIND_GROUPS["attention"]:
        return "attention", info.kind.value
    if info.kind in KIND_GROUPS["mlp"]:
        return "mlp", info.kind.value
    if info.kind == ParamKind.NORM:
        return "norm", name.rsplit(".", 1)[0]
    return None


def _freezable(layer_map: LayerMap, name: str, outside: set[ParamKind]) -> bool:
    """Whether a draw may freeze ``name``: an in-block unit, or a kind listed in ``freeze_outside``."""
    info = layer_map[name]
    return _unit(layer_map, name) is not None or (info.block is None and info.kind in outside)


def hft_frozen(
    layer_map: LayerMap, candidates: list[str], seed: int, index: int, freeze_outside: list[str] | None = None
) -> set[str]:
    """The HFT draw: which candidates are frozen in draw number ``index``.

    Per block and category (attention matrices, MLP matrices, norms) with ``n`` units, ``n / 2`` units are
    frozen when ``n`` is even (2 of q/k/v/o, 1 of 2 norms); when ``n`` is odd (gate/up/down) a random
    ``floor(L / 2)`` of the ``L`` blocks freeze ``ceil(n / 2)`` units and the other blocks ``floor(n / 2)``.
    Outside the blocks only the kinds in ``freeze_outside`` are frozen.

    Args:
        layer_map: The model's layer map.
        candidates: Canonical names that may be frozen.
        seed: The callback's seed.
        index: The draw number.
        freeze_outside: Kinds outside the blocks to freeze (``embedding``, ``head``, ``final_norm``).

    Returns:
        Canonical names to freeze.
    """
    rng = draw_rng(seed, index)
    units: dict[int, dict[str, dict[str, list[str]]]] = {}
    for name in candidates:
        found = _unit(layer_map, name)
        if found is not None:
            block = layer_map[name].block
            assert block is not None
            units.setdefault(block, {}).setdefault(found[0], {}).setdefault(found[1], []).append(name)
    blocks = sorted(units)
    ceil_blocks = {cat: set(rng.sample(blocks, len(blocks) // 2)) for cat in _CATEGORIES}
    frozen: set[str] = set()
    for block in blocks:
        for cat in _CATEGORIES:
            names = units[block].get(cat, {})
            keys = sorted(names)
            count = len(keys) // 2 + (len(keys) % 2 if block in ceil_blocks[cat] else 0)
            for key in rng.sample(keys, count):
                frozen.update(names[key])
    outside = {ParamKind(kind) for kind in freeze_outside or []}
    frozen.update(n for n in candidates if layer_map[n].block is None and layer_map[n].kind in outside)
    return frozen


class HalfFineTuning(SelectionCallback):
    """Train a random half of the parameters per stage; freeze the other half (HFT).

    Per transformer block, 2 of the 4 attention matrices (q, k, v, o) and 1 of the 2 norms are frozen; of
    the 3 MLP matrices (gate, up, down), 2 are frozen in a random half of the blocks and 1 in the other
    half. Embeddings, the final norm and the LM head train unless listed in ``freeze_outside``. Frozen
    tensors get no gradient (``grad is None``) and no optimizer state. The draw depends only on ``seed``
    and the draw number, so every rank draws the same half and a resumed run continues identically.

    With the default ``redraw="fit"`` the half is drawn in ``setup`` (before DDP wrapping and
    ``configure_optimizers``, so both only see the trainable half); each later ``fit`` with the same
    callback is a new stage with a new half. Other schedules redraw during training and need
    ``strategy="ddp_find_unused_parameters_true"`` under DDP. Paper: https://arxiv.org/abs/2404.18466

    ``reset=True`` sets each tensor that becomes frozen at a draw to its value in the reset target:
    ``reset_to`` (e.g. the base model of the chat model being tuned), else the weights the model had at
    the start of this ``fit`` (this stage's start, not the first load: a second stage never sends the half
    that stage one trained back to the original weights). Reset tensors lose their optimizer state, so
    Adam moments start from zero when they train again. Per redraw mode:

    * ``"fit"``: at the draw, the frozen half is set to ``reset_to``. With ``reset_to`` the base model and
      no training (``max_steps=0``) this is the paper's Half-Reset. Without ``reset_to`` it does nothing
      (the frozen half already holds this stage's starting weights), and a warning says so.
    * ``"epoch"``, ``"steps"``, ``"task"``: at every draw, the first of the fit included, the tensors that
      become frozen (trained until then, or all candidates at the first draw) are set to the target;
      tensors frozen before and after the draw keep their values. Without ``reset_to`` the first draw
      changes nothing and each later one undoes what the newly frozen tensors learned in this fit.

    A checkpoint resume never resets: the weights come from the checkpoint. ``reset_to`` is read one
    tensor at a time when a reset happens, cast to each parameter's dtype; the default target re-reads
    tensors that still equal the loaded file and holds a CPU copy of the others (those changed by an
    earlier fit in the same process).

    Args:
        redraw: When to draw a new half: once per ``fit`` (paper default), every ``epoch``, every
            ``every_n_steps`` optimizer ``steps``, or at each ``task`` boundary of a sequential run (a
            DataModule with a ``task_index(epoch)`` method, e.g. ``SequentialDataModule``).
        every_n_steps: Optimizer steps between draws with ``redraw="steps"``.
        reset: Reset each tensor that becomes frozen at a draw to the reset target (see above).
        reset_to: The reset target: a model folder (safetensors) or a bundled model alias with the same
            tensor names and shapes, e.g. the base model; default: the weights at the start of each fit.
            Needs ``reset=True``.
        freeze_outside: Kinds outside the blocks to freeze as well (``embedding``, ``head``,
            ``final_norm``); empty by default, as in the paper.
        seed: Seed of the draws.
        module: Dotted attribute path to the transformers model inside the LightningModule; default:
            found automatically.
    """

    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "fsdp2", "mixed"}),
        {
            "quantized": "{name} trains whole base weights and cannot train a quantized backbone: load the model "
            "unquantized (quantization: null).",
            "lora": "{name} trains half of the base weights, but every base weight of {model} is frozen (a peft "
            "adapter?): use full fine-tuning (peft: null).",
        },
        "Redrawing during a fit needs strategy='ddp_find_unused_parameters_true'.",
    )

    def __init__(
        self,
        redraw: Redraw = "fit",
        every_n_steps: int | None = None,
        reset: bool = False,
        reset_to: str | None = None,
        freeze_outside: list[str] | None = None,
        seed: int = 0,
        module: str | None = None,
    ) -> None:
        super().__init__(module=module, seed=seed, reset=reset)
        if redraw not in ("fit", "epoch", "steps", "task"):
            raise ValueError(f"redraw={redraw!r} is not one of 'fit', 'epoch', 'steps', 'task'.")
        if (redraw == "steps") != (every_n_steps is not None) or (every_n_steps is not None and every_n_steps < 1):
            raise ValueError(
                f"every_n_steps={every_n_steps} goes with redraw='steps' only and must be a positive integer there."
            )
        allowed = {"embedding", "head", "final_norm"}
        if not set(freeze_outside or []) <= allowed:
            raise ValueError(f"freeze_outside={freeze_outside} may only list {sorted(allowed)}.")
        if reset_to is not None and not reset:
            raise ValueError(f"reset_to={reset_to!r} is the target of the half-reset: set reset=True as well.")
        if reset and reset_to is None and redraw == "fit":
            warnings.warn(
                "HalfFineTuning(reset=True, redraw='fit') without reset_to changes nothing: the half frozen at the "
                "draw already holds this stage's starting weights; set reset_to to the base model for the paper's "
                "Half-Reset.",
                UserWarning,
                stacklevel=2,
            )
        self.redraw = redraw
        self.every_n_steps = every_n_steps
        self.reset_to = reset_to
        self.freeze_outside = list(freeze_outside or [])

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(redraw=self.redraw, seed=self.seed, module=self.module)

    @property
    @override
    def dynamic(self) -> bool:
        return self.redraw != "fit"

    @override
    def check(self, trainer: L.Trainer, model: torch.nn.Module, layer_map: LayerMap) -> None:
        params = layer_map.parameters(model, layer_map.select(kinds=["matrices", "norm"]))
        if not any(p.requires_grad for p in params.values()):
            raise ValueError(
                f"HalfFineTuning trains half of the base weights, but every base weight of {type(model).__name__} "
                "is frozen (a peft adapter?): use full fine-tuning (peft: null)."
            )
        if self.redraw == "task" and not callable(getattr(trainer.datamodule, "task_index", None)):
            raise ValueError(
                "redraw='task' needs a DataModule with a task_index(epoch) method: use "
                "lightning_ft.data.sequential.SequentialDataModule or add that method to yours."
            )

    @override
    def candidate_names(self, layer_map: LayerMap, trainable: set[str]) -> list[str]:
        return [info.name for info in layer_map if info.name in trainable and info.adapter is None]

    @override
    def reset_target(
        self, model: torch.nn.Module, layer_map: LayerMap, candidates: list[str]
    ) -> PretrainedSnapshot | None:
        if not self.reset:
            return None
        if self.reset_to is None:  # this fit's starting weights; a no-op target with one draw per fit
            return PretrainedSnapshot.capture(model) if self.dynamic else None

        try:
            source = resolve_path(self.reset_to)
        except FileNotFoundError:
            raise ValueError(
                f"reset_to={self.reset_to!r} is neither a folder nor a bundled model alias: give the folder of "
                "the model to reset toward (e.g. the base model) or an alias such as 'smollm2-135m'."
            ) from None
        outside = {ParamKind(kind) for kind in self.freeze_outside}
        names = [n for n in candidates if _freezable(layer_map, n, outside)]
        try:
            return PretrainedSnapshot.from_folder(model, source, names)
        except ValueError as err:
            raise ValueError(
                f"reset_to={self.reset_to!r} cannot be the reset target of {type(model).__name__}: {err}; give a "
                "model with the same architecture, e.g. the base model this one was fine-tuned from."
            ) from None

    @override
    def schedule_key(self, trainer: L.Trainer) -> Hashable:
        if self.redraw == "epoch":
            return trainer.current_epoch
        if self.redraw == "steps":
            assert self.every_n_steps is not None
            return trainer.global_step // self.every_n_steps
        if self.redraw == "task":
            return current_task(trainer)
        return None

    @override
    def draw(self, index: int, trainer: L.Trainer, pl_module: L.LightningModule) -> set[str]:
        assert self.selection is not None and self.layer_map is not None
        candidates = self.selection.candidates
        frozen = hft_frozen(self.layer_map, candidates, self.seed, index, self.freeze_outside)
        return set(candidates) - frozen

    @override
    def extra_state(self) -> dict[str, Any]:
        return {"redraw": self.redraw, "every_n_steps": self.every_n_steps}
