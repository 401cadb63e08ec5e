r"""
Concept-aware multi-token heads (CAFT)
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

CAFT (Chen, Zhang, Huang, Tao, "Concept-Aware Fine-Tuning", arXiv 2506.07833): ``n - 1`` auxiliary heads, each a
decoder layer of the backbone's own family that shares the unembedding, predict the tokens ``t+2 .. t+n``. The
heads are pre-trained once on general text with the trunk frozen; task fine-tuning then adds their
cross-entropies with small, decaying weights so that the trunk learns multi-token "concepts". The heads are
discarded at inference: the exported model is the plain backbone.

Three defects of the official code are not reproduced: the heads read the same input in both stages (the
residual stream entering the last decoder layer), a decoder layer's output is taken correctly whether it is a
tensor or a tuple, and the heads always attend through an explicit causal mask.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from torch import nn
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_ft.core.anatomy import DecoderParts, decoder_parts, plain_state
from lightning_ft.core.host import MixinBase, ModuleHost, require_host
from lightning_ft.core.shards import gathered_state, is_sharded
from lightning_ft.data.collate import IGNORE_INDEX
from lightning_ft.errors import UserError
from lightning_ft.modules.backbone import export_path
from lightning_ft.objectives._common import check_fit_support, log_train, training_progress
from lightning_ft.objectives.heads_settings import CAFTSettings, HeadSchedule, Stage, heads_schedule
from lightning_ft.objectives.unembedding import Unembedding, chunked_unembedding_ce
from lightning_ft.support import MethodSupport, used_features

# CAFTSettings, HeadSchedule, heads_schedule and chunked_unembedding_ce lived here first and are imported from here
__all__ = ["CAFTSettings", "HeadSchedule", "MultiTokenHeadsMixin", "chunked_unembedding_ce", "heads_schedule"]

_CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


_HEADS_REFUSAL = (
    "MultiTokenHeadsMixin cannot copy the quantized layer weight {name!r} into a head: pre-train the heads on the "
    "unquantized model (stage: heads) and pass their file as heads_path."
)


def _new_layer(template: nn.Module, config: Any, index: int) -> nn.Module:
    try:
        return type(template)(config, layer_idx=index)
    except TypeError:
        return type(template)(config)


class MultiTokenHeadsMixin(MixinBase):
    """CAFT: auxiliary heads predicting tokens ``t+2 .. t+n`` whose losses shape the trunk during fine-tuning.

    Mix into :class:`~lightning_ft.modules.CausalLMModule` (``class M(MultiTokenHeadsMixin, CausalLMModule)``,
    ready made as :class:`~lightning_ft.objectives.CAFTCausalLM`). Head ``k`` (``1..num_heads``) is
    ``layers_per_head`` decoder layers of the backbone's family, initialised as copies of decoder layer
    ``init_layer``; it reads the residual stream entering the last decoder layer (with that layer's causal
    mask and position embeddings) and its output goes through the final norm (``final_norm``) and the shared
    LM head. At position ``t`` head ``k`` predicts ``labels[t + 1 + k]`` (the main head, ``k = 0``,
    predicts ``labels[t + 1]``).

    Two stages, each a plain ``fit``:

    * ``stage="heads"``: head pre-training on general text. The backbone is frozen, the heads train,
      and the loss is ``sum_k decay^k CE_k``.
    * ``stage="finetune"``: task fine-tuning with ``L = CE_0 + sum_k CE_k * decay^k * heads_coefficient *
      s(t)``, ``s`` = ``heads_schedule``; heads frozen unless ``train_heads``. Load the heads of the first
      stage with ``heads_path``.

    The auxiliary cross-entropies are computed only at positions that carry a target, ``ce_chunk_size``
    rows at a time with recomputation in backward, so no head's full-vocabulary logits are ever held.
    ``train/head_<k>_loss`` is logged each step and, for language-modelling validation batches (free-form
    targets, control text), ``val/head_<k>_loss``. At the end of
    ``fit`` the heads are written to ``heads_output`` (a safetensors file beside, never inside, the
    exported HF folder); they are also part of Lightning checkpoints (except frozen heads of peft runs,
    which are rebuilt from ``heads_path``). Paper: https://arxiv.org/abs/2506.07833

    Args:
        num_heads: Auxiliary heads (``n - 1``; the paper uses 4, predicting ``t+2 .. t+5``).
        layers_per_head: Decoder layers per head (paper: 1).
        stage: ``heads`` (pre-train the heads, trunk frozen) or ``finetune`` (CAFT loss on the task).
        heads_path: Safetensors file written by a ``stage: heads`` run (``<run>/aux_heads.safetensors``);
            ``None`` starts from copies of ``init_layer``.
        train_heads: Whether the heads train; default: in ``stage="heads"`` only (frozen heads are not given
            to the optimizer).
        init_layer: Decoder layer the heads are copied from (paper: ``-2``, the second to last).
        decay: ``gamma``, the per-head decay of the auxiliary weights (paper: 0.8).
        heads_coefficient: ``alpha``, the auxiliary weight in fine-tuning (paper: 0.01); 0 gives the plain loss.
        heads_schedule: ``s(t)``: ``rsine`` (paper default, 1 -> 0), ``sine`` (0 -> 1 by ``schedule_ratio``),
            ``linear`` (0 -> 1) or ``constant``.
        schedule_ratio: Fraction of training over which ``sine`` rises to 1.
        final_norm: Pass the head outputs through the backbone's final norm before the LM head, as the
            last layer's output is (the heads run parallel to it); the official code skips the norm.
        ce_chunk_size: Rows per chunk of the auxiliary cross-entropies.
        heads_output: Where ``on_fit_end`` writes the heads; default ``<default_root_dir>/aux_heads.safetensors``;
            ``""`` disables.
        **kwargs: Arguments of the LightningModule it is mixed into (``model``, ``peft``, ``learning_rate``...).
    """

    backbone: nn.Module
    aux_heads: nn.ModuleList
    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "fsdp2", "lora", "mixed"}),
        {
            "quantized": "{name} copies a decoder layer of the backbone into each auxiliary head, which a quantized "
            "backbone's 4/8-bit weights cannot seed: set quantization to null (LoRA alone works).",
        },
        "The heads are copies of a decoder layer, so the backbone must be unquantized (refused when built).",
    )

    def __init__(
        self,
        *,
        num_heads: int = 4,
        layers_per_head: int = 1,
        stage: Stage = "finetune",
        heads_path: str | None = None,
        train_heads: bool | None = None,
        init_layer: int = -2,
        decay: float = 0.8,
        heads_coefficient: float = 0.01,
        heads_schedule: HeadSchedule = "rsine",
        schedule_ratio: float = 1.0,
        final_norm: bool = True,
        ce_chunk_size: int = 1024,
        heads_output: str | None = None,
        **kwargs: Any,
    ) -> None:
        if stage == "heads" and kwargs.get("peft"):
            raise ValueError(
                "stage='heads' freezes the whole backbone, so peft would train nothing: set peft to null for this stage."
            )
        settings = CAFTSettings(
            num_heads=num_heads, layers_per_head=layers_per_head, stage=stage, heads_path=heads_path,
            train_heads=train_heads, init_layer=init_layer, decay=decay,
            heads_coefficient=heads_coefficient, heads_schedule=heads_schedule, schedule_ratio=schedule_ratio,
            final_norm=final_norm, ce_chunk_size=ce_chunk_size, heads_output=heads_output,
        )  # fmt: skip
        super().__init__(**kwargs)
        require_host(self, MultiTokenHeadsMixin, ("backbone", "compute_loss", "eval_update", "_log_eval", "evaluate"))
        if "quantized" in used_features(None, self.backbone):  # before the heads are copied from its layers
            raise UserError(str(MultiTokenHeadsMixin.support.refusal("quantized", type(self).__name__, "", "")))
        self.caft_settings = settings
        parts = self._decoder()
        layers, config = parts.layers, parts.config
        if not -len(layers) <= init_layer < len(layers):
            raise ValueError(f"init_layer={init_layer} is outside the backbone's {len(layers)} decoder layers.")
        self.aux_heads = self._build_heads(layers, config, init_layer)
        if heads_path:
            self.load_heads(heads_path)
        if stage == "heads":
            for param in self.backbone.parameters():
                param.requires_grad_(False)
        self.aux_heads.requires_grad_(settings.trains_heads)
        self.head_metrics = nn.ModuleList(MeanMetric() for _ in range(num_heads))

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            check_fit_support(self, self.trainer, self.backbone)

    # ------------------------------------------------------------------ heads
    def sharded_modules(self) -> list[nn.Module]:
        """Under FSDP2 each auxiliary head's layer is its own group (called outside the backbone's forward); the final norm
        and LM head it reuses stay gathered in the backbone's root group from its forward to its backward."""
        return [layer for head in self.aux_heads for layer in head]

    def _decoder(self) -> DecoderParts:
        return decoder_parts(self.backbone, "MultiTokenHeadsMixin")

    def _build_heads(self, layers: nn.ModuleList, config: Any, init_layer: int) -> nn.ModuleList:
        template = layers[init_layer]
        state = plain_state(template, _HEADS_REFUSAL)
        dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
        heads = nn.ModuleList()
        with torch.random.fork_rng(devices=[]):  # building the layers must not shift the user's seed stream
            per_head = self.caft_settings.layers_per_head
            for k in range(self.caft_settings.num_heads):
                head = nn.ModuleList()
                for j in range(per_head):
                    layer = _new_layer(template, config, len(layers) + k * per_head + j)
                    layer.load_state_dict(state, strict=True)
                    head.append(layer.to(dtype))
                heads.append(head)
        return heads

    def save_heads(self, path: str | Path) -> Path:
        """Write the heads (and their shape) to a safetensors file that ``heads_path`` loads.

        Written through :func:`lightning_ft.core.io.atomic_file` after checking that every value is finite: heads
        that diverged (NaN/inf) are refused in one sentence and a previous file stays whole.
        """
        from safetensors.torch import save_file

        from lightning_ft.core.io import atomic_file, check_finite

        tensors = {k: v.detach().cpu().contiguous() for k, v in gathered_state(self.aux_heads).items()}
        check_finite(tensors, f"the auxiliary heads file {path}")
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={"caft": json.dumps(self._heads_signature())})
        return Path(path)

    def load_heads(self, path: str | Path) -> None:
        """Load heads written by :meth:`save_heads`; a file of another shape fails with one sentence."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        if not Path(path).is_file():
            raise ValueError(
                f"heads_path={str(path)!r} is not a file: run the head pre-training stage first "
                "(configs/caft_heads.yaml writes <run>/aux_heads.safetensors) or fix the path."
            )
        with safe_open(str(path), framework="pt") as f:
            found = json.loads((f.metadata() or {}).get("caft", "{}"))
        expected = self._heads_signature()
        if found != expected:
            raise ValueError(
                f"heads_path={str(path)!r} holds heads {found or 'of unknown shape'}, but this model needs {expected}: "
                "set num_heads/layers_per_head to match the file or pre-train heads for this backbone."
            )
        self.aux_heads.load_state_dict(load_file(str(path)), strict=True)

    def _heads_signature(self) -> dict[str, Any]:
        config = self._decoder().config
        return {"num_heads": self.caft_settings.num_heads, "layers_per_head": self.caft_settings.layers_per_head,
                "layer": type(self.aux_heads[0][0]).__name__, "hidden_size": int(config.hidden_size)}  # fmt: skip

    def heads_output_path(self) -> Path | None:
        """Where ``on_fit_end`` writes the heads, or ``None`` when disabled."""
        return export_path(self.caft_settings.heads_output, self._trainer, "aux_heads.safetensors")

    # ------------------------------------------------------------------ forward
    @contextmanager
    def _capture_last_layer_input(self) -> Iterator[dict[str, Any]]:
        """Record the arguments of the last decoder layer's call while the context is open."""
        layers = self._decoder().layers
        store: dict[str, Any] = {}

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            store["bound"] = inspect.signature(module.forward).bind(*args, **kwargs)

        handle = layers[-1].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield store
        finally:
            handle.remove()

    def _head_inputs(self, store: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The hidden states and the other arguments the heads are called with (no cache, explicit mask)."""
        from transformers.cache_utils import Cache

        bound = store["bound"]
        names = list(bound.signature.parameters)
        arguments = dict(bound.arguments)
        hidden = arguments.pop(names[0])
        for name, param in bound.signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}))
        rest = {k: (None if isinstance(v, Cache) or k in _CACHE_ARGS else v) for k, v in arguments.items()}
        if "use_cache" in rest:
            rest["use_cache"] = False
        impl = getattr(self._decoder().config, "_attn_implementation", "sdpa")
        if "attention_mask" in names and rest.get("attention_mask") is None and impl in ("sdpa", "eager"):
            # The trunk may leave causality implicit (SDPA's is_causal); the heads always get it explicitly.
            length = hidden.shape[1]
            mask = torch.full((length, length), torch.finfo(hidden.dtype).min, dtype=hidden.dtype, device=hidden.device)
            rest["attention_mask"] = mask.triu(1)[None, None].expand(hidden.shape[0], 1, length, length)
        return hidden, rest

    def head_hidden_states(self, store: dict[str, Any]) -> list[torch.Tensor]:
        """The output of each head ``[B, T, H]`` (before the final norm) from a captured trunk forward."""
        hidden, rest = self._head_inputs(store)
        outputs = []
        for head in self.aux_heads:
            out = hidden
            for layer in head:
                result = layer(out, **rest)
                out = result[0] if isinstance(result, tuple) else result  # tuple in older transformers
            outputs.append(out)
        return outputs

    def head_ce_sums(self, store: dict[str, Any], labels: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """``(summed CE, target count)`` per auxiliary head; head ``k`` at ``t`` predicts ``labels[t + 1 + k]``."""
        parts = self._decoder()
        unembed = Unembedding(parts.final_norm if self.caft_settings.final_norm else None, parts.head)
        sums = []
        for k, out in enumerate(self.head_hidden_states(store), start=1):
            targets = labels[:, 1 + k :]
            keep = targets != IGNORE_INDEX
            rows = out[:, : targets.shape[1]][keep]
            ce = chunked_unembedding_ce(rows, targets[keep], unembed, self.caft_settings.ce_chunk_size)
            sums.append((ce, int(keep.sum())))
        return sums

    def head_weights(self) -> list[float]:
        """The current weight of each auxiliary CE (``decay^k`` in stage heads, ``decay^k alpha s(t)`` after)."""
        cfg = self.caft_settings
        gammas = [cfg.decay**k for k in range(1, cfg.num_heads + 1)]
        if cfg.stage == "heads":
            return gammas
        step, total = training_progress(self)
        scale = cfg.heads_coefficient * heads_schedule(cfg.heads_schedule, step, total, cfg.schedule_ratio)
        return [g * scale for g in gammas]

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Main CE plus the weighted auxiliary CEs (stage ``finetune``), or the auxiliary CEs alone (``heads``)."""
        with self._capture_last_layer_input() as store:
            if self.caft_settings.stage == "heads":
                with torch.no_grad():
                    self._trunk_forward(batch)
                main = None
            else:
                main = cast(ModuleHost, super()).compute_loss(batch)
        weights = self.head_weights()
        aux_needed = any(w > 0 for w in weights)
        with torch.set_grad_enabled(torch.is_grad_enabled() and aux_needed):
            ces = [s / max(n, 1) for s, n in self.head_ce_sums(store, batch["labels"])]
        size = batch["input_ids"].shape[0]
        for k, ce in enumerate(ces, start=1):
            log_train(self, f"train/head_{k}_loss", ce.detach(), size)
        if main is not None:
            log_train(self, "train/main_loss", main.detach(), size)
            log_train(self, "train/heads_weight", weights[0] / self.caft_settings.decay, size)
            if not aux_needed:
                return main  # weight 0: exactly the plain loss
        aux = sum(w * ce for w, ce in zip(weights, ces))
        return aux if main is None else main + aux

    def _trunk_forward(self, batch: dict[str, Any]) -> None:
        extra = {"logits_to_keep": 1} if getattr(self, "_keeps_logits", False) else {}
        self(batch["input_ids"], batch.get("attention_mask"), **extra)

    # ------------------------------------------------------------------ evaluation
    def eval_update(self, batch: dict[str, Any]) -> None:
        """The module's metrics, plus per-head CE on language-modelling batches (not on option scoring)."""
        if "labels" not in batch or "label_index" in batch:
            cast(ModuleHost, super()).eval_update(batch)
            return
        with self._capture_last_layer_input() as store:
            cast(ModuleHost, super()).eval_update(batch)
        if "bound" not in store:
            return
        with torch.no_grad():
            for k, (total, count) in enumerate(self.head_ce_sums(store, batch["labels"]), start=1):
                if count:
                    self.head_metrics[k - 1].update(total / count, weight=count)

    def _head_metrics_and_reset(self) -> dict[str, float]:
        out = {}
        for k, metric in enumerate(self.head_metrics, start=1):
            if getattr(metric, "_update_count", 0):
                out[f"head_{k}_loss"] = float(metric.compute())
            metric.reset()
        return out

    def _log_eval(self, prefix: str) -> None:
        cast(ModuleHost, super())._log_eval(prefix)
        for key, value in self._head_metrics_and_reset().items():
            self.log(f"{prefix}/{key}", value)

    @torch.no_grad()
    def evaluate(self, dataloaders: list[Any]) -> dict[str, float]:
        """The module's evaluation outside the Trainer, plus ``head_<k>_loss`` on language-modelling batches."""
        self._head_metrics_and_reset()
        out = cast(ModuleHost, super()).evaluate(dataloaders)
        return {**out, **self._head_metrics_and_reset()}

    # ------------------------------------------------------------------ saving
    @override
    def on_fit_end(self) -> None:
        """Export the backbone (without heads) as the module does, then write the heads file beside it."""
        super().on_fit_end()
        path = self.heads_output_path()
        trainer = self.trainer
        if path is not None and trainer.is_global_zero:
            self.save_heads(path)
        elif path is not None and any(is_sharded(head) for head in self.aux_heads):
            gathered_state(self.aux_heads)  # the other processes' part of the all-gathers rank 0's save makes
        trainer.strategy.barrier("lightning_ft.save_heads")
