"""Shared fixtures: offline environment, a tiny tokenizer and tiny random models for plumbing, and the
bundled SmolLM2 (converted once per machine into the user cache) for behaviour tests."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CACHE_DIR", os.path.join(tempfile.gettempdir(), "lightning-ft-wandb-cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_VOCAB = 320

if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n 2` on 2 cores: one intra-op thread per worker, no oversubscription
    torch.set_num_threads(1)

# The longest files first (measured with --durations): `--dist loadfile` gives each worker whole files in collection
# order, so starting the long ones first keeps the two workers' ends together instead of leaving one long file last.
LONGEST_FIRST = (
    "tests/test_quickstart.py",
    "tests/conformance/test_matrix.py",
    "tests/test_real_model.py",
    "tests/curation/test_spin.py",
    "tests/curation/test_self_training.py",
    "tests/curation/test_novelty.py",
    "tests/objectives/test_grpo.py",
    "tests/copilot/test_copilot_smollm2.py",
    "tests/callbacks/test_lines.py",
    "tests/sparse/test_sparse_smollm2.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order


def _train_tokenizer(texts: list[str]) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>", bos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer trained offline on bundled review text, saved to a folder."""
    from lightning_ft.assets import load_dataset_records

    texts = [r["text"] for r in load_dataset_records("rotten_tomatoes")[:2000]]
    texts += ["Review: good\nSentiment: positive", "Review: bad\nSentiment: negative"] * 50
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    _train_tokenizer(texts).save_pretrained(path)
    return path


def _save_tiny(kind: str, root: Path, tokenizer_dir: Path) -> Path:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if kind == "llama":
        cfg = LlamaConfig(
            vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **ids,
        )
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=TINY_VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=256, **ids)
        model = GPT2LMHeadModel(cfg)
    path = root / f"tiny-{kind}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A tiny random Llama (2 blocks, tied embeddings) with the tiny tokenizer, saved as an HF folder."""
    return _save_tiny("llama", tmp_path_factory.mktemp("models"), tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A tiny random GPT-2 (Conv1D layers) with the tiny tokenizer, saved as an HF folder."""
    return _save_tiny("gpt2", tmp_path_factory.mktemp("models"), tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A tiny random BERT encoder with the tiny tokenizer, saved as an HF folder (a classifier head on it is new)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, pad_token_id=tok.pad_token_id)  # fmt: skip
    path = tmp_path_factory.mktemp("models") / "tiny-bert"
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sentiment_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small local JSONL file of real review records (text, label), as a user would bring."""
    from lightning_ft.assets import load_dataset_records

    rows = load_dataset_records("rotten_tomatoes", shuffle_seed=7)[:300]
    path = tmp_path_factory.mktemp("data") / "reviews.jsonl"
    path.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct as a plain safetensors folder (converted once, cached)."""
    from lightning_ft.assets import resolve_model

    return Path(resolve_model("smollm2-135m"))


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)
