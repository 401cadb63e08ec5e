"""LiST self-training benchmark: 32 labels plus an unlabeled pool against the same model on the 32 labels alone.

Rotten Tomatoes (bundled, split with a fixed seed): the first ``--test-size`` reviews are the fixed test set, the next
``--pool-size`` the pool. For every seed, ``--labeled`` reviews of the pool (half of each class) are the labels and
the rest of the pool, labels withheld, the unlabeled data; the seed also sets the adapters' initialisation and the
data order. ``lightning-ft self-train`` (:mod:`lightning_ft.curation.self_training`) runs on them; its iteration 0,
the teacher, is the baseline (the same model, adapter and budget trained on the labels alone), its last iteration the
self-trained student. Both are scored on the same test set.

    python benchmarks/self_training.py --name self_training --seeds 0 1 2

Each finished seed's work folder stays under ``benchmarks/runs/<name>/seed_<s>`` (``state.json``), so a rerun
resumes. Results: ``results/<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SPLIT_SEED = 1234


def _write(path: Path, rows: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _splits(args: argparse.Namespace, seed: int, root: Path) -> tuple[str, str, str]:
    from lightning_ft.assets import load_dataset_records

    records = [{"text": r["text"], "label": r["label"]} for r in load_dataset_records("rotten_tomatoes",
                                                                                       shuffle_seed=SPLIT_SEED)]  # fmt: skip
    test, pool = records[: args.test_size], records[args.test_size : args.test_size + args.pool_size]
    rng = random.Random(seed)
    chosen: list[int] = []
    for label in sorted({r["label"] for r in pool}):
        members = [i for i, r in enumerate(pool) if r["label"] == label]
        chosen += rng.sample(members, args.labeled // 2)
    rng.shuffle(chosen)
    taken = set(chosen)
    unlabeled = [r for i, r in enumerate(pool) if i not in taken]  # the label column only scores the pseudo-labels
    return (_write(root / "labeled.jsonl", [pool[i] for i in chosen]), _write(root / "unlabeled.jsonl", unlabeled),
            _write(root / "test.jsonl", test))  # fmt: skip


def _argv(args: argparse.Namespace, seed: int, root: Path) -> list[str]:
    labeled, unlabeled, test = _splits(args, seed, root)
    return ["--model", args.model, "--data", labeled, "--unlabeled", unlabeled, "--eval-data", test,
            "--template", args.template, "--iterations", str(args.iterations), "--reweight", args.reweight,
            "--teacher-epochs", str(args.teacher_epochs), "--student-epochs", str(args.student_epochs),
            "--learning-rate", str(args.learning_rate), "--batch-size", str(args.batch_size),
            "--max-length", str(args.max_length), "--seed", str(seed), "--work-dir", str(root / "work")]  # fmt: skip


def _spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="self_training")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--template", default="{text}")
    parser.add_argument("--labeled", type=int, default=32)
    parser.add_argument("--pool-size", type=int, default=800)
    parser.add_argument("--test-size", type=int, default=400)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--reweight", default="meta")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--student-epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the cores are shared)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from lightning_ft.curation.self_training import _parser, run

    runs = []
    for seed in args.seeds:
        root = HERE / "runs" / args.name / f"seed_{seed}"
        start = time.perf_counter()
        report = run(_parser().parse_args(_argv(args, seed, root)))
        its = report["iterations"]
        runs.append({"seed": seed, "labels_only": its[0]["eval_accuracy"], "self_trained": its[-1]["eval_accuracy"],
                     "per_iteration": [e["eval_accuracy"] for e in its],
                     "pseudo_label_accuracy": [e.get("pseudo_label_accuracy") for e in its[1:]],
                     "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
        print(json.dumps(runs[-1]), flush=True)
    base, st = [r["labels_only"] for r in runs], [r["self_trained"] for r in runs]
    gains = [s - b for s, b in zip(st, base, strict=True)]
    command = "python benchmarks/self_training.py " + " ".join(sys.argv[1:])
    result = {"command": command, "settings": vars(args), "runs": runs, "labels_only": _spread(base),
              "self_trained": _spread(st), "gain": _spread(gains)}  # fmt: skip
    out = HERE / "results"
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# LiST self-training benchmark: {args.name}", "", f"Command: `{command}`", "",
             (f"Model {args.model} + LoRA r 8 and a label-word head; Rotten Tomatoes, {args.labeled} labels (half per "
             f"class), {args.pool_size - args.labeled} unlabeled reviews, {args.test_size} fixed test reviews; teacher "
             f"{args.teacher_epochs} epochs on the labels, {args.iterations} self-training iterations of "
             f"{args.student_epochs} epoch(s) over the pool, re-weighting `{args.reweight}`. Mean ± half the range "
             "over seeds (a seed: which labels, the adapter's initialisation and the data order)."), "",
             "| | test accuracy |", "|---|---|", f"| labels only (teacher) | {result['labels_only']} |",
             f"| self-trained (iteration {args.iterations}) | {result['self_trained']} |",
             f"| gain, paired by seed | {result['gain']} |", "",
             "| seed | labels only | per iteration | pseudo-label accuracy | seconds |", "|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        its = " → ".join(f"{a:.3f}" for a in r["per_iteration"])
        pseudo = ", ".join(f"{a:.3f}" for a in r["pseudo_label_accuracy"])
        lines.append(f"| {r['seed']} | {r['labels_only']:.3f} | {its} | {pseudo} | {r['seconds']} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
