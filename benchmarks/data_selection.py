"""Data-selection benchmark: each ``lightning-ft data`` selector against random selection of the same size.

A mixed, noisy pool is built from the bundled data: Rotten Tomatoes training reviews (the target task, a quarter of
their labels flipped on purpose) beside off-task records (Chit-Chat replies, Reuters topics, trivia answers), all as
``{prompt, response}`` rows. Each selector picks a fraction of the pool through the command a user runs, the bundled
SmolLM2-135M is fine-tuned on the selection with the same budget (steps, batch, learning rate, data order), and
scored on held-out reviews (target accuracy) and on HumanEval code it never trains on (control-perplexity change:
forgetting). Random selection of the same size is the baseline of every fraction; a seed sets the data order, the
random selection and the selectors' own seeds.

Selectors: ``random``; ``ot`` (GOT-D towards 100 validation reviews); ``kmq`` (one-shot k-means selection,
Diversify and Conquer's round 1); ``perplexity`` (POINTS: the lowest-perplexity fraction under the base model);
``clear`` (CLEAR: the most confident fraction). ``--s3ft`` adds S3FT against plain SFT on the same clean reviews.

**S3FT arm.** S3FT matters where the gold responses are in another style than the model's own answers, so this arm
asks the instruct model in its own chat format (``Review: ...\nIs this review positive or negative? Answer in one
sentence.``): plain SFT trains the one-word gold labels, S3FT (``lightning-ft data rewrite --method s3ft --judge exact
--answer-pattern <the label the first sentence names>``) keeps the model's own answer where its first sentence names
the gold label, else its paraphrase of the gold where that passes, else the gold. Both arms train in the chat format on the pool's clean reviews with the same budget. Target accuracy is read
from greedy answers to 200 held-out reviews in the same chat format (the label word the answer names first; an
answer naming neither is wrong), control = the HumanEval perplexity change as for the selectors (the paper's claim:
S3FT about halves the drop on general benchmarks). ``zero_shot_chat`` is the base model on the same answers.

    python benchmarks/data_selection.py --name data_selection --fractions 0.1 0.3 --seeds 0 1 2
    python benchmarks/data_selection.py --name data_selection_small --small --seeds 0 1 2 --s3ft
    python benchmarks/data_selection.py --name smoke --quick
    python benchmarks/data_selection.py --name data_selection_small_lr5e-5 --small --learning-rate 5e-5 --fractions 0.1

``--small`` (a 1,000-row pool, 16 steps, 200 test reviews) costs about 6 CPU-minutes per fit on a 2-core AVX2 EPYC.
Runs are ordered by fraction, then seed, so that an interrupted invocation has whole rows of the first fraction.
Selectors whose choice does not depend on the seed (``perplexity``: a deterministic score; ``clear``: the records
are scored once, with seed 0's samples) select once and reuse the selection for every seed; the seed still sets the
fine-tuning data order.

Each finished run is appended to ``results/<name>.runs.jsonl`` and skipped by a rerun with the same settings, so an
interrupted invocation resumes. Results: ``results/<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULTS = {"steps": 60, "batch_size": 8, "max_length": 96, "learning_rate": 2e-4, "warmup_steps": 6,
            "test_size": 400, "control_size": 64, "reviews": 800, "off_task": 400, "noise": 0.25, "target": 100,
            "clusters": 16, "clear_samples": 3}  # fmt: skip
SMALL = {"steps": 16, "max_length": 64, "test_size": 200, "control_size": 32, "reviews": 400, "off_task": 200,
         "clear_samples": 2}  # fmt: skip
QUICK = {"steps": 3, "test_size": 16, "control_size": 8, "reviews": 40, "off_task": 20, "target": 8, "clusters": 4,
         "clear_samples": 2}  # fmt: skip
EVAL_KEYS = ("max_length", "test_size", "control_size")  # what a zero-shot run depends on
SELECTORS = ("random", "ot", "kmq", "perplexity", "clear")
NOTES = "<!-- notes: written by hand; kept when the tables above are rewritten -->"
SPLIT_SEED = 1234  # the reviews' split: the first 200 are validation, the next 400 test, the rest the pool's reviews


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_pool(cfg: dict[str, Any], root: Path) -> tuple[Path, Path]:
    """The pool (``pool.jsonl``, every row with its ``pool_index``, ``source`` and ``noisy`` flag) and the target
    sample (``target.jsonl``: validation reviews, never in the pool or the test reviews)."""
    from lightning_ft.data.files import load_records

    reviews = load_records("rotten_tomatoes", shuffle_seed=SPLIT_SEED)
    val, train = reviews[:200], reviews[200 + 400 :]
    rng = random.Random(0)
    rows: list[dict[str, Any]] = []
    flip = {"positive": "negative", "negative": "positive"}
    for r in train[: cfg["reviews"]]:
        noisy = rng.random() < cfg["noise"]
        label = flip[r["label"]] if noisy else r["label"]
        rows.append({"prompt": f"Review: {r['text']}\nSentiment:", "response": label, "source": "reviews",
                     "noisy": noisy})  # fmt: skip
    off = {
        "chitchat": [{"prompt": r["prompt"], "response": r["response"]} for r in load_records("chitchat")],
        "reuters": [{"prompt": f"Text: {r['text'][:400]}\nTopic:", "response": r["label"]} for r in load_records("reuters_r8")],
        "trivia": [{"prompt": f"Q: {r['prompt']}\nA:", "response": r["response"]} for r in load_records("trivia")],
    }  # fmt: skip
    for source, items in off.items():
        rng.shuffle(items)
        rows += [{**x, "source": source, "noisy": False} for x in items[: cfg["off_task"]]]
    rng.shuffle(rows)
    for i, row in enumerate(rows):
        row["pool_index"] = i
    target = [{"prompt": f"Review: {r['text']}\nSentiment:", "response": r["label"]} for r in val[: cfg["target"]]]
    root.mkdir(parents=True, exist_ok=True)
    return _write(root / "pool.jsonl", rows), _write(root / "target.jsonl", target)


def select(selector: str, fraction: float, seed: int, cfg: dict[str, Any], pool: Path, target: Path, root: Path) -> Path:
    """The selection file of ``selector`` at ``fraction`` of the pool, written through the ``lightning-ft data``
    command a user runs (``random`` here)."""
    from lightning_ft.cli import main

    rows = [json.loads(line) for line in pool.read_text().splitlines()]
    k = max(1, round(fraction * len(rows)))
    out = root / f"{selector}_{fraction}_seed{seed}.jsonl"
    if out.exists():
        return out
    if selector in ("perplexity",) and seed != 0:  # a deterministic score: seed 0's selection is the same file
        return select(selector, fraction, 0, cfg, pool, target, root)
    common = ["--data", str(pool), "--output", str(out), "--seed", str(seed), "--overwrite"]
    if selector == "random":
        _write(out, random.Random(seed).sample(rows, k))
    elif selector == "ot":
        main(["data", "select", "--method", "ot", *common, "--target", str(target), "--budget", str(k)])
    elif selector == "kmq":
        main(["data", "select", "--method", "kmq", *common, "--budget", str(k), "--clusters", str(cfg["clusters"])])
    elif selector == "perplexity":
        main(["data", "filter", "--method", "perplexity", *common, "--keep-quantiles", "0", str(k / len(rows))])
    elif selector == "clear":  # every record scored once (threshold 0), then the k most confident
        scored = root / "clear_scores_seed0.jsonl"  # scored once (seed 0's samples); the seed sets the data order
        if not scored.exists():
            main(["data", "curate", *common[:2], "--output", str(scored), "--seed", "0", "--overwrite",
                  "--threshold", "0", "--num-samples", str(cfg["clear_samples"]), "--max-new-tokens", "8"])  # fmt: skip
        kept = [json.loads(line) for line in scored.read_text().splitlines()]
        _write(out, sorted(kept, key=lambda r: -r["clear_confidence"])[:k])
    else:
        raise ValueError(f"unknown selector {selector!r}")
    return out


S3FT_PROMPT = "Review: {text}\nIs this review positive or negative? Answer in one sentence."
S3FT_ANSWER = r"(?i)^[^.]*?\b(positive|negative)\b"  # the label the first sentence names: the answer the judge compares


def _first_label(answer: str) -> str | None:
    """The label word ``answer`` names first (``None``: neither)."""
    words = "".join(ch if ch.isalpha() else " " for ch in answer.lower()).split()
    return next((w for w in words if w in ("positive", "negative")), None)


def chat_accuracy(module: Any, test_size: int, max_new_tokens: int = 12) -> float:
    """Accuracy of ``module``'s greedy chat answers to held-out reviews (see the module docstring)."""
    from lightning_ft.curation.generation import GenerationService, GenerationSettings
    from lightning_ft.data.files import load_records

    reviews = load_records("rotten_tomatoes", shuffle_seed=SPLIT_SEED)[200 : 200 + test_size]
    service = GenerationService(module, batch_size=25)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, chat_template=True)
    answers = service.generate([S3FT_PROMPT.format(text=r["text"]) for r in reviews], settings)
    return sum(_first_label(a[0]) == r["label"] for a, r in zip(answers, reviews)) / len(reviews)


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune on one selection file in this process; target accuracy and control perplexity after."""
    import lightning as L
    import torch

    from lightning_ft.data import InstructionDataModule
    from lightning_ft.modules import CausalLMModule

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    cfg = spec["settings"]
    L.seed_everything(spec["seed"])
    module = CausalLMModule(model="smollm2-135m", learning_rate=cfg["learning_rate"], warmup_steps=cfg["warmup_steps"],
                            output_dir="")  # fmt: skip
    evaluation = InstructionDataModule(label_options=["positive", "negative"], val_size=200, test_size=cfg["test_size"],
                                       eval_batch_size=25, max_length=cfg["max_length"], control="humaneval",
                                       control_size=cfg["control_size"], control_max_length=128, split_seed=SPLIT_SEED)  # fmt: skip
    evaluation.tokenizer = module.tokenizer
    evaluation.setup("fit")
    loaders = list(evaluation.test_dataloader())
    chat = spec.get("selector") in ("sft", "s3ft") or spec["key"] == "zero_shot_chat"
    if spec["selection"] is None:
        after = module.evaluate(loaders)
        return {"after": {**after, "chat_acc": chat_accuracy(module, cfg["test_size"])} if chat else after}
    train = InstructionDataModule(dataset=spec["selection"], prompt_template="{prompt}",
                                  response_template="{response}" if chat else " {response}", label_field="response",
                                  val_size=0, test_size=0, batch_size=cfg["batch_size"],
                                  max_length=cfg["max_length"] + (32 if chat else 0), append_eos=True,
                                  chat_template=chat, control=None, shuffle_seed=1234 + spec["seed"])  # fmt: skip
    train.tokenizer = module.tokenizer
    L.Trainer(max_steps=cfg["steps"], accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
              gradient_clip_val=1.0, default_root_dir=str(HERE / "runs")).fit(module, train)  # fmt: skip
    rows = [json.loads(line) for line in Path(spec["selection"]).read_text().splitlines()]
    after = module.evaluate(loaders)
    if chat:
        after["chat_acc"] = chat_accuracy(module, cfg["test_size"])
    sources = {k: sum(r.get("s3ft_source") == k for r in rows) for k in ("model", "paraphrase", "gold")}
    return {"after": after, "size": len(rows), **({"s3ft_sources": sources} if spec.get("selector") == "s3ft" else {}),
            "reviews": sum(r.get("source") == "reviews" for r in rows),
            "noisy": sum(bool(r.get("noisy")) for r in rows)}  # fmt: skip


def _spawn(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--run-one", json.dumps(spec)], check=False, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"run {spec['key']} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _s3ft_selection(pool: Path, root: Path) -> tuple[Path, Path]:
    """The pool's clean reviews as plain SFT data in the chat question format, and the same rows rewritten by S3FT
    (exact-match judge on the label the first sentence names, the model's answers in its chat format)."""
    from lightning_ft.cli import main

    rows = [json.loads(line) for line in pool.read_text().splitlines()]
    clean = [{**r, "prompt": S3FT_PROMPT.format(text=r["prompt"].removeprefix("Review: ").removesuffix("\nSentiment:"))}
             for r in rows if r["source"] == "reviews" and not r["noisy"]]  # fmt: skip
    sft = _write(root / "sft_chat.jsonl", clean)
    s3ft = root / "s3ft_chat.jsonl"
    if not s3ft.exists():
        main(["data", "rewrite", "--method", "s3ft", "--data", str(sft), "--output", str(s3ft), "--judge", "exact",
              "--answer-pattern", S3FT_ANSWER, "--max-new-tokens", "40", "--seed", "0", "--overwrite"])  # fmt: skip
    return sft, s3ft


def _mean(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (max(values) - min(values)) / 2


def _s3ft_table(runs: dict[str, dict[str, Any]], zero: dict[str, float]) -> list[str]:
    arms = {m: [r for r in runs.values() if r.get("selector") == m] for m in ("sft", "s3ft")}
    if not any(arms.values()):
        return []
    chat = runs.get("zero_shot_chat", {}).get("after", {}).get("chat_acc")
    lines = ["", "## S3FT against plain SFT (chat format, the pool's clean reviews)", "",
             (f"Base model's chat-answer accuracy: {'–' if chat is None else f'{chat:.3f}'}. Mean ± half the range over "
              "the seeds; the targets' sources are S3FT's choices (model answer / paraphrase / gold)."), "",
             "| arm | seeds | examples | chat-answer accuracy | control perplexity | targets: model / paraphrase / gold |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for arm, rs in arms.items():
        if not rs:
            continue
        acc = _mean([r["after"]["chat_acc"] for r in rs])
        ppl = _mean([100 * (r["after"]["control_ppl"] / zero["control_ppl"] - 1) for r in rs])
        src = rs[0].get("s3ft_sources")
        sources = " / ".join(str(src[k]) for k in ("model", "paraphrase", "gold")) if src else "– (gold labels)"
        lines.append(f"| {arm} | {len(rs)} | {rs[0]['size']} | {acc[0]:.3f} ± {acc[1]:.3f} | {ppl[0]:+.1f}% ± "
                     f"{ppl[1]:.1f} | {sources} |")  # fmt: skip
    return lines


def write_report(name: str, cfg: dict[str, Any], runs: dict[str, dict[str, Any]], command: str) -> Path:
    zero = runs["zero_shot"]["after"]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for key, r in runs.items():
        if not key.startswith("zero_shot") and r["selector"] not in ("sft", "s3ft"):
            groups.setdefault((r["selector"], r["fraction"]), []).append(r)
    lines = [f"# Data selection ({name})", "",
             (f"Pool: {cfg['reviews']} Rotten Tomatoes training reviews ({cfg['noise']:.0%} of labels flipped) and "
             f"{cfg['off_task']} records each of Chit-Chat, Reuters topics and trivia. Each selection is fine-tuned on "
             f"SmolLM2-135M (full FT, lr {cfg['learning_rate']}, {cfg['steps']} steps of batch {cfg['batch_size']}); "
             f"target accuracy on {cfg['test_size']} held-out reviews, control = HumanEval perplexity change against "
             f"the base model (zero-shot accuracy {zero['target_acc']:.3f}). Mean ± half the range over the seeds."), "",
             ("| selector | fraction | seeds | accuracy | control perplexity | reviews in selection | flipped labels | "
              "vs random | vs zero-shot |"), "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    summary = []
    for (selector, fraction), rs in sorted(groups.items(), key=lambda x: (x[0][1], SELECTORS.index(x[0][0]) if x[0][0] in SELECTORS else 9, x[0][0])):
        acc = _mean([r["after"]["target_acc"] for r in rs])
        ppl = _mean([100 * (r["after"]["control_ppl"] / zero["control_ppl"] - 1) for r in rs])
        base = groups.get(("random", fraction))
        verdict = "–"
        if base and selector != "random" and min(len(base), len(rs)) < 3:
            verdict = f"not ranked ({min(len(base), len(rs))} seed(s); three are needed)"
        elif base and selector != "random":
            b = [r["after"]["target_acc"] for r in base]
            mine = [r["after"]["target_acc"] for r in rs]
            verdict = ("beats random" if min(mine) > max(b) else "below random" if max(mine) < min(b)
                       else "same within spread")  # fmt: skip
        accs = [r["after"]["target_acc"] for r in rs]
        against_zero = ("above" if min(accs) > zero["target_acc"] else "below" if max(accs) < zero["target_acc"]
                        else "same within spread")  # fmt: skip
        summary.append({"selector": selector, "fraction": fraction, "seeds": len(rs), "acc": acc, "ppl": ppl,
                        "verdict": verdict, "vs_zero_shot": against_zero})  # fmt: skip
        lines.append(f"| {selector} | {fraction} | {len(rs)} | {acc[0]:.3f} ± {acc[1]:.3f} | {ppl[0]:+.1f}% ± "
                     f"{ppl[1]:.1f} | {statistics.fmean(r['reviews'] for r in rs):.0f} / "
                     f"{statistics.fmean(r['size'] for r in rs):.0f} | {statistics.fmean(r['noisy'] for r in rs):.0f} | "
                     f"{verdict} | {against_zero} |")  # fmt: skip
    lines += _s3ft_table(runs, zero)
    lines += ["", f"Command: `{command}`", ""]
    out = HERE / "results" / f"{name}.md"
    old = out.read_text() if out.exists() else ""
    notes = old[old.index(NOTES) :] if NOTES in old else ""  # the hand-written reading of the tables stays
    out.write_text("\n".join(lines) + ("\n" + notes if notes else ""))
    (HERE / "results" / f"{name}.json").write_text(json.dumps({"settings": cfg, "runs": runs, "summary": summary},
                                                              indent=1))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="data_selection")
    parser.add_argument("--selectors", nargs="*", default=list(SELECTORS), choices=SELECTORS,
                        help="selectors to run (none: only --s3ft)")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--s3ft", action="store_true", help="also S3FT against plain SFT on the clean reviews")
    parser.add_argument("--small", action="store_true", help="the 2-core preset (see the module docstring)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--learning-rate", type=float, default=None, help="override the preset's learning rate")
    parser.add_argument("--report-only", action="store_true", help="write the report from the finished runs only")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        print(json.dumps(run_one(json.loads(args.run_one))))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = {**DEFAULTS, **(SMALL if args.small else {}), **(QUICK if args.quick else {})}
    if args.learning_rate is not None:
        cfg["learning_rate"] = args.learning_rate
    root = HERE / "runs" / f"data_{args.name}"
    pool, target = build_pool(cfg, root)
    log = HERE / "results" / f"{args.name}.runs.jsonl"
    runs = {}
    if log.exists():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            same_eval = all(r["settings"].get(k) == cfg.get(k) for k in EVAL_KEYS)
            if r["settings"] == cfg or (r["key"].startswith("zero_shot") and same_eval):  # zero-shot trains nothing
                runs[r["key"]] = r
    todo: list[dict[str, Any]] = [{"key": "zero_shot", "selection": None, "seed": 0}]
    for fraction in args.fractions:
        for seed in args.seeds:
            for selector in args.selectors:
                todo.append({"key": f"{selector}_{fraction}_seed{seed}", "selector": selector, "fraction": fraction,
                             "seed": seed})  # fmt: skip
    if args.s3ft:
        todo.append({"key": "zero_shot_chat", "selection": None, "seed": 0})
        for seed in args.seeds:
            todo += [{"key": f"{m}_seed{seed}", "selector": m, "fraction": 1.0, "seed": seed} for m in ("sft", "s3ft")]
    for spec in todo:
        if spec["key"] in runs or args.report_only:
            continue
        if not spec["key"].startswith("zero_shot"):
            if spec["selector"] in ("sft", "s3ft"):
                spec["selection"] = str(_s3ft_selection(pool, root)[spec["selector"] == "s3ft"])
            else:
                spec["selection"] = str(select(spec["selector"], spec["fraction"], spec["seed"], cfg, pool, target, root))
        spec["settings"] = cfg
        result = {**spec, **_spawn(spec)}
        runs[spec["key"]] = result
        with log.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(spec["key"], json.dumps(result["after"]), flush=True)
    print(write_report(args.name, cfg, runs, "python benchmarks/data_selection.py " + " ".join(sys.argv[1:])).read_text())


if __name__ == "__main__":
    main()
