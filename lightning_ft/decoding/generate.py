"""Generating with Dynamic Logits Fusion: :func:`fuse_generate` for prompts in Python, and
:class:`LogitsFusionMixin`, which makes a causal-LM module's ``generate`` (and so ``predict``) fuse its backbone, the
large model, with small experts."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import LogitsProcessorList

from lightning_ft.core.host import require_host
from lightning_ft.core.support import MethodSupport
from lightning_ft.decoding.logits_fusion import (
    DynamicLogitsFusion,
    Search,
    _fixed_alphas,
    check_alpha_grid,
    check_same_vocabulary,
)
from lightning_ft.errors import UserError

__all__ = ["LogitsFusionMixin", "fuse_generate", "load_causal_lm"]

ModelSource = str | os.PathLike[str] | nn.Module


def load_causal_lm(
    source: ModelSource, *, device: str | torch.device | None = None, dtype: str = "float32"
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` in eval mode from a bundled alias, an HF folder, a peft adapter folder (its base is
    loaded from ``base_model_name_or_path``) or an in-memory module (a module with ``backbone`` and ``tokenizer``
    attributes gives both; a plain transformers model gives ``None`` as its tokenizer)."""
    if isinstance(source, nn.Module):
        backbone = getattr(source, "backbone", None)
        return (backbone if isinstance(backbone, nn.Module) else source), getattr(source, "tokenizer", None)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_ft.assets import adapter_base, resolve_model

    path = Path(resolve_model(source, weights=True))
    adapter = (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()
    base = Path(resolve_model(adapter_base(path), weights=True)) if adapter else path
    dtype_value = getattr(torch, dtype, None)
    if not isinstance(dtype_value, torch.dtype):
        raise UserError(f"dtype={dtype!r} is not a torch dtype: use 'float32', 'bfloat16' or 'float16'.")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype_value)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path)
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(path if has_tokenizer else base)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer



def _load_small(
    small_base: ModelSource, experts: Sequence[ModelSource], reference: tuple[str, Any], device: torch.device,
    dtype: str, prefix: str = "",
) -> tuple[nn.Module, list[nn.Module]]:  # fmt: skip
    """Load the small base and experts next to the large model and check their tokenizers against its one (the
    sentences name the arguments ``<prefix>small_base`` and ``<prefix>experts[i]``)."""
    if not experts:
        raise UserError(f"{prefix}experts is empty: give at least one small expert fine-tuned from the small base "
                        "model.")  # fmt: skip
    named = [(f"{prefix}small_base", small_base), *((f"{prefix}experts[{i}]", e) for i, e in enumerate(experts))]
    loaded = [(name, *load_causal_lm(src, device=device, dtype=dtype)) for name, src in named]
    check_same_vocabulary([reference, *((name, tok) for name, _, tok in loaded if tok is not None)])
    models = [model for _, model, _ in loaded]
    return models[0], models[1:]


@torch.no_grad()
def fuse_generate(
    large: ModelSource,
    small_base: ModelSource,
    experts: Sequence[ModelSource],
    prompts: Sequence[str],
    *,
    tokenizer: Any = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    alpha: float | Sequence[float] | None = None,
    alpha_grid: Sequence[float] | None = None,
    search: Search = "one_expert",
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "float32",
) -> list[str]:
    """Complete ``prompts`` with the large model fused with small experts (Dynamic Logits Fusion).

    Each model is a bundled alias, an HF folder, a peft adapter folder or an in-memory module (see
    :func:`load_causal_lm`); every tokenizer known must equal the large model's. Prompts are left-padded in batches.

    Args:
        large: The large base model ``L`` (not fine-tuned).
        small_base: The small base model ``s``.
        experts: The small experts fine-tuned from ``s`` (one or more).
        prompts: The prompts, as text.
        tokenizer: The large model's tokenizer (an object or an alias/folder); default: the one loaded with it.
        max_new_tokens: Tokens generated at most per prompt.
        do_sample: Sample with ``temperature`` and ``top_p`` (seeded by ``seed``) instead of greedy decoding.
        temperature: Divides the fused logits before sampling.
        top_p: Nucleus sampling over the fused distribution.
        seed: The sampling seed.
        alpha: ``None`` chooses the weights per step by KL matching; a number, or one per expert, fixes them
            (``1.0``: static proxy tuning).
        alpha_grid: The weights searched; default the paper's ``0, 0.1, ..., 2``.
        search: ``one_expert`` (one expert acts per step, the paper's multi-expert search) or ``joint``.
        batch_size: Prompts per ``generate`` call.
        device: Where the models loaded here run; default ``cuda`` when available, else ``cpu``.
        dtype: The dtype of the models loaded here.

    Returns:
        The completions (the decoded new tokens), in the order of ``prompts``.

    Example::

        from lightning_ft.decoding import fuse_generate

        fuse_generate("Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-0.5B", ["runs/gsm8k_lora/hf_model"],
                      ["Question: 12 + 30 = ?\\nAnswer:"], max_new_tokens=16)
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise UserError(f"fuse_generate needs batch_size >= 1 and max_new_tokens >= 1 (got {batch_size} and "
                        f"{max_new_tokens}).")  # fmt: skip
    model, own_tokenizer = load_causal_lm(large, device=device, dtype=dtype)
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        from lightning_ft.assets import resolve_model

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(tokenizer))
    tokenizer = tokenizer if tokenizer is not None else own_tokenizer
    if tokenizer is None:
        raise UserError("fuse_generate(large=<module>) needs the large model's tokenizer: pass tokenizer=<the "
                        "tokenizer, an alias or a folder>.")  # fmt: skip
    small, expert_models = _load_small(small_base, experts, ("large", tokenizer), _device(model), dtype)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": pad}
    if do_sample:
        options.update(temperature=temperature, top_p=top_p, top_k=None)
        torch.manual_seed(seed)
    out: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            ids, mask = _left_padded(tokenizer, prompts[start : start + batch_size], pad, _device(model))
            with DynamicLogitsFusion(small, expert_models, alpha=alpha, alpha_grid=alpha_grid, search=search,
                                     attention_mask=mask) as fusion:  # fmt: skip
                generated = model.generate(input_ids=ids, attention_mask=mask, logits_processor=[fusion], **options)
            out += tokenizer.batch_decode(generated[:, ids.shape[1] :], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return out


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _left_padded(tokenizer: Any, prompts: Sequence[str], pad: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    rows = [list(tokenizer(str(p), add_special_tokens=True)["input_ids"]) for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


class LogitsFusionMixin:
    """Make a causal-LM module's ``generate``, and so ``predict``, fuse its backbone (the large base model) with small
    experts by Dynamic Logits Fusion (arXiv 2406.15480).

    The module's ``model`` is the large model ``L``; ``fusion_small_base`` and ``fusion_experts`` name the small base
    and its experts (aliases, HF folders or peft adapter folders). They are loaded at the first ``generate``, next to
    the backbone, and are not part of the module's parameters or checkpoints. Without ``fusion_experts`` the module
    generates as its host does. ``model: class_path: lightning_ft.decoding.LogitsFusionCausalLM`` in a config, or mix
    it into your own composition, e.g. ``class M(LogitsFusionMixin, CausalLMModule)``.

    Args:
        fusion_small_base: The small base model ``s``.
        fusion_experts: The small experts fine-tuned from ``s``.
        fusion_alpha: ``None`` chooses the weights per step by KL matching; a number, or one per expert, fixes them
            (``1.0``: static proxy tuning).
        fusion_alpha_grid: The weights searched; default the paper's ``0, 0.1, ..., 2``.
        fusion_search: ``one_expert`` (one expert acts per step, the paper's multi-expert search) or ``joint``.
    """

    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "quantized", "lora", "mixed"}),
        {"fsdp2": "{name} runs its small models whole beside the backbone, one step per generate step, which a sharded "
                  "generate (synced_gpus) does not keep in step: use strategy='ddp' (each process fuses its own "
                  "prompts)."},
        "Decoding only (generate and predict; nothing trains). The small base and experts load whole next to the "
        "backbone, in its floating dtype, and are not checkpointed.",
    )  # fmt: skip

    def __init__(
        self,
        *,
        fusion_small_base: str | None = None,
        fusion_experts: list[str] | None = None,
        fusion_alpha: float | list[float] | None = None,
        fusion_alpha_grid: list[float] | None = None,
        fusion_search: Search = "one_expert",
        **kwargs: Any,
    ) -> None:
        if (fusion_small_base is None) != (not fusion_experts):
            raise UserError("fusion_small_base and fusion_experts go together: give the small base model and at least "
                            "one expert fine-tuned from it, or neither to generate without fusion.")  # fmt: skip
        if fusion_search not in ("one_expert", "joint"):
            raise UserError(f"fusion_search={fusion_search!r} is not a search: use 'one_expert' or 'joint'.")
        if fusion_alpha_grid is not None:
            check_alpha_grid(fusion_alpha_grid, "fusion_alpha_grid")
        if fusion_alpha is not None:
            _fixed_alphas(fusion_alpha, len(fusion_experts or []))
        super().__init__(**kwargs)
        require_host(self, LogitsFusionMixin, ("backbone", "tokenizer", "generate"))
        self._fusion_sources = (fusion_small_base, list(fusion_experts or []))
        self._fusion_settings: dict[str, Any] = {"alpha": fusion_alpha, "alpha_grid": fusion_alpha_grid,
                                                 "search": fusion_search}  # fmt: skip
        self._fusion_models: tuple[nn.Module, list[nn.Module]] | None = None  # a tuple: not registered as submodules

    def setup(self, stage: str) -> None:
        """The host's ``setup``, then the support check (one sentence for a strategy fusion does not run under)."""
        host: Any = super()
        host.setup(stage)
        if self._fusion_sources[0] is not None:
            from lightning_ft.core.process_group import destroy_process_group_at_exit
            from lightning_ft.core.support import check_support

            module: Any = self
            destroy_process_group_at_exit()
            check_support(self, module.trainer, module.backbone)

    def fusion_models(self) -> tuple[nn.Module, list[nn.Module]]:
        """The small base and the experts, loaded once next to the backbone (tokenizers checked)."""
        host: Any = self
        backbone = host.backbone
        device = _device(backbone)
        if self._fusion_models is None:
            small_base, experts = self._fusion_sources
            assert small_base is not None
            floating = next((p.dtype for p in backbone.parameters() if p.dtype.is_floating_point), torch.float32)
            dtype = str(floating).removeprefix("torch.")  # a quantized backbone's first parameters are integers
            reference = ("model", host.tokenizer)
            self._fusion_models = _load_small(small_base, experts, reference, device, dtype, prefix="fusion_")
        small, experts = self._fusion_models
        if _device(small) != device:  # the Trainer moved the backbone
            self._fusion_models = small.to(device), [e.to(device) for e in experts]
        return self._fusion_models

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The host's ``generate``, with the large model's logits fused with the experts' at every step."""
        host: Any = super()
        if self._fusion_sources[0] is None:
            return host.generate(input_ids, attention_mask, **kwargs)
        small_base, experts = self.fusion_models()
        fusion = DynamicLogitsFusion(small_base, experts, attention_mask=attention_mask, **self._fusion_settings)
        processors = LogitsProcessorList([*(kwargs.pop("logits_processor", None) or []), fusion])
        with fusion:
            return host.generate(input_ids, attention_mask, logits_processor=processors, **kwargs)
