"""Objective benchmark: plain SFT, CAFT and Masked Thought side by side on the bundled SmolLM2-135M and Rotten Tomatoes.

Every row trains with the same data, data order, seed and step budget, each in its own subprocess, and is scored
on held-out reviews (target accuracy, answer NLL) and on control text the task never trains on (HumanEval
perplexity: the forgetting signal). Step time is the median per training step, reported relative to plain SFT
measured in the same invocation. CAFT first pre-trains its 4 auxiliary heads on bundled general text (Chit-Chat,
trunk frozen, ``head_steps`` steps; its time is reported separately) and then fine-tunes with them on the task.
Responses end with EOS (``" positive<eos>"``) in every row, so that CAFT's first head has a target.
A seed sets the training-data order (shuffle seed ``1234 + seed``, so seed 0 is the DataModules' default order),
the global seed and Masked Thought's draws; the splits never change. Results go to ``benchmarks/results/<name>.md``
(+ ``.json``).

    python benchmarks/objectives.py --name objectives            # default budget
    python benchmarks/objectives.py --name smoke --quick         # a few minutes: proves the script runs
    python benchmarks/objectives.py --seeds 0 1 2 --steps 120
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

from _timing import step_timer  # benchmarks/_timing.py (this script's folder is on sys.path)

HERE = Path(__file__).resolve().parent

# name -> (class path of the module, its extra arguments, label)
ROWS: dict[str, dict[str, Any]] = {
    "sft": {"label": "plain SFT", "class": "lightning_ft.modules.CausalLMModule", "args": {}},
    "caft": {
        "label": "CAFT (4 heads pre-trained on Chit-Chat, alpha 0.01, rsine)",
        "class": "lightning_ft.objectives.CAFTCausalLM",
        "args": {"heads_coefficient": 0.01, "heads_schedule": "rsine", "heads_output": ""},
    },
    "masked_thought": {
        "label": "Masked Thought (p_max 0.4, w 2/3, random tokens)",
        "class": "lightning_ft.objectives.MaskedThoughtCausalLM",
        "args": {"max_rate": 0.4, "warmup": 2 / 3, "replacement": "random", "seed": 0},
    },
}

DEFAULTS = {
    "steps": 120, "head_steps": 200, "batch_size": 8, "max_length": 96, "learning_rate": 2e-4, "head_learning_rate": 1e-4,
    "warmup_steps": 10, "val_size": 200, "test_size": 400, "control_size": 64, "head_train_size": 4000,
}  # fmt: skip
QUICK = {
    "steps": 4,
    "head_steps": 4,
    "val_size": 20,
    "test_size": 40,
    "control_size": 8,
    "warmup_steps": 1,
    "head_train_size": 64,
}


def _trainer(steps: int, timer: Any) -> Any:
    import lightning as L

    return L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0,
        callbacks=[timer], default_root_dir=str(HERE / "runs" / "objectives"),
    )  # fmt: skip


def pretrain_heads(cfg: dict[str, Any], seed: int, path: Path) -> dict[str, Any]:
    """CAFT stage 1 in this process: heads on Chit-Chat with the trunk frozen; writes ``path``."""
    import lightning as L

    from lightning_ft.data import InstructionDataModule
    from lightning_ft.objectives import CAFTCausalLM

    L.seed_everything(seed)
    module = CAFTCausalLM(
        model="smollm2-135m",
        stage="heads",
        learning_rate=cfg["head_learning_rate"],
        schedule="cosine",
        warmup_steps=cfg["warmup_steps"],
        output_dir="",
        heads_output=str(path),
    )
    dm = InstructionDataModule(
        dataset="chitchat",
        prompt_template="{prompt}\n",
        response_template="{response}",
        label_options=None,
        mask_prompt=False,
        train_size=cfg["head_train_size"],
        shuffle_seed=1234 + seed,
        val_size=0,
        test_size=0,
        control=None,
        batch_size=cfg["batch_size"],
        max_length=cfg["max_length"],
    )
    timer = step_timer()
    _trainer(cfg["head_steps"], timer).fit(module, dm)
    return {"head_step_time": timer.median(), "head_total_s": sum(timer.times)}


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one (row, seed) in this process; return its measurements."""
    import lightning as L
    import torch
    from lightning.pytorch.cli import instantiate_class

    from lightning_ft.data import InstructionDataModule

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    cfg, name, seed = spec["settings"], spec["row"], spec["seed"]
    extra: dict[str, Any] = {}
    if name == "caft":
        path = HERE / "runs" / "objectives" / f"aux_heads_seed{seed}.safetensors"
        extra = pretrain_heads(cfg, seed, path)
    L.seed_everything(seed)
    row = ROWS.get(name, ROWS["sft"])
    args = {"model": "smollm2-135m", "learning_rate": cfg["learning_rate"], "warmup_steps": cfg["warmup_steps"],
            "output_dir": "", **row["args"]}  # fmt: skip
    if "seed" in row["args"]:  # the row's own random draws follow the run's seed too
        args["seed"] = seed
    if name == "caft":
        args["heads_path"] = str(path)
    module = instantiate_class((), {"class_path": row["class"], "init_args": args})
    dm = InstructionDataModule(
        label_options=["positive", "negative"], append_eos=True, val_size=cfg["val_size"], test_size=cfg["test_size"],
        batch_size=cfg["batch_size"], eval_batch_size=25, max_length=cfg["max_length"], control="humaneval",
        control_size=cfg["control_size"], control_max_length=128, split_seed=1234, shuffle_seed=1234 + seed,
    )  # fmt: skip
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    loaders = list(dm.test_dataloader())
    if name == "zero_shot":
        return {"after": module.evaluate(loaders)}
    timer = step_timer()
    _trainer(cfg["steps"], timer).fit(module, dm)
    return {"after": module.evaluate(loaders), "step_time": timer.median(), **extra}


def _spawn(row: str, seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    spec = json.dumps({"row": row, "seed": seed, "settings": settings})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{row} seed {seed} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(row=row, seed=seed, wall_s=time.perf_counter() - start)
    print(f"  {row} seed {seed}: {json.dumps(result['after'])} ({result['wall_s']:.0f} s)", flush=True)
    return result


def _mean(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def summarise(results: list[dict[str, Any]], zero: dict[str, float]) -> list[dict[str, Any]]:
    """One row per method: means over seeds (± half the range); step time relative to plain SFT."""
    base = statistics.mean(r["step_time"] for r in results if r["row"] == "sft")
    rows = []
    for name in dict.fromkeys(r["row"] for r in results):
        runs = [r for r in results if r["row"] == name]
        step = statistics.mean(r["step_time"] for r in runs)
        rows.append({
            "row": name, "label": ROWS[name]["label"], "seeds": [r["seed"] for r in runs],
            "target_acc": _mean([r["after"]["target_acc"] for r in runs]),
            "target_nll": _mean([r["after"]["target_loss"] for r in runs]),
            "control_ppl": _mean([r["after"]["control_ppl"] for r in runs]),
            "control_change_pct": _mean([(r["after"]["control_ppl"] / zero["control_ppl"] - 1) * 100 for r in runs]),
            "step_time_s": step, "step_time_rel": step / base,
            "head_pretraining_s": statistics.mean(r["head_total_s"] for r in runs) if "head_total_s" in runs[0] else None,
        })  # fmt: skip
    return rows


def write_report(
    name: str, rows: list[dict[str, Any]], zero: dict[str, float], settings: dict[str, Any], command: str
) -> Path:
    """Write ``results/<name>.md`` and ``.json``."""
    out = HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Objective benchmark: {name}", "", f"Command: `{command}`", "",
        f"Model: bundled SmolLM2-135M-Instruct (fp32, CPU). Task: Rotten Tomatoes as instruction data, answer + EOS, "
        f"scored on {settings['test_size']} held-out test reviews. Control: HumanEval prompt+solution perplexity "
        f"({settings['control_size']} texts, 128 tokens). Budget: {settings['steps']} steps, batch {settings['batch_size']}, "
        f"max length {settings['max_length']}, AdamW lr {settings['learning_rate']} (wd 0), {settings['warmup_steps']} warmup "
        f"steps then linear decay, clip 1.0. CAFT heads: {settings['head_steps']} steps on {settings['head_train_size']} "
        f"Chit-Chat texts (lr {settings['head_learning_rate']}, cosine), not counted in the budget or the step time. "
        "Values are means over seeds, ± half the range.", "",
        f"Zero-shot: target accuracy {zero['target_acc']:.3f}, answer NLL {zero['target_loss']:.3f}, "
        f"control perplexity {zero['control_ppl']:.3f}.", "",
        "| method | seeds | target acc | answer NLL | control ppl | change vs zero-shot | step time | rel. to SFT | head pre-training |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        heads = f"{r['head_pretraining_s']:.0f} s" if r["head_pretraining_s"] is not None else "–"
        lines.append(
            f"| {r['label']} | {','.join(map(str, r['seeds']))} | {r['target_acc'][0]:.3f} ± {r['target_acc'][1]:.3f} | "
            f"{r['target_nll'][0]:.3f} | {r['control_ppl'][0]:.3f} | {r['control_change_pct'][0]:+.2f}% | "
            f"{r['step_time_s']:.2f} s | {r['step_time_rel']:.2f} | {heads} |"
        )
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps({"zero_shot": zero, "rows": rows, "settings": settings}, indent=2))
    return out / f"{name}.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="objectives", help="results file name under benchmarks/results/")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--head-steps", type=int, default=None, help="CAFT head pre-training steps")
    parser.add_argument("--quick", action="store_true", help=f"a few minutes: {QUICK}, one seed")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(json.loads(args.worker))))
        return
    settings = {**DEFAULTS, **(QUICK if args.quick else {})}
    if args.steps is not None:
        settings["steps"] = args.steps
    if args.head_steps is not None:
        settings["head_steps"] = args.head_steps
    seeds = args.seeds[:1] if args.quick else args.seeds
    rows = ["sft"] + [r for r in args.rows if r != "sft"]  # plain SFT is the time baseline
    command = "python benchmarks/objectives.py " + " ".join(sys.argv[1:])
    print(f"zero-shot ({settings})", flush=True)
    zero = _spawn("zero_shot", 0, settings)["after"]
    results = [_spawn(r, s, settings) for r in rows for s in seeds]
    path = write_report(args.name, summarise(results, zero), zero, settings, command)
    print(path.read_text())


if __name__ == "__main__":
    main()
