"""CoFiTune: outside the depth band and the chosen modules nothing moves; the gradient rows are scaled by
1 - importance exactly (grouped-query key/value rows by their query heads' mean); the importance pass gives a non-zero
map (its dropout makes the two passes differ), leaves the weights and the run's random state alone, and an all-zero map
is refused. Resume, DDP, FSDP2 and the user's own module are the conformance matrix's rows (tests/conformance)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import first_batch_loss, make_data, make_trainer

from lightning_ft.callbacks import CoFiTune
from lightning_ft.callbacks.cofitune import normalise
from lightning_ft.core.layer_map import LayerMap
from lightning_ft.core.selection import ParameterSelection
from lightning_ft.core.structured import block_units
from lightning_ft.modules import CausalLMModule


def _rows(n: int = 8, length: int = 10) -> torch.utils.data.DataLoader:
    ids = torch.randint(3, 300, (n, length), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
    return torch.utils.data.DataLoader(rows, batch_size=4)


def _ready(path: Path) -> tuple[CoFiTune, torch.nn.Module]:
    """A CoFiTune set up on the tiny Llama (4 query heads in 2 key/value groups, 2 blocks) without a fit."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    method = CoFiTune(softmask=("input_projection", "output_projection", "attention"))
    layer_map = LayerMap.from_model(model)
    method._units = block_units(model, layer_map, model.config)
    method.selection = ParameterSelection(model, layer_map, layer_map.names)
    return method, model


def test_the_band_is_the_readmes_depth_fraction() -> None:
    assert CoFiTune().band_blocks(32) == list(range(8, 16))  # "bottom2" of a 32-layer 7B model: layers 8-15
    assert CoFiTune().band_blocks(30) == list(range(7, 15))  # SmolLM2
    assert CoFiTune(band=(0.5, 1.0)).band_blocks(2) == [1]


def test_normalisation_is_abs_tanh_of_the_per_block_z_score() -> None:
    raw = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    # per block: mean 2 and unbiased std 1, then mean 2 and std sqrt(12)
    z = torch.tensor([[-1.0, 0.0, 1.0], [-2 / 12**0.5, -2 / 12**0.5, 4 / 12**0.5]])
    torch.testing.assert_close(normalise(raw), torch.tanh(z).abs())


def test_gradient_rows_are_scaled_by_one_minus_importance(tiny_llama_dir: Path) -> None:
    method, model = _ready(tiny_llama_dir)
    gen = torch.Generator().manual_seed(0)
    method.importance = {"input_projection": torch.rand(2, 64, generator=gen),
                         "output_projection": torch.rand(2, 32, generator=gen),
                         "attention": torch.rand(2, 4, generator=gen)}  # fmt: skip
    layer = model.model.layers[1]
    tensors = [layer.mlp.up_proj, layer.mlp.down_proj, layer.self_attn.q_proj, layer.self_attn.k_proj,
               layer.self_attn.v_proj]  # fmt: skip
    grads = [torch.randn(t.weight.shape, generator=gen) for t in tensors]
    for t, g in zip(tensors, grads):
        t.weight.grad = g.clone()
    method.on_before_optimizer_step(SimpleNamespace(), None, None)  # type: ignore[arg-type]
    heads = method.importance["attention"][1]  # query heads 0, 1 share key/value head 0; 2, 3 share head 1
    rows = {
        "up": 1 - method.importance["input_projection"][1],
        "down": 1 - method.importance["output_projection"][1],
        "q": 1 - heads.repeat_interleave(8),
        "kv": 1 - torch.stack([heads[:2].mean(), heads[2:].mean()]).repeat_interleave(8),
    }
    for t, g, key in zip(tensors, grads, ("up", "down", "q", "kv", "kv")):
        torch.testing.assert_close(t.weight.grad, g * rows[key][:, None], atol=0, rtol=0)


def test_the_importance_pass_is_nonzero_and_leaves_the_run_alone(tiny_llama_dir: Path) -> None:
    method, model = _ready(tiny_llama_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = list(_rows())
    rng = torch.get_rng_state()
    importance = method.compute_importance(None, batches)
    assert {k: tuple(v.shape) for k, v in importance.items()} == {
        "input_projection": (2, 64), "output_projection": (2, 32), "attention": (2, 4)}  # fmt: skip
    for part, value in importance.items():
        assert value.abs().sum() > 0 and ((0 <= value) & (value < 1)).all(), part
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(importance[k], v) for k, v in method.compute_importance(None, batches).items())  # seeded
    method.dropout = 0.0  # two identical passes: the KL gradient is rounding noise, and the map is refused
    with pytest.raises(ValueError, match=r"^CoFiTune's importance pass ran every batch twice with the same result"):
        method.compute_importance(None, batches)


def test_outside_the_band_and_the_modules_nothing_moves(tiny_llama_dir: Path, tmp_path: Path) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=1e-2, warmup_steps=0, output_dir="")
    before = {n: p.detach().clone() for n, p in module.backbone.named_parameters()}
    method = CoFiTune(band=(0.5, 1.0), importance_source="train", importance_batches=2)
    make_trainer(tmp_path, 3, callbacks=[method]).fit(module, train_dataloaders=_rows())
    moved = {n for n, p in module.backbone.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    assert method.importance is not None and method.importance["input_projection"].shape == (2, 64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"band": (0.5, 0.5)}, "band=(0.5, 0.5) must be (low, high] fractions with 0 <= low < high <= 1."),
        ({"softmask": ("ffn",)}, "softmask names 'ffn': use input_projection, output_projection or attention."),
        ({"importance_source": "web"}, "importance_source='web' must be 'control' or 'train'."),
        ({"dropout": 0.0}, "dropout=0.0 must be in (0, 1): the importance pass needs two different passes."),
        ({"micro_batch_size": 0}, "micro_batch_size=0 must be a positive integer."),
    ],
)
def test_bad_settings_are_refused_in_one_sentence(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        CoFiTune(**kwargs)
    assert str(err.value) == message


def test_control_importance_needs_control_data(tiny_llama_dir: Path, tmp_path: Path) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    data = make_data(train_size=8, control_size=0)
    with pytest.raises(ValueError, match=r"has no control data: give it control data .* or set "
                                         r"importance_source='train'\.$"):  # fmt: skip
        make_trainer(tmp_path, 1, callbacks=[CoFiTune()]).fit(module, data)


@pytest.mark.slow
def test_smollm2_cofitune_learns_in_its_band_with_general_text_importance(smollm2_dir: Path, tmp_path: Path) -> None:
    module = CausalLMModule(model=str(smollm2_dir), learning_rate=5e-4, warmup_steps=0, output_dir="")
    data, batch, loss_before = first_batch_loss(module, train_size=32, batch_size=4, max_length=40,
                                                control="humaneval", control_size=4)  # fmt: skip
    before = {n: p.detach().clone() for n, p in module.backbone.named_parameters()}
    method = CoFiTune(importance_batches=1)
    make_trainer(tmp_path, 8, callbacks=[method], gradient_clip_val=1.0).fit(module, data)
    with torch.no_grad():
        loss_after = module.compute_loss(batch).item()
    moved = {n for n, p in module.backbone.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {f"model.layers.{i}.mlp.{m}.weight" for i in range(7, 15) for m in ("up_proj", "down_proj")}
    assert all(v.abs().sum() > 0 for v in method.importance.values())
    assert loss_after < loss_before - 0.1
