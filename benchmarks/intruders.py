"""Intruder dimensions after LoRA vs full fine-tuning of the bundled SmolLM2-135M (issue #24; Shuttleworth et al.).

For three data orders, the same review-classification data and step budget are fitted twice: LoRA (rank 8 on every
attention and MLP matrix, lr 2e-3, the usual LoRA setting) and full fine-tuning (lr 5e-5). After each fit
:class:`~lightning_ft.monitors.IntruderDimensions` (paper defaults: top 10 singular vectors, epsilon 0.5) counts the
intruders of all 210 block matrices, and reports the mean best-match similarity ``s_j`` of the top-10 singular
vectors (1 = every top direction is a pretrained one; lower = more intruder-like), a continuous view that still moves
when no vector crosses epsilon. The training loss of the last 10 steps shows that both arms learned.

    BENCH_THREADS=1 python benchmarks/intruders.py --steps 60

Writes ``results/intruders.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L

HERE = Path(__file__).resolve().parent


class _LossLog(L.Callback):
    """The training loss of every step."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.values.append(float(outputs["loss"]))


def run_arm(arm: str, seed: int, steps: int) -> dict[str, Any]:
    import torch

    from lightning_ft.data import InstructionDataModule
    from lightning_ft.modules import CausalLMModule
    from lightning_ft.monitors import IntruderDimensions

    L.seed_everything(0)
    peft = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                          "down_proj"]} if arm == "lora" else None  # fmt: skip
    module = CausalLMModule(model="smollm2-135m", learning_rate=2e-3 if arm == "lora" else 5e-5, warmup_steps=5,
                            peft=peft, output_dir="")  # fmt: skip
    data = InstructionDataModule(label_options=["positive", "negative"], train_size=steps * 8, val_size=0, test_size=0,
                                 control_size=0, batch_size=8, max_length=96, shuffle_seed=seed)  # fmt: skip
    losses = _LossLog()
    monitor = IntruderDimensions(top_k=10, epsilon=0.5, every_n_validations=0, filename=None)
    monitor.on_fit_end = lambda *args: None  # measured below, once, and timed
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=str(HERE / "runs"), callbacks=[monitor, losses])  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, data)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    sims = monitor.similarities()  # what one measurement of the monitor computes
    measure_seconds = time.perf_counter() - start
    counts = {name: int((s < 0.5).sum()) for name, s in sims.items()}
    flat = torch.cat(list(sims.values())).tolist()
    return {
        "arm": arm, "seed": seed, "steps": steps, "intruders": sum(counts.values()),
        "matrices_with_intruders": sum(1 for c in counts.values() if c), "matrices": len(counts),
        "mean_top10_similarity": statistics.fmean(flat), "min_top10_similarity": min(flat),
        "final_loss": statistics.fmean(losses.values[-10:]), "first_loss": statistics.fmean(losses.values[:10]),
        "fit_seconds": fit_seconds, "measure_seconds": measure_seconds,
    }  # fmt: skip


def write_report(rows: list[dict[str, Any]], threads: int, note: str = "") -> str:
    """``results/intruders.md`` and ``.json`` from the finished arms (a partial run reports what finished)."""
    steps = rows[0]["steps"] if rows else 0
    lines = ["# Intruder dimensions: LoRA vs full fine-tuning on SmolLM2-135M", "",
             f"Command: `BENCH_THREADS={threads} python benchmarks/intruders.py --steps {steps}` (see its docstring).",
             "", *([note, ""] if note else []),
             ("| arm | data order | intruders (of 2100 top-10 vectors) | matrices with one | mean top-10 similarity | "
              "min similarity | loss, first 10 steps | loss, last 10 steps |"), "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['arm']} | {r['seed']} | {r['intruders']} | {r['matrices_with_intruders']} / {r['matrices']} | "
                     f"{r['mean_top10_similarity']:.4f} | {r['min_top10_similarity']:.3f} | {r['first_loss']:.3f} | "
                     f"{r['final_loss']:.3f} |")  # fmt: skip
    lines += ["", "| arm | data orders | intruders, mean ± std | mean top-10 similarity, mean ± std |", "|---|---|---|---|"]
    for arm in ("lora", "full"):
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        counts, sims = [r["intruders"] for r in mine], [r["mean_top10_similarity"] for r in mine]
        spread = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
        lines.append(f"| {arm} | {len(mine)} | {statistics.fmean(counts):.1f} ± {spread(counts):.1f} | "
                     f"{statistics.fmean(sims):.4f} ± {spread(sims):.4f} |")  # fmt: skip
    if rows:
        per_step = statistics.fmean(r["fit_seconds"] / r["steps"] for r in rows)
        measure = statistics.fmean(r["measure_seconds"] for r in rows)
        lines += ["", (f"Overhead ({threads} thread(s)): one measurement of all 210 matrices (two fp32 SVDs each) took "
                       f"{measure:.1f} s, {measure / per_step:.1f} times a training step ({per_step:.2f} s, fit time / "
                       "steps, set-up included). The monitor costs nothing on the steps where it does not run.")]  # fmt: skip
    text = "\n".join(lines) + "\n"
    (HERE / "results" / "intruders.md").write_text(text)
    (HERE / "results" / "intruders.json").write_text(json.dumps(rows, indent=1) + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--from-log", type=Path, help="write the report from the JSON lines a run printed (no fit)")
    parser.add_argument("--note", default="", help="a line under the command in the report")
    args = parser.parse_args()
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    if args.from_log:
        rows = [json.loads(line) for line in args.from_log.read_text().splitlines() if line.startswith("{")]
        print(write_report(rows, threads, args.note))
        return
    import torch

    torch.set_num_threads(threads)
    rows = []
    for seed in args.seeds:
        for arm in ("lora", "full"):
            rows.append(run_arm(arm, seed, args.steps))
            print(json.dumps(rows[-1]), flush=True)
            write_report(rows, threads, args.note)
    print(write_report(rows, threads, args.note))


if __name__ == "__main__":
    main()
