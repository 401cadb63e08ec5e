"""Data selection and curation: the ``lightning-ft data`` commands and the services they share.

Shared services: :class:`~lightning_ft.curation.embedder.Embedder` (sentence embeddings with the bundled
all-MiniLM-L6-v2 or mean-pooled hidden states of a causal LM, cached on disk by content hash, resumable) and
:class:`~lightning_ft.curation.generation.GenerationService` (batched greedy or sampled generation and teacher-forced
likelihoods with any bundled alias, HF folder, LoRA adapter folder or in-memory module, cached to JSONL so a rerun
generates nothing twice). :mod:`~lightning_ft.curation.records` reads the input pool and writes the output dataset
and its report. The commands (``lightning-ft data select|curate|rewrite|filter``) are dispatched by
:mod:`~lightning_ft.curation.cli`, one module per method.

The methods' own pieces, for use from Python: GOT-D's :func:`~lightning_ft.curation.ot.calibrated_potentials` and
:func:`~lightning_ft.curation.ot.select_ot`, Diversify and Conquer's :func:`~lightning_ft.curation.kmq.kmeans_labels`
and :func:`~lightning_ft.curation.kmq.allocate_budget`, CLEAR's :class:`~lightning_ft.curation.clear.ConfidenceScorer`,
S3FT's :func:`~lightning_ft.curation.s3ft.choose_targets` and the judges (:class:`ExactMatchJudge`,
:class:`CodeTestJudge`, :class:`ModelJudge`).
"""

from lightning_ft.curation.clear import ConfidenceScorer
from lightning_ft.curation.embedder import Embedder
from lightning_ft.curation.generation import GenerationService, GenerationSettings
from lightning_ft.curation.judges import CodeTestJudge, ExactMatchJudge, ModelJudge
from lightning_ft.curation.kmq import allocate_budget, kmeans_labels
from lightning_ft.curation.ot import calibrated_potentials, select_ot
from lightning_ft.curation.records import read_pool, report_path, write_dataset
from lightning_ft.curation.s3ft import choose_targets

__all__ = [
    "CodeTestJudge",
    "ConfidenceScorer",
    "Embedder",
    "ExactMatchJudge",
    "GenerationService",
    "GenerationSettings",
    "ModelJudge",
    "allocate_budget",
    "calibrated_potentials",
    "choose_targets",
    "kmeans_labels",
    "read_pool",
    "report_path",
    "select_ot",
    "write_dataset",
]
