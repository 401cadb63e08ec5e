"""Batched generation and teacher-forced likelihoods for data curation, cached so that a rerun generates nothing twice.

:class:`GenerationService` wraps a causal LM: a bundled alias or an HF folder (a full model, or a peft LoRA adapter
folder whose ``adapter_config.json`` names its base; optionally quantized to 4 or 8 bit with bitsandbytes), or an
in-memory module (a LightningFTModule such as ``CausalLMModule``, whose ``backbone`` and ``tokenizer`` are used, or a
Hugging Face model with its tokenizer).

:meth:`GenerationService.generate` pads prompts on the left and decodes greedily or by sampling. Sampling is seeded
per prompt and per sample: each row draws its own Gumbel noise from a generator seeded by ``(seed, prompt, sample
index)`` and the decoder takes the argmax of the tempered, nucleus-filtered logits plus that noise (the Gumbel-max
trick, an exact sample of the same distribution), so a completion does not depend on which prompts share its batch.
Completions are cached in a JSONL file, one line per ``(model fingerprint, prompt, settings)`` key, appended and
flushed to disk after every batch; a rerun reads it and generates only the missing keys, and a torn last line of an
interrupted write is ignored.

:meth:`GenerationService.answer_logprob` and :meth:`GenerationService.mean_token_nll` score texts with teacher
forcing in batches (the response tokens only, for prompt/response pairs), tokenised as the instruction DataModule
tokenises training examples (:func:`lightning_ft.data.collate.encode_example`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_ft.curation.embedder import append_line, folder_fingerprint
from lightning_ft.errors import UserError

__all__ = ["GenerationService", "GenerationSettings", "module_fingerprint"]

_CACHE_FILE = "generations.jsonl"


@dataclass(frozen=True)
class GenerationSettings:
    """How :meth:`GenerationService.generate` decodes (every field is part of the cache key).

    Args:
        max_new_tokens: Tokens generated at most per completion.
        do_sample: Sample (with ``temperature`` and ``top_p``) instead of greedy decoding.
        temperature: Divides the logits before sampling.
        top_p: Nucleus sampling: keep the most likely tokens whose probabilities sum to ``top_p``.
        num_samples: Completions per prompt (greedy decoding repeats its one completion).
        seed: Seed of the per-prompt sampling generators.
        chat_template: Wrap each prompt in the tokenizer's chat template (a user turn and the generation prompt).
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0
    chat_template: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.num_samples < 1:
            raise UserError(f"GenerationSettings needs max_new_tokens >= 1 and num_samples >= 1 (got "
                            f"{self.max_new_tokens} and {self.num_samples}).")  # fmt: skip
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise UserError(f"GenerationSettings needs temperature > 0 and 0 < top_p <= 1 (got {self.temperature} "
                            f"and {self.top_p}): use do_sample=False for greedy decoding.")  # fmt: skip


def module_fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a module's weights (names, dtypes, shapes and bytes of its state dict).

    The hash is remembered on the module with the storage address and version counter of every tensor (which every
    in-place change, an optimizer step or ``load_state_dict`` included, increments): it is computed again only after
    the weights changed.
    """
    tensors = module.state_dict(keep_vars=True).items()
    state = sorted(((n, t) for n, t in tensors if isinstance(t, torch.Tensor)), key=lambda item: item[0])
    stamp = tuple((name, tensor.data_ptr(), tensor._version) for name, tensor in state)
    memo = module.__dict__.get("_curation_fingerprint")
    if memo is not None and memo[0] == stamp:
        return memo[1]
    digest = hashlib.sha256()
    for name, tensor in state:
        flat = tensor.detach().cpu().contiguous()
        digest.update(f"\0{name}\0{flat.dtype}\0{tuple(flat.shape)}\0".encode())
        digest.update(flat.reshape(-1).view(torch.uint8).numpy())
    module.__dict__["_curation_fingerprint"] = (stamp, digest.hexdigest()[:16])
    return digest.hexdigest()[:16]


def _row_seed(seed: int, prompt: str, sample: int) -> int:
    return int(hashlib.sha256(f"{seed}\0{sample}\0{prompt}".encode()).hexdigest()[:15], 16)


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logits`` with the tokens outside each row's nucleus of mass ``top_p`` set to ``-inf`` (the top one is kept)."""
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = ordered.softmax(-1)
    outside = probs.cumsum(-1) - probs > top_p
    outside[..., 0] = False
    return logits.scatter(-1, order, ordered.masked_fill(outside, float("-inf")))


class _GumbelSampler:
    """A logits processor that turns greedy decoding into seeded sampling, one generator per row (Gumbel-max)."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float) -> None:
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            logits = _top_p(logits, self.top_p)
        vocab = logits.shape[-1]
        uniform = torch.stack([torch.rand(vocab, generator=g) for g in self.generators]).to(logits.device)
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-12, 1.0 - 1e-7)))
        return logits + gumbel


@contextlib.contextmanager
def _evaluating(net: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the block; the module's previous mode is restored."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        net.train(was_training)


class GenerationService:
    """Generate completions and score answers with one causal LM (see the module docstring).

    Args:
        model: A bundled alias (``smollm2-135m``), an HF model folder, a peft LoRA adapter folder (its base is loaded
            from ``base_model_name_or_path``), or an in-memory module (a LightningFTModule, whose ``backbone`` and
            ``tokenizer`` are used, or a Hugging Face causal LM together with ``tokenizer``).
        tokenizer: The tokenizer (an object, or an alias or folder to load it from); default: the model's own.
        cache: The generation cache: a ``.jsonl`` file, or a folder that holds ``generations.jsonl``; ``None``
            keeps nothing.
        batch_size: Prompts (or scored texts) per forward batch.
        progress: Show a progress bar while generating.
        quantization: Load the model in ``nf4``, ``fp4`` or ``int8`` through bitsandbytes (folders only).
        dtype: The dtype of a model loaded from a folder.
        device: Where a loaded model runs; default ``cuda`` when available, else ``cpu``.
        max_length: Prompt tokens kept for generation (the end of a longer prompt) and tokens per scored text.

    Attributes:
        model: The causal LM (possibly peft-wrapped or quantized).
        tokenizer: Its tokenizer.
        fingerprint: A short hash identifying the weights (part of every cache key).

    Example::

        service = GenerationService("smollm2-135m", cache="~/.cache/lightning_ft/curation/generations")
        [[answer]] = service.generate(["What is the capital of France?"], GenerationSettings(max_new_tokens=16))
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | torch.nn.Module,
        *,
        tokenizer: Any = None,
        cache: str | os.PathLike[str] | None = None,
        batch_size: int = 8,
        progress: bool = False,
        quantization: str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        max_length: int = 1024,
    ) -> None:
        if batch_size < 1 or max_length < 2:
            raise UserError(f"GenerationService needs batch_size >= 1 and max_length >= 2 (got {batch_size} and "
                            f"{max_length}).")  # fmt: skip
        self.batch_size, self.progress, self.max_length = batch_size, progress, max_length
        if isinstance(model, torch.nn.Module):
            if quantization is not None:
                raise UserError("quantization applies to a model loaded from a folder, not to an in-memory module: "
                                "quantize the module yourself or pass its folder.")  # fmt: skip
            self.model, self.tokenizer = self._from_module(model, tokenizer)
            self._fingerprint: str | None = None  # the module's weights may change: hashed when used (memoised)
            self.name = type(model).__name__
        else:
            self.name = str(model)
            self.model, self.tokenizer, self._fingerprint = self._from_folder(str(model), tokenizer, quantization,
                                                                              dtype, device)  # fmt: skip
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.cache_file = self._cache_file(cache)
        self._cached: dict[str, list[str]] = self._read_cache() if self.cache_file is not None else {}

    # ------------------------------------------------------------------ loading
    @staticmethod
    def _from_module(model: torch.nn.Module, tokenizer: Any) -> tuple[torch.nn.Module, Any]:
        net = getattr(model, "backbone", None)
        net = net if isinstance(net, torch.nn.Module) else model
        tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise UserError(f"GenerationService(model=<{type(model).__name__}>) needs a tokenizer: pass tokenizer=<the "
                            "tokenizer, an alias or a folder>, or a module with a `tokenizer` attribute.")  # fmt: skip
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = _load_tokenizer(str(tokenizer))
        return net, tokenizer

    @staticmethod
    def _from_folder(
        model: str, tokenizer: Any, quantization: str | None, dtype: str, device: str | None
    ) -> tuple[torch.nn.Module, Any, str]:
        from transformers import AutoModelForCausalLM

        from lightning_ft.assets import adapter_base, resolve_model
        from lightning_ft.modules.backbone import quantization_config, torch_dtype

        path = Path(resolve_model(model, weights=True))
        adapter = (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()
        base = Path(resolve_model(adapter_base(path), weights=True)) if adapter else path
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype)}
        if quantization is not None:
            kwargs["quantization_config"] = quantization_config(quantization, torch_dtype(dtype))
            kwargs["device_map"] = {"": device}
        net = AutoModelForCausalLM.from_pretrained(base, **kwargs)
        if quantization is None:
            net = net.to(device)
        if adapter:
            from peft import PeftModel

            net = PeftModel.from_pretrained(net, path)
        if tokenizer is None:
            has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
            tokenizer = str(path if has_tokenizer else base)
        tokenizer = _load_tokenizer(str(tokenizer)) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        parts = [folder_fingerprint(base, dtype, quantization or "")]
        if adapter:
            parts.append(folder_fingerprint(path))
        return net.eval(), tokenizer, "-".join(parts)

    @property
    def fingerprint(self) -> str:
        """A short hash identifying the weights: of the folders loaded, or of an in-memory module's current weights."""
        return self._fingerprint if self._fingerprint is not None else module_fingerprint(self.model)

    # ------------------------------------------------------------------ the cache
    @staticmethod
    def _cache_file(cache: str | os.PathLike[str] | None) -> Path | None:
        if cache is None or str(cache) == "":
            return None
        path = Path(cache).expanduser()
        return path if path.suffix == ".jsonl" else path / _CACHE_FILE

    def _read_cache(self) -> dict[str, list[str]]:
        assert self.cache_file is not None
        found: dict[str, list[str]] = {}
        if not self.cache_file.is_file():
            return found
        with open(self.cache_file, encoding="utf-8", errors="replace") as file:
            for line in file:
                try:
                    row = json.loads(line)
                    found[str(row["key"])] = [str(c) for c in row["completions"]]
                except (ValueError, KeyError, TypeError):
                    continue  # a torn line of an interrupted write
        return found

    def key(self, prompt: str, settings: GenerationSettings, fingerprint: str | None = None) -> str:
        """The cache key of one prompt: sha256 of the model's fingerprint, the prompt and the settings."""
        model = fingerprint or self.fingerprint
        text = json.dumps([model, prompt, asdict(settings)], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def _store(self, rows: list[tuple[str, str, list[str]]], settings: GenerationSettings, fingerprint: str) -> None:
        for key, _, completions in rows:
            self._cached[key] = completions
        if self.cache_file is None:
            return
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"key": key, "model": fingerprint, "prompt": prompt, "settings": asdict(settings),
                             "completions": completions}, ensure_ascii=False) for key, prompt, completions in rows]  # fmt: skip
        append_line(self.cache_file, "\n".join(lines))

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[str], settings: GenerationSettings = GenerationSettings()) -> list[list[str]]:
        """``settings.num_samples`` completions (the decoded new tokens) per prompt, in the order of ``prompts``.

        Prompts whose key is cached are not generated again; the others are generated in batches of similar length,
        and each finished batch is appended to the cache at once.
        """
        fingerprint = self.fingerprint
        keys = [self.key(str(p), settings, fingerprint) for p in prompts]
        todo = {k: str(p) for k, p in zip(keys, prompts) if k not in self._cached}
        if todo:
            self._generate_missing(todo, settings, fingerprint)
        return [list(self._cached[k]) for k in keys]

    def _generate_missing(self, todo: dict[str, str], settings: GenerationSettings, fingerprint: str) -> None:
        encoded = {k: self._encode_prompt(p, settings) for k, p in todo.items()}
        order = sorted(todo, key=lambda k: len(encoded[k]))
        bar = self._bar(len(order), f"generating with {self.name}", "prompt")
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            completions = self._generate_batch([todo[k] for k in batch], [encoded[k] for k in batch], settings)
            self._store([(k, todo[k], c) for k, c in zip(batch, completions)], settings, fingerprint)
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()

    def _bar(self, total: int, desc: str, unit: str) -> Any:
        """A tqdm progress bar when the service was built with ``progress`` (else ``None``)."""
        if not self.progress or total == 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit)

    def render(self, prompt: str, chat_template: bool) -> str:
        """The prompt as the model sees it: wrapped in the tokenizer's chat template when ``chat_template``."""
        if not chat_template:
            return prompt
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise UserError(f"the tokenizer of {self.name} has no chat template: drop the chat-template option, or use "
                            "an instruction-tuned model that has one.")  # fmt: skip
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _encode_prompt(self, prompt: str, settings: GenerationSettings) -> list[int]:
        from lightning_ft.data.collate import encode_prompt

        return encode_prompt(self.tokenizer, self.render(prompt, settings.chat_template), self.max_length)

    def _generate_batch(
        self, prompts: list[str], encoded: list[list[int]], settings: GenerationSettings
    ) -> list[list[str]]:
        from lightning_ft.data.collate import pad_left

        copies = settings.num_samples if settings.do_sample else 1
        rows = [ids for ids in encoded for _ in range(copies)]
        input_ids = pad_left(rows, self.tokenizer.pad_token_id).to(self.device)
        mask = pad_left([[1] * len(ids) for ids in rows], 0).to(self.device)
        options: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "do_sample": False,
                                   "pad_token_id": self.tokenizer.pad_token_id}  # fmt: skip
        if settings.do_sample:
            from transformers import LogitsProcessorList

            seeds = [_row_seed(settings.seed, p, j) for p in prompts for j in range(copies)]
            options["logits_processor"] = LogitsProcessorList([_GumbelSampler(seeds, settings.temperature,
                                                                              settings.top_p)])  # fmt: skip
        with _evaluating(self.model):
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, **options)
        texts = self.tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
        grouped = [texts[i * copies : (i + 1) * copies] for i in range(len(prompts))]
        return [group * settings.num_samples if copies == 1 else group for group in grouped]

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter (inputs are moved there)."""
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ scoring
    def answer_logprob(
        self, prompts: Sequence[str], answers: Sequence[str], *, chat_template: bool = False
    ) -> np.ndarray:
        """``sum_t log p(answer_t | prompt, answer_<t)`` per pair (float64): the model's own answer likelihood.

        The prompt is tokenised with the tokenizer's special tokens and the answer without, then concatenated (the
        prompt loses its start when the pair exceeds ``max_length``). An empty answer scores 0.
        """
        if len(prompts) != len(answers):
            raise UserError(f"answer_logprob needs one answer per prompt (got {len(prompts)} prompts and "
                            f"{len(answers)} answers).")  # fmt: skip
        scored = self._token_logprobs([(self.render(str(p), chat_template), str(a)) for p, a in zip(prompts, answers)])
        return np.array([float(s.sum()) for s in scored], dtype=np.float64)

    def mean_token_nll(
        self, texts_or_pairs: Sequence[str] | Sequence[tuple[str, str]], *, chat_template: bool = False
    ) -> np.ndarray:
        """The mean negative log-likelihood per scored token of each example (``exp`` of it is the perplexity).

        A plain text is scored on all its tokens after the first; a ``(prompt, response)`` pair on the response
        tokens only (the prompt wrapped in the chat template when ``chat_template``). An example without scored
        tokens gets NaN.
        """
        items: list[str | tuple[str, str]] = []
        for item in texts_or_pairs:
            if isinstance(item, str):
                items.append(item)
            else:
                prompt, response = item
                items.append((self.render(str(prompt), chat_template), str(response)))
        scored = self._token_logprobs(items)
        return np.array([-float(s.mean()) if s.size else float("nan") for s in scored], dtype=np.float64)

    def _encode_scored(self, item: str | tuple[str, str]) -> dict[str, list[int]]:
        from lightning_ft.data.collate import encode_example

        if isinstance(item, tuple):
            return encode_example(self.tokenizer, item[0], item[1], self.max_length, mask_prompt=True)
        ids = list(self.tokenizer(item, add_special_tokens=True)["input_ids"][: self.max_length])
        return {"input_ids": ids, "labels": [-100] + ids[1:]}

    def _token_logprobs(self, items: Sequence[str | tuple[str, str]]) -> list[np.ndarray]:
        """The log-probabilities of the scored tokens of each item (teacher forcing, batches of similar length)."""
        encoded = [self._encode_scored(item) for item in items]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
        found: list[np.ndarray] = [np.zeros(0)] * len(encoded)
        bar = self._bar(len(order), f"scoring with {self.name}", "text")
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for i, values in zip(batch, self._score_batch([encoded[i] for i in batch])):
                found[i] = values
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        return found

    def next_token_logprobs(self, texts: Sequence[str], token_ids: Sequence[int]) -> np.ndarray:
        """``log p(token | text)`` of the next token after each text (rows) for each of ``token_ids`` (columns),
        float64. Each text is tokenised with the tokenizer's special tokens (its end kept past ``max_length``) and
        scored in batches of similar length; one forward pass per batch."""
        from lightning_ft.data.collate import encode_prompt, pad_right

        encoded = [encode_prompt(self.tokenizer, str(t), self.max_length) for t in texts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        found = np.zeros((len(encoded), len(token_ids)), dtype=np.float64)
        columns = torch.tensor(list(token_ids), dtype=torch.long)
        bar = self._bar(len(order), f"scoring with {self.name}", "text")
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            input_ids = pad_right([encoded[i] for i in batch], self.tokenizer.pad_token_id).to(self.device)
            mask = pad_right([[1] * len(encoded[i]) for i in batch], 0).to(self.device)
            with _evaluating(self.model):
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits
            last = logits[torch.arange(len(batch)), torch.tensor([len(encoded[i]) - 1 for i in batch])].float()
            found[batch] = torch.log_softmax(last, dim=-1)[:, columns.to(last.device)].double().cpu().numpy()
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        return found

    def _score_batch(self, examples: list[dict[str, list[int]]]) -> list[np.ndarray]:
        from lightning_ft.data.collate import IGNORE_INDEX, pad_right
        from lightning_ft.modules.metrics import token_nll

        input_ids = pad_right([e["input_ids"] for e in examples], self.tokenizer.pad_token_id).to(self.device)
        labels = pad_right([e["labels"] for e in examples], IGNORE_INDEX).to(self.device)
        mask = pad_right([[1] * len(e["input_ids"]) for e in examples], 0).to(self.device)
        with _evaluating(self.model):
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits
        logprobs = -token_nll(logits, labels).double().cpu()
        targets = labels[:, 1:].cpu()
        return [logprobs[row][targets[row] != IGNORE_INDEX].numpy() for row in range(len(examples))]


def _load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    from lightning_ft.assets import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(source))
