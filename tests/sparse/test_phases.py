"""When SparseFineTuning's phases and selections happen: LT-SFT's sparse phase runs a fresh schedule of its own
length (also after a resume), LIFT re-selects on the official optimizer's steps and by default, and a matrix rule
skips the 1-D tensors (Qwen2's q/k/v biases) of its targets."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers import Crash, CrashAt, make_data, make_trainer
from helpers import one_thread  # noqa: F401  (autouse fixture: applies where imported)
from lightning_ft.callbacks import LotteryTicket, PrincipalWeights, SparseFineTuning
from lightning_ft.modules import CausalLMModule
from lightning_ft.sparse import SelectionContext

LR, WARMUP = 1e-2, 2


def _module(path: Path) -> CausalLMModule:
    return CausalLMModule(model=str(path), learning_rate=LR, warmup_steps=WARMUP, schedule="linear", output_dir="")


def _linear(step: int, total: int) -> float:
    """build_optimizer's linear schedule written out: warmup (s + 1) / W, then 1 - (s - W) / (T - W)."""
    return LR * ((step + 1) / WARMUP if step < WARMUP else 1 - (step - WARMUP) / (total - WARMUP))


class _Lrs(L.Callback):
    """The learning rate of every optimizer step, by global step."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.lrs[trainer.global_step] = optimizer.param_groups[0]["lr"]


def _lt_fit(path: Path, root: Path, reset: bool = True, crash: int | None = None, ckpt: str | None = None) -> _Lrs:
    L.seed_everything(0)
    lrs = _Lrs()
    sft = SparseFineTuning(LotteryTicket(dense_steps=4), density=0.05, reset_schedule=reset, save_path="")
    ckpt_every_step = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1)
    callbacks: list[L.Callback] = [sft, lrs, ckpt_every_step]
    callbacks += [CrashAt(crash)] if crash is not None else []
    trainer = make_trainer(root, 10, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(_module(path), make_data(), ckpt_path=ckpt)
    return lrs


def test_lottery_ticket_sparse_phase_runs_a_fresh_schedule_of_its_own_length(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    # 4 dense + 6 sparse steps, warmup 2, linear decay: the dense phase follows the 10-step schedule, the sparse phase
    # a fresh 6-step one (warmup again), so its last step runs at LR * 1/4, not the whole run's LR * 5/8
    lrs = _lt_fit(tiny_llama_dir, tmp_path / "full")
    expected = [_linear(s, 10) for s in range(4)] + [_linear(s, 6) for s in range(6)]
    assert [lrs.lrs[s] for s in range(10)] == pytest.approx(expected, rel=1e-12, abs=0)
    assert lrs.lrs[9] == pytest.approx(LR / 4, rel=1e-12)
    # resumed at step 6 (crash after step 7): the sparse phase's schedule again, not the whole run's
    with pytest.raises(Crash):
        _lt_fit(tiny_llama_dir, tmp_path / "crashed", crash=7)
    resumed = _lt_fit(tiny_llama_dir, tmp_path / "resumed", ckpt=str(tmp_path / "crashed" / "ckpt" / "last.ckpt"))
    assert sorted(resumed.lrs) == [6, 7, 8, 9]
    assert [resumed.lrs[s] for s in range(6, 10)] == pytest.approx(expected[6:], rel=1e-12, abs=0)


def test_lottery_ticket_without_reset_schedule_continues_the_whole_run_schedule(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    lrs = _lt_fit(tiny_llama_dir, tmp_path, reset=False)
    assert [lrs.lrs[s] for s in range(10)] == pytest.approx([_linear(s, 10) for s in range(10)], rel=1e-12, abs=0)


class _Moments(L.Callback):
    """Around each re-selection (placed before and after the sparse callback): the moments of each entry."""

    def __init__(self, sft: SparseFineTuning, store: dict[int, list[dict[str, dict[int, float]]]]) -> None:
        self.sft, self.store = sft, store

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        moments = {n: dict(zip(s.indices.tolist(), s.exp_avg.tolist())) for n, s in self.sft.states.items()}
        self.store.setdefault(trainer.global_step, []).append(moments)


def test_lift_reselects_after_the_official_steps_and_carries_kept_moments(tiny_llama_dir: Path, tmp_path: Path) -> None:
    assert PrincipalWeights().reselect_every == 200  # the official CLI's update_interval
    assert PrincipalWeights(reselect_every=None).reselect_every is None
    sft = SparseFineTuning(PrincipalWeights(filter_rank=4, reselect_every=3), rank=1, save_path="")
    chose_at: list[int] = []
    choose = sft.choose

    def counting(ctx: SelectionContext) -> dict[str, torch.Tensor]:
        assert ctx.trainer is not None
        chose_at.append(ctx.trainer.global_step)
        return choose(ctx)

    sft.choose = counting  # type: ignore[method-assign]
    seen: dict[int, list[dict[str, dict[int, float]]]] = {}
    callbacks = [_Moments(sft, seen), sft, _Moments(sft, seen)]
    make_trainer(tmp_path, 8, callbacks=callbacks).fit(_module(tiny_llama_dir), make_data())
    # SparseAdamW: after step s (counted after the increment) when (s + 1) % 3 == 0; the fit ends after step 8,
    # so the re-selection due then would train nothing and is skipped
    assert chose_at == [0, 2, 5]
    assert [e["step"] for e in sft.events if e["event"] == "select"] == [0, 2, 5]
    for step in (2, 5):
        before, after = seen[step]
        for name in after:
            kept = after[name].keys() & before[name].keys()
            assert kept and kept != after[name].keys(), name  # the mask changed, partly
            assert all(after[name][i] == before[name][i] for i in kept), name
            assert all(after[name][i] == 0.0 for i in after[name].keys() - kept), name


def _tiny_qwen2(root: Path, tokenizer_dir: Path) -> Path:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    for name, param in model.named_parameters():  # non-zero biases, so that a frozen one is a real check
        if name.endswith("bias"):
            torch.nn.init.normal_(param, std=0.1)
    path = root / "tiny-qwen2"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


class _Lines(logging.Handler):
    """Every message logged to one logger, once (whether or not that logger propagates to pytest's handlers)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_principal_weights_skip_qwen2_qkv_biases_with_one_line(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    path = _tiny_qwen2(tmp_path, tiny_tokenizer_dir)
    module = CausalLMModule(model=str(path), learning_rate=LR, warmup_steps=0, output_dir="")
    before = {n: p.detach().clone() for n, p in module.backbone.named_parameters()}
    sft = SparseFineTuning(PrincipalWeights(filter_rank=4, reselect_every=None), rank=1, save_path="")
    log, handler = logging.getLogger("lightning.pytorch.utilities.rank_zero"), _Lines()
    log.addHandler(handler)
    try:
        make_trainer(tmp_path, 3, callbacks=[sft]).fit(module, make_data())
    finally:
        log.removeHandler(handler)
    assert [line for line in handler.lines if "1-D tensors" in line] == [
        "SparseFineTuning: PrincipalWeights scores matrices, so it skips 6 1-D tensors of `targets` (e.g. "
        "model.layers.0.self_attn.q_proj.bias); they stay frozen unless `dense` names them."
    ]
    biases = [n for n in before if n.endswith("bias")]
    assert len(biases) == 6 and not any(n in sft._params for n in biases)
    assert len(sft._params) == 14 and all(p.ndim == 2 for p in sft._params.values())  # 2 blocks x 7 matrices
    live = dict(module.backbone.named_parameters())
    assert all(torch.equal(live[n], before[n]) for n in biases)
    assert all(not torch.equal(live[n], before[n]) for n in sft._params)
