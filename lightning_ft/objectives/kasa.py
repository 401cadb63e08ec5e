r"""
KaSA: knowledge-aware singular-value adaptation
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

KaSA (Wang et al., "KaSA: Knowledge-Aware Singular-Value Adaptation of Large Language Models", arXiv 2412.06071)
drops the ``r`` smallest singular components of each adapted base weight (a one-time SVD) and trains the update
``B diag(sigma) A`` with learnable singular values ``sigma``. peft 0.21 implements the adapter as a LoRA variant
(``peft: {peft_type: LORA, ..., kasa_config: {}}``); the paper trains it with two auxiliary terms (Eq. 9-12), which
this mixin adds to the module's loss:

``L = L_task + beta * sum_l ||sigma_l||^2 + gamma * sum_l (||B_l^T B_l - I_r||_F + ||A_l A_l^T - I_r||_F)``

over every KaSA layer ``l``: the singular-value penalty and the orthogonality of the factors that the SVD
parametrisation assumes. The paper's ``beta = 1e-4`` and ``gamma = 1e-3`` are the defaults. The official repository
builds the ``d_in x d_in`` Gram matrix ``A^T A``, which a rank-``r`` factor can never make the identity; the ``r x r``
form here is the paper's (and peft's).
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
from typing_extensions import override

from lightning_ft.core.host import MixinBase, ModuleHost, require_host
from lightning_ft.errors import UserError
from lightning_ft.objectives._common import check_fit_support, log_train
from lightning_ft.support import MethodSupport, used_features

__all__ = ["KaSALossMixin", "kasa_layers", "kasa_terms"]


def kasa_layers(backbone: torch.nn.Module) -> list[torch.nn.Module]:
    """The LoRA layers of ``backbone`` that carry KaSA's ``lora_diag``."""
    return [module for module in backbone.modules() if getattr(module, "lora_diag", None) is not None]


def kasa_terms(
    backbone: torch.nn.Module, layers: list[torch.nn.Module] | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(sum ||sigma||^2, sum (||B^T B - I||_F + ||A A^T - I||_F), layers)`` over the active KaSA adapters, in fp32.

    Args:
        backbone: A peft model (or any module) whose LoRA layers may carry KaSA's ``lora_diag``.
        layers: Its :func:`kasa_layers`, when already listed.
    """
    l2 = torch.zeros((), dtype=torch.float32)
    l3 = torch.zeros((), dtype=torch.float32)
    count = 0
    for module in kasa_layers(backbone) if layers is None else layers:
        diag = module.lora_diag
        for name in getattr(module, "active_adapters", None) or list(diag):
            if name not in diag:
                continue
            sigma = diag[name].float()
            a = module.lora_A[name].weight.float()  # (r, in)
            b = module.lora_B[name].weight.float()  # (out, r)
            eye = torch.eye(sigma.shape[0], device=sigma.device)
            l2 = l2.to(sigma.device) + (sigma**2).sum()
            l3 = l3.to(sigma.device) + torch.linalg.norm(b.T @ b - eye) + torch.linalg.norm(a @ a.T - eye)
            count += 1
    return l2, l3, count


class KaSALossMixin(MixinBase):
    """Adds KaSA's singular-value and orthogonality terms to the module's loss (see the module docstring).

    Mix into :class:`~lightning_ft.modules.CausalLMModule` (ready made as
    :class:`~lightning_ft.objectives.KaSACausalLM`) with a KaSA adapter:
    ``peft: {peft_type: LORA, r: 8, lora_alpha: 16, target_modules: all-linear, kasa_config: {}}``. Logs
    ``train/kasa_l2`` and ``train/kasa_l3`` (the unweighted sums). Paper: https://arxiv.org/abs/2412.06071

    Args:
        kasa_beta: Weight of ``sum ||sigma||^2`` (the paper's 1e-4).
        kasa_gamma: Weight of the orthogonality term (the paper's 1e-3). ``0`` and ``0`` train plain KaSA.
        **kwargs: Arguments of the LightningModule it is mixed into.
    """

    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "lora", "mixed"}),
        {
            "quantized": "{name} rewrites each adapted base weight by SVD, which a quantized {model} keeps in 4/8 bit: "
            "load the backbone unquantized (quantization: null).",
            "fsdp2": "{name}'s regulariser multiplies whole adapter factors, which {strategy} shards: use "
            "strategy='ddp'.",
        },
        "Needs a KaSA adapter (peft kasa_config); the terms are computed in fp32.",
    )

    def __init__(self, *, kasa_beta: float = 1e-4, kasa_gamma: float = 1e-3, **kwargs: Any) -> None:
        for name, value in (("kasa_beta", kasa_beta), ("kasa_gamma", kasa_gamma)):
            if not value >= 0:
                raise ValueError(f"{name}={value} must be zero or positive (the paper's: 1e-4 and 1e-3).")
        super().__init__(**kwargs)
        require_host(self, KaSALossMixin, ("backbone", "compute_loss"))
        if "quantized" in used_features(None, cast(ModuleHost, self).backbone):  # peft would SVD a 4/8-bit weight
            raise UserError(str(KaSALossMixin.support.refusal("quantized", type(self).__name__, "", "")))
        self.kasa_beta = float(kasa_beta)
        self.kasa_gamma = float(kasa_gamma)
        self._kasa_layers: list[torch.nn.Module] | None = None  # listed once, at setup or the first loss

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":
            return
        backbone = cast(ModuleHost, self).backbone
        check_fit_support(self, self.trainer, backbone)
        self._kasa_layers = kasa_layers(backbone)
        if not self._kasa_layers:
            raise UserError(
                f"{type(self).__name__} regularises KaSA adapters, and this backbone has none: set peft to a LoRA "
                "config with kasa_config (e.g. {peft_type: LORA, r: 8, kasa_config: {}})."
            )

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The module's loss plus ``beta * L2 + gamma * L3``."""
        loss = cast(ModuleHost, super()).compute_loss(batch)
        backbone = cast(ModuleHost, self).backbone
        if self._kasa_layers is None:
            self._kasa_layers = kasa_layers(backbone)
        l2, l3, _ = kasa_terms(backbone, self._kasa_layers)
        size = int(batch["input_ids"].shape[0])
        log_train(cast(Any, self), "train/kasa_l2", l2.detach(), size)
        log_train(cast(Any, self), "train/kasa_l3", l3.detach(), size)
        return loss + (self.kasa_beta * l2 + self.kasa_gamma * l3).to(loss.dtype)
