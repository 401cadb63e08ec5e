r"""
LiNeS: post-training layer scaling
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

At the end of training the update ``tau = theta_ft - theta_0`` of block ``i`` (of ``L``) is scaled by
``alpha + beta * i / (L - 1)`` and everything outside the blocks by ``alpha`` (Wang et al., ICLR 2025,
https://arxiv.org/abs/2410.17146). Shallow layers move back towards the pretrained weights, deep layers
keep their update: forgetting drops at little cost on the target task. A newly initialised head (absent from
the pretrained weights) has no task vector and keeps its fine-tuned value unless ``head_scale`` says otherwise.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from typing_extensions import override

from lightning_ft.core.io import atomic_file, write_text_atomic
from lightning_ft.core.layer_map import LayerMap, ParamInfo, find_transformer, is_quantized_param, plain_name
from lightning_ft.core.process_group import destroy_process_group_at_exit
from lightning_ft.core.shards import any_rank, is_sharded, local
from lightning_ft.core.snapshot import PretrainedSnapshot
from lightning_ft.core.weights import safetensors_index as _safetensors_files
from lightning_ft.merging.ops import NonBlockScale, lines_factor, lines_scale
from lightning_ft.monitors.panels import Panel
from lightning_ft.support import MethodSupport, check_support

__all__ = ["LiNeS"]

ALPHA_GRID = tuple(round(1.0 - 0.1 * i, 1) for i in range(11))  # official: np.arange(0, 1.1, 0.1)[::-1]
_SKIPPED_ADAPTERS = frozenset({"lora_A", "lora_embedding_A"})  # the low-rank update is scaled through B
_SAVED_COPY = re.compile(r"\.modules_to_save\.[^.]+(?=\.)")  # peft's trainable copy of a module
_SLACK = 1e-9  # float slack on alpha + beta <= 1 (0.7 + 0.3 is not exactly 1.0)


class LiNeS(L.Callback):
    """Scale the fine-tuning update linearly with depth at the end of training.

    The edit happens in ``on_train_end`` on every rank, before ``ModelCheckpoint``'s end-of-training save
    and before the module's ``on_fit_end`` (which writes the HF folder), so the checkpoint ``last.ckpt``
    (re-saved after the edit), the HF output folder and any following ``validate`` see the edited
    weights. theta_0 is the shared :class:`~lightning_ft.core.snapshot.PretrainedSnapshot`, captured in
    ``setup`` (before a checkpoint is restored), so resumed runs and other callbacks use the same one.
    For LoRA the factor multiplies each layer's low-rank update (``lora_B``; ``lora_A`` is left alone).
    Tied weights are scaled once.

    With ``alpha="auto"`` every alpha of ``alphas`` is tried (``beta = 1 - alpha`` unless ``beta`` is
    given) and scored on the validation loaders with the module's ``evaluate``:
    ``target_weight * target / target_ft + control_ppl_0 / control_ppl`` (target = ``target_acc``, else
    ``1 / target_loss``; ``_ft`` is the fine-tuned model, ``_0`` the pretrained one). The best alpha is
    applied; the sweep is logged (``lines/*`` metrics, a W&B table and plot) and written as
    ``lines_sweep.{json,md,png}`` into ``default_root_dir``. The control term needs control data (the
    DataModule's ``control``, reported by ``evaluate`` as ``control_ppl``): without it the sweep is refused
    rather than scoring the target alone.

    Every factor lies in ``[0, 1]``: LiNeS only shrinks the update, so ``alpha`` (and each of ``alphas``)
    is in ``[0, 1]``, ``beta`` is in ``[0, 1 - alpha]`` and ``head_scale`` in ``[0, 1]``; anything else,
    NaN and infinities included, is refused at construction. The edited weights are checked to be finite
    before any of them is written; if one is not, nothing is edited and the fit stops with an error, so
    ``last.ckpt`` and the HF folder are not written from it.

    A tensor outside the blocks that is absent from the pretrained weights file the model was loaded from
    (e.g. the ``classifier`` / ``score`` head that ``AutoModelForSequenceClassification`` creates, or peft's
    ``modules_to_save`` copy of it) has no pretrained value: its theta_0 is its random initialisation. It
    keeps its fine-tuned value (factor 1) by default, or is scaled by ``head_scale``.

    Args:
        alpha: Factor of the first block and of the parameters outside the blocks, in ``[0, 1]``, or ``"auto"``.
        beta: Depth slope in ``[0, 1 - alpha]``; default ``1 - alpha`` (the last block keeps its full update).
        alphas: The grid for ``alpha="auto"`` (default 1.0, 0.9, ..., 0.0 as in the official code).
        target_weight: Weight of the normalised target metric in the selection rule (official: 2).
        non_block_scale: Factor outside the blocks: ``"alpha"`` (official), ``"one"`` or ``"last"``.
        head_scale: Factor of newly initialised tensors (no pretrained value); ``None`` leaves them as
            fine-tuned (factor 1).
        module: Dotted attribute path to the transformers model inside the LightningModule.
        resave_checkpoint: Re-save each ``ModelCheckpoint``'s ``last_model_path`` after the edit.
    """

    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "fsdp2", "quantized", "lora", "mixed"}),
        {},
        "With a LoRA or quantized backbone it scales the adapters (not DoRA). Under FSDP2 each process scales its "
        "own shard.",
    )

    def __init__(
        self,
        alpha: float | Literal["auto"] = "auto",
        beta: float | None = None,
        alphas: list[float] | None = None,
        target_weight: float = 2.0,
        non_block_scale: NonBlockScale = "alpha",
        head_scale: float | None = None,
        module: str | None = None,
        resave_checkpoint: bool = True,
    ) -> None:
        if alpha != "auto" and not _is_number(alpha):
            raise ValueError(f"LiNeS alpha={alpha!r} must be a number in [0, 1] or 'auto'.")
        if non_block_scale not in ("alpha", "one", "last"):
            raise ValueError(f"LiNeS non_block_scale={non_block_scale!r} must be 'alpha', 'one' or 'last'.")
        self.alphas = list(alphas) if alphas is not None else list(ALPHA_GRID)
        if not self.alphas or not all(_is_number(a) and 0.0 <= a <= 1.0 for a in self.alphas):  # NaN fails too
            raise ValueError(f"LiNeS alphas={alphas!r} must be a non-empty list of finite numbers in [0, 1].")
        self.alphas = [float(a) for a in self.alphas]
        self.alpha: float | Literal["auto"] = "auto" if alpha == "auto" else _unit("alpha", alpha, " or 'auto'")
        self.beta = None if beta is None else _unit("beta", beta)
        largest, which = (max(self.alphas), "the largest of alphas") if self.alpha == "auto" else (self.alpha, "alpha")
        if self.beta is not None and largest + self.beta > 1.0 + _SLACK:
            raise ValueError(
                f"LiNeS beta={beta!r} with {which}={largest:g} gives the last block the factor {largest + self.beta:g} "
                f"> 1: choose beta in [0, {1.0 - largest:g}] (1 - alpha) or leave it unset."
            )
        if not _is_number(target_weight) or not math.isfinite(target_weight) or target_weight < 0:
            raise ValueError(f"LiNeS target_weight={target_weight!r} must be a finite number >= 0 (official: 2).")
        self.head_scale = None if head_scale is None else _unit("head_scale", head_scale)
        self.target_weight, self.non_block_scale = float(target_weight), non_block_scale
        self.module, self.resave_checkpoint = module, resave_checkpoint
        self.chosen_alpha: float | None = None
        self.applied_step: int | None = None
        self.sweep: list[dict[str, float]] = []
        self.new_tensors: frozenset[str] = frozenset()
        self._snapshot: PretrainedSnapshot | None = None
        self._model: torch.nn.Module | None = None

    @property
    @override
    def state_key(self) -> str:
        return f"LiNeS[alpha={self.alpha}, beta={self.beta}]"

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        destroy_process_group_at_exit()  # a clean gloo exit, also for this callback in a user's own module
        self._model = find_transformer(pl_module, self.module)
        check_support(self, trainer, self._model)
        self._snapshot = PretrainedSnapshot.of(self._model)
        dora = next((i.name for i in self._snapshot.layer_map if i.adapter == "lora_magnitude_vector"), None)
        if dora is not None:
            raise ValueError(f"LiNeS cannot scale DoRA adapters ({dora}) linearly: use plain LoRA or full fine-tuning.")
        if self._snapshot.layer_map.num_blocks == 0:
            raise ValueError(
                "LiNeS found no transformer blocks (layers.<i>, h.<i>, ...) in the model: pass `module=` the path "
                "to a transformers model."
            )
        if self.alpha == "auto" and not callable(getattr(pl_module, "evaluate", None)):
            raise ValueError(
                f"LiNeS(alpha='auto') scores alphas with `evaluate(loaders)`, which {type(pl_module).__name__} "
                "lacks: give a fixed alpha (e.g. alpha=0.2) or use CausalLMModule."
            )
        if self.alpha == "auto" and _lacks_control(trainer):
            raise ValueError(_NO_CONTROL)
        self.new_tensors = newly_initialised(self._model, self._snapshot)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.applied_step == trainer.global_step:
            return  # restored from a checkpoint written after the edit: the weights are already edited
        assert self._model is not None and self._snapshot is not None
        infos = self._edited(self._model, self._snapshot)
        if self.alpha == "auto":
            alpha = self._sweep(trainer, pl_module, infos)
        else:
            alpha = float(self.alpha)
        alpha = float(trainer.strategy.broadcast(alpha, src=0))
        self.apply(alpha, infos)
        self.chosen_alpha, self.applied_step = alpha, trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics({"lines/alpha": alpha, "lines/beta": self._beta(alpha)}, step=trainer.global_step)
        if self.resave_checkpoint:
            for callback in trainer.checkpoint_callbacks:
                path = getattr(callback, "last_model_path", "")
                if path:
                    trainer.save_checkpoint(path)

    # ------------------------------------------------------------------ the edit
    def _beta(self, alpha: float) -> float:
        return float(self.beta) if self.beta is not None else 1.0 - alpha

    def factors(self, alpha: float, layer_map: LayerMap | None = None) -> dict[str, float]:
        """Factor of every parameter (canonical name) for ``alpha`` and the configured beta."""
        layer_map = layer_map or (self._snapshot.layer_map if self._snapshot is not None else None)
        if layer_map is None:
            raise RuntimeError("LiNeS has no model yet: it is set up when fit starts.")
        beta, n = self._beta(alpha), layer_map.num_blocks
        head = 1.0 if self.head_scale is None else self.head_scale
        return {
            i.name: head if i.name in self.new_tensors else lines_factor(i.block, n, alpha, beta, self.non_block_scale)
            for i in layer_map
        }

    def _edited(self, model: torch.nn.Module, snapshot: PretrainedSnapshot) -> list[ParamInfo]:
        """Parameters whose value moved away from theta_0 (adapter A factors and quantized weights excluded); under
        FSDP2 each process compares its own shard, and a tensor that moved on any process counts."""
        considered, moved = [], []
        for info in snapshot.layer_map:
            param = model.get_parameter(info.name)
            if info.adapter in _SKIPPED_ADAPTERS or is_quantized_param(param):
                continue
            if not param.is_floating_point():
                continue
            considered.append(info)
            moved.append(not torch.equal(local(param.detach()), snapshot.get_local(info.name, param)))
        moved = any_rank(moved, self._sharded)
        return [info for info, did in zip(considered, moved) if did]

    @torch.no_grad()
    def apply(
        self, alpha: float, infos: list[ParamInfo] | None = None, finetuned: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Write ``theta_0 + lambda * (theta - theta_0)`` into the model, in place.

        Every edited tensor is computed and checked to be finite before the first one is written (a second
        pass recomputes it, so no copy of the model is held).

        Args:
            alpha: The alpha to apply (beta from the configuration).
            infos: Parameters to edit; by default those that moved.
            finetuned: Fine-tuned values to start from (used by the sweep), else the live parameters.

        Raises:
            FloatingPointError: If an edited tensor would hold NaN or infinity; the model is left unchanged.
        """
        assert self._model is not None and self._snapshot is not None
        infos = self._edited(self._model, self._snapshot) if infos is None else infos
        factors = self.factors(alpha)
        finite = [bool(torch.isfinite(self._scaled(info, factors[info.name], finetuned)).all()) for info in infos]
        bad = any_rank([not ok for ok in finite], self._sharded)  # every process refuses if one shard is not finite
        for info, not_finite in zip(infos, bad):
            if not_finite:
                raise FloatingPointError(
                    f"LiNeS(alpha={alpha:g}) would write NaN or infinity into {info.name} (its fine-tuned or "
                    "pretrained value is not finite), so it edited no weight and the fit stops before the edited "
                    "model is saved: find where training diverged (lower the learning rate, clip gradients)."
                )
        for info in infos:
            local(self._model.get_parameter(info.name)).copy_(self._scaled(info, factors[info.name], finetuned))

    def _scaled(self, info: ParamInfo, factor: float, finetuned: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """``theta_0 + factor * (theta - theta_0)`` of one parameter (this process's shard of it under FSDP2: the
        edit is elementwise), in its dtype and on its device."""
        assert self._model is not None and self._snapshot is not None
        param = self._model.get_parameter(info.name)
        held = local(param.detach())
        theta = finetuned[info.name].to(held.device) if finetuned is not None else held
        theta0 = self._snapshot.get_local(info.name, param, dtype=torch.float32)
        return lines_scale(theta0, theta, factor)

    @property
    def _sharded(self) -> bool:
        """Whether the model's parameters are FSDP2 shards (each process edits its own rows)."""
        return self._model is not None and is_sharded(self._model)

    # ------------------------------------------------------------------ alpha="auto"
    def _sweep(self, trainer: L.Trainer, pl_module: L.LightningModule, infos: list[ParamInfo]) -> float:
        assert self._model is not None
        loaders = _val_loaders(trainer)
        finetuned = {i.name: local(self._model.get_parameter(i.name).detach()).to("cpu", copy=True) for i in infos}
        evaluate = pl_module.evaluate  # type: ignore[operator]
        try:
            ft = evaluate(loaders)
            if "control_ppl" not in ft:  # e.g. loaders given straight to fit(), or a module reporting drift only
                raise ValueError(_NO_CONTROL)
            self._snapshot_restore(infos)  # theta_0: the zero-shot control reference
            zero = evaluate(loaders)
            rows = []
            for alpha in self.alphas:
                self.apply(alpha, infos, finetuned)
                rows.append(self._row(alpha, evaluate(loaders), ft, zero))
        finally:
            with torch.no_grad():
                for info in infos:
                    local(self._model.get_parameter(info.name)).copy_(finetuned[info.name])
        self.sweep = rows
        best = max(rows, key=lambda r: r["score"])
        self._emit(trainer, rows, float(best["alpha"]))
        return float(best["alpha"])

    def _snapshot_restore(self, infos: list[ParamInfo]) -> None:
        assert self._model is not None and self._snapshot is not None
        self._snapshot.restore(self._model, [i.name for i in infos])

    def _row(self, alpha: float, m: dict[str, float], ft: dict[str, float], zero: dict[str, float]) -> dict[str, float]:
        if "target_acc" in m:
            target = m["target_acc"] / max(ft["target_acc"], 1e-12)
        else:
            target = ft["target_loss"] / max(m["target_loss"], 1e-12)
        control = zero["control_ppl"] / m["control_ppl"] if "control_ppl" in m else 0.0
        row = {"alpha": alpha, "beta": self._beta(alpha), **m, "target_norm": target, "control_norm": control}
        row["score"] = self.target_weight * target + control
        return row

    @rank_zero_only
    def _emit(self, trainer: L.Trainer, rows: list[dict[str, float]], best: float) -> None:
        root = Path(trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        columns = list(rows[0])
        write_text_atomic(root / "lines_sweep.json", json.dumps({"chosen_alpha": best, "rows": rows}, indent=2))
        table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        table += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in rows]
        write_text_atomic(root / "lines_sweep.md", f"LiNeS sweep (chosen alpha = {best})\n\n" + "\n".join(table) + "\n")
        figure = _plot(rows, best, root / "lines_sweep.png")
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):
                logger.log_table(key="lines/sweep", columns=columns, data=[[r[c] for c in columns] for r in rows])
            if figure is not None and hasattr(logger, "log_image"):
                logger.log_image(key="lines/sweep_plot", images=[str(figure)])

    def dashboard_panels(self) -> list[Panel]:
        """The factor of each block for the chosen alpha, and the alpha sweep."""
        if self.chosen_alpha is None or self._snapshot is None:
            return []
        per_block: dict[str, float] = {}
        for info in self._snapshot.layer_map:
            label = f"{info.block:02d}" if info.block is not None else info.kind.value
            per_block.setdefault(label, self.factors(self.chosen_alpha)[info.name])
        panels = [Panel("lines/factors", f"LiNeS factor per block (alpha {self.chosen_alpha:g}, beta "
                        f"{self._beta(self.chosen_alpha):g})", "bars", ["block", "factor"],
                        [[k, v] for k, v in sorted(per_block.items())], x_label="block", y_label="factor",
                        note="The fine-tuning update of each tensor is multiplied by its block's factor.")]  # fmt: skip
        if self.sweep:
            columns = list(self.sweep[0])
            panels.append(Panel("lines/sweep", "LiNeS alpha sweep", "lines", columns, [[r.get(c) for c in columns] for r in self.sweep],
                                x_label="alpha", note=f"Chosen alpha = {self.chosen_alpha:g}."))  # fmt: skip
        return panels

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"chosen_alpha": self.chosen_alpha, "applied_step": self.applied_step, "sweep": list(self.sweep)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.chosen_alpha = state_dict.get("chosen_alpha")
        self.applied_step = state_dict.get("applied_step")
        self.sweep = list(state_dict.get("sweep", []))


_NO_CONTROL = (
    "LiNeS(alpha='auto') scores forgetting with the control perplexity (`control_ppl` from `evaluate`), so it "
    "needs control data: set the DataModule's `control` (e.g. `data.control: humaneval`) or give a fixed alpha "
    "(e.g. alpha: 0.2)."
)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _unit(name: str, value: Any, alternative: str = "") -> float:
    """``value`` as a float when it is a finite number in [0, 1]; else one sentence naming ``name``."""
    if not _is_number(value) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"LiNeS {name}={value!r} must be a finite number in [0, 1]{alternative}.")
    return float(value)


def _lacks_control(trainer: L.Trainer) -> bool:
    """Whether the fit's DataModule is known to have no control set (unknown: ``False``)."""
    control = getattr(trainer.datamodule, "control_dataloader", None)
    return callable(control) and control() is None


def newly_initialised(model: torch.nn.Module, snapshot: PretrainedSnapshot) -> frozenset[str]:
    """Canonical names of the tensors outside the blocks that have no pretrained value.

    A tensor has none when no name of it (plain, tied alias, with or without the model's
    ``base_model_prefix``) is a key of the safetensors file(s) the snapshot's ``source`` names: the new
    head of ``AutoModelForSequenceClassification`` and peft's ``modules_to_save`` copy of it. Adapter
    tensors (LoRA, ...) never count: their theta_0 is their own start. Without a local weights file, or
    when the file's names do not cover the model's blocks, nothing is reported (with a warning).

    Args:
        model: The transformers (or peft) model.
        snapshot: Its shared pretrained snapshot.

    Returns:
        The canonical names.
    """
    index = _safetensors_files(Path(snapshot.source)) if snapshot.source is not None else None
    keys = set(index or ())
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    prefix = str(getattr(base, "base_model_prefix", "") or "")
    absent = [
        info for info in snapshot.layer_map
        if info.adapter in (None, "modules_to_save") and not _in_file(info, keys, prefix)
    ]  # fmt: skip
    heads = [info for info in absent if info.block is None]
    if index is None or len(heads) < len(absent):  # no file, or its names do not cover the blocks
        if any(model.get_parameter(info.name).requires_grad for info in heads):
            rank_zero_warn(
                "LiNeS cannot tell newly initialised heads from pretrained tensors (no local safetensors file "
                "whose names match the model): every tensor outside the blocks gets the non-block factor."
            )
        return frozenset()
    return frozenset(info.name for info in heads)


def _in_file(info: ParamInfo, keys: set[str], prefix: str) -> bool:
    names = {_SAVED_COPY.sub("", name) for name in (info.base_name, *(plain_name(a) for a in info.aliases))}
    if prefix:
        names |= {n.removeprefix(f"{prefix}.") for n in names} | {f"{prefix}.{n}" for n in names}
    return not names.isdisjoint(keys)


def _val_loaders(trainer: L.Trainer) -> list[Any]:
    datamodule = trainer.datamodule
    found = datamodule.val_dataloader() if datamodule is not None else trainer.val_dataloaders
    if found is None:
        raise ValueError(
            "LiNeS(alpha='auto') needs validation data: give the Trainer a val_dataloader or a fixed alpha."
        )
    return list(found) if isinstance(found, (list, tuple)) else [found]


def _fmt(value: float) -> str:
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)


def _plot(rows: list[dict[str, float]], best: float, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    alphas = [r["alpha"] for r in rows]
    for key in ("target_norm", "control_norm", "score"):
        ax.plot(alphas, [r[key] for r in rows], marker="o", label=key)
    ax.axvline(best, color="grey", linestyle="--", label=f"chosen alpha={best}")
    ax.set_xlabel("alpha (beta = 1 - alpha)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path
