"""What every method shares: the layer map and the pretrained snapshot (theta_0)."""

from lightning_ft.core.layer_map import KIND_GROUPS, LayerMap, ParamInfo, ParamKind, find_transformer
from lightning_ft.core.snapshot import PretrainedSnapshot

__all__ = ["KIND_GROUPS", "LayerMap", "ParamInfo", "ParamKind", "PretrainedSnapshot", "find_transformer"]
