"""Representation shift and concept shift vectors (Khayatan et al. 2025, "Analyzing Fine-tuning Representation Shift
for Multimodal LLMs Steering"; a text port of the paper's analysis).

On a fixed probe set (a list of texts), the hidden state of every block output is recorded for the base model (at
the start of ``fit``) and for the model being fine-tuned. A layer's states are the states of every real (non-padding)
probe token, one row per token, in probe order: no pooling, so that each token is one sample of the linear CKA and
of the k-means below. Per layer (block ``i``'s output, ``i = 0 .. N-1``) two numbers say how far fine-tuning moved
the representation:

* the mean shift ``||mean(h_cur) - mean(h_base)||`` (mean over probe tokens), in the units of the hidden state;
* the linear CKA of Kornblith et al. 2019 between the base and current states (1: the same geometry up to a rotation,
  an isotropic scaling and a translation; it cannot see a constant offset, which the mean shift measures).

Concept shift vectors: the base states of one layer (``concept_layer``) are clustered by k-means into
``num_concepts`` concepts; for each concept ``c``, ``delta_c = mean(h_ft | c) - mean(h_base | c)`` over the probe
tokens the base model puts in ``c``. Adding ``delta_c`` to the base model's hidden state at that layer steers it
toward the fine-tuned behaviour without training (``lightning-ft steer``, :mod:`lightning_ft.monitors.steer`).

:class:`RepresentationShift` is the monitoring callback: every ``every_n_validations`` validations and at the end of
``fit`` it logs ``representation/cka_layer_XX`` and ``representation/shift_layer_XX`` through every logger, keeps the
history (``history``, restored on resume with the base states, so a resumed fit compares with the true base model),
and at the end of ``fit`` writes ``representation.json`` and ``concept_shifts.pt`` into the run folder. The probe
forward passes run on global rank 0 only, without gradients, in eval mode (each module's own mode is restored).
Hidden states are taken by forward hooks on the decoder blocks, not ``output_hidden_states``: transformers records
those before any user hook on a block has run, and its last entry is after the final norm.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn
from typing_extensions import override

from lightning_ft.core.anatomy import decoder_parts
from lightning_ft.core.io import atomic_file, write_text_atomic
from lightning_ft.core.support import MethodSupport, sharded_refusal
from lightning_ft.monitors.base import MonitorCallback, module_tokenizer
from lightning_ft.monitors.panels import Panel

__all__ = [
    "DEFAULT_PROBES",
    "RepresentationShift",
    "concept_shift_vectors",
    "kmeans",
    "linear_cka",
    "mean_shift",
    "nearest_concept",
    "probe_batches",
    "record_states",
]

#: the probe texts used when none are given: short, varied English sentences
DEFAULT_PROBES: tuple[str, ...] = (
    "The capital of France is Paris, a city on the river Seine.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "She opened the letter slowly and read it twice before answering.",
    "To sort a list in Python, call sorted() or the list's sort method.",
    "The film was long and predictable, but the music was wonderful.",
    "Seven times eight is fifty-six, and nine squared is eighty-one.",
    "Please summarize the following paragraph in one sentence.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of two sets of features of the same ``n`` samples (``[n, d1]``, ``[n, d2]``).

    The columns are centred, then ``CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``, in float64 (through the
    ``n x n`` Gram matrices when ``n`` is below the feature sizes). NaN when either set has no variance.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"linear_cka needs two [n, d] matrices of the same n >= 2 samples, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}.")  # fmt: skip
    x = x.detach().double().cpu()
    y = y.detach().double().cpu()
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    if x.shape[0] < min(x.shape[1], y.shape[1]):
        gx, gy = x @ x.T, y @ y.T
        cross, norm_x, norm_y = (gx * gy).sum(), gx.norm(), gy.norm()
    else:
        cross, norm_x, norm_y = (y.T @ x).pow(2).sum(), (x.T @ x).norm(), (y.T @ y).norm()
    denominator = norm_x * norm_y
    return float(cross / denominator) if denominator > 0 else float("nan")


def mean_shift(base: torch.Tensor, current: torch.Tensor) -> float:
    """``||mean(current) - mean(base)||``: the norm of the shift of the mean state (means over rows, float64)."""
    return float((current.detach().double().mean(dim=0) - base.detach().double().mean(dim=0)).norm())


def probe_batches(tokenizer: Any, texts: Sequence[str], max_length: int = 64, batch_size: int = 8) -> list[dict]:
    """The probe texts tokenized in batches (right padding, truncated to ``max_length`` tokens)."""
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                            max_length=max_length, padding_side="right", return_tensors="pt")  # fmt: skip
        batches.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    return batches


def record_states(model: nn.Module, batches: Sequence[dict]) -> list[torch.Tensor]:
    """The output of every decoder block of ``model`` (a causal LM, possibly peft-wrapped) for the real (non-padding)
    tokens of ``batches``: one ``[tokens, hidden]`` float32 CPU tensor per block, tokens in batch order.

    Runs without gradients and in eval mode; each module's training mode is restored afterwards.
    """
    layers = decoder_parts(model, "record_states").layers
    found: list[list[torch.Tensor]] = [[] for _ in layers]
    mask: list[torch.Tensor] = []

    def hook(index: int) -> Any:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            found[index].append(hidden.detach()[mask[0]].float().cpu())

        return record

    modes = {module: module.training for module in model.modules()}
    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                attention = batch["attention_mask"].to(device)
                mask[:] = [attention.bool()]
                model(input_ids=batch["input_ids"].to(device), attention_mask=attention, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return [torch.cat(parts) for parts in found]


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iterations: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means (k-means++ start, Lloyd iterations until no label changes) of the rows of ``x`` in float64.

    Returns ``(centroids [k, d] float32, labels [n] int64)``; deterministic for a given ``seed``.
    """
    data = x.detach().double().cpu()
    n = data.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans needs 1 <= k <= {n} rows, got k={k}.")
    g = torch.Generator().manual_seed(seed)
    centroids = data[torch.randint(n, (1,), generator=g)]
    for _ in range(1, k):
        weights = torch.cdist(data, centroids).pow(2).amin(dim=1)
        weights = weights if weights.sum() > 0 else torch.ones(n, dtype=data.dtype)
        centroids = torch.cat([centroids, data[torch.multinomial(weights, 1, generator=g)]])
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):
        new = torch.cdist(data, centroids).argmin(dim=1)
        if torch.equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = data[labels == c]
            if len(members):
                centroids[c] = members.mean(dim=0)
    return centroids.float(), labels


def nearest_concept(states: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The index of the nearest centroid (Euclidean) of each state (``[..., d]`` -> ``[...]``)."""
    flat = states.reshape(-1, states.shape[-1]).float()
    return torch.cdist(flat, centroids.to(flat.device).float()).argmin(dim=1).reshape(states.shape[:-1])


def concept_shift_vectors(
    base: torch.Tensor, current: torch.Tensor, labels: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``delta_c = mean(current | c) - mean(base | c)`` for each concept ``c < k`` (rows of ``base`` and
    ``current`` are the same tokens; ``labels`` their concepts). Returns ``(shifts [k, d] float32, counts [k])``; an
    empty concept has a zero shift."""
    if base.shape != current.shape or labels.shape != base.shape[:1]:
        raise ValueError(f"concept_shift_vectors needs base and current states of one shape and one label per row, "
                         f"got {tuple(base.shape)}, {tuple(current.shape)} and {tuple(labels.shape)}.")  # fmt: skip
    diff = current.detach().double() - base.detach().double()
    shifts = torch.zeros(k, base.shape[1], dtype=torch.float64)
    counts = torch.bincount(labels, minlength=k)[:k]
    shifts.index_add_(0, labels, diff)
    return (shifts / counts.clamp(min=1)[:, None]).float(), counts


class RepresentationShift(MonitorCallback):
    """Measures how fine-tuning moves each layer's representation of a fixed probe set, and saves concept shift
    vectors for steering (see the module docstring).

    Args:
        probe_texts: the probe set (default: :data:`DEFAULT_PROBES`, eight short sentences), tokenized with the
            LightningModule's ``tokenizer`` (else the model folder's).
        every_n_validations: measure after every n-th validation run (0: only at the end of ``fit``).
        concept_layer: the block whose output states are clustered into concepts (default: the middle block,
            ``num_layers // 2``).
        num_concepts: k of the k-means over the concept layer's base states (at most the number of probe tokens).
        max_length: probe texts are truncated to this many tokens.
        batch_size: probe texts per forward pass.
        seed: the k-means seed.
        filename: the JSON written into ``trainer.default_root_dir`` at the end of ``fit`` (``None``: none).
        shifts_filename: the concept shift vectors (``.pt``) written beside it (``None``: none).
        module: attribute path of the transformers model inside the LightningModule (default: found).

    Example::

        trainer = L.Trainer(callbacks=[RepresentationShift(every_n_validations=1, num_concepts=4)])
        # then: lightning-ft steer --model <base> --shifts <run>/concept_shifts.pt --all --prompt "..."
    """

    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "quantized", "lora", "mixed"}),
        {"fsdp2": sharded_refusal("runs the whole model's forward on global rank 0 alone")},
        notes="A monitor: it changes no weight; the probe forward passes run on global rank 0 only.",
    )
    prefix: ClassVar[str] = "representation"

    def __init__(
        self,
        probe_texts: list[str] | None = None,
        every_n_validations: int = 1,
        concept_layer: int | None = None,
        num_concepts: int = 4,
        max_length: int = 64,
        batch_size: int = 8,
        seed: int = 0,
        filename: str | None = "representation",
        shifts_filename: str | None = "concept_shifts",
        module: str | None = None,
    ) -> None:
        texts = list(DEFAULT_PROBES if probe_texts is None else probe_texts)
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError("probe_texts must be a non-empty list of non-empty strings (or None for the default set).")
        if concept_layer is not None and concept_layer < 0:
            raise ValueError(f"concept_layer={concept_layer} must be a block index, 0 or more (None: the middle one).")
        if num_concepts < 1:
            raise ValueError(f"num_concepts={num_concepts} must be at least 1.")
        if max_length < 1 or batch_size < 1:
            raise ValueError(f"max_length={max_length} and batch_size={batch_size} must both be at least 1.")
        super().__init__(every_n_validations, False, filename, module)
        self.probe_texts, self.concept_layer, self.num_concepts, self.seed = texts, concept_layer, num_concepts, seed
        self.max_length, self.batch_size, self.shifts_filename = max_length, batch_size, shifts_filename
        self.base_states: list[torch.Tensor] | None = None
        self.centroids: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self._batches: list[dict] = []
        self._layer = 0
        self._latest: list[torch.Tensor] | None = None  # the states of the last measurement

    @property
    @override
    def state_key(self) -> str:
        return f"RepresentationShift[concept_layer={self.concept_layer}, num_concepts={self.num_concepts}]"

    @override
    def check_model(self, model: nn.Module) -> None:
        num_layers = len(decoder_parts(model, type(self).__name__).layers)
        self._layer = num_layers // 2 if self.concept_layer is None else self.concept_layer
        if self._layer >= num_layers:
            raise ValueError(f"concept_layer={self.concept_layer} is not a block of this {num_layers}-block model: "
                             f"give a block index from 0 to {num_layers - 1}.")  # fmt: skip

    @override
    def prepare(self, trainer: L.Trainer, pl_module: L.LightningModule, model: nn.Module) -> None:
        tokenizer = module_tokenizer(pl_module, None, type(self).__name__, model)
        self._batches = probe_batches(tokenizer, self.probe_texts, self.max_length, self.batch_size)
        tokens = sum(int(b["attention_mask"].sum()) for b in self._batches)
        if tokens < self.num_concepts:
            raise ValueError(f"num_concepts={self.num_concepts} exceeds the {tokens} probe tokens: give more "
                             "probe_texts or fewer concepts.")  # fmt: skip

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        tokens = sum(int(b["attention_mask"].sum()) for b in self._batches)
        if self.base_states is not None:  # restored from the checkpoint on resume: the true base model's states
            if self.base_states[0].shape[0] != tokens:
                raise ValueError(f"the checkpoint's base states hold {self.base_states[0].shape[0]} probe tokens, "
                                 f"these probe_texts give {tokens}: resume with the run's own probe_texts.")  # fmt: skip
            return
        assert self._model is not None, "call setup('fit') first"
        self.base_states = record_states(self._model, self._batches)
        self.centroids, self.labels = kmeans(self.base_states[self._layer], self.num_concepts, self.seed)

    @override
    def measure(self) -> dict[str, Any]:
        """The per-layer CKA and mean shift of the model as it is now against the base states."""
        assert self._model is not None and self.base_states is not None, "call setup('fit') and on_fit_start first"
        current = record_states(self._model, self._batches)
        self._latest = current
        return {
            "cka": [linear_cka(b, c) for b, c in zip(self.base_states, current)],
            "shift": [mean_shift(b, c) for b, c in zip(self.base_states, current)],
        }

    @override
    def metrics(self, entry: dict[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, (cka, shift) in enumerate(zip(entry["cka"], entry["shift"])):
            out[f"cka_layer_{i:02d}"], out[f"shift_layer_{i:02d}"] = cka, shift
        return out

    def concept_shifts(self) -> dict[str, Any]:
        """The concept shift vectors of the last measurement (the model as it is now when there was none in this
        process), as saved into ``concept_shifts.pt``."""
        assert self.base_states is not None and self.labels is not None and self.centroids is not None
        if self._latest is None:
            self.measure()
        assert self._latest is not None
        base = self.base_states[self._layer]
        shifts, counts = concept_shift_vectors(base, self._latest[self._layer], self.labels, self.num_concepts)
        step = self.history[-1]["step"] if self.history else None
        return {"layer": self._layer, "num_layers": len(self.base_states), "hidden_size": base.shape[1],
                "step": step, "centroids": self.centroids, "shifts": shifts, "counts": counts}  # fmt: skip

    def dashboard_panels(self) -> list[Panel]:
        """Linear CKA and mean shift of every layer at each measurement (heatmaps: steps x layers)."""
        if not self.history:
            return []
        layers = [f"{i:02d}" for i in range(len(self.history[0]["cka"]))]
        steps = [str(h["step"]) for h in self.history]
        return [
            Panel("representation/cka", "Representation shift: linear CKA with the base model per layer", "heatmap",
                  layers, [h["cka"] for h in self.history], rows=steps, x_label="layer (block output)", y_label="step",
                  note="1 = the probe set's hidden states are the base model's up to rotation, scale and offset."),
            Panel("representation/shift", "Representation shift: mean shift norm per layer", "heatmap", layers,
                  [h["shift"] for h in self.history], rows=steps, x_label="layer (block output)", y_label="step",
                  note="||mean(h_current) - mean(h_base)|| over the probe tokens."),
        ]  # fmt: skip

    @override
    def settings(self) -> dict[str, Any]:
        tokens = int(self.base_states[0].shape[0]) if self.base_states else 0
        return {"probe_texts": self.probe_texts, "probe_tokens": tokens,
                "pooling": "none: every real (non-padding) probe token is one sample", "concept_layer": self._layer,
                "num_concepts": self.num_concepts}  # fmt: skip

    @override
    def write_files(self, root: Path) -> None:
        if self.base_states is None:
            return
        concepts = self.concept_shifts()
        if self.shifts_filename:
            with atomic_file(root / f"{self.shifts_filename}.pt") as tmp:
                torch.save(concepts, tmp)
        if self.filename:
            payload = {**self.settings(), "concept_counts": concepts["counts"].tolist(),
                       "concept_shift_norms": concepts["shifts"].norm(dim=1).tolist(), "history": self.history}  # fmt: skip
            write_text_atomic(root / f"{self.filename}.json", json.dumps(payload, indent=1))

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.base_states is not None:
            state.update(base_states=self.base_states, centroids=self.centroids, labels=self.labels)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "base_states" in state_dict:
            self.base_states = list(state_dict["base_states"])
            self.centroids, self.labels = state_dict["centroids"], state_dict["labels"]
