"""Where task vectors come from: moved to :mod:`lightning_ft.core.weights`, re-exported here for old imports.

The readers and sources (HF folders, Lightning checkpoints, peft LoRA adapters) and :func:`open_source` live in
:mod:`lightning_ft.core.weights`; ComPEFT artifacts register their format from
:mod:`lightning_ft.merging.compeft`, sparse fine-tuning artifacts from :mod:`lightning_ft.sparse.artifact`.
"""

from lightning_ft.core.weights import (
    CheckpointSource,
    HFSource,
    LoRASource,
    SafetensorsReader,
    TensorSource,
    open_source,
    resolve_path,
)

__all__ = [
    "CheckpointSource",
    "HFSource",
    "LoRASource",
    "SafetensorsReader",
    "TensorSource",
    "open_source",
    "resolve_path",
]
