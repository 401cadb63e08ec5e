"""MonitorCallback, the public base of every monitor: a user's own monitor gets the schedule (baseline, every n-th
validation, fit end, once per step), eval mode during the measurement, the prefixed metrics, the JSON and the history
across a resume from it, and a subclass without ``measure`` is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import pytest
from helpers import Recorder, make_data, make_trainer

from lightning_ft.core.support import MethodSupport
from lightning_ft.modules import CausalLMModule
from lightning_ft.monitors import MonitorCallback
from lightning_ft.monitors.base import RANK_ZERO_SHARDED


class WeightNorm(MonitorCallback):
    """A user's monitor: the norm of every parameter together, and whether the model was in eval mode."""

    support: ClassVar[MethodSupport] = MethodSupport(frozenset({"ddp", "lora", "mixed", "quantized"}), {"fsdp2": RANK_ZERO_SHARDED})
    prefix: ClassVar[str] = "norm"

    def __init__(self, every_n_validations: int = 1) -> None:
        super().__init__(every_n_validations, baseline=True, filename="norm", module=None)

    def measure(self) -> dict[str, Any]:
        assert self._model is not None
        squares = sum(float(p.detach().float().pow(2).sum()) for p in self._model.parameters())
        return {"total": squares**0.5, "eval_mode": float(not self._model.training)}

    def settings(self) -> dict[str, Any]:
        return {"what": "the parameters' joint L2 norm"}


def _run(model_dir: Path, root: Path, steps: int, every: int, ckpt: str | None = None) -> tuple[WeightNorm, Recorder]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    module = CausalLMModule(model=str(model_dir), learning_rate=5e-2, warmup_steps=0, output_dir="")
    monitor, recorder = WeightNorm(every), Recorder()
    trainer = make_trainer(root, steps, val_check_interval=2, limit_val_batches=1, enable_checkpointing=True,
                           logger=[recorder], callbacks=[monitor, ModelCheckpoint(dirpath=root / "ckpt", save_last=True)])  # fmt: skip
    trainer.fit(module, make_data(), ckpt_path=ckpt)
    return monitor, recorder


def test_a_user_monitor_gets_the_schedule_metrics_json_and_resume(tiny_llama_dir: Path, tmp_path: Path) -> None:
    first, recorder = _run(tiny_llama_dir, tmp_path, steps=6, every=2)
    # baseline at 0, every 2nd validation (validations at 2, 4, 6 -> the one at 4), fit end at 6; never twice a step
    assert [h["step"] for h in first.history] == [0, 4, 6]
    assert all(h["eval_mode"] == 1.0 for h in first.history)  # measured in eval mode ...
    assert len({h["total"] for h in first.history}) == 3  # ... of the model as it was then (training moves it)
    logged = [(step, m["norm/total"]) for step, m in recorder.metrics if "norm/total" in m]
    assert logged == [(h["step"], h["total"]) for h in first.history]
    written = json.loads((tmp_path / "norm.json").read_text())
    assert written == {"what": "the parameters' joint L2 norm", "history": first.history}
    resumed, _ = _run(tiny_llama_dir, tmp_path, steps=10, every=2, ckpt=str(tmp_path / "ckpt" / "last.ckpt"))
    # last.ckpt was written at step 6's validation, before fit end measured step 6: the history up to the checkpoint
    # is kept (no second baseline), and the validation count carries on (the 4th validation, at 8, is measured)
    assert resumed.history[:2] == first.history[:2]
    assert [h["step"] for h in resumed.history] == [0, 4, 8, 10]


def test_a_monitor_without_measure_is_refused() -> None:
    class Incomplete(MonitorCallback):
        pass

    with pytest.raises(TypeError, match="measure"):
        Incomplete(1, False, None, None)
    with pytest.raises(ValueError, match=r"every_n_validations=-1 must be 0"):
        WeightNorm(every_n_validations=-1)
