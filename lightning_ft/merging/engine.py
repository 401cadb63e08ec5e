"""The streaming merge engine: base + N ingredients -> one HF-loadable folder.

Tensors are processed one at a time: the base tensor and one task-vector tensor per ingredient are read (plain
positioned reads, :class:`~lightning_ft.core.weights.SafetensorsReader`), merged by the registered method
(optionally scaled by LiNeS for merging), and :func:`merge_to_folder` writes the result straight to its place in
the output's safetensors files (:func:`~lightning_ft.core.weights.stream_hf_folder`, sharded above
``max_shard_size``) before the next tensor is read. Peak memory is about one base tensor, one task vector per
ingredient and the method's work on them; nothing else is held. LiNeS's ``alpha`` re-streams the inputs once more
(two passes) rather than keeping anything. Only scoring (greedy soup, a LiNeS ``beta`` sweep) needs whole
candidate state dicts, which :func:`merge` builds; the final merge is streamed all the same.

Tensors are merged in ascending name order (mergekit's order, which fixes the random draws of DARE), written in
that order, and :func:`merge` returns them in the base's order. ``dtype`` rounds every input on load; the
task-arithmetic family then works in the base's (rounded) dtype as mergekit does, linear and the soups in fp32,
and the output takes ``out_dtype``, else ``dtype``, else the base's dtype. Incompatible ingredients are refused
before anything is written.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_ft.core.layer_map import classify
from lightning_ft.core.weights import (
    DEFAULT_MAX_SHARD_SIZE,
    SafetensorsReader,
    TensorSource,
    TensorSpec,
    open_source,
    resolve_path,
    stream_hf_folder,
)
from lightning_ft.core.weights import save_hf_folder as write_hf_folder
from lightning_ft.merging.ops import NonBlockScale, lines_alpha_from_norms, lines_factor
from lightning_ft.merging.registry import MergeMethod, get_method

ScoreFn = Callable[[dict[str, torch.Tensor]], float]

__all__ = [
    "MergePlan",
    "MergeResult",
    "check_compatible",
    "merge",
    "merge_to_folder",
    "parse_dtype",
    "save_hf_folder",
]


def check_compatible(base: SafetensorsReader, sources: Sequence[TensorSource]) -> None:
    """Refuse, naming the first mismatching tensor, any ingredient that does not fit the base."""
    base_keys = base.keys()
    known = set(base_keys)
    for source in sources:
        keys = source.keys()
        have = set(keys)
        if source.full:
            missing = next((k for k in base_keys if k not in have), None)
            if missing is not None:
                raise ValueError(
                    f"{source.name} has no tensor {missing!r} that the base has: merge only fine-tunes of the same "
                    "architecture."
                )
        extra = next((k for k in keys if k not in known), None)
        if extra is not None:
            raise ValueError(
                f"{source.name} has tensor {extra!r} that the base lacks: merge only fine-tunes of the same "
                "architecture."
            )
        for key in (k for k in base_keys if k in have):
            if tuple(source.shape(key)) != base.shape(key):
                raise ValueError(
                    f"{source.name} does not match the base at tensor {key!r}: shape {tuple(source.shape(key))} vs "
                    f"{base.shape(key)}; merge only fine-tunes of the same base model."
                )


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | None, key: str = "dtype") -> torch.dtype | None:
    """A recipe dtype name (``float32``, ``bfloat16``, ``float16``) as a torch dtype; ``None`` stays ``None``."""
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"{key}={name!r} is not one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


@dataclass
class MergePlan:
    """What to merge and how.

    Attributes:
        base: The pretrained model.
        sources: The ingredients.
        method: The registered merge method.
        params: The method's resolved global parameters.
        model_params: The resolved per-model parameters (``weight``, ``density``, ``gamma``), one per source.
        lines: Apply LiNeS for merging to the merged task vector.
        non_block_scale: LiNeS factor rule outside the blocks.
        lines_alpha: ``alpha`` from the norm ratio (set by :meth:`compute_lines_alpha`).
        dtype: Inputs are rounded to this dtype on load (mergekit's ``dtype:``), which is then the working dtype of
            the task-arithmetic family.
        out_dtype: Dtype of the merged tensors (default: ``dtype``, else the base's).
    """

    base: SafetensorsReader
    sources: list[TensorSource]
    method: MergeMethod
    params: dict[str, Any]
    model_params: list[dict[str, Any]] = field(default_factory=list)
    lines: bool = False
    non_block_scale: NonBlockScale = "alpha"
    lines_alpha: float | None = None
    dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    _blocks: dict[str, int | None] = field(default_factory=dict)
    _keysets: dict[int, set[str]] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        base: str,
        models: Sequence[str],
        method: str,
        params: dict[str, Any] | None = None,
        lines: bool = False,
        non_block_scale: NonBlockScale = "alpha",
        model_params: Sequence[dict[str, Any] | None] | None = None,
        dtype: torch.dtype | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> MergePlan:
        """Open the base and ingredients, resolve the method's parameters and check compatibility.

        Args:
            base: The pretrained model (folder or bundled alias).
            models: The ingredients.
            method: A registered method name.
            params: The top-level parameters (global, and per-model ones applying to every model).
            lines: Apply LiNeS for merging (its ``alpha``/``beta`` replace ``lambda``).
            non_block_scale: LiNeS factor rule outside the blocks.
            model_params: Each ingredient's own parameters (``weight``, ``density``, ``gamma``), in order.
            dtype: Round every input tensor to this dtype on load.
            out_dtype: Dtype of the merged tensors.
        """
        if not models:
            raise ValueError("Give at least one fine-tuned model to merge.")
        own = list(model_params) if model_params is not None else [None] * len(models)
        if len(own) != len(models):
            raise ValueError(f"model_params has {len(own)} entries for {len(models)} models: give one per model.")
        chosen = get_method(method)
        resolved = chosen.resolve(params, own)
        reader = SafetensorsReader(resolve_path(base))
        sources = [open_source(m, reader.keys()) for m in models]
        check_compatible(reader, sources)
        glob = dict(resolved.params)
        if lines and chosen.scaling_param in glob:
            glob[chosen.scaling_param] = 1.0  # LiNeS's alpha/beta take over the global scale
        plan = cls(reader, sources, chosen, glob, resolved.models, lines, non_block_scale, None, dtype, out_dtype)
        plan._blocks = {k: classify(k)[0] for k in reader.keys()}
        return plan

    @property
    def num_blocks(self) -> int:
        """Residual blocks of the base (from its tensor names)."""
        blocks = [b for b in self._blocks.values() if b is not None]
        return max(blocks) + 1 if blocks else 0

    def base_tensor(self, key: str) -> torch.Tensor:
        """One base tensor, rounded to ``dtype`` when set."""
        tensor = self.base.get(key)
        return tensor.to(self.dtype) if self.dtype is not None and tensor.is_floating_point() else tensor

    def deltas(self, key: str, base: torch.Tensor, sources: Sequence[TensorSource]) -> list[torch.Tensor] | None:
        """One fp32 task vector per ingredient (zeros where an adapter leaves the tensor alone).

        With ``dtype`` set, each ingredient's tensor ``base + delta`` is rounded to it first (``base`` is the
        rounded base tensor), so the fp32 difference of two rounded tensors is exact and its cast to ``dtype``
        equals mergekit's subtraction in ``dtype``.
        """
        if not base.is_floating_point():
            return None
        found = [self.delta(key, base, source) for source in sources]
        if all(d is None for d in found):
            return None
        return [d if d is not None else torch.zeros(base.shape, dtype=torch.float32) for d in found]

    def delta(self, key: str, base: torch.Tensor, source: TensorSource) -> torch.Tensor | None:
        """One ingredient's fp32 task vector of ``key`` (rounded as in :meth:`deltas`), ``None`` when untouched."""
        if not base.is_floating_point() or key not in self._keyset(source):
            return None
        delta = source.delta(key, base)
        if delta is not None and self.dtype is not None:
            delta = (base.float() + delta).to(self.dtype).float() - base.float()
        return delta

    def touches(self, key: str, base: torch.Tensor, source: TensorSource) -> bool:
        """Whether :meth:`delta` of ``key`` is not ``None``, without reading the tensor where the source knows."""
        return base.is_floating_point() and key in self._keyset(source) and source.touches(key, base)

    def _keyset(self, source: TensorSource) -> set[str]:
        if id(source) not in self._keysets:
            self._keysets[id(source)] = set(source.keys())
        return self._keysets[id(source)]

    def models_of(self, sources: Sequence[TensorSource]) -> list[dict[str, Any]]:
        """The per-model parameters of ``sources`` (a subset of the ingredients, in any order)."""
        own = {id(s): p for s, p in zip(self.sources, self.model_params or [{} for _ in self.sources])}
        return [own[id(s)] for s in sources]

    def _generator(self) -> torch.Generator | None:
        """A CPU generator seeded with ``seed`` for random methods: every pass draws the same masks."""
        return torch.Generator().manual_seed(int(self.params["seed"])) if self.method.random else None

    def _merged(
        self, sources: Sequence[TensorSource], keep_deltas: bool = False
    ) -> Iterator[tuple[str, torch.Tensor, list[torch.Tensor] | None, torch.Tensor | None]]:
        """``(key, base tensor, task vectors, merged task vector)`` per base tensor, in ascending name order.

        Ascending name order is the order in which mergekit's executor merges tensors, so a random method
        consumes the seeded generator as mergekit's ``--random-seed`` run does (one fp32 Bernoulli draw per
        tensor and model with density < 1, models in recipe order). Tensors no ingredient touches (and
        non-floating ones) come with ``None``; so do the task vectors unless ``keep_deltas``. The task vectors are
        a lazy sequence (:class:`_LazyDeltas`), read again at each access rather than held.
        """
        models, generator = self.models_of(sources), self._generator()
        for key in sorted(self.base.keys()):
            base = self.base_tensor(key)
            # which ingredients touch it, one task vector alive at a time; the method reads them lazily
            present = [self.touches(key, base, source) for source in sources]
            deltas: Sequence[torch.Tensor] | None = (
                _LazyDeltas(self, key, base, sources, present) if any(present) else None
            )
            merged = None if deltas is None else self.method(base, deltas, models, self.params, generator)
            if not keep_deltas:
                deltas = None
            yield key, base, deltas, merged  # type: ignore[misc]
            del base, deltas, merged  # before the next tensor is read: one tensor's worth alive at a time

    def compute_lines_alpha(self) -> float:
        """LiNeS-for-merging ``alpha = (||sum tau_t||_1 / ||tau_MTL||_1) / T``, streamed over tensors."""
        summed = merged = 0.0
        for _, _, deltas, tau in self._merged(self.sources, keep_deltas=True):
            if deltas is not None and tau is not None:
                summed += float(torch.stack(list(deltas)).sum(0).abs().sum(dtype=torch.float64))
                merged += float(tau.abs().sum(dtype=torch.float64))
            del deltas, tau
        self.lines_alpha = lines_alpha_from_norms(summed, merged, len(self.sources))
        return self.lines_alpha

    def output_dtype(self, key: str) -> torch.dtype:
        """The dtype of one merged tensor: ``out_dtype``, else ``dtype``, else the base's (non-float ones kept)."""
        stored = self.base.dtype(key)
        if not stored.is_floating_point:
            return stored
        return self.out_dtype or self.dtype or stored

    def layout(self) -> list[TensorSpec]:
        """Name, dtype and shape of every output tensor, in the order :meth:`tensors` yields them."""
        return [TensorSpec(key, self.output_dtype(key), self.base.shape(key)) for key in sorted(self.base.keys())]

    def tensors(
        self, beta: float | None = None, sources: Sequence[TensorSource] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream the merge: ``(name, merged tensor)`` one at a time, in ascending name order (:meth:`layout`'s).

        Nothing is kept between tensors: the caller writes each one and drops it.

        Args:
            beta: LiNeS ``beta`` (required when ``lines``).
            sources: A subset of the ingredients (greedy soup candidates); all by default.
        """
        chosen = list(self.sources if sources is None else sources)
        if self.lines and (beta is None or self.lines_alpha is None):
            raise ValueError("LiNeS for merging needs beta and the norm-ratio alpha; call compute_lines_alpha first.")
        for key, base, deltas, merged in self._merged(chosen):
            del deltas
            if merged is None:
                out = base.to(self.out_dtype) if self.out_dtype and base.is_floating_point() else base
            else:
                if self.lines:
                    assert beta is not None and self.lines_alpha is not None
                    merged = merged * lines_factor(
                        self._blocks[key], self.num_blocks, self.lines_alpha, beta, self.non_block_scale
                    )
                if merged.dtype == base.dtype and merged is not base:  # in place: no third copy (a + b == b + a)
                    out = merged.add_(base).to(self.out_dtype or base.dtype)
                else:
                    out = (base.to(merged.dtype) + merged).to(self.out_dtype or base.dtype)
            del base, merged
            yield key, out
            del out

    def state_dict(self, beta: float | None = None, sources: Sequence[TensorSource] | None = None) -> dict[str, Any]:
        """The whole merge as an output state dict (in the base's tensor order), for scoring a candidate.

        Args:
            beta: LiNeS ``beta`` (required when ``lines``).
            sources: A subset of the ingredients (greedy soup candidates); all by default.
        """
        out = dict(self.tensors(beta, sources))
        return {key: out[key] for key in self.base.keys()}


class _LazyDeltas(Sequence[torch.Tensor]):
    """The task vectors of one tensor, computed again at every access (the same reads, the same arithmetic, so the
    same values), so that a method can hold one of them at a time: the TIES family drops each while it sorts the
    next one's magnitudes (:func:`lightning_ft.merging.ops.task_arithmetic_family`)."""

    def __init__(
        self, plan: MergePlan, key: str, base: torch.Tensor, sources: Sequence[TensorSource], present: list[bool]
    ) -> None:
        self._plan, self._key, self._base, self._sources, self._present = plan, key, base, list(sources), present

    def __len__(self) -> int:
        return len(self._sources)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]  # type: ignore[return-value]
        found = self._plan.delta(self._key, self._base, self._sources[index]) if self._present[index] else None
        return found if found is not None else torch.zeros(self._base.shape, dtype=torch.float32)


@dataclass
class MergeResult:
    """The merged state dict and what happened (for the report)."""

    state: dict[str, torch.Tensor]
    report: dict[str, Any]


def _argmax(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return max(rows, key=lambda r: r[key])


def _choose(
    plan: MergePlan, beta: float | str | None, score: ScoreFn | None
) -> tuple[list[TensorSource], float | None, dict[str, Any]]:
    """Check the arguments of a merge, run LiNeS's alpha pass, greedy selection and the beta sweep.

    Returns:
        The chosen ingredients, the LiNeS ``beta`` to merge with (``None`` without LiNeS) and the report so far.
    """
    ingredients = [{"path": s.name, "kind": s.kind, **p} for s, p in zip(plan.sources, plan.models_of(plan.sources))]
    report: dict[str, Any] = {
        "method": plan.method.name, "pretty_name": plan.method.pretty_name, "reference": plan.method.reference_url,
        "params": plan.params, "ingredients": ingredients,
    }  # fmt: skip
    needs_score = plan.method.needs_eval or beta == "sweep"
    if needs_score and score is None:
        raise ValueError(
            f"{'Greedy soup' if plan.method.needs_eval else 'beta: sweep'} scores candidates on validation data: "
            "give eval data (recipe `eval:`) or a fixed LiNeS beta."
        )
    if plan.lines and beta is None:
        raise ValueError("LiNeS for merging needs beta: a number or 'sweep'.")
    if beta is not None and beta != "sweep" and (isinstance(beta, bool) or not isinstance(beta, (int, float))
                                                 or not math.isfinite(beta)):  # fmt: skip
        raise ValueError(f"LiNeS beta={beta!r} must be a number or 'sweep'.")
    sources = plan.sources
    if plan.lines:
        report["lines"] = {"alpha": plan.compute_lines_alpha(), "non_block_scale": plan.non_block_scale}
    first_beta = plan.method.beta_grid[-1] if beta == "sweep" else beta
    if plan.method.needs_eval:
        assert score is not None
        sources, report["greedy"] = _greedy(plan, score, first_beta)
    if beta == "sweep":
        assert score is not None
        rows = [{"beta": b, "score": score(plan.state_dict(b, sources))} for b in plan.method.beta_grid]
        best = _argmax(rows, "score")
        report["lines"].update(beta=best["beta"], sweep=rows)
        beta = best["beta"]
    elif plan.lines:
        report["lines"]["beta"] = beta
    return list(sources), beta if plan.lines else None, report  # type: ignore[return-value]


def merge(
    plan: MergePlan,
    beta: float | str | None = None,
    score: ScoreFn | None = None,
) -> MergeResult:
    """Run a merge plan into a state dict in memory, with greedy selection and/or a LiNeS ``beta`` sweep when asked.

    :func:`merge_to_folder` does the same and streams the result to disk instead of holding it.

    Args:
        plan: The plan.
        beta: LiNeS ``beta``: a number, ``"sweep"`` (the method's grid, scored by ``score``), or ``None``
            (only allowed without LiNeS).
        score: Validation score of a candidate state dict (higher is better); required by greedy soup
            and by ``beta="sweep"``.

    Returns:
        The merged state dict and a report dict.
    """
    start = time.perf_counter()
    sources, chosen_beta, report = _choose(plan, beta, score)
    state = plan.state_dict(chosen_beta, sources)
    report["seconds"] = round(time.perf_counter() - start, 2)
    return MergeResult(state, report)


def merge_to_folder(
    plan: MergePlan,
    base: str,
    output: str | os.PathLike[str],
    beta: float | str | None = None,
    score: ScoreFn | None = None,
    *,
    inputs: Sequence[str | os.PathLike[str]] = (),
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> tuple[Path, dict[str, Any]]:
    """Run a merge plan and stream the merged tensors into an HF folder as they are computed.

    The same merge as :func:`merge` (bit for bit), but each merged tensor is written to the output's safetensors
    files and dropped before the next one is read, so no state dict is ever held (except the candidates that
    greedy soup and a LiNeS ``beta`` sweep score). The folder (with ``merge_report.json`` and ``.md``) appears whole
    or not at all; it is one ``model.safetensors`` up to ``max_shard_size`` bytes of tensors, HF shards above.

    Args:
        plan: The plan.
        base: The base model (folder or bundled alias) whose config and tokenizer files are copied.
        output: The folder to write.
        beta: LiNeS ``beta`` (see :func:`merge`).
        score: Validation score of a candidate state dict (see :func:`merge`).
        inputs: The ingredients, which the output must not touch.
        overwrite: Replace an existing non-empty ``output``.
        max_shard_size: Bytes of tensors above which the weights are sharded.

    Returns:
        The output folder and the report.
    """
    start = time.perf_counter()
    sources, chosen_beta, report = _choose(plan, beta, score)
    dtype = plan.out_dtype or plan.dtype
    with stream_hf_folder(base, output, plan.layout(), dtype=dtype, inputs=inputs, overwrite=overwrite,
                          max_shard_size=max_shard_size) as writer:  # fmt: skip
        for key, tensor in plan.tensors(chosen_beta, sources):
            writer.write(key, tensor)
            del tensor
        report["seconds"] = round(time.perf_counter() - start, 2)
        writer.write_text("merge_report.json", json.dumps(report, indent=2, default=str))
        writer.write_text("merge_report.md", report_markdown(report))
    return Path(output), report


def _greedy(plan: MergePlan, score: ScoreFn, beta: Any) -> tuple[list[TensorSource], dict[str, Any]]:
    """Greedy soup: rank ingredients by their own score, add each only when the soup's score strictly improves.

    Strict, as the official code (``if held_out_val_accuracy > best_val_acc_so_far``): an ingredient that leaves
    the score unchanged is not kept. Scores are higher-is-better (minimised metrics arrive negated).
    """
    singles = [score(plan.state_dict(beta, [s])) for s in plan.sources]
    order = sorted(range(len(plan.sources)), key=lambda i: -singles[i])
    chosen, best = [plan.sources[order[0]]], singles[order[0]]
    steps = [{"add": plan.sources[order[0]].name, "score": best, "kept": True}]
    for i in order[1:]:
        candidate = chosen + [plan.sources[i]]
        value = score(plan.state_dict(beta, candidate))
        kept = value > best
        steps.append({"add": plan.sources[i].name, "score": value, "kept": kept})
        if kept:
            chosen, best = candidate, value
    return chosen, {"single_scores": {s.name: v for s, v in zip(plan.sources, singles)}, "steps": steps}


def save_hf_folder(
    state: dict[str, torch.Tensor],
    base: str,
    output: str | os.PathLike[str],
    report: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    *,
    extra_files: Mapping[str, str] | None = None,
    inputs: Sequence[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> Path:
    """:func:`lightning_ft.core.weights.save_hf_folder` with a merge report (``merge_report.json`` and ``.md``).

    Args:
        state: The tensors to save.
        base: The base model (folder or bundled alias) whose config and tokenizer files are copied.
        output: The folder to write (whole or not at all).
        report: A merge report, written as ``merge_report.json`` and ``merge_report.md``.
        dtype: The merge's output dtype (when it was set), written into ``config.json``.
        extra_files: More text files to write into the folder (name -> text).
        inputs: The other inputs the output must not touch.
        overwrite: Replace an existing non-empty ``output``.

    Returns:
        The output folder.
    """
    files = dict(extra_files or {})
    if report is not None:
        files = {"merge_report.json": json.dumps(report, indent=2, default=str),
                 "merge_report.md": report_markdown(report), **files}  # fmt: skip
    return write_hf_folder(state, base, output, dtype=dtype, extra_files=files, inputs=inputs, overwrite=overwrite)


def report_markdown(report: dict[str, Any]) -> str:
    """A short human report of a merge."""
    lines = [f"# Merge: {report['pretty_name']} ({report['reference']})", "", "| ingredient | kind | parameters |"]
    lines.append("|---|---|---|")
    for item in report["ingredients"]:
        own = {k: v for k, v in item.items() if k not in ("path", "kind")}
        lines.append(f"| {item['path']} | {item['kind']} | {json.dumps(own) if own else ''} |")
    lines += ["", f"parameters: `{json.dumps(report['params'])}`"]
    if "greedy" in report:
        kept = [s["add"] for s in report["greedy"]["steps"] if s["kept"]]
        lines.append(f"greedy soup kept {len(kept)} of {len(report['ingredients'])}: {', '.join(kept)}")
    if "lines" in report:
        lr = report["lines"]
        lines.append(f"LiNeS: alpha={lr['alpha']:.4f} (norm ratio), beta={lr.get('beta')}")
        for row in lr.get("sweep", []):
            lines.append(f"- beta={row['beta']}: score={row['score']:.4f}")
    lines.append(f"time: {report.get('seconds', 0)} s")
    return "\n".join(lines) + "\n"
