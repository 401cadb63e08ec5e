"""Method benchmark: fine-tuning methods side by side on the bundled SmolLM2-135M and Rotten Tomatoes.

Every row runs with the same data, data order, seed and step budget, each in its own subprocess (so peak
memory is its own), and is scored on held-out reviews (target accuracy, answer NLL) and on control text the
task never trains on (HumanEval perplexity: the forgetting signal). Step time is reported relative to the
full fine-tuning row of the same invocation. A seed sets the training-data order (shuffle seed ``1234 + seed``,
so seed 0 is the DataModule's default order), the global seed and the callbacks' own ``seed``. Results go to
``benchmarks/results/<name>.md`` (+ ``.json``, ``.png``: target accuracy against forgetting).

    python benchmarks/methods.py --name foundation             # default budget (< 1 h on 2 cores)
    python benchmarks/methods.py --name smoke --quick          # a few minutes
    python benchmarks/methods.py --methods full_ft lora --seeds 0 1 --steps 120
    python benchmarks/methods.py --name table --seeds 0 1 2 --jobs 2   # two runs at a time, one thread each

Each finished (method, seed) is appended to ``results/<name>.runs.jsonl``; a rerun with the same name and settings
skips those, so an interrupted invocation resumes where it stopped. With ``--jobs N`` the step-time column is
measured with N runs sharing the machine (ratios to full FT stay within the invocation).

A method issue adds its row to ``METHODS``: module arguments plus callbacks (``class_path`` dicts).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _timing import step_timer_class  # benchmarks/_timing.py (this script's folder is on sys.path)

HERE = Path(__file__).resolve().parent

# name -> {"module": module kwargs, "module_class": dotted class (default CausalLMModule), "callbacks": [{"class_path":
# ..., "init_args": {...}}], "label": str, "mix": optional second training task {"weight": w, "task": InstructionDataModule
# init_args}: the steps then draw 1 - w of their rows from the reviews (task 0) and w from it (task 1, its ``task_id``)}
LORA8 = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}


def _corda(learning_rate: float, **init_args: Any) -> dict[str, Any]:
    """A CorDA row: LoRA r=8 on every linear layer, initialised by ``CorDAInit(**init_args)``."""
    return {
        "module": {"learning_rate": learning_rate, "peft": LORA8},
        "callbacks": [{"class_path": "lightning_ft.callbacks.CorDAInit", "init_args": init_args}],
    }


TRIVIA = {  # world-knowledge data (chatterbot trivia), as in configs/loramoe.yaml
    "dataset": "trivia", "prompt_template": "Q: {prompt}\nA:", "response_template": " {response}", "label_options": None,
    "append_eos": True, "val_size": 20, "test_size": 0, "max_length": 64,
}  # fmt: skip

METHODS: dict[str, dict[str, Any]] = {
    "full_ft": {"label": "full fine-tuning", "module": {"learning_rate": 2e-4}},
    "lora": {
        "label": "LoRA r=8 (all linear)",
        "module": {"learning_rate": 5e-4, "peft": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}},
    },
    "hft": {
        "label": "HFT",
        "module": {"learning_rate": 2e-4},
        "callbacks": [
            {"class_path": "lightning_ft.callbacks.HalfFineTuning", "init_args": {"redraw": "fit", "seed": 0}}
        ],
    },
    "hft_reset": {
        "label": "HFT with reset (redraw every 40 steps)",
        "module": {"learning_rate": 2e-4},
        "callbacks": [
            {
                "class_path": "lightning_ft.callbacks.HalfFineTuning",
                "init_args": {"redraw": "steps", "every_n_steps": 40, "reset": True, "seed": 0},
            }
        ],
    },
    "owlore": {
        "label": "OwLore (gamma = 1/4 of the blocks)",
        "module": {"learning_rate": 2e-4},
        "callbacks": [
            {
                "class_path": "lightning_ft.callbacks.LayerwiseSampling",
                "init_args": {"active_fraction": 0.25, "interval": 10, "sampling": "outlier", "seed": 0},
            }
        ],
    },
    "owlore_preset": {
        "label": "OwLore preset + GaLore r=256 (gamma 5/30, K=10, lr 3e-4)",
        "module": {"learning_rate": 3e-4},
        "callbacks": [
            {
                "class_path": "lightning_ft.callbacks.LayerwiseSampling",
                "init_args": {"preset": "owlore", "interval": 10, "seed": 0},
            }
        ],
    },
    "owlore_preset_no_galore": {
        "label": "OwLore preset without GaLore (gamma 5/30, K=10, lr 3e-4)",
        "module": {"learning_rate": 3e-4},
        "callbacks": [
            {
                "class_path": "lightning_ft.callbacks.LayerwiseSampling",
                "init_args": {"preset": "owlore", "interval": 10, "galore_rank": 0, "seed": 0},
            }
        ],
    },
    "s2ft": {
        "label": "S2FT-R (9/90 o_proj groups + 2,511 down_proj channels: LoRA's count)",
        "module": {"learning_rate": 5e-4},
        "callbacks": [
            {
                "class_path": "lightning_ft.callbacks.S2FT",
                "init_args": {"v_ratio": 0.0, "o_ratio": 0.1, "u_ratio": 0.0, "d_ratio": 0.0545, "seed": 0},
            }
        ],
    },
    "cofitune": {
        "label": "CoFiTune (FFN up/down in the (25%, 50%] band, soft mask from the control text)",
        "module": {"learning_rate": 2e-4},
        "callbacks": [
            {
                "class_path": "lightning_ft.callbacks.CoFiTune",
                "init_args": {"importance_source": "control", "importance_batches": 16, "seed": 0},
            }
        ],
    },
    "lt_sft": {
        "label": "LT-SFT (60 dense + 60 sparse steps, LoRA's count)",
        "module": {"learning_rate": 2e-4},
        "callbacks": [
            {
                "class_path": "lightning_ft.callbacks.SparseFineTuning",
                "init_args": {
                    "rule": {"class_path": "lightning_ft.sparse.LotteryTicket", "init_args": {"dense_steps": 60}},
                    "count": 2442240,
                    "save_path": "",
                },
            }
        ],
    },
    "lift": {
        "label": "LIFT (rank-8 budget = LoRA's count, filter rank 32, reselect every 40)",
        "module": {"learning_rate": 5e-4},
        "callbacks": [
            {
                "class_path": "lightning_ft.callbacks.SparseFineTuning",
                "init_args": {
                    "rule": {
                        "class_path": "lightning_ft.sparse.PrincipalWeights",
                        "init_args": {"filter_rank": 32, "reselect_every": 40},
                    },
                    "rank": 8,
                    "save_path": "",
                },
            }
        ],
    },
    "ist": {
        "label": "IST on LoRA r=8 (a quarter of the layers per step, probe every 10 steps)",
        "module": {"learning_rate": 5e-4, "peft": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}},
        "callbacks": [{"class_path": "lightning_ft.callbacks.ImportanceLayerSampling", "init_args": {"seed": 0}}],
    },
    "kasa": {
        "label": "KaSA r=8 (all linear, beta 1e-4, gamma 1e-3)",
        "module_class": "lightning_ft.objectives.KaSACausalLM",
        "module": {
            "learning_rate": 5e-4,
            "peft": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "kasa_config": {}},
        },
    },
    "corda_kpm": {  # the paper's setting: the knowledge to keep is measured on held-out samples of the context's kind
        "label": "CorDA KPM, LoRA r=8 (all linear; context: the 100 HumanEval texts outside the control set)",
        **_corda(5e-4, mode="kpm", data="<humaneval outside the control set>", batches=13, max_length=128),
    },
    "corda_kpm_lr1e4": {  # KPM maps review tokens to 2-32x the |Ax| of LoRA init (corda_scale.md)
        "label": "CorDA KPM as corda_kpm, learning rate 1e-4 (a fifth of LoRA's)",
        **_corda(1e-4, mode="kpm", data="<humaneval outside the control set>", batches=13, max_length=128),
    },
    "lora_lr1e4": {  # corda_kpm_lr1e4's baseline: a lower rate alone also forgets less
        "label": "LoRA r=8 (all linear), learning rate 1e-4",
        "module": {"learning_rate": 1e-4, "peft": LORA8},
    },
    "corda_kpm_trivia": {
        "label": "CorDA KPM, LoRA r=8 (all linear; context: 256 trivia questions)",
        **_corda(5e-4, mode="kpm", data="trivia", data_field="prompt", batches=32),
    },
    "corda_ipm": {
        "label": "CorDA IPM, LoRA r=8 (all linear; context: 32 training batches)",
        **_corda(5e-4, mode="ipm", data="train", batches=32),
    },
    "lora_mix": {
        "label": "LoRA r=8 (all linear) on reviews + 25% trivia Q&A",
        "module": {"learning_rate": 5e-4, "peft": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}},
        "mix": {"weight": 0.25, "task": TRIVIA},
    },
    "loramoe": {
        "label": "LoRAMoE (8 experts r=4 on the FFN, beta = delta = 0.1) on reviews + 25% trivia Q&A",
        "module_class": "lightning_ft.objectives.LoRAMoECausalLM",
        "module": {
            "learning_rate": 2e-4,
            "num_experts": 8,
            "expert_rank": 4,
            "expert_alpha": 32.0,
            "expert_dropout": 0.05,
            "loramoe_beta": 0.1,
            "loramoe_delta": 0.1,
            "knowledge_tasks": [1],
        },
        "mix": {"weight": 0.25, "task": TRIVIA},
    },
    "lofit": {
        "label": "LoFiT (40 head-selection steps, then 80 bias steps on the top 3% = 8 heads)",
        "module_class": "lightning_ft.objectives.LoFiTCausalLM",
        "pre_stage": {
            "steps": 40,
            "module": {
                "stage": "heads",
                "learning_rate": 5e-3,
                "l1_lambda": 5e-4,
                "warmup_steps": 0,
                "heads_output": "<run>/lofit_heads.safetensors",
            },
        },
        "module": {
            "stage": "bias",
            "heads_path": "<run>/lofit_heads.safetensors",
            "top_k_ratio": 0.03,
            "learning_rate": 1e-2,
            "warmup_steps": 0,
        },
    },
    "full_ft_lines": {
        "label": "full FT + LiNeS auto",
        "module": {"learning_rate": 2e-4},
        "callbacks": [
            {
                "class_path": "lightning_ft.callbacks.LiNeS",
                "init_args": {"alpha": "auto", "alphas": [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]},
            }
        ],
    },
}

DEFAULTS = {
    "steps": 120,
    "batch_size": 8,
    "max_length": 96,
    "warmup_steps": 10,
    "val_size": 200,
    "test_size": 400,
    "control_size": 64,
}
QUICK = {"steps": 20, "val_size": 50, "test_size": 100, "control_size": 16, "warmup_steps": 2}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one (method, seed) in this process; return its measurements."""
    import lightning as L
    import torch
    from jsonargparse import ArgumentParser  # noqa: F401  (import cost kept out of the timings)
    from lightning.pytorch.cli import instantiate_class

    from lightning_ft.data import InstructionDataModule
    from lightning_ft.modules import CausalLMModule

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    cfg, method = spec["settings"], METHODS.get(spec["method"], {})
    run_dir = HERE / "runs" / f"{spec['method']}_seed{spec['seed']}"  # a file a method writes or reads (<run>)
    run_dir.mkdir(parents=True, exist_ok=True)
    method = json.loads(json.dumps(method).replace("<run>", str(run_dir)))
    L.seed_everything(spec["seed"])
    module_kwargs = {"warmup_steps": cfg["warmup_steps"], "output_dir": "", **method.get("module", {})}
    module_class: Any = CausalLMModule
    if method.get("module_class"):  # a ready-made mixin module (e.g. KaSACausalLM)
        import importlib

        path, _, name = method["module_class"].rpartition(".")
        module_class = getattr(importlib.import_module(path), name)
    pre = method.get("pre_stage")
    first = {"warmup_steps": cfg["warmup_steps"], "output_dir": "", **pre["module"]} if pre else module_kwargs
    module = module_class(model="smollm2-135m", **first)
    dm = InstructionDataModule(
        label_options=["positive", "negative"],
        val_size=cfg["val_size"],
        test_size=cfg["test_size"],
        batch_size=cfg["batch_size"],
        eval_batch_size=25,
        max_length=cfg["max_length"],
        control="humaneval",
        control_size=cfg["control_size"],
        control_max_length=128,
        split_seed=1234,
        shuffle_seed=1234 + spec["seed"],
    )
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    train_dm: Any = dm
    if method.get("mix"):  # the reviews (the same split) mixed with a second task, each row tagged with its task_id
        from lightning_ft.objectives import MultiTaskDataModule

        reviews = {k: v for k, v in dm.hparams.items() if k not in ("control", "control_size", "control_max_length")}
        weight = method["mix"]["weight"]
        train_dm = MultiTaskDataModule(
            tasks=[
                {"class_path": "lightning_ft.data.InstructionDataModule", "init_args": {**reviews, "control": None}},
                {
                    "class_path": "lightning_ft.data.InstructionDataModule",
                    "init_args": {**method["mix"]["task"], "control": None},
                },
            ],
            weights=[1 - weight, weight],
            epoch_size=cfg["steps"] * cfg["batch_size"],
            seed=1234 + spec["seed"],
            batch_size=cfg["batch_size"],
            control=None,
        )
        train_dm.tokenizer = module.tokenizer
    if "<humaneval outside the control set>" in json.dumps(method):  # same kind as the control text, disjoint from it
        from lightning_ft.data.files import load_records

        control = set(dm.control_texts(1234))
        rest = [{"text": r["text"]} for r in load_records("humaneval") if r["text"] not in control]
        (run_dir / "humaneval_rest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rest))
        method = json.loads(
            json.dumps(method).replace("<humaneval outside the control set>", str(run_dir / "humaneval_rest.jsonl"))
        )
    loaders = list(dm.test_dataloader())  # scored on test reviews: methods that select on val (LiNeS) are not favoured
    rss_loaded = _rss_mb()
    if spec["method"] == "zero_shot":
        return {"after": module.evaluate(loaders), "trainable": 0, "optimizer_bytes": 0}
    timer = _step_timer()

    def build(value: Any) -> Any:  # nested class_path dicts (a callback's rule) are instantiated too
        if isinstance(value, dict) and "class_path" in value:
            return instantiate_class((), {**value, "init_args": build(value.get("init_args", {}))})
        if isinstance(value, dict):
            return {k: spec["seed"] if k == "seed" else build(v) for k, v in value.items()}  # callbacks' draws too
        return value

    callbacks = [build(c) for c in method.get("callbacks", [])] + [timer]
    steps = cfg["steps"]
    if pre:  # a first stage (LoFiT's head selection) takes its steps out of the budget; the second builds anew
        L.Trainer(
            max_steps=pre["steps"],
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            gradient_clip_val=1.0,
            default_root_dir=str(run_dir),
        ).fit(module, train_dm)
        steps -= pre["steps"]
        module = module_class(model="smollm2-135m", **module_kwargs)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        callbacks=callbacks,
        default_root_dir=str(HERE / "runs"),
    )
    trainer.fit(module, train_dm)
    after = module.evaluate(loaders)
    return {
        "after": after,
        "trainable": timer.trainable,  # peak during training (selection callbacks unfreeze all at fit end)
        "optimizer_bytes": timer.optimizer_bytes,
        "sparse_optimizer_bytes": timer.sparse_bytes,
        "selected": timer.selected,
        "step_time": timer.median(),
        "peak_rss_increase_mb": _peak_rss_mb() - rss_loaded,
    }


def _step_timer() -> Any:
    """The shared step timer, also recording trainable entries and optimizer-state bytes (counted from the state)."""

    class Timer(step_timer_class()):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.trainable = 0
            self.optimizer_bytes = 0
            self.sparse_bytes = 0  # optimizer state while only the selected entries train (sparse FT)
            self.selected = 0

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            super().on_train_batch_end()
            sparse = [c for c in trainer.callbacks if hasattr(c, "state_bytes") and getattr(c, "phase", "") == "sparse"]
            if sparse:  # trainable = selected entries; their compact state (indices + moments) is optimizer state
                trainable = sum(s.numel for c in sparse for s in c.states.values())
            else:
                trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            self.trainable = max(self.trainable, trainable)
            total = sum(c.state_bytes for c in sparse)
            for opt in trainer.optimizers:
                for state in opt.state.values():
                    total += sum(
                        v.numel() * v.element_size() for v in state.values() if hasattr(v, "numel") and v.dim() > 0
                    )
            self.optimizer_bytes = max(self.optimizer_bytes, total)
            if sparse:
                self.sparse_bytes = max(self.sparse_bytes, total)
                self.selected = max(self.selected, trainable)

    return Timer()


def _spawn(method: str, seed: int, settings: dict[str, Any], threads: int | None = None) -> dict[str, Any]:
    spec = json.dumps({"method": method, "seed": seed, "settings": settings})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    if threads is not None:
        env["BENCH_THREADS"] = str(threads)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} seed {seed} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(method=method, seed=seed, wall_s=time.perf_counter() - start)
    print(f"  {method} seed {seed}: {json.dumps(result['after'])} ({result['wall_s']:.0f} s)", flush=True)
    return result


def _mean(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def _run_all(
    name: str, jobs: list[tuple[str, int]], settings: dict[str, Any], workers: int, finished_only: bool = False
) -> list[dict[str, Any]]:
    """Run every (method, seed), ``workers`` at a time, reusing runs already in ``results/<name>.runs.jsonl``
    (``finished_only``: run nothing, return the finished ones)."""
    log = HERE / "results" / f"{name}.runs.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    done: dict[tuple[str, int], dict[str, Any]] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            if r.get("settings") == settings:
                done[(r["method"], r["seed"])] = r
    todo = [j for j in jobs if j not in done]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs reused from {log.name}", flush=True)
    if finished_only:
        return [done[j] for j in jobs if j in done]
    threads = max(1, (os.cpu_count() or 2) // workers) if workers > 1 else None

    def one(job: tuple[str, int]) -> dict[str, Any]:
        result = _spawn(job[0], job[1], settings, threads)
        result["settings"] = settings
        with open(log, "a") as f:  # one line per finished run, appended whole
            f.write(json.dumps(result) + "\n")
        return result

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(one, todo):
            done[(result["method"], result["seed"])] = result
    return [done[j] for j in jobs]


def _verdict(row: dict[str, Any], lora: dict[str, Any] | None) -> str:
    """Does the method forget less than LoRA at LoRA's accuracy or better? Ranges are mean ± half the range."""
    if lora is None or row is lora:
        return "reference" if row is lora else "n/a"
    if len(row["seeds"]) < 2 or len(lora["seeds"]) < 2:
        return "not judged (fewer than two seeds)"
    (acc, acc_h), (l_acc, l_acc_h) = row["target_acc"], lora["target_acc"]
    (ctl, ctl_h), (l_ctl, l_ctl_h) = row["control_change_pct"], lora["control_change_pct"]
    if acc + acc_h < l_acc - l_acc_h:
        accuracy = "lower accuracy"
    elif acc - acc_h > l_acc + l_acc_h:
        accuracy = "higher accuracy"
    else:
        accuracy = "same accuracy within spread"
    if ctl + ctl_h < l_ctl - l_ctl_h:
        forgetting = "forgets less"
    elif ctl - ctl_h > l_ctl + l_ctl_h:
        forgetting = "forgets more"
    else:
        forgetting = "forgets the same within spread"
    yes = accuracy != "lower accuracy" and forgetting == "forgets less"
    return f"{'yes' if yes else 'no'}: {forgetting}, {accuracy}"


def summarise(results: list[dict[str, Any]], zero: dict[str, float]) -> list[dict[str, Any]]:
    """One row per method: means over seeds (± half the range), changes against zero-shot."""
    rows = []
    full_step = [r["step_time"] for r in results if r["method"] == "full_ft"]
    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method]
        acc = _mean([r["after"]["target_acc"] for r in runs])
        nll = _mean([r["after"]["target_loss"] for r in runs])
        ctrl = _mean([(r["after"]["control_ppl"] / zero["control_ppl"] - 1) * 100 for r in runs])
        step = statistics.mean(r["step_time"] for r in runs)
        rows.append(
            {
                "method": method,
                "label": METHODS[method]["label"],
                "seeds": [r["seed"] for r in runs],
                "target_acc": acc,
                "target_nll": nll,
                "per_seed_acc": [r["after"]["target_acc"] for r in runs],
                "per_seed_control_pct": [(r["after"]["control_ppl"] / zero["control_ppl"] - 1) * 100 for r in runs],
                "control_change_pct": ctrl,
                "trainable": runs[0]["trainable"],
                "optimizer_mb": runs[0]["optimizer_bytes"] / 2**20,
                "peak_rss_increase_mb": statistics.mean(r["peak_rss_increase_mb"] for r in runs),
                "step_time_s": step,
                "step_time_rel": step / statistics.mean(full_step) if full_step else float("nan"),
                "selected": runs[0].get("selected", 0),
                "sparse_optimizer_mb": runs[0].get("sparse_optimizer_bytes", 0) / 2**20,
            }
        )
    lora = next((r for r in rows if r["method"] == "lora"), None)
    for r in rows:
        r["vs_lora"] = _verdict(r, lora)
    return rows


def write_report(
    name: str,
    rows: list[dict[str, Any]],
    zero: dict[str, float],
    settings: dict[str, Any],
    command: str,
    note: str = "",
) -> Path:
    """Write ``results/<name>.md``, ``.json`` and the accuracy-vs-forgetting plot."""
    out = HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Method benchmark: {name}",
        "",
        f"Command: `{command}`",
        "",
        f"Model: bundled SmolLM2-135M-Instruct (fp32, CPU). Task: Rotten Tomatoes as instruction data, scored on "
        f"{settings['test_size']} held-out test reviews ({settings['val_size']} validation reviews are used only by "
        "methods that select on validation data, e.g. LiNeS auto). "
        f"Control: HumanEval prompt+solution perplexity ({settings['control_size']} texts, "
        f"128 tokens). Budget: {settings['steps']} steps, batch {settings['batch_size']}, max length {settings['max_length']}, "
        f"AdamW (wd 0), {settings['warmup_steps']} warmup steps then linear decay, clip 1.0. "
        "Values are means over seeds, ± half the range." + (f" {note}" if note else ""),
        "",
        f"Zero-shot: target accuracy {zero['target_acc']:.3f}, answer NLL {zero['target_loss']:.3f}, "
        f"control perplexity {zero['control_ppl']:.3f}.",
        "",
        "| method | seeds | target acc | answer NLL | control ppl change | trainable params | optimizer state | "
        "peak RSS increase | step time | rel. to full FT | forgets less than LoRA at LoRA's accuracy or better? |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {','.join(map(str, r['seeds']))} | {r['target_acc'][0]:.3f} ± {r['target_acc'][1]:.3f} | "
            f"{r['target_nll'][0]:.3f} ± {r['target_nll'][1]:.3f} | "
            f"{r['control_change_pct'][0]:+.2f}% ± {r['control_change_pct'][1]:.2f} | "
            f"{r['trainable']:,} | {r['optimizer_mb']:.1f} MB | {r['peak_rss_increase_mb']:.0f} MB | "
            f"{r['step_time_s']:.2f} s | {r['step_time_rel']:.2f} | {r['vs_lora']} |"
        )
    lines += [
        "",
        "The last column compares ranges (mean ± half the range over seeds): 'forgets less' only when the "
        "method's whole control-perplexity range lies below LoRA's, 'lower accuracy' only when its whole accuracy "
        "range lies below LoRA's; overlapping ranges are called the same. Per seed (target acc / control change):",
    ]
    lines += [
        f"- {r['label']}: "
        + ", ".join(
            f"seed {s}: {a:.3f} / {c:+.2f}%"
            for s, a, c in zip(r["seeds"], r["per_seed_acc"], r["per_seed_control_pct"])
        )
        for r in rows
    ]
    sparse = [r for r in rows if r.get("selected")]
    if sparse:
        lines += [
            "",
            "Sparse fine-tuning rows: trainable = selected entries; optimizer state = compact state (int32 "
            "indices + two fp32 moments per selected entry) plus the module optimizer's state; the peak includes "
            "LT-SFT's dense phase. While only the selected entries train:",
        ]
        lines += [
            f"- {r['label']}: {r['selected']:,} entries, optimizer state {r['sparse_optimizer_mb']:.1f} MB"
            for r in sparse
        ]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n\n![accuracy vs forgetting](" + f"{name}.png)\n")
    (out / f"{name}.json").write_text(json.dumps({"zero_shot": zero, "rows": rows, "settings": settings}, indent=2))
    _plot(out / f"{name}.png", rows, zero)
    return out / f"{name}.md"


def _plot(path: Path, rows: list[dict[str, Any]], zero: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([0.0], [zero["target_acc"]], marker="x", color="gray", label="zero-shot")
    markers = "osD^vP*X<>"
    for i, r in enumerate(rows):
        ax.errorbar(
            r["control_change_pct"][0],
            r["target_acc"][0],
            xerr=r["control_change_pct"][1],
            yerr=r["target_acc"][1],
            fmt=markers[i % len(markers)],
            capsize=3,
            label=r["label"],
            alpha=0.85,
        )
    ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("control (HumanEval) perplexity change vs zero-shot, % (forgetting →)")
    ax.set_ylabel("held-out target accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="methods", help="results file name under benchmarks/results/")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help=f"few minutes: {QUICK}, one seed")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets cpu_count // jobs threads)")
    parser.add_argument("--note", default="", help="what else shared the machine, written into the report")
    parser.add_argument(
        "--finished-only",
        action="store_true",
        help="run nothing: report the runs already in results/<name>.runs.jsonl (a partial table)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(json.loads(args.worker))))
        return
    settings = {**DEFAULTS, **(QUICK if args.quick else {})}
    if args.steps is not None:
        settings["steps"] = args.steps
    seeds = args.seeds[:1] if args.quick else args.seeds
    methods = ["full_ft"] + [m for m in args.methods if m != "full_ft"]  # full FT is the time baseline
    command = "python benchmarks/methods.py " + " ".join(sys.argv[1:])
    print(f"zero-shot ({settings})", flush=True)
    jobs = [("zero_shot", 0)] + [(m, s) for s in seeds for m in methods]  # seed-major: a stopped run has whole seeds
    results = _run_all(args.name, jobs, settings, args.jobs, args.finished_only)
    if not results or results[0]["method"] != "zero_shot":
        raise SystemExit(f"no zero-shot run in results/{args.name}.runs.jsonl yet: nothing to report.")
    zero, results = results[0]["after"], results[1:]
    if args.finished_only:
        args.name += "_partial"
        command += "  # partial: the runs finished so far"
    path = write_report(args.name, summarise(results, zero), zero, settings, command, args.note)
    print(path.read_text())


if __name__ == "__main__":
    main()
