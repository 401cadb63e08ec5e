"""S3FT: train on the model's own correct answers, else on its paraphrase of the gold answer, else on the gold one.

Selective Self-to-Supervised Fine-Tuning (Gupta et al., NAACL Findings 2025, https://arxiv.org/abs/2502.08130).
For each example ``(x, y)``:

1. ``ŷ`` = the model's greedy answer to ``x``; if the judge says ``ŷ`` is equivalent to ``y``, the target is ``ŷ``
   (``s3ft_source: "model"``);
2. else ``ỹ`` = the model's paraphrase of ``y`` (:data:`PARAPHRASE_PROMPT`); if the judge says ``ỹ`` is equivalent
   to ``y``, the target is ``ỹ`` (``"paraphrase"``);
3. else the target stays ``y`` (``"gold"``).

Training on the model's own wording keeps the fine-tuned model closer to its original distribution, which is what
halves the loss on general benchmarks in the paper. The paper's paraphrase prompt is not published (no code was
released), so :data:`PARAPHRASE_PROMPT` is ours: it shows the request and the gold answer and lets the model restate
the answer in its own words (``--paraphrase-template`` replaces it; it is kept short because every paraphrase request
is a forward pass over it). Generation goes through the cached
:class:`~lightning_ft.curation.generation.GenerationService`, so a rerun generates nothing twice.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_ft.curation.judges import Judge, judge_all, load_judge, use_chat_template
from lightning_ft.errors import UserError

__all__ = [
    "PARAPHRASE_PROMPT",
    "Target",
    "add_arguments",
    "add_prompt_arguments",
    "choose_targets",
    "paraphrase_prompts",
    "render_prompts",
    "rewritten",
    "run",
]

SOURCES = ("model", "paraphrase", "gold")

PARAPHRASE_PROMPT = "{prompt}\nCorrect answer: {gold}\nThe correct answer, in your own words:"

Generate = Callable[[Sequence[str]], list[str]]


@dataclass(frozen=True)
class Target:
    """The training target chosen for one example, where it came from and the judge's reason."""

    text: str
    source: str  # "model", "paraphrase" or "gold"
    reason: str


def paraphrase_prompts(prompts: Sequence[str], golds: Sequence[str], template: str = PARAPHRASE_PROMPT) -> list[str]:
    """The requests asking the model to restate each gold answer in its own words."""
    return [template.format(prompt=p, gold=g) for p, g in zip(prompts, golds)]


def choose_targets(prompts: Sequence[str], golds: Sequence[str], records: Sequence[Mapping[str, Any]], *,
                   answer: Generate, judge: Judge, paraphrase: Generate | None = None,
                   template: str = PARAPHRASE_PROMPT) -> list[Target]:  # fmt: skip
    """S3FT's choice of target for every example (the algorithm of the module docstring).

    Args:
        prompts: The prompts as the model sees them.
        golds: The gold responses.
        records: The data rows (the judge may read other columns, e.g. unit tests).
        answer: Greedy answers of the model to a list of prompts.
        judge: Decides equivalence with the gold response.
        paraphrase: Greedy answers of the model to a list of paraphrase requests (:func:`paraphrase_prompts`),
            or ``None`` to skip the paraphrase step.
        template: The paraphrase request, with ``{prompt}`` and ``{gold}`` fields.
    """
    own = answer(prompts)
    verdicts = judge_all(judge, prompts, own, golds, records)
    targets: list[Target | None] = [Target(a, "model", v.reason) if v else None for a, v in zip(own, verdicts)]
    failed = [i for i, t in enumerate(targets) if t is None]
    if paraphrase is not None and failed:
        restated = paraphrase(paraphrase_prompts([prompts[i] for i in failed], [golds[i] for i in failed], template))
        again = judge_all(judge, [prompts[i] for i in failed], restated, [golds[i] for i in failed],
                          [records[i] for i in failed])  # fmt: skip
        for i, text, verdict in zip(failed, restated, again):
            if verdict:
                targets[i] = Target(text, "paraphrase", verdict.reason)
    model_reasons = {i: v.reason for i, v in enumerate(verdicts)}
    return [t if t is not None else Target(golds[i], "gold", model_reasons[i]) for i, t in enumerate(targets)]


# ------------------------------------------------------------------------------------------------ command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lightning-ft data rewrite --method s3ft`` (the common ones come from the command)."""
    parser.description = (
        "Selective Self-to-Supervised Fine-Tuning (Gupta et al. 2025). Reads --prompt-field (or --prompt-template) "
        "and --response-field (the gold answer) of every record. Writes every record, with --response-field "
        "replaced by the chosen target, the gold answer kept in gold_<field>, and s3ft_source (model, paraphrase or "
        "gold) and s3ft_reason (the judge's reason); the report counts the records per source."
    )
    group = parser.add_argument_group("S3FT")
    group.add_argument("--judge", default="exact",
                       help="who decides that an answer is equivalent to the gold one: exact (normalised answer "
                            "match, numbers by value, final answers such as '#### 42' extracted), code (the record's "
                            "unit tests, HumanEval 'test'/'entry_point' or MBPP 'test_list', run in a subprocess), "
                            "model (--judge-model answers yes/no) or package.module:function "
                            "(default: exact)")  # fmt: skip
    group.add_argument("--paraphrase", action=argparse.BooleanOptionalAction, default=True,
                       help="when the model's answer fails, try its paraphrase of the gold answer before keeping "
                            "the gold one (default: on)")  # fmt: skip
    group.add_argument(
        "--paraphrase-template",
        default=PARAPHRASE_PROMPT,
        help="the paraphrase request, with {prompt} and {gold} fields (default: %(default)r)",
    )
    group.add_argument("--max-new-tokens", type=int, default=256,
                       help="length of the model's answers and paraphrases (default: 256)")  # fmt: skip
    add_prompt_arguments(group)
    group.add_argument("--answer-pattern", default=None,
                       help="exact judge: a regular expression whose first group is the final answer (default: "
                            "'#### x', '\\boxed{x}', 'the answer is x')")  # fmt: skip
    group.add_argument(
        "--prefix-match",
        action="store_true",
        help="exact judge: accept an answer that begins with the gold words (label-like answers)",
    )
    group.add_argument(
        "--code-timeout",
        type=float,
        default=10.0,
        help="code judge: seconds each candidate program may run (default: 10)",
    )
    group.add_argument(
        "--judge-model", default=None, help="model judge: the model asked (bundled alias or folder; default: --model)"
    )


def add_prompt_arguments(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """``--prompt-template`` and ``--chat-template``, shared by the commands that generate from the prompts."""
    group.add_argument("--prompt-template", default=None,
                       help="how a record becomes the prompt the model answers, a str.format string over its "
                            "columns, e.g. 'Review: {text}\\nIs this review positive or negative?' "
                            "(default: the --prompt-field column as it is)")  # fmt: skip
    group.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wrap prompts in the tokenizer's chat template, when it has one (default: on)",
    )


def render_prompts(records: Sequence[Mapping[str, Any]], template: str | None, prompt_field: str) -> list[str]:
    """Each record's prompt: ``template`` filled from its columns, or its ``prompt_field`` column.

    Raises:
        UserError: the template names a column the data lacks.
    """
    if template is None:
        return [str(r[prompt_field]) for r in records]
    try:
        return [template.format(**r) for r in records]
    except KeyError as err:
        raise UserError(
            f"--prompt-template names the column {err.args[0]!r}, which the data lacks: use its columns "
            f"({', '.join(sorted(records[0]))})."
        ) from None
    except (IndexError, ValueError) as err:
        raise UserError(f"--prompt-template {template!r} is not a valid format string ({err}).") from None


def _judge(args: argparse.Namespace, service: Any) -> Judge:
    if args.judge == "exact":
        return load_judge("exact", pattern=args.answer_pattern, prefix=args.prefix_match)
    if args.judge == "code":
        return load_judge("code", timeout=args.code_timeout)
    if args.judge == "model":
        judge_service = service if args.judge_model in (None, args.model) else _service(args, args.judge_model)
        return load_judge("model", service=judge_service, chat_template=args.chat_template)
    return load_judge(args.judge)


def _service(args: argparse.Namespace, model: str) -> Any:
    from lightning_ft.curation.generation import GenerationService

    cache = Path(args.cache_dir).expanduser() / "generations" if args.cache_dir else None
    return GenerationService(model, cache=cache, batch_size=args.batch_size, progress=True)


def run(args: argparse.Namespace) -> dict:
    """Rewrite ``--data``'s responses with S3FT and write ``--output`` (JSONL) and its report; returns the report."""
    from lightning_ft.curation.generation import GenerationSettings
    from lightning_ft.curation.records import read_pool, write_dataset

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be at least 1.")
    try:
        args.paraphrase_template.format(prompt="", gold="")
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(f"--paraphrase-template may use only the fields {{prompt}} and {{gold}} (got {err}).") from None
    field = args.response_field
    records = read_pool(args.data, argument="--data", fields=(args.prompt_field, field),
                        options={args.prompt_field: "--prompt-field", field: "--response-field"})  # fmt: skip
    prompts = render_prompts(records, args.prompt_template, args.prompt_field)
    judge = _judge(args, None) if args.judge != "model" else None  # a misnamed judge fails before the model loads
    service = _service(args, args.model)
    judge = judge if judge is not None else _judge(args, service)
    chat = use_chat_template(service, args.chat_template)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, seed=args.seed, chat_template=chat)

    def greedy(texts: Sequence[str]) -> list[str]:
        return [samples[0].strip() for samples in service.generate(list(texts), settings)]

    golds = [str(r[field]) for r in records]
    targets = choose_targets(prompts, golds, records, answer=greedy, judge=judge,
                             paraphrase=greedy if args.paraphrase else None,
                             template=args.paraphrase_template)  # fmt: skip
    rows = [rewritten(r, t, field) for r, t in zip(records, targets)]
    report = build_report(targets, args, getattr(service, "fingerprint", str(args.model)))
    write_dataset(rows, args.output, report)
    return report


def rewritten(record: Mapping[str, Any], target: Target, field: str) -> dict:
    """The record with its response replaced by the target, the gold kept in ``gold_<field>``, and the source."""
    row = dict(record)
    row[f"gold_{field}"] = record[field]
    row[field] = target.text
    row["s3ft_source"] = target.source
    row["s3ft_reason"] = target.reason
    return row


def build_report(targets: Sequence[Target], args: argparse.Namespace, model: str) -> dict:
    """Counts per source and the settings that produced them."""
    counts = Counter(t.source for t in targets)
    return {
        "method": "s3ft",
        "data": str(args.data),
        "output": str(args.output),
        "model": model,
        "judge": args.judge,
        "paraphrase": bool(args.paraphrase),
        "examples": len(targets),
        "counts": {source: counts.get(source, 0) for source in SOURCES},
        "max_new_tokens": args.max_new_tokens,
        "chat_template": bool(args.chat_template),
        "prompt_template": args.prompt_template,
    }
