"""LayerwiseSampling's GaLore wiring: which matrices :class:`~lightning_ft.core.galore.GaLoreProjection` projects."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_ft.core.galore import GaLoreProjection
from lightning_ft.core.layer_map import LayerMap
from lightning_ft.core.selection import ParameterSelection

__all__ = ["attach_galore"]


def attach_galore(
    galore: GaLoreProjection,
    selection: ParameterSelection,
    layer_map: LayerMap,
    optimizers: Iterable[torch.optim.Optimizer],
) -> None:
    """Attach GaLore to the optimizers for every candidate attention/MLP matrix of the blocks (before the param
    groups shrink to the first draw); warn when it projects nothing.

    Args:
        galore: The projection.
        selection: The sampling's candidate parameters.
        layer_map: The model's layer map.
        optimizers: The module's optimizers.
    """
    matrices = [
        selection.params[n] for n in selection.candidates if layer_map[n].is_matrix and layer_map[n].block is not None
    ]
    if not galore.attach(optimizers, matrices):
        rank_zero_warn(
            f"galore_rank={galore.rank} projects nothing, since no trainable attention/MLP matrix of the "
            "blocks has a smaller side above it (adapters are never projected): lower galore_rank or drop it."
        )
