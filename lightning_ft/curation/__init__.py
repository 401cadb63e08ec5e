"""Data selection and curation: the ``lightning-ft data`` commands and the services they share.

Shared services: :class:`~lightning_ft.curation.embedder.Embedder` (sentence embeddings with the bundled
all-MiniLM-L6-v2 or mean-pooled hidden states of a causal LM, cached on disk by content hash, resumable) and
:class:`~lightning_ft.curation.generation.GenerationService` (batched greedy or sampled generation and teacher-forced
likelihoods with any bundled alias, HF folder, LoRA adapter folder or in-memory module, cached to JSONL so a rerun
generates nothing twice). :mod:`~lightning_ft.curation.records` reads the input pool and writes the output dataset
and its report. The commands (``lightning-ft data select|curate|rewrite|filter``) are dispatched by
:mod:`~lightning_ft.curation.cli`, one module per method.
"""

from lightning_ft.curation.embedder import Embedder
from lightning_ft.curation.generation import GenerationService, GenerationSettings
from lightning_ft.curation.records import read_pool, report_path, write_dataset

__all__ = ["Embedder", "GenerationService", "GenerationSettings", "read_pool", "report_path", "write_dataset"]
