"""Where a Pilot + Copilot training step's time goes, op by op, against the Pilot alone (torch.profiler, CPU).

Fits the bundled SmolLM2-135M alone (``CausalLMModule``) and with a 4-layer tied-head Copilot for 5 steps each,
profiles steps 3-5 of each, and prints the per-step self CPU time of both and the ops whose time grew most::

    python benchmarks/copilot_profile.py

One thread, so that the op times add up to the step. Used to check that a joint step does no work beyond the
Copilot's own (its forward/backward and its AdamW ops).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.profiler import ProfilerActivity, profile


class _Profile(L.Callback):
    """Profiles the training steps after global step 2 up to step 5."""

    def __init__(self) -> None:
        self.prof: Any = None
        self.averages: Any = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == 2:
            self.prof = profile(activities=[ProfilerActivity.CPU])
            self.prof.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == 5 and self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.averages, self.prof = self.prof.key_averages(), None


def _per_step_ops(module: Any) -> dict[str, float]:
    """Seconds of self CPU time per step, by op, over steps 3-5 of a 5-step fit."""
    from lightning_ft.data import InstructionDataModule

    dm = InstructionDataModule(label_options=["positive", "negative"], batch_size=8, max_length=96, val_size=16,
                               test_size=16)  # fmt: skip
    dm.tokenizer = module.tokenizer
    callback = _Profile()
    L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0,
              callbacks=[callback]).fit(module, dm)  # fmt: skip
    return {e.key: e.self_cpu_time_total / 1e6 / 3 for e in callback.averages}


def main() -> None:
    from lightning_ft.copilot import CopilotCausalLM
    from lightning_ft.modules import CausalLMModule

    torch.set_num_threads(1)
    common: dict[str, Any] = {"model": "smollm2-135m", "output_dir": "", "learning_rate": 2e-4, "warmup_steps": 1}
    alone = _per_step_ops(CausalLMModule(**common))
    joint = _per_step_ops(CopilotCausalLM(**common, copilot_layers=4, copilot_lambda=1.0, copilot_output="",
                                          copilot_head="tied"))  # fmt: skip
    print(
        f"self CPU seconds per step: Pilot alone {sum(alone.values()):.3f}, Pilot + Copilot {sum(joint.values()):.3f}"
    )
    grown = sorted(((joint.get(k, 0.0) - alone.get(k, 0.0), k) for k in set(alone) | set(joint)), reverse=True)
    for delta, key in grown[:18]:
        print(f"{delta:+.3f} s  {key:50s} {alone.get(key, 0.0):.3f} -> {joint.get(key, 0.0):.3f}")


if __name__ == "__main__":
    main()
