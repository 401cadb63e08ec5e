"""`lightning-ft merge` against plain re-implementations of mergekit 0.1.5 (shared/specs/mergekit-semantics.md).

The oracles below are written from the spec alone (they never call lightning_ft.merging.ops) and run on a tiny
Llama base with three fine-tunes; every merge goes through the real command (recipe YAML -> engine -> folder).
Per-tensor selections use the spec's own calls (``torch.argsort(|d|, descending=True)[:k]`` for TIES,
``torch.sort(|d|).indices[n_bot : n_bot + target_n]`` for Breadcrumbs), which also settle ties at a cut.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lightning_ft.merging.cli import main

CRAFTED = "model.norm.weight"  # dyadic deltas on a base of ones: exact sums, exact zeros and exact ties
WEIGHTS = [1.0, 0.5, 2.0]

# mergekit's table: sparsifier, sign consensus, default normalize, default rescale
FAMILY = {
    "task_arithmetic": (None, False, False, False),
    "ties": ("magnitude", True, True, False),
    "breadcrumbs": ("outliers", False, False, False),
    "breadcrumbs_ties": ("outliers", True, False, False),
    "dare_linear": ("bernoulli", False, False, True),
    "dare_ties": ("bernoulli", True, False, True),
}


def _crafted() -> list[torch.Tensor]:
    """Three deltas of 32 entries: with weights [1, 0.5, 2] entries 0..7 sum to exactly 0 after weighting, and
    model 1's magnitudes tie across the density-0.25 cut (ten entries of 0.25, k = 8)."""
    d1, d2, d3 = (torch.full((32,), 1 / 64) for _ in range(3))
    d1[:10] = 0.25  # 1 * 0.25 ...
    d2[:8] = -0.5  # ... + 0.5 * -0.5 = 0 on entries 0..7
    d3[16:24] = -0.125
    d3[:8] = 1 / 128  # the smallest of model 3: pruned at density 0.25
    return [d1, d2, d3]


@pytest.fixture(scope="module")
def kit(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny base and three fine-tunes: seeded noise everywhere, crafted deltas on the final norm."""
    root = tmp_path_factory.mktemp("parity")
    base_dir = root / "base"
    shutil.copytree(tiny_llama_dir, base_dir)
    base = load_file(base_dir / "model.safetensors")
    base[CRAFTED] = torch.ones(32)
    save_file(base, str(base_dir / "model.safetensors"), metadata={"format": "pt"})
    gen = torch.Generator().manual_seed(11)
    models, paths = [], []
    for i, crafted in enumerate(_crafted()):
        state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        state[CRAFTED] = base[CRAFTED] + crafted
        path = root / f"ft{i}"
        shutil.copytree(base_dir, path)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        models.append(state)
        paths.append(str(path))
    sharded = root / "base_sharded"  # the same base as two shards listed in reverse name order
    shutil.copytree(base_dir, sharded)
    (sharded / "model.safetensors").unlink()
    names = sorted(base, reverse=True)
    for shard, part in (("a.safetensors", names[::2]), ("b.safetensors", names[1::2])):
        save_file({k: base[k] for k in part}, str(sharded / shard), metadata={"format": "pt"})
    weight_map = {k: "a.safetensors" if k in names[::2] else "b.safetensors" for k in names}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {"base": base, "models": models, "base_dir": str(base_dir), "paths": paths, "sharded": str(sharded)}


def _run(recipe: dict[str, Any], out: Path, *flags: str) -> dict[str, torch.Tensor]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    main(["merge", "--config", str(out / "recipe.yaml"), "--output", str(out / "merged"), *flags])
    return load_file(out / "merged" / "model.safetensors")


def _recipe(kit: dict[str, Any], method: str, models: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
    entries = [{"model": p, "parameters": own} for p, own in zip(kit["paths"], models)]
    return {"merge_method": method, "base_model": kit["base_dir"], "models": entries, "parameters": params}


def _assert_all_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)


# ------------------------------------------------------------------ plain oracles, written from the spec
def _keep(t: torch.Tensor, indices: Any) -> torch.Tensor:
    mask = torch.zeros(t.numel())
    mask[indices] = 1.0
    return t * mask.view(t.shape)


def _magnitude(d: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return d
    if density <= 0:
        return torch.zeros_like(d)
    return _keep(d, torch.argsort(d.abs().view(-1).float(), descending=True)[: max(1, int(density * d.numel()))])


def _outliers(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    if density >= 1:
        return d
    n = d.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    return _keep(d, torch.sort(d.abs().view(-1).float(), descending=False).indices[bottom : bottom + target])


def _descending(t: torch.Tensor) -> list[int]:
    """Flat indices by decreasing |t|; of equal magnitudes the earlier entry first (the per-row rule)."""
    values = t.flatten().tolist()
    return sorted(range(len(values)), key=lambda i: (-abs(values[i]), i))


def _rows(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Official TaskVectorMiddleKeep: per row, remove the top int(gamma*c), then keep the top int(density*c)."""
    rows = d.reshape(-1, d.shape[-1])
    cols = rows.shape[1]
    kept = [_keep(row, _descending(row)[int(gamma * cols) :][: int(density * cols)]) for row in rows]
    return torch.stack(kept).view(d.shape)


def _rescaled(d: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    before, after = d.abs().sum(), kept.abs().sum()
    return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)


def _bernoulli(d: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """The mask is drawn in fp32 (bf16 for a bf16 tensor), applied and rescaled there, then cast back."""
    work = d.to(d.dtype if d.dtype == torch.bfloat16 else torch.float32)
    kept = work * torch.bernoulli(torch.full(d.shape, density, dtype=work.dtype))
    return (_rescaled(work, kept) if rescale else kept).to(d.dtype)


def oracle(
    kit: dict[str, Any],
    method: str,
    weights: list[float],
    density: list[float] | None = None,
    gamma: list[float] | None = None,
    normalize: bool | None = None,
    lam: float = 1.0,
    rescale: bool | None = None,
    row: bool = False,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """mergekit's generalized task arithmetic, tensor by tensor in ascending name order, in ``dtype``."""
    sparsifier, consensus, default_normalize, default_rescale = FAMILY[method]
    normalize = default_normalize if normalize is None else normalize
    rescale = default_rescale if rescale is None else rescale
    count = len(kit["models"])
    density, gamma = density or [1.0] * count, gamma or [0.01] * count
    out = {}
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        for name in sorted(kit["base"]):
            base = kit["base"][name].to(dtype)
            deltas = []
            for i, model in enumerate(kit["models"]):
                d = model[name].to(dtype) - base
                if sparsifier == "bernoulli":
                    deltas.append(_bernoulli(d, density[i], rescale) if density[i] < 1 else d)
                    continue
                if sparsifier == "outliers" and row:
                    d_kept = _rows(d, density[i], gamma[i])
                elif sparsifier == "outliers":
                    d_kept = _outliers(d, density[i], gamma[i])
                elif sparsifier == "magnitude":
                    d_kept = _magnitude(d, density[i])
                else:
                    d_kept = d
                deltas.append(_rescaled(d, d_kept) if rescale and d_kept is not d else d_kept)
            w = torch.tensor(weights, dtype=dtype).view(-1, *([1] * base.ndim))
            stacked = torch.stack(deltas) * w
            if consensus:
                elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).to(dtype)
                agree = (torch.sign(stacked) == elected).to(dtype)
                num, den = (stacked * agree).sum(0), (w * agree).sum(0)
                den[den == 0] = 1.0
            else:
                num, den = stacked.sum(0), w.sum(0)
                den[den.abs() < 1e-8] = 1.0
            if normalize:
                num = num / den
            if lam != 1.0:
                num = num * lam
            out[name] = base + num
    return out


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_is_the_weighted_average(kit: dict[str, Any], tmp_path: Path, normalize: bool) -> None:
    recipe = _recipe(kit, "linear", [{"weight": w} for w in WEIGHTS], normalize=normalize)
    recipe["base"] = recipe.pop("base_model")  # our `base:` is only the reference folder, not an ingredient
    got = _run(recipe, tmp_path)
    total = sum(WEIGHTS) if normalize else 1.0
    expected = {k: sum(w * m[k] for w, m in zip(WEIGHTS, kit["models"])) / total for k in kit["base"]}
    _assert_all_close(got, expected)


def test_linear_with_mergekit_base_model_averages_the_base_too(kit: dict[str, Any], tmp_path: Path) -> None:
    recipe = _recipe(kit, "linear", [{"weight": w} for w in WEIGHTS])
    with pytest.raises(ValueError, match="mergekit's linear averages base_model as one more ingredient"):
        _run(recipe, tmp_path / "refused")
    recipe["parameters"] = {"weight": 0.5}  # the base's weight (and the default of every model without one)
    got = _run(recipe, tmp_path / "with_base")
    models = [*kit["models"], kit["base"]]
    weights = [*WEIGHTS, 0.5]
    expected = {k: sum(w * m[k] for w, m in zip(weights, models)) / sum(weights) for k in kit["base"]}
    _assert_all_close(got, expected)
    del recipe["base_model"]  # no base at all: the first model's folder is the reference, the models are averaged
    got = _run({**recipe, "parameters": {}}, tmp_path / "no_base")
    _assert_all_close(got, {k: sum(w * m[k] for w, m in zip(WEIGHTS, kit["models"])) / 3.5 for k in kit["base"]})


def test_task_arithmetic_weights_normalize_lambda(kit: dict[str, Any], tmp_path: Path) -> None:
    models = [{"weight": w} for w in WEIGHTS]
    # --random-seed is accepted for every method, as mergekit's; only the random ones use it
    got = _run(_recipe(kit, "task_arithmetic", models, **{"lambda": 0.7}), tmp_path / "plain", "--random-seed", "5")
    _assert_all_close(got, oracle(kit, "task_arithmetic", WEIGHTS, lam=0.7))
    got = _run(_recipe(kit, "task_arithmetic", models, normalize=True, scaling=0.7), tmp_path / "normalized")
    _assert_all_close(got, oracle(kit, "task_arithmetic", WEIGHTS, normalize=True, lam=0.7))


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_weights_density_and_ties_at_the_threshold(kit: dict[str, Any], tmp_path: Path, normalize: bool) -> None:
    d1, d2, _ = _crafted()
    assert d1[7] == d1[8] == 0.25 and int(0.25 * 32) == 8  # ten tied magnitudes straddle model 1's cut of 8
    assert torch.all(WEIGHTS[0] * d1[:8] + WEIGHTS[1] * d2[:8] == 0)  # weighted sums exactly 0 there
    models = [{"weight": w} for w in WEIGHTS]
    got = _run(_recipe(kit, "ties", models, density=0.25, normalize=normalize), tmp_path)
    expected = oracle(kit, "ties", WEIGHTS, density=[0.25] * 3, normalize=normalize)
    _assert_all_close(got, expected)
    assert torch.equal(got[CRAFTED], expected[CRAFTED])  # dyadic values: exact
    delta = got[CRAFTED] - 1.0
    # model 1 keeps exactly 8 of its 10 tied 0.25s; where it keeps one among entries 0..7 the weighted sum is
    # 0.25 - 0.25 = 0, which elects +1, so only its +0.25 survives (divided by its weight 1 if normalize); where it
    # dropped one, model 2's 0.5 * -0.5 stands alone (divided by 0.5 if normalize); entries 8, 9 have no other
    kept = delta[:10] == 0.25
    assert int(kept.sum()) == 8
    alone = torch.tensor(-0.5 if normalize else -0.25)
    assert all(bool(delta[i] == (alone if i < 8 else 0.0)) for i in range(10) if not kept[i])
    # entries 16..23: model 3's 2 * -0.125 alone (divided by its weight 2 if normalize); the rest is pruned
    assert torch.equal(delta[16:24], torch.full((8,), -0.125 if normalize else -0.25))
    assert not delta[10:16].any() and not delta[24:].any()


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_density_gamma_and_per_model_override(kit: dict[str, Any], tmp_path: Path, method: str) -> None:
    models = [{"weight": 1.0}, {"weight": 0.5, "density": 0.3, "gamma": 0.1}, {"weight": 2.0}]
    got = _run(_recipe(kit, method, models, density=0.5, gamma=0.05), tmp_path / "tensor")
    expected = oracle(kit, method, WEIGHTS, density=[0.5, 0.3, 0.5], gamma=[0.05, 0.1, 0.05])
    _assert_all_close(got, expected)
    got = _run(_recipe(kit, method, models, density=0.5, gamma=0.05, scope="row"), tmp_path / "row")
    _assert_all_close(got, oracle(kit, method, WEIGHTS, [0.5, 0.3, 0.5], [0.05, 0.1, 0.05], row=True))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_seeded_and_matches_the_spec_stream(kit: dict[str, Any], tmp_path: Path, method: str) -> None:
    models = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 1.0}, {"weight": 2.0, "density": 0.3}]
    first = _run(_recipe(kit, method, models), tmp_path / "a", "--random-seed", "42")
    again = _run(_recipe(kit, method, models), tmp_path / "b", "--random-seed", "42")
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = _run({**_recipe(kit, method, models), "random_seed": 7}, tmp_path / "c")
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
    # torch.manual_seed(42); tensors in name order; one fp32 Bernoulli per model with density < 1, models in order
    expected = oracle(kit, method, WEIGHTS, density=[0.5, 1.0, 0.3], seed=42)
    _assert_all_close(first, expected)
    recipe = {**_recipe(kit, method, models), "base_model": kit["sharded"]}  # shards listed in reverse name order
    _assert_all_close(_run(recipe, tmp_path / "d", "--random-seed", "42"), expected)  # draws follow the names


def test_dare_kept_entries_are_weight_times_delta_times_the_l1_ratio(kit: dict[str, Any], tmp_path: Path) -> None:
    recipe = _recipe(kit, "dare_linear", [{"weight": 0.5, "density": 0.3}])
    recipe["models"] = recipe["models"][:1]
    got = _run(recipe, tmp_path, "--random-seed", "3")
    key = "model.layers.0.mlp.up_proj.weight"
    d = kit["models"][0][key] - kit["base"][key]
    merged = got[key] - kit["base"][key]
    kept = merged != 0
    assert 0.2 < kept.float().mean() < 0.4
    ratio = d.abs().sum() / d[kept].abs().sum()
    torch.testing.assert_close(merged[kept], 0.5 * d[kept] * ratio, rtol=0, atol=1e-6)
    assert abs(float(ratio) - 1 / 0.3) > 1e-3  # the L1 ratio, not the paper's 1/density


def test_a_mergekit_recipe_runs_unchanged(kit: dict[str, Any], tmp_path: Path) -> None:
    a, b, c = kit["paths"]
    text = f"""
models:
  - model: {a}
    parameters:
      density: 0.5
      weight: 1.0
  - model: {b}
    parameters:
      density: 0.3
      weight: 0.5
  - model: {c}
    parameters:
      weight: 2.0
merge_method: ties
base_model: {kit["base_dir"]}
parameters:
  normalize: true
  int8_mask: true
  density: 0.4
dtype: float32
tokenizer_source: base
"""
    (tmp_path / "mergekit.yml").write_text(text)
    main(["merge", "--config", str(tmp_path / "mergekit.yml"), "--output", str(tmp_path / "out")])
    got = load_file(tmp_path / "out" / "model.safetensors")
    _assert_all_close(got, oracle(kit, "ties", WEIGHTS, density=[0.5, 0.3, 0.4]))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert [i["weight"] for i in report["ingredients"]] == WEIGHTS


def test_dtype_casts_the_inputs_and_the_arithmetic_follows_as_in_mergekit(kit: dict[str, Any], tmp_path: Path) -> None:
    models = [{"weight": w, "density": 0.5} for w in WEIGHTS]
    recipe = {**_recipe(kit, "dare_ties", models), "dtype": "bfloat16"}
    got = _run(recipe, tmp_path / "bf16", "--random-seed", "42")
    assert json.loads((tmp_path / "bf16" / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    # deltas, Bernoulli draws (bf16 probabilities), rescale, election and sums all in bf16, as mergekit
    expected = oracle(kit, "dare_ties", WEIGHTS, density=[0.5] * 3, seed=42, dtype=torch.bfloat16)
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], expected[k]) for k in expected)
    got = _run({**recipe, "out_dtype": "float32"}, tmp_path / "out32", "--random-seed", "42")
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], expected[k].float()) for k in expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"paramters": {"density": 0.2}}, r"The merge recipe has no key 'paramters': did you mean 'parameters'\?"),
        ({"merge_methd": "ties"}, r"has no key 'merge_methd': did you mean 'merge_method'\?"),
        ({"parameters": {"densty": 0.2}}, r"no parameter 'densty' \(did you mean 'density'\?\)"),
        ({"models": [{"model": "x", "parameter": {}}]}, r"Model 1 of the recipe has no key 'parameter': did you mean"),
        ({"models": [{"model": "x", "parameters": {"normalize": True}}]}, "'normalize' is a global parameter"),
        ({"method": "task_arithmetic"}, "sets both 'method' and 'merge_method'"),
        ({"dtype": "float8"}, r"dtype='float8' is not one of"),
    ],
)
def test_unknown_or_misplaced_keys_are_refused_in_one_sentence(
    kit: dict[str, Any], tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    recipe = {**_recipe(kit, "ties", [{"weight": 1.0}] * 3, density=0.5), **change}
    with pytest.raises(ValueError, match=message) as err:
        _run(recipe, tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "merged" / "model.safetensors").exists()
