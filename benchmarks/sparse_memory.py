"""LIFT's memory and step time with and without dense weight gradients, against LoRA r=8 at the same trainable count.

Rows (each in its own subprocess, back to back, in rounds: every row once, then again):

* ``lora``: LoRA r=8 on every linear layer (2.44M trainable parameters on SmolLM2-135M);
* ``lift_dense``: LIFT (``PrincipalWeights``, rank-8 budget = 2.44M entries) with ``sparse_grad=False``: dense
  weight gradients of every eligible matrix, masked (the reference path);
* ``lift_sparse``: the same with ``sparse_grad=True``: weight gradients only at the selected entries;
* ``lift_sparse_closed``: ``lift_sparse`` with the snapshot's file handles closed right after its capture (the
  capture compares every tensor with the file through a memory map it keeps open, so the whole file stays mapped and
  counts in RSS a second time): the proposed change to ``lightning_ft/core/snapshot.py``, patched in the worker;
* ``full_ft``: full fine-tuning, for reference.

Each worker loads the bundled SmolLM2 and the bundled Rotten Tomatoes exactly as ``benchmarks/methods.py`` does,
resets the peak-RSS mark (``/proc/self/clear_refs``) after loading, fits ``--steps`` steps (batch 8, length 96),
and reports the peak RSS increase over the loaded state (VmHWM - VmRSS at load) and the median step time (steps 3
onwards), plus the peak reached before step 1 (setup, snapshot capture, the first selection) and the file-backed
RSS when step 1 starts. Ratios are taken against LoRA within each round, then the median over rounds. With
``--profile`` (default), each LIFT row then runs once more on its own (3 steps, then 3 under ``torch.profiler``) and
its top operators by self CPU time are reported; those runs are not part of the measured rounds.

    python benchmarks/sparse_memory.py                       # 2 rounds x 20 steps
    python benchmarks/sparse_memory.py --rounds 1 --steps 12 # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from methods import METHODS as _METHODS  # benchmarks/methods.py: the same rows and data setup

_LIFT = _METHODS["lift"]
ROWS: dict[str, dict[str, Any]] = {
    "lora": {"label": "LoRA r=8 (all linear)", **{k: v for k, v in _METHODS["lora"].items() if k != "label"}},
    "lift_dense": {"label": "LIFT rank-8, dense weight gradients (sparse_grad=False)", "sparse_grad": False},
    "lift_sparse": {"label": "LIFT rank-8, selected-entry gradients (sparse_grad=True)", "sparse_grad": True},
    "full_ft": {"label": "full fine-tuning", **{k: v for k, v in _METHODS["full_ft"].items() if k != "label"}},
}
ROWS["lift_sparse_closed"] = {
    "label": "LIFT rank-8, selected-entry gradients, snapshot file closed after capture (proposed core change)",
    "sparse_grad": True, "close_snapshot_files": True,
}  # fmt: skip
for _name in ("lift_dense", "lift_sparse", "lift_sparse_closed"):
    _callback = json.loads(json.dumps(_LIFT["callbacks"][0]))
    _callback["init_args"]["sparse_grad"] = ROWS[_name].pop("sparse_grad")
    ROWS[_name].update(module=_LIFT["module"], callbacks=[_callback])


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Fit one row in this process; return its peak RSS increase, step times and (optionally) a profile."""
    import lightning as L
    import torch
    from lightning.pytorch.cli import instantiate_class

    from lightning_ft.data import InstructionDataModule
    from lightning_ft.modules import CausalLMModule

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    row, steps = ROWS[spec["row"]], spec["steps"]
    L.seed_everything(0)
    module = CausalLMModule(model="smollm2-135m", warmup_steps=2, output_dir="", **row.get("module", {}))
    dm = InstructionDataModule(
        label_options=["positive", "negative"], val_size=50, test_size=0, batch_size=8, eval_batch_size=25,
        max_length=96, control_size=0, split_seed=1234, shuffle_seed=1234,
    )  # fmt: skip
    dm.tokenizer = module.tokenizer
    dm.setup("fit")

    def build(value: Any) -> Any:
        if isinstance(value, dict) and "class_path" in value:
            return instantiate_class((), {**value, "init_args": build(value.get("init_args", {}))})
        if isinstance(value, dict):
            return {k: build(v) for k, v in value.items()}
        return value

    if row.get("close_snapshot_files"):  # what the proposed change to core/snapshot.py does, patched in here
        from lightning_ft.core.snapshot import PretrainedSnapshot

        capture = PretrainedSnapshot._capture.__func__  # type: ignore[attr-defined]

        def _capture(cls: Any, *args: Any, **kwargs: Any) -> Any:
            snapshot = capture(cls, *args, **kwargs)
            snapshot._files.close()  # the comparison with the file mapped all of it; reads reopen it lazily
            return snapshot

        PretrainedSnapshot._capture = classmethod(_capture)  # type: ignore[method-assign,assignment]
    profile = spec["profile"] and spec["row"].startswith("lift")

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.prof: Any = None
            self.setup: dict[str, float] = {}
            self._start = 0.0

        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            if not self.times and not self.setup:  # setup, the first selection: their peak and file-backed RSS
                self.setup = {
                    "setup_peak_mb": _status_kb("VmHWM") / 1024,
                    "rss_file_start_mb": _status_kb("RssFile") / 1024,
                }
            if trainer.global_step == steps and profile:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.prof.__enter__()
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step <= steps:
                self.times.append(time.perf_counter() - self._start)

    clock = Clock()
    callbacks = [build(c) for c in row.get("callbacks", [])] + [clock]
    trainer = L.Trainer(
        max_steps=steps + (3 if profile else 0), accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        gradient_clip_val=1.0, callbacks=callbacks, default_root_dir=str(HERE / "runs"),
    )  # fmt: skip
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: the peak below is the fit's own
    rss_loaded, rss_file_loaded = _status_kb("VmRSS"), _status_kb("RssFile")
    trainer.fit(module, dm)
    peak = _status_kb("VmHWM")
    out: dict[str, Any] = {
        "peak_rss_increase_mb": (peak - rss_loaded) / 1024, "rss_loaded_mb": rss_loaded / 1024,
        "rss_file_loaded_mb": rss_file_loaded / 1024, "rss_file_end_mb": _status_kb("RssFile") / 1024,
        "setup_peak_increase_mb": clock.setup["setup_peak_mb"] - rss_loaded / 1024,
        "rss_file_start_mb": clock.setup["rss_file_start_mb"],
        "step_times": clock.times, "step_time": statistics.median(clock.times[2:]),
        "trainable": sum(s.numel for c in callbacks for s in getattr(c, "states", {}).values())
        or sum(p.numel() for p in module.parameters() if p.requires_grad),
    }  # fmt: skip
    if clock.prof is not None:
        clock.prof.__exit__(None, None, None)
        events = sorted(clock.prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        out["profile"] = [
            {"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / 3, "share": e.self_cpu_time_total / total,
             "calls_per_step": e.count / 3}
            for e in events[:12]
        ]  # fmt: skip
    return out


def _spawn(row: str, steps: int, profile: bool) -> dict[str, Any]:
    spec = json.dumps({"row": row, "steps": steps, "profile": profile})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled"}  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", spec], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{row} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(row=row, wall_s=time.perf_counter() - start)
    print(f"  {row}: peak +{result['peak_rss_increase_mb']:.0f} MB, step {result['step_time']:.3f} s "
          f"({result['wall_s']:.0f} s)", flush=True)  # fmt: skip
    return result


def report(
    rounds: list[dict[str, dict[str, Any]]], profiles: dict[str, Any], args: argparse.Namespace, command: str
) -> None:
    """Write ``results/<name>.md`` and ``.json``: per row, medians over rounds of the ratios to LoRA."""
    rows = []
    for name, spec in ROWS.items():
        runs = [r[name] for r in rounds if name in r]
        if not runs:
            continue
        rows.append({
            "row": name, "label": spec["label"], "trainable": runs[0]["trainable"],
            "peak_rss_increase_mb": statistics.median(r["peak_rss_increase_mb"] for r in runs),
            "step_time_s": statistics.median(r["step_time"] for r in runs),
            "peak_vs_lora": statistics.median(r[name]["peak_rss_increase_mb"] / r["lora"]["peak_rss_increase_mb"]
                                              for r in rounds),
            "peak_minus_lora_mb": statistics.median(r[name]["peak_rss_increase_mb"] - r["lora"]["peak_rss_increase_mb"]
                                                    for r in rounds),
            "step_vs_lora": statistics.median(r[name]["step_time"] / r["lora"]["step_time"] for r in rounds),
            "setup_peak_mb": statistics.median(r["setup_peak_increase_mb"] for r in runs),
            "rss_file_start_mb": statistics.median(r["rss_file_start_mb"] for r in runs),
        })  # fmt: skip
    out = HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(
        json.dumps({"rows": rows, "rounds": rounds, "profiles": profiles, "command": command}, indent=1)
    )
    lines = [
        "# LIFT without dense weight gradients: peak memory and step time against LoRA r=8",
        "",
        f"Command: `{command}`",
        "",
        (
            f"Bundled SmolLM2-135M-Instruct (fp32, CPU, {os.environ.get('BENCH_THREADS', '2')} thread(s)), "
            "bundled Rotten Tomatoes as instruction data, batch 8, "
            f"max length 96, AdamW, clip 1.0, {args.steps} steps per run; each row in its own subprocess, rows back to back "
            f"in {len(rounds)} round(s) in the order of the table. Peak RSS increase = VmHWM after the fit "
            "minus VmRSS after loading model and data (the peak mark reset after loading). Step time = median wall time "
            "of steps 3 onwards (forward, backward, clipping, optimizer). Ratios are to LoRA within a round, median over "
            "rounds. 'Before step 1' is the peak increase reached by setup and the first selection (snapshot capture, "
            "SVDs); 'file-backed RSS' is RssFile when step 1 starts (mapped file pages, which RSS counts once per "
            "mapping). Other engineers' jobs shared the 2-core machine during this run, so absolute times are noisy; only "
            "the ratios are meant to be compared."
        ),
        "",
        (
            "| row | trainable | peak RSS increase | vs LoRA | of which before step 1 | file-backed RSS at step 1 | "
            "step time | vs LoRA |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['trainable']:,} | {r['peak_rss_increase_mb']:.0f} MB | "
                     f"{r['peak_vs_lora']:.2f}x ({r['peak_minus_lora_mb']:+.0f} MB) | {r['setup_peak_mb']:.0f} MB | "
                     f"{r['rss_file_start_mb']:.0f} MB | {r['step_time_s']:.3f} s | {r['step_vs_lora']:.2f}x |")  # fmt: skip
    for name, prof in profiles.items():
        title = (
            f"Profile of `{name}` (torch.profiler over steps 4-6 of a separate run, top operators by self CPU time):"
        )
        lines += ["", title, "", "| operator | self ms / step | share | calls / step |", "|---|---|---|---|"]
        lines += [f"| `{p['op']}` | {p['self_ms_per_step']:.1f} | {p['share']:.1%} | {p['calls_per_step']:.0f} |"
                  for p in prof]  # fmt: skip
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--name", default="sparse_memory")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if "lora" not in args.rows:
        parser.error("--rows must include lora: every ratio is against it.")
    threads = os.environ.get("BENCH_THREADS")
    command = (
        (f"BENCH_THREADS={threads} " if threads else "")
        + "python benchmarks/sparse_memory.py "
        + " ".join(sys.argv[1:])
    )
    rounds = []
    for i in range(args.rounds):
        print(f"round {i + 1}/{args.rounds}", flush=True)
        rounds.append({row: _spawn(row, args.steps, False) for row in args.rows})
    profiles = {}
    if args.profile:  # separate short runs: the profiler's own memory and time stay out of the measured rounds
        print("profiles", flush=True)
        profiles = {row: _spawn(row, 3, True)["profile"] for row in args.rows if row.startswith("lift")}
    report(rounds, profiles, args, command.strip())


if __name__ == "__main__":
    main()
