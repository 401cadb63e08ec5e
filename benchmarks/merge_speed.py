"""Merge speed and memory: `lightning-ft merge` against mergekit 0.1.5 on three SmolLM2-135M "fine-tunes".

    python benchmarks/merge_speed.py                                   # mergekit-yaml from $MERGEKIT_YAML or PATH
    MERGEKIT_YAML=/tmp/mkv/bin/mergekit-yaml python benchmarks/merge_speed.py --repeats 3
    python benchmarks/merge_speed.py --name merge_speed_quick --repeats 1 --no-extras

The inputs are cheap stand-ins for fine-tunes, enough for a speed/memory benchmark (not for quality): the bundled
SmolLM2-135M plus seeded Gaussian noise (0.01 x each tensor's std) on every floating tensor, saved as three HF
folders under ``benchmarks/runs/merge_speed/`` (git-ignored, reused). One recipe, a mergekit YAML that both tools run
unchanged (TIES, density 0.5, weight 1, dtype float32), is merged by each tool in its own subprocess, the two
alternating ``--repeats`` times; wall time and peak RSS (``ru_maxrss`` of that child, from ``os.wait4``) are taken
per run and the medians compared. Our extras, measured the same way: TIES + LiNeS for merging (beta 0.5, two passes
over the inputs), ``sparse-apply`` of two 1%-dense sparse fine-tunings, ``decompress`` of a ComPEFT artifact, and the
floor (the Python process that only imports the command). mergekit is LGPL: install it into its own throwaway
environment (``python -m venv /tmp/mkv && /tmp/mkv/bin/pip install mergekit==0.1.5`` with a CPU torch), never ours.

Writes ``benchmarks/results/<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE / "runs" / "merge_speed"
SEEDS = (1, 2, 3)


def _build_inputs() -> dict[str, Any]:
    """Create (once) the three perturbed copies, two sparse artifacts and one ComPEFT artifact; runs in a child."""
    code = f"""
import json, shutil, sys, torch
from pathlib import Path
from lightning_ft.assets import resolve_model
from lightning_ft.core.weights import SafetensorsReader, TensorSpec, stream_hf_folder
root, base = Path({str(ROOT)!r}), Path(resolve_model("smollm2-135m"))
reader = SafetensorsReader(base)
keys = sorted(reader.keys())
for seed in {SEEDS!r}:
    out = root / f"ft{{seed}}"
    if (out / "model.safetensors").is_file():
        continue
    gen = torch.Generator().manual_seed(seed)
    layout = [TensorSpec(k, reader.dtype(k), reader.shape(k)) for k in keys]
    with stream_hf_folder(base, out, layout, overwrite=True) as writer:
        for k in keys:
            t = reader.get(k)
            if t.is_floating_point():
                t = t + 0.01 * t.float().std() * torch.randn(t.shape, generator=gen, dtype=t.dtype)
            writer.write(k, t)
from lightning_ft.sparse import SparseDelta
for seed in (1, 2):
    path = root / f"sparse{{seed}}.safetensors"
    if path.is_file():
        continue
    gen = torch.Generator().manual_seed(100 + seed)
    delta = SparseDelta(base=str(base))
    for k in keys:
        shape, n = reader.shape(k), reader.get(k).numel()
        idx = torch.randperm(n, generator=gen)[: max(1, n // 100)].sort().values.to(torch.int32)
        delta.shapes[k], delta.indices[k] = shape, idx
        delta.values[k] = 0.01 * torch.randn(idx.numel(), generator=gen)
    delta.save(path)
compeft = root / "ft1.compeft.safetensors"
if not compeft.is_file():
    from lightning_ft.merging import compress
    compress(str(base), str(root / "ft1"), str(compeft), density=0.1)
print(json.dumps({{"base": str(base)}}))
"""
    ROOT.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _recipe(base: str) -> Path:
    """The mergekit recipe both tools run."""
    recipe = {
        "merge_method": "ties", "base_model": base, "dtype": "float32",
        "models": [{"model": str(ROOT / f"ft{s}"), "parameters": {"weight": 1.0, "density": 0.5}} for s in SEEDS],
    }  # fmt: skip
    path = ROOT / "ties.yml"
    path.write_text(json.dumps(recipe, indent=2))  # JSON is YAML
    return path


def _measure(argv: list[str], output: Path | None) -> dict[str, Any]:
    """Wall time and peak RSS of one child process (``os.wait4``: that child's own rusage)."""
    if output is not None:
        shutil.rmtree(output, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{err[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def _same_tensors(ours: Path, theirs: Path) -> dict[str, Any]:
    """How far mergekit's output is from ours (max abs difference, tensors compared), in a child."""
    code = f"""
import json, torch
from lightning_ft.core.weights import SafetensorsReader
a, b = SafetensorsReader({str(ours)!r}), SafetensorsReader({str(theirs)!r})
worst, equal, n = 0.0, 0, 0
for k in a.keys():
    if k not in b.files:
        continue
    x, y = a.get(k).float(), b.get(k).float()
    n += 1; equal += int(torch.equal(x, y)); worst = max(worst, float((x - y).abs().max()))
print(json.dumps({{"tensors": n, "bit_identical": equal, "max_abs_diff": worst}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(r[key] for r in rows), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="merge_speed")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each tool")
    parser.add_argument("--no-extras", action="store_true", help="skip LiNeS, sparse-apply, decompress, floor")
    parser.add_argument("--note", default="other work shared the machine, so absolute times are noisy",
                        help="what else ran on the machine, written into the report")
    args = parser.parse_args()
    mergekit = os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")
    inputs = _build_inputs()
    base, recipe = inputs["base"], _recipe(inputs["base"])
    ours_cmd = [sys.executable, "-m", "lightning_ft.cli", "merge", "--config", str(recipe), "--output"]
    kit_cmd = [mergekit, str(recipe)] if mergekit else None
    rows: dict[str, list[dict[str, Any]]] = {"ours": [], "mergekit": []}
    for _ in range(args.repeats):
        rows["ours"].append(_measure([*ours_cmd, str(ROOT / "out_ours")], ROOT / "out_ours"))
        if kit_cmd:
            rows["mergekit"].append(_measure([*kit_cmd, str(ROOT / "out_mergekit")], ROOT / "out_mergekit"))
    summary: dict[str, Any] = {"ours": {k: _median(rows["ours"], k) for k in ("seconds", "peak_rss_mb")}}
    if kit_cmd:
        summary["mergekit"] = {k: _median(rows["mergekit"], k) for k in ("seconds", "peak_rss_mb")}
        summary["ratio_ours_over_mergekit"] = {
            k: round(summary["ours"][k] / summary["mergekit"][k], 3) for k in ("seconds", "peak_rss_mb")}  # fmt: skip
        summary["agreement"] = _same_tensors(ROOT / "out_ours", ROOT / "out_mergekit")
    sizes = {"inputs_gb": round(sum((ROOT / f"ft{s}" / "model.safetensors").stat().st_size for s in SEEDS) / 1e9
                                + (Path(base) / "model.safetensors").stat().st_size / 1e9, 2),
             "output_gb": round((ROOT / "out_ours" / "model.safetensors").stat().st_size / 1e9, 2)}  # fmt: skip
    command = " ".join(["python", "benchmarks/merge_speed.py", *sys.argv[1:]])
    if mergekit and "MERGEKIT_YAML" in os.environ:
        command = f"MERGEKIT_YAML={os.environ['MERGEKIT_YAML']} {command}"
    extras: dict[str, Any] = {}
    result = {"command": command, "mergekit_yaml": mergekit, "summary": summary, "runs": rows, "extras": extras,
              "sizes": sizes, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "note": args.note}  # fmt: skip
    _write(args.name, result)  # written after each stage, so an interrupted run keeps what it measured
    if not args.no_extras:
        lines = json.loads(recipe.read_text())
        lines["lines"] = {"beta": 0.5}
        lines_recipe = ROOT / "ties_lines.yml"
        lines_recipe.write_text(json.dumps(lines, indent=2))
        cli = [sys.executable, "-m", "lightning_ft.cli"]
        commands = {
            "sparse-apply (2 x 1% sparse)": [*cli, "sparse-apply", "--base", base, "--sft",
                                             str(ROOT / "sparse1.safetensors"), str(ROOT / "sparse2.safetensors"),
                                             "--output"],
            "decompress (ComPEFT 10%)": [*cli, "decompress", "--base", base, "--artifact",
                                         str(ROOT / "ft1.compeft.safetensors"), "--output"],
            "ties + LiNeS (beta 0.5)": [*cli, "merge", "--config", str(lines_recipe), "--output"],
        }  # fmt: skip
        extras["floor: import lightning_ft.merging.cli"] = _measure(
            [sys.executable, "-c", "import lightning_ft.merging.cli"], None
        )
        for label, argv in commands.items():
            out = ROOT / "out_extra"
            extras[label] = _measure([*argv, str(out)], out)
            _write(args.name, result)


def _write(name: str, result: dict[str, Any]) -> None:
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    s = result["summary"]
    lines = [
        f"# Merge speed and memory: lightning-ft merge vs mergekit 0.1.5 ({name})", "",
        (f"Command: `{result['command']}` ({result['machine']}; {result.get('note', '')}: the ratios come from runs "
         "interleaved in this one invocation, medians)."), "",
        ("Recipe: TIES, density 0.5, weight 1, dtype float32, three SmolLM2-135M \"fine-tunes\" (the bundled model "
         "plus seeded noise, stand-ins for a speed/memory benchmark only). Inputs "
         f"{result['sizes']['inputs_gb']} GB (base + 3), output {result['sizes']['output_gb']} GB."), "",
        "| tool | wall time (s, median) | peak RSS (MB, median) | runs |", "|---|---|---|---|",
    ]  # fmt: skip
    for tool in ("ours", "mergekit"):
        if tool in s:
            runs = ", ".join(f"{r['seconds']} s / {r['peak_rss_mb']} MB" for r in result["runs"][tool])
            lines.append(f"| {tool} | {s[tool]['seconds']} | {s[tool]['peak_rss_mb']} | {runs} |")
    if "ratio_ours_over_mergekit" in s:
        r, a = s["ratio_ours_over_mergekit"], s["agreement"]
        lines += ["", (f"Ours / mergekit: wall time **{r['seconds']}**, peak RSS **{r['peak_rss_mb']}** "
                       "(goal: RSS at most 0.333, time at most 1.0)."), "",
                  (f"Same result: {a['bit_identical']} of {a['tensors']} tensors bit-identical, max abs difference "
                   f"{a['max_abs_diff']:.3g}.")]  # fmt: skip
    else:
        lines += ["", "mergekit-yaml was not found (set MERGEKIT_YAML or put it on PATH): our figures alone."]
    if result["extras"]:
        lines += ["", "Our other commands on the same inputs (one run each):", "",
                  "| command | wall time (s) | peak RSS (MB) |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {k} | {v['seconds']} | {v['peak_rss_mb']} |" for k, v in result["extras"].items()]
    (HERE / "results" / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
