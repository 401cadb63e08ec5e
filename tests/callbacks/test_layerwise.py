"""LayerFreezing presets and LayerwiseSampling (LISA / OwLore): sampling distribution against the outlier
ratios, outlier ratios against a hand computation, optimizer state only for the sampled blocks, an SGD user module
and refusals. Resume equality (with GaLore state), the declared refusals and DDP are in tests/conformance."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import Recorder, SelectionWatch, UserModule, make_data, make_trainer, token_batches
from helpers import one_thread  # noqa: F401  (autouse fixture: applies where imported)

from lightning_ft.callbacks.layerwise import LayerFreezing, LayerwiseSampling, outlier_ratios, sample_blocks
from lightning_ft.core.layer_map import LayerMap
from lightning_ft.core.selection import draw_rng
from lightning_ft.modules import CausalLMModule


def _inclusion(p: list[float], gamma: int) -> list[float]:
    """Exact inclusion probability of each block under successive sampling without replacement."""
    out = [0.0] * len(p)
    for order in itertools.permutations(range(len(p)), gamma):
        prob, left = 1.0, 1.0
        for i in order:
            prob *= p[i] / left
            left -= p[i]
        for i in order:
            out[i] += prob
    return out


@pytest.mark.parametrize("gamma", [1, 2])
def test_sampling_matches_the_outlier_ratios(gamma: int) -> None:
    ratios = [0.004, 0.012, 0.02, 0.004]
    p = [r / sum(ratios) for r in ratios]
    n = 6000
    counts = [0] * 4
    for index in range(n):
        blocks = sample_blocks(ratios, gamma, draw_rng(7, index))
        assert len(set(blocks)) == gamma
        for b in blocks:
            counts[b] += 1
    expected = [n * q for q in _inclusion(p, gamma)]
    # Pearson statistic per block (each count is binomial); 3 dof at p = 0.001 -> 16.3, fixed seed
    chi2 = sum((c - e) ** 2 / (e * (1 - e / n)) for c, e in zip(counts, expected))
    assert chi2 < 16.3, (counts, expected)


def test_outlier_ratios_match_a_hand_computation(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    lm = LayerMap.from_model(model)
    weights = outlier_ratios(model, lm, None, threshold=3.0)
    for block in range(lm.num_blocks):
        scores = torch.cat([model.get_parameter(i.name).abs().flatten() for i in lm.select(kinds=["matrices"], blocks=[block])])
        assert weights[block] == pytest.approx(float((scores > 3.0 * scores.mean()).float().mean()), rel=1e-6)
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    captured: dict[str, torch.Tensor] = {}
    infos = lm.select(kinds=["matrices"], blocks=[1])
    handles = [
        model.get_submodule(i.name.rsplit(".", 1)[0]).register_forward_hook(
            lambda m, a, o, key=i.name: captured.__setitem__(key, a[0].detach())  # returns None: output kept
        )
        for i in infos
    ]
    with torch.no_grad():
        model(**batch)
    for handle in handles:
        handle.remove()
    wanda = outlier_ratios(model, lm, batch, threshold=3.0)
    scores = []
    for info in infos:  # Wanda score |W_ij| * ||X_j||_2 over the batch's tokens, for nn.Linear [out, in]
        x = captured[info.name].reshape(-1, captured[info.name].shape[-1])
        scores.append((model.get_parameter(info.name).abs() * x.norm(dim=0)).flatten())
    flat = torch.cat(scores)
    assert wanda[1] == pytest.approx(float((flat > 3.0 * flat.mean()).float().mean()), rel=1e-5)
    assert wanda != weights


def test_sampled_blocks_only_train_and_hold_optimizer_state(tiny_llama_dir: Path, tmp_path: Path) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=1e-2, warmup_steps=0, output_dir="")
    owlore = LayerwiseSampling(num_active=1, interval=2, sampling="outlier", outlier_threshold=3.0, seed=4)
    watch = SelectionWatch(owlore)
    recorder = Recorder()
    make_trainer(tmp_path, 8, callbacks=[owlore, watch], logger=recorder, log_every_n_steps=1).fit(module, make_data())
    assert watch.steps_checked == 8 and owlore.draws == 4
    ratios = owlore.ratios
    assert ratios is not None and sum(ratios) > 0
    assert owlore.probabilities == pytest.approx([r / sum(ratios) for r in ratios])
    blocks_in = {tuple(sorted({owlore.layer_map[n].block for n in a} - {None})) for _, a in watch.history}
    assert all(len(b) == 1 for b in blocks_in)  # gamma = 1 block at a time (plus embeddings, final norm, head)
    logged = [m for _, m in recorder.metrics if "selection/blocks_on" in m]
    assert logged and all(m["selection/blocks_on"] == 1.0 for m in logged)


@pytest.mark.parametrize("optimizer", ["sgd"])  # adamw: tests/conformance
def test_drop_in_on_a_user_module(tiny_llama_dir: Path, tmp_path: Path, optimizer: str) -> None:
    module = UserModule(str(tiny_llama_dir), optimizer=optimizer)
    lisa = LayerwiseSampling(num_active=1, interval=1, module="nets.lm")
    watch = SelectionWatch(lisa, stateful_optimizer=optimizer == "adamw")
    make_trainer(tmp_path, 4, callbacks=[lisa, watch]).fit(module, token_batches())
    assert watch.steps_checked == 4 and lisa.draws == 4


@pytest.mark.parametrize(
    ("kwargs", "trains"),
    [
        (dict(freeze_bottom=1), lambda i: i.block == 1 or i.kind.value in ("final_norm",)),
        (dict(freeze_bottom=1, freeze_embeddings=False), lambda i: i.block != 0),
        (dict(train_kinds=["embedding", "head"]), lambda i: i.block is None and i.kind.value != "final_norm"),
        (dict(train_blocks=[-1], train_kinds=["final_norm"]), lambda i: i.block == 1 or i.kind.value == "final_norm"),
    ],
)
def test_layer_freezing_presets(tiny_llama_dir: Path, tmp_path: Path, kwargs: dict[str, Any], trains: Any) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=1e-2, warmup_steps=0, output_dir="")
    freezing = LayerFreezing(**kwargs)
    watch = SelectionWatch(freezing)
    make_trainer(tmp_path, 2, callbacks=[freezing, watch]).fit(module, make_data())
    active = watch.history[0][1]
    assert active == {i.name for i in freezing.layer_map if trains(i)}


def test_refusals_are_one_sentence(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="give exactly one of the two"):
        LayerFreezing()
    with pytest.raises(ValueError, match="active_fraction=1.5 must be in"):
        LayerwiseSampling(active_fraction=1.5)
    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    with pytest.raises(ValueError, match="num_active=3 must be between 1 and the model's 2 blocks"):
        LayerwiseSampling(num_active=3).setup(make_trainer(tmp_path, 1), module, "fit")
    with pytest.raises(ValueError, match="freeze_bottom=5 exceeds"):
        LayerFreezing(freeze_bottom=5).setup(make_trainer(tmp_path, 1), module, "fit")
    ddp = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    with pytest.raises(ValueError, match="ddp_find_unused_parameters_true"):
        LayerwiseSampling().setup(ddp, module, "fit")
    LayerFreezing(freeze_bottom=1).setup(ddp, module, "fit")  # a static selection is fine under plain DDP
    lisa = LayerwiseSampling(active_fraction=0.5)
    lisa.setup(make_trainer(tmp_path, 1), CausalLMModule(model=str(tiny_llama_dir), output_dir=""), "fit")
    assert lisa.gamma == 1
