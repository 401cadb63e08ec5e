"""LiNeS callback: exact edit on tiny models (full FT, tied weights, LoRA, a user's own module), the alpha
sweep, no second edit after a resume, the auto sweep under 2-process DDP, refusals, and the real effect on the bundled
SmolLM2. Resume equality, the declared refusals and DDP against one process are in tests/conformance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from lightning_ft.callbacks.lines import LiNeS
from lightning_ft.data import InstructionDataModule
from lightning_ft.merging.ops import lines_factor
from lightning_ft.modules import CausalLMModule
from helpers import UserModule, make_trainer


def _data(**kwargs: Any) -> InstructionDataModule:
    opts: dict[str, Any] = dict(label_options=["positive", "negative"], train_size=40, val_size=8, test_size=0,
                                control_size=4, batch_size=4, max_length=48)  # fmt: skip
    opts.update(kwargs)
    return InstructionDataModule(**opts)


class _Record(L.Callback):
    """Placed before LiNeS: keeps the fine-tuned weights as they are just before the edit."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.theta = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def _pretrained(path: Path) -> dict[str, torch.Tensor]:
    return {f"backbone.{k}": v for k, v in load_file(path / "model.safetensors").items()}


def test_fixed_alpha_edits_every_block_and_tied_weights_once(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = CausalLMModule(
        model=str(tiny_llama_dir), learning_rate=1e-2, warmup_steps=0, output_dir=str(tmp_path / "hf")
    )
    record, lines = _Record(), LiNeS(alpha=0.3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    make_trainer(tmp_path, 3, enable_checkpointing=True, callbacks=[record, lines, ckpt]).fit(module, _data())
    theta0 = _pretrained(tiny_llama_dir)
    for name, param in module.named_parameters():
        block = next((int(p) for p in name.split(".") if p.isdigit()), None)
        factor = lines_factor(block, 2, 0.3, 0.7)
        expected = theta0[name] + factor * (record.theta[name] - theta0[name])
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-7, msg=name)
    embed = module.backbone.get_input_embeddings().weight  # tied with lm_head: scaled once, by alpha
    assert embed is module.backbone.get_output_embeddings().weight
    key = "backbone.model.embed_tokens.weight"
    torch.testing.assert_close(embed, theta0[key] + 0.3 * (record.theta[key] - theta0[key]), rtol=0, atol=1e-7)
    assert not torch.equal(embed, record.theta[key])
    saved = load_file(tmp_path / "hf" / "model.safetensors")  # the HF folder holds the edited weights
    assert torch.equal(saved["model.layers.0.mlp.up_proj.weight"], module.backbone.model.layers[0].mlp.up_proj.weight)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)  # and so does last.ckpt
    assert torch.equal(last["state_dict"][key], embed.detach())
    assert last["callbacks"][lines.state_key]["chosen_alpha"] == 0.3


def test_auto_sweeps_alpha_logs_the_table_and_applies_the_best(tiny_llama_dir: Path, tmp_path: Path) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=1e-2, warmup_steps=0, output_dir="")
    lines = LiNeS(alpha="auto", alphas=[1.0, 0.5, 0.0])
    make_trainer(tmp_path, 3, callbacks=[lines]).fit(module, _data())
    sweep = json.loads((tmp_path / "lines_sweep.json").read_text())
    rows = sweep["rows"]
    assert [r["alpha"] for r in rows] == [1.0, 0.5, 0.0] and rows[0]["target_norm"] == pytest.approx(1.0)
    best = max(rows, key=lambda r: r["score"])
    assert lines.chosen_alpha == best["alpha"] == sweep["chosen_alpha"]
    for r in rows:
        assert r["score"] == pytest.approx(2.0 * r["target_norm"] + r["control_norm"])
    assert (tmp_path / "lines_sweep.png").is_file() and "chosen alpha" in (tmp_path / "lines_sweep.md").read_text()
    assert module.evaluate(_eval_loaders(module)) == pytest.approx(
        {k: v for k, v in best.items() if k in ("target_acc", "target_loss", "control_ppl", "control_loss")}, rel=1e-5
    )


def _eval_loaders(module: CausalLMModule) -> list[Any]:
    dm = _data()
    dm.tokenizer = module.tokenizer
    dm.setup("validate")
    return list(dm.val_dataloader())


def test_a_run_resumed_after_the_edit_is_not_edited_twice(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(root: Path, ckpt: str | None = None) -> CausalLMModule:
        L.seed_everything(0)
        module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=5e-3, warmup_steps=0, output_dir="")
        callbacks: list[L.Callback] = [
            LiNeS(alpha=0.2),
            ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1),
        ]
        make_trainer(root, 6, enable_checkpointing=True, callbacks=callbacks).fit(module, _data(), ckpt_path=ckpt)
        return module

    full = run(tmp_path / "a")
    again = run(tmp_path / "d", ckpt=str(tmp_path / "a" / "last.ckpt"))  # saved after the edit: not edited twice
    for (n, p), r in zip(full.named_parameters(), again.parameters()):
        torch.testing.assert_close(p, r, rtol=0, atol=0, msg=n)


def test_lora_scales_each_layers_low_rank_update(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    peft = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"]}
    module = CausalLMModule(model=str(tiny_gpt2_dir), peft=peft, learning_rate=1e-2, warmup_steps=0, output_dir="")
    record, lines = _Record(), LiNeS(alpha=0.25)
    make_trainer(tmp_path, 3, callbacks=[record, lines]).fit(module, _data())
    moved = 0
    for name, param in module.named_parameters():
        if "lora_B" in name:
            block = int(name.split(".h.")[1].split(".")[0])
            torch.testing.assert_close(param.detach(), lines_factor(block, 2, 0.25, 0.75) * record.theta[name],
                                       rtol=0, atol=1e-7)  # fmt: skip
            moved += int(block == 0)
        else:  # lora_A and the frozen base are left alone
            assert torch.equal(param.detach(), record.theta[name]), name
    assert moved == 2


def test_user_module_alpha_zero_returns_to_theta0_and_refusals(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    module = UserModule(str(tiny_llama_dir), optimizer="sgd")  # a user's own module: no evaluate()
    ids = AutoTokenizer.from_pretrained(tiny_llama_dir)(["good film"] * 4, return_tensors="pt")["input_ids"]
    loader = torch.utils.data.DataLoader([{"input_ids": row} for row in ids], batch_size=2)
    make_trainer(tmp_path, 2, callbacks=[LiNeS(alpha=0.0, beta=0.0)]).fit(module, loader)
    theta0 = load_file(tiny_llama_dir / "model.safetensors")
    assert all(torch.equal(p.detach(), theta0[n.removeprefix("nets.lm.")]) for n, p in module.named_parameters()
               if n.removeprefix("nets.lm.") in theta0)  # fmt: skip
    with pytest.raises(ValueError, match="lacks: give a fixed alpha") as err:
        make_trainer(tmp_path, 1, callbacks=[LiNeS(alpha="auto")]).fit(UserModule(str(tiny_llama_dir)), loader)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"must be a number in \[0, 1\] or 'auto'"):
        LiNeS(alpha="best")  # type: ignore[arg-type]


class _CheckSameOnRanks(L.Callback):
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = pl_module.all_gather(flat)
        assert torch.equal(gathered[0], gathered[1]), "LiNeS edited the ranks differently"
        theta0 = _pretrained(Path(pl_module.hparams.model))
        embed = "backbone.model.embed_tokens.weight"
        assert not torch.equal(pl_module.get_parameter(embed).detach(), theta0[embed])


@pytest.mark.ddp
def test_two_process_ddp_edits_identically(tiny_llama_dir: Path, tmp_path: Path) -> None:
    module = CausalLMModule(
        model=str(tiny_llama_dir), learning_rate=1e-2, warmup_steps=0, output_dir=str(tmp_path / "hf")
    )
    trainer = make_trainer(tmp_path, 2, devices=2, strategy="ddp_spawn",
                       callbacks=[LiNeS(alpha="auto", alphas=[1.0, 0.0]), _CheckSameOnRanks()])  # fmt: skip
    trainer.fit(module, _data())
    assert json.loads((tmp_path / "lines_sweep.json").read_text())["chosen_alpha"] in (1.0, 0.0)
    assert (tmp_path / "hf" / "model.safetensors").is_file()


class _Measure(L.Callback):
    """Zero-shot metrics at train start, fine-tuned metrics just before LiNeS edits (placed before it)."""

    def __init__(self, loaders: list[Any]) -> None:
        self.loaders = loaders

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.zero = pl_module.evaluate(self.loaders)  # type: ignore[operator]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ft = pl_module.evaluate(self.loaders)  # type: ignore[operator]


@pytest.mark.slow
def test_lines_lowers_the_control_perplexity_increase_on_smollm2(smollm2_dir: Path, tmp_path: Path) -> None:
    L.seed_everything(0)
    module = CausalLMModule(model=str(smollm2_dir), learning_rate=3e-4, warmup_steps=2, output_dir="")
    dm = _data(train_size=128, val_size=32, control_size=16, batch_size=4, max_length=64, control_max_length=96)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    measure = _Measure(list(dm.val_dataloader()))
    make_trainer(tmp_path, 14, callbacks=[measure, LiNeS(alpha=0.2)]).fit(module, dm)  # lr 3e-4 over-drives full FT
    after = module.evaluate(measure.loaders)
    rise_ft = measure.ft["control_ppl"] - measure.zero["control_ppl"]
    rise_lines = after["control_ppl"] - measure.zero["control_ppl"]
    print(f"control ppl: zero-shot {measure.zero['control_ppl']:.3f}, FT {measure.ft['control_ppl']:.3f}, "
          f"FT+LiNeS {after['control_ppl']:.3f}; target acc {measure.zero['target_acc']:.3f} -> "
          f"{measure.ft['target_acc']:.3f} -> {after['target_acc']:.3f}")  # fmt: skip
    assert rise_ft > 0, "the over-driven fine-tune should forget"
    assert rise_lines < 0.7 * rise_ft
    assert after["target_acc"] >= measure.ft["target_acc"] - 0.1
