r"""The activations a Llama-like block keeps for the backward pass, per token, from the model's shape alone.

Counted from what each operation of transformers' Llama layer saves for autograd (PyTorch saves an operand only when
the gradient of another operand needs it, so a frozen linear layer does not keep its input), and checked against the
bytes ``torch.autograd.graph.saved_tensors_hooks`` sees in a forward pass of SmolLM2-135M (fp32 and bf16; full
fine-tuning, LoRA, HFT, LIFT and OwLore: within 0.2%, benchmarks/results/estimate_check.md). Bytes per token and
block, ``c`` the bytes of an activation, ``Q``/``K`` the widths of the query and of the key/value projections:

* always, for a block that gradients pass through: ``2 (4H + 4)`` for the two RMSNorms' fp32 inputs and ``1/rms``,
  ``c (2Q + 2K) + 4 heads`` for q, k, v, the output and the log-sum-exp kept by the attention kernel (SDPA's
  memory-efficient path: no ``T x T`` scores), ``3cI`` for the MLP's SiLU input and output and its up projection;
* for what trains: ``cH`` per norm whose weight trains (its normalised input), ``cH`` for the input of q/k/v and
  ``cH`` for that of gate/up when one of them trains, ``cI`` for the input of down when it trains;
* LoRA (:func:`block_token_bytes` mode ``adapter``): ``4r`` per adapter (the fp32 output of ``lora_A``), and the
  adapted layers' inputs: shared as above for fp32 weights, else one fp32 copy per adapted layer (peft casts the
  input to the adapter's dtype).

Modes: ``train`` (every weight of the block trains), ``hft`` (a fraction ``f`` of the matrices and norms frozen:
q/k/v's input is kept unless all three are frozen, ``1 - f^3``, gate/up's ``1 - f^2``, down's ``1 - f``), ``sampled``
(LIFT: the matrices train, the norms are frozen), ``adapter`` (LoRA), ``frozen`` (nothing of the block trains, but
gradients pass through it to an earlier trainable tensor: only the core terms) and ``none`` (nothing below trains
either: no graph, nothing kept). Outside the blocks the final norm keeps ``4H + 4``, plus ``cH`` when its weight
trains and ``cH`` (the head's input) when the head trains. With checkpointing a block keeps only its input (``cH``)
and one block's activations are recomputed at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning_ft.planning.model import ModelShape

__all__ = ["BLOCK_MODES", "activation_bytes", "block_token_bytes"]

BLOCK_MODES = ("train", "hft", "sampled", "adapter", "frozen", "none")


def block_token_bytes(
    shape: ModelShape, mode: str, c: int, hft_frozen: float = 0.5, lora_rank: int = 8,
    lora_targets: Sequence[str] = (),
) -> float:  # fmt: skip
    """Bytes per token one block keeps for the backward pass (see the module docstring).

    Args:
        shape: The model.
        mode: One of :data:`BLOCK_MODES`.
        c: Bytes of an activation.
        hft_frozen: HFT's frozen fraction (mode ``hft``).
        lora_rank: LoRA's rank (mode ``adapter``).
        lora_targets: The adapted linear kinds (mode ``adapter``).
    """
    if mode == "none":
        return 0.0
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    core = 2 * (4 * h + 4) + c * (2 * q + 2 * kv) + 4 * shape.heads + 3 * c * i
    if mode == "adapter":
        return core + _adapter_inputs(shape, c, lora_targets) + 4 * lora_rank * len(lora_targets)
    f = hft_frozen
    kept = {"train": (1, 1, 1, 1), "sampled": (0, 1, 1, 1), "frozen": (0, 0, 0, 0),
            "hft": (1 - f, 1 - f**3, 1 - f**2, 1 - f)}  # fmt: skip
    norm, qkv, gate_up, down = kept[mode]
    return core + 2 * c * h * norm + c * h * (qkv + gate_up) + c * i * down


def _adapter_inputs(shape: ModelShape, c: int, lora_targets: Sequence[str]) -> float:
    """The adapted layers' inputs kept by LoRA: shared when the adapters' dtype (fp32) is the activations', else one
    fp32 copy per adapted layer."""
    h, i, q = shape.hidden, shape.intermediate, shape.heads * shape.head_dim
    targets = set(lora_targets)
    qkv, gate_up = len(targets & {"attn_q", "attn_k", "attn_v"}), len(targets & {"mlp_gate", "mlp_up"})
    down, out = "mlp_down" in targets, "attn_o" in targets
    if c == 4:  # the attention output is kept by the kernel already
        return c * h * (min(qkv, 1) + min(gate_up, 1)) + c * i * down
    return 4 * h * (qkv + gate_up) + 4 * q * out + 4 * i * down


def activation_bytes(
    shape: ModelShape, modes: Sequence[str], c: int, tokens: int, *, final_norm_trains: bool, head_trains: bool,
    hft_frozen: float = 0.5, lora_rank: int = 8, lora_targets: Sequence[str] = (),
) -> tuple[float, float, float]:  # fmt: skip
    """``(kept without checkpointing, kept with checkpointing, one block's)`` bytes for ``tokens`` tokens.

    Args:
        shape: The model.
        modes: The mode of each block (:data:`BLOCK_MODES`).
        c: Bytes of an activation.
        tokens: Tokens per device and step (batch size x sequence length).
        final_norm_trains: Whether the final norm's weight trains.
        head_trains: Whether the LM head trains.
        hft_frozen: HFT's frozen fraction.
        lora_rank: LoRA's rank.
        lora_targets: The adapted linear kinds.
    """
    blocks = [block_token_bytes(shape, m, c, hft_frozen, lora_rank, lora_targets) for m in modes]
    outside = 4 * shape.hidden + 4 + c * shape.hidden * (final_norm_trains + head_trains)
    with_graph = sum(1 for m in modes if m != "none")
    full = tokens * (sum(blocks) + outside)
    checkpointed = tokens * (with_graph * c * shape.hidden + outside)
    return full, checkpointed, tokens * max(blocks)
