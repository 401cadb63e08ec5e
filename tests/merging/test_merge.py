"""Streaming merges end to end on tiny random models: oracles per tensor, every input format, refusals, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lightning_ft.core.layer_map import classify
from lightning_ft.merging import MergePlan, compress, merge, ops, save_hf_folder
from lightning_ft.merging.cli import main


def _finetune(base: Path, out: Path, seed: int, dtype: torch.dtype | None = None) -> Path:
    """A fake fine-tune: the base folder with seeded noise added to every weight."""
    shutil.copytree(base, out)
    gen = torch.Generator().manual_seed(seed)
    state = load_file(base / "model.safetensors")
    noisy = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).to(dtype or v.dtype) for k, v in state.items()}
    save_file(noisy, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ft")
    return {
        "base": tiny_llama_dir,
        "a": _finetune(tiny_llama_dir, root / "a", 1),
        "b": _finetune(tiny_llama_dir, root / "b", 2),
    }


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_task_arithmetic_with_lines_matches_the_per_tensor_oracle(tiny: dict[str, Path], tmp_path: Path) -> None:
    base, a, b = (_tensors(tiny[k]) for k in ("base", "a", "b"))
    plan = MergePlan.build(str(tiny["base"]), [str(tiny["a"]), str(tiny["b"])], "task_arithmetic", lines=True)
    result = merge(plan, beta=0.5)
    assert result.report["lines"]["alpha"] == pytest.approx(0.5)  # 1 / T for task arithmetic
    for key, theta0 in base.items():
        block = classify(key)[0]
        factor = ops.lines_factor(block, 2, 0.5, 0.5)
        expected = theta0 + factor * ((a[key] - theta0) + (b[key] - theta0))
        torch.testing.assert_close(result.state[key], expected, rtol=0, atol=1e-6, msg=key)
    out = save_hf_folder(result.state, str(tiny["base"]), str(tmp_path / "out"), result.report)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(model.get_parameter(key).detach(), result.state[key])
    assert "LiNeS: alpha=0.5000" in (out / "merge_report.md").read_text()


def test_ties_and_breadcrumbs_stream_the_same_as_the_pure_functions(tiny: dict[str, Path]) -> None:
    base, a, b = (_tensors(tiny[k]) for k in ("base", "a", "b"))
    key = "model.layers.1.self_attn.q_proj.weight"
    for method, fn in (("ties", ops.ties), ("breadcrumbs", ops.breadcrumbs)):
        plan = MergePlan.build(str(tiny["base"]), [str(tiny["a"]), str(tiny["b"])], method,
                               {"scaling": 0.7, "density": 0.2}, model_params=[{"weight": 2.0}, None])  # fmt: skip
        expected = base[key] + fn([a[key] - base[key], b[key] - base[key]], density=0.2, weights=[2.0, 1.0], lam=0.7)
        torch.testing.assert_close(merge(plan).state[key], expected, rtol=0, atol=1e-6)


def test_dtype_is_preserved_and_checkpoints_equal_folders(tiny_llama_dir: Path, tmp_path: Path) -> None:
    base = _finetune(tiny_llama_dir, tmp_path / "base16", 0, torch.bfloat16)
    ft = _finetune(base, tmp_path / "ft16", 3)
    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in _tensors(ft).items()}, "epoch": 0}, ckpt)
    folder = merge(MergePlan.build(str(base), [str(ft)], "uniform_soup")).state
    from_ckpt = merge(MergePlan.build(str(base), [str(ckpt)], "uniform_soup")).state
    assert all(v.dtype == torch.bfloat16 for v in folder.values())
    assert all(torch.equal(folder[k], from_ckpt[k]) for k in folder)
    assert all(torch.equal(folder[k], v) for k, v in _tensors(ft).items())  # a one-ingredient soup is the model


def test_lora_adapter_merges_as_b_times_a(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False),
    )
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload().state_dict()
    state = merge(
        MergePlan.build(str(tiny_gpt2_dir), [str(tmp_path / "adapter")], "task_arithmetic", {"scaling": 1.0})
    ).state
    for key in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight", "transformer.wte.weight"):
        torch.testing.assert_close(state[key], merged[key], rtol=0, atol=1e-6, msg=key)


def test_mismatches_are_refused_naming_the_first_tensor(
    tiny: dict[str, Path], tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"has no tensor 'lm_head.weight'|has no tensor 'model\.") as err:
        MergePlan.build(str(tiny["base"]), [str(tiny_gpt2_dir)], "ties")
    assert str(err.value).count(".") <= 6 and "\n" not in str(err.value)
    bad = tmp_path / "bad"
    shutil.copytree(tiny["a"], bad)
    state = _tensors(bad)
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:10]
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"at tensor 'model.layers.1.mlp.up_proj.weight': shape \(10, 32\) vs \(64, 32\)"
    ):
        MergePlan.build(str(tiny["base"]), [str(tiny["a"]), str(bad)], "task_arithmetic")
    with pytest.raises(ValueError, match="is not an HF folder .* or a sparse fine-tuning artifact"):
        MergePlan.build(str(tiny["base"]), [str(tmp_path)], "ties")
    plan = MergePlan.build(str(tiny["base"]), [str(tiny["a"])], "task_arithmetic", lines=True)
    with pytest.raises(ValueError, match="give eval data"):
        merge(plan, beta="sweep")


def test_open_source_imports_the_format_modules_by_name_and_asks_their_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_ft.core.weights import open_source, sources

    (tmp_path / "lft_test_format.py").write_text(
        "from lightning_ft.core.weights import TensorSource, register_format\n"
        "class Marked(TensorSource):\n"
        "    kind = 'marked'\n"
        "    def __init__(self, path):\n"
        "        self.name = str(path)\n"
        "register_format('marked', lambda p: p.suffix == '.marked', Marked, 'a marked file')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lft_test_format", raising=False)
    monkeypatch.setattr(sources, "_FORMATS", {})
    monkeypatch.setattr(sources, "FORMAT_MODULES", ("lft_test_format",))
    (tmp_path / "x.marked").write_bytes(b"")
    source = open_source(tmp_path / "x.marked", [])
    assert (source.kind, source.name) == ("marked", str(tmp_path / "x.marked"))
    with pytest.raises(ValueError) as err:
        open_source(tmp_path, [])
    assert str(err.value) == (
        f"{tmp_path} is not an HF folder (model.safetensors), a peft adapter folder, a Lightning .ckpt or a marked "
        "file."
    )


def test_greedy_soup_keeps_ingredients_that_improve_the_score(tiny: dict[str, Path], tmp_path: Path) -> None:
    bad = _finetune(tiny["base"], tmp_path / "bad", 9)
    key = "model.layers.0.mlp.down_proj.weight"
    target = (_tensors(tiny["a"])[key] + _tensors(tiny["b"])[key]) / 2

    def score(state: dict[str, torch.Tensor]) -> float:
        return -float((state[key] - target).norm())

    plan = MergePlan.build(str(tiny["base"]), [str(bad), str(tiny["a"]), str(tiny["b"])], "greedy_soup")
    result = merge(plan, score=score)
    kept = [s["add"] for s in result.report["greedy"]["steps"] if s["kept"]]
    assert sorted(kept) == sorted([str(tiny["a"]), str(tiny["b"])])
    torch.testing.assert_close(result.state[key], target, rtol=0, atol=1e-6)


def test_greedy_soup_needs_a_strict_improvement(tiny: dict[str, Path]) -> None:
    """A candidate whose soup scores the same as the best so far is not kept (official: ``>``)."""
    plan = MergePlan.build(str(tiny["base"]), [str(tiny["a"]), str(tiny["b"])], "greedy_soup")
    result = merge(plan, score=lambda state: 0.5)  # every candidate ties
    assert [s["kept"] for s in result.report["greedy"]["steps"]] == [True, False]
    assert all(torch.equal(v, _tensors(tiny["a"])[k]) for k, v in result.state.items())  # a alone (first of equals)


def test_shipped_recipe_is_valid(tmp_path: Path) -> None:
    from lightning_ft.merging.cli import _merge_parser, _recipe
    from lightning_ft.merging.registry import get_method

    recipe = _recipe(_merge_parser().parse_args(["--config", "configs/merge_recipe.yaml"]))
    resolved = get_method(recipe["method"]).resolve(recipe["parameters"], recipe["model_params"])
    assert [m["weight"] for m in resolved.models] == [1.0, 1.0] and resolved.models[0]["density"] == 0.2


def test_compeft_reconstruction_and_ratio(tmp_path: Path) -> None:
    base = {"w": torch.zeros(4, 4), "b": torch.ones(4)}
    tau = {"w": torch.arange(1, 17, dtype=torch.float32).view(4, 4) * torch.tensor([1.0, -1.0]).repeat(8).view(4, 4),
           "b": torch.tensor([0.5, -20.0, 0.25, 3.0])}  # fmt: skip
    for name, state in (("base", base), ("ft", {k: base[k] + tau[k] for k in base})):
        (tmp_path / name).mkdir()
        save_file(state, str(tmp_path / name / "model.safetensors"))
    report = compress(tmp_path / "base", tmp_path / "ft", tmp_path / "c.safetensors", density=0.25, alpha=2.0)
    flat = torch.cat([tau["w"].flatten(), tau["b"]])  # file order: b, w; stats are global
    sigma = float(flat.std())  # unbiased std over the whole unpruned update
    threshold = torch.topk(flat.abs(), 5).values[-1]  # floor(0.25 * 20) = 5 entries
    assert report.kept == 5 and report.total == 20
    restored = merge(MergePlan.build(str(tmp_path / "base"), [str(tmp_path / "c.safetensors")], "task_arithmetic",
                                     {"scaling": 1.0})).state  # fmt: skip
    for key in base:
        expected = base[key] + torch.where(tau[key].abs() >= threshold, 2.0 * sigma * torch.sign(tau[key]), 0.0)
        torch.testing.assert_close(restored[key], expected, rtol=0, atol=1e-6)


def test_cli_merge_recipe_compress_decompress_and_help(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = {"base": str(tiny["base"]), "models": [{"path": str(tiny["a"])}, str(tiny["b"])], "method": "ties",
              "parameters": {"density": 0.5}, "lines": {"beta": 1.0}, "output": str(tmp_path / "m")}  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    main(["merge", "--config", str(tmp_path / "r.yaml"), "--param", "density=0.3"])
    report = (tmp_path / "m" / "merge_report.json").read_text()
    assert '"density": 0.3' in report and (tmp_path / "m" / "config.json").is_file()
    # the report on W&B (offline here), read back with W&B's own reader
    run_file = next((tmp_path / "m" / "wandb").glob("offline-run-*/run-*.wandb"))
    wandb_bin = Path(sys.executable).parent / "wandb"
    out = subprocess.run([str(wandb_bin), "leet", "inspect", "--json", str(run_file)], capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    history: set[str] = set()
    summary: dict[str, object] = {}
    for record in (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")):
        history.update(record.get("history", {}).get("item", {}))
        summary.update(record.get("summary", {}).get("update", {}))
    assert any(k.startswith("panels/merge/ingredients") for k in history)
    assert summary["merge/method"] == "ties" and summary["merge/ingredients"] == 2
    main(["compress", "--base", str(tiny["base"]), "--model", str(tiny["a"]), "--output", str(tmp_path / "a.sft"
          ".safetensors"), "--density", "0.05"])  # fmt: skip
    assert "compression ratio" in capsys.readouterr().out
    main(["decompress", "--base", str(tiny["base"]), "--artifact", str(tmp_path / "a.sft.safetensors"),
          "--output", str(tmp_path / "d")])  # fmt: skip
    assert (tmp_path / "d" / "model.safetensors").is_file()
    for command in ("merge", "compress", "decompress"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
    assert "breadcrumbs" in capsys.readouterr().out


def test_compeft_of_a_lora_adapter_applies_back(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir),
        LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False),
    )
    model.save_pretrained(tmp_path / "adapter")
    report = compress(tiny_gpt2_dir, tmp_path / "adapter", tmp_path / "l.safetensors", density=1.0, scope="tensor")
    assert report.kind == "lora" and report.kept == report.total and report.ratio > 1  # tiny: the JSON header dominates
    state = merge(MergePlan.build(str(tiny_gpt2_dir), [str(tmp_path / "l.safetensors")], "task_arithmetic",
                                  {"scaling": 1.0})).state  # fmt: skip
    key = "transformer.h.0.attn.c_attn.weight"
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    a, b = (adapter[f"base_model.model.transformer.h.0.attn.c_attn.lora_{x}.weight"] for x in "AB")
    ternary = [t.std() * torch.sign(t) for t in (a, b)]  # density 1: every entry, one scale per tensor
    expected = _tensors(tiny_gpt2_dir)[key] + (ternary[1] @ ternary[0] * (8 / 4)).T
    torch.testing.assert_close(state[key], expected, rtol=0, atol=1e-5)
