"""OwLore as the paper runs it: the preset's values, outlier scores over several calibration batches with the
padding left out, and GaLore (update against a hand computation, low-rank state of the active blocks, state
evicted with the block, refusals)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from helpers import SelectionWatch, make_data, make_trainer, token_batches
from helpers import one_thread  # noqa: F401  (autouse fixture: applies where imported)

from lightning_ft.callbacks import layerwise
from lightning_ft.callbacks.layerwise import LayerwiseSampling, calibration_batches, input_norms, outlier_ratios
from lightning_ft.core.galore import GaLoreProjection
from lightning_ft.core.layer_map import LayerMap
from lightning_ft.modules import CausalLMModule


# ---------------------------------------------------------------------------------------------- preset
def test_owlore_preset_values_and_overrides() -> None:
    owlore = LayerwiseSampling(preset="owlore")
    assert (owlore.sampling, owlore.interval, owlore.outlier_threshold) == ("outlier", 50, 13.0)
    assert (owlore.outlier_metric, owlore.calibration_samples, owlore.active_fraction) == ("activation", 128, 5 / 32)
    assert owlore.galore is not None
    assert (owlore.galore.rank, owlore.galore.update_proj_gap, owlore.galore.scale) == (256, 100, 1.0)
    gammas = {}
    for blocks in (32, 30, 16, 2):  # 5 of 32 (the paper), 5 of SmolLM2's 30, round(2.5) = 2, at least 1
        owlore.layer_map = SimpleNamespace(num_blocks=blocks)  # type: ignore[assignment]
        gammas[blocks] = owlore.gamma
    assert gammas == {32: 5, 30: 5, 16: 2, 2: 1}
    custom = LayerwiseSampling(preset="owlore", num_active=3, interval=10, galore_rank=0, sampling="uniform")
    assert (custom.num_active, custom.active_fraction, custom.interval, custom.galore, custom.sampling) == (
        3, None, 10, None, "uniform"
    )
    lisa = LayerwiseSampling()  # without a preset: LISA's defaults, no GaLore
    assert (lisa.num_active, lisa.active_fraction, lisa.interval, lisa.sampling, lisa.galore) == (
        2, None, 50, "uniform", None
    )
    with pytest.raises(ValueError, match="preset='galore' is not a known preset: use 'owlore'"):
        LayerwiseSampling(preset="galore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="galore_rank=-1 must be positive"):
        LayerwiseSampling(galore_rank=-1)
    with pytest.raises(ValueError, match="calibration_samples=0 must be a positive integer"):
        LayerwiseSampling(calibration_samples=0)


# ---------------------------------------------------------------------------------------------- outlier scores
def _tiny(tiny_llama_dir: Path) -> tuple[torch.nn.Module, LayerMap]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    return model, LayerMap.from_model(model)


def test_outlier_scores_ignore_padding(tiny_llama_dir: Path) -> None:
    model, lm = _tiny(tiny_llama_dir)
    ids = torch.randint(3, 300, (3, 9), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([9, 6, 4])
    mask = (torch.arange(9) < lengths[:, None]).long()
    pad = 1  # the tiny tokenizer's <pad>
    batch = {"input_ids": torch.where(mask.bool(), ids, pad), "attention_mask": mask}
    extra = 7  # the same sequences with 7 more right-padding positions
    padded = {
        "input_ids": torch.cat([batch["input_ids"], torch.full((3, extra), pad)], 1),
        "attention_mask": torch.cat([mask, torch.zeros(3, extra, dtype=torch.long)], 1),
    }
    modules = {i.name: model.get_submodule(i.name.rsplit(".", 1)[0]) for i in lm.select(kinds=["matrices"])}
    short, long = input_norms(model, modules, [batch]), input_norms(model, modules, [padded])
    assert short.keys() == long.keys() == modules.keys()
    for name in modules:
        torch.testing.assert_close(long[name], short[name], rtol=1e-5, atol=1e-6, msg=name)
    for threshold in (1.0, 3.0):  # the ratios at a threshold that any change of the norms moves
        assert outlier_ratios(model, lm, padded, threshold) == outlier_ratios(model, lm, batch, threshold)


class _FirstBatches(L.Callback):
    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any) -> None:
        self.batches.append(batch["input_ids"].clone())


def test_calibration_sums_several_training_batches(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    used: list[list[Any]] = []
    original = layerwise.outlier_ratios

    def spy(model: Any, layer_map: Any, batches: Any, *args: Any) -> list[float]:
        used.append(list(batches))
        return original(model, layer_map, used[-1], *args)

    monkeypatch.setattr(layerwise, "outlier_ratios", spy)
    model0, lm = _tiny(tiny_llama_dir)
    module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=1e-2, warmup_steps=0, output_dir="")
    owlore = LayerwiseSampling(
        num_active=1, interval=2, sampling="outlier", outlier_threshold=2.0, calibration_samples=12
    )
    seen = _FirstBatches()
    make_trainer(tmp_path, 4, callbacks=[owlore, seen]).fit(module, make_data())
    assert len(used) == 1 and [b["input_ids"].shape[0] for b in used[0]] == [4, 4, 4]
    for calibration, training in zip(used[0], seen.batches[:3]):  # a fresh pass in the training order
        assert torch.equal(calibration["input_ids"], training)
    assert owlore.ratios == original(model0, lm, used[0], 2.0)  # the untrained model on the three batches
    assert owlore.ratios != original(model0, lm, used[0][:1], 2.0)


def test_calibration_pass_leaves_the_random_state_alone() -> None:
    loader = torch.utils.data.DataLoader(token_batches().dataset, batch_size=4, shuffle=True)  # global-RNG sampler
    strategy = SimpleNamespace(batch_to_device=lambda b: b)
    trainer = SimpleNamespace(train_dataloader=loader, world_size=2, strategy=strategy)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    batches = calibration_batches(trainer, 14, fallback=None)  # type: ignore[arg-type]
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4]  # ceil(14 / 2 ranks) = 7 sequences on this rank
    assert torch.equal(torch.get_rng_state(), before)
    plain = SimpleNamespace(train_dataloader=[1])  # not a DataLoader: the current batch only
    assert calibration_batches(plain, 4, fallback="batch") == ["batch"]  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- GaLore
def _hand_galore(w: torch.Tensor, grads: list[torch.Tensor], lrs: list[float], **h: Any) -> torch.Tensor:
    """GaLore std + AdamW written out: basis from the SVD at steps 1, 1 + gap, ...; moments kept across refreshes."""
    rank, gap, scale, (b1, b2), eps, wd = h["rank"], h["gap"], h["scale"], h["betas"], h["eps"], h["wd"]
    tall = w.shape[0] >= w.shape[1]
    m = v = basis = None
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        if (t - 1) % gap == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            basis = vh[:rank] if tall else u[:, :rank]
        low = g @ basis.T if tall else basis.T @ g
        m = (1 - b1) * low if m is None else b1 * m + (1 - b1) * low
        v = (1 - b2) * low**2 if v is None else b2 * v + (1 - b2) * low**2
        n = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        w = w * (1 - lr * wd) - lr * scale * (n @ basis if tall else basis @ n)
    return w


def test_galore_update_matches_a_hand_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = {"tall": (6, 4), "wide": (4, 6), "thin": (2, 8), "bias": (4,)}  # thin: smaller side 2 <= rank 2
    init = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    grads = {k: [torch.randn(s, generator=gen) for _ in range(3)] for k, s in shapes.items()}
    hyper = dict(rank=2, gap=2, scale=0.5, betas=(0.8, 0.9), eps=1e-6, wd=0.1)
    lrs = [0.05, 0.02, 0.01]  # a schedule: GaLore must read the group's current lr

    def build() -> tuple[dict[str, torch.nn.Parameter], torch.optim.AdamW]:
        params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
        groups = [{"params": [params["tall"], params["wide"], params["thin"]], "weight_decay": 0.1},
                  {"params": [params["bias"]], "weight_decay": 0.0}]
        return params, torch.optim.AdamW(groups, lr=lrs[0], betas=(0.8, 0.9), eps=1e-6)

    params, opt = build()
    galore = GaLoreProjection(rank=2, update_proj_gap=2, scale=0.5)
    assert galore.attach([opt], params.values()) == 2  # tall and wide; thin and bias stay with AdamW
    ref_params, ref_opt = build()
    for step in range(3):
        for p, q, k in ((params[k], ref_params[k], k) for k in shapes):
            p.grad, q.grad = grads[k][step].clone(), grads[k][step].clone()
        for o in (opt, ref_opt):
            for g in o.param_groups:
                g["lr"] = lrs[step]
        if step == 1:
            opt.step()  # no closure: gradients already there (AMP's scaler, manual optimization)
        else:
            assert opt.step(lambda: torch.tensor(1.5)) == 1.5  # Lightning's path: the closure runs inside step
        ref_opt.step()
    for k in ("tall", "wide"):
        expected = _hand_galore(init[k], grads[k], lrs, **hyper)
        torch.testing.assert_close(params[k].detach(), expected, rtol=1e-5, atol=1e-6, msg=k)
    for k in ("thin", "bias"):
        assert torch.equal(params[k], ref_params[k]), k  # plain AdamW, bit for bit
    # std projects the smaller side: each moment holds r * max(m, n) entries, the basis r * min(m, n)
    tall, wide = opt.state[params["tall"]], opt.state[params["wide"]]
    assert tall["exp_avg"].shape == tall["exp_avg_sq"].shape == (6, 2) and tall["galore_basis"].shape == (2, 4)
    assert wide["exp_avg"].shape == wide["exp_avg_sq"].shape == (2, 6) and wide["galore_basis"].shape == (4, 2)
    assert opt.state[params["thin"]]["exp_avg"].shape == (2, 8)
    galore.detach()
    assert not opt._optimizer_step_pre_hooks  # the optimizer steps every parameter itself again


class _GaLoreStates(L.Callback):
    """After every step: each active block matrix holds low-rank moments whose step count restarts when its
    block switches back on (the state was evicted); every other trainable tensor holds full-size moments."""

    def __init__(self, sampler: LayerwiseSampling, rank: int) -> None:
        self.sampler, self.rank = sampler, rank
        self.on_since: dict[int, int] = {}
        self.ever_on: set[int] = set()
        self.restarts = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        sel, lm = self.sampler.selection, self.sampler.layer_map
        (opt,) = trainer.optimizers
        step = trainer.global_step
        current = set(self.sampler.current_blocks)
        for block in list(self.on_since):
            if block not in current:
                del self.on_since[block]
        for block in current:
            if block not in self.on_since:
                self.restarts += block in self.ever_on
                self.on_since[block] = step
                self.ever_on.add(block)
        for name in sel.active:
            info, param = lm[name], sel.params[name]
            state = opt.state[param]
            if info.is_matrix and info.block is not None:
                m, n = param.shape
                assert state["exp_avg"].shape == ((m, self.rank) if m >= n else (self.rank, n)), name
                assert state["galore_basis"].shape == ((self.rank, n) if m >= n else (m, self.rank)), name
                assert int(state["step"]) == step - self.on_since[info.block] + 1, name
            else:
                assert state["exp_avg"].shape == param.shape and "galore_basis" not in state, name


def test_galore_state_is_low_rank_and_leaves_with_its_block(tiny_llama_dir: Path, tmp_path: Path) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=1e-2, warmup_steps=0, output_dir="")
    sampler = LayerwiseSampling(num_active=1, interval=1, galore_rank=4, galore_update_proj_gap=2, seed=1)
    states = _GaLoreStates(sampler, rank=4)
    make_trainer(tmp_path, 8, callbacks=[sampler, SelectionWatch(sampler), states]).fit(module, make_data())
    assert states.restarts > 0  # some block came back on during the run, with fresh state
    assert not sampler.galore._handles  # detached at fit end


def test_galore_refusals(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from helpers import UserModule

    sampler = LayerwiseSampling(num_active=1, galore_rank=4, module="nets.lm")
    sgd = UserModule(str(tiny_llama_dir), optimizer="sgd")
    with pytest.raises(TypeError, match="galore_rank=4 keeps Adam moments .* got SGD: return AdamW or set galore_rank"):
        make_trainer(tmp_path, 1, callbacks=[sampler]).fit(sgd, token_batches())
    big = LayerwiseSampling(num_active=1, galore_rank=32)  # no tiny-Llama matrix has a smaller side above 32
    module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=1e-2, warmup_steps=0, output_dir="")
    with pytest.warns(UserWarning, match="galore_rank=32 projects nothing, since no trainable attention/MLP matrix"):
        make_trainer(tmp_path, 1, callbacks=[big]).fit(module, make_data())
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(4, 4))], amsgrad=True)
    with pytest.raises(ValueError, match="galore_rank=2 does not support the optimizer's amsgrad=True"):
        GaLoreProjection(2).attach([opt], opt.param_groups[0]["params"])


def test_the_galore_basis_holds_only_its_rank() -> None:
    """The basis is r x min(m, n) floats of its own, not a view that keeps the whole SVD factor alive."""
    from lightning_ft.core.galore import galore_basis

    for shape in ((40, 24), (24, 40)):
        basis = galore_basis(torch.randn(*shape), 3)
        assert basis.untyped_storage().nbytes() == 3 * 24 * 4, shape
