"""Loading transformers backbones: bundled aliases, dtype, bitsandbytes quantization and peft adapters."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lightning_ft.assets import resolve_model
from lightning_ft.core.io import atomic_dir, check_finite
from lightning_ft.core.layer_map import is_peft_model, keep_4bit_trainable

__all__ = [
    "atomic_dir", "build_peft_config", "export_path", "is_peft_model", "load_backbone", "quantization_config",
    "save_pretrained_atomic", "torch_dtype",
]  # fmt: skip

Quantization = Literal["nf4", "fp4", "int8"]
DType = Literal["float32", "bfloat16", "float16"]

_MIN_BNB = (0, 47)


def torch_dtype(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32``; one sentence on a bad name."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype={name!r} is not a torch dtype: use 'float32', 'bfloat16' or 'float16'.")
    return dtype


def quantization_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    """Build a ``BitsAndBytesConfig``; fails in one sentence when bitsandbytes is missing or too old."""
    if quantization not in ("nf4", "fp4", "int8"):
        raise ValueError(f"quantization={quantization!r} is not supported: use 'nf4', 'fp4', 'int8' or null.")
    try:
        import bitsandbytes  # noqa: F401
        from importlib.metadata import version

        found = tuple(int(p) for p in version("bitsandbytes").split(".")[:2])
    except ImportError:
        found = None
    if found is None or found < _MIN_BNB:
        raise ImportError(
            f"quantization={quantization!r} needs bitsandbytes>=0.47 (found {found or 'none'}): "
            "run `pip install 'bitsandbytes>=0.47'` or set quantization to null."
        )
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_compute_dtype=compute_dtype)


def build_peft_config(spec: dict[str, Any], task_type: str) -> Any:
    """Turn a plain mapping (YAML) into a peft config; ``peft_type`` defaults to ``LORA``."""
    from peft import get_peft_config

    spec = dict(spec)
    spec.setdefault("peft_type", "LORA")
    spec.setdefault("task_type", task_type)
    try:
        return get_peft_config(spec)
    except (TypeError, KeyError, ValueError) as err:
        raise ValueError(f"peft={spec!r} is not a valid peft config ({err}): check its field names.") from None


def load_backbone(
    auto_class: Any,
    model: str,
    *,
    dtype: str = "float32",
    quantization: str | None = None,
    peft: dict[str, Any] | None = None,
    task_type: str = "CAUSAL_LM",
    gradient_checkpointing: bool = False,
    **model_kwargs: Any,
) -> tuple[nn.Module, Any]:
    """Load a model and its tokenizer, optionally quantized and/or wrapped by a peft adapter.

    Args:
        auto_class: ``AutoModelForCausalLM`` or ``AutoModelForSequenceClassification``.
        model: bundled alias, local folder or (online) Hub id.
        dtype: parameter dtype of the non-quantized weights.
        quantization: ``nf4``, ``fp4`` or ``int8`` through bitsandbytes; needs ``peft`` to train.
        peft: a peft config as a mapping (``{"peft_type": "LORA", "r": 8, ...}``).
        task_type: peft task type.
        gradient_checkpointing: enable activation checkpointing.
        **model_kwargs: passed to ``from_pretrained`` (e.g. ``num_labels``).
    """
    from transformers import AutoTokenizer

    if quantization is not None and not peft:
        raise ValueError(
            f"quantization={quantization!r} freezes the backbone in 4/8 bit, so nothing would train: "
            "also set peft (e.g. {peft_type: LORA, r: 8}) or set quantization to null."
        )
    path = resolve_model(model, weights=True)
    dt = torch_dtype(dtype)
    kwargs: dict[str, Any] = {"dtype": dt, **model_kwargs}
    if quantization is not None:
        kwargs["quantization_config"] = quantization_config(quantization, dt)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    backbone = auto_class.from_pretrained(path, **kwargs)
    if getattr(backbone.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        backbone.config.pad_token_id = tokenizer.pad_token_id
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        backbone = prepare_model_for_kbit_training(backbone, use_gradient_checkpointing=gradient_checkpointing)
        keep_4bit_trainable(backbone)  # evaluation between training steps must not cut the 4-bit layers' gradients
    elif gradient_checkpointing:
        backbone.gradient_checkpointing_enable()
    if peft:
        from peft import get_peft_model

        backbone = get_peft_model(backbone, build_peft_config(peft, task_type))
    return backbone, tokenizer


def save_pretrained_atomic(
    backbone: nn.Module,
    tokenizer: Any,
    output_dir: str | os.PathLike[str],
    initial_adapter: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save model (or peft adapter) and tokenizer into ``output_dir``, replacing it only once complete.

    Written through :func:`lightning_ft.core.io.atomic_dir`: a failed save leaves the previous folder whole, and
    weights holding NaN or inf (a fit that diverged) are refused before anything is written.

    Args:
        backbone: The model or peft model.
        tokenizer: Saved beside it (``None``: none).
        output_dir: The folder.
        initial_adapter: For a peft model whose adapter initialisation rewrote the base weights (CorDA, PiSSA): the
            adapter's state dict as initialised. The adapter is then saved as the plain LoRA ``[A | A0]``,
            ``[B | -B0]`` (rank ``2r``) that applies the fine-tuning update to the original base model (peft's
            ``path_initial_model_for_weight_conversion``).
    """
    check_finite({n: p.detach() for n, p in backbone.named_parameters()}, f"the model exported to {output_dir}")
    with atomic_dir(output_dir) as tmp:
        if initial_adapter is None:
            backbone.save_pretrained(tmp)
        else:
            from safetensors.torch import save_file

            initial = Path(tmp) / "initial_adapter"  # peft writes the config beside the weights, loads and drops it
            initial.mkdir()
            save_file({k: v.contiguous() for k, v in initial_adapter.items()}, initial / "adapter_model.safetensors")
            backbone.save_pretrained(tmp, path_initial_model_for_weight_conversion=str(initial))
            shutil.rmtree(initial)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(output_dir)


def export_path(value: str | None, trainer: Any, default_name: str) -> Path | None:
    """Where a fit-end export goes: ``value`` as given, ``None`` when it is ``""``, else ``<default_root_dir>/<default_name>``."""
    if value == "":
        return None
    if value:
        return Path(value)
    root = trainer.default_root_dir if trainer is not None else os.getcwd()
    return Path(root) / default_name
