"""``lightning-ft data select|curate|rewrite|filter``: data selection and curation commands.

    lightning-ft data select --method ot --data trivia --target target.jsonl --budget 100 --output selected.jsonl
    lightning-ft data select --method kmq --data trivia --budget 0.1 --clusters 8 --output kmq.jsonl
    lightning-ft data curate --data trivia --threshold 0.5 --output curated.jsonl
    lightning-ft data rewrite --data trivia --judge exact --output s3ft.jsonl
    lightning-ft data filter --data rotten_tomatoes --text-field text --keep-quantiles 0 0.2 --output low_ppl.jsonl

Every command reads a pool (``--data``: a bundled dataset or a data file), writes a JSONL dataset (``--output``) that
``InstructionDataModule(dataset=<output>)`` reads directly, and a report beside it (``<stem>.report.json``). Each
method lives in its own module (:data:`METHODS`), imported only when it runs; a module that is missing makes only its
own method unavailable. A method module provides ``add_arguments(parser)`` (its own options) and ``run(args) ->
report``; the options every command shares (:func:`add_common_arguments`) are added here. A mistake is answered with
``lightning-ft data: error: <sentence>`` (exit 2 for the command line, 1 otherwise; see :mod:`lightning_ft.errors`).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from lightning_ft.errors import SentenceParser, UsageError, UserError, did_you_mean

__all__ = ["METHODS", "add_common_arguments", "default_cache_dir", "main"]

PROG = "lightning-ft data"
METHODS: dict[str, dict[str, str]] = {
    "select": {"ot": "lightning_ft.curation.ot", "kmq": "lightning_ft.curation.kmq"},
    "curate": {"clear": "lightning_ft.curation.clear"},
    "rewrite": {"s3ft": "lightning_ft.curation.s3ft"},
    "filter": {"perplexity": "lightning_ft.curation.perplexity"},
}
_PURPOSE = {
    "select": "choose a subset of the pool: GOT-D (ot: optimal transport towards a target sample) or Diversify and "
    "Conquer (kmq: k-means clusters with per-cluster budgets, optionally refined over fit rounds)",
    "curate": "CLEAR: score each (prompt, response) by the model's confidence, drop those below a threshold, "
    "optionally replace a response by a confidently better one",
    "rewrite": "S3FT: replace each gold response by the model's own answer when a judge finds it equivalent, else by "
    "a paraphrase of the gold answer in the model's words when that passes, else keep the gold answer",
    "filter": "POINTS' perplexity filter: keep the examples whose perplexity under a reference model lies in a band",
}
_EXAMPLES = {
    "select": [
        "lightning-ft data select --method ot --data trivia --target target.jsonl --budget 100 --output ot.jsonl",
        "lightning-ft data select --method kmq --data trivia --budget 0.1 --clusters 8 --output kmq.jsonl",
    ],
    "curate": ["lightning-ft data curate --data trivia --threshold 0.5 --output curated.jsonl"],
    "rewrite": ["lightning-ft data rewrite --data trivia --judge exact --output s3ft.jsonl"],
    "filter": [
        "lightning-ft data filter --data rotten_tomatoes --text-field text --keep-quantiles 0 0.2 --output ppl.jsonl",
        "lightning-ft data filter --data trivia --max-ppl 50 --output trivia_ppl.jsonl",
    ],
}
_EXTRAS = {"ot": "POT", "faiss": "faiss-cpu", "sklearn": "scikit-learn", "scipy": "scipy"}
_IO = (
    "input: --data, a bundled dataset (rotten_tomatoes, trivia, humaneval, chitchat, reuters_r8, hamlet) or a "
    ".jsonl/.json/.csv/.tsv/.parquet file; the records must hold the columns the method reads (--prompt-field, "
    "--response-field). output: --output, a JSONL file that InstructionDataModule(dataset=<output>) reads directly, "
    "and <output stem>.report.json beside it with what the method did (counts, settings, statistics)."
)


def default_cache_dir() -> Path:
    """The default ``--cache-dir``: ``curation`` in lightning-ft's user cache (``$LIGHTNING_FT_CACHE`` or
    ``~/.cache/lightning_ft``, as :func:`lightning_ft.assets.cache_dir`)."""
    root = os.environ.get("LIGHTNING_FT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "lightning_ft"
    )
    return Path(root) / "curation"


def add_common_arguments(parser: argparse.ArgumentParser, command: str, methods: Sequence[str]) -> None:
    """The options every ``lightning-ft data`` command shares (method modules add only their own)."""
    group = parser.add_argument_group("common options")
    default = methods[0] if len(methods) == 1 else None
    group.add_argument("--method", choices=list(methods), default=default, required=default is None,
                       help=f"the {command} method" + (f" (default {default})" if default else ""))  # fmt: skip
    group.add_argument("--data", required=True, help="the pool: a bundled dataset name or a data file")
    group.add_argument("--output", required=True, help="the output dataset (.jsonl); its report goes beside it")
    group.add_argument("--prompt-field", default="prompt", help="the column holding the prompt (default prompt)")
    group.add_argument("--response-field", default="response",
                       help="the column holding the response (default response)")  # fmt: skip
    group.add_argument("--model", default="smollm2-135m",
                       help="the model: bundled alias, HF folder or LoRA adapter folder (default smollm2-135m)")  # fmt: skip
    group.add_argument("--cache-dir", default=None,
                       help=f"cache of embeddings and generations, reused by reruns (default {default_cache_dir()}; "
                       "'' for none)")  # fmt: skip
    group.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    group.add_argument("--batch-size", type=int, default=8, help="examples per model batch (default 8)")
    group.add_argument("--overwrite", action="store_true", help="replace an existing --output")


# ---------------------------------------------------------------------------------------------- methods
def _method_summary(module_name: str) -> str | None:
    """The first sentence of a method module's docstring, read without importing it (``None``: not installed)."""
    try:
        spec = importlib.util.find_spec(module_name)
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        return None
    try:
        doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) or ""
    except SyntaxError:
        doc = ""
    first = " ".join(doc.split("\n\n")[0].split())
    return first.split(": ", 1)[1] if first.startswith("``") and ": " in first else first


def _methods_text(command: str) -> str:
    rows = []
    for method, module_name in METHODS[command].items():
        summary = _method_summary(module_name)
        rows.append(f"  {method:<11} {summary if summary is not None else '(not available: module missing)'}")
    return "\n".join(rows)


def load_method(command: str, method: str) -> ModuleType:
    """Import the module of ``method`` (it must provide ``add_arguments`` and ``run``).

    Raises:
        UserError: The module is missing, lacks a dependency, or lacks ``add_arguments`` / ``run``.
    """
    name = METHODS[command][method]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        missing = (err.name or "").split(".")[0]
        if err.name == name:
            raise UserError(f"--method {method} is not available in this installation of lightning-ft ({name} is "
                            f"missing): use another method of {PROG} {command}.") from None  # fmt: skip
        if missing in _EXTRAS:
            raise UserError(f"--method {method} needs the {_EXTRAS[missing]} package: run `pip install "
                            "'lightning-ft[data]'`.") from None  # fmt: skip
        raise
    if not (callable(getattr(module, "add_arguments", None)) and callable(getattr(module, "run", None))):
        raise UserError(f"--method {method}: {name} does not provide add_arguments(parser) and run(args).")
    return module


def _given_method(command: str, argv: Sequence[str]) -> str | None:
    """The ``--method`` of ``argv`` (the only method when the command has one; ``None`` when it is not given)."""
    methods = list(METHODS[command])
    value = None
    for i, arg in enumerate(argv):
        if arg == "--method" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--method="):
            value = arg.split("=", 1)[1]
    if value is None:
        return methods[0] if len(methods) == 1 else None
    if value not in methods:
        raise UsageError(f"--method must be one of {', '.join(methods)} (got {value}){did_you_mean(value, methods)}",
                         f"usage: {PROG} {command} --method {{{','.join(methods)}}} [options]")  # fmt: skip
    return value


# ---------------------------------------------------------------------------------------------- parsers
def _command_parser(command: str, module: ModuleType | None, method: str | None) -> SentenceParser:
    examples = "\n".join(f"  {line}" for line in _EXAMPLES[command])
    more = "" if module is not None else f"\nthe options of a method: {PROG} {command} --method METHOD --help\n"
    parser = SentenceParser(
        prog=f"{PROG} {command}",
        description=f"{_PURPOSE[command][0].upper()}{_PURPOSE[command][1:]}.",
        epilog=f"{_IO}\n\nmethods:\n{_methods_text(command)}\n{more}\nexamples:\n{examples}",
        formatter_class=_Formatter,
    )
    add_common_arguments(parser, command, list(METHODS[command]))
    if module is not None:
        own = parser.description
        module.add_arguments(parser)
        if parser.description != own and method is not None:  # the method describes itself
            parser.description = f"{own}\n\n{method}: {parser.description}"
    return parser


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's lines (methods, examples) and wraps the descriptions' paragraphs at 100 columns."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        paragraphs = text.split("\n\n")
        return "\n\n".join(
            p if p.startswith(("methods:", "examples:", "  ")) or "\n  " in p
            else textwrap.fill(" ".join(p.split()), min(width, 100), initial_indent=indent, subsequent_indent=indent)
            for p in paragraphs
        )  # fmt: skip


def _top_help() -> str:
    lines = [
        f"usage: {PROG} {{{','.join(METHODS)}}} [--method METHOD] --data DATA --output OUTPUT [options]",
        "",
        "Data selection and curation. Each command reads a pool of records and writes a dataset the DataModules read.",
        "",
        "commands:",
    ]
    for command, methods in METHODS.items():
        lines += _wrap(f"{command:<8} {_PURPOSE[command]}", indent="  ", then=" " * 11)
        lines += [f"           --method {m}" + ("" if _method_summary(n) is not None else " (not available)")
                  for m, n in methods.items()]  # fmt: skip
    lines += ["", *_wrap(_IO), "", "examples:", *(f"  {e}" for ex in _EXAMPLES.values() for e in ex), "",
              f"the options of a command: {PROG} <command> --help; of a method: {PROG} <command> --method M --help"]  # fmt: skip
    return "\n".join(lines)


def _wrap(text: str, indent: str = "", then: str = "") -> list[str]:
    import textwrap

    return textwrap.wrap(text, 100, initial_indent=indent, subsequent_indent=then)


# ---------------------------------------------------------------------------------------------- running
def _prepare(args: argparse.Namespace) -> None:
    """Resolve the cache folder and refuse an output that is no JSONL path or would destroy an input or a result."""
    from lightning_ft.core.io import check_output

    if args.cache_dir is None:
        args.cache_dir = str(default_cache_dir())
    elif str(args.cache_dir).strip().lower() in ("", "none"):
        args.cache_dir = None
    else:
        args.cache_dir = str(Path(args.cache_dir).expanduser())
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be at least 1.")
    output = Path(args.output).expanduser()
    if output.suffix != ".jsonl":
        raise UserError(f"--output {args.output} must be a .jsonl file (the dataset is written as JSONL), e.g. "
                        f"{output.with_suffix('.jsonl')}.")  # fmt: skip
    inputs = [("--data", args.data)] if Path(args.data).expanduser().exists() else []
    check_output(output, inputs, kind="file", overwrite=args.overwrite)
    args.output = str(output)


def summary(command: str, method: str, output: str | os.PathLike[str], report: dict[str, Any]) -> str:
    """A few lines on what a command did: the output, its report, and the report's scalar entries (one level deep)."""
    from lightning_ft.curation.records import report_path

    with open(output, encoding="utf-8") as file:
        count = sum(1 for line in file if line.strip())
    lines = [f"{PROG} {command} --method {method}: wrote {count} records to {output} (report: {report_path(output)})"]
    for key, value in report.items():
        if isinstance(value, dict):
            shown = {k: v for k, v in value.items() if isinstance(v, (int, float, str, bool))}
            if shown and len(shown) <= 8:
                lines.append(f"  {key}: " + ", ".join(f"{k}={_short(v)}" for k, v in shown.items()))
        elif isinstance(value, (int, float, bool)) and key not in ("seed",):
            lines.append(f"  {key}: {_short(value)}")
    return "\n".join(lines[:16])


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv: list[str], fit: Callable[[list[str]], None] | None = None) -> None:
    """Run ``lightning-ft data <command> ...`` (``argv`` starts with the command). ``fit`` runs a ``lightning-ft
    fit`` command line (:func:`lightning_ft.cli.main`, handed down by it) for the methods that fit (kmq rounds).

    Mistakes raise :class:`~lightning_ft.errors.UserError` (``UsageError`` for the command line), which
    ``lightning-ft`` (:func:`lightning_ft.cli.main`) prints as one sentence.
    """
    usage = f"usage: {PROG} {{{','.join(METHODS)}}} [--method METHOD] --data DATA --output OUTPUT [options]"
    if argv and argv[0] in ("-h", "--help"):
        print(_top_help())
        return
    if not argv:
        raise UsageError(f"a data command is needed: one of {', '.join(METHODS)} (see {PROG} --help).", usage)
    command, rest = argv[0], argv[1:]
    if command not in METHODS:
        hint = did_you_mean(command, list(METHODS))
        raise UsageError(f"{command!r} is not a data command (commands: {', '.join(METHODS)}){hint}", usage)
    method = _given_method(command, rest)
    module = load_method(command, method) if method is not None else None
    parser = _command_parser(command, module, method)
    args = parser.parse_args(rest)  # --help prints the command's (and its method's) options and exits here
    assert module is not None and method is not None  # without --method the parse above has refused
    args.command = command
    args.fit_command = fit
    _prepare(args)
    report = module.run(args)
    print(summary(command, method, args.output, report or {}))
