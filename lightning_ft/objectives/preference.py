r"""
Preference objectives (the DPO family)
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Direct Preference Optimization (Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model", arXiv 2305.18290) trains a policy :math:`\pi_\theta` on pairs (prompt :math:`x`, chosen
:math:`y_w`, rejected :math:`y_l`) against a frozen reference :math:`\pi_\mathrm{ref}`:

.. math::

    z = \beta\Big[\big(\log\pi_\theta(y_w|x) - \log\pi_\mathrm{ref}(y_w|x)\big)
                - \big(\log\pi_\theta(y_l|x) - \log\pi_\mathrm{ref}(y_l|x)\big)\Big],\qquad
    \mathcal{L}_\mathrm{sigmoid} = -\log\sigma(z),\qquad \mathcal{L}_\mathrm{hinge} = \max(0, 1 - z)

(the hinge is SLiC's, Zhao et al. 2023, as TRL writes it), with :math:`\log\pi(y|x)` summed over the response
tokens. ``label_smoothing`` :math:`\varepsilon` gives the conservative DPO loss
:math:`-(1-\varepsilon)\log\sigma(z) - \varepsilon\log\sigma(-z)`. SPIN (Chen et al., arXiv 2401.01335) uses the
same loss with the gold answer as chosen and the previous iteration's own generation as rejected.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from lightning_ft.core.host import MixinBase, ModuleHost, require_host
from lightning_ft.data.collate import IGNORE_INDEX
from lightning_ft.errors import UserError
from lightning_ft.modules.backbone import is_peft_model
from lightning_ft.objectives._common import check_fit_support, log_train
from lightning_ft.support import MethodSupport

__all__ = ["PreferenceLossMixin", "ReferencePolicy", "pair_halves", "preference_loss", "sequence_logprobs"]

LossType = Literal["sigmoid", "hinge"]
Reference = Literal["auto", "copy", "adapter"]


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[B]``: the summed log-likelihood of each row's labelled targets (label ``-100`` excluded).

    ``logits[:, j]`` predicts ``targets[:, j]`` (the host's ``aligned_logits``)."""
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=-1)


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: LossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair losses ``[P]`` and margins ``z`` ``[P]`` from the four ``[P]`` sequence log-likelihoods (see the
    module docstring). With policy equal to reference, ``z = 0`` and the sigmoid loss is ``log 2``."""
    z = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    if loss_type == "sigmoid":
        loss = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss_type == "hinge":
        loss = torch.relu(1.0 - z)
    else:
        raise ValueError(f"loss_type={loss_type!r} is not supported: use 'sigmoid' or 'hinge'.")
    return loss, z


def pair_halves(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The row indices of the chosen and the rejected responses of a preference batch.

    A preference batch is a causal-LM batch with a ``pair_role`` row field (0 chosen, 1 rejected): the k-th chosen
    row pairs with the k-th rejected row (:class:`~lightning_ft.data.PreferenceDataModule` stacks all chosen rows,
    then all rejected rows).
    """
    role = batch.get("pair_role")
    if role is None:
        raise UserError(
            "PreferenceLossMixin trains on preference pairs, and the batch has no `pair_role` field: use "
            "PreferenceDataModule (or give each row pair_role 0 for chosen, 1 for rejected)."
        )
    chosen, rejected = (role == 0).nonzero().squeeze(1), (role == 1).nonzero().squeeze(1)
    if chosen.numel() != rejected.numel() or chosen.numel() + rejected.numel() != role.numel():
        raise UserError(
            f"a preference batch needs as many chosen as rejected rows, and pair_role has {chosen.numel()} chosen "
            f"and {rejected.numel()} rejected (values must be 0 or 1): keep each pair's two rows in the same batch."
        )
    return chosen, rejected


class ReferencePolicy:
    """The model as it was when the fit began, frozen: the reference of the preference and policy-gradient objectives.

    ``adapter`` (a peft backbone): the same model with its adapter disabled, so no second copy is held. ``copy``: a
    deep copy taken by :meth:`snapshot`, held outside the module tree (not trained, not in ``state_dict``, not moved
    by Lightning; moved to the batch's device when first used). The mixins snapshot in ``setup("fit")``, before a
    checkpoint is restored, so a resumed run has the same reference as an uninterrupted one.
    """

    def __init__(self, mode: Literal["copy", "adapter"]) -> None:
        self.mode = mode
        self.model: nn.Module | None = None

    @staticmethod
    def resolve(reference: Reference, backbone: nn.Module) -> Literal["copy", "adapter"]:
        """``auto`` -> ``adapter`` on a peft backbone, else ``copy``; refuses ``adapter`` without an adapter."""
        peft = is_peft_model(backbone)
        if reference not in ("auto", "copy", "adapter"):
            raise ValueError(f"reference={reference!r} is not supported: use 'auto', 'copy' or 'adapter'.")
        if reference == "adapter" and not peft:
            raise UserError(
                "reference='adapter' disables the LoRA adapter to get the reference, and the backbone has no adapter: "
                "give the module a peft config, or use reference: copy."
            )
        return "adapter" if reference == "adapter" or (reference == "auto" and peft) else "copy"

    def snapshot(self, backbone: nn.Module) -> None:
        """Take the frozen copy now (``copy`` mode; a no-op for ``adapter`` or once taken)."""
        if self.mode != "copy" or self.model is not None:
            return
        frozen = copy.deepcopy(backbone).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        self.model = frozen

    def aligned_logits(self, host: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's ``(logits, targets)`` through the host's own ``aligned_logits`` (without gradient)."""
        with torch.no_grad():
            if self.mode == "adapter":
                with host.backbone.disable_adapter():
                    logits, targets, _ = host.aligned_logits(batch)
                return logits, targets
            self.snapshot(host.backbone)
            assert self.model is not None
            device = batch["input_ids"].device
            if next(self.model.parameters()).device != device:
                self.model.to(device)
            policy = host.backbone
            try:  # the host's aligned_logits runs host.backbone: point it at the reference for this call
                host.backbone = self.model
                logits, targets, _ = host.aligned_logits(batch)
            finally:
                host.backbone = policy
            return logits, targets


class PreferenceLossMixin(MixinBase):
    """The DPO-family preference loss against a frozen reference (see the module docstring).

    Mix into :class:`~lightning_ft.modules.CausalLMModule` (ready made as
    :class:`~lightning_ft.objectives.PreferenceCausalLM`) and train on
    :class:`~lightning_ft.data.PreferenceDataModule` pairs. The reference is the model as it was when the fit began:

    * ``adapter`` (LoRA/peft backbones, quantized included): the same model with the adapter disabled, so no second
      copy is held in memory;
    * ``copy``: a frozen deep copy taken in ``setup("fit")``, before a checkpoint is restored, so a resumed run has
      the same reference as an uninterrupted one;
    * ``auto`` (default): ``adapter`` on a peft backbone, else ``copy``.

    Validation on preference pairs logs ``val/target_acc`` (share of pairs with margin ``z > 0``, TRL's "reward
    accuracy"; 0 before training, where ``z = 0``) and ``val/target_loss`` (the mean preference loss); control text
    is evaluated as by the host. ``train/pref_margin`` and ``train/pref_acc`` log the training pairs' margins. Paper
    defaults: ``beta=0.1``, sigmoid loss. Paper: https://arxiv.org/abs/2305.18290

    Args:
        beta: ``beta``, the strength of the implicit KL constraint to the reference.
        loss_type: ``sigmoid`` (DPO) or ``hinge`` (SLiC).
        label_smoothing: ``epsilon`` of the conservative DPO loss (sigmoid only), in ``[0, 0.5)``.
        reference: ``auto``, ``copy`` or ``adapter`` (see above).
        **kwargs: Arguments of the LightningModule it is mixed into.
    """

    backbone: nn.Module
    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "quantized", "lora", "mixed"}),
        {
            "fsdp2": "{name} keeps its reference model unsharded beside the policy, and {strategy} shards the policy "
            "only: use strategy='ddp', or a LoRA backbone under DDP to keep one copy of the weights.",
        },
        "A quantized backbone needs LoRA: its reference is the adapter-disabled model.",
    )

    def __init__(
        self,
        *,
        beta: float = 0.1,
        loss_type: LossType = "sigmoid",
        label_smoothing: float = 0.0,
        reference: Reference = "auto",
        **kwargs: Any,
    ) -> None:
        if not beta > 0 or not math.isfinite(beta):
            raise ValueError(f"beta={beta} must be a positive number (DPO and SPIN use 0.1).")
        if loss_type not in ("sigmoid", "hinge"):
            raise ValueError(f"loss_type={loss_type!r} is not supported: use 'sigmoid' (DPO) or 'hinge' (SLiC).")
        if not 0 <= label_smoothing < 0.5 or (label_smoothing and loss_type != "sigmoid"):
            raise ValueError(
                f"label_smoothing={label_smoothing} must be in [0, 0.5) and is defined for loss_type='sigmoid' only: "
                "use 0 for the plain loss."
            )
        super().__init__(**kwargs)
        require_host(self, PreferenceLossMixin, ("backbone", "aligned_logits", "eval_update"))
        self.preference_beta = beta
        self.preference_loss_type: LossType = loss_type
        self.preference_label_smoothing = label_smoothing
        self.reference_policy = ReferencePolicy(ReferencePolicy.resolve(reference, self.backbone))

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            check_fit_support(self, self.trainer, self.backbone)
            self.snapshot_reference()

    @property
    def preference_reference(self) -> Literal["copy", "adapter"]:
        """How the reference is taken: ``copy`` or ``adapter``."""
        return self.reference_policy.mode

    def snapshot_reference(self) -> None:
        """Take the frozen reference copy now (``reference='copy'``; a no-op for ``adapter`` or once taken)."""
        self.reference_policy.snapshot(self.backbone)

    def _reference_logprobs(self, batch: dict[str, Any]) -> torch.Tensor:
        return sequence_logprobs(*self.reference_policy.aligned_logits(self, batch))

    def preference_terms(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair losses and margins ``z`` of a preference batch (both ``[P]``)."""
        chosen, rejected = pair_halves(batch)
        logits, targets, _ = cast(ModuleHost, self).aligned_logits(batch)
        policy = sequence_logprobs(logits, targets)
        reference = self._reference_logprobs(batch)
        return preference_loss(
            policy[chosen], policy[rejected], reference[chosen], reference[rejected], self.preference_beta,
            self.preference_loss_type, self.preference_label_smoothing,
        )  # fmt: skip

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The mean preference loss over the batch's pairs."""
        losses, margins = self.preference_terms(batch)
        pairs = margins.numel()
        log_train(self, "train/pref_margin", margins.detach().mean(), pairs)
        log_train(self, "train/pref_acc", (margins.detach() > 0).float().mean(), pairs)
        return losses.mean()

    def eval_update(self, batch: dict[str, Any]) -> None:
        """Preference batches: reward accuracy and loss; control (and any other) batches: the host's metrics."""
        if "pair_role" not in batch:
            cast(ModuleHost, super()).eval_update(batch)
            return
        losses, margins = self.preference_terms(batch)
        metrics = getattr(self, "metrics", None)
        if metrics is None or not hasattr(metrics, "update_pairs"):
            raise TypeError(
                f"PreferenceLossMixin evaluates pairs into the host's `metrics.update_pairs`, which "
                f"{type(self).__name__} lacks: mix it into CausalLMModule, or evaluate pairs yourself."
            )
        metrics.update_pairs(margins > 0, losses)
