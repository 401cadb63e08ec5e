"""CausalLMModule plumbing on tiny random models: loss, logits_to_keep, save/reload, LoRA, quantization,
resume equality and one-sentence errors."""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_ft.data import InstructionDataModule
from lightning_ft.data.collate import IGNORE_INDEX
from lightning_ft.modules import CausalLMModule
from helpers import Crash, CrashAt, make_trainer
from lightning_ft.modules.metrics import option_logprobs, token_nll, weighted_lm_loss


def _data(**kwargs: Any) -> InstructionDataModule:
    opts: dict[str, Any] = dict(label_options=["positive", "negative"], train_size=64, val_size=16, test_size=0,
                                control_size=8, batch_size=4, max_length=48)
    opts.update(kwargs)
    return InstructionDataModule(**opts)


def _batch(module: CausalLMModule, n: int = 4) -> dict[str, Any]:
    dm = _data()
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_loss_is_response_token_cross_entropy(tiny_llama_dir: Path) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    batch = _batch(module)
    logits = module(batch["input_ids"], batch["attention_mask"]).logits
    labels = batch["labels"]
    # hand computation over the labelled positions only
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] != IGNORE_INDEX:
                total += -torch.log_softmax(logits[b, t - 1].double(), -1)[labels[b, t]].item()
                count += 1
    assert module.compute_loss(batch).item() == pytest.approx(total / count, rel=1e-5)
    assert module._keeps_logits  # Llama supports logits_to_keep: only labelled positions hit the head


def test_weighted_loss_matches_hand_computation() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    targets = torch.tensor([[1, IGNORE_INDEX, 3], [4, 5, IGNORE_INDEX]])
    weights = torch.tensor([[2.0, 9.0, 1.0], [0.5, 0.0, 3.0]])
    ce = -torch.log_softmax(logits, -1)
    terms = [(2.0, ce[0, 0, 1]), (1.0, ce[0, 2, 3]), (0.5, ce[1, 0, 4]), (0.0, ce[1, 1, 5])]
    expected = sum(w * c for w, c in terms) / sum(w for w, _ in terms)
    assert weighted_lm_loss(logits, targets, weights).item() == pytest.approx(expected.item(), rel=1e-6)
    per_token = sum(w * c for w, c in terms) / 4
    assert weighted_lm_loss(logits, targets, weights, "tokens").item() == pytest.approx(per_token.item(), rel=1e-6)
    ones = weighted_lm_loss(logits, targets, torch.ones_like(weights))
    assert ones.item() == pytest.approx(weighted_lm_loss(logits, targets).item(), rel=1e-6)


def test_single_token_fast_path_equals_candidate_scoring(tiny_llama_dir: Path) -> None:
    from lightning_ft.data.collate import ChoiceCollator

    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="").eval()
    tok = module.tokenizer
    options = [tok(" positive", add_special_tokens=False)["input_ids"][:1], tok(" negative", add_special_tokens=False)["input_ids"][:1]]
    items = [{"prompt_ids": tok(p)["input_ids"], "label_index": i % 2} for i, p in enumerate(["Review: a\nSentiment:", "Review: long one here\nSentiment:"])]
    fast = ChoiceCollator(tok.pad_token_id, options)(items)
    slow_collate = ChoiceCollator(tok.pad_token_id, options)
    slow_collate.single_token = False
    slow = slow_collate(items)
    with torch.no_grad():
        a = option_logprobs(module(fast["input_ids"], fast["attention_mask"]).logits, fast)
        b = option_logprobs(module(slow["input_ids"], slow["attention_mask"]).logits, slow)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_fit_trains_saves_and_reloads_identically(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(fixture)
    module = CausalLMModule(model=str(path), learning_rate=1e-2, warmup_steps=0, output_dir=str(tmp_path / "out"))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    make_trainer(tmp_path, 4).fit(module, _data())
    assert any(not torch.equal(before[n], p) for n, p in module.named_parameters())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([[3, 17, 42, 99, 7]])
    module.eval()
    torch.testing.assert_close(reloaded(ids).logits, module(ids).logits, rtol=0, atol=0)


def test_lora_trains_only_adapters_and_saves_a_peft_folder(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    from peft import AutoPeftModelForCausalLM

    module = CausalLMModule(
        model=str(tiny_gpt2_dir), peft={"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": True},
        learning_rate=1e-2, warmup_steps=0, output_dir=str(tmp_path / "out"), merge_adapter=True,
    )
    base = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    make_trainer(tmp_path, 3).fit(module, _data())
    assert all(torch.equal(base[n], p) for n, p in module.named_parameters() if n in base)
    assert (tmp_path / "out" / "adapter_config.json").is_file() and (tmp_path / "out" / "merged" / "config.json").is_file()
    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([[3, 17, 42, 99, 7]])
    module.eval()
    torch.testing.assert_close(reloaded(ids).logits, module(ids).logits, rtol=1e-5, atol=1e-6)


def test_nf4_backbone_with_lora_trains_on_cpu(tiny_llama_dir: Path, tmp_path: Path) -> None:
    module = CausalLMModule(
        model=str(tiny_llama_dir), quantization="nf4", peft={"r": 4, "target_modules": ["q_proj", "v_proj"]},
        learning_rate=1e-2, warmup_steps=0, output_dir="",
    )
    assert any(type(m).__name__ == "Linear4bit" for m in module.modules())
    lora = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    make_trainer(tmp_path, 3).fit(module, _data())
    assert any(not torch.equal(lora[n], p) for n, p in module.named_parameters() if n in lora)


def test_nf4_adapters_keep_their_gradients_after_an_evaluation_pass(tiny_llama_dir: Path) -> None:
    """bitsandbytes repacks a 4-bit weight for its CPU inference kernel on the first eval-mode forward without grad,
    after which no gradient flows through the layer: the loader keeps the training kernel (keep_4bit_trainable)."""
    module = CausalLMModule(model=str(tiny_llama_dir), quantization="nf4", output_dir="",
                            peft={"r": 2, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False})  # fmt: skip
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    module.backbone.eval()
    with torch.no_grad():  # a validation step
        module.backbone(input_ids=ids, labels=ids)
    module.backbone.train()
    module.backbone(input_ids=ids, labels=ids).loss.backward()
    adapters = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    assert len(adapters) == 2 * 2 * 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in adapters)


def test_quantization_errors_are_one_sentence(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"quantization='nf4' freezes the backbone .* also set peft"):
        CausalLMModule(model=str(tiny_llama_dir), quantization="nf4")
    real_import = builtins.__import__

    def no_bnb(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ImportError, match=r"quantization='nf4' needs bitsandbytes>=0\.47 .*pip install"):
        CausalLMModule(model=str(tiny_llama_dir), quantization="nf4", peft={"r": 4})


def test_unknown_model_is_one_sentence() -> None:
    with pytest.raises(ValueError, match="neither a bundled alias"):
        CausalLMModule(model="someone/unknown-model")


@pytest.mark.parametrize("crash", [13, 11], ids=["mid-epoch", "epoch-end"])
def test_resumed_run_equals_uninterrupted(tiny_llama_dir: Path, tmp_path: Path, crash: int) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(root: Path, ckpt: str | None = None, crash: int | None = None) -> CausalLMModule:
        L.seed_everything(0)
        module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=5e-3, warmup_steps=2, output_dir="")
        callbacks: list[L.Callback] = [ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1)]
        if crash is not None:
            callbacks.append(CrashAt(crash))
        trainer = make_trainer(root, 20, enable_checkpointing=True, callbacks=callbacks)
        trainer.fit(module, _data(train_size=40, batch_size=4), ckpt_path=ckpt)  # 10 batches/epoch: crosses an epoch
        return module

    full = run(tmp_path / "a")
    with pytest.raises(Crash):
        run(tmp_path / "b", crash=crash)  # last.ckpt is written one step before the crash (checkpointing runs last)
    resumed = run(tmp_path / "c", ckpt=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_predict_generates_text(tiny_llama_dir: Path, tmp_path: Path) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), max_new_tokens=4, output_dir="")
    out = make_trainer(tmp_path, 1, limit_predict_batches=1).predict(module, _data(eval_batch_size=3))
    assert len(out[0]) == 3 and all(isinstance(r["completion"], str) and r["prompt"] for r in out[0])


def test_token_nll_shift() -> None:
    logits = torch.zeros(1, 3, 5)
    logits[0, 0, 2] = 10.0
    labels = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX]])
    nll = token_nll(logits, labels)
    assert nll.shape == (1, 2) and nll[0, 0] < 1e-3 and nll[0, 1] == 0


def test_export_path_is_explicit_disabled_or_under_the_trainer_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_ft.modules.backbone import export_path

    trainer = L.Trainer(default_root_dir=str(tmp_path / "root"), logger=False, accelerator="cpu")
    assert export_path("", trainer, "hf_model") is None
    assert export_path(str(tmp_path / "x"), trainer, "hf_model") == tmp_path / "x"
    assert export_path(None, trainer, "copilot") == tmp_path / "root" / "copilot"
    monkeypatch.chdir(tmp_path)
    assert export_path(None, None, "aux_heads.safetensors") == tmp_path / "aux_heads.safetensors"


def test_atomic_dir_replaces_only_a_completed_folder(tmp_path: Path) -> None:
    from lightning_ft.modules.backbone import atomic_dir

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]


def test_a_checkpoint_of_another_module_or_shape_is_refused_in_one_sentence(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_ft.errors import UserError

    module = CausalLMModule(model=str(tiny_llama_dir), warmup_steps=0, output_dir="")
    trainer = make_trainer(tmp_path, 1, enable_checkpointing=True,
                           callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])  # fmt: skip
    trainer.fit(module, _data(train_size=4))
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["lightning_ft"] == {"module": "lightning_ft.modules.causal_lm.CausalLMModule"}

    checkpoint["lightning_ft"] = {"module": "lightning_ft.modules.classification.SequenceClassificationModule"}
    torch.save(checkpoint, tmp_path / "classifier.ckpt")
    fresh = CausalLMModule(model=str(tiny_llama_dir), warmup_steps=0, output_dir="")
    with pytest.raises(UserError) as err:  # Lightning calls on_load_checkpoint before it loads any weight
        make_trainer(tmp_path, 2).fit(fresh, _data(train_size=4), ckpt_path=str(tmp_path / "classifier.ckpt"))
    assert str(err.value) == (
        "the checkpoint was written by SequenceClassificationModule, but it is being loaded into CausalLMModule: "
        "load it into a SequenceClassificationModule, or pass a checkpoint of a CausalLMModule run."
    )

    checkpoint["lightning_ft"] = {"module": "lightning_ft.modules.causal_lm.CausalLMModule"}
    key = "backbone.model.embed_tokens.weight"
    checkpoint["state_dict"][key] = checkpoint["state_dict"][key][:, :16]
    with pytest.raises(UserError, match=rf"^the checkpoint's {key} has shape \[320, 16\] but this module's has "
                                        r"\[320, 32\] \(the checkpoint was trained with model='.*tiny-llama', this "):
        fresh.on_load_checkpoint(checkpoint)
