r"""
CorDA: context-oriented decomposition adaptation
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

CorDA (Yang et al., "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models for Task-Aware
Parameter-Efficient Fine-tuning", NeurIPS 2024, arXiv 2406.05223) initialises each LoRA adapter from the weight's
decomposition *oriented by the context it sees*: with ``C = sum X^T X`` the covariance of the layer's inputs over a
few batches of context data,

``SVD(W C) = U S V^T``,  ``W = U S (V^T C^-1)``  (exact; ``C`` is damped to ``C + d * mean(diag C) * I``),

and the adapter takes ``r`` of those components: ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) (V^T C^-1)_r`` (divided by
LoRA's ``alpha / r``), while the base weight keeps the rest, ``W - (alpha / r) B A``. The model's output is unchanged
at initialisation.

- **Knowledge-preserved mode** (``mode: kpm``): the context is general text, or questions of the knowledge to keep;
  the adapter takes the **smallest** ``r`` components, so the directions that text uses stay frozen.
- **Instruction-previewed mode** (``mode: ipm``): the context is the task's own data; the adapter takes the
  **largest** ``r`` components, the ones the task already uses.

The decomposition and the adapter initialisation are peft's (``collect_eigens_for_layer`` and the LoRA layer's
``corda_init``, as ``init_lora_weights="corda"`` would run them); this callback collects the covariance in
``setup`` with forward hooks (no optimizer step), before the optimizer and the strategy see the model, so it works
from YAML on any fit. Differences from peft's collection, both for a stated reason: padding tokens are left out
(peft's hook takes every position and assumes a batch of one row), and each batch's ``X`` is not rescaled by its
maximum (peft's hook divides every sample by its largest activation, which the paper's ``C = X X^T`` does not; the
covariance's overall scale cancels out of the initialisation). Under DDP every process collects over its own
batches and the covariances are summed across processes, so every process initialises the same adapters.

Because the base weights are rewritten, the exported ``hf_model/`` adapter is converted into the plain LoRA
``[A | A0], [B | -B0]`` (rank ``2r``) that applies the fine-tuning update to the *original* base model
(``path_initial_model_for_weight_conversion``); ``merge_adapter: true`` also writes the merged model, which needs no
conversion. A run resumed from a checkpoint repeats the (deterministic) initialisation and then loads the trained
adapters; a checkpoint whose initialisation differs (other data or settings) is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from torch import nn
from typing_extensions import override

from lightning_ft.core.layer_map import is_peft_model
from lightning_ft.errors import UserError
from lightning_ft.support import MethodSupport, check_support

__all__ = ["CorDAInit", "context_covariances", "corda_initialise"]

Mode = Literal["kpm", "ipm"]


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """``(name, layer, adapter)`` for every LoRA layer of ``model`` over a linear (or Conv1D) base, active adapter."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module.get_base_layer(), "weight"):
            for adapter in module.active_adapters:
                if adapter in getattr(module, "lora_A", {}):
                    yield name, module, adapter


@torch.no_grad()
def context_covariances(
    model: nn.Module, layers: dict[str, nn.Module], batches: list[dict[str, Any]], reduce: Any = None
) -> dict[str, torch.Tensor]:
    """``C = (sum over non-padding tokens of x x^T) / tokens`` of the input of each LoRA layer's base, in fp32 (a
    layer fed one row per sequence, e.g. a pooler, sums over those rows). The sums are kept in fp64, so the
    covariance rounds to the same fp32 matrix however the rows are split into batches and processes.

    Args:
        model: The (peft) model to run; its adapters must not change the output yet (LoRA's ``B = 0``).
        layers: ``name -> LoRA layer``; the forward hook sits on each layer's base.
        batches: Mappings with ``input_ids`` and optionally ``attention_mask``.
        reduce: Optional function summing a tensor across processes (``strategy.reduce``).
    """
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, float] = {}
    mask: torch.Tensor | None = None

    def hook(name: str) -> Any:
        def collect(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            inputs = args[0].detach()
            x = inputs.double().reshape(-1, inputs.shape[-1])  # fp64 sums: the same C however the rows are split
            if mask is not None and inputs.shape[:-1] == mask.shape:  # per-token inputs (not e.g. a pooled row)
                x = x[mask.reshape(-1)]
            cov = x.T @ x
            sums[name] = cov if name not in sums else sums[name] + cov
            rows[name] = rows.get(name, 0.0) + x.shape[0]

        return collect

    handles = [layer.get_base_layer().register_forward_hook(hook(name)) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            attention = batch.get("attention_mask")
            mask = None if attention is None else attention.bool()
            model(input_ids=batch["input_ids"], attention_mask=attention)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if set(sums) != set(layers) or not all(rows.values()):
        raise ValueError("CorDA's context batches reached none of the LoRA layers (or held no tokens): give it data.")
    counts = torch.tensor([rows[name] for name in layers], dtype=torch.float64)
    if reduce is not None:  # every process's tokens
        device = next(iter(sums.values())).device
        counts = reduce(counts.to(device)).cpu()
        sums = {name: reduce(cov) for name, cov in sums.items()}
    return {name: (sums[name] / float(count)).float() for name, count in zip(layers, counts)}


@torch.no_grad()
def corda_initialise(layer: nn.Module, adapter: str, covariance: torch.Tensor, mode: Mode) -> None:
    """Initialise one LoRA layer's ``adapter`` by CorDA from its input covariance (peft's decomposition and init).

    The base weight becomes the residual ``W - scaling * B A``; ``kpm`` takes the smallest ``r`` components,
    ``ipm`` the largest.
    """
    from peft.tuners.lora.corda import CordaEigens, collect_eigens_for_layer

    base = layer.get_base_layer()
    base.covariance_matrix = covariance
    try:
        eigens = collect_eigens_for_layer(base, None)  # type: ignore[arg-type]  # the config is not read
    finally:
        del base.covariance_matrix
    r = int(layer.r[adapter])
    part = slice(None, r) if mode == "ipm" else slice(-r, None)
    device = base.weight.device
    base.eigens = CordaEigens(
        S_WC=eigens.S_WC[part].clone().to(device),
        U_WC=eigens.U_WC[:, part].clone().to(device),
        V_WC=eigens.V_WC[:, part].clone().to(device),
    )
    layer.corda_init(adapter, "corda")  # peft: A, B and the residual base weight; drops base.eigens


class CorDAInit(L.Callback):
    """Initialise the LoRA adapters by CorDA from context data before training (see the module docstring).

    Use with a LoRA module (``peft: {peft_type: LORA, r: 8, target_modules: ...}``); from YAML:
    ``callbacks: [{class_path: CorDAInit, init_args: {mode: kpm, data: control, batches: 32}}]``.
    Paper: https://arxiv.org/abs/2406.05223

    Args:
        mode: ``kpm`` (knowledge-preserved: the adapter takes the smallest components of the context's
            decomposition) or ``ipm`` (instruction-previewed: the largest).
        data: The context: ``control`` (the DataModule's control text, general text the task does not train on),
            ``train`` (the fit's training batches), or a bundled dataset name or data file whose ``data_field``
            texts are tokenised here; ``auto``: ``control`` for ``kpm``, ``train`` for ``ipm``.
        batches: Batches of context read (the paper's 256 samples at 2,048 tokens for a 4,096-wide model; a few
            thousand tokens per input width are plenty).
        data_field: The text field of a dataset or file ``data``.
        batch_size: Rows per batch of a dataset or file ``data``.
        max_length: Tokens per text of a dataset or file ``data``.
    """

    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "lora", "mixed"}),
        {
            "quantized": "{name} rewrites each adapted base weight as the residual of its decomposition, which a "
            "quantized {model} keeps in 4/8 bit: load the backbone unquantized (quantization: null).",
            "fsdp2": "{name}'s export converts the adapter against the original weights on one process, which "
            "{strategy} keeps sharded: use strategy='ddp'.",
        },
        "Needs LoRA adapters (peft); the covariances are summed across DDP processes.",
    )

    def __init__(
        self,
        mode: Mode = "kpm",
        data: str = "auto",
        batches: int = 32,
        data_field: str = "text",
        batch_size: int = 8,
        max_length: int = 256,
    ) -> None:
        if mode not in ("kpm", "ipm"):
            raise ValueError(f"mode={mode!r} must be 'kpm' (knowledge-preserved) or 'ipm' (instruction-previewed).")
        for name, value in (("batches", batches), ("batch_size", batch_size), ("max_length", max_length)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if not data:
            raise ValueError("data='' names no context: use 'control', 'train', 'auto' or a dataset name or file.")
        self.mode: Mode = mode
        self.data = data
        self.batches = batches
        self.data_field = data_field
        self.batch_size = batch_size
        self.max_length = max_length
        self.initial_adapter: dict[str, torch.Tensor] | None = None  # peft-format state dict of the adapter as set
        self._rewritten: list[torch.Tensor] = []  # the base weights set to the residual
        self._fingerprint = ""

    @property
    def source(self) -> str:
        """The context actually read (``auto`` resolved)."""
        if self.data == "auto":
            return "control" if self.mode == "kpm" else "train"
        return self.data

    # ------------------------------------------------------------------ setup: the initialisation
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from lightning_ft.core.process_group import destroy_process_group_at_exit

        destroy_process_group_at_exit()
        model = self._peft_model(pl_module)
        check_support(self, trainer, model)
        found = list(lora_layers(model))  # a quantized backbone was refused by the support check above
        layers = {name: layer for name, layer, _ in found}
        adapters = {name: adapter for name, _, adapter in found}
        reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if trainer.world_size > 1 else None
        covariances = context_covariances(model, layers, self._context(trainer, pl_module), reduce)
        for name, layer in layers.items():
            corda_initialise(layer, adapters[name], covariances[name].to(layer.get_base_layer().weight.device),
                             self.mode)  # fmt: skip
        del covariances
        self._rewritten = [layer.get_base_layer().weight for layer in layers.values()]
        self._share_from_first_process(trainer, layers)
        from peft import get_peft_model_state_dict

        self.initial_adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        self._fingerprint = _fingerprint(self.initial_adapter)
        if hasattr(pl_module, "initial_adapter_state"):  # our modules convert the export (see the module docstring)
            pl_module.initial_adapter_state = self.initial_adapter

    def rewritten_names(self, module: nn.Module) -> list[str]:
        """The names, in ``module``, of the frozen base weights the initialisation rewrote (the residuals)."""
        ids = {id(t) for t in self._rewritten}
        return [name for name, p in module.named_parameters() if id(p) in ids]

    def _peft_model(self, pl_module: L.LightningModule) -> nn.Module:
        backbone = getattr(pl_module, "backbone", None)
        candidates = [backbone] if backbone is not None else list(pl_module.modules())
        for module in candidates:
            if is_peft_model(module) and next(lora_layers(module), None) is not None:
                return module
        raise UserError(
            f"{type(self).__name__} initialises LoRA adapters, and {type(pl_module).__name__} has none: give the "
            "module a LoRA adapter (peft: {peft_type: LORA, r: 8, target_modules: all-linear})."
        )

    def _context(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict[str, Any]]:
        from lightning_ft.callbacks.layerwise_outliers import source_batches

        if self.source in ("control", "train"):
            return source_batches(trainer, self.source, self.batches, "data", type(self).__name__)
        from lightning_ft.data.files import load_records, record_field

        tokenizer = getattr(pl_module, "tokenizer", None)
        if tokenizer is None:
            raise UserError(f"{type(self).__name__}(data={self.data!r}) tokenises texts with the module's tokenizer, "
                            f"and {type(pl_module).__name__} has none: set data to 'train' or 'control'.")  # fmt: skip
        records = load_records(self.data, argument="data")[: self.batches * self.batch_size]
        texts = [str(record_field(r, self.data_field, "data_field", self.data)) for r in records]
        rank, world = trainer.global_rank, trainer.world_size
        texts = texts[rank::world]  # each process its share; the covariances are summed across processes
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                            truncation=True, max_length=self.max_length)  # fmt: skip
            out.append(trainer.strategy.batch_to_device(
                {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}))  # fmt: skip
        return out

    @staticmethod
    def _share_from_first_process(trainer: L.Trainer, layers: dict[str, nn.Module]) -> None:
        """Every process holds the first one's initialisation (the same covariance gives the same SVD up to the
        libraries' rounding; DDP would broadcast the trainable tensors, but not the rewritten frozen base weights)."""
        import torch.distributed as dist

        if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return
        for layer in layers.values():
            tensors = [layer.get_base_layer().weight] + [p for n, p in layer.named_parameters() if "lora_" in n]
            for tensor in tensors:
                dist.broadcast(tensor.data, src=0)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "data": self.data, "batches": self.batches, "fingerprint": self._fingerprint}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore; the initialisation repeated in ``setup`` must be the checkpoint's (the base weights are not in a
        LoRA checkpoint, only the adapters trained from it)."""
        saved = state_dict.get("fingerprint", "")
        if saved and self._fingerprint and saved != self._fingerprint:
            raise UserError(
                f"{type(self).__name__}'s initialisation differs from the checkpoint's (mode, data or batches changed: "
                f"it had mode={state_dict.get('mode')!r}, data={state_dict.get('data')!r}, batches="
                f"{state_dict.get('batches')}): resume with the checkpoint's settings and data, or start a new fit."
            )


def _fingerprint(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
