"""S2FT: structured sparse fine-tuning (Yang et al., NeurIPS 2024, arXiv 2412.06289).

"Select sparsely, compute densely": choose a few attention units (``v_proj`` rows, ``o_proj`` columns) and FFN
channels (``up_proj`` rows, ``down_proj`` columns) over all blocks jointly, co-permute each block so the chosen units
are contiguous (the permutation preserves the block's function), and train only those dense slices as deltas
(:class:`~lightning_ft.core.structured.SliceDelta`): the gradient and the optimizer state are the slices' size, and
the frozen weights get no gradient. At the end of training the deltas are fused into the weights and every block is
permuted back, so the model, ``last.ckpt`` and ``hf_model/`` are plain (only the chosen rows and columns differ from
the pretrained model).

Attention units are key/value **groups** (a key/value head and the query heads that share it; one head under
multi-head attention): the only units a permutation can reorder without changing a grouped-query model's function.
The official code orders query heads and applies that order to the key/value rows, which is wrong for GQA models.
"""

from __future__ import annotations

import math
import random
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from typing_extensions import override

from lightning_ft.callbacks.layerwise_outliers import calibration_batches, fit_train_loader
from lightning_ft.callbacks.lines import LiNeS
from lightning_ft.core.layer_map import LayerMap, find_transformer
from lightning_ft.core.selection import WeightSelecting, refuse_second_selection
from lightning_ft.core.structured import BlockUnits, SliceDelta, block_units, order_for, permute_block, unit_rows
from lightning_ft.errors import UserError
from lightning_ft.support import MethodSupport

__all__ = ["S2FT"]

Rule = Literal["random", "weight", "activation", "weight_activation", "gradient"]
KINDS = ("v", "o", "u", "d")  # v_proj rows, o_proj columns (groups); up_proj rows, down_proj columns (channels)


class S2FT(WeightSelecting, L.Callback):
    """Structured sparse fine-tuning of chosen attention groups and FFN channels (see the module docstring).

    The budget is a fraction of all units of a kind over all blocks (``floor(ratio * blocks * units)``, the official
    code's rule), chosen jointly over the blocks by ``rule``: ``random`` (S2FT-R, the released default, seeded),
    ``weight`` (the unit's weight slice's norm, S2FT-W), ``activation`` (the norm of the unit's activation over
    ``calibration_samples`` training sequences: a row unit's output, a column unit's input; S2FT-A),
    ``weight_activation`` (their product, S2FT-S) or ``gradient`` (the norm of the loss gradient of the unit's slice
    over those sequences, S2FT-G; needs the module's ``compute_loss``); ``largest=False`` takes the smallest scores.
    Scores are summed over the processes under DDP, so every process trains the same units. Everything else in the
    backbone is frozen (embeddings, norms and head included, as in the paper); ``gate_proj`` is permuted, not trained.

    The choice is made in ``setup`` (before the optimizer is built) and is a function of the seed, the pretrained
    weights and the first training batches, so a run resumed from a checkpoint written during training makes the same
    choice (checked against the checkpoint's). Defaults are the paper's Llama-2-7B script: ``o_ratio=0.052``,
    ``d_ratio=0.02``.

    Args:
        v_ratio: Fraction of all attention groups whose ``v_proj`` rows train.
        o_ratio: Fraction of all attention groups whose ``o_proj`` columns train.
        u_ratio: Fraction of all FFN channels whose ``up_proj`` rows train.
        d_ratio: Fraction of all FFN channels whose ``down_proj`` columns train.
        rule: How units are chosen.
        largest: Take the highest scores (``False``: the lowest); ignored by ``random``.
        calibration_samples: Training sequences the ``activation``/``weight_activation``/``gradient`` scores use.
        seed: Seed of the ``random`` rule.
        resave_checkpoint: Re-save each ``ModelCheckpoint``'s ``last_model_path`` after the fusion (plain layout).
        module: Dotted attribute path to the transformers model; default: found automatically.
    """

    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "mixed"}),
        {
            "fsdp2": "{name} permutes whole rows and columns of every block's matrices and fuses its slices into them "
            "at the end, which {strategy} shards by rows across processes: use strategy='ddp' (or a single device).",
            "quantized": "{name} permutes and trains slices of the weights, which a quantized {model} stores packed "
            "in 4/8 bit: load the backbone unquantized.",
            "lora": "{name} trains slices of the weights itself, which a LoRA backbone freezes behind its adapters: "
            "drop peft (S2FT is the parameter-efficient method here).",
        },
        "Attention units are key/value groups (exact under grouped-query attention); the model is fused and "
        "un-permuted at the end of training.",
    )

    def __init__(
        self,
        v_ratio: float = 0.0,
        o_ratio: float = 0.052,
        u_ratio: float = 0.0,
        d_ratio: float = 0.02,
        rule: Rule = "random",
        largest: bool = True,
        calibration_samples: int = 32,
        seed: int = 0,
        resave_checkpoint: bool = True,
        module: str | None = None,
    ) -> None:
        ratios = {"v_ratio": v_ratio, "o_ratio": o_ratio, "u_ratio": u_ratio, "d_ratio": d_ratio}
        for name, value in ratios.items():
            if not 0 <= value <= 1:
                raise ValueError(f"{name}={value} must be a fraction in [0, 1].")
        if not any(ratios.values()):
            raise ValueError("v_ratio, o_ratio, u_ratio and d_ratio are all 0, so S2FT would train nothing: set one.")
        if rule not in ("random", "weight", "activation", "weight_activation", "gradient"):
            raise ValueError(f"rule={rule!r} is not an S2FT rule: use random, weight, activation, weight_activation "
                             "or gradient.")  # fmt: skip
        if calibration_samples < 1:
            raise ValueError(f"calibration_samples={calibration_samples} must be a positive integer.")
        self.ratios = dict(zip(KINDS, (v_ratio, o_ratio, u_ratio, d_ratio)))
        self.rule, self.largest, self.calibration_samples, self.seed = rule, largest, calibration_samples, seed
        self.resave_checkpoint, self.module = resave_checkpoint, module
        self.selection: dict[str, list[list[int]]] | None = None
        self.fused_step: int | None = None
        self._model: torch.nn.Module | None = None
        self._units: list[BlockUnits] = []
        self._orders: list[tuple[list[int], list[int]]] = []
        self._deltas: list[SliceDelta] = []
        self._frozen: dict[str, bool] = {}
        self._handle: Any = None

    # ------------------------------------------------------------------ set up
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning_ft.core.process_group import destroy_process_group_at_exit
        from lightning_ft.support import check_support

        if stage != "fit" or self._deltas:
            return  # validate/test/predict see the plain model (fused at the end of training)
        refuse_second_selection(self, trainer)
        editors = [type(c).__name__ for c in trainer.callbacks if isinstance(c, LiNeS)]
        if editors:
            raise ValueError(f"S2FT keeps the blocks permuted until the end of training, where {editors[0]} would "
                             "compare them with the pretrained layout: run LiNeS in a second fit on S2FT's hf_model.")  # fmt: skip
        destroy_process_group_at_exit()
        model = find_transformer(pl_module, self.module)
        check_support(self, trainer, model)
        self._model = model
        self._units = block_units(model, LayerMap.from_model(model), model.config)
        self.selection = self._select(trainer, pl_module)
        self.fused_step = None
        self._apply()
        self._handle = pl_module.register_load_state_dict_pre_hook(self._check_layout)

    def counts(self) -> dict[str, int]:
        """Units of each kind to train over all blocks: ``floor(ratio * blocks * units)``."""
        blocks = len(self._units)
        groups, channels = self._units[0].groups, self._units[0].channels
        return {k: math.floor(self.ratios[k] * blocks * (groups if k in "vo" else channels)) for k in KINDS}

    def _select(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, list[list[int]]]:
        counts = self.counts()
        if not any(counts.values()):
            raise ValueError(f"S2FT's ratios {self.ratios} choose no unit of this {len(self._units)}-block model: "
                             "raise them.")  # fmt: skip
        per_block = {k: self._units[0].groups if k in "vo" else self._units[0].channels for k in KINDS}
        if self.rule == "random":  # one draw per kind over every block's units, as the official code
            rng = random.Random(self.seed)
            chosen = {k: rng.sample(range(len(self._units) * per_block[k]), counts[k]) for k in KINDS}
        else:
            scores = self._scores(trainer, pl_module)
            chosen = {}
            for k in KINDS:
                flat = scores[k].reshape(-1)
                chosen[k] = torch.topk(flat, counts[k], largest=self.largest).indices.tolist() if counts[k] else []
        return {k: [sorted(i % per_block[k] for i in chosen[k] if i // per_block[k] == b)
                    for b in range(len(self._units))] for k in KINDS}  # fmt: skip

    @torch.no_grad()
    def _apply(self) -> None:
        assert self._model is not None and self.selection is not None
        self._frozen = {n: p.requires_grad for n, p in self._model.named_parameters()}
        for p in self._model.parameters():
            p.requires_grad_(False)
        self._orders, self._deltas = [], []
        for b, units in enumerate(self._units):
            sel = {k: self.selection[k][b] for k in KINDS}
            attention, va, vo, oc = order_for(sel["v"], sel["o"], units.groups)
            ffn, ua, ud, dc = order_for(sel["u"], sel["d"], units.channels)
            permute_block(units, attention, ffn)
            self._orders.append((attention, ffn))
            slices = ((units.v, "rows", 0, (va + vo) * units.kv_rows),
                      (units.o, "columns", va * units.group_rows, (va + vo + oc) * units.group_rows),
                      (units.up, "rows", 0, ua + ud), (units.down, "columns", ua, ua + ud + dc))  # fmt: skip
            self._deltas += [SliceDelta(layer, side, s, e) for layer, side, s, e in slices if e > s]

    # ------------------------------------------------------------------ scores
    def _scores(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """Per kind, a ``[blocks, units]`` score (summed over the processes when it depends on the data)."""
        weight = {k: torch.stack([self._unit_norms(u, k, None) for u in self._units]) for k in KINDS}
        if self.rule == "weight":
            return weight
        data = self._data_scores(trainer, pl_module)
        if self.rule == "weight_activation":
            return {k: weight[k] * data[k] for k in KINDS}
        return data

    def _unit_norms(self, units: BlockUnits, kind: str, grads: dict[int, torch.Tensor] | None) -> torch.Tensor:
        """The norm of each unit's slice of the weight (or of its gradient in ``grads``, by parameter id)."""
        layer, size, dim, count = {
            "v": (units.v, units.kv_rows, 0, units.groups), "o": (units.o, units.group_rows, 1, units.groups),
            "u": (units.up, 1, 0, units.channels), "d": (units.down, 1, 1, units.channels),
        }[kind]  # fmt: skip
        tensor = (grads or {}).get(id(layer.weight), layer.weight).detach().float()
        tensor = tensor if dim == 0 else tensor.T
        return tensor.reshape(count, size * tensor.shape[1]).norm(dim=1).cpu()

    def _data_scores(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        assert self._model is not None
        batches = calibration_batches(trainer, self.calibration_samples, None, loader=fit_train_loader(trainer))
        if not batches or batches[0] is None:
            raise ValueError(f"S2FT(rule={self.rule!r}) scores units on training batches, and this fit's training "
                             "data is not a DataLoader: use rule='random' or 'weight'.")  # fmt: skip
        if self.rule == "gradient":
            scores = self._gradient_scores(pl_module, batches)
        else:
            scores = self._activation_scores(batches)
        flat = torch.cat([scores[k].reshape(-1) for k in KINDS])
        if trainer.world_size > 1:
            flat = trainer.strategy.reduce(flat, reduce_op="sum")
        out, start = {}, 0
        for k in KINDS:
            out[k] = flat[start : start + scores[k].numel()].reshape(scores[k].shape)
            start += scores[k].numel()
        return out

    @torch.no_grad()
    def _activation_scores(self, batches: list[Any]) -> dict[str, torch.Tensor]:
        assert self._model is not None
        sums: dict[tuple[int, str], torch.Tensor] = {}

        def record(key: tuple[int, str], values: torch.Tensor, size: int) -> None:
            squares = values.detach().float().pow(2).reshape(-1, values.shape[-1]).sum(0)
            squares = squares.reshape(-1, size).sum(1).cpu()
            sums[key] = sums.get(key, 0) + squares

        handles = []
        for b, u in enumerate(self._units):  # a row unit's output, a column unit's input
            handles += [
                u.v.register_forward_hook(lambda m, a, o, b=b, s=u.kv_rows: record((b, "v"), o, s)),
                u.o.register_forward_pre_hook(lambda m, a, b=b, s=u.group_rows: record((b, "o"), a[0], s)),
                u.up.register_forward_hook(lambda m, a, o, b=b: record((b, "u"), o, 1)),
                u.down.register_forward_pre_hook(lambda m, a, b=b: record((b, "d"), a[0], 1)),
            ]
        was_training = self._model.training
        self._model.eval()
        try:
            for batch in batches:
                self._model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        finally:
            self._model.train(was_training)
            for handle in handles:
                handle.remove()
        return {k: torch.stack([sums[(b, k)].sqrt() for b in range(len(self._units))]) for k in KINDS}

    def _gradient_scores(self, pl_module: L.LightningModule, batches: list[Any]) -> dict[str, torch.Tensor]:
        assert self._model is not None
        compute = getattr(pl_module, "compute_loss", None)
        if compute is None:
            raise UserError(f"S2FT(rule='gradient') needs {type(pl_module).__name__}.compute_loss(batch) -> loss to "
                            "score units: add it or use another rule.")  # fmt: skip
        layers = [getattr(u, a) for u in self._units for a in ("v", "o", "up", "down")]
        flags = {id(p): p.requires_grad for p in self._model.parameters()}
        squares: dict[int, torch.Tensor] = {}
        try:
            for layer in layers:
                layer.weight.requires_grad_(True)
            for batch in batches:
                grads = torch.autograd.grad(compute(batch), [layer.weight for layer in layers])
                for layer, grad in zip(layers, grads):
                    squares[id(layer.weight)] = squares.get(id(layer.weight), 0) + grad.float().pow(2)
        finally:
            for p in self._model.parameters():
                p.requires_grad_(flags[id(p)])
        norms = {key: value.sqrt() for key, value in squares.items()}
        return {k: torch.stack([self._unit_norms(u, k, norms) for u in self._units]) for k in KINDS}

    # ------------------------------------------------------------------ the end
    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._deltas:
            return
        self.fuse()
        self.fused_step = trainer.global_step
        if self.resave_checkpoint:
            for callback in trainer.checkpoint_callbacks:
                path = getattr(callback, "last_model_path", "")
                if path:
                    trainer.save_checkpoint(path)

    @torch.no_grad()
    def fuse(self) -> None:
        """Fuse every delta into its weight, permute every block back and restore the ``requires_grad`` flags."""
        assert self._model is not None
        for delta in self._deltas:
            delta.fuse()
        for units, (attention, ffn) in zip(self._units, self._orders):
            permute_block(units, attention, ffn, inverse=True)
        for name, param in self._model.named_parameters():
            param.requires_grad_(self._frozen.get(name, param.requires_grad))
        self._deltas = []
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def allowed_masks(self) -> dict[str, torch.Tensor]:
        """Per weight (model-relative name, plain layout), the entries S2FT may change: the chosen units' rows of
        ``v_proj``/``up_proj`` and columns of ``o_proj``/``down_proj``."""
        assert self._model is not None and self.selection is not None
        names = {id(p): n for n, p in self._model.named_parameters()}
        out = {}
        for b, u in enumerate(self._units):
            for k, layer, size, dim in (("v", u.v, u.kv_rows, 0), ("o", u.o, u.group_rows, 1), ("u", u.up, 1, 0),
                                        ("d", u.down, 1, 1)):  # fmt: skip
                if self.selection[k][b]:
                    mask = torch.zeros(layer.weight.shape, dtype=torch.bool)
                    index = unit_rows(self.selection[k][b], size)
                    mask.index_fill_(dim, index, True)
                    out[names[id(layer.weight)]] = mask.reshape(-1)
        return out

    def _check_layout(self, module: Any, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        if not any(key.endswith(f".{SliceDelta.NAME}") for key in state_dict):
            raise UserError("this checkpoint holds a finished S2FT fit (fused and permuted back), which S2FT cannot "
                            "resume: fine-tune its hf_model/ folder in a new fit instead.")  # fmt: skip

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"selection": self.selection, "fused_step": self.fused_step, "rule": self.rule, "seed": self.seed,
                "ratios": dict(self.ratios)}  # fmt: skip

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("selection")
        if self.selection is not None and saved is not None and saved != self.selection:
            raise UserError("this checkpoint's S2FT trained other units than this fit chooses (another rule, ratios, "
                            "seed or data): resume with the settings that wrote it.")  # fmt: skip
        self.fused_step = state_dict.get("fused_step")
