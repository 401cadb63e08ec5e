"""Sentence embeddings for data selection, batched and cached on disk by content hash.

:class:`Embedder` embeds texts with the bundled all-MiniLM-L6-v2 (``minilm-l6``) the way sentence-transformers does
for that model (its ``modules.json``: the transformer, mean pooling over the attention-masked tokens, L2
normalisation; ``max_seq_length`` 256), or with any causal LM (``smollm2-135m`` or a folder), mean-pooling its last
hidden states over the non-padding tokens and normalising. Vectors are float32 with norm 1.

The cache is a folder of shard files (``<id>.npy``, one per embedded batch) and an index (``index.jsonl``: one line
per shard naming the sha256 keys of its rows). A key is the hash of the model's fingerprint, ``max_length`` and the
text. A shard is written atomically before its index line is appended (and flushed to disk), so a run interrupted at
any point keeps every finished batch, and a rerun embeds only the texts the index lacks; a torn last index line is
ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from lightning_ft.errors import UserError

__all__ = ["Embedder", "folder_fingerprint"]

_INDEX = "index.jsonl"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def folder_fingerprint(folder: str | os.PathLike[str], *extra: str) -> str:
    """A short hash identifying the model saved in ``folder``: its resolved path, and the name, size and modification
    time of each of its files (a folder written over by a new fit gets a new fingerprint), plus ``extra``."""
    root = Path(folder).resolve()
    digest = hashlib.sha256(str(root).encode())
    for file in sorted(p for p in root.iterdir() if p.is_file()):
        stat = file.stat()
        digest.update(f"\0{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    for item in extra:
        digest.update(f"\0{item}".encode())
    return digest.hexdigest()[:16]


def _is_causal(config: Any) -> bool:
    architectures = getattr(config, "architectures", None) or []
    return any(a.endswith("ForCausalLM") for a in architectures) or bool(getattr(config, "is_decoder", False))


def _pooling_mode(folder: Path) -> str:
    """The sentence-transformers pooling of a folder (``1_Pooling/config.json``): ``mean`` (default) or ``cls``."""
    config = folder / "1_Pooling" / "config.json"
    if not config.is_file():
        return "mean"
    settings = json.loads(config.read_text(encoding="utf-8"))
    if settings.get("pooling_mode_cls_token"):
        return "cls"
    if not settings.get("pooling_mode_mean_tokens", True):
        raise UserError(f"the model {folder} pools its sentence embeddings in a way Embedder does not support "
                        "(only mean and CLS pooling are): give a mean-pooled encoder or a causal LM.")  # fmt: skip
    return "mean"


class _Cache:
    """The on-disk vector store: ``.npy`` shards plus ``index.jsonl`` (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.where: dict[str, tuple[str, int]] = {}
        self._shards: dict[str, np.ndarray] = {}
        index = folder / _INDEX
        if index.is_file():
            for line in index.read_text(encoding="utf-8").splitlines():
                self._read_line(line)

    def _read_line(self, line: str) -> None:
        try:
            entry = json.loads(line)
            shard, keys = str(entry["shard"]), list(entry["keys"])
        except (ValueError, KeyError, TypeError):
            return  # a torn line of an interrupted append
        if (self.folder / shard).is_file():
            self.where.update((key, (shard, row)) for row, key in enumerate(keys))

    def get(self, key: str) -> np.ndarray:
        shard, row = self.where[key]
        if shard not in self._shards:
            self._shards[shard] = np.load(self.folder / shard, mmap_mode="r")
        return np.asarray(self._shards[shard][row], dtype=np.float32)

    def put(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        """Store one batch: the shard first (atomically), then its index line (appended, flushed to disk)."""
        from lightning_ft.core.io import atomic_file

        self.folder.mkdir(parents=True, exist_ok=True)
        shard = f"{secrets.token_hex(8)}.npy"
        with atomic_file(self.folder / shard) as tmp, open(tmp, "wb") as file:
            np.save(file, np.ascontiguousarray(vectors, dtype=np.float32))
        append_line(self.folder / _INDEX, json.dumps({"shard": shard, "keys": list(keys)}))
        self.where.update((key, (shard, row)) for row, key in enumerate(keys))


def append_line(path: Path, line: str) -> None:
    """Append one line to ``path`` in one write, flushed to disk; a torn last line left by a crash is ended first."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        os.write(fd, (("\n" if torn else "") + line + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


class Embedder:
    """Normalised sentence embeddings of texts, batched and cached on disk (see the module docstring).

    Args:
        model: A bundled alias (``minilm-l6`` = all-MiniLM-L6-v2, ``smollm2-135m``) or a Hugging Face model folder: an
            encoder is pooled as its sentence-transformers config says (mean by default), a causal LM is mean-pooled
            over its last hidden states.
        cache_dir: The folder of the vector cache; ``None`` keeps nothing on disk.
        batch_size: Texts per forward pass (and per cache shard).
        max_length: Tokens per text (longer texts are truncated).
        device: Where the model runs (``cpu``, ``cuda``).

    Example::

        embedder = Embedder("minilm-l6", cache_dir="~/.cache/lightning_ft/curation/embeddings")
        vectors = embedder.embed(["a good film", "a great movie"])  # [2, 384] float32, unit norm
    """

    def __init__(
        self,
        model: str = "minilm-l6",
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        batch_size: int = 64,
        max_length: int = 256,
        device: str = "cpu",
    ) -> None:
        if batch_size < 1 or max_length < 2:
            raise UserError(f"Embedder needs batch_size >= 1 and max_length >= 2 (got {batch_size} and {max_length}).")
        self.model_name, self.batch_size, self.max_length, self.device = str(model), batch_size, max_length, device
        self.model, self.tokenizer, self.pooling = self._load(str(model))
        self.dim: int = int(self.model.config.hidden_size)
        self.fingerprint = folder_fingerprint(self.folder, self.pooling)
        self.cache = _Cache(Path(cache_dir).expanduser()) if cache_dir is not None else None

    def _load(self, model: str) -> tuple[Any, Any, str]:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from lightning_ft.assets import resolve_model

        self.folder = Path(resolve_model(model, weights=True))
        if not (self.folder / "config.json").is_file():
            raise UserError(f"Embedder(model={model!r}) is an adapter folder without its base model: merge the adapter "
                            "into its base (lightning-ft merge) or give a full model folder.")  # fmt: skip
        config = AutoConfig.from_pretrained(self.folder)
        pooling = "causal-mean" if _is_causal(config) else _pooling_mode(self.folder)
        tokenizer = AutoTokenizer.from_pretrained(self.folder)
        tokenizer.padding_side = "right"  # a causal LM's positions then match those of the text alone
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        net = AutoModel.from_pretrained(self.folder, dtype="float32").to(self.device).eval()
        return net, tokenizer, pooling

    # ------------------------------------------------------------------ embedding
    def key(self, text: str) -> str:
        """The cache key of ``text``: sha256 of the model's fingerprint, ``max_length`` and the text."""
        return hashlib.sha256(f"{self.fingerprint}\0{self.max_length}\0{text}".encode()).hexdigest()

    def embed(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """The ``[len(texts), dim]`` float32 unit vectors of ``texts``; cached texts are not embedded again.

        Texts missing from the cache are embedded in batches of similar length; each finished batch is stored at
        once, so an interrupted call loses at most the batch in flight.
        """
        texts = [str(t) for t in texts]
        keys = [self.key(t) for t in texts]
        known: dict[str, np.ndarray] = {}
        todo: dict[str, str] = {}
        for key, text in zip(keys, texts):
            if self.cache is not None and key in self.cache.where:
                known[key] = self.cache.get(key)
            elif key not in known:
                todo[key] = text
        known.update(self._embed_missing(todo, progress))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for row, key in enumerate(keys):
            out[row] = known[key]
        return out

    def _embed_missing(self, todo: dict[str, str], progress: bool) -> dict[str, np.ndarray]:
        order = sorted(todo, key=lambda k: len(todo[k]))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if progress and batches:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=f"embedding with {self.model_name}", unit="batch")
        done: dict[str, np.ndarray] = {}
        for batch in batches:
            vectors = self._forward([todo[k] for k in batch])
            if self.cache is not None:
                self.cache.put(batch, vectors)
            done.update(zip(batch, vectors))
        return done

    def embed_batches(self, texts: Iterable[str], batch_size: int | None = None) -> Iterator[np.ndarray]:
        """Embed a stream of texts, yielding one ``[<= batch_size, dim]`` array per chunk (for pools larger than
        memory: only one chunk of texts and vectors is held at a time)."""
        size = batch_size or self.batch_size
        if size < 1:
            raise UserError(f"embed_batches needs batch_size >= 1 (got {size}).")
        stream = iter(texts)
        while chunk := list(islice(stream, size)):
            yield self.embed(chunk)

    def _forward(self, texts: list[str]) -> np.ndarray:
        """One forward pass: the normalised pooled vectors of ``texts``."""
        import torch

        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.no_grad():
            hidden = self.model(**enc).last_hidden_state.float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled.cpu().numpy().astype(np.float32)
