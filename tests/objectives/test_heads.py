"""CAFT multi-token heads on tiny random models: target shift, causality, chunked CE, weight 0, frozen heads,
export without heads, both stages from the shipped YAML, one-sentence errors, and one SmolLM2 behaviour test."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from objective_checks import first_batch, make_data, make_trainer

from lightning_ft.core.anatomy import decoder_parts
from lightning_ft.data.collate import IGNORE_INDEX
from lightning_ft.modules import CausalLMModule
from lightning_ft.objectives import CAFTCausalLM, heads_schedule


def _caft(path: Path, **kwargs: Any) -> CAFTCausalLM:
    kwargs.setdefault("output_dir", "")
    return CAFTCausalLM(model=str(path), **kwargs)


def _unembed(module: CAFTCausalLM, hidden: torch.Tensor) -> torch.Tensor:
    parts = decoder_parts(module.backbone, "test")
    assert parts.final_norm is not None
    return parts.head(parts.final_norm(hidden))


def _captured(module: CAFTCausalLM, ids: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Any]:
    with module._capture_last_layer_input() as store:
        module(ids, mask)
    return store


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_head_k_predicts_the_token_k_plus_1_ahead(fixture: str, request: pytest.FixtureRequest) -> None:
    module = _caft(request.getfixturevalue(fixture), ce_chunk_size=5).eval()
    batch = first_batch(module, mask_prompt=False)
    labels = batch["labels"]
    with torch.no_grad():
        store = _captured(module, batch["input_ids"], batch["attention_mask"])
        sums = module.head_ce_sums(store, labels)
        outs = module.head_hidden_states(store)
    for k, ((total, count), out) in enumerate(zip(sums, outs), start=1):
        logp = torch.log_softmax(_unembed(module, out).double(), -1)
        expected, n = 0.0, 0
        for b in range(labels.shape[0]):
            for t in range(labels.shape[1] - 1 - k):
                if labels[b, t + 1 + k] != IGNORE_INDEX:
                    expected -= logp[b, t, labels[b, t + 1 + k]].item()
                    n += 1
        assert count == n and n > 0
        assert total.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "fixture,impl", [("tiny_llama_dir", "sdpa"), ("tiny_llama_dir", "eager"), ("tiny_gpt2_dir", "eager")]
)
def test_no_head_sees_a_future_token(fixture: str, impl: str, request: pytest.FixtureRequest) -> None:
    module = _caft(request.getfixturevalue(fixture)).eval()
    module.backbone.set_attn_implementation(impl)
    ids = torch.randint(5, 300, (2, 12))
    cut = 6
    future = ids.clone()
    future[:, cut + 1 :] = torch.randint(5, 300, (2, 12 - cut - 1))
    with torch.no_grad():
        a = module.head_hidden_states(_captured(module, ids))
        b = module.head_hidden_states(_captured(module, future))
        # The official code calls the head layers without a mask; with eager attention that leaks the future.
        # Here a trunk that leaves the mask implicit still gives the heads an explicit causal mask.
        store = _captured(module, future)
        if "attention_mask" in store["bound"].arguments:
            store["bound"].arguments["attention_mask"] = None
        c = module.head_hidden_states(store)
    for x, y, z in zip(a, b, c):
        torch.testing.assert_close(x[:, : cut + 1], y[:, : cut + 1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x[:, : cut + 1], z[:, : cut + 1], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(x[:, cut + 1 :], y[:, cut + 1 :])  # the perturbation is visible later on


def test_aux_ce_never_holds_more_than_a_chunk_of_logits(tiny_llama_dir: Path) -> None:
    chunk = 16
    module = _caft(tiny_llama_dir, ce_chunk_size=chunk, heads_coefficient=1.0)
    batch = first_batch(module, mask_prompt=False)
    rows: list[tuple[int, ...]] = []
    hook = module.backbone.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(tuple(o.shape)))
    loss = module.compute_loss(batch)
    loss.backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    aux = [shape for shape in rows if len(shape) == 2]
    assert aux and max(shape[0] for shape in aux) <= chunk  # forward and backward recomputation alike
    module.zero_grad()
    module.caft_settings = dataclasses.replace(module.caft_settings, ce_chunk_size=10_000)
    whole = module.compute_loss(batch)
    whole.backward()
    assert whole.item() == pytest.approx(loss.item(), rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dict(module.named_parameters())[name].grad, rtol=1e-4, atol=1e-7, msg=name)


def test_weight_zero_gives_the_plain_loss_exactly(tiny_llama_dir: Path) -> None:
    module = _caft(tiny_llama_dir, heads_coefficient=0.0)
    plain = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    batch = first_batch(module, mask_prompt=False)
    assert torch.equal(module.compute_loss(batch), plain.compute_loss(batch))
    weighted = _caft(tiny_llama_dir).compute_loss(batch)
    assert weighted.item() > plain.compute_loss(batch).item()  # alpha > 0 adds the auxiliary terms


def test_schedules() -> None:
    assert heads_schedule("rsine", 0, 100) == 1.0 and heads_schedule("rsine", 100, 100) == pytest.approx(0.0, abs=1e-12)
    assert heads_schedule("rsine", 50, 100) == pytest.approx(math.sin(math.pi / 4))
    assert heads_schedule("sine", 25, 100, ratio=0.5) == pytest.approx(math.sin(math.pi / 4))
    assert heads_schedule("sine", 80, 100, ratio=0.5) == 1.0
    assert heads_schedule("linear", 30, 100) == pytest.approx(0.3) and heads_schedule("constant", 7, 100) == 1.0


class _Watch:
    def __init__(self, module: CAFTCausalLM) -> None:
        self.heads = {n: p.detach().clone() for n, p in module.aux_heads.named_parameters()}
        self.trunk = {n: p.detach().clone() for n, p in module.backbone.named_parameters()}

    def changed(self, module: CAFTCausalLM) -> tuple[bool, bool]:
        heads = any(not torch.equal(self.heads[n], p) for n, p in module.aux_heads.named_parameters())
        trunk = any(not torch.equal(self.trunk[n], p) for n, p in module.backbone.named_parameters())
        return heads, trunk


def test_frozen_heads_are_not_in_the_optimizer_and_heads_stage_trains_only_heads(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    module = _caft(tiny_llama_dir, learning_rate=1e-2, warmup_steps=0, heads_output="")
    watch = _Watch(module)
    trainer = make_trainer(tmp_path, 2)
    trainer.fit(module, make_data(mask_prompt=False))
    in_opt = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in module.aux_heads.parameters()}
    assert watch.changed(module) == (False, True)

    heads = _caft(tiny_llama_dir, stage="heads", learning_rate=1e-2, warmup_steps=0, heads_output="")
    watch = _Watch(heads)
    trainer = make_trainer(tmp_path, 2)
    trainer.fit(heads, make_data(mask_prompt=False))
    in_opt = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in heads.aux_heads.parameters()}
    assert watch.changed(heads) == (True, False)


def test_export_has_no_heads_and_heads_are_saved_beside_it(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    module = _caft(tiny_llama_dir, stage="heads", learning_rate=1e-2, warmup_steps=0, output_dir=str(tmp_path / "hf"))
    trainer = make_trainer(
        tmp_path, 2, enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt")]
    )
    trainer.fit(module, make_data(mask_prompt=False))
    ckpt = torch.load(next((tmp_path / "ckpt").glob("*.ckpt")), map_location="cpu", weights_only=False)
    assert any(k.startswith("aux_heads.") for k in ckpt["state_dict"])
    for file in (tmp_path / "hf").glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            assert not [k for k in f.keys() if "aux_heads" in k or "layers.2." in k]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    plain = CausalLMModule(model=str(tiny_llama_dir), output_dir="").eval()  # the trunk was frozen in this stage
    ids = torch.tensor([[3, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, plain(ids).logits, rtol=0, atol=0)
    heads_file = tmp_path / "aux_heads.safetensors"  # beside the HF folder, not in it
    assert heads_file.is_file() and not list((tmp_path / "hf").glob("aux_heads*"))
    reloaded = _caft(tiny_llama_dir, heads_path=str(heads_file))
    for (n, p), (_, q) in zip(module.aux_heads.named_parameters(), reloaded.aux_heads.named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match=r"heads_path=.* holds heads .*set num_heads/layers_per_head"):
        _caft(tiny_llama_dir, heads_path=str(heads_file), num_heads=2)


def test_both_stages_run_from_the_shipped_yaml(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from lightning_ft.cli import main

    common = [
        "--model.model",
        str(tiny_llama_dir),
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--wandb",
        "disabled",
        "--data.val_size",
        "8",
        "--data.test_size",
        "0",
        "--data.control_size",
        "4",
        "--data.max_length",
        "32",
    ]
    main(["fit", "--config", "configs/caft_heads.yaml", "--run_name", "heads", "--data.train_size", "16", *common])
    heads_file = tmp_path / "heads" / "aux_heads.safetensors"
    assert heads_file.is_file() and not (tmp_path / "heads" / "hf_model").exists()
    assert "val/head_4_loss" in (tmp_path / "heads" / "csv" / "metrics.csv").read_text()
    main(
        [
            "fit",
            "--config",
            "configs/caft.yaml",
            "--run_name",
            "task",
            "--model.heads_path",
            str(heads_file),
            "--data.train_size",
            "32",
            *common,
        ]
    )
    run = tmp_path / "task"
    metrics = (run / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert all(f"train/head_{k}_loss" in metrics for k in range(1, 5)) and "train/heads_weight" in metrics
    first, second = load_file(str(heads_file)), load_file(str(run / "aux_heads.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)  # frozen heads
    assert json.loads((run / "hf_model" / "config.json").read_text())["num_hidden_layers"] == 2
    # the exported folder is a plain model holding exactly the trained trunk of the checkpoint
    from transformers import AutoModelForCausalLM

    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("aux_heads.") for k in state)
    trained = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    trained.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")})
    exported = AutoModelForCausalLM.from_pretrained(run / "hf_model").eval()
    ids = torch.tensor([[3, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trained(ids).logits, rtol=0, atol=0)
        assert not torch.equal(exported(ids).logits, CausalLMModule(model=str(tiny_llama_dir))(ids).logits)


def test_errors_are_one_sentence(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"stage='heads' freezes the whole backbone.*set peft to null"):
        _caft(tiny_llama_dir, stage="heads", peft={"r": 4})
    with pytest.raises(ValueError, match=r"heads_path=.* is not a file: run the head pre-training stage first"):
        _caft(tiny_llama_dir, heads_path=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"init_layer=5 is outside the backbone's 2 decoder layers"):
        _caft(tiny_llama_dir, init_layer=5)
    with pytest.raises(ValueError, match=r"decay=0 must be in \(0, 1\]"):
        _caft(tiny_llama_dir, decay=0)
    with pytest.raises(ValueError, match=r"heads_schedule='cosine' is not a schedule"):
        _caft(tiny_llama_dir, heads_schedule="cosine")


@pytest.mark.slow
def test_smollm2_heads_learn_on_general_text_and_trunk_is_untouched(smollm2_dir: Path, tmp_path: Path) -> None:
    """Stage 1 on the real model: copies of layer -2 become better multi-token predictors in a few steps."""
    module = _caft(smollm2_dir, stage="heads", learning_rate=2e-3, warmup_steps=0, heads_output="")
    trunk = {n: p.detach().clone() for n, p in module.backbone.named_parameters()}
    data = dict(
        dataset="chitchat",
        prompt_template="{prompt}\n",
        response_template="{response}",
        label_options=None,
        mask_prompt=False,
        train_size=48,
        val_size=8,
        max_length=24,
        batch_size=4,
        eval_batch_size=8,
    )
    dm = make_data(**data)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    val = [b for b in dm.val_dataloader()[0]]

    def heads_loss() -> float:
        module.eval()
        with torch.no_grad():
            total = sum(module.compute_loss(b).item() for b in val)
        module.train()
        return total / len(val)

    before = heads_loss()
    make_trainer(tmp_path, 6).fit(module, dm)
    after = heads_loss()
    assert after < 0.95 * before, (before, after)  # measured here: 29.4 -> 26.2 (sum_k 0.8^k CE_k, 8 held-out texts)
    assert all(torch.equal(trunk[n], p) for n, p in module.backbone.named_parameters())
