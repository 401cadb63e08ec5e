"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence").

For a weight matrix ``W`` (``[out, in]``, as ``nn.Linear`` stores it) and its pretrained value ``W0``, each of the
top-``k`` left singular vectors ``u_j`` of ``W`` is compared with every left singular vector ``u0_i`` of ``W0``:
``s_j = max_i |u_j . u0_i|``. A singular vector with ``s_j < epsilon`` is an *intruder dimension*: a new, high-ranking
direction unlike any of the pretrained ones (paper and peft defaults: ``k = 10``, ``epsilon = 0.5``). The paper finds
them in LoRA fine-tunes and hardly in full fine-tunes, and links them to forgetting.

:class:`IntruderDimensions` is the monitoring callback: every ``every_n_validations`` validations and at the end of
``fit`` it counts intruders in every attention and MLP matrix of the blocks (the merged LoRA weight
``W0 + sum of active adapters' B A`` on a LoRA backbone, the trained weight under full fine-tuning; GPT-2's Conv1D
weights are transposed to ``[out, in]``), logs the total, the counts per block and per module name through every
logger (``intruders/total``, ``intruders/block_03``, ``intruders/q_proj``), keeps the history (``history``, restored
on resume) and writes ``intruders.json`` into the run folder at the end of ``fit``. It costs nothing on the steps
where it does not run; when it runs it computes two SVDs per matrix, in fp32, on global rank 0 only.

The post-hoc mitigation on LoRA outputs is ``lightning-ft mitigate-intruders`` (:mod:`lightning_ft.monitors.mitigate`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn
from typing_extensions import override

from lightning_ft.core.layer_map import LayerMap, ParamInfo, plain_name
from lightning_ft.core.snapshot import PretrainedSnapshot
from lightning_ft.core.support import MethodSupport, sharded_refusal
from lightning_ft.monitors.base import MonitorCallback
from lightning_ft.monitors.panels import Panel

__all__ = ["IntruderDimensions", "effective_matrices", "intruder_similarities"]


def intruder_similarities(base: torch.Tensor, current: torch.Tensor, top_k: int = 10) -> torch.Tensor:
    """``s_j = max_i |u_j . u0_i|`` for the top-``top_k`` left singular vectors ``u_j`` of ``current`` against all
    left singular vectors ``u0_i`` of ``base`` (both ``[out, in]``; fp32 SVDs)."""
    if base.shape != current.shape or base.ndim != 2:
        raise ValueError(f"intruder_similarities needs two matrices of one shape, got {tuple(base.shape)} and "
                         f"{tuple(current.shape)}.")  # fmt: skip
    u0 = torch.linalg.svd(base.detach().float(), full_matrices=False).U
    u = torch.linalg.svd(current.detach().float(), full_matrices=False).U[:, :top_k]
    return (u.T @ u0).abs().amax(dim=1)


def _owner(model: nn.Module, info: ParamInfo) -> nn.Module:
    """The module that holds the weight (a peft LoRA layer, not its ``base_layer``)."""
    path = info.name.rsplit(".", 1)[0]
    return model.get_submodule(path.removesuffix(".base_layer"))


def effective_matrices(model: nn.Module, snapshot: PretrainedSnapshot) -> Iterator[tuple[ParamInfo, torch.Tensor]]:
    """Each block matrix of ``model`` with its current effective weight ``[out, in]``: the weight plus the active,
    unmerged LoRA updates of its layer."""
    for info in snapshot.layer_map:
        if not info.is_matrix:
            continue
        owner = _owner(model, info)
        weight = model.get_parameter(info.name).detach().float()
        adapters = getattr(owner, "active_adapters", None) if hasattr(owner, "lora_A") else None
        if adapters and not getattr(owner, "merged", False):
            for name in adapters:
                if name in owner.lora_A:
                    weight = weight + owner.get_delta_weight(name).detach().float()
        yield info, _as_out_in(owner, weight)


def _as_out_in(owner: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    base = owner.get_base_layer() if hasattr(owner, "get_base_layer") else owner
    return weight.T if type(base).__name__ == "Conv1D" else weight


class IntruderDimensions(MonitorCallback):
    """Counts intruder dimensions of every block matrix during and after fine-tuning (see the module docstring).

    Args:
        top_k: singular vectors of the current weight checked per matrix (paper: 10).
        epsilon: a singular vector whose best cosine similarity with the pretrained ones is below this is an
            intruder (paper: 0.5).
        every_n_validations: count after every n-th validation run (0: only at the end of ``fit``).
        filename: the JSON written into ``trainer.default_root_dir`` at the end of ``fit`` (``None``: none).
        module: attribute path of the transformers model inside the LightningModule (default: found).

    Example::

        trainer = L.Trainer(callbacks=[IntruderDimensions(top_k=10, epsilon=0.5, every_n_validations=1)])
    """

    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "lora", "mixed"}),
        {
            "fsdp2": sharded_refusal("needs each whole matrix for its SVD"),
            "quantized": "{name} takes SVDs of the floating-point weights, which a quantized backbone ({model}) does "
            "not hold: monitor the run in bf16/fp32, or merge and dequantize the adapter first.",
        },
        notes="A monitor: it changes no weight; the SVDs run on global rank 0 only.",
    )
    prefix: ClassVar[str] = "intruders"

    def __init__(
        self,
        top_k: int = 10,
        epsilon: float = 0.5,
        every_n_validations: int = 1,
        filename: str | None = "intruders",
        module: str | None = None,
    ) -> None:
        if top_k < 1:
            raise ValueError(f"top_k={top_k} must be at least 1 (the paper checks the top 10 singular vectors).")
        if not 0 < epsilon <= 1:
            raise ValueError(f"epsilon={epsilon} must be in (0, 1]: it bounds a cosine similarity (paper: 0.5).")
        super().__init__(every_n_validations, False, filename, module)
        self.top_k, self.epsilon = top_k, float(epsilon)
        self._snapshot: PretrainedSnapshot | None = None

    @property
    @override
    def state_key(self) -> str:
        return f"IntruderDimensions[top_k={self.top_k}, epsilon={self.epsilon}]"

    @override
    def check_model(self, model: nn.Module) -> None:
        if not any(info.is_matrix for info in LayerMap.from_model(model)):
            raise ValueError(
                "IntruderDimensions found no attention or MLP matrices in transformer blocks: pass `module=` the path "
                "to a transformers model."
            )

    @override
    def prepare(self, trainer: L.Trainer, pl_module: L.LightningModule, model: nn.Module) -> None:
        self._snapshot = PretrainedSnapshot.of(model)

    def similarities(self) -> dict[str, torch.Tensor]:
        """``s_j`` of the top-k singular vectors of every matrix (plain parameter name) of the model as it is now."""
        assert self._model is not None and self._snapshot is not None, "call setup('fit') first"
        out: dict[str, torch.Tensor] = {}
        for info, current in effective_matrices(self._model, self._snapshot):
            owner = _owner(self._model, info)
            base = _as_out_in(owner, self._snapshot.get(info.name, dtype=torch.float32))
            out[plain_name(info.name)] = intruder_similarities(base, current.cpu(), self.top_k)
        return out

    def counts(self) -> dict[str, int]:
        """Intruders per matrix (plain parameter name) of the model as it is now."""
        return {name: int((sims < self.epsilon).sum()) for name, sims in self.similarities().items()}

    @override
    def measure(self) -> dict[str, Any]:
        """``{"counts": intruders per matrix}`` of the model as it is now."""
        return {"counts": self.counts()}

    @override
    def metrics(self, entry: dict[str, Any]) -> dict[str, float]:
        """The total, and the counts summed per block (``block_03``) and per module name (``q_proj``)."""
        counts: dict[str, int] = entry["counts"]
        out: dict[str, float] = {"total": float(sum(counts.values()))}
        blocks = {plain_name(i.name): i.block for i in self._snapshot.layer_map} if self._snapshot else {}
        for name, count in counts.items():
            block = blocks.get(name)
            if block is not None:
                out[f"block_{block:02d}"] = out.get(f"block_{block:02d}", 0.0) + count
            kind = name.removesuffix(".weight").rsplit(".", 1)[-1]
            out[kind] = out.get(kind, 0.0) + count
        return out

    @override
    def settings(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "epsilon": self.epsilon}

    def dashboard_panels(self) -> list[Panel]:
        """Intruders per block and module at the last count, and the total over steps."""
        if not self.history or self._snapshot is None:
            return []
        blocks = {plain_name(i.name): i.block for i in self._snapshot.layer_map}
        counts = self.history[-1]["counts"]
        kinds = sorted({n.removesuffix(".weight").rsplit(".", 1)[-1] for n in counts})
        numbers = sorted({b for n in counts if (b := blocks.get(n)) is not None})
        grid = {(blocks.get(n), n.removesuffix(".weight").rsplit(".", 1)[-1]): c for n, c in counts.items()}
        heat = [[grid.get((b, k), 0) for k in kinds] for b in numbers]
        total = [[h["step"], sum(h["counts"].values())] for h in self.history]
        note = f"top_k={self.top_k}, epsilon={self.epsilon}: singular vectors unlike every pretrained one."
        return [
            Panel("intruders/per_block", f"Intruder dimensions per block and matrix (step {self.history[-1]['step']})",
                  "heatmap", kinds, heat, rows=[f"{b:02d}" for b in numbers], x_label="matrix", y_label="block", note=note),
            Panel("intruders/total", "Intruder dimensions over steps", "lines", ["step", "intruders"], total, note=note),
        ]  # fmt: skip
