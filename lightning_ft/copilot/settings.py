"""The Copilot's settings: :class:`~lightning_ft.copilot.CopilotMixin`'s arguments as one typed, checked record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from lightning_ft.copilot.log import ErrorStorage

__all__ = ["LAMBDA_GRID", "CopilotSettings"]

LAMBDA_GRID = (0.1, 0.3, 0.5, 0.8, 1.0)


@dataclass(frozen=True)
class CopilotSettings:
    """The arguments of :class:`~lightning_ft.copilot.CopilotMixin` under their own names (documented there).

    Built once in the mixin's constructor; a value out of range raises one sentence naming the argument.
    ``lambda_grid`` is kept as a tuple of floats. The fusion weight in use is the module's ``copilot_lambda``
    (it changes when ``'auto'`` chooses it); ``copilot_lambda`` here is the argument as given.
    """

    copilot_layers: int = 4
    copilot_init: Literal["pretrained", "random"] = "pretrained"
    copilot_model: str | None = None
    copilot_config: dict[str, Any] | None = None
    copilot_path: str | None = None
    copilot_peft: dict[str, Any] | None = None
    copilot_learning_rate: float = 1e-4
    copilot_weight_decay: float = 0.0
    copilot_warmup_steps: int | None = None
    copilot_lambda: float | Literal["auto"] = 1.0
    lambda_grid: tuple[float, ...] = LAMBDA_GRID
    lambda_metric: Literal["target_acc", "target_loss"] | None = None
    copilot_head: Literal["full", "tied"] = "full"
    copilot_loss: Literal["rmse", "token_rmse"] = "rmse"
    buffer_rounds: int = 128
    buffer_mib: float = 512.0
    error_storage: ErrorStorage = "dense"
    error_topk: int = 256
    checkpoint_buffer: bool = False
    copilot_seed: int = 0
    fused_eval: bool = True
    copilot_output: str | None = None
    zero_init_output: bool = True

    def __post_init__(self) -> None:
        lam, grid = self.copilot_lambda, self.lambda_grid
        checks = [
            (self.copilot_layers >= 2,
             f"copilot_layers={self.copilot_layers} must be at least 2 (one self-, one cross-attention)."),
            (self.copilot_init in ("pretrained", "random"),
             f"copilot_init={self.copilot_init!r} is not an option: use 'pretrained' or 'random'."),
            (self.copilot_learning_rate > 0, f"copilot_learning_rate={self.copilot_learning_rate} must be positive."),
            (lam == "auto" or (isinstance(lam, (int, float)) and lam >= 0),
             f"copilot_lambda={lam!r} must be a number >= 0 or 'auto'."),
            (len(grid) > 0 and all(x >= 0 for x in grid), f"lambda_grid={grid} must list weights >= 0."),
            (self.lambda_metric in (None, "target_acc", "target_loss"),
             f"lambda_metric={self.lambda_metric!r} is not a validation metric lambda can be chosen on: use "
             "'target_acc' or 'target_loss'."),
            (self.copilot_head in ("full", "tied"),
             f"copilot_head={self.copilot_head!r} is not an option: use 'full' or 'tied'."),
            (self.copilot_loss in ("rmse", "token_rmse"),
             f"copilot_loss={self.copilot_loss!r} is not a loss: use 'rmse' or 'token_rmse'."),
            (self.error_storage in ("dense", "topk"),
             f"error_storage={self.error_storage!r} is not an option: use 'dense' or 'topk'."),
            (self.error_topk >= 1, f"error_topk={self.error_topk} must be at least 1."),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        object.__setattr__(self, "lambda_grid", tuple(float(x) for x in grid))

    @property
    def auto_lambda(self) -> bool:
        """Whether the fusion weight is chosen at the end of ``fit`` (``copilot_lambda='auto'``)."""
        return self.copilot_lambda == "auto"

    @property
    def initial_lambda(self) -> float:
        """The fusion weight before any choice: ``copilot_lambda``, or 1 for ``'auto'``."""
        return 1.0 if self.copilot_lambda == "auto" else float(self.copilot_lambda)
