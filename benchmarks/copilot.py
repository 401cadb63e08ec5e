"""Copilot benchmark: the Pilot alone against Pilot + Copilot on the bundled SmolLM2-135M and Rotten Tomatoes.

Both runs train in this process, one after the other, with the same seed, data, data order and step budget. The
Pilot's trajectory is the same with and without the Copilot (the mixin's defining property), so the Pilot-only
accuracy of the second run must equal the first run's: the script checks it. Reported:

* Pilot-only and fused target accuracy on held-out reviews (fused: ``p + lambda * f``, lambda chosen on the
  validation split from the paper's grid), the lambda sweep, and the control perplexity (HumanEval);
* training-time overhead: median step time of Pilot + Copilot over the Pilot alone;
* inference-latency overhead: greedy generation of ``--new-tokens`` tokens per held-out prompt, one prompt at a
  time, fused against the Pilot alone, alternating prompt by prompt; median ratio;
* the mistake log's memory (peak MiB) and the Copilot's parameter counts.

    python benchmarks/copilot.py --name copilot                # default budget (about 20 min on 2 CPU cores)
    python benchmarks/copilot.py --name smoke --quick          # a few minutes: proves the script runs
    python benchmarks/copilot.py --name copilot_timing --timing-only --steps 30   # overheads only (no scoring)

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

from _timing import median_step, step_timer  # benchmarks/_timing.py (this script's folder is on sys.path)

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
    """Median seconds per prompt of greedy generation, Pilot alone and fused, alternating prompt by prompt."""
    import torch

    module.eval()
    prompts = [r["prompt_ids"] for r in dm._encoded["test"][: cfg["latency_prompts"]]]
    pilot, fused = [], []
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            x = torch.tensor([ids])
            for lam, out in (
                ((0.0, pilot), (module.copilot_lambda, fused))
                if i % 2 == 0
                else ((module.copilot_lambda, fused), (0.0, pilot))
            ):
                start = time.perf_counter()
                module.generate(x, torch.ones_like(x), max_new_tokens=cfg["new_tokens"], min_new_tokens=cfg["new_tokens"],
                                copilot_lambda=lam)  # fmt: skip
                out.append(time.perf_counter() - start)
    return {"pilot_s": statistics.median(pilot), "fused_s": statistics.median(fused),
            "ratio": statistics.median(f / p for f, p in zip(fused, pilot))}  # fmt: skip


def write_timing(name: str, r: dict[str, Any]) -> Path:
    out = HERE / "results" / f"{name}.md"
    (HERE / "results" / f"{name}.json").write_text(json.dumps(r, indent=2))
    cfg, lat = r["settings"], r["latency"]
    out.write_text("\n".join([
        f"# Copilot overheads ({name})", "",
        f"Bundled SmolLM2-135M, Rotten Tomatoes, batch {cfg['batch_size']}, {cfg['steps']} steps per run (median of steps "
        f"3 on), Copilot {cfg['copilot_layers']} layers; latency: greedy decoding of {cfg['new_tokens']} tokens, "
        f"{cfg['latency_prompts']} prompts one at a time, fused (lambda 1) and Pilot alone alternating.", "",
        "| Pilot step | Pilot + Copilot step | train overhead | Pilot latency | fused latency | latency overhead | buffer peak |",
        "|---|---|---|---|---|---|---|",
        f"| {r['step_time_pilot_s']:.3f} s | {r['step_time_joint_s']:.3f} s | {r['train_overhead'] * 100:+.1f}% | "
        f"{lat['pilot_s']:.3f} s | {lat['fused_s']:.3f} s | {(lat['ratio'] - 1) * 100:+.1f}% | "
        f"{r['buffer_peak_mib']:.1f} MiB ({r['buffer_rounds']} rounds) |",
    ]) + "\n")  # fmt: skip
    return out


def run(cfg: dict[str, Any], seed: int, score: bool = True) -> dict[str, Any]:
    """Train the Pilot alone, then Pilot + Copilot, with the same seed and data; time both and the greedy latency.

    With ``score``, also evaluate before and after (lambda chosen by ``auto``) and check that the Pilot's weights are
    the same in both runs; without, only the overheads are measured (lambda 1).
    """
    import lightning as L
    import torch

    from lightning_ft.copilot import CopilotCausalLM
    from lightning_ft.modules import CausalLMModule

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    common = {"model": "smollm2-135m", "learning_rate": cfg["learning_rate"], "warmup_steps": cfg["warmup_steps"],
              "output_dir": ""}  # fmt: skip
    L.seed_everything(seed)
    pilot = CausalLMModule(**common)
    dm = _data(cfg, pilot.tokenizer, seed)
    test = list(dm.test_dataloader()) if score else []
    scores: dict[str, Any] = {}
    if score:
        scores["zero_shot"] = pilot.evaluate(test)
        print("zero-shot", scores["zero_shot"], flush=True)
    pilot_times = _fit(pilot, dm, cfg)
    if score:
        scores["pilot"] = pilot.evaluate(test)
        print("pilot", scores["pilot"], flush=True)
    pilot_state = {k: v.clone() for k, v in pilot.backbone.state_dict().items()}
    del pilot

    L.seed_everything(seed)
    joint = CopilotCausalLM(**common, copilot_layers=cfg["copilot_layers"], copilot_lambda="auto" if score else 1.0,
                            copilot_output="")  # fmt: skip
    dm = _data(cfg, joint.tokenizer, seed)
    joint_times = _fit(joint, dm, cfg)
    if score:
        scores["joint"] = joint.evaluate(test)
        print("pilot + copilot", scores["joint"], "lambda", joint.copilot_lambda, flush=True)
    pilot_step, joint_step = median_step(pilot_times), median_step(joint_times)
    return {
        "settings": cfg, "seed": seed, **scores, "lambda": joint.copilot_lambda, "lambda_sweep": joint.lambda_sweep,
        "pilot_identical": all(torch.equal(v, pilot_state[k]) for k, v in joint.backbone.state_dict().items()),
        "step_time_pilot_s": pilot_step, "step_time_joint_s": joint_step, "train_overhead": joint_step / pilot_step - 1,
        "latency": _latency(joint, dm, cfg), "buffer_peak_mib": joint.mistake_log.peak_bytes / 2**20,
        "buffer_rounds": len(joint.mistake_log),
        "copilot_trainable": sum(p.numel() for p in joint.copilot.parameters() if p.requires_grad),
        "copilot_frozen": sum(p.numel() for p in joint.copilot.parameters() if not p.requires_grad),
    }  # fmt: skip


def write_report(name: str, r: dict[str, Any]) -> Path:
    out = HERE / "results" / f"{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    (HERE / "results" / f"{name}.json").write_text(json.dumps(r, indent=2))
    cfg, zero, p, j = r["settings"], r["zero_shot"], r["pilot"], r["joint"]
    ctrl = lambda m: (m["control_ppl"] / zero["control_ppl"] - 1) * 100  # noqa: E731
    lines = [
        f"# Copilot benchmark ({name})", "",
        f"Bundled SmolLM2-135M, Rotten Tomatoes, {cfg['steps']} steps, batch {cfg['batch_size']}, lr "
        f"{cfg['learning_rate']}, seed {r['seed']}; Copilot: {cfg['copilot_layers']} layers from the Pilot's lowest, "
        f"lr 1e-4, lambda chosen on {cfg['val_size']} validation reviews. Scored on {cfg['test_size']} held-out reviews; "
        f"control = HumanEval perplexity (zero-shot {zero['control_ppl']:.3f}, accuracy {zero['target_acc']:.4f}).", "",
        "| run | target acc | fused target acc | control ppl change | step time | train overhead | latency/prompt | "
        "latency overhead | buffer peak |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| Pilot alone | {p['target_acc']:.4f} | - | {ctrl(p):+.1f}% | {r['step_time_pilot_s']:.2f} s | - | "
        f"{r['latency']['pilot_s']:.3f} s | - | - |",
        f"| Pilot + Copilot (lambda {r['lambda']}) | {j['target_acc']:.4f} | {j['fused_target_acc']:.4f} | {ctrl(j):+.1f}% | "
        f"{r['step_time_joint_s']:.2f} s | {r['train_overhead'] * 100:+.1f}% | {r['latency']['fused_s']:.3f} s | "
        f"{(r['latency']['ratio'] - 1) * 100:+.1f}% | {r['buffer_peak_mib']:.1f} MiB ({r['buffer_rounds']} rounds) |",
        "",
        f"Pilot weights identical with and without the Copilot: {r['pilot_identical']}. Copilot parameters: "
        f"{r['copilot_trainable']:,} trained, {r['copilot_frozen']:,} frozen (the embedding copy errors are read through).",
        f"Latency: greedy decoding of {cfg['new_tokens']} tokens, {cfg['latency_prompts']} prompts one at a time.", "",
        "Lambda sweep on the validation split (lambda 0 = the Pilot alone):", "",
        "| lambda | fused target acc | fused target NLL |", "|---|---|---|",
        *[f"| {row['lambda']} | {row.get('target_acc', float('nan')):.4f} | {row.get('target_loss', float('nan')):.4f} |"
          for row in r["lambda_sweep"]],
    ]  # fmt: skip
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="copilot")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--timing-only", action="store_true", help="step times and latency only, no scoring")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = {**DEFAULTS, **(QUICK if args.quick else {})}
    if args.steps:
        cfg["steps"] = args.steps
    if args.timing_only:
        print(write_timing(args.name, run(cfg, args.seed, score=False)).read_text())
        return
    print(write_report(args.name, run(cfg, args.seed)).read_text())


if __name__ == "__main__":
    main()
