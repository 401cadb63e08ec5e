"""Copilot benchmark on the bundled SmolLM2-135M and Rotten Tomatoes: costs, and fused decoding against the Pilot.

* ``--timing-only``: the Pilot alone and Pilot + Copilot fitted in alternating rounds in this process (same data),
  median step times and their ratio, a per-part breakdown of the joint step (the Pilot's forward, the error over the
  vocabulary and its copy to the CPU log, the Copilot's forward, the shared backward, each optimizer), and greedy
  decoding latency, fused against the Pilot alone, alternating prompt by prompt.
* default: one Pilot + Copilot fit per seed (data order; the Pilot's trajectory is the one it has alone, a tested
  property), scored on held-out reviews: the Pilot's and the fused accuracy and answer NLL (lambda 'auto', chosen on
  the validation split from 0 and the paper's grid), every lambda of the grid, and the Copilot's RMSE against the
  zero predictor's; mean and standard deviation over the seeds.

    python benchmarks/copilot.py --name copilot_seeds --seeds 0 1 2                   # about 10 min per seed alone
    python benchmarks/copilot.py --name smoke --quick --seeds 0                       # a few minutes
    python benchmarks/copilot.py --name copilot_timing_tied --timing-only --head tied --steps 6 --rounds 2

Results go to ``benchmarks/results/<name>.md`` and ``.json``. Run it alone: step-time ratios from a shared
machine are not comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from _timing import step_timer  # benchmarks/_timing.py (this script's folder is on sys.path)

HERE = Path(__file__).resolve().parent
DEFAULTS = {"steps": 120, "batch_size": 8, "max_length": 96, "learning_rate": 2e-4, "warmup_steps": 10, "val_size": 200,
            "test_size": 400, "control_size": 64, "copilot_layers": 4, "latency_prompts": 30, "new_tokens": 16}  # fmt: skip
QUICK = {"steps": 4, "val_size": 16, "test_size": 24, "control_size": 8, "warmup_steps": 1, "copilot_layers": 2,
         "latency_prompts": 3, "new_tokens": 4}  # fmt: skip


def _data(cfg: dict[str, Any], tokenizer: Any, seed: int) -> Any:
    from lightning_ft.data import InstructionDataModule

    dm = InstructionDataModule(
        label_options=["positive", "negative"], val_size=cfg["val_size"], test_size=cfg["test_size"],
        batch_size=cfg["batch_size"], eval_batch_size=25, max_length=cfg["max_length"], control="humaneval",
        control_size=cfg["control_size"], control_max_length=128, split_seed=1234, shuffle_seed=1234 + seed,
    )  # fmt: skip
    dm.tokenizer = tokenizer
    dm.setup("fit")
    return dm


_LORA = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.0}


def _pilot_args(cfg: dict[str, Any]) -> dict[str, Any]:
    """The Pilot: full fine-tuning at ``learning_rate``, or the paper's LoRA Pilot (every linear layer, lr 5e-4)."""
    if cfg.get("pilot", "full") == "lora":
        return {"learning_rate": 5e-4, "peft": {**_LORA, "target_modules": "all-linear"}}
    return {"learning_rate": cfg["learning_rate"]}


def _copilot_args(cfg: dict[str, Any]) -> dict[str, Any]:
    """A LoRA Copilot (the paper's, lr 5e-4) or a fully trained one (the mixin's default lr)."""
    return {"copilot_peft": dict(_LORA), "copilot_learning_rate": 5e-4} if cfg.get("copilot_lora") else {}


def _fit(module: Any, dm: Any, cfg: dict[str, Any]) -> list[float]:
    import lightning as L

    timer = step_timer()
    trainer = L.Trainer(
        max_steps=cfg["steps"], accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0,
        callbacks=[timer], default_root_dir=str(HERE / "runs" / "copilot"),
    )  # fmt: skip
    trainer.fit(module, dm)
    return timer.times


def _latency(module: Any, dm: Any, cfg: dict[str, Any]) -> dict[str, float]:
    """Median seconds per prompt of greedy generation: the Pilot alone (its own ``F.linear`` head), fused, and the Pilot
    alone with its head computed as the fused decoding computes it (``few_rows_product``), rotating the order prompt by
    prompt; ratios are medians of per-prompt ratios."""
    import torch

    from lightning_ft.copilot.decoder import few_rows_product
    from lightning_ft.core.anatomy import decoder_parts

    module.eval()
    head = decoder_parts(module.backbone, "benchmark").head
    prompts = [r["prompt_ids"] for r in dm._encoded["test"][: cfg["latency_prompts"]]]
    times: dict[str, list[float]] = {"pilot": [], "fused": [], "pilot_same_product": []}
    variants = list(times)
    with torch.no_grad():
        for i, ids in enumerate([prompts[0], *prompts]):  # the first prompt warms every variant up, untimed
            x = torch.tensor([ids])
            for name in variants[i % 3 :] + variants[: i % 3]:
                if name == "pilot_same_product":
                    head.forward = lambda h: few_rows_product(h, head.weight)
                start = time.perf_counter()
                module.generate(x, torch.ones_like(x), max_new_tokens=cfg["new_tokens"], min_new_tokens=cfg["new_tokens"],
                                copilot_lambda=module.copilot_lambda if name == "fused" else 0.0)  # fmt: skip
                if i > 0:
                    times[name].append(time.perf_counter() - start)
                if name == "pilot_same_product":
                    del head.forward
    fused = times["fused"]
    return {"pilot_s": statistics.median(times["pilot"]), "fused_s": statistics.median(fused),
            "pilot_same_product_s": statistics.median(times["pilot_same_product"]),
            "ratio": statistics.median(f / p for f, p in zip(fused, times["pilot"])),
            "ratio_same_product": statistics.median(f / p for f, p in zip(fused, times["pilot_same_product"]))}  # fmt: skip


def _describe(cfg: dict[str, Any]) -> str:
    pilot = "LoRA r=16 (all linear, lr 5e-4)" if cfg.get("pilot", "full") == "lora" else "fully fine-tuned"
    copilot = (
        "LoRA r=16 Copilot layers (lr 5e-4)" if cfg.get("copilot_lora") else "fully trained Copilot layers (lr 1e-4)"
    )
    return f"{pilot}, {copilot}"


def write_timing(name: str, r: dict[str, Any]) -> Path:
    out = HERE / "results" / f"{name}.md"
    (HERE / "results" / f"{name}.json").write_text(json.dumps(r, indent=2))
    cfg, lat = r["settings"], r["latency"]
    lines = [
        f"# Copilot overheads ({name})", "",
        f"Bundled SmolLM2-135M, Rotten Tomatoes, batch {cfg['batch_size']}, max length {cfg['max_length']}, Copilot "
        f"{cfg['copilot_layers']} layers, head `{cfg['head']}`; Pilot {_describe(cfg)}. Training: {cfg['rounds']} alternating rounds of "
        f"{cfg['steps']} steps of the Pilot alone and of Pilot + Copilot (same process, same data; median of each "
        f"round's steps 3 on). Latency: greedy decoding of {cfg['new_tokens']} tokens, {cfg['latency_prompts']} prompts "
        "one at a time, fused (lambda 1) and the Pilot alone alternating prompt by prompt (median ratio).", "",
        *([f"The Pilot alone with its head computed as the fused decoding computes its shared product "
           f"(`few_rows_product`): {lat['pilot_same_product_s']:.3f} s; fused against it: "
           f"{(lat['ratio_same_product'] - 1) * 100:+.1f}%.", ""] if "ratio_same_product" in lat else []),
        "| Pilot step | Pilot + Copilot step | train overhead | Pilot latency | fused latency | latency overhead | "
        "Copilot trainable | buffer peak |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['step_time_pilot_s']:.3f} s | {r['step_time_joint_s']:.3f} s | {r['train_overhead'] * 100:+.1f}% | "
        f"{lat['pilot_s']:.3f} s | {lat['fused_s']:.3f} s | {(lat['ratio'] - 1) * 100:+.1f}% | "
        f"{r['copilot_trainable']:,} | {r['buffer_peak_mib']:.1f} MiB ({r['buffer_rounds']} rounds) |",
    ]  # fmt: skip
    if r.get("train_overhead_per_round"):
        rounds = ", ".join(f"{x * 100:+.1f}%" for x in r["train_overhead_per_round"])
        lines += ["", f"Training overhead of each round alone (median joint step / median Pilot step): {rounds}."]
    if r.get("sections"):
        lines += ["", "Where a Pilot + Copilot step's time goes (median seconds per step, same run):", "",
                  "| part | seconds | share of the step |", "|---|---|---|",
                  *[f"| {k} | {v:.3f} | {v / r['step_time_joint_s'] * 100:.1f}% |" for k, v in r["sections"].items()]]  # fmt: skip
    if r.get("machine_note"):
        lines += ["", r["machine_note"]]
    lines += ["", f"Command: `{r['command']}`"]
    out.write_text("\n".join(lines) + "\n")
    return out


_SECTIONS = {
    "compute_loss": "Pilot forward and loss (with the capture hooks)",
    "_record_round": "the Pilot's error over the vocabulary + copy to the CPU log",
    "copilot_step_loss": "Copilot forward on a drawn round + RMSE",
    "manual_backward": "one backward over both losses",
    "pilot_step": "Pilot clipping + AdamW step",
    "copilot_step": "Copilot clipping + AdamW step",
}


def _instrument(module: Any) -> dict[str, list[float]]:
    """Time the parts of the joint training step by wrapping the module's methods and its optimizers' steps."""
    import functools

    times: dict[str, list[float]] = {k: [] for k in _SECTIONS}

    def wrap(obj: Any, attr: str, key: str) -> None:
        inner = getattr(obj, attr)

        @functools.wraps(inner)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                times[key].append(time.perf_counter() - start)

        setattr(obj, attr, timed)

    for name in ("compute_loss", "_record_round", "copilot_step_loss", "manual_backward"):
        wrap(module, name, name)
    original = module._step_both

    def step_both(trainer: Any) -> None:  # the Pilot's clip + step, then the Copilot's, timed apart
        pilot_opt, copilot_opt = module.optimizers()
        wrap(pilot_opt, "step", "pilot_step")
        wrap(copilot_opt.optimizer, "step", "copilot_step")
        try:
            original(trainer)
        finally:
            del pilot_opt.step, copilot_opt.optimizer.step

    module._step_both = step_both
    return times


def run_timing(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """Training overhead from alternating rounds of the Pilot alone and Pilot + Copilot, and greedy latency."""
    import lightning as L
    import torch

    from lightning_ft.copilot import CopilotCausalLM
    from lightning_ft.modules import CausalLMModule

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    common = {"model": "smollm2-135m", "warmup_steps": cfg["warmup_steps"], "output_dir": "", **_pilot_args(cfg)}
    L.seed_everything(seed)
    pilot = CausalLMModule(**common)
    joint = CopilotCausalLM(**common, copilot_layers=cfg["copilot_layers"], copilot_lambda=1.0, copilot_output="",
                            copilot_head=cfg["head"], **_copilot_args(cfg))  # fmt: skip
    dm = _data(cfg, pilot.tokenizer, seed)
    sections = _instrument(joint)
    pilot_steps, joint_steps, per_round = [], [], []
    for _ in range(cfg["rounds"]):
        pilot_round = _fit(pilot, dm, cfg)[2:]
        marks = {k: len(v) for k, v in sections.items()}
        joint_round = _fit(joint, dm, cfg)[2:]
        pilot_steps, joint_steps = pilot_steps + pilot_round, joint_steps + joint_round
        per_round.append(statistics.median(joint_round) / statistics.median(pilot_round) - 1)
        for k, v in sections.items():  # drop each round's first two steps, as for the step times
            del v[marks[k] : marks[k] + 2]
    pilot_step, joint_step = statistics.median(pilot_steps), statistics.median(joint_steps)
    with torch.no_grad():  # a trained-looking Copilot for the latency run (a zero output map skips nothing anyway)
        joint.copilot.head_weight.normal_(std=0.01)
    return {
        "settings": cfg, "seed": seed, "step_time_pilot_s": pilot_step, "step_time_joint_s": joint_step,
        "train_overhead": joint_step / pilot_step - 1, "train_overhead_per_round": per_round,
        "latency": _latency(joint, dm, cfg),
        "sections": {_SECTIONS[k]: statistics.median(v) for k, v in sections.items() if v},
        "buffer_peak_mib": joint.mistake_log.peak_bytes / 2**20, "buffer_rounds": len(joint.mistake_log),
        "copilot_trainable": sum(p.numel() for p in joint.copilot.parameters() if p.requires_grad),
    }  # fmt: skip


def run_quality(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """One Pilot + Copilot fit (the Pilot's trajectory is the one it has alone, a tested property), scored on the
    held-out reviews: the Pilot's accuracy and answer NLL, the fused ones at lambda 'auto' (chosen on validation) and
    at each lambda of the grid, and the Copilot's RMSE against the zero predictor."""
    import lightning as L
    import torch

    from lightning_ft.copilot import CopilotCausalLM

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    L.seed_everything(seed)
    joint = CopilotCausalLM(model="smollm2-135m", warmup_steps=cfg["warmup_steps"], output_dir="",
                            copilot_layers=cfg["copilot_layers"], copilot_lambda="auto",
                            lambda_metric=cfg["lambda_metric"], copilot_output="", copilot_head=cfg["head"],
                            buffer_rounds=cfg["buffer_rounds"], **_pilot_args(cfg), **_copilot_args(cfg))  # fmt: skip
    dm = _data(cfg, joint.tokenizer, seed)
    test = list(dm.test_dataloader())
    zero_shot = joint.evaluate(test)
    _fit(joint, dm, cfg)
    after = joint.evaluate(test)
    sweep = joint.sweep_lambda(test)
    print(f"seed {seed}", after, "lambda", joint.copilot_lambda, flush=True)
    return {"seed": seed, "zero_shot": zero_shot, "after": after, "lambda": joint.copilot_lambda,
            "val_sweep": joint.lambda_sweep, "test_sweep": sweep}  # fmt: skip


def write_quality(name: str, cfg: dict[str, Any], runs: list[dict[str, Any]], command: str) -> Path:
    out = HERE / "results" / f"{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    (HERE / "results" / f"{name}.json").write_text(json.dumps({"settings": cfg, "runs": runs}, indent=2))

    def spread(values: list[float], digits: int = 4) -> str:
        mean = statistics.fmean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{mean:.{digits}f} ± {sd:.{digits}f}"

    a = [r["after"] for r in runs]
    lines = [
        f"# Copilot: fused decoding against the Pilot alone ({name})", "",
        f"Bundled SmolLM2-135M, Rotten Tomatoes, {cfg['steps']} steps, batch {cfg['batch_size']}, lr "
        f"{_pilot_args(cfg)['learning_rate']}; Pilot {_describe(cfg)}; Copilot {cfg['copilot_layers']} layers from the "
        f"Pilot's lowest, head `{cfg['head']}`, mistake log {cfg['buffer_rounds']} rounds; lambda 'auto' (0 and the paper's grid) chosen on "
        f"{cfg['val_size']} validation reviews by {cfg['lambda_metric'] or 'target_acc'}. Scored on {cfg['test_size']} "
        f"held-out reviews; {len(runs)} seeds (data orders), mean ± standard deviation.", "",
        "| seed | Pilot acc | Pilot NLL | lambda | fused acc | fused NLL | Copilot RMSE | zero-predictor RMSE |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {r['seed']} | {r['after']['target_acc']:.4f} | {r['after']['target_loss']:.4f} | {r['lambda']} | "
          f"{r['after']['fused_target_acc']:.4f} | {r['after']['fused_target_loss']:.4f} | "
          f"{r['after']['copilot_rmse']:.6f} | {r['after']['copilot_zero_rmse']:.6f} |" for r in runs],
        f"| mean ± sd | {spread([x['target_acc'] for x in a])} | {spread([x['target_loss'] for x in a])} | - | "
        f"{spread([x['fused_target_acc'] for x in a])} | {spread([x['fused_target_loss'] for x in a])} | "
        f"{spread([x['copilot_rmse'] for x in a], 6)} | {spread([x['copilot_zero_rmse'] for x in a], 6)} |",
        "", "Every lambda of the grid on the held-out reviews (mean ± sd over the seeds; lambda 0 = the Pilot alone):", "",
        "| lambda | fused acc | fused NLL |", "|---|---|---|",
    ]  # fmt: skip
    for i, row in enumerate(runs[0]["test_sweep"]):
        accs = [r["test_sweep"][i]["target_acc"] for r in runs]
        nlls = [r["test_sweep"][i]["target_loss"] for r in runs]
        lines.append(f"| {row['lambda']} | {spread(accs)} | {spread(nlls)} |")
    lines += ["", f"Command: `{command}`"]
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="copilot")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int)
    parser.add_argument("--head", choices=["full", "tied"], default="tied")
    parser.add_argument("--buffer-rounds", type=int, default=128)
    parser.add_argument("--lambda-metric", choices=["target_acc", "target_loss"])
    parser.add_argument("--timing-only", action="store_true", help="step times and latency only, no scoring")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (--timing-only)")
    parser.add_argument(
        "--pilot",
        choices=["full", "lora"],
        default="full",
        help="the Pilot: full fine-tuning, or LoRA r=16 alpha=16 on every linear layer (paper's recipe)",
    )
    parser.add_argument(
        "--copilot-lora", action="store_true", help="LoRA r=16 alpha=16 on the Copilot's layers (paper)"
    )
    parser.add_argument("--note", default="", help="a line on the machine's load, written into the timing table")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = {**DEFAULTS, **(QUICK if args.quick else {}), "head": args.head, "buffer_rounds": args.buffer_rounds,
           "lambda_metric": args.lambda_metric, "rounds": args.rounds, "pilot": args.pilot,
           "copilot_lora": args.copilot_lora}  # fmt: skip
    if args.steps:
        cfg["steps"] = args.steps
    command = "python benchmarks/copilot.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.timing_only:
        result = {**run_timing(cfg, args.seeds[0]), "command": command, "machine_note": args.note}
        print(write_timing(args.name, result).read_text())
        return
    runs = [run_quality(cfg, seed) for seed in args.seeds]
    print(write_quality(args.name, cfg, runs, command).read_text())


if __name__ == "__main__":
    main()
