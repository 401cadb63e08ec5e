"""ComPEFT benchmark: compress fine-tunes of the bundled SmolLM2-135M (sentiment) and score what comes back.

Three fine-tunes that change different fractions of the weights (full FT, HFT, a 5%-density sparse fine-tune)
are compressed by ``lightning-ft compress`` at several densities; ``alpha`` is chosen on validation reviews from
the grid, as the paper does, and the chosen artifact is scored on held-out test reviews and on the control set.
Next to each row, the pre-fix rule (it counted unchanged entries among the top-k candidates and rebuilt them as
``-alpha*std``) is computed by this script alone, for the record of what the fix changed.

    python benchmarks/compeft.py --name compeft
    python benchmarks/compeft.py --name compeft_smoke --steps 10 --test-size 60

Writes ``benchmarks/results/<name>.md`` and ``.json``; fine-tunes are cached under ``benchmarks/runs/compeft/``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
BASE = "smollm2-135m"
TASK: dict[str, Any] = {"dataset": "rotten_tomatoes", "label_options": ["positive", "negative"]}
FITS = ("full FT", "HFT", "sparse (random 5%)")


def _callbacks(name: str) -> list[Any]:
    from lightning_ft.callbacks import HalfFineTuning, Random, SparseFineTuning

    if name == "HFT":
        return [HalfFineTuning(seed=0)]
    if name.startswith("sparse"):
        return [SparseFineTuning(rule=Random(), density=0.05)]
    return []


def finetune(name: str, out: Path, steps: int) -> Path:
    """One fine-tune on the sentiment task (cached); returns its HF folder."""
    import lightning as L

    from lightning_ft.data import InstructionDataModule
    from lightning_ft.modules import CausalLMModule

    if (out / "hf_model" / "model.safetensors").is_file():
        return out / "hf_model"
    callbacks = _callbacks(name)
    L.seed_everything(0)
    module = CausalLMModule(model=BASE, learning_rate=2e-4, warmup_steps=max(1, steps // 12), output_dir="")
    dm = InstructionDataModule(**TASK, val_size=200, test_size=400, control=None, batch_size=8, max_length=96)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0, callbacks=callbacks,
                        enable_model_summary=False, default_root_dir=str(out))  # fmt: skip
    trainer.fit(module, dm)
    return module.save_pretrained(out / "hf_model")


def scorers(val_size: int, test_size: int) -> tuple[Any, Any]:
    """``(val(state) -> accuracy, test(state) -> {target_acc, control_ppl})`` on the bundled data."""
    from lightning_ft.data import InstructionDataModule
    from lightning_ft.modules import CausalLMModule

    module = CausalLMModule(model=BASE, output_dir="")
    dm = InstructionDataModule(**TASK, val_size=200, test_size=400, control="humaneval", control_size=64)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    val = [b for i, b in enumerate(dm._eval_loader("val")) if i * 16 < val_size]
    test = [b for i, b in enumerate(dm._eval_loader("test")) if i * 16 < test_size]
    control = list(dm.control_dataloader())

    def load(state: dict[str, torch.Tensor]) -> None:
        module.backbone.load_state_dict(state, strict=False)

    def val_score(state: dict[str, torch.Tensor]) -> float:
        load(state)
        return module.evaluate([val])["target_acc"]

    def test_score(state: dict[str, torch.Tensor]) -> dict[str, float]:
        load(state)
        return {"target_acc": module.evaluate([test])["target_acc"], "control_ppl": module.evaluate([control])["control_ppl"]}

    return val_score, test_score


def tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    from lightning_ft.core.weights import SafetensorsReader, resolve_path

    reader = SafetensorsReader(resolve_path(str(folder)))
    return {k: reader.get(k) for k in reader.keys()}


def library_state(model: Path, density: float, alpha: float, work: Path) -> tuple[dict[str, torch.Tensor], Any]:
    """Compress with ``lightning-ft compress`` (global scope) and apply the artifact back to the base."""
    from lightning_ft.merging import MergePlan, compress, merge

    artifact = work / f"a_{density}_{alpha}.safetensors"
    report = compress(BASE, model, artifact, density=density, alpha=alpha)
    state = merge(MergePlan.build(BASE, [str(artifact)], "task_arithmetic", {"scaling": 1.0})).state
    artifact.unlink()
    return state, report


def prefix_state(base: dict[str, torch.Tensor], ft: dict[str, torch.Tensor], density: float, alpha: float) -> dict[str, torch.Tensor]:
    """The pre-fix rule, for the record: the top-k threshold over all entries, zeros included, signs as one bit."""
    taus = {k: ft[k].float() - base[k].float() for k in base if base[k].is_floating_point()}
    flat = torch.cat([t.flatten() for t in taus.values()])
    std = float(flat.double().std())
    keep = math.floor(density * flat.numel() + 1e-9)
    threshold = float(torch.topk(flat.abs(), keep).values[-1])
    out = dict(base)
    for k, t in taus.items():
        sign = torch.where(t > 0, 1.0, -1.0)  # one bit: an unchanged entry comes back as -1
        out[k] = (base[k].float() + torch.where(t.abs() >= threshold, alpha * std * sign, 0.0)).to(base[k].dtype)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="compeft")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--val-size", type=int, default=96)
    parser.add_argument("--test-size", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(2)
    runs = HERE / "runs" / "compeft"
    folders = {name: finetune(name, runs / f"{name.split()[0].lower()}_{args.steps}", args.steps) for name in FITS}
    val, test = scorers(args.val_size, args.test_size)
    base = tensors(BASE)
    rows: list[dict[str, Any]] = [{"fine-tune": "zero-shot", "density": "-", **test(base)}]
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in folders.items():
            ft = tensors(folder)
            changed = sum(int((ft[k] != base[k]).sum()) for k in base if base[k].is_floating_point())
            total = sum(base[k].numel() for k in base if base[k].is_floating_point())
            rows.append({"fine-tune": name, "density": "uncompressed", "changed": changed / total, **test(ft)})
            for density in args.densities:
                row: dict[str, Any] = {"fine-tune": name, "density": density, "changed": changed / total}
                for label, build in (
                    ("", lambda a: library_state(folder, density, a, Path(tmp))[0]),
                    ("prefix_", lambda a: prefix_state(base, ft, density, a)),
                ):
                    scored = {a: val(build(a)) for a in args.alphas}
                    best = max(args.alphas, key=lambda a: (scored[a], -a))
                    final = test(build(best))
                    row.update({f"{label}alpha": best, f"{label}target_acc": final["target_acc"],
                                f"{label}control_ppl": final["control_ppl"]})  # fmt: skip
                _, report = library_state(folder, density, row["alpha"], Path(tmp))
                row["kept"] = report.kept / report.total
                row["ratio"] = report.ratio
                rows.append(row)
                print(row, flush=True)
    write(args, rows)


def write(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / f"{args.name}.json").write_text(json.dumps(rows, indent=2))
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns) + " |")
    head = (
        f"# ComPEFT benchmark\n\nCommand: `python benchmarks/compeft.py --name {args.name} --steps {args.steps}`. "
        f"Bundled SmolLM2-135M fine-tuned {args.steps} steps on Rotten Tomatoes (lr 2e-4, batch 8); compressed with "
        f"global scope at each density; alpha chosen on {args.val_size} validation reviews from {args.alphas}; "
        f"target accuracy on {args.test_size} test reviews, control = HumanEval perplexity (64 texts). `changed`: "
        "fraction of entries the fine-tune moved; `kept`: fraction the artifact keeps; `prefix_*`: the rule before "
        "the fix (unchanged entries could be kept and came back as -alpha*std), computed by this script.\n\n"
    )
    (results / f"{args.name}.md").write_text(head + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
