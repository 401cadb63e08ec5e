"""Check ``lightning-ft estimate`` against measured peaks of SmolLM2-135M fits on this CPU, and tabulate Llama-2.

Rows (each in its own subprocess, one after the other): full fine-tuning, LoRA r=8 on every linear layer, HFT
(``HalfFineTuning``), LIFT (``SparseFineTuning(PrincipalWeights)`` with a rank-8 budget, as configs/sparse_lift.yaml)
and OwLore (``LayerwiseSampling(preset="owlore")``: 5 of 30 blocks, GaLore r=256), plus full fine-tuning and LoRA
with activation checkpointing. Every worker builds ``CausalLMModule(model="smollm2-135m", dtype="float32")`` and
fits ``--steps`` optimizer steps (AdamW, gradient clipping 1.0, as the configs) on random token sequences of
``--seq-len`` tokens, batch ``--batch-size``, every position labelled, with one thread.

What is measured: the resident set size (RSS) of the worker. ``VmHWM`` (the RSS high-water mark) is reset through
``/proc/self/clear_refs`` at the start of every training batch and read at its end; the training peak is the
highest of these, minus the RSS once the model, the data and the Trainer are built (which holds the weights and the
Python/PyTorch runtime), plus the bytes of the model's parameters (the weights, which the estimate counts).
transformers maps the safetensors file and a weight's pages become resident when it is first read, so the worker
reads every parameter once before it takes that baseline (otherwise the first forward pass would add the weights to
the measured increase a second time). Setup (the callbacks' ``setup``/``on_fit_start``: LIFT's first selection,
HFT's draw) happens before the first batch: its transient memory is not counted, what it keeps (LIFT's compact
state) is.

The workers run with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at its default 128 KiB: PyTorch's CPU allocator does
not cache, and with glibc's dynamic threshold (raised up to 32 MiB after large frees) freed tensors below that size
come back from, and may stay resident in, the heap, so RSS would count memory that no tensor holds.
``--malloc-rows`` (default: full_ft and lora) measures those rows again with glibc's defaults to show how much this
matters. The estimate is computed for the same settings with ``--accelerator cpu`` (AdamW's per-tensor step).

The activation formula is also checked alone, in fp32 and bf16: the bytes of the distinct storages autograd saves in
one forward pass (``torch.autograd.graph.saved_tensors_hooks``, parameters left out), with ``requires_grad`` set as
each method's callback sets it.

    python benchmarks/estimate_check.py                       # every row, then the Llama-2 tables
    python benchmarks/estimate_check.py --rows lora lift      # some rows (the results file is rewritten)
    python benchmarks/estimate_check.py --llama-only          # only results/estimate_llama.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from lightning_ft.planning import FitPlan, estimate, load_shape

LORA = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}
ROWS: dict[str, dict[str, Any]] = {
    "full_ft": {"label": "full fine-tuning", "method": "full_ft", "lr": 1e-4},
    "lora": {"label": "LoRA r=8, all linear layers", "method": "lora", "lr": 5e-4},
    "hft": {"label": "HFT (HalfFineTuning)", "method": "hft", "lr": 1e-4},
    "lift": {"label": "LIFT (SparseFineTuning, PrincipalWeights, rank-8 budget)", "method": "lift", "lr": 5e-4},
    "owlore": {"label": "OwLore (LayerwiseSampling preset owlore: 5/30 blocks, GaLore r=256)", "method": "owlore",
               "lr": 3e-4},
    "full_ft_ckpt": {"label": "full fine-tuning, checkpointing", "method": "full_ft", "lr": 1e-4, "ckpt": True},
    "lora_ckpt": {"label": "LoRA r=8, checkpointing", "method": "lora", "lr": 5e-4, "ckpt": True},
}  # fmt: skip
MIB = 2**20


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def _callbacks(method: str) -> list[Any]:
    from lightning_ft.callbacks import HalfFineTuning, LayerwiseSampling, PrincipalWeights, SparseFineTuning

    if method == "hft":
        return [HalfFineTuning(seed=0)]
    if method == "lift":
        rule = PrincipalWeights(filter_rank=32, reselect_every=20, largest=True, svd="full")
        return [SparseFineTuning(rule, targets=["attention", "mlp"], rank=8, seed=0, save_path="")]
    if method == "owlore":  # which blocks train does not change the memory: uniform draws skip the outlier pass
        return [LayerwiseSampling(preset="owlore", sampling="uniform", interval=10, seed=0)]
    return []


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Fit one row in this process and return its measured peak (see the module docstring)."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from lightning_ft.modules import CausalLMModule

    torch.set_num_threads(1)
    row, steps, batch, seq = ROWS[spec["row"]], spec["steps"], spec["batch_size"], spec["seq_len"]
    L.seed_everything(0)
    module = CausalLMModule(
        model="smollm2-135m", dtype="float32", peft=LORA if row["method"] == "lora" else None,
        learning_rate=row["lr"], warmup_steps=0, gradient_checkpointing=row.get("ckpt", False), output_dir="",
    )  # fmt: skip
    vocab = module.backbone.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (steps * batch, seq), generator=generator)
    data = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids]
    peaks: list[int] = []
    times: list[float] = []

    class Probe(L.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            _reset_peak()
            self.start = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            peaks.append(_status_kb("VmHWM") * 1024)
            times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            gradient_clip_val=1.0, callbacks=[*_callbacks(row["method"]), Probe()], default_root_dir=root,
        )  # fmt: skip
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in module.parameters()}
        weights = sum(storages.values())
        with torch.no_grad():  # transformers maps the weights file: make every weight page resident before the baseline
            for param in module.parameters():
                param.sum()
        built = _status_kb("VmRSS") * 1024
        trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=batch))
    return {
        "weights": weights, "rss_built": built, "step_peaks": peaks, "step_times": times,
        "measured": max(peaks) - built + weights,
        "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
    }  # fmt: skip


def _spawn(row: str, args: argparse.Namespace, fixed_mmap_threshold: bool = True) -> dict[str, Any]:
    spec = json.dumps({"row": row, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fmt: skip
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if fixed_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True, env=env,
                          check=False)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{row} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(row=row, wall_s=time.perf_counter() - start)
    return result


def plan_of(row: str, args: argparse.Namespace) -> FitPlan:
    """The estimate's plan for a measured row."""
    spec = ROWS[row]
    return FitPlan(method=spec["method"], dtype="float32", batch_size=args.batch_size, seq_len=args.seq_len,
                   checkpointing=spec.get("ckpt", False), accelerator="cpu")  # fmt: skip


def command_of(plan: FitPlan) -> str:
    """The ``lightning-ft estimate`` command line of a plan (the options that differ from the defaults)."""
    parts = [f"lightning-ft estimate --model {{model}} --method {plan.method} --dtype {plan.dtype}",
             f"--batch-size {plan.batch_size} --seq-len {plan.seq_len}"]  # fmt: skip
    if plan.quantization != "none":
        parts.append(f"--quantization {plan.quantization}")
    if plan.devices > 1:
        parts.append(f"--devices {plan.devices} --strategy {plan.strategy}")
    if plan.checkpointing:
        parts.append("--checkpointing")
    if plan.method == "owlore" and plan.galore_rank != 256:
        parts.append(f"--galore-rank {plan.galore_rank}")
    if plan.accelerator != "gpu":
        parts.append(f"--accelerator {plan.accelerator}")
    return " ".join(parts)


def check(args: argparse.Namespace) -> None:
    """Measure the rows, compare them with the estimate and write ``results/estimate_check.md`` and ``.json``."""
    shape = load_shape("smollm2-135m")
    results = []
    for row in args.rows:
        measured = _spawn(row, args)
        plan = plan_of(row, args)
        est = estimate(shape, plan)
        measured.update(estimate=est.as_dict(), command=command_of(plan).format(model="smollm2-135m"),
                        ratio=est.total / measured["measured"])  # fmt: skip
        results.append(measured)
        print(f"  {row}: estimate {est.total / MIB:.0f} MiB, measured {measured['measured'] / MIB:.0f} MiB, "
              f"ratio {measured['ratio']:.3f} ({measured['wall_s']:.0f} s)", flush=True)  # fmt: skip
    for row in args.malloc_rows:  # the same rows with glibc's dynamic mmap threshold: how much the setup matters
        default = _spawn(row, args, fixed_mmap_threshold=False)
        match = next(r for r in results if r["row"] == row)
        match["measured_default_malloc"] = default["measured"]
        print(f"  {row} (glibc default malloc): measured {default['measured'] / MIB:.0f} MiB", flush=True)
    saved = saved_check(args)
    out = HERE / "results" / "estimate_check"
    out.with_suffix(".json").write_text(json.dumps({"rows": results, "saved_tensors": saved}, indent=1) + "\n")
    out.with_suffix(".md").write_text(_check_markdown(results, saved, args))


def _check_markdown(results: list[dict[str, Any]], saved: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "# `lightning-ft estimate` against measured peaks (SmolLM2-135M, CPU)", "",
        f"Command: `{' '.join(['python benchmarks/estimate_check.py', *sys.argv[1:]])}`", "",
        (f"Bundled SmolLM2-135M-Instruct in fp32 on CPU (1 thread), batch {args.batch_size}, {args.seq_len} random "
        f"tokens per sequence with every position labelled, AdamW, gradient clipping 1.0, {args.steps} optimizer "
        "steps per run, each row in its own subprocess. Measured = highest per-step RSS high-water mark minus the "
        "RSS once model, data and Trainer are built, plus the parameters' bytes (see the docstring of "
        "benchmarks/estimate_check.py for why). Estimate = `total` of the command in the last column."), "",
        ("| method | estimate MiB | measured MiB | ratio | peak phase | weights MiB | grads MiB | optimizer MiB | "
        "activations MiB | loss MiB | estimate command |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in results:
        e = r["estimate"]
        cells = [ROWS[r["row"]]["label"], f"{e['total'] / MIB:.0f}", f"{r['measured'] / MIB:.0f}", f"{r['ratio']:.3f}",
                 e["peak_phase"]] + [f"{e[k] / MIB:.0f}" for k in ("weights", "gradients", "optimizer", "activations",
                                                                   "loss")] + [f"`{r['command']}`"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    worst = max(results, key=lambda r: abs(r["ratio"] - 1))
    lines += ["", (f"Largest deviation: {ROWS[worst['row']]['label']} at {worst['ratio']:.3f} "
              f"({'within' if abs(worst['ratio'] - 1) <= 0.2 else 'outside'} 20%)."), ""]  # fmt: skip
    sensitivity = [r for r in results if "measured_default_malloc" in r]
    if sensitivity:
        lines += [("Measurement setup: the same rows without `MALLOC_MMAP_THRESHOLD_` (glibc's dynamic threshold), "
                   "where freed tensors may stay resident in the heap:"), "",
                  "| method | measured MiB, fixed threshold | measured MiB, glibc default | ratio of the estimate |",
                  "|---|---|---|---|"]  # fmt: skip
        for r in sensitivity:
            ratio = r["estimate"]["total"] / r["measured_default_malloc"]
            lines.append(f"| {ROWS[r['row']]['label']} | {r['measured'] / MIB:.0f} | "
                         f"{r['measured_default_malloc'] / MIB:.0f} | {ratio:.3f} |")  # fmt: skip
        lines += ["", ("The difference is memory glibc keeps resident after the tensors in it were freed (the "
                       "activations and logits of each step), not memory any tensor holds; the estimate counts "
                       "tensors, and leaves an allocator's own overhead (glibc's heap here, the CUDA caching "
                       "allocator's fragmentation on a GPU) out."), ""]  # fmt: skip
    lines += [("The activation formula alone, against the bytes autograd saves in one forward pass of the same batch "
               "(`torch.autograd.graph.saved_tensors_hooks`, parameters left out, no loss; `requires_grad` set as the "
               "method's callback sets it: HFT's seed-0 draw, LIFT's block matrices (the dense path keeps the same "
               "inputs as its sampled gradients), OwLore with blocks 0-4 active):"), "",
              "| method | dtype | formula MiB | saved MiB | ratio |", "|---|---|---|---|---|"]  # fmt: skip
    for r in saved:
        lines.append(f"| {r['row']} | {r['dtype']} | {r['estimate'] / MIB:.1f} | {r['saved'] / MIB:.1f} | "
                     f"{r['estimate'] / r['saved']:.3f} |")  # fmt: skip
    lines += ["", "Per-step peaks (MiB above the built state, before adding the weights back):", ""]
    for r in results:
        steps = ", ".join(f"{(p - r['rss_built']) / MIB:.0f}" for p in r["step_peaks"])
        lines.append(f"- {r['row']}: {steps} (weights {r['weights'] / MIB:.0f} MiB, step times "
                     f"{', '.join(f'{t:.1f}' for t in r['step_times'])} s)")  # fmt: skip
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ saved tensors
SAVED_ROWS: dict[str, dict[str, Any]] = {
    "full_ft": {"method": "full_ft"},
    "lora": {"method": "lora"},
    "hft": {"method": "hft"},  # HalfFineTuning's first draw with seed 0
    "lift": {"method": "lift"},  # the block matrices train, norms, embedding and head are frozen
    "owlore": {"method": "owlore"},  # blocks 0-4 train, the others pass gradients through to the embedding
}


def _freeze_as(module: Any, method: str) -> None:
    """Set ``requires_grad`` as ``method``'s callback would (HFT: its seed-0 draw)."""
    from lightning_ft.callbacks.half import hft_frozen
    from lightning_ft.core.layer_map import KIND_GROUPS, LayerMap

    layer_map = LayerMap.from_model(module.backbone)
    names = [info.name for info in layer_map]
    frozen = hft_frozen(layer_map, names, seed=0, index=0) if method == "hft" else set()
    for info in layer_map:
        param = module.backbone.get_parameter(info.name)
        if method == "lift":
            param.requires_grad_(info.kind in KIND_GROUPS["matrices"])
        elif method == "owlore":
            param.requires_grad_(info.block is None or info.block < 5)
        else:
            param.requires_grad_(info.name not in frozen)


def _saved_bytes(module: Any, ids: Any) -> int:
    """Bytes of the distinct storages autograd saves in one forward pass of ``module``, parameters left out."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(ids, torch.ones_like(ids))
    return sum(seen.values())


def saved_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Bytes of the tensors autograd saves in one forward pass (parameters left out), per row of ``SAVED_ROWS``."""
    import torch

    from lightning_ft.modules import CausalLMModule

    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    ids = torch.randint(0, 49152, (spec["batch_size"], spec["seq_len"]), generator=torch.Generator().manual_seed(0))
    for row, knobs in SAVED_ROWS.items():
        peft = LORA if knobs["method"] == "lora" else None
        module = CausalLMModule(model="smollm2-135m", dtype=spec["dtype"], peft=peft, output_dir="")
        if knobs["method"] in ("hft", "lift", "owlore"):
            _freeze_as(module, knobs["method"])
        out[row] = _saved_bytes(module, ids)
        del module
    return out


def saved_check(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The activation formula against the bytes autograd saves, in fp32 and bf16."""
    shape, rows = load_shape("smollm2-135m"), []
    for dtype in ("float32", "bfloat16"):
        spec = {"dtype": dtype, "batch_size": args.batch_size, "seq_len": args.seq_len}
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
        proc = subprocess.run([sys.executable, __file__, "--saved-worker", json.dumps(spec)], capture_output=True,
                              text=True, env=env, check=False)  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"saved tensors ({dtype}) failed:\n{proc.stderr[-4000:]}")
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
        for row, knobs in SAVED_ROWS.items():
            plan = FitPlan(dtype=dtype, batch_size=args.batch_size, seq_len=args.seq_len, **knobs)
            est = estimate(shape, plan).activations_no_ckpt
            rows.append({"row": row, "dtype": dtype, "estimate": est, "saved": measured[row]})
            print(f"  saved tensors {row} {dtype}: estimate {est / MIB:.1f} MiB, saved {measured[row] / MIB:.1f} MiB")
    return rows


# ------------------------------------------------------------------------------------------------ Llama-2 tables
LLAMA_ROWS: list[tuple[str, dict[str, Any], str | None]] = [
    ("full_ft", {"method": "full_ft"}, None),
    ("lora r=8", {"method": "lora"}, None),
    ("QLoRA r=8 (nf4)", {"method": "lora", "quantization": "nf4"}, None),
    ("hft", {"method": "hft"}, None),
    ("lift (rank-8 budget)", {"method": "lift"}, None),
    ("lift (rank-8 budget), DDP", {"method": "lift"}, "ddp"),
    ("owlore (GaLore r=256)", {"method": "owlore"}, None),
    ("owlore (GaLore r=256), DDP", {"method": "owlore"}, "ddp"),
    ("owlore (no GaLore)", {"method": "owlore", "galore_rank": 0}, None),
]


def llama(args: argparse.Namespace) -> None:
    """Write ``results/estimate_llama.md`` and ``.json``: every method on 1, 8 and 64 devices."""
    lines = [
        "# `lightning-ft estimate` for Llama-2-7B and Llama-2-70B", "",
        ("Per-device peak of a fit with bf16 weights, batch 1 per device, sequence length 2048, activation "
        "checkpointing on; FSDP2 on more than one device, except for the rows named DDP: DDP, marked *ddp*. "
        "Generated by "
        "`python benchmarks/estimate_check.py --llama-only`; each cell is the `total` of "
        "`lightning-ft estimate --model configs/models/<model>.json --method <method> --dtype bfloat16 "
        "--batch-size 1 --seq-len 2048 --checkpointing [--devices N --strategy fsdp2|ddp]`."), "",
    ]  # fmt: skip
    dump = []
    for model in ("llama-7b", "llama-70b"):
        shape = load_shape(str(ROOT / "configs" / "models" / f"{model}.json"))
        lines += [f"## {model} ({shape.total_numel / 1e9:.2f} B parameters)", "",
                  ("| method | 1 device GiB | 8 devices GiB | 64 devices GiB | weights / grads / optimizer / "
                  "activations / loss at 1 device (GiB) |"), "|---|---|---|---|---|"]  # fmt: skip
        for label, knobs, multi in LLAMA_ROWS:
            cells, breakdown = [], ""
            for devices in (1, 8, 64):
                strategy = "single" if devices == 1 else multi or "fsdp2"
                plan = FitPlan(dtype="bfloat16", batch_size=1, seq_len=2048, checkpointing=True, devices=devices,
                               strategy=strategy, **knobs)  # fmt: skip
                est = estimate(shape, plan)
                dump.append({"model": model, "row": label, **est.as_dict()})
                cells.append(f"{est.total / 2**30:.1f}" + (" *ddp*" if strategy == "ddp" else ""))
                if devices == 1:
                    breakdown = " / ".join(f"{getattr(est, k) / 2**30:.1f}" for k in
                                           ("weights", "gradients", "optimizer", "activations", "loss"))  # fmt: skip
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {breakdown} |")
        lines.append("")
    lines += ["Not included: the CUDA context and allocator fragmentation (typically 0.5-1 GiB per GPU).", ""]
    out = HERE / "results" / "estimate_llama"
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(dump, indent=1) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--saved-worker", help=argparse.SUPPRESS)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--malloc-rows", nargs="*", choices=list(ROWS), default=["full_ft", "lora"],
                        help="rows measured again with glibc's default malloc settings (none: skip)")  # fmt: skip
    parser.add_argument("--llama-only", action="store_true")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.saved_worker:
        print(json.dumps(saved_worker(json.loads(args.saved_worker))))
        return
    if not args.llama_only:
        check(args)
    llama(args)


if __name__ == "__main__":
    main()
