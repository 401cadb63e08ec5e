"""Training-data constructions (#22) against plain SFT on the same records and budget, on the bundled SmolLM2-135M.

One row per construction; each arm fine-tunes the same model for the same steps, batch, learning rate and data order
on the same source records, and both arms are scored on the same held-out records:

- **KAFT** (``KnowledgeAwareDataModule``, 0.4 relevant / 0.3 counterfactual / 0.3 irrelevant, as ``configs/kaft.yaml``)
  against SFT on the relevant contexts alone (1 / 0 / 0), on the Reuters company QA. Scores: answer accuracy on
  held-out questions with their own context (greedy completion mentions the gold answer), and the
  *context-following rate* on the same questions with a counterfactual context (the completion mentions the swapped
  answer that the context now states): KAFT's claim is that the second rises without hurting the first.
- **RAG fine-tuning** (``RetrievalAugmentedDataModule`` with hard negatives mixed in, reordering and the intermediate
  step, as ``configs/rag.yaml``) against SFT on the plain top-k retrieved contexts (no hard-negative mixing,
  best-first order, answer-only target). Score: answer accuracy on held-out questions with retrieved passages (the
  method arm, whose target first names the relevant passages, gets 16 more new tokens for that).
- **FAFT** (``FeedbackAwareDataModule``: 4 sampled answers per review, checked by ``sentiment_format``, trained on
  prompt + feedback -> answer, evaluated under all-positive feedback) against SFT on the same reviews. Scores: label
  accuracy (option log-likelihood) and the rate of greedy answers that pass every format constraint.
- **UL2** (``DenoisingDataModule``, the paper's seven-denoiser mixture) against plain causal-LM training on the same
  Hamlet texts. Scores: held-out causal perplexity and the held-out denoising loss (the same fixed corruptions).

Every row also reports the control-perplexity change on HumanEval code (forgetting). One seed (data order 0): these
are single rows, not a ranking; differences inside about 0.03 accuracy are noise at this test size.

    python benchmarks/constructions.py --name constructions --steps 30
    python benchmarks/constructions.py --name smoke --steps 2 --quick

Each arm runs in its own process; finished arms are appended to ``results/<name>.runs.jsonl`` and skipped by a
rerun with the same settings. Results: ``results/<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROWS = ("kaft", "rag", "faft", "ul2")
ARMS = ("method", "sft")


def _settings(quick: bool, steps: int) -> dict[str, Any]:
    small = {"train": 40, "test": 8, "control": 8, "hamlet_test": 4} if quick else {}
    return {"steps": steps, "batch_size": 8, "learning_rate": 1e-4, "warmup_steps": 3, "train": 240, "test": 64,
            "control": 32, "hamlet_test": 24, "max_new_tokens": 12, **small}  # fmt: skip


def _data(row: str, arm: str, cfg: dict[str, Any]) -> Any:
    """The training DataModule of one arm (its test split is the row's held-out set)."""
    common = dict(train_size=cfg["train"], val_size=0, test_size=cfg["test"], batch_size=cfg["batch_size"],
                  control="humaneval", control_size=cfg["control"], control_max_length=128, shuffle_seed=0)  # fmt: skip
    if row == "kaft":
        from lightning_ft.curation.kaft import KnowledgeAwareDataModule

        mix = (0.4, 0.3, 0.3) if arm == "method" else (1.0, 0.0, 0.0)
        return KnowledgeAwareDataModule(dataset="reuters_qa", relevant=mix[0], counterfactual=mix[1], irrelevant=mix[2],
                                        max_length=128, **common)  # fmt: skip
    if row == "rag":
        from lightning_ft.curation.rag import RetrievalAugmentedDataModule

        method = arm == "method"
        return RetrievalAugmentedDataModule(dataset="reuters_qa", passage_words=24, num_positives=1, num_hard_negatives=3,
                                            mix_hard_negatives=method, order="reorder" if method else "descending",
                                            intermediate=method, max_length=192, **common)  # fmt: skip
    if row == "faft":
        labels = dict(prompt_template="Review: {text}\nSentiment:", response_template=" {label}", label_field="label",
                      label_options=["positive", "negative"], max_length=128)  # fmt: skip
        if arm == "sft":
            from lightning_ft.data import InstructionDataModule

            return InstructionDataModule(dataset="rotten_tomatoes", **labels, **common)
        from lightning_ft.curation.faft import FeedbackAwareDataModule

        return FeedbackAwareDataModule(checker="lightning_ft.curation.faft_checks:sentiment_format", num_samples=4,
                                       sample_max_new_tokens=8, sample_temperature=1.0, dataset="rotten_tomatoes",
                                       **labels, **common)  # fmt: skip
    if row == "ul2":
        hamlet = {**common, "train_size": None, "test_size": cfg["hamlet_test"]}
        if arm == "method":
            from lightning_ft.data.ul2 import DenoisingDataModule

            return DenoisingDataModule(dataset="hamlet", max_length=128, **hamlet)
        return _plain_lm(hamlet)
    raise ValueError(row)


def _plain_lm(common: dict[str, Any]) -> Any:
    from lightning_ft.data import InstructionDataModule

    return InstructionDataModule(dataset="hamlet", prompt_template="", response_template="{text}", label_options=None,
                                 mask_prompt=False, append_eos=True, max_length=128, **common)  # fmt: skip


def _answers(module: Any, prompts: list[str], cfg: dict[str, Any]) -> list[str]:
    from lightning_ft.curation.generation import GenerationService, GenerationSettings

    service = GenerationService(module, cache=None, batch_size=16, max_length=512)
    return [c[0] for c in service.generate(prompts, GenerationSettings(max_new_tokens=cfg["max_new_tokens"]))]


def _qa_scores(module: Any, dm: Any, row: str, cfg: dict[str, Any]) -> dict[str, float]:
    from lightning_ft.curation.kaft import KnowledgeAwareContexts, mentions

    records = dm._splits["test"]
    if getattr(dm.hparams, "intermediate", False):  # "Relevant passages: [i, j]. Answer: " comes first: room for it too
        cfg = {**cfg, "max_new_tokens": cfg["max_new_tokens"] + 16}
    answers = _answers(module, [dm._prompt(r) for r in records], cfg)
    out = {"answer_acc": sum(mentions(a, str(r["answer"])) for a, r in zip(answers, records)) / len(records)}
    if row == "kaft":
        swapped = KnowledgeAwareContexts(relevant=0.0, counterfactual=1.0, irrelevant=0.0, seed=1)
        usable = [r for r in records if swapped._swap_options(r, swapped._entity_pools(dm._splits["train"] + records))]
        flipped = swapped(usable)
        answers = _answers(module, [dm._prompt(r) for r in flipped], cfg)
        out["follows_counterfactual"] = sum(mentions(a, r["kaft_answer"]) for a, r in zip(answers, flipped)) / len(
            flipped
        )
        out["keeps_gold_under_counterfactual"] = sum(
            mentions(a, r["kaft_gold"]) for a, r in zip(answers, flipped)
        ) / len(flipped)
        out["counterfactual_questions"] = len(flipped)
    return out


def _scores(module: Any, dm: Any, row: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The row's held-out scores for the module as it is now."""
    loaders = list(dm.test_dataloader())
    base = module.evaluate(loaders)
    out: dict[str, Any] = {"control_ppl": base.get("control_ppl")}
    if row in ("kaft", "rag"):
        out.update(_qa_scores(module, dm, row, cfg))
    elif row == "faft":
        from lightning_ft.curation.faft_checks import sentiment_format

        out["label_acc"] = base.get("target_acc")
        records = dm._splits["test"]
        answers = _answers(module, [dm._prompt(r) for r in records], {**cfg, "max_new_tokens": 4})
        first_lines = [a.split("\n", 1)[0] for a in answers]  # the answer line (the prompts end before it)
        out["format_pass"] = sum(all(sentiment_format(a).values()) for a in first_lines) / len(records)
    else:  # ul2: the same held-out texts as plain LM (causal perplexity) and under fixed corruptions (denoising loss)
        from lightning_ft.data.ul2 import DenoisingDataModule

        hamlet = dict(train_size=None, val_size=0, test_size=cfg["hamlet_test"], batch_size=cfg["batch_size"], control=None,
                      shuffle_seed=0)  # fmt: skip
        for name, other in (
            ("causal", _plain_lm(hamlet)),
            ("denoising", DenoisingDataModule(dataset="hamlet", max_length=128, **hamlet)),
        ):
            other.tokenizer = module.tokenizer
            other.setup("fit")
            out[f"{name}_loss"] = module.evaluate(list(other.test_dataloader()))["target_loss"]
    return out


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Fit one arm in this process; its held-out scores before and after."""
    import lightning as L
    import torch

    from lightning_ft.modules import CausalLMModule

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    cfg = spec["settings"]
    L.seed_everything(0)
    module = CausalLMModule(model="smollm2-135m", learning_rate=cfg["learning_rate"], warmup_steps=cfg["warmup_steps"],
                            output_dir="")  # fmt: skip
    dm = _data(spec["row"], spec["arm"], cfg)
    dm.tokenizer = module.tokenizer
    trainer = L.Trainer(max_steps=cfg["steps"], accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, gradient_clip_val=1.0, default_root_dir=str(HERE / "runs"))  # fmt: skip
    if hasattr(dm, "generator"):  # KAFT's closed-book answers and FAFT's samples: the base model, before the fit
        from lightning_ft.curation.generation import GenerationService

        dm.generator = GenerationService(module, cache=HERE / "runs" / "generations.jsonl", batch_size=16)
    dm.setup("fit")
    before = _scores(module, dm, spec["row"], cfg) if spec["arm"] == "sft" else None
    trainer.fit(module, dm)
    return {
        "before": before,
        "after": _scores(module, dm, spec["row"], cfg),
        "train_examples": len(dm._encoded["train"]),
    }


def _spawn(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--run-one", json.dumps(spec)], check=False, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"arm {spec['row']}/{spec['arm']} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


LABELS = {"kaft": "KAFT (0.4/0.3/0.3) vs SFT on relevant contexts", "rag": "RAG FT (hard negatives, reorder, "
          "intermediate step) vs SFT on plain top-k contexts", "faft": "FAFT (feedback-conditioned) vs SFT",
          "ul2": "UL2 mixture of denoisers vs plain causal LM"}  # fmt: skip


def _fmt(value: Any) -> str:
    return "—" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def write_report(name: str, cfg: dict[str, Any], runs: dict[str, dict[str, Any]], command: str) -> Path:
    lines = [f"# Training-data constructions vs plain SFT: {name}", "", f"Command: `{command}`", "",
             (f"Settings: {json.dumps(cfg)}. See the docstring of `benchmarks/constructions.py` for the arms and "
              "scores. One data order; `before` is the base model on the same held-out set. Control ppl change is "
              "relative to the base model."), ""]  # fmt: skip
    for row in ROWS:
        method, sft = runs.get(f"{row}/method"), runs.get(f"{row}/sft")
        if not (method and sft):
            continue
        base = sft["before"]
        keys = [k for k in base if k != "control_ppl"]
        lines += [f"## {LABELS[row]}", "", "| arm | train examples | " + " | ".join(keys) + " | control ppl change |",
                  "|---|---|" + "---|" * len(keys) + "---|"]  # fmt: skip
        lines.append("| base model (no fit) | — | " + " | ".join(_fmt(base[k]) for k in keys) + " | — |")
        for arm, run in (("plain SFT", sft), (row.upper(), method)):
            after = run["after"]
            change = after["control_ppl"] / base["control_ppl"] - 1 if base.get("control_ppl") else None
            lines.append(f"| {arm} | {run['train_examples']} | " + " | ".join(_fmt(after.get(k)) for k in keys)
                         + f" | {'—' if change is None else f'{change:+.1%}'} |")  # fmt: skip
        lines.append("")
    path = HERE / "results" / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    (HERE / "results" / f"{name}.json").write_text(json.dumps({"settings": cfg, "runs": runs}, indent=1))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="constructions")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test of the script)")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        print(json.dumps(run_one(json.loads(args.run_one))))
        return
    cfg = _settings(args.quick, args.steps)
    log = HERE / "results" / f"{args.name}.runs.jsonl"
    runs: dict[str, dict[str, Any]] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if entry["settings"] == cfg:
                runs[entry["key"]] = entry["result"]
    command = "python benchmarks/constructions.py " + " ".join(sys.argv[1:])
    for row in args.rows:
        for arm in ARMS:
            key = f"{row}/{arm}"
            if key in runs:
                continue
            runs[key] = _spawn({"row": row, "arm": arm, "settings": cfg})
            with log.open("a") as f:
                f.write(json.dumps({"key": key, "settings": cfg, "result": runs[key]}) + "\n")
            print(key, json.dumps(runs[key]), flush=True)
            write_report(args.name, cfg, runs, command)
    print(write_report(args.name, cfg, runs, command))


if __name__ == "__main__":
    main()
