"""Post-hoc weight operations on task vectors: soups, task arithmetic, TIES, Model Breadcrumbs, ComPEFT, LiNeS.

The pure per-tensor functions live in :mod:`~lightning_ft.merging.ops`, the method registry in
:mod:`~lightning_ft.merging.registry`, the streaming engine in :mod:`~lightning_ft.merging.engine`,
readers of every ingredient format in :mod:`~lightning_ft.merging.sources` and ComPEFT artifacts in
:mod:`~lightning_ft.merging.compeft`. The ``lightning-ft merge|compress|decompress`` commands are in
:mod:`~lightning_ft.merging.cli`.
"""

from lightning_ft.merging.compeft import CompressReport, compress, open_artifact
from lightning_ft.merging.engine import MergePlan, MergeResult, check_compatible, merge, save_hf_folder
from lightning_ft.merging.ops import (
    breadcrumbs,
    breadcrumbs_mask,
    disjoint_mean,
    elect_sign,
    lines_alpha_from_norms,
    lines_factor,
    lines_scale,
    magnitude_mask,
    task_arithmetic,
    ternarize,
    ties,
    uniform_soup,
)
from lightning_ft.merging.registry import MERGE_METHODS, MergeMethod, get_method, register
from lightning_ft.merging.sources import open_source

__all__ = [
    "MERGE_METHODS",
    "CompressReport",
    "MergeMethod",
    "MergePlan",
    "MergeResult",
    "breadcrumbs",
    "breadcrumbs_mask",
    "check_compatible",
    "compress",
    "disjoint_mean",
    "elect_sign",
    "get_method",
    "lines_alpha_from_norms",
    "lines_factor",
    "lines_scale",
    "magnitude_mask",
    "merge",
    "open_artifact",
    "open_source",
    "register",
    "save_hf_folder",
    "task_arithmetic",
    "ternarize",
    "ties",
    "uniform_soup",
]
