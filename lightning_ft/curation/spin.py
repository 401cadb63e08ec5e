"""SPIN: self-play fine-tuning, iterated from one fit config (``lightning-ft spin``).

SPIN (Chen et al., "Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models", arXiv
2401.01335) turns an SFT dataset into preference pairs against the model itself: at iteration ``t`` the model of
iteration ``t-1`` answers every training prompt (the "opponent"), and the model is trained with the DPO-form loss
(:class:`~lightning_ft.objectives.PreferenceLossMixin`, logistic loss, beta 0.1) on pairs (gold answer = chosen,
its own answer = rejected), with iteration ``t-1``'s model as the reference. From the second iteration on, the pairs
of earlier iterations are carried forward (``--carry``; the paper's iterations train on the current and the previous
iteration's synthetic data, our default 1).

Each iteration is one ``lightning-ft fit`` of ``--fit-config`` (a ``PreferenceCausalLM`` with a
``PreferenceDataModule``; ``configs/spin.yaml`` has the paper's optimiser, RMSprop, and warmup 0.1 of the steps)
with the model replaced by the previous iteration's export and the data by the iteration's pairs file. With a LoRA
backbone each iteration exports the merged model (``merge_adapter``), so the next iteration's adapter-disabled
reference is exactly the previous iteration's model. Generation is greedy by default (``--temperature`` samples),
through the shared :class:`~lightning_ft.curation.generation.GenerationService` and cached per iteration. A prompt
whose generated answer equals the gold one gives a pair with no gradient (``z`` is 0 whatever the weights) and is
left out; the report counts them.

After each step (generation, fit) ``WORK/state.json`` is replaced atomically: rerunning the same command resumes at
the first unfinished step, and an interrupted fit continues from its ``last.ckpt``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning_ft.core.io import write_text_atomic
from lightning_ft.curation.kmq import fit_config_arguments, fit_round
from lightning_ft.curation.rounds import load_rounds, save_rounds, settings_of
from lightning_ft.errors import SentenceParser, UserError

__all__ = ["main", "spin_pairs"]

PROG = "lightning-ft spin"
STATE_FILE = "state.json"


def spin_pairs(prompts: Sequence[str], gold: Sequence[str], generated: Sequence[str], iteration: int) -> list[dict]:
    """The iteration's pairs: gold answer chosen, the model's own answer rejected; a pair whose two answers are the
    same text (after stripping whitespace) is left out."""
    return [
        {"prompt": p, "chosen": g, "rejected": o, "spin_iteration": iteration}
        for p, g, o in zip(prompts, gold, generated, strict=True)
        if o.strip() != g.strip()
    ]


def _parser() -> SentenceParser:
    parser = SentenceParser(prog=PROG, description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("--fit-config", required=True, type=Path,
                        help="the fit of every iteration: a PreferenceCausalLM with a PreferenceDataModule "
                        "(configs/spin.yaml); its model is the iteration-0 model")  # fmt: skip
    parser.add_argument("--data", required=True, help="the SFT data: a bundled dataset name or a data file")
    parser.add_argument("--prompt-template", default="{prompt}", help="renders a record's prompt (default {prompt})")
    parser.add_argument("--response-template", default=" {response}",
                        help="renders its gold answer (default ' {response}')")  # fmt: skip
    parser.add_argument("--limit", type=int, default=None, help="use the first N records only")
    parser.add_argument("--iterations", type=int, default=3, help="SPIN iterations (default 3)")
    parser.add_argument("--carry", type=int, default=1,
                        help="earlier iterations whose pairs are trained on again (default 1)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=64, help="length of the opponent's answers (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0 samples")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampled answers (default 0)")
    parser.add_argument("--work-dir", required=True, type=Path,
                        help="iterations, generations and state.json; rerun the same command to resume")  # fmt: skip
    return parser


def _check(args: argparse.Namespace) -> None:
    if args.iterations < 1:
        raise UserError(f"--iterations {args.iterations} must be at least 1.")
    if args.carry < 0:
        raise UserError(f"--carry {args.carry} must be 0 or more (earlier iterations trained on again).")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be at least 1.")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit} must be at least 1 (or left out for every record).")
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature} must be 0 (greedy) or positive.")
    if not args.fit_config.is_file():
        raise UserError(
            f"--fit-config {args.fit_config} is not a file: give a lightning-ft fit config (configs/spin.yaml)."
        )


def _start_model(config: Path) -> str:
    """The fit config's ``model.init_args.model`` (CausalLMModule's default when absent)."""
    return str(fit_config_arguments(config, "model").get("model", "smollm2-135m"))


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return settings_of(args, skip=("work_dir", "fit_command"))


def _generate(model: str, prompts: list[str], args: argparse.Namespace, cache: Path) -> list[str]:
    from lightning_ft.curation.generation import GenerationService, GenerationSettings

    service = GenerationService(model, cache=cache, batch_size=args.batch_size, progress=True)
    sample = args.temperature > 0
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=sample,
                                  temperature=args.temperature if sample else 1.0, seed=args.seed)  # fmt: skip
    answers = [samples[0] for samples in service.generate(prompts, settings)]
    del service
    return answers


def _exported(folder: Path) -> str:
    """The next iteration's model: the merged model of a LoRA fit, else the exported model."""
    if (folder / "adapter_config.json").is_file():
        merged = folder / "merged"
        if not merged.is_dir():
            raise UserError(f"the fit exported a LoRA adapter ({folder}) without its merged model: SPIN passes "
                            "merge_adapter: true, so keep model.init_args.merge_adapter unset in --fit-config.")  # fmt: skip
        return str(merged)
    return str(folder)


def run(args: argparse.Namespace, fit: Callable[[list[str]], None]) -> dict[str, Any]:
    """Run (or resume) every iteration; returns the report (also written to ``WORK/report.json``)."""
    from lightning_ft.curation.records import read_pool, write_dataset
    from lightning_ft.data.collate import render

    _check(args)
    records = read_pool(args.data)[: args.limit]
    if not records:
        raise UserError(f"--data {args.data} holds no records: give an SFT dataset with prompts and answers.")
    prompts = [render(args.prompt_template, r, "--prompt-template") for r in records]
    gold = [render(args.response_template, r, "--response-template") for r in records]
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    settings, state_path = _settings(args), work / STATE_FILE
    iterations = load_rounds(state_path, settings, key="iterations")
    model = _start_model(args.fit_config)
    for t in range(1, args.iterations + 1):
        root = work / f"iteration_{t}"
        if len(iterations) < t:
            generated = _generate(model, prompts, args, root / "generations.jsonl")
            pairs = spin_pairs(prompts, gold, generated, t)
            carried = [p for e in iterations[max(0, t - 1 - args.carry) : t - 1] for p in _read(Path(e["pairs"]))
                       if p["spin_iteration"] == e["iteration"]]  # fmt: skip
            if not pairs and not carried:
                raise UserError(f"iteration {t}: the model's answers equal the gold answers on every prompt, so there "
                                "is nothing to learn from: stop here, or give more or harder data.")  # fmt: skip
            path = root / "pairs.jsonl"
            write_dataset(pairs + carried, path, {"method": "spin", "iteration": t, "pairs": len(pairs),
                                                  "carried": len(carried), "same_as_gold": len(prompts) - len(pairs)})  # fmt: skip
            iterations.append({"iteration": t, "start_model": model, "pairs": str(path), "new_pairs": len(pairs),
                               "carried": len(carried), "same_as_gold": len(prompts) - len(pairs), "model": None})  # fmt: skip
            save_rounds(state_path, settings, iterations, key="iterations")
        entry = iterations[t - 1]
        if entry["model"] is None:
            extra = ["--model.init_args.model", entry["start_model"], "--model.init_args.merge_adapter", "true",
                     "--data.init_args.prompt_template", "{prompt}", "--data.init_args.chosen_template", "{chosen}",
                     "--data.init_args.rejected_template", "{rejected}", "--data.init_args.label_options", "null"]  # fmt: skip
            entry["model"] = _exported(fit_round(args.fit_config, Path(entry["pairs"]), root, fit, extra))
            save_rounds(state_path, settings, iterations, key="iterations")
        model = entry["model"]
    report = {"method": "spin", "iterations": iterations, "final_model": model}
    write_text_atomic(work / "report.json", json.dumps(report, indent=1) + "\n")
    return report


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: list[str], fit: Callable[[list[str]], None]) -> None:
    """``lightning-ft spin ...``; ``fit`` runs a ``lightning-ft fit`` command line (handed down by the CLI)."""
    args = _parser().parse_args(argv)
    report = run(args, fit)
    for entry in report["iterations"]:
        print(f"iteration {entry['iteration']}: {entry['new_pairs']} new pairs (+{entry['carried']} carried, "
              f"{entry['same_as_gold']} answers equal to gold left out) -> {entry['model']}")  # fmt: skip
    print(f"final model: {report['final_model']}")
