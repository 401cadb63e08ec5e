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

Training-data constructions that need a model or the embedder (DataModules usable from YAML):
:class:`~lightning_ft.curation.kaft.KnowledgeAwareDataModule` (KAFT's relevant / counterfactual / irrelevant
contexts), :class:`~lightning_ft.curation.rag.RetrievalAugmentedDataModule` (RAG fine-tuning with hard negatives and
retrieval reordering, :func:`~lightning_ft.curation.rag.reorder`) and
:class:`~lightning_ft.curation.faft.FeedbackAwareDataModule` (FAFT's verbalised checker feedback). SPIN's iterations
are :mod:`~lightning_ft.curation.spin` (``lightning-ft spin``).
"""

from lightning_ft.curation.clear import ConfidenceScorer
from lightning_ft.curation.embedder import Embedder
from lightning_ft.curation.faft import FeedbackAwareDataModule, FeedbackAwareTargets
from lightning_ft.curation.generation import GenerationService, GenerationSettings
from lightning_ft.curation.judges import CodeTestJudge, ExactMatchJudge, ModelJudge
from lightning_ft.curation.kaft import KnowledgeAwareContexts, KnowledgeAwareDataModule
from lightning_ft.curation.kmq import allocate_budget, kmeans_labels
from lightning_ft.curation.ot import calibrated_potentials, select_ot
from lightning_ft.curation.rag import RetrievalAugmentedDataModule, reorder
from lightning_ft.curation.records import read_pool, report_path, write_dataset
from lightning_ft.curation.s3ft import choose_targets

__all__ = [
    "CodeTestJudge",
    "ConfidenceScorer",
    "Embedder",
    "ExactMatchJudge",
    "FeedbackAwareDataModule",
    "FeedbackAwareTargets",
    "GenerationService",
    "GenerationSettings",
    "KnowledgeAwareContexts",
    "KnowledgeAwareDataModule",
    "ModelJudge",
    "RetrievalAugmentedDataModule",
    "allocate_budget",
    "calibrated_potentials",
    "choose_targets",
    "kmeans_labels",
    "read_pool",
    "reorder",
    "report_path",
    "select_ot",
    "write_dataset",
]
