r"""Per-device memory of a fine-tuning run, estimated from the model's config before the fit starts.

:func:`estimate` is a pure function of a :class:`~lightning_ft.planning.model.ModelShape` and a :class:`FitPlan`;
it returns a :class:`MemoryEstimate` in bytes per device. ``B`` is the per-device batch size, ``T`` the sequence
length, ``H``/``I``/``V``/``N`` the hidden size, MLP size, vocabulary and number of blocks, ``c`` the bytes of an
activation (the weights' dtype; 4 for a quantized backbone, whose non-quantized tensors peft casts to fp32 and whose
bitsandbytes layers answer in their input's dtype).

* **Weights**: every parameter in the weights' dtype; quantized block matrices take 0.5 + 4/64 bytes per entry
  (nf4/fp4: 4 bits and one fp32 absmax per 64) or 1 + 4/in (int8: one fp32 scale per row); LoRA adapters are fp32
  (peft's ``autocast_adapter_dtype``).
* **Gradients**: one per trainable element, in its tensor's dtype. LIFT (``SparseFineTuning`` with its sampled
  weight gradients, :mod:`lightning_ft.sparse.sampled`) has no dense weight gradient: an fp32 value per selected
  entry (dense, masked gradients under DDP and FSDP2, where the sampled path is off).
* **Optimizer state**: AdamW keeps two moments per trainable element in the tensor's own dtype (``torch.optim.AdamW``
  allocates them like the parameter: fp32 for fp32 weights, bf16 for bf16 weights). LIFT's compact state
  (:mod:`lightning_ft.sparse.compact`) is 12 bytes per selected entry (an int32 index and two fp32 moments; +4 for an
  fp32 master copy when the weights are not fp32); under FSDP2 each process keeps its own rows' entries. OwLore's
  GaLore (:mod:`lightning_ft.core.galore`) keeps the two moments of an active matrix ``m x n`` with
  ``min(m, n) > r`` as ``r x max(m, n)`` plus its ``r x min(m, n)`` basis; only the active blocks hold state.
  Under FSDP2 the side that follows the weight's rows is sharded and the other replicated (``_galore_state``).
* **Activations** kept for the backward pass (:mod:`lightning_ft.planning.activations`): per token and block the
  tensors each operation saves, with and without checkpointing.
* **Logits and loss**: every position is labelled, so ``[B, T, V]`` logits go through the cross-entropy: the logits
  (``c``), their fp32 copy and its log-softmax (kept for backward) at the forward peak, ``12 B T V`` bytes (the
  log-softmax, the incoming gradient and the outgoing one, all fp32) at the start of the backward pass.
* **Communication buffers**: DDP's gradient buckets (the size of the gradients of every tensor that requires grad
  when DDP wraps the model); FSDP2 divides weights, gradients and optimizer state by the device count and adds the
  unsharded root group (embedding, final norm, head: kept gathered from forward to backward), one block's gathered
  weights and, in the backward pass, one block's unsharded gradients.
* **Step temporaries**: on a GPU AdamW's default ``foreach`` path makes one moment-sized copy of every densely
  stepped tensor; on a CPU the per-tensor path makes two copies of one tensor at a time; GaLore's step makes about
  three fp32 copies of a matrix (projected-back update, its scaled copy, SVD factors); under FSDP2 the gathered
  fp32 gradient and its SVD factors are whole and the update copies are the process's rows.

The peak follows the order of a Lightning step: the forward pass runs before ``zero_grad``, so the previous step's
gradients are still held at the forward peak (except those the step itself drops: LIFT's compact gradients and
GaLore's matrices). ``total = weights + optimizer + other + max(forward, backward, backward end, step)`` with
``forward = kept gradients + activations + (c + 8) B T V``, ``backward = activations + 12 B T V``,
``backward end = gradients + one block's activations`` and ``step = gradients + step temporaries`` (plus the
communication buffers of the phase). Not included: the CUDA context and allocator fragmentation (typically
0.5-1 GiB on a GPU), the data pipeline.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_ft.errors import UserError
from lightning_ft.planning.activations import activation_bytes
from lightning_ft.planning.model import LINEAR_KINDS, ModelShape

__all__ = [
    "ACCELERATORS", "DTYPE_BYTES", "METHODS", "QUANTIZATIONS", "STRATEGIES", "FitPlan", "MemoryEstimate",
    "check_plan", "estimate", "parse_targets",
]  # fmt: skip

METHODS = ("full_ft", "lora", "hft", "lift", "owlore")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
STRATEGIES = ("single", "ddp", "fsdp2")
ACCELERATORS = ("gpu", "cpu")
OWLORE_ACTIVE_FRACTION = 5 / 32  # as lightning_ft.callbacks.layerwise_schedule (which imports Lightning)
_TARGET_GROUPS = {"all-linear": LINEAR_KINDS, "attention": LINEAR_KINDS[:4], "mlp": LINEAR_KINDS[4:]}
_PEFT_NAMES = dict(zip(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), LINEAR_KINDS))


@dataclass(frozen=True)
class FitPlan:
    """The fit to plan: method, precision, batch, parallelism and the method's knobs.

    Attributes:
        method: ``full_ft``, ``lora``, ``hft``, ``lift`` or ``owlore``.
        dtype: The weights' dtype: ``float32``, ``bfloat16`` or ``float16``.
        quantization: ``none``, ``nf4``, ``fp4`` or ``int8`` (bitsandbytes; LoRA only).
        batch_size: Sequences per device and step.
        seq_len: Tokens per sequence.
        devices: Number of devices.
        strategy: ``single``, ``ddp`` or ``fsdp2``.
        checkpointing: Activation (gradient) checkpointing of every block.
        lora_rank: LoRA rank ``r``.
        lora_targets: Linear kinds that get an adapter (default: all seven of a block).
        sparse_rank: LIFT's budget per matrix as a LoRA-equivalent rank: ``min((m + n) r, m n)`` entries.
        sparse_density: LIFT's budget as a fraction of the matrices' entries (instead of ``sparse_rank``).
        hft_frozen: HFT's frozen fraction of each block's matrices and norms.
        active_blocks: OwLore/LISA's number of blocks that train at a time (default ``round(5/32 N)``).
        galore_rank: OwLore's GaLore rank (0: plain AdamW).
        freeze_bottom: Layer freezing: bottom blocks that never train (full_ft and lora).
        freeze_embeddings: With ``freeze_bottom``, freeze the embedding too (LayerFreezing's default).
        accelerator: ``gpu`` or ``cpu``: only AdamW's temporaries and host-side indices differ.
    """

    method: str = "full_ft"
    dtype: str = "bfloat16"
    quantization: str = "none"
    batch_size: int = 1
    seq_len: int = 2048
    devices: int = 1
    strategy: str = "single"
    checkpointing: bool = False
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = LINEAR_KINDS
    sparse_rank: int | None = None
    sparse_density: float | None = None
    hft_frozen: float = 0.5
    active_blocks: int | None = None
    galore_rank: int = 256
    freeze_bottom: int = 0
    freeze_embeddings: bool = True
    accelerator: str = "gpu"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of one fit (see the module docstring for every formula).

    Attributes:
        plan: The plan it was computed for.
        model: The model's shape.
        trainable: Trainable elements (selected entries for LIFT, adapter entries for LoRA).
        weights: Resident weights (a device's shard under FSDP2).
        gradients: Gradients at the end of the backward pass.
        optimizer: Optimizer state.
        activations: Activations kept for the backward pass with the plan's checkpointing setting (with
            checkpointing: the block inputs plus one recomputed block).
        activations_no_ckpt: The same without checkpointing.
        activations_ckpt: The same with checkpointing.
        loss: Peak of the logits and the cross-entropy.
        buffers: Communication buffers: DDP's buckets, FSDP2's gathered weights and unsharded gradients.
        other: Other persistent bytes (LIFT's sparse-gradient indices, and on a CPU its host-side mask union).
        step_temporaries: Temporaries of the optimizer step.
        peak_phase: ``forward``, ``backward``, ``backward end`` or ``step``: where ``total`` is reached.
        total: The peak.
        notes: What the numbers assume, in sentences.
    """

    plan: FitPlan
    model: ModelShape
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    activations_no_ckpt: int
    activations_ckpt: int
    loss: int
    buffers: int
    other: int
    step_temporaries: int
    peak_phase: str
    total: int
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping: the plan, the model and every figure in bytes."""
        out = asdict(self)
        out["plan"]["lora_targets"] = list(self.plan.lora_targets)
        out["model"]["biases"] = list(self.model.biases)
        out["notes"] = list(self.notes)
        return out


@dataclass
class _Parts:
    """What a method holds, summed over the whole model (bytes unless named otherwise)."""

    weights: float = 0.0
    gradients: float = 0.0
    kept_gradients: float = 0.0  # those still held when the next forward pass runs
    optimizer: float = 0.0
    optimizer_replicated: float = 0.0  # state every FSDP2 process holds whole (GaLore's unsharded side)
    other: float = 0.0
    trainable: int = 0
    moment_all: float = 0.0  # one AdamW moment over every densely stepped tensor
    moment_largest: float = 0.0  # one AdamW moment of the largest densely stepped tensor
    galore_step: float = 0.0  # GaLore's step temporaries
    buckets: float = 0.0  # gradients DDP's buckets mirror
    block_weights: float = 0.0  # one block's weights (FSDP2 gathers it)
    block_gradients: float = 0.0  # one block's trainable gradients (FSDP2 reduce-scatters them)
    root_weights: float = 0.0  # embedding, final norm and head (FSDP2's root group)
    modes: list[str] = field(default_factory=list)  # activation mode per block
    final_norm_trains: bool = True
    head_trains: bool = True
    notes: list[str] = field(default_factory=list)

    def train(self, numel: float, nbytes: float, largest: float) -> None:
        """Add densely trained tensors: AdamW moments and gradients in their dtype (kept into the next forward)."""
        self.trainable += int(numel)
        self.gradients += numel * nbytes
        self.kept_gradients += numel * nbytes
        self.optimizer += 2 * numel * nbytes
        self.moment_all += numel * nbytes
        self.moment_largest = max(self.moment_largest, largest * nbytes)


# ------------------------------------------------------------------------------------------------ checks
def parse_targets(text: str) -> tuple[str, ...]:
    """LoRA targets from a comma list of kinds (``attn_q``...), peft names (``q_proj``...) or groups
    (``all-linear``, ``attention``, ``mlp``).

    Raises:
        UserError: A name is none of these.
    """
    kinds: list[str] = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        found = _TARGET_GROUPS.get(name) or ((_PEFT_NAMES.get(name) or name),)
        if found[0] not in LINEAR_KINDS:
            raise UserError(f"--lora-targets names {name!r}, which is not a linear layer of a block: use all-linear, "
                            f"attention, mlp or kinds from {', '.join(LINEAR_KINDS)}.")  # fmt: skip
        kinds += [k for k in found if k not in kinds]
    if not kinds:
        raise UserError("--lora-targets is empty: give all-linear or a comma list such as attn_q,attn_v.")
    return tuple(k for k in LINEAR_KINDS if k in kinds)


def _choices(value: str, choices: tuple[str, ...], option: str) -> None:
    if value not in choices:
        raise UserError(f"{option} must be one of {', '.join(choices)} (got {value}).")


def check_plan(plan: FitPlan, shape: ModelShape) -> None:
    """Refuse a plan the estimate (or lightning-ft itself) cannot run, with one sentence naming the option.

    Raises:
        UserError: The first problem found.
    """
    _choices(plan.method, METHODS, "--method")
    _choices(plan.dtype, tuple(DTYPE_BYTES), "--dtype")
    _choices(plan.quantization, QUANTIZATIONS, "--quantization")
    _choices(plan.strategy, STRATEGIES, "--strategy")
    _choices(plan.accelerator, ACCELERATORS, "--accelerator")
    for option, value in (("--batch-size", plan.batch_size), ("--seq-len", plan.seq_len), ("--devices", plan.devices),
                          ("--lora-rank", plan.lora_rank)):  # fmt: skip
        if value < 1:
            raise UserError(f"{option} must be a positive integer (got {value}).")
    if plan.strategy == "single" and plan.devices > 1:
        raise UserError(f"--strategy single runs on one device, but --devices is {plan.devices}: "
                        "pass --strategy ddp or fsdp2, or --devices 1.")  # fmt: skip
    if plan.quantization != "none" and plan.method != "lora":
        raise UserError(f"--quantization {plan.quantization} freezes the backbone in 4/8 bit, but --method "
                        f"{plan.method} trains its weights: use --method lora or --quantization none.")  # fmt: skip
    _check_knobs(plan, shape)


def _check_knobs(plan: FitPlan, shape: ModelShape) -> None:
    if plan.sparse_rank is not None and plan.sparse_density is not None:
        raise UserError("give one LIFT budget: --sparse-rank or --sparse-density, not both.")
    if plan.sparse_rank is not None and plan.sparse_rank < 1:
        raise UserError(f"--sparse-rank must be a positive integer (got {plan.sparse_rank}).")
    if plan.sparse_density is not None and not 0 < plan.sparse_density <= 1:
        raise UserError(f"--sparse-density must be in (0, 1] (got {plan.sparse_density}).")
    if not 0 <= plan.hft_frozen < 1:
        raise UserError(f"--hft-frozen must be in [0, 1) (got {plan.hft_frozen}).")
    if plan.active_blocks is not None and not 1 <= plan.active_blocks <= shape.layers:
        raise UserError(f"--active-blocks must be between 1 and the model's {shape.layers} blocks "
                        f"(got {plan.active_blocks}).")  # fmt: skip
    if plan.galore_rank < 0:
        raise UserError(f"--galore-rank must be zero (plain AdamW) or a positive rank (got {plan.galore_rank}).")
    if plan.freeze_bottom:
        if plan.method not in ("full_ft", "lora"):
            raise UserError(f"--freeze-bottom applies to --method full_ft or lora (LayerFreezing cannot share a fit "
                            f"with --method {plan.method}'s own selection): drop it.")  # fmt: skip
        if not 0 < plan.freeze_bottom < shape.layers + (plan.method == "full_ft"):
            limit = shape.layers if plan.method == "full_ft" else shape.layers - 1
            raise UserError(f"--freeze-bottom must be between 0 and {limit} for this {shape.layers}-block model "
                            f"and --method {plan.method} (got {plan.freeze_bottom}).")  # fmt: skip


# ------------------------------------------------------------------------------------------------ methods
def _quantized_bytes(plan: FitPlan, in_features: int) -> float:
    if plan.quantization in ("nf4", "fp4"):
        return 0.5 + 4 / 64
    return 1 + 4 / in_features


def _base(shape: ModelShape, plan: FitPlan) -> _Parts:
    """The frozen model: every weight resident, nothing trains yet."""
    quantized = plan.quantization != "none"
    other = 4 if quantized else DTYPE_BYTES[plan.dtype]  # peft casts a 4/8-bit model's other tensors to fp32
    block: float = 2 * shape.hidden * other
    for kind, (out, inp) in shape.matrices().items():
        block += out * inp * (_quantized_bytes(plan, inp) if quantized else other) + shape.bias_numel(kind) * other
    root = (shape.embed_numel + shape.head_numel + shape.hidden) * other
    parts = _Parts(weights=shape.layers * block + root, block_weights=block, root_weights=root)
    parts.modes = ["frozen"] * shape.layers
    return parts


def _full_ft(shape: ModelShape, plan: FitPlan, parts: _Parts) -> None:
    nbytes, largest = DTYPE_BYTES[plan.dtype], max(o * i for o, i in shape.matrices().values())
    frozen_embedding = plan.freeze_bottom > 0 and plan.freeze_embeddings
    for block in range(shape.layers):
        if block >= plan.freeze_bottom:
            parts.train(shape.block_numel, nbytes, largest)
            parts.modes[block] = "train"
        else:
            parts.modes[block] = "none" if frozen_embedding else "frozen"
    embedding = 0 if frozen_embedding else shape.embed_numel
    parts.train(shape.hidden + embedding + shape.head_numel, nbytes, max(embedding, shape.head_numel))
    parts.head_trains = not (frozen_embedding and shape.tied)
    parts.block_gradients = shape.block_numel * nbytes
    parts.buckets = parts.gradients
    if plan.freeze_bottom:
        parts.notes.append(f"Layer freezing: the bottom {plan.freeze_bottom} blocks"
                           f"{' and the embedding' if frozen_embedding else ''} never train.")  # fmt: skip


def _lora(shape: ModelShape, plan: FitPlan, parts: _Parts) -> None:
    r, matrices = plan.lora_rank, shape.matrices()
    adapter = sum(r * (matrices[k][0] + matrices[k][1]) for k in plan.lora_targets)
    largest = max(r * max(matrices[k]) for k in plan.lora_targets)
    parts.weights += shape.layers * adapter * 4
    parts.block_weights += adapter * 4
    for block in range(plan.freeze_bottom, shape.layers):
        parts.train(adapter, 4, largest)
        parts.modes[block] = "adapter"
    for block in range(plan.freeze_bottom):
        parts.modes[block] = "none"
    parts.final_norm_trains = parts.head_trains = False
    parts.block_gradients, parts.buckets = adapter * 4, parts.gradients
    parts.notes.append(f"LoRA r={r} on {len(plan.lora_targets)} linear kinds per block; adapters, their gradients "
                       "and AdamW moments are fp32 (peft's autocast_adapter_dtype).")  # fmt: skip
    if plan.quantization != "none":
        parts.notes.append(f"{plan.quantization}: peft's prepare_model_for_kbit_training casts the embedding, norms "
                           "and head to fp32, so activations and logits are fp32 too.")  # fmt: skip


def _hft(shape: ModelShape, plan: FitPlan, parts: _Parts) -> None:
    nbytes, f = DTYPE_BYTES[plan.dtype], plan.hft_frozen
    largest = max(o * i for o, i in shape.matrices().values())
    per_block = (1 - f) * shape.block_numel
    for block in range(shape.layers):
        parts.train(per_block, nbytes, largest)
        parts.modes[block] = "hft"
    parts.train(shape.embed_numel + shape.head_numel + shape.hidden, nbytes, max(largest, shape.embed_numel))
    parts.block_gradients = per_block * nbytes
    parts.buckets = parts.gradients
    parts.notes.append(f"HFT: {f:g} of each block's matrices and norms frozen (an expectation: which ones is drawn); "
                       "embedding, final norm and head train.")  # fmt: skip


def _sparse_entries(shape: ModelShape, plan: FitPlan) -> dict[str, float]:
    matrices = shape.matrices()
    if plan.sparse_density is not None:
        return {k: plan.sparse_density * o * i for k, (o, i) in matrices.items()}
    rank = plan.sparse_rank or 8
    return {k: min((o + i) * rank, o * i) for k, (o, i) in matrices.items()}


def _lift(shape: ModelShape, plan: FitPlan, parts: _Parts) -> None:
    nbytes, entries = DTYPE_BYTES[plan.dtype], _sparse_entries(shape, plan)
    per_block = sum(entries.values())
    selected = shape.layers * per_block
    state = 12 + (0 if nbytes == 4 else 4)  # int32 index, two fp32 moments (+ an fp32 master of bf16/fp16 weights)
    parts.trainable, parts.optimizer = int(selected), selected * state
    parts.modes = ["sampled"] * shape.layers
    parts.final_norm_trains = parts.head_trains = False
    if plan.strategy != "single":  # more than one process: sparse_grad='auto' keeps dense gradients, masked
        dense = shape.layers * shape.block_matrix_numel * nbytes
        parts.gradients = parts.buckets = dense
        parts.block_gradients = shape.block_matrix_numel * nbytes
    else:  # fp32 gradient per entry, CSR column per entry and row pointers per matrix (lightning_ft.sparse.sampled)
        parts.gradients = 4 * selected
        rows = sum(out + 1 for out, _ in shape.matrices().values())
        parts.other = 4 * selected + 4 * shape.layers * rows
    if plan.accelerator == "cpu":  # the union of every mask since theta_0, int64 on the host (= the device here)
        parts.other += 8 * selected
    parts.notes.append(f"LIFT: {selected / max(1, shape.layers * shape.block_matrix_numel):.4f} of the block "
                       f"matrices' entries train; compact AdamW state of {state} bytes per entry; embedding, norms "
                       "and head frozen.")  # fmt: skip


def _galore_state(out: int, inp: int, rank: int, nbytes: int) -> tuple[float, float]:
    """Bytes of GaLore's moments and basis for one ``out x in`` matrix, as ``(row-sharded, replicated)`` under FSDP2:
    a tall matrix's ``out x r`` moments are sharded by rows and its ``r x in`` basis replicated; a wide one's
    ``out x r`` basis is sharded and its ``r x in`` moments replicated."""
    if out >= inp:
        return 2 * rank * out * nbytes, rank * inp * nbytes
    return rank * out * nbytes, 2 * rank * inp * nbytes


def _owlore(shape: ModelShape, plan: FitPlan, parts: _Parts) -> None:
    nbytes, rank = DTYPE_BYTES[plan.dtype], plan.galore_rank
    gamma = plan.active_blocks or max(1, round(OWLORE_ACTIVE_FRACTION * shape.layers))
    matrices = shape.matrices()
    projected = {k: m for k, m in matrices.items() if rank and min(m) > rank}
    plain = shape.block_numel - sum(o * i for o, i in projected.values())
    largest_plain = max([o * i for k, (o, i) in matrices.items() if k not in projected] + [2 * shape.hidden])
    for block in range(gamma):
        parts.train(plain, nbytes, largest_plain)
        for out, inp in projected.values():
            parts.trainable += out * inp
            parts.gradients += out * inp * nbytes  # dropped by GaLore's step: not kept into the next forward
            sharded, replicated = _galore_state(out, inp, rank, nbytes)
            parts.optimizer += sharded
            parts.optimizer_replicated += replicated
        parts.modes[block] = "train"
    parts.train(shape.embed_numel + shape.head_numel + shape.hidden, nbytes, shape.embed_numel)
    if projected:
        big = max(o * i for o, i in projected.values())
        parts.galore_step = big * 4 * 3 + (0 if nbytes == 4 else big * 4)
        if plan.strategy == "fsdp2":  # the gathered fp32 gradient and its SVD factors, then the rows' update copies
            parts.galore_step = big * 4 * 2 + parts.galore_step / plan.devices
    parts.block_gradients = shape.block_numel * nbytes
    parts.buckets = (shape.layers * shape.block_numel + shape.embed_numel + shape.head_numel + shape.hidden) * nbytes
    parts.notes.append(
        f"OwLore: {gamma} of {shape.layers} blocks train at a time (gradients and optimizer state), "
        f"the others pass gradients through to the embedding; "
        f"{f'GaLore rank {rank} on {len(projected)} matrix kinds' if projected else 'plain AdamW'}."
    )


_METHODS = {"full_ft": _full_ft, "lora": _lora, "hft": _hft, "lift": _lift, "owlore": _owlore}


# ------------------------------------------------------------------------------------------------ the estimate
def estimate(shape: ModelShape, plan: FitPlan) -> MemoryEstimate:
    """The per-device memory of ``plan`` on ``shape`` (see the module docstring for the formulas).

    Raises:
        UserError: The plan is refused (:func:`check_plan`).
    """
    check_plan(plan, shape)
    parts = _base(shape, plan)
    _METHODS[plan.method](shape, plan, parts)
    c = 4 if plan.quantization != "none" else DTYPE_BYTES[plan.dtype]
    full, ckpt, block = activation_bytes(
        shape, parts.modes, c, plan.batch_size * plan.seq_len, final_norm_trains=parts.final_norm_trains,
        head_trains=parts.head_trains, hft_frozen=plan.hft_frozen, lora_rank=plan.lora_rank,
        lora_targets=plan.lora_targets,
    )  # fmt: skip
    saved = ckpt if plan.checkpointing else full
    recompute = block if plan.checkpointing else 0.0
    logits = plan.batch_size * plan.seq_len * shape.vocab
    loss_forward, loss_backward = (c + 8) * logits, 12 * logits  # logits, their fp32 copy, its log-softmax
    shard = plan.devices if plan.strategy == "fsdp2" else 1
    weights, grads = parts.weights / shard, parts.gradients / shard
    optimizer = parts.optimizer / shard + parts.optimizer_replicated
    kept, other = parts.kept_gradients / shard, parts.other / shard
    step_temp = max(parts.moment_all / shard if plan.accelerator == "gpu" else 2 * parts.moment_largest,
                    parts.galore_step)  # fmt: skip
    comm_fwd, comm_bwd = _buffers(plan, parts)
    phases = {
        "forward": kept + saved + loss_forward + comm_fwd,
        "backward": saved + max(loss_backward, recompute) + comm_fwd,
        "backward end": grads + block + comm_bwd,
        "step": grads + step_temp + (comm_bwd if plan.strategy == "ddp" else 0.0),
    }
    phase = max(phases, key=lambda k: phases[k])
    total = weights + optimizer + other + phases[phase]
    notes = [_adamw_note(plan), *parts.notes, *_plan_notes(plan, phase)]
    return MemoryEstimate(
        plan=plan, model=shape, trainable=parts.trainable, weights=_up(weights), gradients=_up(grads),
        optimizer=_up(optimizer), activations=_up(saved + recompute), activations_no_ckpt=_up(full),
        activations_ckpt=_up(ckpt + block), loss=_up(max(loss_forward, loss_backward)), buffers=_up(comm_bwd),
        other=_up(other), step_temporaries=_up(step_temp), peak_phase=phase, total=_up(total), notes=tuple(notes),
    )  # fmt: skip


def _buffers(plan: FitPlan, parts: _Parts) -> tuple[float, float]:
    """Communication buffers ``(forward and backward, end of backward)``."""
    if plan.strategy == "ddp":
        return parts.buckets, parts.buckets
    if plan.strategy == "fsdp2":
        gathered = parts.root_weights + parts.block_weights
        return gathered, gathered + parts.block_gradients
    return 0.0, 0.0


def _adamw_note(plan: FitPlan) -> str:
    if plan.method == "lift":
        return "LIFT's compact AdamW keeps 2 fp32 moments per selected entry (plus its int32 index)."
    dtype = "fp32" if plan.dtype == "float32" or plan.method == "lora" else plan.dtype
    return (f"AdamW keeps 2 moments per trainable element in the tensor's dtype ({dtype} here: torch.optim.AdamW "
            "allocates them like the parameter).")  # fmt: skip


def _plan_notes(plan: FitPlan, phase: str) -> list[str]:
    notes = [(f"The peak is reached at the {phase} phase; Lightning runs the forward pass before zero_grad, so the "
             "previous step's gradients are still held during it."),
             ("Every position is labelled: all B x T logits go through the loss (CausalLMModule keeps only the "
             "labelled positions' logits when some carry no label, which lowers that term).")]  # fmt: skip
    if plan.strategy == "fsdp2":
        notes.append(f"FSDP2 divides weights, gradients and optimizer state by {plan.devices} and gathers the root "
                     "group (embedding, final norm, head) and one block at a time.")  # fmt: skip
    if plan.strategy == "ddp":
        notes.append(
            "DDP's gradient buckets mirror the gradients of every tensor that trains when DDP wraps the model."
        )
    if plan.accelerator == "gpu":
        notes.append("Not included: the CUDA context and allocator fragmentation (typically 0.5-1 GiB).")
    return notes


def _up(value: float) -> int:
    return math.ceil(value)
