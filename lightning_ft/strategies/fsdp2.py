"""FSDP2 under Lightning's ``ModelParallelStrategy``: sharding a backbone, and reading sharded weights back.

:func:`shard_backbone` is what our modules' ``configure_model`` runs when the strategy is ``ModelParallelStrategy``
(data-parallel size = world size, tensor-parallel size 1): ``fully_shard`` on every decoder block (the classes a
transformers model names in ``_no_split_modules``; else every entry of its ``ModuleList``\\ s) and then on the
backbone itself, whose own group holds what is left (embeddings, final norm, head). Each block is its own
communication unit, so a forward holds one block's full weights at a time. A parameter of such a model is a
``DTensor`` whose local shard is a slice of rows (``Shard(0)``); the methods edit those slices in place
(:func:`local`), and anything that needs a whole tensor gathers one at a time (:func:`full_tensor`).

:func:`gathered_parameters` yields the full tensors one by one on every rank (a collective: every rank iterates),
which the fit-end export streams to disk on rank 0 (:func:`save_sharded_pretrained`): no rank ever holds a full
copy of the model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lightning_ft.core.shards import (
    any_rank,
    full_tensor,
    guard_optimizer_state_init,
    initializing_optimizer_state,
    is_sharded,
    local,
    shard_info,
)

__all__ = [
    "FSDP2Strategy",
    "any_rank",
    "full_tensor",
    "gathered_parameters",
    "guard_optimizer_state_init",
    "initializing_optimizer_state",
    "is_model_parallel",
    "is_sharded",
    "local",
    "register_strategy",
    "save_sharded_pretrained",
    "shard_backbone",
    "shard_info",
]  # fmt: skip


def is_model_parallel(strategy: Any) -> bool:
    """Whether ``strategy`` is Lightning's ``ModelParallelStrategy`` (FSDP2), by class name (any subclass)."""
    return any(cls.__name__ == "ModelParallelStrategy" for cls in type(strategy).__mro__)


def _blocks(module: nn.Module) -> list[nn.Module]:
    """The decoder (or encoder) blocks of a transformers model, outermost first; nested blocks are not repeated."""
    names: set[str] = set()
    for m in module.modules():
        names |= set(getattr(m, "_no_split_modules", None) or ())
    if names:
        found = [m for m in module.modules() if type(m).__name__ in names]
    else:
        found = [child for m in module.modules() if isinstance(m, nn.ModuleList) for child in m]
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for block in found:
        if id(block) in inside:
            continue
        blocks.append(block)
        inside |= {id(m) for m in block.modules()}
    return blocks


def shard_backbone(backbone: nn.Module, mesh: Any, extra: list[nn.Module] | tuple[nn.Module, ...] = ()) -> None:
    """``fully_shard`` every block of ``backbone``, then each of ``extra`` (modules the training step calls by
    themselves), then the backbone; nothing happens if it is already sharded.

    Args:
        backbone: A transformers model (peft-wrapped or not).
        mesh: The data-parallel device mesh (1-D).
        extra: Submodules that are called directly rather than through the backbone's forward (each gets its own
            group, so that its parameters are gathered when it is called).
    """
    from torch.distributed.fsdp import fully_shard

    if is_sharded(backbone):
        return
    for block in _blocks(backbone):
        fully_shard(block, mesh=mesh)
    for module in extra:
        fully_shard(module, mesh=mesh)
    fully_shard(backbone, mesh=mesh)


def gathered_parameters(module: nn.Module, only: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` of each parameter and persistent buffer of ``module``, one at a time.

    A collective: every rank must iterate it to the end (each ``DTensor`` is all-gathered on every rank). Tied
    parameters come once, under their first name (``named_parameters``' order).

    Args:
        module: The (sharded) module.
        only: Names to yield (default: all).
    """
    named = list(module.named_parameters())
    non_persistent = {
        f"{prefix}.{name}" if prefix else name
        for prefix, m in module.named_modules()
        for name in getattr(m, "_non_persistent_buffers_set", ())
    }
    named += [(n, b) for n, b in module.named_buffers() if n not in non_persistent]
    for name, tensor in named:
        if only is not None and name not in only:
            continue
        yield name, full_tensor(tensor.detach())


def save_sharded_pretrained(
    backbone: nn.Module,
    tokenizer: Any,
    source: str | os.PathLike[str],
    path: str | os.PathLike[str],
    is_rank_zero: bool,
) -> Path:
    """Export a sharded backbone as an HF folder (``from_pretrained`` loads it), gathering one tensor at a time.

    Every rank calls this (each tensor is all-gathered); rank 0 streams each full tensor to its offset in the
    safetensors file the moment it arrives (:func:`~lightning_ft.core.weights.stream_hf_folder`, written
    atomically) and drops it, so no rank holds a full copy of the model. A peft backbone is saved as its adapter
    (only the adapter tensors are gathered). Weights holding NaN or inf are refused, on every rank, before the
    folder is put in place.

    Args:
        backbone: The sharded transformers model (or peft model).
        tokenizer: Saved beside the weights (rank 0).
        source: The model folder the backbone was loaded from (its config files are copied).
        path: The output folder.
        is_rank_zero: Whether this rank writes.
    """
    from lightning_ft.core.io import atomic_dir, check_finite
    from lightning_ft.core.layer_map import is_peft_model
    from lightning_ft.core.weights import TensorSpec, stream_hf_folder

    path = Path(path)
    if is_peft_model(backbone):
        trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
        state = {}
        for name, tensor in gathered_parameters(backbone, only=trainable):
            check_finite({name: tensor}, f"the model exported to {path}")
            state[name] = tensor
        if is_rank_zero:
            from peft import get_peft_model_state_dict

            adapter = get_peft_model_state_dict(backbone, state_dict=state)
            with atomic_dir(path) as tmp:
                backbone.save_pretrained(tmp, state_dict=adapter)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
        return path
    layout = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in _named_states(backbone)]
    if not is_rank_zero:
        for name, tensor in gathered_parameters(backbone):
            check_finite({name: tensor}, f"the model exported to {path}")
        return path
    with stream_hf_folder(source, path, layout, overwrite=True) as writer:
        for name, tensor in gathered_parameters(backbone):
            check_finite({name: tensor}, f"the model exported to {path}")
            writer.write(name, tensor.contiguous())
        backbone.config.save_pretrained(writer.folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(writer.folder)
    return path


def _named_states(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """What :func:`gathered_parameters` yields, without gathering (for the layout: names, dtypes, global shapes)."""
    non_persistent = {
        f"{prefix}.{name}" if prefix else name
        for prefix, m in module.named_modules()
        for name in getattr(m, "_non_persistent_buffers_set", ())
    }
    yield from module.named_parameters()
    yield from ((n, b) for n, b in module.named_buffers() if n not in non_persistent)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` set up for our modules: data-parallel FSDP2 over every process
    (``data_parallel_size`` = world size, ``tensor_parallel_size`` = 1, whatever the node count), and
    distributed checkpoints written atomically.

    Each rank writes its shard into a temporary sibling folder; rank 0 then puts the folder in place in one
    rename (:func:`lightning_ft.core.io.atomic_dir`), so ``last.ckpt`` always names a whole checkpoint, the
    previous or the new one, even when a process dies mid-save. Registered as ``strategy: fsdp2``.

    Args:
        save_distributed_checkpoint: Each rank saves its own shard (default); ``False`` gathers one file on
            rank 0 (a full copy of the model in its memory).
        process_group_backend: ``gloo`` on CPU, ``nccl`` on CUDA by default.
        timeout: The process group's timeout.
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: Any = None,
    ) -> None:
        from torch.distributed.constants import default_pg_timeout

        super().__init__(1, 1, save_distributed_checkpoint, process_group_backend, timeout or default_pg_timeout)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        import contextlib

        from lightning_ft.core.io import atomic_dir

        if not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        path = Path(self.broadcast(str(filepath)))
        with atomic_dir(path) if self.global_rank == 0 else contextlib.nullcontext(None) as tmp:
            tmp = Path(self.broadcast(str(tmp) if tmp is not None else None))
            super().save_checkpoint(checkpoint, tmp, storage_options)
            self.barrier("lightning_ft.save_checkpoint")  # every shard is written before rank 0 renames

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a distributed checkpoint into the sharded model and optimizers; return the rest (epoch, callbacks...).

        As Lightning's, except that optimizer state is loaded partially: a selection method keeps state only for
        the tensors that trained when the checkpoint was written (the others get fresh state, which the method
        evicts again when it restores its selection), and a peft module saves only its trainable tensors.
        """
        from lightning.fabric.strategies.fsdp import _is_sharded_checkpoint
        from lightning.fabric.utilities.load import _METADATA_FILENAME
        from torch.distributed.checkpoint import DefaultLoadPlanner, load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        if not _is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only)
        assert self.model is not None and self.lightning_module is not None
        strict = self.lightning_module.strict_loading
        model_state = {"state_dict": get_model_state_dict(self.model)}
        load(model_state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=not strict))
        self.model.load_state_dict(model_state["state_dict"], strict=strict)
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optimizer_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            load(optimizer_state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optimizer_state[key],
                                     options=StateDictOptions(cpu_offload=True))  # fmt: skip
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)

    def remove_checkpoint(self, filepath: Any) -> None:
        import shutil

        if self.is_global_zero:
            path = Path(filepath)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()


def register_strategy() -> None:
    """Register :class:`FSDP2Strategy` under the name ``fsdp2`` (``trainer.strategy: fsdp2``); idempotent."""
    from lightning.pytorch.strategies import StrategyRegistry

    if "fsdp2" not in StrategyRegistry:
        StrategyRegistry.register("fsdp2", FSDP2Strategy, description="FSDP2 (fully_shard per block), data-parallel")


register_strategy()  # `strategy: fsdp2` works wherever our modules (which import this module) are used
