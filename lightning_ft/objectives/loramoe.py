r"""
LoRAMoE: a mixture of LoRA experts with the localized balancing constraint
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

LoRAMoE (Dou et al., "LoRAMoE: Alleviate World Knowledge Forgetting in Large Language Models via MoE-Style Plugin",
ACL 2024, arXiv 2312.09979) freezes the backbone and replaces each FFN linear (``gate_proj``, ``up_proj``,
``down_proj``) by a dense mixture of ``N`` LoRA experts with a per-token router:

``y = W0 x + sum_i g_i(x) B_i A_i x * (alpha / r)``, ``g(x) = softmax(W_r x)`` (every expert, no top-k).

The experts are split in two groups: the first ``knowledge_experts`` serve world-knowledge samples (type 1), the
others the downstream task (type 0). Per LoRAMoE layer and batch, ``Q[n, i] = sum_t g_i(x_nt)`` over the sample's
(non-padding) tokens, ``I[n, i] = 1 + delta`` where expert ``i``'s group matches sample ``n``'s type and ``1 - delta``
elsewhere, and the localized balancing constraint is the squared coefficient of variation of ``Z = I * Q`` over all
``batch x experts`` entries:

``L_lbc = Var(Z) / Mean(Z)^2``, ``L = L_LM + beta * sum_layers L_lbc``.

What the formula does, worked out: ``Z`` is balanced when ``(1 + delta) Q_boosted = (1 - delta) Q_other`` within each
sample, so its fixed point gives the group ``I`` boosts a share ``(1 - delta) / 2`` of the sample's router mass: the
two data types are steered to different groups, each type *away* from the group labelled with it (0.45 / 0.55 at
``delta = 0.1``), and the experts inside a group are balanced. The labels only name the groups; the separation is the
paper's effect. ``train/loramoe_boosted_share`` logs that share (the SmolLM2 test shows it falling from 0.5).

Defaults: ``N = 8``, ``r = 4``, ``alpha = 32``, dropout 0.05 (the released ``run_loramoe.sh``); ``beta = 0.1`` and
``delta = 0.1``. The released script sets both ``blc_weight`` and ``blc_alpha`` to 0 (no constraint); the defaults
here are the paper's experimental setting as we read it (see the note of the method). Following the official
``peft/tuners/lora.py``: a "layer" is each adapted linear (three per block), ``Var`` is the unbiased sample variance
(``torch.var``) with ``1e-10`` added to ``Mean^2``, and the constraint is summed over layers. One deliberate
difference: the official code sums ``g`` over every position, padding included; here padding (``attention_mask`` 0)
is left out, as the paper's ``Q`` sums a sample's tokens.

The routing depends on the input, so a mixture does not merge into the base weight: ``hf_model/`` holds the experts
(``loramoe.safetensors`` and ``loramoe_config.json`` beside the tokenizer, no ``config.json``, so nothing loads it as
the bare base model by mistake) and :func:`load_loramoe` rebuilds the model from it with identical logits. With
``merge_experts: true``, ``hf_model/merged/`` also holds a peft LoRA adapter of rank ``N r`` that fixes each layer's
gates at their mean over a few training batches: exact for ``N = 1``, an approximation otherwise.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from torch import nn
from typing_extensions import override

from lightning_ft.core.host import MixinBase, ModuleHost, require_host
from lightning_ft.core.io import atomic_dir, check_finite
from lightning_ft.errors import UserError
from lightning_ft.modules.causal_lm import CausalLMModule
from lightning_ft.objectives._common import check_fit_support, log_train
from lightning_ft.support import MethodSupport

__all__ = [
    "LoRAMoECausalLM",
    "LoRAMoELinear",
    "LoRAMoEMixin",
    "add_loramoe",
    "balance_loss",
    "load_loramoe",
    "localized_balance_loss",
    "loramoe_layers",
    "merged_lora_state",
    "sample_types",
]

FFN_TARGETS = ("gate_proj", "up_proj", "down_proj")
CONFIG_FILE, WEIGHTS_FILE = "loramoe_config.json", "loramoe.safetensors"


class LoRAMoELinear(nn.Module):
    """A frozen linear layer plus ``N`` routed LoRA experts (see the module docstring).

    The experts' factors are stored stacked: ``lora_A`` is ``[A_1; ...; A_N]`` (``N r x in``) and ``lora_B`` is
    ``[B_1, ..., B_N]`` (``out x N r``), so the mixture is two matrix products: ``B (g (x) A x)``, with ``g``
    repeated ``r`` times. ``A_i`` and the router ``W_r`` are Kaiming-uniform (as ``nn.Linear``), ``B_i`` zero.

    Args:
        base_layer: The frozen linear layer (kept, and called as it is).
        num_experts: ``N``.
        rank: ``r`` of each expert.
        alpha: LoRA ``alpha`` (the scaling is ``alpha / r``).
        dropout: Dropout on the experts' input (not on the router's).
    """

    def __init__(self, base_layer: nn.Linear, num_experts: int, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.num_experts, self.rank, self.scaling = num_experts, rank, alpha / rank
        weight = base_layer.weight
        kwargs = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(num_experts * rank, base_layer.in_features, **kwargs))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, num_experts * rank, **kwargs))
        self.lora_router = nn.Linear(base_layer.in_features, num_experts, bias=False, **kwargs)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # each A_i as nn.Linear(in, r) would be
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.capture = False  # keep the last router output in ``gates`` (for the balancing constraint)
        self.gates: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """``g(x)``: the router's softmax over the experts, in fp32, ``[..., N]``."""
        return torch.softmax(self.lora_router(x).float(), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        gates = self.route(x)
        if self.capture:
            self.gates = gates
        low = nn.functional.linear(self.lora_dropout(x), self.lora_A)  # [..., N r]
        mixed = (low.unflatten(-1, (self.num_experts, self.rank)) * gates.to(low.dtype).unsqueeze(-1)).flatten(-2)
        return out + nn.functional.linear(mixed, self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, rank={self.rank}, scaling={self.scaling}"


def loramoe_layers(model: nn.Module) -> list[tuple[str, LoRAMoELinear]]:
    """The LoRAMoE layers of ``model``, by name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRAMoELinear)]


def add_loramoe(
    model: nn.Module,
    num_experts: int = 8,
    rank: int = 4,
    alpha: float = 32.0,
    dropout: float = 0.05,
    targets: Sequence[str] = FFN_TARGETS,
    capture: bool = False,
) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` whose name ends in one of ``targets`` by a :class:`LoRAMoELinear`,
    and freeze everything else (drop-in: works on any module holding a transformers model).

    With ``capture`` the layers keep their last router output, which :func:`balance_loss` reads (and clears): a
    user's own ``training_step`` adds ``beta * balance_loss(model, types, delta, mask)[0]`` to its loss.

    Returns:
        The names of the replaced layers.

    Raises:
        UserError: When no target is an ``nn.Linear`` (e.g. GPT-2's ``Conv1D``), naming ``targets``.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    found = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets and type(m) is nn.Linear]
    if not found:
        raise UserError(
            f"LoRAMoE found no nn.Linear layer named {list(targets)} in {type(model).__name__} (its FFN layers may be "
            "Conv1D or named otherwise): set loramoe_targets to the names of the model's FFN linear layers."
        )
    for name, linear in found:
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        layer = LoRAMoELinear(linear, num_experts, rank, alpha, dropout)
        layer.capture = capture
        setattr(parent, name.rpartition(".")[2], layer)
    return [name for name, _ in found]


def sample_types(batch: dict[str, Any], knowledge_tasks: Sequence[int] | None, who: str = "LoRAMoE") -> torch.Tensor:
    """Each example's LoRAMoE type (1 = world knowledge, 0 = downstream task): the batch's ``task_types``, else its
    ``task_id`` mapped through ``knowledge_tasks``.

    Raises:
        UserError: One sentence naming the fix when the batch carries neither.
    """
    if "task_types" in batch:
        return torch.as_tensor(batch["task_types"]).long().reshape(-1)
    if "task_id" in batch and knowledge_tasks is not None:
        task_id = torch.as_tensor(batch["task_id"]).reshape(-1)
        return torch.isin(task_id, torch.tensor(list(knowledge_tasks), device=task_id.device)).long()
    lacks = "a task_id but knowledge_tasks is not set" if "task_id" in batch else "neither task_types nor task_id"
    raise UserError(
        f"{who}'s balancing constraint needs each example's type (1 = world knowledge, 0 = task), and this batch has "
        f"{lacks}: train with MultiTaskDataModule and set knowledge_tasks to the ids of the world-knowledge tasks "
        "(e.g. [1]), give the batch a task_types field, or set loramoe_beta to 0."
    )


def localized_balance_loss(
    gates: torch.Tensor,
    types: torch.Tensor,
    knowledge_experts: int,
    delta: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``L_lbc = Var(I * Q) / Mean(I * Q)^2`` of one layer (unbiased variance over ``batch x experts``).

    Args:
        gates: Router outputs ``[B, T, N]``.
        types: Each sample's type ``[B]`` (1 = world knowledge, 0 = task).
        knowledge_experts: The first this many experts form the world-knowledge group.
        delta: The importance boost of an expert on samples of its own group.
        mask: ``[B, T]``, 0 on padding (left out of ``Q``).
    """
    gates = gates.float()
    if mask is not None:
        gates = gates * mask.to(gates.dtype).unsqueeze(-1)
    q = gates.sum(dim=1)  # [B, N]
    knowledge = torch.arange(q.shape[1], device=q.device) < knowledge_experts
    match = (types.to(q.device).reshape(-1, 1) == 1) == knowledge.unsqueeze(0)
    z = (q * torch.where(match, 1.0 + delta, 1.0 - delta)).flatten()
    if z.numel() < 2:
        return z.sum() * 0.0
    return z.var() / (z.mean() ** 2 + 1e-10)


def balance_loss(
    model: nn.Module,
    types: torch.Tensor,
    delta: float,
    mask: torch.Tensor | None = None,
    knowledge_experts: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_layers L_lbc, mean router mass on the group I boosts for each sample)`` from the gates the layers captured in the
    last forward pass (cleared here); ``knowledge_experts`` defaults to ``N // 2``."""
    total = torch.zeros((), dtype=torch.float32)
    own, count = torch.zeros((), dtype=torch.float32), 0
    for _, layer in loramoe_layers(model):
        gates, layer.gates = layer.gates, None
        if gates is None:
            continue
        k = layer.num_experts // 2 if knowledge_experts is None else knowledge_experts
        total = total.to(gates.device) + localized_balance_loss(gates, types, k, delta, mask)
        with torch.no_grad():
            group = (torch.arange(layer.num_experts, device=gates.device) < k).float()
            mass = (gates * group).sum(-1)  # [B, T] on the knowledge group
            mass = torch.where(types.to(gates.device).reshape(-1, 1) == 1, mass, 1.0 - mass)
            weights = mask.to(mass.dtype) if mask is not None else torch.ones_like(mass)
            own = own.to(gates.device) + (mass * weights).sum() / weights.sum().clamp_min(1.0)
            count += 1
    return total, own / max(count, 1)


# ---------------------------------------------------------------------------------------------- export
def _expert_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1].startswith("lora_")
            or ".lora_router." in n}  # fmt: skip


def load_loramoe(path: str | Path, dtype: str = "float32", base: str | None = None) -> tuple[nn.Module, Any]:
    """Rebuild the LoRAMoE model of an exported folder (``hf_model/``): ``(model in eval mode, tokenizer)``.

    Args:
        path: The folder :meth:`LoRAMoEMixin.save_pretrained` wrote.
        dtype: Weight dtype of the rebuilt model.
        base: The base model (alias, folder or Hub id); default: the one recorded at export.
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_ft.assets import resolve_model
    from lightning_ft.modules.backbone import torch_dtype

    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file():
        raise UserError(f"{folder} holds no {CONFIG_FILE}: pass the hf_model/ folder a LoRAMoE run exported.")
    config = json.loads((folder / CONFIG_FILE).read_text())
    model = AutoModelForCausalLM.from_pretrained(resolve_model(base or config["base_model"], weights=True),
                                                 dtype=torch_dtype(dtype))  # fmt: skip
    add_loramoe(model, config["num_experts"], config["rank"], config["alpha"], config["dropout"], config["targets"])
    missing = model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=False)
    expected = set(_expert_state(model))
    if set(missing.missing_keys) & expected or missing.unexpected_keys:
        raise UserError(f"{folder / WEIGHTS_FILE} does not match the base model's LoRAMoE layers: pass base=<the model "
                        "the run fine-tuned>.")  # fmt: skip
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def merged_lora_state(model: nn.Module, mean_gates: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A peft LoRA adapter (config fields, tensors) equal to the mixture with each layer's gates fixed at
    ``mean_gates[layer name]``: rank ``N r``, ``A = [A_1; ...; A_N]``, ``B = [g_1 B_1, ..., g_N B_N]``, alpha ``N alpha``
    (so that peft's ``alpha / rank`` is the experts' ``alpha / r``)."""
    tensors: dict[str, torch.Tensor] = {}
    layers = loramoe_layers(model)
    for name, layer in layers:
        gates = mean_gates[name].to(layer.lora_B.dtype).repeat_interleave(layer.rank)
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.detach().clone()
        tensors[f"base_model.model.{name}.lora_B.weight"] = (layer.lora_B.detach() * gates).contiguous()
    first = layers[0][1]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.num_experts * first.rank,
              "lora_alpha": first.scaling * first.num_experts * first.rank, "lora_dropout": 0.0,
              "target_modules": sorted({n.rsplit(".", 1)[-1] for n, _ in layers})}  # fmt: skip
    return config, tensors


@torch.no_grad()
def mean_gates(model: nn.Module, batches: Iterable[dict[str, Any]], device: torch.device) -> dict[str, torch.Tensor]:
    """Each LoRAMoE layer's router output averaged over the non-padding tokens of ``batches`` (uniform without any)."""
    layers = loramoe_layers(model)
    sums = {n: torch.zeros(m.num_experts, device=device) for n, m in layers}
    tokens = torch.zeros((), device=device)
    before = [m.capture for _, m in layers]
    for _, m in layers:
        m.capture = True
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask", torch.ones_like(ids)).to(device)
            model(input_ids=ids, attention_mask=mask)
            for n, m in layers:
                sums[n] += (m.gates * mask.unsqueeze(-1)).sum(dim=(0, 1))  # type: ignore[operator]
            tokens += mask.sum()
    finally:
        for (_, m), capture in zip(layers, before):
            m.capture, m.gates = capture, None
    return {n: (s / tokens if tokens > 0 else torch.full_like(s, 1.0 / s.numel())) for n, s in sums.items()}


# ---------------------------------------------------------------------------------------------- the mixin
class LoRAMoEMixin(MixinBase):
    """LoRAMoE: routed LoRA experts in the FFN linears of a frozen backbone, trained with the localized balancing
    constraint (see the module docstring).

    Mix into :class:`~lightning_ft.modules.CausalLMModule` (ready made as :class:`LoRAMoECausalLM`) without
    ``peft``. Each training batch needs each example's type: a ``task_types`` field (1 = world knowledge, 0 = task),
    or the ``task_id`` of :class:`~lightning_ft.objectives.MultiTaskDataModule` with ``knowledge_tasks`` naming the
    world-knowledge tasks; a batch with neither is refused in one sentence (unless ``loramoe_beta`` is 0). Logs
    ``train/loramoe_lbc`` (the unweighted sum over layers) and ``train/loramoe_boosted_share`` (the mean router mass
    on the group the importance matrix boosts for each sample; the constraint drives it to ``(1 - delta) / 2``). Paper: https://arxiv.org/abs/2312.09979

    Args:
        num_experts: ``N`` experts per adapted linear (8, the released script's).
        expert_rank: ``r`` of each expert (4).
        expert_alpha: LoRA ``alpha`` of each expert (32).
        expert_dropout: Dropout on the experts' input (0.05).
        knowledge_experts: Size of the world-knowledge group, the first experts (default ``N // 2``).
        loramoe_beta: Weight ``beta`` of the constraint summed over layers (0.1; 0 trains without it).
        loramoe_delta: Importance boost ``delta`` of an expert on samples of its own group (0.1).
        knowledge_tasks: The ``task_id`` values that are world-knowledge data (type 1).
        loramoe_targets: Names of the linear layers to adapt (the FFN's).
        merge_experts: Also export ``hf_model/merged/``, a peft LoRA with each layer's gates fixed at their mean over
            ``merge_batches`` training batches (exact only for one expert).
        merge_batches: Training batches that measure the mean gates of ``merge_experts``.
        **kwargs: Arguments of the LightningModule it is mixed into.
    """

    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "mixed"}),
        {
            "quantized": "{name} wraps full-precision FFN linears with its experts and does not build on a quantized "
            "backbone: load the backbone unquantized (quantization: null).",
            "lora": "{name} trains its own routed LoRA experts and does not compose with a peft adapter on the same "
            "model: set peft to null.",
            "fsdp2": "{name}'s balancing constraint reads every router's output of the whole batch, which {strategy} "
            "shards with the experts: use strategy='ddp'.",
        },
        "Experts in gate/up/down_proj; the constraint is taken over each process's own batch, as the paper's code does.",
    )

    def __init__(
        self,
        *,
        num_experts: int = 8,
        expert_rank: int = 4,
        expert_alpha: float = 32.0,
        expert_dropout: float = 0.05,
        knowledge_experts: int | None = None,
        loramoe_beta: float = 0.1,
        loramoe_delta: float = 0.1,
        knowledge_tasks: list[int] | None = None,
        loramoe_targets: list[str] | None = None,
        merge_experts: bool = False,
        merge_batches: int = 8,
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        _check_args(num_experts, expert_rank, expert_dropout, knowledge_experts, loramoe_beta, loramoe_delta)
        for feature in ("quantized", "lora"):
            if kwargs.get("quantization" if feature == "quantized" else "peft"):
                raise UserError(str(LoRAMoEMixin.support.refusal(feature, name, "", "")))  # type: ignore[arg-type]
        if kwargs.get("gradient_checkpointing") and loramoe_beta > 0:
            raise UserError(
                f"{name}'s balancing constraint reads the router outputs of the forward pass, which gradient "
                "checkpointing recomputes: set gradient_checkpointing to false (or loramoe_beta to 0)."
            )
        super().__init__(**kwargs)
        require_host(self, LoRAMoEMixin, ("backbone", "compute_loss"))
        host = cast(ModuleHost, self)
        add_loramoe(host.backbone, num_experts, expert_rank, expert_alpha, expert_dropout,
                    tuple(loramoe_targets or FFN_TARGETS), capture=loramoe_beta > 0)  # fmt: skip
        self.strict_loading = False  # checkpoints hold only the experts and routers; the frozen base is reloaded
        self.loramoe_config = {"num_experts": num_experts, "rank": expert_rank, "alpha": float(expert_alpha),
                               "dropout": float(expert_dropout), "targets": list(loramoe_targets or FFN_TARGETS)}  # fmt: skip
        self.knowledge_experts = num_experts // 2 if knowledge_experts is None else knowledge_experts
        self.loramoe_beta, self.loramoe_delta = float(loramoe_beta), float(loramoe_delta)
        self.knowledge_tasks = list(knowledge_tasks) if knowledge_tasks is not None else None
        self.merge_experts, self.merge_batches = merge_experts, merge_batches

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            check_fit_support(self, self.trainer, cast(ModuleHost, self).backbone)

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The module's loss plus ``beta * sum_layers L_lbc`` of this batch's router outputs."""
        loss = cast(ModuleHost, super()).compute_loss(batch)
        if self.loramoe_beta == 0:
            return loss
        backbone = cast(ModuleHost, self).backbone
        types = sample_types(batch, self.knowledge_tasks, type(self).__name__)
        lbc, boosted = balance_loss(backbone, types, self.loramoe_delta, batch.get("attention_mask"),
                                self.knowledge_experts)  # fmt: skip
        size = int(batch["input_ids"].shape[0])
        log_train(cast(Any, self), "train/loramoe_lbc", lbc.detach(), size)
        log_train(cast(Any, self), "train/loramoe_boosted_share", boosted, size)
        return loss + (self.loramoe_beta * lbc).to(loss.dtype)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        trainable = {n for n, p in cast(nn.Module, self).named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the experts and routers (``loramoe.safetensors``), ``loramoe_config.json`` and the tokenizer, and
        with ``merge_experts`` the approximate peft adapter in ``merged/``; :func:`load_loramoe` reads the folder."""
        from safetensors.torch import save_file

        host = cast(ModuleHost, self)
        state = _expert_state(host.backbone)
        check_finite(state, f"the LoRAMoE experts exported to {path}")
        config = {**self.loramoe_config, "base_model": str(cast(Any, self).hparams.get("model")),
                  "knowledge_experts": self.knowledge_experts, "format": "lightning-ft/loramoe-1"}  # fmt: skip
        merged = self._merged_adapter() if self.merge_experts else None
        with atomic_dir(path) as tmp:
            save_file(state, str(tmp / WEIGHTS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
            if host.tokenizer is not None:
                host.tokenizer.save_pretrained(tmp)
            if merged is not None:
                (tmp / "merged").mkdir()
                save_file(merged[1], str(tmp / "merged" / "adapter_model.safetensors"))
                merged[0].save_pretrained(str(tmp / "merged"))
        return Path(path)

    def _merged_adapter(self) -> tuple[Any, dict[str, torch.Tensor]]:
        from peft import LoraConfig

        module = cast(Any, self)
        batches: list[dict[str, Any]] = []
        datamodule = getattr(module._trainer, "datamodule", None) if module._trainer is not None else None
        if datamodule is not None:
            for batch in datamodule.train_dataloader():
                if len(batches) >= self.merge_batches:
                    break
                batches.append(batch)
        was_training = module.training
        module.eval()
        try:
            gates = mean_gates(module.backbone, batches, module.device)
        finally:
            module.train(was_training)
        fields, tensors = merged_lora_state(module.backbone, gates)
        base = str(module.hparams.get("model"))
        return LoraConfig(
            base_model_name_or_path=base, **{k: v for k, v in fields.items() if k != "peft_type"}
        ), tensors


def _check_args(n: int, r: int, dropout: float, k: int | None, beta: float, delta: float) -> None:
    """One sentence per bad constructor value."""
    if n < 1 or r < 1:
        raise ValueError(f"num_experts={n} and expert_rank={r} must be at least 1 (the paper's: 8 and 4).")
    if not 0 <= dropout < 1:
        raise ValueError(f"expert_dropout={dropout} must be in [0, 1) (the released script's: 0.05).")
    if k is not None and not 0 <= k <= n:
        raise ValueError(f"knowledge_experts={k} must be between 0 and num_experts={n} (default: num_experts // 2).")
    if not beta >= 0 or not 0 <= delta < 1:
        raise ValueError(f"loramoe_beta={beta} must be >= 0 and loramoe_delta={delta} in [0, 1) (defaults: 0.1, 0.1).")


class LoRAMoECausalLM(LoRAMoEMixin, CausalLMModule):
    """:class:`~lightning_ft.modules.CausalLMModule` with LoRAMoE experts and the balancing constraint
    (see :class:`LoRAMoEMixin`)."""
