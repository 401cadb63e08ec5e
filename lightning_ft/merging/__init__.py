"""Post-hoc weight operations on task vectors: soups, linear, task arithmetic, TIES, Model Breadcrumbs, DARE,
ComPEFT, LiNeS.

The pure per-tensor functions live in :mod:`~lightning_ft.merging.ops` (the merge methods compute what mergekit
0.1.5 computes), the method registry in :mod:`~lightning_ft.merging.registry`, the streaming engine in
:mod:`~lightning_ft.merging.engine` and ComPEFT artifacts in :mod:`~lightning_ft.merging.compeft` (which registers
the format with :func:`lightning_ft.core.weights.register_format`). Readers of every ingredient format live in
:mod:`lightning_ft.core.weights` (re-exported by :mod:`~lightning_ft.merging.sources` for old imports). The
``lightning-ft merge|compress|decompress`` commands (which also run mergekit recipes) are in
:mod:`~lightning_ft.merging.cli`.
"""

from lightning_ft.core.weights import open_source
from lightning_ft.merging.compeft import CompressReport, compress, open_artifact
from lightning_ft.merging.engine import (
    MergePlan,
    MergeResult,
    check_compatible,
    merge,
    merge_to_folder,
    parse_dtype,
    save_hf_folder,
)
from lightning_ft.merging.ops import (
    agreement,
    bernoulli_mask,
    breadcrumbs,
    breadcrumbs_mask,
    combine,
    dare,
    elect_sign,
    l1_rescale,
    linear,
    lines_alpha_from_norms,
    lines_factor,
    lines_scale,
    magnitude_mask,
    sparsify,
    task_arithmetic,
    task_arithmetic_family,
    ternarize,
    ties,
    uniform_soup,
)
from lightning_ft.merging.registry import MERGE_METHODS, MergeMethod, ResolvedParams, get_method, register

__all__ = [
    "MERGE_METHODS",
    "CompressReport",
    "MergeMethod",
    "MergePlan",
    "MergeResult",
    "ResolvedParams",
    "agreement",
    "bernoulli_mask",
    "breadcrumbs",
    "breadcrumbs_mask",
    "check_compatible",
    "combine",
    "compress",
    "dare",
    "elect_sign",
    "get_method",
    "l1_rescale",
    "linear",
    "lines_alpha_from_norms",
    "lines_factor",
    "lines_scale",
    "magnitude_mask",
    "merge",
    "merge_to_folder",
    "open_artifact",
    "open_source",
    "parse_dtype",
    "register",
    "save_hf_folder",
    "sparsify",
    "task_arithmetic",
    "task_arithmetic_family",
    "ternarize",
    "ties",
    "uniform_soup",
]
