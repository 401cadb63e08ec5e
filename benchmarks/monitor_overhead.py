"""What one measurement of each analysis monitor costs, against one training step, on the bundled SmolLM2-135M.

One process: a full fine-tuning fit of ``--steps`` steps (batch 8, 96 tokens) with every monitor attached but never
due (``every_n_validations=0``, no validation, their fit-end measurement switched off), so the fit's median step time
is the step with the monitors present; then each monitor's measurement is timed ``--repeats`` times on the fitted
model (median). The ratio ``measurement / step`` is what a measurement adds each time it runs; on the steps in between
a monitor does nothing.

    BENCH_THREADS=2 python benchmarks/monitor_overhead.py

Writes ``results/monitor_overhead.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from _timing import step_timer_class

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], help="monitor class names to leave out")
    args = parser.parse_args()
    import lightning as L
    import torch

    from lightning_ft.data import InstructionDataModule
    from lightning_ft.modules import CausalLMModule
    from lightning_ft.monitors import ContextAwareness, ImplicitInferenceProbes, IntruderDimensions, RepresentationShift

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    L.seed_everything(0)
    module = CausalLMModule(model="smollm2-135m", learning_rate=5e-5, warmup_steps=2, output_dir="")
    data = InstructionDataModule(label_options=["positive", "negative"], train_size=args.steps * 8, val_size=0,
                                 test_size=0, control_size=0, batch_size=8, max_length=96)  # fmt: skip
    monitors: dict[str, Any] = {
        "IntruderDimensions (210 matrices, 2 SVDs each)": IntruderDimensions(every_n_validations=0, filename=None),
        "RepresentationShift (8 probe texts, 30 layers)": RepresentationShift(every_n_validations=0, filename=None,
                                                                              shifts_filename=None),
        "ImplicitInferenceProbes (Reuters, 4 shots, 2 formats)": ImplicitInferenceProbes(every_n_validations=0,
                                                                                         baseline=False, filename=None),
        "ContextAwareness (16 dialogues, eager attention)": ContextAwareness(every_n_validations=0, baseline=False,
                                                                             filename=None),
    }  # fmt: skip
    monitors = {k: v for k, v in monitors.items() if type(v).__name__ not in args.skip}
    for monitor in monitors.values():
        monitor.on_fit_end = lambda *a: None  # timed below instead
    timer = step_timer_class()()
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[*monitors.values(), timer])  # fmt: skip
    trainer.fit(module, data)
    step = statistics.median(timer.times[2:])  # the first steps warm up
    rows = []
    for name, monitor in monitors.items():
        run = monitor.similarities if isinstance(monitor, IntruderDimensions) else monitor.measure
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        rows.append({"monitor": name, "seconds": statistics.median(times), "ratio": statistics.median(times) / step})
        print(json.dumps(rows[-1]), flush=True)
    command = (f"Command: `BENCH_THREADS={torch.get_num_threads()} python benchmarks/monitor_overhead.py --steps "
               f"{args.steps} --repeats {args.repeats}{' --skip ' + ' '.join(args.skip) if args.skip else ''}` (see its "
               f"docstring). One process; median of {args.repeats}.")
    step_line = (f"Training step (full fine-tuning, batch 8 x 96 tokens, the monitors below attached and idle): "
                 f"**{step:.2f} s** (median of steps 3-{args.steps}).")
    lines = ["# Analysis monitors: the cost of one measurement on SmolLM2-135M", "", command, "", step_line, "",
             "| monitor | one measurement (s) | in training steps |", "|---|---|---|"]
    lines += [f"| {r['monitor']} | {r['seconds']:.2f} | {r['ratio']:.2f} |" for r in rows]
    lines += ["", ("A monitor measures every `every_n_validations` validations and at the end of fit; between those "
                   "it runs no code on the training steps. So a run with 10 measurements pays 10 times its row above, "
                   "whatever its length.")]
    (HERE / "results" / "monitor_overhead.md").write_text("\n".join(lines) + "\n")
    (HERE / "results" / "monitor_overhead.json").write_text(json.dumps({"step_seconds": step, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
