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

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from typing_extensions import override

from lightning_ft.core.io import write_text_atomic
from lightning_ft.core.layer_map import ParamInfo, find_transformer, plain_name
from lightning_ft.core.snapshot import PretrainedSnapshot
from lightning_ft.core.support import MethodSupport, check_support, sharded_refusal
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


class IntruderDimensions(L.Callback):
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
        if every_n_validations < 0:
            raise ValueError(f"every_n_validations={every_n_validations} must be 0 (fit end only) or more.")
        self.top_k, self.epsilon, self.every_n_validations = top_k, float(epsilon), every_n_validations
        self.filename, self.module = filename, module
        self.history: list[dict[str, Any]] = []
        self._validations = 0
        self._model: nn.Module | None = None
        self._snapshot: PretrainedSnapshot | None = None

    @property
    @override
    def state_key(self) -> str:
        return f"IntruderDimensions[top_k={self.top_k}, epsilon={self.epsilon}]"

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._model = find_transformer(pl_module, self.module)
        check_support(self, trainer, self._model)
        self._snapshot = PretrainedSnapshot.of(self._model)
        if not any(info.is_matrix for info in self._snapshot.layer_map):
            raise ValueError(
                "IntruderDimensions found no attention or MLP matrices in transformer blocks: pass `module=` the path "
                "to a transformers model."
            )

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

    def _record(self, trainer: L.Trainer) -> None:
        if trainer.global_rank != 0 or (self.history and self.history[-1]["step"] == trainer.global_step):
            return
        counts = self.counts()
        self.history.append({"step": trainer.global_step, "counts": counts})
        metrics: dict[str, float] = {"intruders/total": float(sum(counts.values()))}
        blocks = {plain_name(i.name): i.block for i in self._snapshot.layer_map} if self._snapshot else {}
        for name, count in counts.items():
            block = blocks.get(name)
            if block is not None:
                metrics[f"intruders/block_{block:02d}"] = metrics.get(f"intruders/block_{block:02d}", 0.0) + count
            kind = name.removesuffix(".weight").rsplit(".", 1)[-1]
            metrics[f"intruders/{kind}"] = metrics.get(f"intruders/{kind}", 0.0) + count
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not self.every_n_validations:
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            self._record(trainer)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer)
        self._write(trainer)

    @rank_zero_only
    def _write(self, trainer: L.Trainer) -> None:
        if not self.filename or not self.history:
            return
        root = Path(trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        payload = {"top_k": self.top_k, "epsilon": self.epsilon, "history": self.history}
        write_text_atomic(root / f"{self.filename}.json", json.dumps(payload, indent=1))

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

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "validations": self._validations}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self._validations = int(state_dict.get("validations", 0))
