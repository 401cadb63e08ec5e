"""Weight I/O below every method: reading safetensors, resolving a model path, the merge-ingredient interface,
the artifact-format registry and the HF-folder writer.

* :mod:`~lightning_ft.core.weights.reader`: :func:`safetensors_index` (the one folder / single file / sharded
  index resolution, also used by :class:`~lightning_ft.core.snapshot.PretrainedSnapshot`),
  :class:`SafetensorsReader` and :func:`resolve_path` (a path or a bundled model alias).
* :mod:`~lightning_ft.core.weights.sources`: :class:`TensorSource` and the built-in sources (HF folder, Lightning
  checkpoint, peft LoRA adapter); :func:`register_format` / :func:`open_source`, the registry of artifact formats.
* :mod:`~lightning_ft.core.weights.writer`: :func:`stream_hf_folder` (an :class:`HFFolderWriter` that writes each
  tensor of a planned layout as it comes, sharded above ``max_shard_size``) and :func:`save_hf_folder`, both
  through :mod:`lightning_ft.core.io`.

Registration: a format module above ``core`` (:mod:`lightning_ft.merging.compeft`,
:mod:`lightning_ft.sparse.artifact`) calls :func:`register_format` at import, and so registers whenever its package
is imported; :func:`open_source` also imports every module of :data:`FORMAT_MODULES` by name before it asks the
registry, so a format is known even when nothing imported its package. ``core`` itself imports nothing above it.
"""

from lightning_ft.core.weights.reader import (
    INDEX_FILE,
    SINGLE_FILE,
    SafetensorsReader,
    read_header,
    resolve_path,
    safetensors_index,
)
from lightning_ft.core.weights.sources import (
    FORMAT_MODULES,
    ArtifactFormat,
    CheckpointSource,
    HFSource,
    LoRASource,
    TensorSource,
    lora_from_folder,
    open_source,
    register_format,
    registered_formats,
)
from lightning_ft.core.weights.writer import (
    DEFAULT_MAX_SHARD_SIZE,
    HFFolderWriter,
    TensorSpec,
    save_hf_folder,
    stream_hf_folder,
)

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "FORMAT_MODULES",
    "INDEX_FILE",
    "SINGLE_FILE",
    "ArtifactFormat",
    "CheckpointSource",
    "HFFolderWriter",
    "HFSource",
    "LoRASource",
    "SafetensorsReader",
    "TensorSource",
    "TensorSpec",
    "lora_from_folder",
    "open_source",
    "read_header",
    "register_format",
    "registered_formats",
    "resolve_path",
    "safetensors_index",
    "save_hf_folder",
    "stream_hf_folder",
]
