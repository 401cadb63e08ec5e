"""The Copilot's state beside the Pilot: its fusion weight, its export folder and its part of Lightning checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_ft.copilot.decoder import CopilotConfig, CopilotDecoder
from lightning_ft.copilot.log import MistakeLog
from lightning_ft.copilot.settings import CopilotSettings
from lightning_ft.core.host import MixinBase
from lightning_ft.core.io import atomic_dir
from lightning_ft.modules.backbone import export_path
from lightning_ft.modules.metrics import EvalMetrics

__all__ = ["CopilotStorage"]

_FORMAT = 1


class CopilotStorage(MixinBase):
    """The state :class:`~lightning_ft.copilot.CopilotMixin` keeps (declared here for every part of it), the fusion
    weight ``copilot_lambda``, the Copilot's export folder and its entry ``checkpoint["copilot"]``."""

    backbone: nn.Module
    copilot: CopilotDecoder
    copilot_settings: CopilotSettings
    copilot_lambda_value: torch.Tensor
    lambda_sweep: list[dict[str, float]]
    mistake_log: MistakeLog
    fused_metrics: EvalMetrics
    error_fit: Any  # evaluation.ErrorFit (defined above this module)
    _round_store: dict[str, Any] | None

    @property
    def copilot_lambda(self) -> float:
        """The fusion weight ``lambda`` in use (a buffer: it travels with the state dict, e.g. out of DDP spawn)."""
        return float(self.copilot_lambda_value)

    @copilot_lambda.setter
    def copilot_lambda(self, value: float) -> None:
        self.copilot_lambda_value.fill_(float(value))

    def save_copilot(self, path: str | Path) -> Path:
        """Write the Copilot (weights, shape and ``copilot_lambda``) to a folder that ``copilot_path`` loads."""
        from safetensors.torch import save_file

        with atomic_dir(path) as tmp:
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.copilot.state_dict().items()}
            save_file(tensors, str(tmp / "copilot.safetensors"))
            meta = {"format": _FORMAT, "config": vars(self.copilot.cfg), "lambda": self.copilot_lambda,
                    "lambda_sweep": self.lambda_sweep}  # fmt: skip
            (tmp / "copilot.json").write_text(json.dumps(meta, indent=2))
        return Path(path)

    def load_copilot(self, path: str | Path) -> None:
        """Load a Copilot written by :meth:`save_copilot`; a Copilot of another shape fails with one sentence."""
        from safetensors.torch import load_file

        folder = Path(path)
        if not (folder / "copilot.json").is_file():
            raise ValueError(
                f"copilot_path={str(path)!r} holds no copilot.json: give a folder written by a Copilot fit."
            )
        meta = json.loads((folder / "copilot.json").read_text())
        cfg = CopilotConfig(**meta["config"])
        mine = self.copilot.cfg
        if (cfg.vocab_size, cfg.pilot_hidden_size) != (mine.vocab_size, mine.pilot_hidden_size):
            raise ValueError(
                f"copilot_path={str(path)!r} was trained for vocabulary {cfg.vocab_size} and width "
                f"{cfg.pilot_hidden_size}, this Pilot has {mine.vocab_size} and {mine.pilot_hidden_size}: pair it with "
                "a Pilot of the same family."
            )
        dtype = self.copilot.dtype
        decoder = CopilotDecoder(cfg)
        decoder.load_state_dict(load_file(str(folder / "copilot.safetensors")), strict=True)
        self.copilot = decoder.to(dtype)
        self.copilot_lambda = float(meta.get("lambda", self.copilot_lambda))

    def copilot_output_path(self) -> Path | None:
        """Where ``on_fit_end`` writes the Copilot, or ``None`` when disabled."""
        return export_path(self.copilot_settings.copilot_output, self._trainer, "copilot")

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state: dict[str, Any] = {"lambda": self.copilot_lambda, "lambda_sweep": self.lambda_sweep}
        if self.copilot_settings.checkpoint_buffer:  # every process's own log (DDP and FSDP2 write rank 0's dict)
            state["logs"] = _gathered(self.mistake_log.state_dict())
        checkpoint["copilot"] = state

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("copilot", {})
        self.copilot_lambda = float(state.get("lambda", self.copilot_lambda))
        self.lambda_sweep = list(state.get("lambda_sweep", []))
        logs = state.get("logs", [state["log"]] if "log" in state else None)
        if logs:  # process r resumes with log r (with another process count, with logs r, r + N, ... in order)
            rank, world = _rank_and_world()
            self.mistake_log.load_state_dict({"rounds": [r for log in logs[rank::world] for r in log["rounds"]]})


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gathered(state: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Every process's ``state`` in rank order on rank 0 (``None`` on the others); a collective under DDP/FSDP2."""
    rank, world = _rank_and_world()
    if world == 1:
        return [state]
    out: list[Any] | None = [None] * world if rank == 0 else None
    torch.distributed.gather_object(state, out, dst=0)
    return out
