"""``lightning-ft estimate``: the per-device memory of a fine-tuning run, before the fit starts.

    lightning-ft estimate --model smollm2-135m --method lora --batch-size 8 --seq-len 512
    lightning-ft estimate --model configs/models/llama-7b.json --method full_ft --devices 8 --strategy fsdp2 \\
        --checkpointing
    lightning-ft estimate --model configs/models/llama-70b.json --method lora --quantization nf4 --json

Nothing is loaded but the model's ``config.json``; the formulas are in :mod:`lightning_ft.planning.estimate`. A
mistake is answered with ``lightning-ft estimate: error: <sentence>`` (exit 2 for the command line, 1 otherwise; see
:mod:`lightning_ft.errors`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from lightning_ft.errors import SentenceParser, UserError
from lightning_ft.planning.estimate import (
    ACCELERATORS,
    DTYPE_BYTES,
    METHODS,
    QUANTIZATIONS,
    STRATEGIES,
    FitPlan,
    MemoryEstimate,
    estimate,
    parse_targets,
)
from lightning_ft.planning.model import load_shape

__all__ = ["main"]

PROG = "lightning-ft estimate"
# the knobs that only some methods read: option -> (FitPlan field, methods)
_KNOBS = {
    "--lora-rank": ("lora_rank", ("lora",)), "--lora-targets": ("lora_targets", ("lora",)),
    "--sparse-rank": ("sparse_rank", ("lift",)), "--sparse-density": ("sparse_density", ("lift",)),
    "--hft-frozen": ("hft_frozen", ("hft",)), "--active-blocks": ("active_blocks", ("owlore",)),
    "--galore-rank": ("galore_rank", ("owlore",)), "--freeze-bottom": ("freeze_bottom", ("full_ft", "lora")),
}  # fmt: skip


def _parser() -> SentenceParser:
    p = SentenceParser(
        prog=PROG,
        description="Estimate the per-device memory of a fine-tuning run from the model's config.json: weights, "
        "gradients, AdamW state, activations (with and without checkpointing), the loss's logits, communication "
        "buffers and the peak. Llama-like models only (llama, mistral, qwen2).",
        epilog="The formulas and what they assume: lightning_ft/planning/estimate.py. Checked against measured "
        "peaks: benchmarks/results/estimate_check.md.",
    )
    p.add_argument("--model", required=True, help="bundled alias (smollm2-135m), model folder holding config.json, "
                   "or a config JSON file (configs/models/llama-7b.json)")  # fmt: skip
    p.add_argument("--method", choices=METHODS, default="full_ft", help="fine-tuning method (default full_ft)")
    p.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bfloat16", help="weights' dtype (default bfloat16)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="none", help="bitsandbytes backbone (lora only)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per device and step (default 1)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--devices", type=int, default=1, help="number of devices (default 1)")
    p.add_argument("--strategy", choices=STRATEGIES, help="default: single on one device, else ddp (Lightning's)")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="activation checkpointing of every block (default off)")  # fmt: skip
    p.add_argument("--lora-rank", type=int, help="LoRA rank (default 8)")
    p.add_argument("--lora-targets", help="all-linear (default), attention, mlp, or kinds/peft names: attn_q,v_proj")
    p.add_argument("--sparse-rank", type=int, help="LIFT budget per matrix as a LoRA-equivalent rank (default 8)")
    p.add_argument("--sparse-density", type=float, help="LIFT budget as a fraction of the matrices' entries")
    p.add_argument("--hft-frozen", type=float, help="HFT's frozen fraction of each block (default 0.5)")
    p.add_argument("--active-blocks", type=int, help="OwLore/LISA blocks that train at a time (default 5/32 of them)")
    p.add_argument("--galore-rank", type=int, help="OwLore's GaLore rank, 0 for plain AdamW (default 256)")
    p.add_argument("--freeze-bottom", type=int, help="layer freezing: bottom blocks that never train (full_ft, lora)")
    p.add_argument("--train-embeddings", action="store_true", help="with --freeze-bottom, keep the embedding trainable")
    p.add_argument("--accelerator", choices=ACCELERATORS, default="gpu",
                   help="gpu (default) or cpu: AdamW's step temporaries differ")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the estimate as JSON (bytes) instead of a table")
    return p


def plan_from_args(args: argparse.Namespace) -> FitPlan:
    """The :class:`FitPlan` of parsed options.

    Raises:
        UserError: A knob is given for a method that does not read it.
    """
    knobs: dict[str, Any] = {}
    for option, (name, methods) in _KNOBS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if args.method not in methods:
            raise UserError(f"{option} applies to --method {' or '.join(methods)}, not {args.method}: drop it or "
                            f"change --method.")  # fmt: skip
        knobs[name] = parse_targets(value) if name == "lora_targets" else value
    if args.train_embeddings and not args.freeze_bottom:
        raise UserError("--train-embeddings only applies with --freeze-bottom: drop it or give --freeze-bottom.")
    strategy = args.strategy or ("single" if args.devices == 1 else "ddp")
    return FitPlan(
        method=args.method, dtype=args.dtype, quantization=args.quantization, batch_size=args.batch_size,
        seq_len=args.seq_len, devices=args.devices, strategy=strategy, checkpointing=args.checkpointing,
        freeze_embeddings=not args.train_embeddings, accelerator=args.accelerator, **knobs,
    )  # fmt: skip


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _rows(est: MemoryEstimate) -> list[tuple[str, int, str]]:
    """``(component, bytes, the phases it is held in)`` of the table."""
    ckpt = est.plan.checkpointing
    optimizer = "compact AdamW state" if est.plan.method == "lift" else "optimizer state (AdamW)"
    return [
        ("weights", est.weights, "all"),
        ("gradients", est.gradients, ("" if est.plan.method == "lift" else "forward, ") + "backward end, step"),
        (optimizer, est.optimizer, "all"),
        (f"activations{', checkpointed' if ckpt else ''}", est.activations, "forward, backward"),
        (f"activations{'' if ckpt else ', checkpointed'}", est.activations_no_ckpt if ckpt else est.activations_ckpt,
         "not in the total"),
        ("logits and loss", est.loss, "forward, backward"),
        ("communication buffers", est.buffers, "forward, backward" if est.plan.strategy != "ddp" else "all"),
        ("other (sparse indices)", est.other, "all"),
        ("optimizer-step temporaries", est.step_temporaries, "step"),
    ]  # fmt: skip


def render(est: MemoryEstimate) -> None:
    """Print the estimate as a table with its notes (rich)."""
    from rich.console import Console
    from rich.table import Table

    plan, shape = est.plan, est.model
    title = (f"{shape.name} ({shape.model_type}, {shape.total_numel / 1e9:.2f}B parameters): {plan.method}, "
             f"{plan.dtype}{'' if plan.quantization == 'none' else ' + ' + plan.quantization}, batch {plan.batch_size} "
             f"x {plan.seq_len} tokens, {plan.devices} device(s) ({plan.strategy})")  # fmt: skip
    table = Table(title=title, title_justify="left")
    table.add_column("per device")
    table.add_column("bytes", justify="right")
    table.add_column("held in phases")
    for name, nbytes, where in _rows(est):
        table.add_row(name, _size(nbytes), where)
    table.add_row("total (peak)", _size(est.total), est.peak_phase, style="bold")
    console = Console()
    console.print(table)
    share = est.trainable / shape.total_numel
    console.print(f"trainable: {est.trainable:,} of {shape.total_numel:,} parameters ({share:.2%})", highlight=False)
    for note in est.notes:
        console.print(f"- {note}", highlight=False)


def main(argv: Sequence[str]) -> None:
    """Run ``lightning-ft estimate`` with ``argv`` (the options after ``estimate``).

    Mistakes raise :class:`~lightning_ft.errors.UserError` (``UsageError`` for the command line), which
    ``lightning-ft`` (:func:`lightning_ft.cli.main`) prints as one sentence.
    """
    args = _parser().parse_args(list(argv))
    plan = plan_from_args(args)
    est = estimate(load_shape(args.model), plan)
    if args.json:
        print(json.dumps(est.as_dict(), indent=2))
    else:
        render(est)
