"""CoFiTune: coarse-to-fine fine-tuning that keeps general abilities (Zhang et al., 2024, arXiv 2404.10306).

**Coarse**: only chosen modules in a chosen depth band train (the README's default: FFN ``up_proj`` and ``down_proj``
in the blocks of the (25%, 50%] band, layers 8-15 of a 32-layer model). **Fine**: at the start of the fit an
importance pass on general text (no optimizer step) puts virtual masks of ones on every block's FFN intermediate units
(``up_proj`` outputs), hidden output units (``down_proj`` outputs) and attention heads, runs each batch twice with a
little dropout and takes ``T * KL(log_softmax(z1) || softmax(z2))`` (``T = 0.1``, batch mean) as the loss; the masks'
gradients summed over the batches and divided by the token count are each unit's importance, normalised per block as
``|tanh((g - mean) / std)|``. Before every optimizer step the gradient row of a unit is scaled by ``1 - importance``,
so the units general text relies on move less.

Llama-family models have no dropout, and two identical passes would give a zero KL gradient: the official code patches
``Dropout(0.003)`` into the attention weights and the MLP output. Here forward hooks add it during the importance pass
only, on the MLP output and on each head's attention output (scaling a head's attention weights, as the official head
mask does, scales its output the same way). An importance map that is still all zero is refused.

Under grouped-query attention a key/value head serves several query heads: its ``k_proj``/``v_proj`` rows are scaled by
``1 -`` the mean importance of those heads (the official code indexes them with the query heads' mask, which only fits
multi-head attention, where the two are the same).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import lightning as L
import torch
from torch.nn import functional as F
from typing_extensions import override

from lightning_ft.core.layer_map import LayerMap
from lightning_ft.core.selection import SelectionCallback
from lightning_ft.core.shards import local, shard_info
from lightning_ft.core.structured import BlockUnits, block_units
from lightning_ft.support import MethodSupport

__all__ = ["CoFiTune"]

Part = Literal["input_projection", "output_projection", "attention"]
PARTS = ("input_projection", "output_projection", "attention")


class CoFiTune(SelectionCallback):
    """Coarse module/depth freeze plus fine gradient soft-masking by unit importance (see the module docstring).

    Args:
        train_kinds: Layer-map kinds that train inside the band (default ``mlp_up``, ``mlp_down``).
        band: ``(low, high]`` fractions of the depth: block ``i`` (0-based) trains when
            ``low * blocks < i + 1 <= high * blocks``.
        softmask: Which importances scale gradients: ``input_projection`` (``up_proj`` rows), ``output_projection``
            (``down_proj`` rows), ``attention`` (``q/k/v_proj`` rows, per head); only trainable tensors are scaled.
        importance_source: ``control``: the DataModule's control text (general text the task does not train on, as
            the paper's general-domain data); ``train``: the training batches.
        importance_batches: Batches the importance pass reads.
        temperature: ``T`` of the KL loss.
        dropout: Dropout probability the importance pass adds (hooks; training is unchanged).
        micro_batch_size: Rows the importance pass runs at once: its two passes keep every activation and the
            vocabulary-wide logits for the mask gradients (whole batches of 8 on SmolLM2 grew one process to 13.7 GB);
            the loss is still each batch's mean KL.
        seed: Seed of the importance pass's dropout (the training run's random state is left as it was).
        module: Dotted attribute path to the transformers model; default: found automatically.
    """

    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "fsdp2", "mixed"}),
        {
            "quantized": "{name} scales gradient rows of the weights themselves, which a quantized {model} keeps "
            "frozen in 4/8 bit: load the backbone unquantized.",
            "lora": "{name} scales gradient rows of the weights themselves, which a LoRA backbone freezes behind its "
            "adapters: drop peft (CoFiTune trains a band of full modules).",
        },
        "The importance pass adds dropout by hooks (Llama has none); under GQA a key/value head takes its query "
        "heads' mean importance; under FSDP2 each process scales its own rows.",
    )

    def __init__(
        self,
        train_kinds: tuple[str, ...] = ("mlp_up", "mlp_down"),
        band: tuple[float, float] = (0.25, 0.5),
        softmask: tuple[Part, ...] = ("input_projection", "output_projection"),
        importance_source: Literal["control", "train"] = "control",
        importance_batches: int = 16,
        temperature: float = 0.1,
        dropout: float = 0.003,
        micro_batch_size: int = 2,
        seed: int = 0,
        module: str | None = None,
    ) -> None:
        super().__init__(module=module, seed=seed)
        low, high = band
        if not 0 <= low < high <= 1:
            raise ValueError(f"band={tuple(band)} must be (low, high] fractions with 0 <= low < high <= 1.")
        unknown = [p for p in softmask if p not in PARTS]
        if unknown:
            raise ValueError(f"softmask names {unknown[0]!r}: use input_projection, output_projection or attention.")
        if importance_source not in ("control", "train"):
            raise ValueError(f"importance_source={importance_source!r} must be 'control' or 'train'.")
        if importance_batches < 1:
            raise ValueError(f"importance_batches={importance_batches} must be a positive integer.")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be a positive integer.")
        if not 0 < dropout < 1:
            raise ValueError(f"dropout={dropout} must be in (0, 1): the importance pass needs two different passes.")
        self.train_kinds, self.band, self.softmask = tuple(train_kinds), (float(low), float(high)), tuple(softmask)
        self.importance_source, self.importance_batches = importance_source, importance_batches
        self.temperature, self.dropout, self.micro_batch_size = temperature, dropout, micro_batch_size
        self.importance: dict[str, torch.Tensor] | None = None  # part -> [blocks, units], normalised
        self._units: list[BlockUnits] = []

    @property
    @override
    def dynamic(self) -> bool:
        return False

    def band_blocks(self, blocks: int) -> list[int]:
        """The blocks that train: ``low * blocks < i + 1 <= high * blocks``."""
        low, high = self.band
        return [i for i in range(blocks) if low * blocks < i + 1 <= high * blocks]

    @override
    def check(self, trainer: L.Trainer, model: torch.nn.Module, layer_map: LayerMap) -> None:
        if not self.band_blocks(layer_map.num_blocks):
            raise ValueError(f"band={self.band} holds no block of this {layer_map.num_blocks}-block model: widen it.")
        self._units = block_units(model, layer_map, model.config)

    @override
    def draw(self, index: int, trainer: L.Trainer, pl_module: L.LightningModule) -> set[str]:
        assert self.selection is not None and self.layer_map is not None
        chosen = {i.name for i in self.layer_map.select(kinds=list(self.train_kinds),
                                                        blocks=self.band_blocks(self.layer_map.num_blocks))}  # fmt: skip
        active = chosen & set(self.selection.candidates)
        if not active:
            raise ValueError(f"CoFiTune's train_kinds={list(self.train_kinds)} match no trainable parameter in the "
                             f"band's blocks {self.band_blocks(self.layer_map.num_blocks)}: name layer-map kinds such "
                             "as mlp_up, mlp_down, attn_q.")  # fmt: skip
        return active

    # ------------------------------------------------------------------ the importance pass
    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.importance is None:  # restored from a checkpoint: the same map
            self.importance = self.compute_importance(trainer, self._batches(trainer))

    def _batches(self, trainer: L.Trainer) -> list[Any]:
        from lightning_ft.callbacks.layerwise_outliers import source_batches

        return source_batches(trainer, self.importance_source, self.importance_batches, "importance_source", "CoFiTune")

    def compute_importance(self, trainer: L.Trainer | None, batches: list[Any]) -> dict[str, torch.Tensor]:
        """The normalised importance of every unit (``part -> [blocks, units]``) from ``batches``."""
        assert self.selection is not None
        model, units = self.selection.model, self._units
        device = next(model.parameters()).device
        heads = units[0].group_rows // units[0].kv_rows * units[0].groups
        masks = {
            "input_projection": torch.ones(len(units), units[0].channels, device=device, requires_grad=True),
            "output_projection": torch.ones(len(units), units[0].down.out_features, device=device, requires_grad=True),
            "attention": torch.ones(len(units), heads, device=device, requires_grad=True),
        }
        sums = {part: torch.zeros(mask.shape, dtype=torch.float64) for part, mask in masks.items()}
        tokens, differed = 0.0, False
        handles = self._mask_hooks(masks)
        was_training = model.training
        model.train()  # the official pass runs in train mode
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(self.seed)
                for batch in batches:
                    ids, attention = batch["input_ids"], batch.get("attention_mask")
                    for start in range(0, ids.shape[0], self.micro_batch_size):  # the batch mean, a few rows at a time
                        rows = slice(start, start + self.micro_batch_size)
                        inputs = {"input_ids": ids[rows], "attention_mask": None if attention is None else attention[rows]}
                        first, second = model(**inputs).logits.float(), model(**inputs).logits.float()
                        differed |= not torch.equal(first, second)
                        loss = F.kl_div(F.log_softmax(first, -1), F.softmax(second, -1), reduction="sum") / ids.shape[0]
                        grads = torch.autograd.grad(loss * self.temperature, [masks[p] for p in PARTS])
                        for part, grad in zip(PARTS, grads):
                            sums[part] += grad.detach().double().cpu()
                        del first, second, loss
                    mask = attention
                    tokens += float(mask.sum()) if mask is not None else float(batch["input_ids"].numel())
        finally:
            model.train(was_training)
            for handle in handles:
                handle.remove()
        if not differed:  # the KL gradient of two equal passes is zero up to rounding: a map of noise
            raise ValueError(f"CoFiTune's importance pass ran every batch twice with the same result, so its importance "
                             f"would be rounding noise: raise dropout={self.dropout}.")  # fmt: skip
        flat = torch.cat([sums[p].reshape(-1) for p in PARTS] + [torch.tensor([tokens], dtype=torch.float64)])
        if trainer is not None and trainer.world_size > 1:  # every process's batches over all their tokens
            flat = trainer.strategy.reduce(flat, reduce_op="sum")
        out, start, total = {}, 0, float(flat[-1])
        for part in PARTS:
            raw = (flat[start : start + sums[part].numel()] / total).reshape(sums[part].shape).float()
            start += sums[part].numel()
            if not raw.abs().sum():
                raise ValueError(f"CoFiTune's importance pass gave an all-zero {part} map: the two passes were "
                                 "identical (raise dropout) or the batches are empty.")  # fmt: skip
            out[part] = normalise(raw)
        return out

    def _mask_hooks(self, masks: dict[str, torch.Tensor]) -> list[Any]:
        p = self.dropout
        handles = []
        for b, u in enumerate(self._units):
            heads = u.group_rows // u.kv_rows * u.groups

            def attention(module: Any, args: tuple[Any, ...], b: int = b, heads: int = heads) -> tuple[Any, ...]:
                x = args[0]
                shaped = x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads) * masks["attention"][b, :, None]
                return (F.dropout(shaped, p, training=True).reshape(x.shape), *args[1:])

            handles += [
                u.up.register_forward_hook(lambda m, a, o, b=b: o * masks["input_projection"][b]),
                u.down.register_forward_hook(
                    lambda m, a, o, b=b: F.dropout(o * masks["output_projection"][b], p, training=True)
                ),
                u.o.register_forward_pre_hook(attention),
            ]
        return handles

    # ------------------------------------------------------------------ the soft mask
    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if self.importance is None:
            return
        for b, u in enumerate(self._units):
            for weight, scale in self._row_scales(b, u):
                if weight.grad is not None:
                    grad = local(weight.grad)
                    start, rows = shard_info(weight.grad) or (0, grad.shape[0])
                    grad.mul_(scale[start : start + rows].to(grad.device, grad.dtype)[:, None])

    def _row_scales(self, b: int, u: BlockUnits) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(weight, 1 - importance per row)`` of block ``b``'s soft-masked weights."""
        assert self.importance is not None
        out = []
        if "input_projection" in self.softmask:
            out.append((u.up.weight, 1 - self.importance["input_projection"][b]))
        if "output_projection" in self.softmask:
            out.append((u.down.weight, 1 - self.importance["output_projection"][b]))
        if "attention" in self.softmask:
            per_head = self.importance["attention"][b]
            group_mean = per_head.reshape(u.groups, -1).mean(1)
            out.append((u.q.weight, 1 - per_head.repeat_interleave(u.kv_rows)))
            for layer in (u.k, u.v):
                out.append((layer.weight, 1 - group_mean.repeat_interleave(u.kv_rows)))
        return out

    # ------------------------------------------------------------------ state
    @override
    def extra_state(self) -> dict[str, Any]:
        return {"importance": self.importance}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("importance") is not None:
            self.importance = dict(state["importance"])


def normalise(raw: torch.Tensor) -> torch.Tensor:
    """CoFiTune's per-block normalisation ``|tanh((g - mean) / std)|`` of a ``[blocks, units]`` importance."""
    mean, std = raw.mean(dim=1, keepdim=True), raw.std(dim=1, keepdim=True)
    return torch.tanh((raw - mean) / std).abs()
