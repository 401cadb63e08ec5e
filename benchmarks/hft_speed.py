"""HFT step time against full fine-tuning, in lock step, on the bundled SmolLM2-135M and Rotten Tomatoes.

Every method trains in its own subprocess (the rows of ``benchmarks/methods.py``: same module arguments, batch 8,
max length 96, clip 1.0), and the processes take turns step by step: one process runs a training step while all the
others wait on a pipe, so every step runs alone on the machine and the methods see the same background load,
interleaved. Each worker reports per step the wall time of the step (``on_train_batch_start`` to
``on_train_batch_end``) split into forward (with ``zero_grad``), backward and optimizer (clipping and ``step``).
Reported: median step time over the steps after the first two, as a ratio to full fine-tuning of the same
invocation, and the median of the per-step ratios (step ``i`` of a method over step ``i`` of full FT, the two run
back to back).

``--profile METHOD`` profiles steps 3 and 4 of that method with ``torch.profiler`` (outside the timed steps' medians:
the profiled steps are left out) and writes its top operators. ``--before DIR`` also runs the methods named
``<method>@before`` from the source tree ``DIR`` (``git worktree add DIR <commit>``), e.g. ``hft@before``, so the
code before a fix is timed in the same invocation.

    python benchmarks/hft_speed.py --name hft_speed --methods hft hft_reset owlore --steps 20
    python benchmarks/hft_speed.py --name hft_speed --methods hft hft@before --before /tmp/old --profile hft hft@before

Results go to ``benchmarks/results/<name>.md`` and ``.json``.
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

from methods import METHODS as ROWS  # benchmarks/methods.py: the same rows (this script's folder is on sys.path)

# One more row, for the floor: HFT that also freezes the (tied) embedding matrix, which the paper trains. On SmolLM2
# that matrix is 21% of the model, so it shows what training it costs; it is not the method's default.
METHODS = {
    **ROWS,
    "hft_embedding_frozen": {
        "label": "HFT + frozen embedding (not the paper's)",
        "module": {"learning_rate": 2e-4},
        "callbacks": [{"class_path": "lightning_ft.callbacks.HalfFineTuning",
                       "init_args": {"redraw": "fit", "seed": 0, "freeze_outside": ["embedding"]}}],
    },
}
HERE = Path(__file__).resolve().parent
SETTINGS = {"batch_size": 8, "max_length": 96, "warmup_steps": 10}
PROFILED = (3, 5)  # [first, last) step indices profiled when asked (left out of the medians)


# ---------------------------------------------------------------------------------------------- worker
def worker(spec: dict[str, Any]) -> None:
    """Train one method, one step per ``go`` line on stdin; report each step's phases on the protocol pipe."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # Lightning's and transformers' prints go to stderr; stdout carries the protocol only
    import lightning as L
    import torch
    from lightning.pytorch.cli import instantiate_class

    import lightning_ft
    from lightning_ft.data import InstructionDataModule
    from lightning_ft.modules import CausalLMModule

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    method = METHODS[spec["method"].split("@")[0]]
    L.seed_everything(0)
    module = CausalLMModule(model="smollm2-135m", warmup_steps=SETTINGS["warmup_steps"], output_dir="",
                            **method.get("module", {}))  # fmt: skip
    dm = InstructionDataModule(
        label_options=["positive", "negative"], val_size=50, test_size=100, batch_size=SETTINGS["batch_size"],
        eval_batch_size=25, max_length=SETTINGS["max_length"], control="humaneval", control_size=16,
        control_max_length=128, split_seed=1234, shuffle_seed=1234,
    )  # fmt: skip
    dm.tokenizer = module.tokenizer
    profile = spec["profile"]

    class LockStep(L.Callback):
        def __init__(self) -> None:
            self.marks: dict[str, float] = {}
            self.prof: Any = None

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            proto.write("ready\n")
            if sys.stdin.readline().strip() != "go":
                raise SystemExit(0)
            if profile and batch_idx == PROFILED[0]:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.prof.__enter__()
            self.marks = {"start": time.perf_counter(), "cpu": time.process_time()}

        def on_before_backward(self, *args: Any) -> None:
            self.marks["backward"] = time.perf_counter()

        def on_after_backward(self, *args: Any) -> None:
            self.marks["after_backward"] = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            end, cpu = time.perf_counter(), time.process_time()
            m = self.marks
            phases = {"step": end - m["start"], "forward": m["backward"] - m["start"],
                      "backward": m["after_backward"] - m["backward"], "optimizer": end - m["after_backward"],
                      "cpu": cpu - m["cpu"]}  # fmt: skip
            if self.prof is not None and batch_idx == PROFILED[1] - 1:
                self.prof.__exit__(None, None, None)
                self.prof = _top_ops(self.prof, PROFILED[1] - PROFILED[0])
            phases["profiled"] = PROFILED[0] <= batch_idx < PROFILED[1] and bool(profile)
            phases["trainable"] = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            proto.write("step " + json.dumps(phases) + "\n")

    lock = LockStep()
    callbacks = [instantiate_class((), c) for c in method.get("callbacks", [])] + [lock]
    trainer = L.Trainer(
        max_steps=spec["steps"], accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        gradient_clip_val=1.0, callbacks=callbacks, default_root_dir=str(HERE / "runs"),
    )  # fmt: skip
    trainer.fit(module, dm)
    proto.write("done " + json.dumps({"profile": lock.prof if isinstance(lock.prof, list) else None,
                                      "source": str(Path(lightning_ft.__file__).parent)}) + "\n")  # fmt: skip


def _top_ops(prof: Any, steps: int, rows: int = 15) -> list[dict[str, Any]]:
    """The operators with the most self CPU time, per step, as rows."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [
        {"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps, "share": e.self_cpu_time_total / total,
         "calls_per_step": e.count / steps}
        for e in events[:rows]
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------- parent
class Worker:
    """One method's subprocess and its protocol pipe."""

    def __init__(self, method: str, steps: int, profile: bool, before: str | None) -> None:
        self.method = method
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
        if method.endswith("@before"):
            if before is None:
                raise SystemExit(f"{method} needs --before DIR (a source tree of the code before the fix).")
            env["PYTHONPATH"] = os.pathsep.join([str(Path(before).resolve()), env.get("PYTHONPATH", "")])
        spec = json.dumps({"method": method, "steps": steps, "profile": profile})
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", spec], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL if not os.environ.get("BENCH_VERBOSE") else None, text=True, bufsize=1, env=env,
        )  # fmt: skip
        self.steps: list[dict[str, Any]] = []
        self.done: dict[str, Any] = {}

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.method} exited early (rc {self.proc.wait()}); rerun with BENCH_VERBOSE=1.")
        return line.strip()

    def step(self) -> None:
        """Let the worker run one step, alone; wait until it is done."""
        assert self.proc.stdin is not None
        if self._line() != "ready":
            raise RuntimeError(f"{self.method}: protocol error")
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        kind, _, payload = self._line().partition(" ")
        if kind != "step":
            raise RuntimeError(f"{self.method}: protocol error ({kind})")
        self.steps.append(json.loads(payload))

    def finish(self) -> None:
        kind, _, payload = self._line().partition(" ")
        self.done = json.loads(payload) if kind == "done" else {}
        self.proc.wait()


def run(methods: list[str], steps: int, profile: set[str], before: str | None) -> dict[str, Worker]:
    """All workers in lock step: step ``i`` of every method, in a rotating order, before step ``i + 1`` of any."""
    workers = {m: Worker(m, steps, m in profile, before) for m in methods}
    order = list(workers.values())
    for i in range(steps):
        for w in order[i % len(order):] + order[: i % len(order)]:
            w.step()
        print(f"  step {i}: " + ", ".join(f"{w.method} {w.steps[-1]['step']:.2f}s" for w in order), flush=True)
    for w in order:
        w.finish()
    return workers


def summarise(workers: dict[str, Worker]) -> list[dict[str, Any]]:
    """Per method: median phases over the timed steps (after two warm-up steps, without profiled ones), ratios."""
    def timed(w: Worker) -> list[int]:
        return [i for i, s in enumerate(w.steps) if i >= 2 and not s["profiled"]]

    base = workers["full_ft"]
    rows = []
    for name, w in workers.items():
        idx = [i for i in timed(w) if i in set(timed(base))]
        keys = ("step", "forward", "backward", "optimizer", "cpu")
        med = {k: statistics.median(w.steps[i][k] for i in idx) for k in keys if k in w.steps[0]}
        base_med = statistics.median(base.steps[i]["step"] for i in idx)
        cpu_ratio = med.get("cpu", 0.0) / statistics.median(base.steps[i].get("cpu", 1.0) for i in idx)
        paired = statistics.median(w.steps[i]["step"] / base.steps[i]["step"] for i in idx)
        rows.append({
            "method": name, "label": METHODS[name.split("@")[0]]["label"] + (" (before the fix)" if "@" in name else ""),
            "steps_timed": len(idx), "median_s": med, "ratio": med["step"] / base_med, "paired_ratio": paired, "cpu_ratio": cpu_ratio,
            "trainable": max(s["trainable"] for s in w.steps), "source": w.done.get("source"),
            "profile": w.done.get("profile"),
        })  # fmt: skip
    return rows


def write_report(name: str, rows: list[dict[str, Any]], command: str, steps: int) -> Path:
    out = HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# HFT step time: {name}",
        "",
        f"Command: `{command}`",
        "",
        (f"Bundled SmolLM2-135M-Instruct (fp32, CPU, 2 threads), Rotten Tomatoes as instruction data, batch "
        f"{SETTINGS['batch_size']}, max length {SETTINGS['max_length']}, AdamW, clip 1.0, {steps} steps per method "
        "(the rows of benchmarks/methods.py). Each method runs in its own process; the processes take turns step by "
        "step (one step runs while the others wait), so all rows see the same background load. Other engineers' "
        "work shared the 2-core machine during the run: absolute seconds are noisy, the ratios are the result. "
        "Medians over the steps after the first two (profiled steps left out); `paired` is the median over steps of "
        "the method's step over full FT's step of the same index (run back to back). `CPU time`: the process's CPU "
         "seconds in the step (all threads), less sensitive than wall time to the share of the machine a step gets. "
         "Phases: forward (with "
         "zero_grad), backward, then clipping + optimizer step + Lightning's step bookkeeping."),
        "",
        ("| method | trainable params | step | rel. to full FT | paired | CPU time | CPU rel. to full FT | forward | "
         "backward | clip + optimizer |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["median_s"]
        lines.append(
            f"| {r['label']} | {r['trainable']:,} | {m['step']:.3f} s | {r['ratio']:.3f} | {r['paired_ratio']:.3f} | "
            f"{m.get('cpu', float('nan')):.3f} s | {r.get('cpu_ratio', float('nan')):.3f} | {m['forward']:.3f} s | {m['backward']:.3f} s | {m['optimizer']:.3f} s |"
        )
    for r in rows:
        if r["profile"]:
            lines += ["", (f"Profile of {r['label']} (torch.profiler, steps {PROFILED[0]}-{PROFILED[1] - 1}, self CPU "
                           "time per step, top operators):"), "", "| operator | ms / step | share | calls / step |",
                      "|---|---|---|---|"]  # fmt: skip
            lines += [f"| `{p['op']}` | {p['self_ms_per_step']:.1f} | {p['share']:.1%} | {p['calls_per_step']:.0f} |"
                      for p in r["profile"]]  # fmt: skip
    path = out / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps({"rows": rows, "settings": SETTINGS, "steps": steps,
                                                  "command": command}, indent=2))  # fmt: skip
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="hft_speed", help="results file name under benchmarks/results/")
    parser.add_argument("--methods", nargs="+", default=["hft", "hft_reset", "owlore"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", nargs="*", default=[], help="methods whose steps 3-4 are profiled")
    parser.add_argument("--before", help="source tree of the code before the fix, for methods named <method>@before")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    unknown = [m for m in args.methods if m.split("@")[0] not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}: choose from {sorted(METHODS)} (optionally with @before)")
    methods = ["full_ft"] + [m for m in args.methods if m != "full_ft"]  # full FT is the time baseline
    command = "python benchmarks/hft_speed.py " + " ".join(sys.argv[1:])
    start = time.perf_counter()
    rows = summarise(run(methods, args.steps, set(args.profile), args.before))
    path = write_report(args.name, rows, command, args.steps)
    print(path.read_text())
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
