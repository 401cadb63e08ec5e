"""``lightning-ft merge | compress | decompress``: post-hoc weight commands.

    lightning-ft merge --config configs/merge_recipe.yaml
    lightning-ft merge --config mergekit_ties.yml --output merged/      # a mergekit recipe, unchanged
    lightning-ft merge --base smollm2-135m --models runs/a/hf_model runs/b/hf_model --method ties \\
        --param density=0.2 --lines-beta 0.5 --output merged/
    lightning-ft compress --base smollm2-135m --model runs/a/hf_model --density 0.1 --output a.compeft.safetensors
    lightning-ft decompress --base smollm2-135m --artifact a.compeft.safetensors --output a_restored/
    lightning-ft sparse-apply --base smollm2-135m --sft lang.safetensors task.safetensors --output composed/

Nothing is lost: an ``--output`` that is, holds or sits inside an input is refused, and so is an existing non-empty
one unless ``--overwrite`` is given; every output is written to a temporary sibling and renamed into place at the
end (:mod:`lightning_ft.core.io`), so a failed write leaves a previous output whole. A mistake is answered with
``lightning-ft <command>: error: <sentence>`` (exit 2 for the command line, 1 otherwise; see
:mod:`lightning_ft.errors`).
"""

from __future__ import annotations

import argparse
import difflib
import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from lightning_ft.core.io import check_output
from lightning_ft.core.weights import resolve_path
from lightning_ft.errors import SentenceParser, UsageError, UserError
from lightning_ft.merging.compeft import compress, is_compeft_artifact
from lightning_ft.merging.engine import MergePlan, ScoreFn, merge_to_folder, parse_dtype
from lightning_ft.merging.registry import MERGE_METHODS, get_method
from lightning_ft.monitors.panels import Panel

__all__ = ["build_score", "main"]


_SEMANTICS = """\
semantics (mergekit 0.1.5's, per tensor; tau_i = theta_i - base):
  weight w_i (per model, default 1.0) multiplies each (sparsified) task vector before the sign election;
  normalize divides by the sum of the weights: of the sign-agreeing, unpruned models per entry for ties,
  breadcrumbs_ties and dare_ties, of all models otherwise; lambda (global, default 1.0; alias `scaling`) scales
  the merged task vector; rescale multiplies each pruned task vector by sum|tau_i| / sum|kept| (L1, per tensor;
  not 1/density). density and gamma are per model (a model's own `parameters:` win over the top-level block);
  normalize, rescale, lambda, scope, seed are global. int8_mask is accepted and has no numerical effect.
  Equal magnitudes at a cut are settled by mergekit's own torch sort call (per-row Breadcrumbs: by position).
  DARE draws one fp32 Bernoulli mask per tensor and model with density < 1 (tensors in ascending name order,
  models in recipe order) from a CPU generator seeded with `seed` (or `random_seed:` / --random-seed, which
  like mergekit's is ignored by the other methods; without one a seed is drawn and written to the report).
  Checked against mergekit 0.1.5 on a tiny Llama (dtype float32, bfloat16, float16): task_arithmetic, ties,
  breadcrumbs(_ties) and seeded dare_linear/dare_ties are bit-identical; linear is within 2.4e-7 in float32
  (it is rebuilt from task vectors) and bit-identical in bfloat16.

recipes: our keys (base, models: [path | {path, parameters}], method, parameters, lines, eval, metric, output) and
  mergekit's (merge_method, base_model, models: [{model, parameters: {weight, density, gamma}}], parameters,
  dtype, out_dtype, random_seed, tokenizer_source: base). Unknown keys are refused. weight defaults to 1.0
  (mergekit requires it), except for mergekit's base_model in linear, which must be given one. dtype casts
  every input to float32/bfloat16/float16; the task-arithmetic family computes in the base's (cast) dtype, as
  mergekit, linear and the soups in float32; out_dtype sets the saved dtype. With LiNeS (`lines:`) its
  alpha/beta replace lambda.
"""


def _methods_epilog() -> str:
    rows = []
    for m in MERGE_METHODS.values():
        params = {**m.model_defaults, **m.defaults}
        rows.append(f"  {m.name:<16} {m.pretty_name} ({m.reference_url})")
        rows += [f"      {line}" for line in textwrap.wrap(m.summary, 100)]
        rows.append(f"      parameters (defaults): {params or 'none'}")
    return "merge methods:\n" + "\n".join(rows) + "\n\n" + _SEMANTICS


def _merge_parser() -> SentenceParser:
    p = SentenceParser(
        prog="lightning-ft merge",
        description="Merge a base model and N fine-tuned results (HF folders, Lightning .ckpt, LoRA adapter folders, "
        "ComPEFT artifacts) into one HF-loadable folder with a short report (merge_report.md). Runs mergekit recipes "
        "for the methods below unchanged. Command-line options override the recipe.",
        epilog=_methods_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="merge recipe YAML: base, models, method, parameters, lines, eval, metric, output "
                   "(or mergekit's merge_method, base_model, models, parameters, dtype)")  # fmt: skip
    p.add_argument("--base", help="the pretrained model: HF folder or bundled alias (smollm2-135m)")
    p.add_argument("--models", nargs="+", help="the fine-tuned results to merge")
    p.add_argument("--method", choices=sorted(MERGE_METHODS), help="merge method")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a top-level method parameter")
    p.add_argument("--random-seed", type=int, help="seed of the random methods (dare_linear, dare_ties)")
    p.add_argument("--dtype", help="round every input tensor to float32, bfloat16 or float16")
    p.add_argument("--out-dtype", help="dtype of the saved merged tensors")
    p.add_argument("--lines-beta", help="apply LiNeS for merging with this beta, or 'sweep' (needs eval data)")
    p.add_argument("--non-block-scale", choices=["alpha", "one", "last"], help="LiNeS factor outside the blocks")
    p.add_argument("--metric", help="eval metric to maximise (default target_acc; *_loss/*_ppl are minimised)")
    p.add_argument("--output", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output (never an input)")
    p.add_argument("--wandb", choices=["auto", "online", "offline", "disabled"], default="auto",
                   help="log the merge report to W&B (tables, the LiNeS beta sweep, summary fields) in <output>/wandb: "
                   "auto is offline unless W&B is configured")
    return p


def _compress_parser() -> SentenceParser:
    p = SentenceParser(
        prog="lightning-ft compress",
        description="ComPEFT: keep the top-k magnitudes of a task vector, LoRA adapter (A and B) or ComPEFT-able "
        "update, ternarise them with one scale per tensor (alpha * std of the update), and store signs and "
        "positions packed in one .safetensors file. Prints the compression ratio.",
    )
    p.add_argument("--base", required=True, help="the pretrained model: HF folder or bundled alias")
    p.add_argument("--model", required=True, help="fine-tuned HF folder, Lightning .ckpt or LoRA adapter folder")
    p.add_argument("--output", required=True, help="artifact path (.safetensors)")
    p.add_argument("--density", type=float, default=0.1, help="fraction of entries kept (default 0.1)")
    p.add_argument("--alpha", type=float, default=1.0, help="scale multiplier of std(tau) (default 1.0)")
    p.add_argument("--scope", choices=["global", "tensor"], default="global", help="top-k and std over the whole "
                   "update (official, default) or per tensor")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output (never an input)")
    return p


def _decompress_parser() -> SentenceParser:
    p = SentenceParser(
        prog="lightning-ft decompress",
        description="Apply a ComPEFT artifact back to its base and save an HF-loadable folder.",
    )
    p.add_argument("--base", required=True, help="the pretrained model: HF folder or bundled alias")
    p.add_argument("--artifact", required=True, help="the .safetensors artifact written by `compress`")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output (never an input)")
    return p


def _value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


_RECIPE_KEYS = ("base", "models", "method", "parameters", "lines", "eval", "metric", "output")
_MERGEKIT_KEYS = {"merge_method": "method", "base_model": "base", "dtype": "dtype", "out_dtype": "out_dtype",
                  "random_seed": "random_seed", "tokenizer_source": "tokenizer_source"}  # fmt: skip
_MODEL_KEYS = ("path", "model", "parameters")


def _refuse_unknown(keys: Any, valid: Sequence[str], where: str) -> None:
    """Refuse the first key not in ``valid``, naming the closest valid one."""
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys are {sorted(valid)}."
            raise UserError(f"{where} has no key {key!r}: {hint}")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a mapping of names to values, not {value!r}.")
    return dict(value)


def _canonical(raw: dict[str, Any]) -> dict[str, Any]:
    """Top-level keys in our names (``merge_method`` -> ``method``, ``base_model`` -> ``base``), checked."""
    _refuse_unknown(raw, [*_RECIPE_KEYS, *_MERGEKIT_KEYS], "The merge recipe")
    recipe: dict[str, Any] = {}
    for key, value in raw.items():
        name = _MERGEKIT_KEYS.get(key, key)
        if name in recipe and recipe[name] != value:
            theirs = next(k for k in raw if k != name and _MERGEKIT_KEYS.get(k) == name)
            raise UserError(f"The recipe sets both {name!r} and {theirs!r} (mergekit's name for it): keep one.")
        recipe[name] = value
    source = recipe.pop("tokenizer_source", "base")
    if source != "base":
        raise UserError(
            f"tokenizer_source={source!r}: the merged folder always takes the base's tokenizer; use 'base'."
        )
    return recipe


def _model_entry(entry: Any, index: int) -> tuple[str, dict[str, Any]]:
    """``path`` or ``{path | model, parameters}`` -> (path, own parameters)."""
    if not isinstance(entry, dict):
        return str(entry), {}
    where = f"Model {index + 1} of the recipe"
    _refuse_unknown(entry, _MODEL_KEYS, where)
    if ("path" in entry) == ("model" in entry):
        raise UserError(f"{where} needs exactly one of `path` or `model` (mergekit's name) naming the fine-tune.")
    return str(entry.get("path", entry.get("model"))), _mapping(entry.get("parameters"), f"{where}'s `parameters`")


def _same_path(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _linear_base(recipe: dict[str, Any], mergekit_base: bool) -> None:
    """mergekit's linear: base_model is one more ingredient (with a weight); no base means the first model's folder."""
    if not recipe.get("base"):
        recipe["base"] = recipe["models"][0]
        return
    if not mergekit_base or any(_same_path(recipe["base"], m) for m in recipe["models"]):
        return
    if "weight" not in recipe["parameters"]:
        raise UserError(
            "mergekit's linear averages base_model as one more ingredient and needs its weight: list it under "
            "`models` with `parameters: {weight: ...}`, give a top-level `parameters: {weight: ...}`, or name it "
            "`base:` to use it only as the reference folder."
        )
    recipe["models"].append(str(recipe["base"]))
    recipe["model_params"].append({})


def _read_recipe(config: str) -> Any:
    """The parsed ``--config`` file; a missing, unreadable or invalid file is one sentence."""
    path, usage = Path(config).expanduser(), _merge_parser().usage_line()
    if not path.exists():
        raise UsageError(f"--config {config} does not exist.", usage)
    if path.is_dir():
        raise UsageError(f"--config {config} is a folder: give a merge recipe YAML file.", usage)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"--config {config} is not a readable text file.", usage) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or err
        raise UsageError(f"--config {config} is not valid YAML: {problem}{where}.", usage) from None


def _recipe(args: argparse.Namespace) -> dict[str, Any]:
    raw = _read_recipe(args.config) if args.config else {}
    recipe = _canonical(_mapping(raw, "The merge recipe"))
    mergekit_base = raw is not None and "base_model" in raw and args.base is None
    for key in ("base", "models", "method", "metric", "output", "dtype", "out_dtype"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    params = _mapping(recipe.get("parameters"), "The recipe's `parameters`")
    for item in args.param:
        if "=" not in item or not item.split("=", 1)[0]:
            raise UsageError(f"--param {item} must be KEY=VALUE, e.g. --param density=0.2.",
                             _merge_parser().usage_line())  # fmt: skip
        key, text = item.split("=", 1)
        params[key] = _value(text)
    recipe["parameters"] = params
    lines = dict(recipe.get("lines") or {}) if recipe.get("lines") not in (None, False) else None
    if args.lines_beta is not None:
        lines = {**(lines or {}), "beta": _value(args.lines_beta)}
    if args.non_block_scale is not None:
        lines = {**(lines or {}), "non_block_scale": args.non_block_scale}
    recipe["lines"] = lines
    for key in ("models", "method", "output"):
        if not recipe.get(key):
            raise UsageError(f"lightning-ft merge needs {key} (in the --config recipe or as --{key}).",
                             _merge_parser().usage_line())  # fmt: skip
    seed = args.random_seed if args.random_seed is not None else recipe.pop("random_seed", None)
    if seed is not None and get_method(recipe["method"]).random:  # like mergekit's --random-seed: unused otherwise
        if params.get("seed", seed) != seed:
            raise UserError(f"random_seed={seed} and parameters seed={params['seed']} disagree: keep one.")
        params["seed"] = seed
    entries = [_model_entry(m, i) for i, m in enumerate(recipe["models"])]
    recipe["models"], recipe["model_params"] = [p for p, _ in entries], [own for _, own in entries]
    if recipe["method"] == "linear":
        _linear_base(recipe, mergekit_base)
    if not recipe.get("base"):
        raise UsageError("lightning-ft merge needs base (in the --config recipe as base or base_model, or as --base).",
                         _merge_parser().usage_line())  # fmt: skip
    return recipe


def build_score(base: str, eval_configs: list[dict[str, Any]], metric: str = "target_acc") -> ScoreFn:
    """A validation score of a candidate state dict: the mean over eval tasks of ``metric``.

    Each entry of ``eval_configs`` holds ``InstructionDataModule`` arguments. Metrics ending in ``_loss``
    or ``_ppl`` are negated so that higher is better.
    """
    from lightning_ft.data import InstructionDataModule
    from lightning_ft.modules import CausalLMModule

    module = CausalLMModule(model=base, output_dir="")
    loaders = []
    for config in eval_configs:
        dm = InstructionDataModule(**config)
        dm.tokenizer = module.tokenizer
        dm.setup("validate")
        found = dm.val_dataloader()
        loaders.append(list(found) if isinstance(found, (list, tuple)) else [found])
    sign = -1.0 if metric.endswith(("_loss", "_ppl")) else 1.0

    def score(state: dict[str, Any]) -> float:
        result = module.backbone.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise UserError(f"The merged state has tensor {result.unexpected_keys[0]!r} that the model lacks.")
        values = []
        for task in loaders:
            metrics = module.evaluate(task)
            if metric not in metrics:
                raise UserError(f"metric={metric!r} is not among the eval metrics {sorted(metrics)}.")
            values.append(sign * metrics[metric])
        return sum(values) / len(values)

    return score


def _inputs(named: Sequence[tuple[str, str]]) -> list[tuple[str, Path]]:
    """``(argument, path)`` of each input, an alias resolved to its folder; a missing input is one sentence."""
    found = []
    for argument, value in named:
        try:
            found.append((argument, resolve_path(value)))
        except FileNotFoundError:
            raise UserError(
                f"{argument} {value} does not exist: give a model folder, a file or a bundled model alias."
            ) from None
    return found


def _check_output(
    args: argparse.Namespace, output: str, named: Sequence[tuple[str, str]], kind: Literal["folder", "file"]
) -> None:
    """Check the inputs (they exist) and the output (no input, no previous result) before any work."""
    check_output(output, _inputs(named), kind=kind, overwrite=args.overwrite)


def run_merge(argv: list[str]) -> dict[str, Any]:
    """Parse ``merge`` arguments, run the merge, save the folder; returns the report."""
    args = _merge_parser().parse_args(argv)
    recipe = _recipe(args)
    where = "" if args.config is None else " (in the recipe)"
    named = [("--base" if args.base is not None else f"base{where}", str(recipe["base"]))]
    named += [("--models" if args.models is not None else f"models{where}", str(m)) for m in recipe["models"]]
    get_method(recipe["method"]).resolve(recipe["parameters"], recipe["model_params"])  # values before files
    dtype, out_dtype = parse_dtype(recipe.get("dtype")), parse_dtype(recipe.get("out_dtype"), "out_dtype")
    _check_output(args, str(recipe["output"]), named, "folder")
    lines = recipe["lines"]
    plan = MergePlan.build(
        str(recipe["base"]), recipe["models"], recipe["method"], recipe["parameters"],
        lines=lines is not None, non_block_scale=(lines or {}).get("non_block_scale", "alpha"),
        model_params=recipe["model_params"], dtype=dtype, out_dtype=out_dtype,
    )  # fmt: skip
    needs_eval = plan.method.needs_eval or (lines or {}).get("beta") == "sweep"
    score = None
    if needs_eval and recipe.get("eval"):
        score = build_score(str(recipe["base"]), list(recipe["eval"]), recipe.get("metric") or "target_acc")
    out, report = merge_to_folder(plan, str(recipe["base"]), recipe["output"], (lines or {}).get("beta"), score,
                                  inputs=recipe["models"], overwrite=args.overwrite)  # fmt: skip
    print((out / "merge_report.md").read_text())
    if args.wandb != "disabled":
        _report_to_wandb(out, report, args.wandb)
    return report


def merge_panels(report: dict[str, Any]) -> list[Panel]:
    """A merge report as dashboard panels: the ingredients, greedy soup's steps, LiNeS's beta sweep."""
    ingredients = report.get("ingredients") or []
    keys = sorted({k for row in ingredients for k in row} - {"path"})
    panels = [Panel("merge/ingredients", f"Merge ingredients ({report.get('pretty_name', report.get('method'))})", "table",
                    ["path", *keys], [[row.get("path"), *[row.get(k) for k in keys]] for row in ingredients])]  # fmt: skip
    greedy = report.get("greedy") or {}
    if greedy.get("steps"):
        panels.append(Panel("merge/greedy", "Greedy soup: each candidate added in order of its own score", "table",
                            ["add", "score", "kept"], [[s["add"], s["score"], s["kept"]] for s in greedy["steps"]]))  # fmt: skip
    sweep = (report.get("lines") or {}).get("sweep")
    if sweep:
        panels.append(Panel("merge/lines_sweep", "LiNeS beta sweep", "lines", ["beta", "score"],
                            [[r["beta"], r["score"]] for r in sweep], x_label="beta"))  # fmt: skip
    return panels


def _report_to_wandb(out: Path, report: dict[str, Any], mode: str) -> None:
    import os

    import wandb

    from lightning_ft.monitors.dashboard import log_panels, wandb_mode

    mode = wandb_mode() if mode == "auto" else mode
    os.environ.setdefault("WANDB_MODE", mode)
    run = wandb.init(project="lightning-ft", name=f"merge-{out.name}", dir=str(out), mode=mode, job_type="merge",
                     config={"method": report.get("method"), "params": report.get("params")})  # fmt: skip
    try:
        lines = report.get("lines") or {}
        summary = {"merge/method": report.get("method"), "merge/ingredients": len(report.get("ingredients") or []),
                   "merge/seconds": report.get("seconds")}  # fmt: skip
        if "beta" in lines:
            summary["merge/lines_beta"] = lines["beta"]
        log_panels(run, merge_panels(report), {k: v for k, v in summary.items() if v is not None})
    finally:
        run.finish()


def _sparse_apply_parser() -> SentenceParser:
    p = SentenceParser(
        prog="lightning-ft sparse-apply",
        description="Add sparse fine-tunings (sparse_delta.safetensors written by SparseFineTuning) to a base model, "
        "composing them by addition (e.g. language + task, as in Composable SFT), and write an HF-loadable folder.",
    )
    p.add_argument("--base", required=True, help="the pretrained model: HF folder or bundled alias (smollm2-135m)")
    p.add_argument("--sft", nargs="+", required=True, help="sparse fine-tuning artifacts, applied in order")
    p.add_argument("--scale", nargs="+", type=float, help="one multiplier per artifact (default 1.0 each)")
    p.add_argument("--no-dense", action="store_true", help="skip densely trained tensors (e.g. another task's head)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output (never an input)")
    return p


def main(argv: list[str]) -> None:
    """Dispatch ``merge``, ``compress``, ``decompress`` or ``sparse-apply`` (``argv[0]`` is the subcommand).

    Mistakes raise :class:`~lightning_ft.errors.UserError` (``UsageError`` for the command line), which
    ``lightning-ft`` (:func:`lightning_ft.cli.main`) prints as one sentence.
    """
    commands = ("merge", "compress", "decompress", "sparse-apply")
    if not argv or argv[0] not in commands:
        usage = "usage: lightning-ft {merge,compress,decompress,sparse-apply} [--help]"
        raise UsageError(f"a post-hoc command is needed: one of {', '.join(commands)}.", usage)
    command, rest = argv[0], argv[1:]
    if command in ("sparse-apply", "decompress"):  # imported here: only these commands need the artifact module
        from lightning_ft.sparse.artifact import apply_sparse, is_sparse_artifact
    if command == "sparse-apply":
        args = _sparse_apply_parser().parse_args(rest)
        _check_output(args, args.output, [("--base", args.base), *(("--sft", a) for a in args.sft)], "folder")
        for artifact in args.sft:
            if not is_sparse_artifact(artifact):
                raise UserError(f"--sft {artifact} is not a sparse fine-tuning artifact: give the "
                                "sparse_delta.safetensors file a SparseFineTuning fit writes.")  # fmt: skip
        out = apply_sparse(args.base, args.sft, args.output, args.scale, with_dense=not args.no_dense,
                           overwrite=args.overwrite)  # fmt: skip
        print(json.dumps({"output": str(out), "applied": args.sft}))
    elif command == "merge":
        run_merge(rest)
    elif command == "compress":
        args = _compress_parser().parse_args(rest)
        _check_output(args, args.output, [("--base", args.base), ("--model", args.model)], "file")
        report = compress(args.base, args.model, args.output, args.density, args.alpha, args.scope, args.overwrite)
        print(report.markdown())
    else:
        args = _decompress_parser().parse_args(rest)
        _check_output(args, args.output, [("--base", args.base), ("--artifact", args.artifact)], "folder")
        if not (is_compeft_artifact(args.artifact) or is_sparse_artifact(args.artifact)):
            raise UserError(f"--artifact {args.artifact} is not a ComPEFT artifact: give the .safetensors file "
                            "lightning-ft compress wrote.")  # fmt: skip
        plan = MergePlan.build(args.base, [args.artifact], "task_arithmetic", {"lambda": 1.0})
        _, merged = merge_to_folder(plan, args.base, args.output, inputs=[args.artifact], overwrite=args.overwrite)
        print(json.dumps({"output": args.output, "ingredients": merged["ingredients"]}))
