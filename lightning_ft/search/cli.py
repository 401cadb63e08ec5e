"""``lightning-ft search``: AutoPEFT, a multi-objective search of the PEFT configuration (quality vs size).

    lightning-ft search --config configs/autopeft_search.yaml --trials 40
    lightning-ft search --config configs/quickstart_lora.yaml --out runs/autopeft --trials 40 --jobs 2 \\
        --ranks 0,2,8,32 --trial-steps 30 --metric val/target_acc --direction maximize

Each trial fits the base config (its ``model`` must take a ``peft`` argument) with the configuration the sampler
proposes, at low fidelity (``--trial-steps`` steps, one validation of ``--trial-val-batches`` batches); the two
objectives are the named validation metric and the trainable parameters of the model the trial built. The space
(:mod:`lightning_ft.search.space`) is per-layer on/off plus the LoRA ranks of the attention and the FFN projections,
or a ``--space`` file. The Pareto front is written to ``<out>/front.md``, ``front.csv``, ``front.json``,
``front.png`` and one full-fidelity YAML per point in ``<out>/front/``. Rerunning the command resumes the study in
``<out>/study.db`` (:mod:`lightning_ft.search.study`). A mistake is answered with ``lightning-ft search: error:
<sentence>`` (exit 2 for the command line, 1 otherwise; see :mod:`lightning_ft.errors`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from lightning_ft.errors import SentenceParser, UsageError, UserError
from lightning_ft.search.space import (
    ATTENTION_MODULES,
    DEFAULT_RANKS,
    FFN_MODULES,
    default_space,
    load_space,
    parse_ranks,
)
from lightning_ft.search.study import SearchSettings, Summary, import_optuna, run_search
from lightning_ft.search.trial import FitCommand, load_base_config, model_layout, use_command

__all__ = ["main"]

PROG = "lightning-ft search"
SAMPLERS = ("tpe", "nsga2", "random")


def _parser() -> SentenceParser:
    p = SentenceParser(
        prog=PROG,
        description="AutoPEFT (https://arxiv.org/abs/2301.12132): search the PEFT configuration (per-layer on/off, "
        "LoRA ranks of the attention and FFN projections) for the Pareto front of a validation metric against the "
        "trainable parameters, with low-fidelity trials (each an ordinary lightning-ft fit).",
        epilog="Rerun the same command to resume (or extend, with a larger --trials) the search in --out. The space "
        "and its mapping onto peft: lightning_ft/search/space.py.",
    )
    p.add_argument("--config", required=True, help="the base fit YAML (its model takes a peft argument)")
    p.add_argument("--out", help="the search folder (default runs/autopeft-<config name>)")
    p.add_argument("--trials", type=int, default=20, help="completed plus failed trials to reach (default 20)")
    p.add_argument("--jobs", type=int, default=1, help="trials at once, each in its own process (default 1)")
    p.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=None,
                   help="run trials in this process (the default with --jobs 1)")  # fmt: skip
    p.add_argument("--metric", default="val/target_loss", help="the validation metric (default val/target_loss)")
    p.add_argument("--direction", choices=("minimize", "maximize"), default="minimize",
                   help="whether the metric is minimized (default) or maximized")  # fmt: skip
    p.add_argument("--ranks", help=f"LoRA rank choices, 0 for none (default {','.join(map(str, DEFAULT_RANKS))})")
    p.add_argument("--attention-modules", help=f"the attention projections' module names (default "
                   f"{','.join(ATTENTION_MODULES)})")  # fmt: skip
    p.add_argument("--ffn-modules", help=f"the FFN projections' module names (default {','.join(FFN_MODULES)})")
    p.add_argument("--no-layers", action="store_true", help="do not search per-layer on/off (every layer adapts)")
    p.add_argument("--space", help="a YAML file of dimensions replacing the default space (see space.py)")
    p.add_argument("--trial-steps", type=int, default=20, help="optimizer steps of each trial (default 20)")
    p.add_argument("--trial-val-batches", type=int, default=4, help="validation batches of each trial (default 4)")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="optuna's multi-objective sampler (default tpe)")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0)")
    return p


def _check(args: argparse.Namespace, usage: str) -> None:
    for option, value in (("--trials", args.trials), ("--jobs", args.jobs), ("--trial-steps", args.trial_steps),
                          ("--trial-val-batches", args.trial_val_batches)):  # fmt: skip
        if value < 1:
            raise UsageError(f"{option} must be at least 1 (got {value}).", usage)
    if args.in_process and args.jobs > 1:
        raise UsageError(f"--in-process runs one trial at a time, but --jobs is {args.jobs}: drop one of them.", usage)
    given = [o for o, v in (("--ranks", args.ranks), ("--no-layers", args.no_layers),
                            ("--attention-modules", args.attention_modules), ("--ffn-modules", args.ffn_modules)) if v]  # fmt: skip
    if args.space and given:
        verb = "does" if len(given) == 1 else "do"
        raise UsageError(f"--space replaces the default space, so {' and '.join(given)} {verb} not apply: put the "
                         "choices in the --space file, or drop --space.", usage)  # fmt: skip


def settings_from_args(args: argparse.Namespace, usage: str) -> SearchSettings:
    """The :class:`SearchSettings` of parsed options (reads the base config and the model's layout).

    Raises:
        UserError: A bad option value, base config or space.
    """
    _check(args, usage)
    try:
        ranks = parse_ranks(args.ranks) if args.ranks else DEFAULT_RANKS
    except UserError as err:
        raise UsageError(str(err), usage) from None
    import_optuna()  # before any model is read: a missing optuna is the first thing to say
    base = load_base_config(args.config)
    layout = model_layout(base.model)
    peft_type = str((base.peft or {}).get("peft_type", "LORA")).upper()
    if args.space:
        space = load_space(args.space, layout.num_layers, peft_type)
    else:
        if peft_type != "LORA":
            raise UserError(f"--config {args.config} uses peft_type {peft_type}, but the default space searches LoRA: "
                            "use a LoRA base config, or give a --space for it.")  # fmt: skip
        attention = (
            tuple(m for m in args.attention_modules.split(",") if m) if args.attention_modules else ATTENTION_MODULES
        )
        ffn = tuple(m for m in args.ffn_modules.split(",") if m) if args.ffn_modules else FFN_MODULES
        space = default_space(layout.num_layers, ranks=ranks, layers=not args.no_layers, attention=attention, ffn=ffn)
    missing = layout.missing([m for d in space.dimensions for m in d.modules])
    if missing:
        raise UserError(f"model {base.model} has no module named {', '.join(missing)}: give its projections' names "
                        "with --attention-modules and --ffn-modules (or in the --space file).")  # fmt: skip
    out = Path(args.out) if args.out else Path("runs") / f"autopeft-{Path(args.config).stem}"
    for option, given in (("--config", args.config), ("--space", args.space)):
        if given and _inside(Path(given), out):  # the search writes trial configs and front YAMLs under --out
            raise UserError(f"{option} {given} lies inside --out {out}, where the search writes its trials and front: "
                            "give another --out, or move the file.")  # fmt: skip
    in_process = args.jobs == 1 if args.in_process is None else args.in_process
    return SearchSettings(base=base, space=space, out=out, trials=args.trials, metric=args.metric,
                          maximize=args.direction == "maximize", steps=args.trial_steps,
                          val_batches=args.trial_val_batches, jobs=args.jobs, in_process=in_process,
                          sampler=args.sampler, seed=args.seed)  # fmt: skip


def main(argv: Sequence[str], command: FitCommand | None = None) -> Summary:
    """Run ``lightning-ft search`` with ``argv`` (the options after ``search``); returns what it did.

    ``command`` is the command line the trials run ``fit`` with (:func:`lightning_ft.cli.main` passes itself).

    Mistakes raise :class:`~lightning_ft.errors.UserError` (``UsageError`` for the command line), which
    ``lightning-ft`` (:func:`lightning_ft.cli.main`) prints as one sentence.
    """
    if command is not None:
        use_command(command)
    parser = _parser()
    args = parser.parse_args(list(argv))
    settings = settings_from_args(args, " ".join(parser.format_usage().split()))
    summary = run_search(settings)
    print(f"\nPareto front of {summary.completed} completed trials ({summary.failed} failed), in {settings.out}:\n")
    print(summary.table)
    print(f"Each point's full-fidelity config: {settings.out / 'front'}/trial-<n>.yaml "
          f"(lightning-ft fit --config <it>).")  # fmt: skip
    return summary


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (both resolved)."""
    return path.resolve().is_relative_to(folder.resolve())
