"""CopilotMixin on a tiny random Llama: the recorded round, the Pilot's unchanged trajectory, lambda = 0 and a
zero output reproducing the Pilot, fused decoding matching a full recomputation (greedy and beam), resume, LoRA,
lambda auto, export/reload and the refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import make_data, make_trainer

from lightning_ft.copilot import CopilotCausalLM, CopilotLogitsProcessor, CopilotMixin, PilotCapture, fuse_log_probs
from lightning_ft.modules import CausalLMModule


def _module(path: Path, **kwargs: Any) -> CopilotCausalLM:
    opts: dict[str, Any] = dict(model=str(path), copilot_layers=2, learning_rate=1e-3, warmup_steps=0, output_dir="",
                                copilot_output="", zero_init_output=False)  # fmt: skip
    opts.update(kwargs)
    return CopilotCausalLM(**opts)


def _chat(**kwargs: Any) -> Any:
    opts: dict[str, Any] = dict(dataset="chitchat", prompt_template="{prompt}\n", response_template="{response}",
                                label_options=None, train_size=16, val_size=4)  # fmt: skip
    opts.update(kwargs)
    return make_data(**opts)


def _batch(dm: Any, split: str = "train") -> dict[str, Any]:
    dm.setup("fit")
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    loader = loader[0] if isinstance(loader, list) else loader
    return next(iter(loader))


def _logged_round(module: CopilotCausalLM) -> Any:
    """The round the module logs for one Chit-Chat training batch (max length 64)."""
    dm = _chat(max_length=64)
    dm.tokenizer = module.tokenizer
    batch = _batch(dm)
    module._round_store = {}
    with torch.no_grad(), PilotCapture(module.backbone) as capture:
        module.compute_loss(batch)
    entry = module._record_round(batch, capture)
    module._round_store = None
    return entry


def test_round_holds_the_exact_error_embeddings_and_pooled_states(tiny_llama_dir: Path) -> None:
    module = _module(tiny_llama_dir)
    dm = _chat()
    dm.tokenizer = module.tokenizer
    batch = _batch(dm)
    module._round_store = {}
    with PilotCapture(module.backbone) as capture:
        module.compute_loss(batch)
    entry = module._record_round(batch, capture)
    module._round_store = None
    with torch.no_grad():
        out = module.backbone(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    labels = batch["labels"]
    where = torch.zeros_like(labels, dtype=torch.bool)
    where[:, :-1] = labels[:, 1:] != -100
    assert torch.equal(entry.error_mask, where)
    logits = out.logits[where].float()
    targets = labels[:, 1:][where[:, :-1]]
    expected = torch.nn.functional.one_hot(targets, logits.shape[-1]).float() - torch.softmax(logits, -1)
    torch.testing.assert_close(entry.errors.float(), expected, rtol=1e-2, atol=4e-3)  # bf16 storage
    assert entry.errors.dtype == torch.bfloat16 and entry.errors.shape[0] == int(where.sum())
    torch.testing.assert_close(entry.embeds.float(), out.hidden_states[0], rtol=1e-2, atol=1e-2)
    layers = module.backbone.model.layers
    seen: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
        for layer in layers
    ]
    with torch.no_grad():
        module.backbone(batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    torch.testing.assert_close(entry.hidden.float(), torch.stack(seen).mean(0), rtol=1e-2, atol=1e-2)


def test_the_error_at_t_and_later_never_reaches_the_copilot_output_at_t(tiny_llama_dir: Path) -> None:
    """Teacher-forced training: changing the logged error (the label) of position t, or the Pilot's states after t,
    leaves the Copilot's outputs at positions <= t unchanged and changes later ones."""
    import dataclasses

    module = _module(tiny_llama_dir).eval()
    entry = _logged_round(module)
    where = entry.error_mask.nonzero()
    row_positions = where[where[:, 0] == 0][:, 1]
    assert row_positions.numel() >= 3
    t = int(row_positions[row_positions.numel() // 2])
    k = int(((where[:, 0] == 0) & (where[:, 1] == t)).nonzero()[0])
    with torch.no_grad():
        base, _ = module.copilot_outputs(entry)
        errors = entry.errors.clone()
        errors[k] = torch.roll(errors[k], 7)  # another label at t + 1
        changed, _ = module.copilot_outputs(dataclasses.replace(entry, errors=errors))
        states = entry.hidden.clone()
        states[0, t + 1 :] += 3.0
        later, _ = module.copilot_outputs(dataclasses.replace(entry, hidden=states))
    upto = (where[:, 0] == 0) & (where[:, 1] <= t)
    after = (where[:, 0] == 0) & (where[:, 1] > t)
    for out in (changed, later):
        torch.testing.assert_close(out[upto], base[upto], rtol=0, atol=1e-6)
        assert not torch.allclose(out[after], base[after])


@pytest.mark.parametrize(("storage", "loss"), [("dense", "rmse"), ("topk", "token_rmse")])
def test_the_tied_heads_loss_equals_the_dense_rmse_with_its_gradients(tiny_llama_dir: Path, storage: str, loss: str) -> None:
    """The tied head's loss, computed in the embedding space (no [N, vocab] rectification), equals the RMSE of the
    dense rectification against the logged errors, and so do the gradients of every Copilot parameter."""
    module = _module(tiny_llama_dir, copilot_head="tied", error_storage=storage, error_topk=16, copilot_loss=loss)
    with torch.no_grad():
        module.copilot.out_proj.weight.normal_(std=0.05)
    entry = _logged_round(module)
    params = [p for p in module.copilot.parameters() if p.requires_grad]
    fast = module.copilot_step_loss(entry)
    fast_grads = torch.autograd.grad(fast, params)
    out, target = module.copilot_outputs(entry)
    per_row = (out - target).pow(2).mean(-1)
    dense = per_row.add(1e-12).sqrt().mean() if loss == "token_rmse" else per_row.mean().add(1e-12).sqrt()
    dense_grads = torch.autograd.grad(dense, params)
    torch.testing.assert_close(fast, dense, rtol=1e-4, atol=1e-7)
    for a, b in zip(fast_grads, dense_grads):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-6)
    assert float(fast.detach()) > 0


def test_pilot_trajectory_is_bit_identical_with_and_without_the_copilot(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Manual optimisation with accumulation 2, norm clipping and weight decay steps the Pilot exactly as Lightning's
    automatic mode does without a Copilot; the Copilot trains meanwhile."""
    opts = dict(model=str(tiny_llama_dir), learning_rate=3e-3, weight_decay=0.1, warmup_steps=2, output_dir="")
    runs = {}
    for name in ("plain", "copilot"):
        L.seed_everything(0)
        module = CausalLMModule(**opts) if name == "plain" else _module(tiny_llama_dir, **opts)
        start = {n: p.detach().clone() for n, p in module.named_parameters() if n.startswith("copilot.")}
        trainer = make_trainer(tmp_path / name, 4, accumulate_grad_batches=2, gradient_clip_val=0.05)
        trainer.fit(module, make_data())
        assert trainer.global_step == 4
        runs[name] = module
    plain, joint = runs["plain"].backbone.state_dict(), runs["copilot"].backbone.state_dict()
    assert plain.keys() == joint.keys() and all(torch.equal(plain[k], joint[k]) for k in plain)
    moved = [
        n
        for n, p in runs["copilot"].copilot.named_parameters()
        if p.requires_grad and not torch.equal(p, start[f"copilot.{n}"])
    ]
    assert "lm_out.weight" in moved and len(moved) > 10


def test_lambda_zero_and_a_zero_output_reproduce_the_pilot(tiny_llama_dir: Path) -> None:
    pilot = CausalLMModule(model=str(tiny_llama_dir), output_dir="").eval()
    active = _module(tiny_llama_dir, copilot_lambda=0.0).eval()
    silent = _module(tiny_llama_dir, copilot_lambda=1.0, zero_init_output=True).eval()
    dm = make_data(val_size=8)
    dm.tokenizer = pilot.tokenizer
    dm.setup("fit")
    prompts = dm.predict_dataloader() if hasattr(dm, "predict_dataloader") else None
    batch = next(iter(prompts)) if prompts is not None else None
    assert batch is not None
    ref = pilot.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6)
    assert torch.equal(active.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6), ref)
    assert torch.equal(silent.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6), ref)
    assert torch.equal(silent.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6, num_beams=3),
                       pilot.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6, num_beams=3))  # fmt: skip
    loaders = [dm.val_dataloader()[0] if isinstance(dm.val_dataloader(), list) else dm.val_dataloader()]
    for module in (active, silent):
        metrics = module.evaluate(loaders)
        assert metrics["fused_target_acc"] == metrics["target_acc"]
        assert metrics["fused_target_loss"] == pytest.approx(metrics["target_loss"], abs=1e-5)
    chat = _chat()
    chat.tokenizer = pilot.tokenizer
    chat.setup("fit")
    metrics = silent.evaluate(
        [chat.val_dataloader()[0] if isinstance(chat.val_dataloader(), list) else chat.val_dataloader()]
    )
    assert metrics["fused_target_loss"] == pytest.approx(metrics["target_loss"], abs=1e-5)


class _Recorder(CopilotLogitsProcessor):
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = super().__call__(input_ids, scores)
        self.calls.append((input_ids.clone(), scores.clone(), out.clone()))
        return out

    def reset(self) -> None:
        super().reset()
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []


@pytest.mark.parametrize("beams", [1, 3])
def test_fused_decoding_equals_a_full_recomputation_each_step(tiny_llama_dir: Path, beams: int) -> None:
    """At every step of HF generate (greedy or beam, left-padded batch) the processor's fused scores equal those
    recomputed from scratch: a full Pilot forward over the hypothesis and a Copilot rollout feeding back its own
    outputs from the prompt's end on."""
    module = _module(tiny_llama_dir, copilot_lambda=0.7).eval()
    with torch.no_grad():
        module.copilot.lm_out.weight.mul_(30.0)  # a rectification large enough to change decisions
    dm = make_data(val_size=8, max_length=256)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    batch = next(iter(dm.predict_dataloader()))
    ids, mask = batch["input_ids"][:3], batch["attention_mask"][:3]
    ids, mask = ids[:, mask.sum(0) > 0], mask[:, mask.sum(0) > 0]
    assert not bool(mask.all())  # left padding present
    with _Recorder(module, None, mask) as rec:
        out = module.backbone.generate(input_ids=ids, attention_mask=mask, logits_processor=[rec], max_new_tokens=5,
                                       num_beams=beams, do_sample=False, pad_token_id=module.tokenizer.pad_token_id)  # fmt: skip
    assert len(rec.calls) == 5
    prompt = ids.shape[1]
    for seq, scores, fused in rec.calls:
        rows = seq.shape[0]
        full_mask = torch.cat((mask.repeat_interleave(rows // mask.shape[0], 0),
                               torch.ones(rows, seq.shape[1] - prompt, dtype=mask.dtype)), 1)  # fmt: skip
        with torch.no_grad(), PilotCapture(module.backbone, logits=True) as cap:
            module.backbone(input_ids=seq, attention_mask=full_mask)
        where = torch.zeros(seq.shape, dtype=torch.bool)
        where[:, prompt - 1 :] = True
        rect = module.copilot_rollout(cap.embeds, cap.hidden, full_mask.bool(), where).view(
            rows, -1, cap.logits.shape[-1]
        )
        expected = fuse_log_probs(cap.logits[:, -1], rect[:, -1], 0.7)
        finite = torch.isfinite(expected)
        assert torch.equal(finite, torch.isfinite(fused))
        torch.testing.assert_close(fused.exp(), expected.exp(), rtol=1e-3, atol=1e-5)  # log(p) amplifies p ~ 0
    assert out.shape[1] == prompt + 5
    plain = module.backbone.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=beams,
                                     do_sample=False, pad_token_id=module.tokenizer.pad_token_id)  # fmt: skip
    assert not torch.equal(out, plain)  # the fusion changed what was decoded


def test_lora_pilot_and_lora_copilot(tiny_llama_dir: Path, tmp_path: Path) -> None:
    module = _module(tiny_llama_dir, peft={"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
                     copilot_peft={"r": 2, "lora_alpha": 4})  # fmt: skip
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith("copilot.") for n in trainable)
    cp = [n for n in trainable if n.startswith("copilot.")]
    assert set(n for n in cp if "lora_" not in n) == {
        "copilot.input_proj.weight",
        "copilot.norm.weight",
        "copilot.lm_out.weight",
    }
    frozen = {n: p.detach().clone() for n, p in module.copilot.named_parameters() if not p.requires_grad}
    make_trainer(tmp_path, 3).fit(module, make_data())
    assert all(torch.equal(p, frozen[n]) for n, p in module.copilot.named_parameters() if n in frozen)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in module.copilot.named_parameters())


def test_auto_lambda_is_chosen_saved_and_reloaded(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """lambda='auto' picks the best fused accuracy of 0 and the paper's grid on the validation data at fit end, and the
    choice reaches the exported Copilot and the last checkpoint (written before the choice)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = _module(tiny_llama_dir, copilot_lambda="auto", copilot_output=str(tmp_path / "copilot"))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    make_trainer(tmp_path, 3, enable_checkpointing=True, callbacks=[checkpoints]).fit(module, make_data(val_size=8))
    rows = module.lambda_sweep
    assert [r["lambda"] for r in rows] == [0.0, 0.1, 0.3, 0.5, 0.8, 1.0]
    best = min(rows, key=lambda r: (-r["target_acc"], r["target_loss"], r["lambda"]))  # lambda 0 included
    assert module.copilot_lambda == best["lambda"]
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert (
        last["copilot"]["lambda"] == best["lambda"]
        and float(last["state_dict"]["copilot_lambda_value"]) == best["lambda"]
    )
    restored = _module(tiny_llama_dir)
    restored.load_state_dict(last["state_dict"])
    assert restored.copilot_lambda == best["lambda"]
    reloaded = _module(tiny_llama_dir, copilot_path=str(tmp_path / "copilot"))
    assert reloaded.copilot_lambda == module.copilot_lambda
    for (n, p), (_, q) in zip(module.copilot.state_dict().items(), reloaded.copilot.state_dict().items()):
        assert torch.equal(p, q), n


def test_refusals(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="copilot_lambda=-1"):
        _module(tiny_llama_dir, copilot_lambda=-1)
    with pytest.raises(ValueError, match="copilot_layers=3 is more than"):
        _module(tiny_llama_dir, copilot_layers=3)
    from types import SimpleNamespace

    fp16 = _module(tiny_llama_dir)
    fp16._trainer = SimpleNamespace(
        strategy=object(), precision="16-mixed", datamodule=None
    )  # CPU runs turn it to bf16
    with pytest.raises(ValueError, match="precision='16-mixed'.*bf16-mixed"):
        fp16.setup("fit")
    dm = make_data()
    with pytest.raises(ValueError, match="copilot_lambda='auto'.*DataModule"):
        dm.tokenizer = None
        module = _module(tiny_llama_dir, copilot_lambda="auto")
        dm_loader = make_data()
        dm_loader.tokenizer = module.tokenizer
        dm_loader.setup("fit")
        make_trainer(tmp_path, 1).fit(module, train_dataloaders=dm_loader.train_dataloader())

    class OneOptimizer(CopilotCausalLM):
        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="--optimizer"):
        make_trainer(tmp_path, 1).fit(
            OneOptimizer(model=str(tiny_llama_dir), copilot_layers=2, output_dir=""), make_data()
        )
    other = tmp_path / "bad"
    other.mkdir()
    (other / "copilot.json").write_text('{"config": {"vocab_size": 7, "hidden_size": 16, "pilot_hidden_size": 16}}')
    with pytest.raises(ValueError, match="same family"):
        _module(tiny_llama_dir, copilot_path=str(other))


def test_a_gpt2_pilot_is_refused_for_layer_copying_and_trains_with_a_random_copilot(
    tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    """GPT-2's fused Conv1D layers cannot seed a Llama-style Copilot: one sentence names the way out, which works."""
    with pytest.raises(ValueError, match="not a Llama/Mistral/Qwen2-style decoder layer.*copilot_init='random'"):
        _module(tiny_gpt2_dir)
    module = _module(tiny_gpt2_dir, copilot_init="random")
    before = {n: p.detach().clone() for n, p in module.copilot.named_parameters()}
    make_trainer(tmp_path, 2).fit(module, make_data(train_size=8))
    assert any(not torch.equal(before[n], p) for n, p in module.copilot.named_parameters())


def test_cli_fit_from_the_shipped_yaml(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/copilot.yaml (with the Trainer's gradient clipping) trains Pilot and Copilot from the CLI, writes the
    HF folder and the Copilot beside it, and predict decodes with the fusion."""
    from lightning_ft.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    common = ["--config", "configs/copilot.yaml", "--model.init_args.model", str(tiny_llama_dir),
              "--model.init_args.copilot_layers", "2", "--data.init_args.train_size", "16",
              "--data.init_args.val_size", "8", "--data.init_args.test_size", "8", "--data.init_args.batch_size", "4",
              "--data.init_args.control_size", "4", "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    main(["fit", *common, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--run_name", "fit",
          "--trainer.callbacks", "[]"])  # fmt: skip
    runs = [p for p in tmp_path.rglob("copilot.json")]
    assert len(runs) == 1 and (runs[0].parent.parent / "hf_model" / "config.json").is_file()


def test_composes_with_a_weight_selecting_callback_and_an_objective_mixin(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Half Fine-Tuning freezes half of the Pilot's tensors and Masked Thought reshapes its loss; the frozen half
    stays pretrained while the Copilot, which the callback does not see, trains."""
    from lightning_ft.callbacks import HalfFineTuning
    from lightning_ft.objectives import MaskedThoughtMixin

    class Composed(CopilotMixin, MaskedThoughtMixin, CausalLMModule):
        pass

    module = Composed(model=str(tiny_llama_dir), copilot_layers=2, learning_rate=1e-2, warmup_steps=0, output_dir="",
                      copilot_output="", zero_init_output=False, max_rate=0.3, warmup=0.0)  # fmt: skip
    pilot = {n: p.detach().clone() for n, p in module.backbone.named_parameters()}
    copilot = {n: p.detach().clone() for n, p in module.copilot.named_parameters() if p.requires_grad}
    make_trainer(tmp_path, 3, callbacks=[HalfFineTuning(seed=0)]).fit(module, _chat())
    changed = [n for n, p in module.backbone.named_parameters() if not torch.equal(p, pilot[n])]
    assert 0 < len(changed) < len(pilot)
    assert all(not torch.equal(p, copilot[n]) for n, p in module.copilot.named_parameters() if n in copilot)


def test_quantized_pilot_takes_its_copilot_layers_from_an_unquantized_model(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    qlora = dict(quantization="nf4", peft={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    with pytest.raises(ValueError, match="quantized Pilot weight .* set copilot_model"):
        _module(tiny_llama_dir, **qlora)
    module = _module(tiny_llama_dir, copilot_model=str(tiny_llama_dir), **qlora)
    start = module.copilot.lm_out.weight.detach().clone()
    make_trainer(tmp_path, 2).fit(module, make_data())
    assert not torch.equal(module.copilot.lm_out.weight, start)


def test_a_shared_head_readout_decodes_exactly_as_the_separate_product(tiny_llama_dir: Path) -> None:
    """A tied Copilot head whose readout matrix is the Pilot's own head weight rides along in the Pilot's head
    product when decoding greedily: the same tokens and scores as the separate product, and the product is shared."""
    from lightning_ft.copilot import CopilotLogitsProcessor
    from lightning_ft.core.anatomy import decoder_parts

    module = _module(tiny_llama_dir, copilot_head="tied").eval()
    head = decoder_parts(module.backbone, "test").head
    with torch.no_grad():
        module.copilot.embed.copy_(head.weight)  # as for a LoRA Pilot and a Copilot copied from the same model
        module.copilot.out_proj.weight.normal_(std=0.5)
    ids = torch.tensor([[5, 9, 3, 7, 2], [4, 4, 8, 1, 6]])
    outputs = {}
    for share in (False, True):
        with CopilotLogitsProcessor(module, lam=1.0, share_head=share) as fuse:
            assert fuse.shares_head is share
            outputs[share] = module.backbone.generate(ids, attention_mask=torch.ones_like(ids), logits_processor=[fuse],
                                                      max_new_tokens=6, do_sample=False, output_scores=True,
                                                      return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
    assert torch.equal(outputs[True].sequences, outputs[False].sequences)
    for a, b in zip(outputs[True].scores, outputs[False].scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        module.copilot.embed.add_(1.0)  # no longer the Pilot's head: the processor keeps the separate product
    with CopilotLogitsProcessor(module, lam=1.0, share_head=True) as fuse:
        assert not fuse.shares_head
    assert type(head).forward is head.forward.__func__  # the head's own forward is back


def test_a_second_fit_of_the_same_module_with_clipping_runs(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """setup turns automatic optimisation off after Lightning's checks; the next fit turns it back on before them, so
    a second fit (a later stage, another Trainer) passes the same checks instead of refusing gradient_clip_val, and
    global_step counts the Pilot's steps after each fit."""
    module = _module(tiny_llama_dir)
    for stage in ("first", "second"):
        trainer = make_trainer(tmp_path / stage, 2, gradient_clip_val=1.0)
        trainer.fit(module, make_data())
        assert trainer.global_step == 2 and not module.automatic_optimization
