"""Merge benchmark: fine-tune the bundled SmolLM2-135M on two or three bundled tasks, merge the results with
every method with and without LiNeS, and score every merge on every task (and the control set).

    python benchmarks/merging.py --name merging                      # default budget
    python benchmarks/merging.py --name smoke --quick                # a few minutes
    python benchmarks/merging.py --name merging --val-size 100       # cheaper LiNeS beta sweeps

Writes ``benchmarks/results/<name>.md`` and ``.json``. Fine-tunes are cached under ``benchmarks/runs/`` and
reused unless ``--retrain``. LiNeS rows use the paper's recipe: alpha from the norm ratio, beta swept on the
validation splits (the method's grid), then every row is scored on held-out test splits.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

TASKS: dict[str, dict[str, Any]] = {
    "sentiment": {"dataset": "rotten_tomatoes", "label_options": ["positive", "negative"], "val_size": 200,
                  "test_size": 400},
    "reuters": {"dataset": "reuters_r8", "prompt_template": "News: {text}\nTopic:",
                "label_options": ["earn", "acq", "crude", "trade", "money-fx", "interest", "ship", "grain"],
                "val_size": 200, "test_size": 400, "max_length": 128},
    "trivia": {"dataset": "trivia", "prompt_template": "Question: {prompt}\nAnswer:", "response_template": " {response}",
               "val_size": 40, "test_size": 60},
}  # fmt: skip
METHODS: list[tuple[str, dict[str, Any]]] = [
    ("uniform_soup", {}),
    ("task_arithmetic", {"scaling": 0.4}),
    ("ties", {"density": 0.2, "scaling": 1.0}),
    ("breadcrumbs", {"density": 0.143, "gamma": 0.007, "scaling": 0.4}),
]


def finetune(task: str, out: Path, steps: int, lr: float) -> Path:
    """Full fine-tune on one task; returns the HF folder."""
    import lightning as L

    from lightning_ft.data import InstructionDataModule
    from lightning_ft.modules import CausalLMModule

    if (out / "hf_model" / "model.safetensors").is_file():
        return out / "hf_model"
    L.seed_everything(0)
    module = CausalLMModule(model="smollm2-135m", learning_rate=lr, warmup_steps=max(1, steps // 12),
                            output_dir=str(out / "hf_model"))  # fmt: skip
    dm = InstructionDataModule(**TASKS[task], control=None, batch_size=8)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0,
                        default_root_dir=str(out))  # fmt: skip
    trainer.fit(module, dm)
    return out / "hf_model"


def scorer(tasks: list[str], split: str, control_size: int) -> Any:
    """``evaluate(state) -> {task: metrics}`` on one split of every task, plus the control set."""
    from lightning_ft.data import InstructionDataModule
    from lightning_ft.modules import CausalLMModule

    module = CausalLMModule(model="smollm2-135m", output_dir="")
    loaders: dict[str, list[Any]] = {}
    for i, task in enumerate(tasks):
        control = "humaneval" if i == 0 else None
        dm = InstructionDataModule(**TASKS[task], control=control, control_size=control_size)
        dm.tokenizer = module.tokenizer
        dm.setup("fit")
        main = dm._eval_loader("test" if split == "test" else "val")
        loaders[task] = [main]
        if control:
            loaders["control"] = [dm.control_dataloader()]

    def evaluate(state: dict[str, Any]) -> dict[str, dict[str, float]]:
        module.backbone.load_state_dict(state, strict=False)
        return {name: module.evaluate(ls) for name, ls in loaders.items()}

    return evaluate


def task_score(metrics: dict[str, dict[str, float]], tasks: list[str]) -> float:
    """Mean over tasks of accuracy (classification) or exp(-loss) (free-form), higher is better."""
    import math

    values = [
        m["target_acc"] if "target_acc" in m else math.exp(-m["target_loss"]) for t, m in metrics.items() if t in tasks
    ]
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="merging")
    parser.add_argument("--tasks", nargs="+", default=["sentiment", "reuters", "trivia"], choices=sorted(TASKS))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--quick", action="store_true", help="20 steps, small eval splits")
    parser.add_argument("--val-size", type=int, help="cap every task's validation split (the LiNeS beta sweep's cost)")
    parser.add_argument("--retrain", action="store_true")
    args = parser.parse_args()
    import torch

    from lightning_ft.merging import MergePlan, merge

    torch.set_num_threads(2)
    if args.quick:
        args.steps = 20
        for spec in TASKS.values():
            spec["val_size"], spec["test_size"] = min(spec["val_size"], 40), min(spec["test_size"], 60)
    if args.val_size is not None:
        for spec in TASKS.values():
            spec["val_size"] = min(spec["val_size"], args.val_size)
    runs = HERE / "runs" / "merging"
    folders = {}
    for task in args.tasks:
        if args.retrain:
            import shutil

            shutil.rmtree(runs / task, ignore_errors=True)
        folders[task] = str(finetune(task, runs / task, args.steps, args.lr))
    val, test = scorer(args.tasks, "val", 16), scorer(args.tasks, "test", 64)

    def val_score(state: dict[str, Any]) -> float:
        return task_score(val(state), args.tasks)

    rows: list[dict[str, Any]] = []
    from lightning_ft.core.weights import SafetensorsReader, resolve_path

    base_reader = SafetensorsReader(resolve_path("smollm2-135m"))
    base_state = {k: base_reader.get(k) for k in base_reader.keys()}
    rows.append({"row": "zero-shot", **_flat(test(base_state))})
    for task, folder in folders.items():
        rows.append(
            {
                "row": f"fine-tuned on {task}",
                **_flat(test(merge(MergePlan.build("smollm2-135m", [folder], "uniform_soup")).state)),
            }
        )
    for method, params in METHODS:
        for lines in (False, True):
            start = time.perf_counter()
            plan = MergePlan.build("smollm2-135m", list(folders.values()), method, params, lines=lines)
            result = merge(plan, "sweep" if lines else None, val_score if lines else None)
            row = {"row": f"{method}{' + LiNeS' if lines else ''}", **_flat(test(result.state))}
            if lines:
                row["lines_alpha"], row["lines_beta"] = result.report["lines"]["alpha"], result.report["lines"]["beta"]
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(row, flush=True)
    write(args.name, rows, args.tasks)


def _flat(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    out = {}
    for task, m in metrics.items():
        if task == "control":
            out["control_ppl"] = m["control_ppl"]
        else:
            out[f"{task}_acc" if "target_acc" in m else f"{task}_loss"] = m.get("target_acc", m["target_loss"])
    return out


def write(name: str, rows: list[dict[str, Any]], tasks: list[str]) -> None:
    """Markdown + JSON tables under benchmarks/results/."""
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(rows, indent=2))
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns)
            + " |"
        )
    (results / f"{name}.md").write_text(f"# Merge benchmark ({', '.join(tasks)})\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
