"""Kernel check and benchmark for a GPU machine: every ``lightning_ft.cuda_ext`` kernel against its PyTorch
reference on random and edge-case inputs (empty mask, all selected, non-contiguous, bf16/fp16 weights, int64
indices), then the speed ratio and peak memory of kernel versus reference in the same run.

    python benchmarks/cuda_kernels.py                 # writes benchmarks/results/kernels.md (card name in the title)
    python benchmarks/cuda_kernels.py --quick         # smaller shapes, fewer repeats

Exits with status 1 and a one-line message on a machine without CUDA, and with status 1 if any check fails
(the table is still written). It builds the kernels just in time (nvcc must be on PATH or under CUDA_HOME).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lightning_ft import cuda_ext  # noqa: E402
from lightning_ft.cuda_ext import _build, reference  # noqa: E402
from lightning_ft.sparse.compact import CompactState  # noqa: E402

ADAM: dict[str, Any] = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
Row = dict[str, Any]


def _clone_state(s: CompactState) -> CompactState:
    master = s.master.clone() if s.master is not None else None
    return CompactState(s.indices.clone(), s.exp_avg.clone(), s.exp_avg_sq.clone(), s.step, master)


def _ulp_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in units of ``b``'s dtype spacing at ``b`` (0 for identical tensors)."""
    if a.numel() == 0:
        return 0.0
    spacing = torch.finfo(b.dtype).eps * b.float().abs().clamp_min(torch.finfo(b.dtype).tiny)
    return float(((a.float() - b.float()).abs() / spacing).max())


def check_sparse_adamw(dev: torch.device) -> list[Row]:
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    cases = [
        ("fp32 random 10%", torch.float32, (257, 129), 0.1, torch.int32, False),
        ("bf16 weights 10%", torch.bfloat16, (257, 129), 0.1, torch.int32, False),
        ("fp16 weights 10%", torch.float16, (257, 129), 0.1, torch.int32, False),
        ("empty mask", torch.float32, (64, 64), 0.0, torch.int32, False),
        ("all selected", torch.float32, (64, 64), 1.0, torch.int32, False),
        ("int64 indices", torch.bfloat16, (64, 64), 0.5, torch.int64, False),
        ("non-contiguous grad", torch.float32, (96, 80), 0.3, torch.int32, True),
    ]
    for name, dtype, shape, density, idx_dtype, transposed in cases:
        numel = shape[0] * shape[1]
        k = int(round(density * numel))
        param = torch.randn(shape, generator=g).to(dev, dtype)
        indices = torch.randperm(numel, generator=g)[:k].sort().values.to(dev, idx_dtype)
        ref_p, ker_p = param.clone(), param.clone()
        ref_s = CompactState.create(ref_p, indices)
        ref_s.indices = ref_s.indices.to(idx_dtype)
        ker_s = _clone_state(ref_s)
        for _ in range(3):
            grad = torch.randn(shape[::-1] if transposed else shape, generator=g).to(dev, dtype)
            grad = grad.t() if transposed else grad
            reference.sparse_adamw_(ref_p, grad, ref_s, **ADAM)
            cuda_ext.sparse_adamw_(ker_p, grad, ker_s, **ADAM)
        untouched = torch.ones(numel, dtype=torch.bool, device=dev)
        untouched[indices.long()] = False
        same_rest = torch.equal(ref_p.view(-1)[untouched], ker_p.view(-1)[untouched])
        err = max(_ulp_err(ker_s.exp_avg, ref_s.exp_avg), _ulp_err(ker_s.exp_avg_sq, ref_s.exp_avg_sq))
        vals = ker_s.master if ker_s.master is not None else ker_p.view(-1)[indices.long()].float()
        ref_vals = ref_s.master if ref_s.master is not None else ref_p.view(-1)[indices.long()].float()
        err = max(err, _ulp_err(vals, ref_vals))
        weight_err = _ulp_err(ker_p.view(-1)[indices.long()], ref_p.view(-1)[indices.long()])
        ok = same_rest and err <= 64 and weight_err <= 1 and ker_s.step == ref_s.step
        rows.append(
            {
                "kernel": "sparse_adamw_",
                "case": name,
                "ok": ok,
                "detail": f"state {err:.1f} ulp, weight {weight_err:.1f} ulp, rest untouched {same_rest}",
            }
        )
    return rows


def check_copilot_error(dev: torch.device) -> list[Row]:
    rows = []
    g = torch.Generator(device="cpu").manual_seed(1)
    cases = [
        ("fp32 logits", torch.float32, (37, 1000), False),
        ("bf16 logits", torch.bfloat16, (37, 1000), False),
        ("fp16 logits, 3-D", torch.float16, (3, 5, 333), False),
        ("non-contiguous rows", torch.float32, (50, 64), True),
        ("one-entry vocab", torch.float32, (4, 1), False),
        ("large logits", torch.float32, (8, 50000), False),
        ("masked (-inf) logits", torch.bfloat16, (16, 300), False),
    ]
    for name, dtype, shape, transposed in cases:
        logits = (torch.randn(shape[::-1] if transposed else shape, generator=g) * 8).to(dev, dtype)
        logits = logits.t() if transposed else logits
        if name == "large logits":
            logits[:, 7] = 1e4
        if name.startswith("masked"):
            logits[:, :5] = float("-inf")
        targets = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=g).to(dev)
        targets.view(-1)[::3] = reference.IGNORE_INDEX
        for out_dtype in (torch.bfloat16, torch.float32):
            ref = reference.copilot_error(logits, targets, dtype=out_dtype)
            ker = cuda_ext.copilot_error(logits, targets, dtype=out_dtype)
            atol = 2**-8 if out_dtype == torch.bfloat16 else 1e-6  # one bf16 rounding step of a value in [-1, 1]
            err = float((ker.float() - ref.float()).abs().max()) if ref.numel() else 0.0
            ignored = targets == reference.IGNORE_INDEX
            zero_rows = bool((ker[ignored] == 0).all())
            ok = ker.shape == ref.shape and ker.dtype == ref.dtype and err <= atol and zero_rows
            rows.append(
                {
                    "kernel": "copilot_error",
                    "case": f"{name} -> {str(out_dtype)[6:]}",
                    "ok": ok,
                    "detail": f"max abs err {err:.2e} (tol {atol:.0e}), ignored rows zero {zero_rows}",
                }
            )
    return rows


def check_bits(dev: torch.device) -> list[Row]:
    rows = []
    g = torch.Generator(device="cpu").manual_seed(2)
    cases = {
        "random 1001": torch.rand(1001, generator=g) > 0.5,
        "empty": torch.zeros(0, dtype=torch.bool),
        "all ones 64": torch.ones(64, dtype=torch.bool),
        "float input": torch.randn(77, generator=g).relu(),
        "non-contiguous": (torch.rand(40, 33, generator=g) > 0.7)[:, ::3],
    }
    for name, bits in cases.items():
        bits = bits.to(dev)
        ref, ker = reference.pack_bits(bits), cuda_ext.pack_bits(bits)
        count = bits.numel()
        back_ref, back_ker = reference.unpack_bits(ref, count), cuda_ext.unpack_bits(ker, count)
        ok = torch.equal(ref, ker) and torch.equal(back_ref, back_ker)
        rows.append({"kernel": "pack_bits / unpack_bits", "case": name, "ok": ok, "detail": "bit-exact" if ok else
                     "MISMATCH"})  # fmt: skip
    return rows


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median milliseconds per call and the peak extra memory (MiB) of one call."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), peak


def speed(dev: torch.device, quick: bool) -> list[Row]:
    repeats = 5 if quick else 20
    rows: list[Row] = []
    shape = (1024, 2816) if quick else (4096, 11008)
    for dtype in (torch.float32, torch.bfloat16):
        for density in (0.01, 0.1):
            param = torch.randn(shape, device=dev, dtype=dtype)
            grad = torch.randn(shape, device=dev, dtype=dtype)
            k = int(density * param.numel())
            idx = torch.randperm(param.numel(), device=dev)[:k].sort().values
            s_ref, s_ker = CompactState.create(param, idx), CompactState.create(param, idx)
            ref = _time(lambda: reference.sparse_adamw_(param, grad, s_ref, **ADAM), repeats)
            ker = _time(lambda: cuda_ext.sparse_adamw_(param, grad, s_ker, **ADAM), repeats)
            rows.append(_speed_row("sparse_adamw_", f"{shape[0]}x{shape[1]} {str(dtype)[6:]}, density {density}",
                                   ref, ker))  # fmt: skip
    tokens, vocab = (512, 49152) if quick else (4096, 49152)
    logits = torch.randn(tokens, vocab, device=dev, dtype=torch.bfloat16)
    targets = torch.randint(0, vocab, (tokens,), device=dev)
    ref = _time(lambda: reference.copilot_error(logits, targets), repeats)
    ker = _time(lambda: cuda_ext.copilot_error(logits, targets), repeats)
    rows.append(_speed_row("copilot_error", f"{tokens}x{vocab} bf16 -> bf16", ref, ker))
    count = 10_000_000 if quick else 100_000_000
    bits = torch.rand(count, device=dev) > 0.9
    packed = cuda_ext.pack_bits(bits)
    ref = _time(lambda: reference.pack_bits(bits), max(2, repeats // 4))
    ker = _time(lambda: cuda_ext.pack_bits(bits), repeats)
    rows.append(_speed_row("pack_bits", f"{count:,} bits (reference goes through numpy on the host)", ref, ker))
    ref = _time(lambda: reference.unpack_bits(packed, count), max(2, repeats // 4))
    ker = _time(lambda: cuda_ext.unpack_bits(packed, count), repeats)
    rows.append(_speed_row("unpack_bits", f"{count:,} bits (reference goes through numpy on the host)", ref, ker))
    return rows


def _speed_row(kernel: str, case: str, ref: tuple[float, float], ker: tuple[float, float]) -> Row:
    return {"kernel": kernel, "case": case, "ref_ms": ref[0], "ker_ms": ker[0], "ratio": ref[0] / max(ker[0], 1e-9),
            "ref_mib": ref[1], "ker_mib": ker[1]}  # fmt: skip


def _nvcc_version() -> str:
    nvcc = _build.nvcc_path()
    if nvcc is None:
        return "none"
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return out.splitlines()[-1] if out else "unknown"


def write(path: Path, card: str, checks: list[Row], speeds: list[Row], seconds: float) -> None:
    lines = [
        f"# cuda_ext kernels on {card}",
        "",
        f"torch {torch.__version__}, nvcc {_nvcc_version()}, {platform.node()}; run took {seconds:.0f} s "
        "(`python benchmarks/cuda_kernels.py`).",
        "",
        "## Kernel against reference",
        "",
        "| kernel | case | ok | detail |",
        "|---|---|---|---|",
        *[f"| {r['kernel']} | {r['case']} | {'yes' if r['ok'] else '**NO**'} | {r['detail']} |" for r in checks],
        "",
        "## Speed (median of repeated calls, CUDA events) and peak extra memory of one call",
        "",
        "| kernel | shape | reference ms | kernel ms | speed-up | reference MiB | kernel MiB |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r['kernel']} | {r['case']} | {r['ref_ms']:.3f} | {r['ker_ms']:.3f} | {r['ratio']:.1f}x | "
          f"{r['ref_mib']:.1f} | {r['ker_mib']:.1f} |" for r in speeds],
        "",
    ]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "kernels.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/cuda_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); the CPU checks are in "
              "tests/cuda_ext.", file=sys.stderr)  # fmt: skip
        return 1
    os.environ.pop(cuda_ext.FORCE_REFERENCE_ENV, None)
    dev = torch.device("cuda")
    started = time.perf_counter()
    if cuda_ext.backend("sparse_adamw", torch.zeros(1, device=dev)) != "kernel":
        from lightning_ft.cuda_ext import dispatch

        print(f"the kernels did not build or load: {dispatch._library_error}", file=sys.stderr)
        return 1
    print(f"kernels built in {time.perf_counter() - started:.1f} s", flush=True)
    checks = check_sparse_adamw(dev) + check_copilot_error(dev) + check_bits(dev)
    for r in checks:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['kernel']}: {r['case']}: {r['detail']}", flush=True)
    speeds = speed(dev, args.quick)
    for r in speeds:
        print(f"{r['kernel']} {r['case']}: reference {r['ref_ms']:.3f} ms, kernel {r['ker_ms']:.3f} ms "
              f"({r['ratio']:.1f}x)", flush=True)  # fmt: skip
    card = torch.cuda.get_device_name(dev)
    write(args.output, card, checks, speeds, time.perf_counter() - started)
    print(f"wrote {args.output}")
    return 0 if all(r["ok"] for r in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
