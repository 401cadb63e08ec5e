r"""
LoFiT: localized fine-tuning of attention heads
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

LoFiT (Yin, Ye, Durrett, "LoFiT: Localized Fine-tuning on LLM Representations", NeurIPS 2024, arXiv 2406.01563)
freezes the whole model and edits the output ``o_{l,h}`` of a few attention heads before the attention output
projection, in two runs:

1. ``stage="heads"`` (head selection): every head gets a scale vector ``A_{l,h}`` in ``R^{d_head}`` and
   ``o_{l,h} <- (1 + A_{l,h}) * o_{l,h}``; only the scales train, with ``L = L_task + lambda * sum |A|``. The heads are
   ranked by ``||A_{l,h}||_2`` and the ranking is written to a heads file.
2. ``stage="bias"`` (bias tuning): fresh offsets ``v_{l,h}`` on the top ``K`` heads only,
   ``o_{l,h} <- o_{l,h} + v_{l,h}`` (optionally with scales again); only they train, and only they are kept.

Both are one forward pre-hook on each attention output projection (``o_proj``, GPT-2's ``c_proj``...), found by the
shared layer map, so any HF decoder works. The exported ``hf_model/`` applies the vectors exactly:
``o_proj((1 + a) * o + v) = W diag(1 + a) o + W v + b`` folds the scales into the projection's input columns and the
offsets into its bias. Where the architecture has no such bias but a config flag adds one (Llama's
``attention_bias``, which also adds q/k/v biases, saved as zeros), ``hf_model/`` is a plain model that
``AutoModelForCausalLM.from_pretrained`` loads; where it cannot (Qwen2, Mistral), the biases are written beside the
weights (``lofit_offsets.safetensors``) and :func:`load_lofit_model` loads both.

Defaults follow the official code (fc2869/lo-fit ``lofit_trainer.py``, ``train_script_truthfulqa.sh``) and the paper:
every vector starts from ``N(0, 1e-3)``; ``lambda = 5e-4`` in stage 1 and ``0`` in stage 2; ``K`` is 3% of the heads.
The official stage 1 writes its top 160 heads and stage 2 takes the first ``K``; here the file holds the full ranking,
so stage 2 may take any ``K``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

import torch
from torch import nn
from typing_extensions import override

from lightning_ft.core.host import MixinBase, ModuleHost, require_host
from lightning_ft.core.layer_map import LayerMap, ParamKind
from lightning_ft.errors import UserError
from lightning_ft.modules.backbone import export_path
from lightning_ft.modules.causal_lm import CausalLMModule
from lightning_ft.objectives._common import check_fit_support, log_train
from lightning_ft.support import MethodSupport, sharded_refusal, used_features

__all__ = [
    "OFFSETS_FILE", "AttentionOutput", "HeadVectors", "LoFiTCausalLM", "LoFiTMixin", "attention_outputs",
    "load_lofit_model", "load_lofit_offsets", "rank_heads", "save_folded", "top_k_count",
]  # fmt: skip

Stage = Literal["heads", "bias"]
OFFSETS_FILE = "lofit_offsets.safetensors"  # the o_proj biases of an architecture whose config cannot add them
_BIAS_FLAGS = ("attention_bias",)  # config flags that give the attention output projection a bias


@dataclass(frozen=True)
class AttentionOutput:
    """One attention output projection: its block, module name and the heads its input concatenates."""

    layer: int
    name: str
    module: nn.Module
    num_heads: int
    head_dim: int


def _in_features(module: nn.Module) -> int:
    weight = cast(torch.Tensor, module.weight)
    if type(module).__name__ == "Conv1D":  # GPT-2: weight (in, out)
        return int(weight.shape[0])
    return int(getattr(module, "in_features", 0) or weight.shape[1])


def attention_outputs(backbone: nn.Module) -> list[AttentionOutput]:
    """The attention output projections of a decoder, by block (the layer map's ``attn_o`` weights).

    Raises:
        ValueError: The model has none, or their input is not ``num_attention_heads`` equal heads.
    """
    config = getattr(backbone, "config", None)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    found = []
    for info in LayerMap.from_model(backbone):
        if info.kind is ParamKind.ATTN_O and info.block is not None and info.name.endswith(".weight"):
            name = info.name.removesuffix(".weight")
            module = backbone.get_submodule(name)
            width = _in_features(module)
            if heads < 1 or width % heads:
                raise ValueError(
                    f"LoFiTMixin splits the input of {name} ({width} features) into num_attention_heads={heads} heads, "
                    "which does not divide it: use a decoder whose attention output projection reads concatenated heads."
                )
            found.append(AttentionOutput(info.block, name, module, heads, width // heads))
    if not found:
        raise ValueError(
            f"LoFiTMixin edits the attention output projections (o_proj, c_proj, out_proj) of a decoder, which "
            f"{type(backbone).__name__} does not expose: use a Llama/Mistral/Qwen2/GPT-2-style AutoModelForCausalLM."
        )
    return sorted(found, key=lambda out: out.layer)


def rank_heads(norms: torch.Tensor) -> list[tuple[int, int]]:
    """Every ``(layer row, head)`` of ``norms`` ``[L, H]`` by decreasing norm; ties keep ``(layer, head)`` order."""
    order = torch.sort(norms.flatten().float(), descending=True, stable=True).indices
    heads = norms.shape[1]
    return [(int(i) // heads, int(i) % heads) for i in order]


def top_k_count(total: int, top_k: int | None, top_k_ratio: float) -> int:
    """``K``: ``top_k`` if given, else ``round(top_k_ratio * total)`` (at least 1)."""
    k = top_k if top_k is not None else max(1, round(top_k_ratio * total))
    if not 1 <= k <= total:
        raise ValueError(f"top_k={k} must be between 1 and the model's {total} attention heads.")
    return k


class HeadVectors(nn.Module):
    """LoFiT's vectors on some heads of one attention output: ``x_h <- (1 + scale_h) * x_h + bias_h`` for the heads
    in ``index``, as a compact ``[k, d_head]`` parameter each (the other heads pass through unchanged).

    Args:
        heads: The head indices (``k`` of them, sorted).
        num_heads: Heads concatenated in the projection's input.
        head_dim: Features per head.
        scales: Whether the heads get scale vectors.
        biases: Whether the heads get offset vectors.
        init_std: Standard deviation of their normal initialisation (0: zeros).
    """

    def __init__(
        self, heads: Sequence[int], num_heads: int, head_dim: int, *, scales: bool, biases: bool, init_std: float
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.register_buffer("index", torch.tensor(sorted(heads), dtype=torch.long))
        for name, wanted in (("scale", scales), ("bias", biases)):
            value = torch.randn(len(heads), head_dim) * init_std if wanted else None
            self.register_parameter(name, nn.Parameter(value) if value is not None else None)

    def full(self, which: Literal["scale", "bias"]) -> torch.Tensor | None:
        """The vector over the whole input (zeros outside the selected heads), or ``None``."""
        param = cast(torch.Tensor | None, getattr(self, which))
        if param is None:
            return None
        index = cast(torch.Tensor, self.index).to(param.device)
        full = param.new_zeros(self.num_heads, self.head_dim).index_copy(0, index, param)
        return full.reshape(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the vectors to the projection's input ``x [..., num_heads * head_dim]`` (computed in fp32)."""
        y = x.float()
        scale, bias = self.full("scale"), self.full("bias")
        if scale is not None:
            y = y * (1 + scale.float())
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """The forward pre-hook on the attention output projection."""
        return (self(args[0]), *args[1:])


# ---------------------------------------------------------------------------------------------- export
def _bias_flag(model: nn.Module, outputs: list[AttentionOutput]) -> str | None:
    """The config flag that gives ``outputs`` a bias in this architecture (checked on a meta-device copy)."""
    config: Any = getattr(model, "config", None)
    for flag in _BIAS_FLAGS:
        if getattr(config, flag, None) is not False:
            continue
        changed = type(config).from_dict({**config.to_dict(), flag: True})
        with torch.device("meta"):
            probe = type(model)(changed)
        if all(getattr(probe.get_submodule(out.name), "bias", None) is not None for out in outputs):
            return flag
    return None


@contextmanager
def _config_value(config: Any, name: str, value: Any) -> Iterator[None]:
    before = getattr(config, name)
    setattr(config, name, value)
    try:
        yield
    finally:
        setattr(config, name, before)


def folded_tensors(
    outputs: list[AttentionOutput], vectors: nn.ModuleDict
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(replaced, new biases)``: each edited projection's weight with the scales folded in (and its existing bias
    with ``W v`` added), and ``W v`` for those without a bias, by state-dict key; computed in float64."""
    replaced: dict[str, torch.Tensor] = {}
    new: dict[str, torch.Tensor] = {}
    for out in outputs:
        vec = cast(HeadVectors | None, vectors[str(out.layer)] if str(out.layer) in vectors else None)  # noqa: SIM401 (no ModuleDict.get)
        if vec is None:
            continue
        weight = cast(torch.Tensor, out.module.weight).detach()
        w = weight.double()
        conv = type(out.module).__name__ == "Conv1D"  # y = x @ W + b, W [in, out]
        scale, bias = vec.full("scale"), vec.full("bias")
        if scale is not None:
            s = 1 + scale.detach().double().to(w.device)
            replaced[f"{out.name}.weight"] = (w * (s[:, None] if conv else s[None, :])).to(weight.dtype)
        if bias is None:
            continue
        v = bias.detach().double().to(w.device)
        shift = v @ w if conv else w @ v
        old = getattr(out.module, "bias", None)
        if old is not None:
            replaced[f"{out.name}.bias"] = (old.detach().double() + shift).to(old.dtype)
        else:
            new[f"{out.name}.bias"] = shift.to(weight.dtype)
    return replaced, new


def save_folded(
    backbone: Any, tokenizer: Any, outputs: list[AttentionOutput], vectors: nn.ModuleDict, path: str | os.PathLike[str]
) -> Path:
    """Write ``backbone`` with LoFiT's vectors folded into its attention output projections (see the module docstring).

    Written atomically; non-finite weights are refused before anything is written. Returns the folder.
    """
    from safetensors.torch import save_file

    from lightning_ft.core.io import atomic_dir, check_finite

    replaced, new = folded_tensors(outputs, vectors)
    state = {**backbone.state_dict(), **replaced}
    flag = _bias_flag(backbone, outputs) if new else None
    if flag is not None:  # zeros for every other bias the flag adds (Llama: q/k/v and the unedited o_proj)
        changed = type(backbone.config).from_dict({**backbone.config.to_dict(), flag: True})
        with torch.device("meta"):
            probe = type(backbone)(changed)
        for key, tensor in probe.state_dict().items():
            if key not in state and key.endswith(".bias"):
                ref = next(iter(new.values()))
                state[key] = new[key] if key in new else torch.zeros(tensor.shape, dtype=ref.dtype, device=ref.device)
    check_finite({**state, **new}, f"the model exported to {path}")
    with atomic_dir(path) as tmp:
        if flag is not None:
            with _config_value(backbone.config, flag, True):
                backbone.save_pretrained(tmp, state_dict=state)
        else:
            backbone.save_pretrained(tmp, state_dict=state)
            if new:
                save_file({k: v.cpu().contiguous() for k, v in new.items()}, str(tmp / OFFSETS_FILE))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


def load_lofit_offsets(model: nn.Module, folder: str | Path) -> nn.Module:
    """Give ``model`` (loaded from ``folder``) the attention-output biases written beside it, if any; returns it."""
    from safetensors.torch import load_file

    file = Path(folder) / OFFSETS_FILE
    if file.is_file():
        for key, bias in load_file(str(file)).items():
            module = model.get_submodule(key.removesuffix(".bias"))
            weight = cast(torch.Tensor, module.weight)
            module.bias = nn.Parameter(bias.to(weight.device, weight.dtype), requires_grad=False)
    return model


def load_lofit_model(folder: str | Path, **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(folder, **kwargs)`` plus the biases of :func:`load_lofit_offsets`."""
    from transformers import AutoModelForCausalLM

    return load_lofit_offsets(AutoModelForCausalLM.from_pretrained(folder, **kwargs), folder)


# ---------------------------------------------------------------------------------------------- the mixin
_SIGNATURE_KEYS = ("layers", "num_heads", "head_dim")


class LoFiTMixin(MixinBase):
    """LoFiT: learn which attention heads matter (``stage="heads"``), then offsets on those heads (``stage="bias"``).

    Mix into :class:`~lightning_ft.modules.CausalLMModule` (ready made as :class:`LoFiTCausalLM`); the backbone is
    frozen and only LoFiT's vectors train (``lofit.<layer>.scale`` / ``lofit.<layer>.bias``, one ``[k_l, d_head]``
    parameter per layer for its ``k_l`` selected heads). Stage 1 writes the heads file at the end of ``fit``: the
    ranking of every head by ``||A||_2``, the norms, the scales and its top ``K``; stage 2 reads it with
    ``heads_path``. Logs ``train/lofit_l1`` (``sum |vectors|``, unweighted). Paper: https://arxiv.org/abs/2406.01563

    Args:
        stage: ``heads`` (scales on every head, L1 penalty, writes the heads file) or ``bias`` (offsets on the top
            ``K`` heads).
        heads_path: The heads file of a ``stage: heads`` run (``<run>/lofit_heads.safetensors``); stage ``bias``
            takes its first ``K`` heads.
        heads: Explicit ``[layer, head]`` pairs for stage ``bias`` instead of ``heads_path``.
        top_k: ``K``, the number of heads kept; default ``top_k_ratio`` of all heads.
        top_k_ratio: ``K`` as a share of all heads when ``top_k`` is not given (paper: 3%).
        l1_lambda: Weight of ``sum |vectors|`` in the loss; default 5e-4 in stage ``heads`` (the official
            Llama-2-7B script) and 0 in stage ``bias``.
        train_scales: Stage ``bias`` also trains scales on the selected heads (the paper keeps only the offsets).
        init_std: Standard deviation of the vectors' normal initialisation (official: 1e-3; 0 gives zeros).
        heads_output: Where stage ``heads`` writes its file; default ``<default_root_dir>/lofit_heads.safetensors``;
            ``""`` disables.
        **kwargs: Arguments of the LightningModule it is mixed into (``model``, ``learning_rate``...).
    """

    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "mixed"}),
        {
            "quantized": "{name} folds its head vectors into each attention output projection's weight, which a "
            "quantized backbone keeps in 4/8 bit: load the backbone unquantized (quantization: null).",
            "lora": "{name} trains only its head vectors on a frozen backbone, so a peft adapter would train something "
            "else: set peft to null.",
            "fsdp2": sharded_refusal("keeps its head vectors beside the blocks and folds them into whole projections"),
        },
        "Trains head vectors on a frozen, unquantized backbone; hf_model/ has them folded into o_proj.",
    )

    def __init__(
        self,
        *,
        stage: Stage = "bias",
        heads_path: str | None = None,
        heads: list[tuple[int, int]] | None = None,
        top_k: int | None = None,
        top_k_ratio: float = 0.03,
        l1_lambda: float | None = None,
        train_scales: bool = False,
        init_std: float = 1e-3,
        heads_output: str | None = None,
        **kwargs: Any,
    ) -> None:
        _check_values(stage, top_k_ratio, l1_lambda, init_std)
        for feature, given in (("quantized", kwargs.get("quantization")), ("lora", kwargs.get("peft"))):
            if given:  # refused before the backbone is loaded
                raise UserError(str(LoFiTMixin.support.refusal(feature, type(self).__name__, "", "")))  # type: ignore[arg-type]
        super().__init__(**kwargs)
        require_host(self, LoFiTMixin, ("backbone", "compute_loss"))
        _check_selection(stage, heads_path, heads)
        backbone = cast(ModuleHost, self).backbone
        for feature in used_features(None, backbone):  # a host that built a quantized or peft backbone itself
            raise UserError(str(LoFiTMixin.support.refusal(feature, type(self).__name__, "", "")))
        self.lofit_stage: Stage = stage
        self.l1_lambda = float(l1_lambda if l1_lambda is not None else (5e-4 if stage == "heads" else 0.0))
        self.top_k, self.top_k_ratio, self.heads_output = top_k, top_k_ratio, heads_output
        self._outputs = attention_outputs(backbone)
        backbone.requires_grad_(False)
        if stage == "heads":
            chosen = {out.layer: list(range(out.num_heads)) for out in self._outputs}
        else:
            pairs = [tuple(p) for p in heads] if heads is not None else self._read_selection(str(heads_path))
            chosen = self._by_layer(pairs, "heads" if heads is not None else f"heads_path={heads_path!r}")
        with torch.random.fork_rng(devices=[]):  # the draws must not shift the user's seed stream
            self.lofit = nn.ModuleDict({
                str(out.layer): HeadVectors(chosen[out.layer], out.num_heads, out.head_dim, scales=stage == "heads"
                                            or train_scales, biases=stage == "bias", init_std=init_std)
                for out in self._outputs if chosen.get(out.layer)
            })  # fmt: skip
        self._handles = [
            out.module.register_forward_pre_hook(cast(HeadVectors, self.lofit[str(out.layer)]).pre_hook)
            for out in self._outputs if str(out.layer) in self.lofit
        ]  # fmt: skip

    # ------------------------------------------------------------------ selection
    def _total_heads(self) -> int:
        return sum(out.num_heads for out in self._outputs)

    def _signature(self) -> dict[str, Any]:
        first = self._outputs[0]
        return {"layers": [out.layer for out in self._outputs], "num_heads": first.num_heads,
                "head_dim": first.head_dim}  # fmt: skip

    def _by_layer(self, pairs: list[tuple[int, ...]], source: str) -> dict[int, list[int]]:
        layers = {out.layer: out.num_heads for out in self._outputs}
        chosen: dict[int, list[int]] = {}
        for pair in pairs:
            if len(pair) != 2 or pair[0] not in layers or not 0 <= pair[1] < layers[pair[0]]:
                raise ValueError(
                    f"{source} names head {list(pair)}, which this model does not have (layers {min(layers)}.."
                    f"{max(layers)}, heads 0..{layers[min(layers)] - 1}): give [layer, head] pairs of this model."
                )
            chosen.setdefault(int(pair[0]), []).append(int(pair[1]))
        if not chosen or any(len(set(v)) != len(v) for v in chosen.values()):
            raise ValueError(f"{source} must name at least one head, each once: give distinct [layer, head] pairs.")
        return chosen

    def _read_selection(self, path: str) -> list[tuple[int, ...]]:
        """The first ``K`` heads of the ranking in a stage-1 heads file."""
        from safetensors import safe_open

        if not Path(path).is_file():
            raise UserError(
                f"heads_path={path!r} is not a file: run the head-selection stage first (configs/lofit_heads.yaml "
                "writes <run>/lofit_heads.safetensors) or fix the path."
            )
        with safe_open(path, framework="pt") as f:
            found = json.loads((f.metadata() or {}).get("lofit", "{}"))
            ranking = f.get_tensor("ranking") if "ranking" in f.keys() else None  # noqa: SIM118
        expected = self._signature()
        if ranking is None or {k: found.get(k) for k in _SIGNATURE_KEYS} != expected:
            shape = {k: found.get(k) for k in _SIGNATURE_KEYS} if found else "of unknown shape"
            raise UserError(
                f"heads_path={path!r} ranks the heads of a model {shape}, but this backbone has {expected}: run the "
                "head-selection stage (configs/lofit_heads.yaml) on this model and pass its file."
            )
        k = top_k_count(self._total_heads(), self.top_k, self.top_k_ratio)
        return [tuple(int(x) for x in row) for row in ranking[:k].tolist()]

    def head_norms(self) -> torch.Tensor:
        """``||A_{l,h}||_2`` per ``[layer row, head]`` (rows in block order; 0 for a head without a scale)."""
        rows = []
        for out in self._outputs:
            key = str(out.layer)
            vec = cast(HeadVectors | None, self.lofit[key] if key in self.lofit else None)  # noqa: SIM401 (no ModuleDict.get)
            scale = vec.full("scale") if vec is not None else None
            row = torch.zeros(out.num_heads) if scale is None else scale.detach().float().cpu().view(out.num_heads, -1)
            rows.append(row if row.ndim == 1 else row.norm(dim=1))
        return torch.stack(rows)

    def ranked_heads(self) -> list[tuple[int, int]]:
        """Every ``(layer, head)`` by decreasing scale norm (ties: lower layer, then lower head, first)."""
        return [(self._outputs[row].layer, head) for row, head in rank_heads(self.head_norms())]

    def save_heads(self, path: str | Path) -> Path:
        """Write the heads file that ``heads_path`` reads: ``ranking`` ``[L*H, 2]``, ``norms`` ``[L, H]``, each layer's
        scales ``scales.<layer>`` ``[H, d_head]``, and the signature and top ``K`` as metadata (atomically)."""
        from safetensors.torch import save_file

        from lightning_ft.core.io import atomic_file, check_finite

        ranking = self.ranked_heads()
        k = top_k_count(self._total_heads(), self.top_k, self.top_k_ratio)
        tensors = {"ranking": torch.tensor(ranking, dtype=torch.long), "norms": self.head_norms()}
        for key, vec in self.lofit.items():
            scale = cast(HeadVectors, vec).full("scale")
            if scale is not None:
                tensors[f"scales.{key}"] = scale.detach().float().cpu().view(cast(HeadVectors, vec).num_heads, -1)
        check_finite(tensors, f"the LoFiT heads file {path}")
        meta = {**self._signature(), "top_k": k, "selected": [list(p) for p in ranking[:k]]}
        with atomic_file(path) as tmp:
            save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp), metadata={"lofit": json.dumps(meta)})
        return Path(path)

    # ------------------------------------------------------------------ training
    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            check_fit_support(self, self.trainer, cast(ModuleHost, self).backbone)

    def l1_term(self) -> torch.Tensor:
        """``sum |v|`` over LoFiT's trainable vectors (the official code's L1 over the trainable parameters)."""
        params = [p for p in self.lofit.parameters() if p.requires_grad]
        return torch.stack([p.abs().sum() for p in params]).sum() if params else torch.zeros(())

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The module's loss plus ``l1_lambda * sum |vectors|``."""
        loss = cast(ModuleHost, super()).compute_loss(batch)
        l1 = self.l1_term()
        log_train(cast(Any, self), "train/lofit_l1", l1.detach(), int(batch["input_ids"].shape[0]))
        return loss + (self.l1_lambda * l1).to(loss.dtype) if self.l1_lambda else loss

    # ------------------------------------------------------------------ saving
    def heads_output_path(self) -> Path | None:
        """Where stage ``heads`` writes its file at the end of ``fit`` (``None`` in stage ``bias`` or when disabled)."""
        if self.lofit_stage != "heads":
            return None
        return export_path(self.heads_output, self._trainer, "lofit_heads.safetensors")

    def save_pretrained(self, path: str | os.PathLike[str]) -> Path:
        """Save the backbone with the vectors folded in, and the tokenizer (see :func:`save_folded`)."""
        host = cast(ModuleHost, self)
        return save_folded(host.backbone, getattr(self, "tokenizer", None), self._outputs, self.lofit, path)

    @override
    def on_fit_end(self) -> None:
        """The host's export (``hf_model/`` with the vectors folded in), then stage 1's heads file."""
        super().on_fit_end()
        path = self.heads_output_path()
        if path is not None and self.trainer.is_global_zero:
            self.save_heads(path)
        self.trainer.strategy.barrier("lightning_ft.save_lofit_heads")


def _check_values(stage: str, top_k_ratio: float, l1_lambda: float | None, init_std: float) -> None:
    if stage not in ("heads", "bias"):
        raise ValueError(f"stage={stage!r} is not a LoFiT stage: use 'heads' (head selection) or 'bias' (bias tuning).")
    if not 0 < top_k_ratio <= 1:
        raise ValueError(f"top_k_ratio={top_k_ratio} must be in (0, 1] (the paper's: 0.03).")
    if l1_lambda is not None and not l1_lambda >= 0:
        raise ValueError(f"l1_lambda={l1_lambda} must be zero or positive (the official stage-1 value: 5e-4).")
    if not init_std >= 0:
        raise ValueError(f"init_std={init_std} must be zero or positive (the official value: 1e-3).")


def _check_selection(stage: str, heads_path: str | None, heads: Any) -> None:
    if stage == "heads" and (heads_path or heads is not None):
        raise ValueError(
            "stage='heads' scores every head, so heads_path and heads apply to stage='bias' only: unset them."
        )
    if stage == "bias" and bool(heads_path) == (heads is not None):
        raise ValueError(
            "stage='bias' tunes the heads that stage 'heads' selected: set heads_path to its file "
            "(<run>/lofit_heads.safetensors) or heads to [layer, head] pairs, not both."
        )


class LoFiTCausalLM(LoFiTMixin, CausalLMModule):
    """:class:`~lightning_ft.modules.CausalLMModule` with LoFiT's head vectors (see :class:`LoFiTMixin`)."""
