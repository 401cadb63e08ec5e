"""OwLore's outlier scores: OWL's layer-wise outlier ratio of each block, and the training batches it is measured on.

Used by :class:`~lightning_ft.callbacks.LayerwiseSampling` with ``sampling="outlier"`` (re-exported by
:mod:`lightning_ft.callbacks.layerwise`, their old home).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from torch.utils.data import DataLoader, IterableDataset

from lightning_ft.core.layer_map import LayerMap
from lightning_ft.core.shards import is_dtensor, local, shard_info

__all__ = ["calibration_batches", "fit_train_loader", "input_norms", "outlier_ratios", "source_batches"]


def _input_dim(module: torch.nn.Module) -> int:
    """Which weight dimension multiplies the module's input features (Conv1D stores ``[in, out]``)."""
    return 0 if type(module).__name__ == "Conv1D" else 1


_Batches = Mapping[str, Any] | Iterable[Mapping[str, Any]] | None


@torch.no_grad()
def outlier_ratios(
    model: torch.nn.Module,
    layer_map: LayerMap,
    batches: _Batches,
    threshold: float = 13.0,
    reduce: Any = None,
) -> list[float]:
    """OWL's layer-wise outlier ratio ``D_l`` of every block.

    Each block's score is ``A_ij = |W_ij| * ||X_j||_2`` over its attention and MLP matrices (Wanda, with
    ``X`` the matrix's input features over the non-padding tokens of all ``batches``; ``|W_ij|`` alone
    when ``batches`` is ``None``), and ``D_l`` is the fraction of the block's scores above ``threshold``
    times their mean.

    Args:
        model: The transformers model.
        layer_map: Its layer map.
        batches: One mapping or several, each with ``input_ids`` and optionally ``attention_mask`` (tokens
            where it is 0 are left out of ``||X_j||``), or ``None``.
        threshold: The outlier multiple ``M`` (13 in OwLore's scripts).
        reduce: Optional function summing a tensor across ranks (e.g. ``strategy.reduce``).

    Returns:
        ``D_l`` per block, in block order.
    """
    infos = [i for i in layer_map.select(kinds=["matrices"]) if i.is_matrix and i.name.endswith("weight")]
    modules = {i.name: model.get_submodule(i.name.rsplit(".", 1)[0]) for i in infos}
    if isinstance(batches, Mapping):
        batches = [batches]
    norms = input_norms(model, modules, batches, reduce) if batches is not None else {}
    by_block: dict[int, list[torch.Tensor]] = {}
    sharded = False  # under FSDP2 each process scores its own rows and the block totals are summed
    for info in infos:
        param = model.get_parameter(info.name)
        sharded |= is_dtensor(param)
        weight = local(param).detach().float().abs()
        if info.name in norms:
            scale = norms[info.name].to(weight.device)
            if _input_dim(modules[info.name]) == 1:
                weight = weight * scale.unsqueeze(0)
            else:  # Conv1D ([in, out]): the input features are the rows, of which this process holds a slice
                start, rows = shard_info(param) or (0, weight.shape[0])
                weight = weight * scale[start : start + rows].unsqueeze(1)
        assert info.block is not None
        by_block.setdefault(info.block, []).append(weight)
    blocks = [by_block.get(block, []) for block in range(layer_map.num_blocks)]
    totals = torch.tensor([[sum(s.numel() for s in b), sum(float(s.sum()) for s in b)] for b in blocks],
                          dtype=torch.float64)  # fmt: skip
    if sharded and reduce is not None:
        totals = reduce(totals)
    counts, means = totals[:, 0], totals[:, 1] / totals[:, 0].clamp(min=1)
    above = torch.tensor(
        [sum(int((s > threshold * float(mean)).sum()) for s in b) for b, mean in zip(blocks, means)],
        dtype=torch.float64,
    )
    if sharded and reduce is not None:
        above = reduce(above)
    return [float(a / c) if c else 0.0 for a, c in zip(above, counts)]


@torch.no_grad()
def input_norms(
    model: torch.nn.Module,
    modules: dict[str, torch.nn.Module],
    batches: Iterable[Mapping[str, Any]],
    reduce: Any = None,
) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` of each module's input features over the non-padding tokens of ``batches``.

    A token counts when its ``attention_mask`` entry is non-zero (every token without a mask). A module
    whose input rows are not the batch's tokens (e.g. a routed expert) counts all its rows.

    Args:
        model: The model to run (in eval mode, without gradients).
        modules: Name -> module whose input is measured.
        batches: Mappings with ``input_ids`` and optionally ``attention_mask``.
        reduce: Optional function summing a tensor across ranks.

    Returns:
        Name -> norm per input feature (modules never called are absent).
    """
    sums: dict[str, torch.Tensor] = {}
    keep: list[torch.Tensor | None] = [None]  # the current batch's token mask, flattened

    def hook(args: tuple[Any, ...], key: str) -> None:
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        mask = keep[0]
        if mask is not None and mask.numel() == x.shape[0]:
            x = x[mask.to(x.device)]
        sums[key] = sums.get(key, 0) + (x * x).sum(0)

    handles = [
        module.register_forward_pre_hook(lambda m, a, key=name: hook(a, key)) for name, module in modules.items()
    ]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if not isinstance(batch, Mapping) or "input_ids" not in batch:
                raise ValueError(
                    "LayerwiseSampling(sampling='outlier') calibrates on training batches that are mappings with an "
                    "'input_ids' entry: use outlier_metric='weight' or pass outlier_ratios for other batch formats."
                )
            attention = batch.get("attention_mask")
            keep[0] = attention.reshape(-1) != 0 if attention is not None else None
            model(input_ids=batch["input_ids"], attention_mask=attention)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    names = list(sums)
    if not names:
        return {}
    flat = torch.cat([sums[n] for n in names])
    if reduce is not None:
        flat = reduce(flat)
    out, start = {}, 0
    for name in names:
        size = sums[name].numel()
        out[name] = flat[start : start + size].sqrt()
        start += size
    return out


def calibration_batches(trainer: L.Trainer, samples: int, fallback: Any, loader: Any = None) -> list[Any]:
    """The first batches of a fresh pass over the training data, ``samples`` sequences in all (this rank's share).

    The pass reads the training DataLoader's dataset, sampler (with the sampler Lightning injected under
    DDP) and collate function in this process, and restores every global random state afterwards, so the
    training run's batches and randomness are unchanged.

    Args:
        trainer: The Trainer (its ``train_dataloader`` is read).
        samples: Sequences to collect over all ranks (each rank takes ``ceil(samples / world_size)``).
        fallback: What to return, as the only batch, when the training data is not a ``DataLoader``.
        loader: The training DataLoader to read instead of the Trainer's (e.g. in ``setup``, before the Trainer
            has built its own).

    Returns:
        Batches moved to the module's device.
    """
    loader = trainer.train_dataloader if loader is None else loader
    if not isinstance(loader, DataLoader):
        return [fallback]
    if isinstance(loader.dataset, IterableDataset):
        fresh = DataLoader(
            loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn, drop_last=loader.drop_last
        )
    elif loader.batch_sampler is None:  # the dataset yields whole batches
        fresh = DataLoader(loader.dataset, batch_size=None, sampler=loader.sampler, collate_fn=loader.collate_fn)
    else:
        fresh = DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn)
    wanted = -(-samples // max(1, trainer.world_size))
    states = _collect_rng_states(include_cuda=torch.cuda.is_available())
    batches, seen = [], 0
    try:
        for batch in fresh:
            batches.append(trainer.strategy.batch_to_device(batch))
            seen += _batch_size(batch)
            if seen >= wanted:
                break
    finally:
        _set_rng_states(states)
    return batches or [fallback]


def source_batches(trainer: L.Trainer, source: str, count: int, argument: str, owner: str) -> list[Any]:
    """``count`` batches of the fit's ``train`` data or of its DataModule's ``control`` text, on the module's device.

    What a method's pass before training reads (no optimizer step): ``train`` is a fresh pass over the training
    data (:func:`calibration_batches`, this process's share under DDP, random states left as they were); ``control``
    is the DataModule's control loader (``control_dataloader()``), general text the task does not train on.

    Args:
        trainer: The Trainer, in ``setup`` or ``on_fit_start``.
        source: ``train`` or ``control``.
        count: Batches wanted (fewer when the data runs out).
        argument: The method's argument that chose ``source``, for the errors.
        owner: The method's name, for the errors.
    """
    if source == "train":  # before the Trainer has built its own loader
        loader = fit_train_loader(trainer)
        size = getattr(loader, "batch_size", None) or 1
        batches = calibration_batches(trainer, count * size * trainer.world_size, None, loader=loader)[:count]
        if not batches or batches[0] is None:
            raise ValueError(f"{owner}({argument}='train') reads training batches from a DataLoader, and this fit's "
                             f"training data is not one: use {argument}='control'.")  # fmt: skip
        return batches
    datamodule = getattr(trainer, "datamodule", None)
    loader = datamodule.control_dataloader() if hasattr(datamodule, "control_dataloader") else None
    if loader is None:
        raise ValueError(f"{owner}({argument}='control') reads general text, and this fit's DataModule has no control "
                         f"data: give it control data (e.g. control: humaneval) or set {argument}='train'.")  # fmt: skip
    batches = []
    for batch in loader:
        batches.append(trainer.strategy.batch_to_device(batch))
        if len(batches) == count:
            break
    return batches


def fit_train_loader(trainer: L.Trainer) -> Any:
    """The fit's training DataLoader (or whatever its data source gives) before the Trainer has built its own, e.g.
    in ``setup`` or ``on_fit_start``; ``None`` without training data."""
    source = trainer.fit_loop._data_source
    return source.dataloader() if source.is_defined() else None


def _batch_size(batch: Any) -> int:
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    return int(ids.shape[0]) if isinstance(ids, torch.Tensor) and ids.ndim > 1 else 1
