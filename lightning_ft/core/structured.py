"""Structured units of a decoder block and their function-preserving co-permutation (S2FT's layout).

A block's attention is cut into **groups**: one key/value head and the query heads that share it (grouped-query
attention; a group is one head under multi-head attention). A group owns ``head_dim`` rows of ``k_proj`` and
``v_proj``, its query heads' rows of ``q_proj`` and the same columns of ``o_proj``. Its FFN is cut into **channels**:
row ``c`` of ``up_proj`` (and ``gate_proj``) and column ``c`` of ``down_proj``. Reordering groups (or channels) on
both sides of the block leaves its function unchanged; reordering a query head into another group would not, which is
why the official S2FT permutation (an order over query heads applied to key/value rows) breaks grouped-query models.

:func:`block_units` finds the units of every block, :func:`order_for` builds S2FT's order (``only_a + both +
only_b + rest``) and :func:`permute_block` applies an order (or its inverse) in place. :class:`SliceDelta` trains a
contiguous slice of rows (``v_proj``, ``up_proj``) or columns (``o_proj``, ``down_proj``) of a frozen linear layer as
a dense delta added by a forward hook, so the gradient and the optimizer state are the slice's size. Torch only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["BlockUnits", "SliceDelta", "block_units", "order_for", "permute_block", "unit_rows"]


@dataclass(frozen=True)
class BlockUnits:
    """The linear layers of one block and the sizes of its units.

    Attributes:
        q, k, v, o: The attention projections (``nn.Linear``).
        gate, up, down: The FFN projections (``gate`` is ``None`` for a two-matrix FFN).
        groups: Key/value heads (attention units).
        group_rows: Rows of ``q_proj`` (and columns of ``o_proj``) per group: query heads per group x head size.
        kv_rows: Rows of ``k_proj`` / ``v_proj`` per group: the head size.
        channels: FFN channels (rows of ``up_proj``).
    """

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    gate: nn.Linear | None
    up: nn.Linear
    down: nn.Linear
    groups: int
    group_rows: int
    kv_rows: int
    channels: int


def block_units(model: nn.Module, layer_map: Any, config: Any) -> list[BlockUnits]:
    """The units of every block of a Llama-style model (separate q/k/v/o and up/down linear layers).

    Raises:
        ValueError: If a block lacks one of the projections or one is not an ``nn.Linear`` (e.g. GPT-2's fused
            ``Conv1D``), or the head counts do not divide the projections.
    """
    kinds = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_o": "o", "mlp_gate": "gate", "mlp_up": "up",
             "mlp_down": "down"}  # fmt: skip
    found: dict[int, dict[str, nn.Module]] = {}
    for info in layer_map.select(kinds=list(kinds)):
        if info.name.endswith(".weight") and info.block is not None:
            found.setdefault(info.block, {})[kinds[info.kind.value]] = model.get_submodule(info.name[: -len(".weight")])
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    groups = int(getattr(config, "num_key_value_heads", None) or heads)
    out = []
    for block in range(layer_map.num_blocks):
        parts = found.get(block, {})
        missing = [p for p in ("q", "k", "v", "o", "up", "down") if not isinstance(parts.get(p), nn.Linear)]
        if missing or not heads or heads % groups:
            raise ValueError(
                f"S2FT needs separate nn.Linear q/k/v/o and up/down projections in every block and the config's "
                f"head counts, and block {block} of {type(model).__name__} has no {missing[0] if missing else 'heads'}"
                " of that form (GPT-2's fused Conv1D attention is not): use a Llama-style model."
            )
        q, k = parts["q"], parts["k"]
        if q.out_features % heads or k.out_features != groups * (q.out_features // heads):
            raise ValueError(f"S2FT cannot split block {block}'s projections into {groups} key/value groups of "
                             f"{heads // groups} query heads: check num_attention_heads and num_key_value_heads.")  # fmt: skip
        head_dim = q.out_features // heads
        out.append(BlockUnits(q, k, parts["v"], parts["o"], parts.get("gate"), parts["up"], parts["down"], groups,
                              head_dim * (heads // groups), head_dim, parts["up"].out_features))  # fmt: skip
    return out


def order_for(first: Sequence[int], second: Sequence[int], units: int) -> tuple[list[int], int, int, int]:
    """S2FT's order of ``units`` for the units chosen for a row slice (``first``) and a column slice (``second``).

    Returns:
        ``(order, a, b, c)``: ``order = only_first + both + only_second + rest`` (each ascending), and the sizes
        ``a = |only_first|``, ``b = |both|``, ``c = |only_second|``: the row slice is units ``[0, a + b)``, the column
        slice units ``[a, a + b + c)``.
    """
    one, two = set(first), set(second)
    only_one, both, only_two = sorted(one - two), sorted(one & two), sorted(two - one)
    rest = [u for u in range(units) if u not in one | two]
    return only_one + both + only_two + rest, len(only_one), len(both), len(only_two)


def unit_rows(order: Sequence[int], size: int) -> torch.Tensor:
    """Row (or column) indices of a tensor whose units of ``size`` rows are taken in ``order``."""
    index = torch.tensor(list(order), dtype=torch.long)
    return (index[:, None] * size + torch.arange(size)).reshape(-1)


@torch.no_grad()
def _take(param: torch.Tensor | None, index: torch.Tensor, dim: int) -> None:
    if param is not None:
        param.copy_(param.index_select(dim, index.to(param.device)))


@torch.no_grad()
def permute_block(units: BlockUnits, attention: Sequence[int], ffn: Sequence[int], inverse: bool = False) -> None:
    """Reorder a block's groups by ``attention`` and its channels by ``ffn`` in place (``inverse``: undo that).

    The new group ``i`` is the old group ``attention[i]``: its q/k/v rows (and biases) and its o columns move
    together; the new channel ``j`` is the old channel ``ffn[j]``: its gate/up rows and its down column.
    """
    attn, mlp = list(attention), list(ffn)
    if inverse:
        attn = torch.argsort(torch.tensor(attn)).tolist()
        mlp = torch.argsort(torch.tensor(mlp)).tolist()
    q_rows, kv_rows = unit_rows(attn, units.group_rows), unit_rows(attn, units.kv_rows)
    for layer, rows in ((units.q, q_rows), (units.k, kv_rows), (units.v, kv_rows)):
        _take(layer.weight, rows, 0)
        _take(layer.bias, rows, 0)
    _take(units.o.weight, q_rows, 1)
    channels = torch.tensor(mlp, dtype=torch.long)
    for layer in (units.gate, units.up):
        if layer is not None:
            _take(layer.weight, channels, 0)
            _take(layer.bias, channels, 0)
    _take(units.down.weight, channels, 1)


class SliceDelta:
    """A trainable dense delta on rows ``[start, end)`` (``side="rows"``) or columns (``side="columns"``) of a
    frozen ``nn.Linear``, added to its output by a forward hook: ``y[..., start:end] += x @ delta.T`` for rows,
    ``y += x[..., start:end] @ delta.T`` for columns. The delta is the layer's parameter ``s2_delta`` (zeros, in the
    weight's dtype and device), so it is saved with the module and found by its optimizer.
    """

    NAME = "s2_delta"

    def __init__(self, layer: nn.Linear, side: str, start: int, end: int) -> None:
        self.layer, self.side, self.start, self.end = layer, side, start, end
        weight = layer.weight
        shape = (end - start, weight.shape[1]) if side == "rows" else (weight.shape[0], end - start)
        layer.register_parameter(self.NAME, nn.Parameter(torch.zeros(shape, dtype=weight.dtype, device=weight.device)))
        self._handle = layer.register_forward_hook(self._hook)

    @property
    def delta(self) -> nn.Parameter:
        """The trainable delta."""
        return getattr(self.layer, self.NAME)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x, delta = args[0], self.delta
        if self.side == "rows":
            output[..., self.start : self.end] += F.linear(x, delta.to(x.dtype))
        else:
            output += F.linear(x[..., self.start : self.end], delta.to(x.dtype))
        return output

    @torch.no_grad()
    def fuse(self) -> None:
        """Add the delta into the weight's slice, then remove the hook and the parameter (the layer is plain again)."""
        weight = self.layer.weight
        if self.side == "rows":
            weight[self.start : self.end] += self.delta.to(weight.dtype)
        else:
            weight[:, self.start : self.end] += self.delta.to(weight.dtype)
        self._handle.remove()
        del self.layer._parameters[self.NAME]
