"""Writing weights: a state dict as an HF-loadable model folder, through the one atomic writer."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from lightning_ft.core.io import atomic_dir, check_output
from lightning_ft.core.weights.reader import SINGLE_FILE, resolve_path

__all__ = ["save_hf_folder"]

_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def save_hf_folder(
    state: Mapping[str, torch.Tensor],
    base: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    extra_files: Mapping[str, str] | None = None,
    inputs: Sequence[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> Path:
    """Write ``state`` as ``model.safetensors`` next to the base's config and tokenizer files.

    The folder is written whole or not at all (:func:`lightning_ft.core.io.atomic_dir`): a failed write leaves a
    previous ``output`` byte-identical. An ``output`` that is, holds or sits inside the base or one of ``inputs`` is
    refused, and so is an existing non-empty one unless ``overwrite``.

    Args:
        state: The tensors to save.
        base: The base model (folder or bundled alias) whose config and tokenizer files are copied (weight files
            are not).
        output: The folder to write.
        dtype: The output dtype (when it was set), written into ``config.json``.
        extra_files: More text files to write into the folder (name -> text).
        inputs: The other inputs the output must not touch.
        overwrite: Replace an existing non-empty ``output``.

    Returns:
        The output folder.
    """
    src = resolve_path(base)
    check_output(output, [("base", src), *(("input", p) for p in inputs)], kind="folder", overwrite=overwrite,
                 argument="output", overwrite_flag="overwrite=True")  # fmt: skip
    with atomic_dir(output) as out:
        if src.is_dir():
            for item in src.iterdir():
                if item.is_file() and not item.name.endswith(_WEIGHT_FILES) and not item.name.endswith(".index.json"):
                    shutil.copy2(item, out / item.name)
        if dtype is not None and (out / "config.json").is_file():
            config = json.loads((out / "config.json").read_text())
            name = str(dtype).removeprefix("torch.")
            config.update({"dtype": name}, **({"torch_dtype": name} if "torch_dtype" in config else {}))
            (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tensors = {k: v.contiguous() for k, v in state.items()}
        save_file(tensors, str(out / SINGLE_FILE), metadata={"format": "pt"})
        for name, text in (extra_files or {}).items():
            (out / name).write_text(text)
    return Path(output)
