"""What fine-tuning changed in how a causal LM answers a small probe: a base and a fine-tuned model compared.

Two post-hoc measurements on (prompt, response) pairs, written as tables (JSON and markdown) and heatmaps (PNG):
gradient x input attribution of every prompt token to the response's log-probability, in both models (Wu et al. 2024,
"From language modeling to instruction following", https://arxiv.org/abs/2310.00492: after instruction tuning the
instruction words weigh more), and cross-model activation patching, CMAP (Prakash et al. 2024, "Fine-tuning enhances
existing mechanisms: a case study on entity tracking", https://arxiv.org/abs/2402.14811): the fine-tuned model's
output of one decoder block at one position put into the base model's forward pass, and the share of the
response log-probability gap that this one activation recovers.

    lightning-ft analyze-shift --base smollm2-135m --tuned runs/sft/hf_model --probe probe.jsonl --out runs/shift

Definitions (``S`` = the response tokens, the ``target_mask``):

* metric ``m(model) = sum_{s in S} log p_model(x_s | x_<s)``, averaged over the rows of a batch;
* attribution of token ``t``: ``a_t = sum_d (d m / d e_{t,d}) * e_{t,d}``, ``e_t`` the row of the input embedding
  table for ``x_t`` (before any scaling or position embedding the model adds itself); the share of a prompt token
  is ``|a_t| / sum_{u in prompt} |a_u|``;
* recovered fraction of a patch from the source model into the receiver:
  ``(m_patched - m_receiver) / (m_source - m_receiver)``; source = tuned, receiver = base by default (the paper's
  direction), the reverse (the base's activation put into the tuned model) with ``reverse=True``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_ft.errors import SentenceParser, UserError

__all__ = [
    "PatchingResult",
    "analyze_shift",
    "attribution_shares",
    "cross_model_patching",
    "encode_example",
    "input_attribution",
    "main",
    "response_logprob",
    "write_figures",
    "write_heatmap",
    "write_tables",
]

PROG = "lightning-ft analyze-shift"
JSON_FILE, MARKDOWN_FILE, SUMMARY_PNG = "analysis.json", "analysis.md", "patching_summary.png"


# ---------------------------------------------------------------------------------------------------- the metric
def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _inputs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, target_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three tensors as ``[B, T]`` on the model's device; refuses a target mask that scores nothing."""
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.reshape(ids.shape)
    target = target_mask.reshape(ids.shape).bool()
    if target[:, 0].any():
        raise ValueError("target_mask marks the first token, which no position predicts: mark response tokens only.")
    if not target.any(dim=1).all():
        raise ValueError("target_mask marks no token in some row: mark the response tokens of every row.")
    device = _device(model)
    return ids.to(device), mask.to(device), target.to(device)


def _target_logprob(logits: torch.Tensor, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``sum_{s in target} log p(x_s | x_<s)`` per row, from unshifted logits ``[B, T, V]``."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return (logprobs * target[:, 1:]).sum(dim=1)


def response_logprob(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, target_mask: torch.Tensor
) -> torch.Tensor:
    """The log-probability ``[B]`` each row's model gives its target tokens (``sum_{s in S} log p(x_s | x_<s)``).

    Args:
        model: A causal LM returning ``.logits`` (a transformers model, possibly peft-wrapped).
        input_ids: ``[B, T]`` (or ``[T]``) prompt followed by response tokens.
        attention_mask: ``[B, T]`` (right padding), or ``None`` for all ones.
        target_mask: ``[B, T]`` bool, true on the tokens scored (the response); never on the first token.
    """
    ids, mask, target = _inputs(model, input_ids, attention_mask, target_mask)
    with torch.no_grad():
        return _target_logprob(model(input_ids=ids, attention_mask=mask).logits, ids, target)


# ---------------------------------------------------------------------------------------------- attribution
def input_attribution(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, target_mask: torch.Tensor
) -> torch.Tensor:
    """Gradient x input attribution ``[B, T]`` of every input token to the log-probability of the target tokens.

    ``a_t = sum_d (d m / d e_{t,d}) * e_{t,d}`` with ``m = sum_{s in S} log p(x_s | x_<s)`` (per row) and ``e_t``
    the row of the model's input embedding table for token ``x_t`` (``get_input_embeddings()``: before any scaling
    or position embedding the model applies itself). It is the first-order change of ``m`` when ``e_t`` is scaled
    by ``1 + eps``, divided by ``eps``; tokens at or after the last target token get 0 (no target sees them), the
    response's own tokens before it are included. The model's parameters get no gradient.

    Args:
        model: A causal LM taking ``inputs_embeds`` (a transformers model, possibly peft-wrapped).
        input_ids: ``[B, T]`` (or ``[T]``) prompt followed by response tokens.
        attention_mask: ``[B, T]`` (right padding), or ``None`` for all ones.
        target_mask: ``[B, T]`` bool, true on the response tokens scored.
    """
    from lightning_ft.core.anatomy import input_embeddings

    ids, mask, target = _inputs(model, input_ids, attention_mask, target_mask)
    embeds = input_embeddings(model)(ids).detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits
        (grad,) = torch.autograd.grad(_target_logprob(logits, ids, target).sum(), embeds)
    return (grad * embeds.detach()).sum(dim=-1).float() * mask


def attribution_shares(scores: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """Each prompt token's share of the prompt's attribution, ``|a_t| / sum_{u in prompt} |a_u|`` (0 elsewhere).

    Args:
        scores: ``[B, T]`` (or ``[T]``) attributions from :func:`input_attribution`.
        prompt_mask: Same shape, bool, true on the prompt tokens.
    """
    magnitude = scores.abs() * prompt_mask.to(scores.device)
    return magnitude / magnitude.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(magnitude.dtype).tiny)


# -------------------------------------------------------------------------------------------------- patching
@dataclass(frozen=True)
class PatchingResult:
    """Cross-model activation patching of one probe (see :func:`cross_model_patching`).

    Attributes:
        recovered: ``[len(layers), len(positions)]`` recovered fraction of the metric gap when the source's
            activation of one block at one position replaces the receiver's; all zeros when there is no gap
            (``no_gap``).
        recovered_all: ``[len(layers)]`` the same with every position of the block patched at once.
        patched: ``[len(layers), len(positions)]`` the receiver's metric with that patch.
        patched_all: ``[len(layers)]`` the receiver's metric with the whole block's output patched.
        layers: The patched blocks (indices).
        positions: The patched positions (token indices).
        metric_receiver: The receiver's metric unpatched.
        metric_source: The source's metric.
        direction: ``"tuned->base"`` (the paper's) or ``"base->tuned"``.
        no_gap: ``|metric_source - metric_receiver| <= min_gap``: no fraction is defined, ``recovered`` is zeros.
    """

    recovered: torch.Tensor
    recovered_all: torch.Tensor
    patched: torch.Tensor
    patched_all: torch.Tensor
    layers: list[int]
    positions: list[int]
    metric_receiver: float
    metric_source: float
    direction: str
    no_gap: bool

    @property
    def gap(self) -> float:
        """``metric_source - metric_receiver``."""
        return self.metric_source - self.metric_receiver


def _blocks(model: nn.Module, component: str | None) -> list[nn.Module]:
    """The module patched in each decoder block: the block itself, or its submodule named ``component``."""
    from lightning_ft.core.anatomy import decoder_parts
    from lightning_ft.core.layer_map import find_transformer

    layers = decoder_parts(find_transformer(model), "cross_model_patching").layers
    if not component:
        return list(layers)
    try:
        return [block.get_submodule(component) for block in layers]
    except AttributeError:
        names = sorted({name for name, _ in layers[0].named_children()})
        raise ValueError(f"component={component!r} is not a submodule of {type(layers[0]).__name__}: give one of "
                         f"{', '.join(names)} (or none, for the block's output).") from None  # fmt: skip


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def _hooked(module: nn.Module, hook: Any) -> Iterator[None]:
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _record(
    model: nn.Module, modules: list[nn.Module], ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor
) -> tuple[float, list[torch.Tensor]]:
    """The model's metric and every module's output ``[B, T, H]``."""
    cache: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _a, out: cache.append(_hidden(out).detach())) for m in modules]
    try:
        with torch.no_grad():
            metric = _target_logprob(model(input_ids=ids, attention_mask=mask).logits, ids, target).mean().item()
    finally:
        for handle in handles:
            handle.remove()
    if len(cache) != len(modules):
        raise ValueError(f"{len(cache)} of {len(modules)} hooked modules ran once per forward pass: patch a "
                         "component every block calls exactly once.")  # fmt: skip
    return metric, cache


def _patched_metrics(
    receiver: nn.Module,
    module: nn.Module,
    source: torch.Tensor,
    select: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor:
    """The receiver's metric (mean over the B rows) for each of the K patches ``select`` ``[K, T]`` describes."""
    k, rows = select.shape[0], ids.shape[0]
    where = select.repeat_interleave(rows, dim=0)[..., None].to(ids.device)  # [K*B, T, 1]
    value = source.repeat(k, 1, 1)

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        patched = torch.where(where, value.to(_hidden(output).dtype), _hidden(output))
        return (patched, *output[1:]) if isinstance(output, tuple) else patched

    with _hooked(module, hook), torch.no_grad():
        logits = receiver(input_ids=ids.repeat(k, 1), attention_mask=mask.repeat(k, 1)).logits
    return _target_logprob(logits, ids.repeat(k, 1), target.repeat(k, 1)).view(k, rows).mean(dim=1).cpu()


def cross_model_patching(
    base: nn.Module,
    tuned: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    target_mask: torch.Tensor,
    *,
    reverse: bool = False,
    component: str | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    batch_size: int = 16,
    min_gap: float = 1e-6,
) -> PatchingResult:
    """Cross-model activation patching (CMAP, Prakash et al. 2024) of every (decoder block, position).

    The source model (``tuned``; ``base`` when ``reverse``) runs once and its output of every decoder block (or of
    the submodule ``component`` of every block, e.g. ``"mlp"`` or ``"self_attn"``) is cached; the receiver then
    runs with the output of one block at one position replaced by the source's (forward hooks on the blocks the
    repository's model anatomy finds, peft wrappers looked through). The metric ``m`` is the target tokens'
    log-probability (:func:`response_logprob`), averaged over the rows; rows are patched at the same index, so a
    batch should hold prompts of one template (aligned positions). Recovered fraction:
    ``(m_patched - m_receiver) / (m_source - m_receiver)``.

    What holds exactly (up to float rounding) for block outputs: a position the target tokens cannot see (at or
    after the last target token) recovers 0; when the two models differ only in blocks ``k..`` (same embeddings,
    final norm and head), every block before ``k`` recovers 0 at every position, and patching every position of
    any block from ``k`` on (``recovered_all``) recovers 1, the last block's included. When the models show no
    gap (``|m_source - m_receiver| <= min_gap``, e.g. a model against itself) no fraction is defined: ``recovered``
    and ``recovered_all`` are zeros and ``no_gap`` is true.

    Args:
        base: The base causal LM.
        tuned: The fine-tuned causal LM (possibly peft-wrapped), with as many blocks of the same width.
        input_ids: ``[B, T]`` (or ``[T]``) prompt followed by response tokens.
        attention_mask: ``[B, T]`` (right padding), or ``None`` for all ones.
        target_mask: ``[B, T]`` bool, true on the response tokens scored.
        reverse: Patch the base model's activations into the tuned model instead.
        component: A submodule name inside each block whose output is patched; ``None``: the block's output (the
            residual stream after the block).
        layers: The blocks patched (default: all).
        positions: The positions patched one by one (default: all ``T``).
        batch_size: Patched forward rows per pass (positions x batch rows).
        min_gap: The smallest ``|m_source - m_receiver|`` for which fractions are computed.

    Returns:
        A :class:`PatchingResult`; ``recovered`` is ``[len(layers), len(positions)]`` (``[blocks, T]`` by default).

    Raises:
        ValueError: The models have different numbers of blocks, ``component`` is not a submodule of a block, a layer
            or position is out of range, or the target mask scores nothing.
    """
    source, receiver = (base, tuned) if reverse else (tuned, base)
    ids, mask, target = _inputs(receiver, input_ids, attention_mask, target_mask)
    source_modules, receiver_modules = _blocks(source, component), _blocks(receiver, component)
    if len(source_modules) != len(receiver_modules):
        raise ValueError(f"the base and tuned models have {len(_blocks(base, None))} and {len(_blocks(tuned, None))} "
                         "decoder blocks: compare a fine-tuned model with the base it was trained from.")  # fmt: skip
    blocks = list(range(len(receiver_modules))) if layers is None else [int(b) for b in layers]
    length = ids.shape[1]
    positions = list(range(length)) if positions is None else [int(p) for p in positions]
    if any(not 0 <= b < len(receiver_modules) for b in blocks) or any(not 0 <= p < length for p in positions):
        raise ValueError(f"layers {blocks} and positions {positions} must lie in [0, {len(receiver_modules)}) and "
                         f"[0, {length}): give block and token indices.")  # fmt: skip
    metric_source, cache = _record(source, [source_modules[b] for b in blocks], ids.to(_device(source)),
                                   mask.to(_device(source)), target.to(_device(source)))  # fmt: skip
    metric_receiver, _ = _record(receiver, [], ids, mask, target)
    eye = torch.eye(length, dtype=torch.bool)
    chunk = max(1, batch_size // ids.shape[0])
    patched = torch.zeros(len(blocks), len(positions))
    patched_all = torch.zeros(len(blocks))
    for row, (block, value) in enumerate(zip(blocks, cache)):
        module, value = receiver_modules[block], value.to(ids.device)
        if value.shape[:2] != ids.shape:
            raise ValueError(f"block {block} of the source returns {tuple(value.shape)} for a {tuple(ids.shape)} "
                             "input: patch a component whose output is [batch, tokens, width].")  # fmt: skip
        everything = torch.ones(1, length, dtype=torch.bool)
        patched_all[row] = _patched_metrics(receiver, module, value, everything, ids, mask, target)[0]
        for start in range(0, len(positions), chunk):
            rows = eye[positions[start : start + chunk]]
            patched[row, start : start + len(rows)] = _patched_metrics(receiver, module, value, rows, ids, mask,
                                                                       target)  # fmt: skip
    gap = metric_source - metric_receiver
    no_gap = not abs(gap) > min_gap
    recovered = torch.zeros_like(patched) if no_gap else (patched - metric_receiver) / gap
    recovered_all = torch.zeros_like(patched_all) if no_gap else (patched_all - metric_receiver) / gap
    return PatchingResult(recovered, recovered_all, patched, patched_all, blocks, positions, metric_receiver,
                          metric_source, "base->tuned" if reverse else "tuned->base", no_gap)  # fmt: skip


# ---------------------------------------------------------------------------------------------- the analysis
def encode_example(tokenizer: Any, prompt: str, response: str, max_length: int) -> tuple[list[int], int]:
    """The token ids of the start token (BOS, else EOS), the prompt and the response, and the prompt's length
    (start token included); a longer example keeps the prompt's end and the response's start."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    body = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
    answer = list(tokenizer(response, add_special_tokens=False)["input_ids"])[: max(1, max_length - 2)]
    room = max_length - 1 - len(answer)
    body = body[len(body) - room :] if 0 < room < len(body) else (body if room > 0 else [])
    return [start, *body, *answer], 1 + len(body)


def _token_label(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token]).replace("\n", "\\n").replace("\t", "\\t") or repr(token)


def _rounded(values: torch.Tensor) -> list[Any]:
    return [round(float(v), 6) for v in values.flatten()] if values.dim() <= 1 else [_rounded(v) for v in values]


def analyze_shift(
    base: nn.Module,
    tuned: nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    max_length: int = 128,
    component: str | None = None,
    reverse: bool = False,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Attribution in both models and cross-model patching for each (prompt, response) pair, as a report.

    Returns:
        ``{"examples": [...], "tokens": [...], "layers": [...], ...}``: per example the tokens, the response
        log-probabilities, the prompt tokens' attribution shares in both models and the patching matrix; the
        prompt tokens (as text) ranked by their mean gain of attribution share; per layer the mean recovery.
    """
    examples: list[dict[str, Any]] = []
    for prompt, response in pairs:
        ids_list, prompt_len = encode_example(tokenizer, prompt, response, max_length)
        ids = torch.tensor([ids_list])
        target = torch.arange(len(ids_list))[None] >= prompt_len
        prompt_mask = ~target
        shares = [attribution_shares(input_attribution(m, ids, None, target).cpu(), prompt_mask)[0, :prompt_len]
                  for m in (base, tuned)]  # fmt: skip
        result = cross_model_patching(base, tuned, ids, None, target, reverse=reverse, component=component,
                                      batch_size=batch_size)  # fmt: skip
        examples.append({
            "prompt": prompt, "response": response, "tokens": [_token_label(tokenizer, t) for t in ids_list],
            "token_ids": ids_list, "prompt_tokens": prompt_len,
            "logprob_base": result.metric_source if reverse else result.metric_receiver,
            "logprob_tuned": result.metric_receiver if reverse else result.metric_source,
            "share_base": _rounded(shares[0]), "share_tuned": _rounded(shares[1]),
            "no_gap": result.no_gap, "recovered": _rounded(result.recovered),
            "recovered_all": _rounded(result.recovered_all),
        })  # fmt: skip
    return {
        "method": "analyze-shift",
        "papers": ["https://arxiv.org/abs/2310.00492", "https://arxiv.org/abs/2402.14811"],
        "direction": "base->tuned" if reverse else "tuned->base", "component": component or "block",
        "metric": "sum of the response tokens' log-probabilities",
        "examples": examples, "tokens": _token_gains(examples), "layers": _layer_means(examples),
    }  # fmt: skip


def _token_gains(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The prompt tokens (as text) by mean gain of attribution share, tuned minus base, over their occurrences."""
    gains: dict[str, list[float]] = {}
    for e in examples:
        for i in range(e["prompt_tokens"]):
            gains.setdefault(e["tokens"][i], []).append(e["share_tuned"][i] - e["share_base"][i])
    rows = [{"token": t, "mean_gain": round(sum(g) / len(g), 6), "count": len(g)} for t, g in gains.items()]
    return sorted(rows, key=lambda r: -r["mean_gain"])


def _layer_means(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per layer, over the examples with a gap: mean whole-block recovery and mean best single-position recovery."""
    kept = [e for e in examples if not e["no_gap"]]
    if not kept:
        return []
    rows = []
    for layer in range(len(kept[0]["recovered_all"])):
        whole = sum(e["recovered_all"][layer] for e in kept) / len(kept)
        best = sum(max(e["recovered"][layer]) for e in kept) / len(kept)
        rows.append(
            {"layer": layer, "mean_recovered_all_positions": round(whole, 6), "mean_best_position": round(best, 6)}
        )
    return rows


# -------------------------------------------------------------------------------------------------- writers
def _markdown(report: dict[str, Any], top: int) -> str:
    examples = report["examples"]
    mean = (lambda key: sum(e[key] for e in examples) / len(examples)) if examples else (lambda key: float("nan"))
    lines = [
        "# Instruction-following shift: base vs tuned", "",
        (f"{len(examples)} examples; metric: {report['metric']}; patching {report['direction']} "
         f"({report['component']} outputs)."), "",
        f"Mean response log-probability: base {mean('logprob_base'):.4f}, tuned {mean('logprob_tuned'):.4f}.", "",
        f"## Prompt tokens by attribution-share gain (tuned - base), top {top} and bottom {top}", "",
        "| token | mean gain | count |", "|---|---|---|",
    ]  # fmt: skip
    ranked = report["tokens"]
    shown = ranked if len(ranked) <= 2 * top else ranked[:top] + ranked[-top:]
    lines += [f"| `{r['token']}` | {r['mean_gain']:+.4f} | {r['count']} |" for r in shown]
    lines += ["", "## Recovered fraction of the log-probability gap per layer", ""]
    if report["layers"]:
        lines += ["| layer | all positions patched | best single position |", "|---|---|---|"]
        lines += [f"| {r['layer']} | {r['mean_recovered_all_positions']:.4f} | {r['mean_best_position']:.4f} |"
                  for r in report["layers"]]  # fmt: skip
    else:
        lines.append("No example shows a gap between the models: no fraction is defined.")
    lines += ["", "## Examples", "", "| # | prompt tokens | log p base | log p tuned | gap |", "|---|---|---|---|---|"]
    lines += [f"| {i} | {e['prompt_tokens']} | {e['logprob_base']:.4f} | {e['logprob_tuned']:.4f} | "
              f"{'none' if e['no_gap'] else format(e['logprob_tuned'] - e['logprob_base'], '.4f')} |"
              for i, e in enumerate(examples)]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_tables(report: dict[str, Any], folder: str | os.PathLike[str], *, top: int = 15) -> tuple[Path, Path]:
    """Write ``analysis.json`` (the whole report) and ``analysis.md`` (its summary tables) into ``folder``,
    each atomically; returns their paths."""
    from lightning_ft.core.io import write_text_atomic

    root = Path(folder)
    json_path = write_text_atomic(root / JSON_FILE, json.dumps(report, indent=1, allow_nan=True) + "\n")
    return json_path, write_text_atomic(root / MARKDOWN_FILE, _markdown(report, top))


def write_heatmap(
    matrix: torch.Tensor | Sequence[Sequence[float]],
    path: str | os.PathLike[str],
    *,
    title: str,
    xlabels: Sequence[str] = (),
    ylabels: Sequence[str] = (),
    xlabel: str = "",
    ylabel: str = "",
    center: bool = True,
) -> Path:
    """Write ``matrix`` (rows x columns) as a PNG heatmap with a colour bar, atomically; returns ``path``.

    ``center`` uses a diverging colour map symmetric around 0. Uses matplotlib's Agg canvas directly (no pyplot, no
    global backend change).
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lightning_ft.core.io import atomic_file

    values = torch.as_tensor(matrix, dtype=torch.float32).reshape(len(matrix), -1).numpy()
    rows, cols = values.shape
    fig = Figure(figsize=(min(3 + 0.35 * cols, 30), min(2.5 + 0.3 * rows, 20)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    finite = values[np.isfinite(values)]
    bound = float(abs(finite).max()) if finite.size else 1.0
    bound = bound if bound > 0 else 1.0
    kwargs = {"cmap": "RdBu_r", "vmin": -bound, "vmax": bound} if center else {"cmap": "viridis"}
    image = ax.imshow(values, aspect="auto", interpolation="nearest", **kwargs)
    fig.colorbar(image, ax=ax)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if xlabels:
        ax.set_xticks(range(cols), list(xlabels), rotation=90, fontsize=7)
    if ylabels:
        ax.set_yticks(range(rows), list(ylabels), fontsize=7)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)


def write_figures(report: dict[str, Any], folder: str | os.PathLike[str]) -> list[Path]:
    """Per example ``attribution_<i>.png`` (prompt shares: base, tuned, gain) and ``patching_<i>.png`` (layers x
    positions), and ``patching_summary.png`` (examples x layers, every position patched)."""
    root, written = Path(folder), []
    for i, e in enumerate(report["examples"]):
        labels = e["tokens"][: e["prompt_tokens"]]
        gain = [t - b for b, t in zip(e["share_base"], e["share_tuned"])]
        written.append(write_heatmap([e["share_base"], e["share_tuned"], gain], root / f"attribution_{i}.png",
                                     title=f"example {i}: prompt-token attribution share", xlabels=labels,
                                     ylabels=["base", "tuned", "tuned - base"]))  # fmt: skip
        layers = len(e["recovered"])
        note = " (no gap: zeros)" if e["no_gap"] else ""
        written.append(write_heatmap(e["recovered"], root / f"patching_{i}.png", xlabels=e["tokens"],
                                     ylabels=[str(layer) for layer in range(layers)], xlabel="position",
                                     ylabel="layer", title=f"example {i}: recovered fraction, "
                                     f"{report['direction']}{note}"))  # fmt: skip
    if report["examples"]:
        written.append(write_heatmap([e["recovered_all"] for e in report["examples"]], root / SUMMARY_PNG,
                                     title="recovered fraction, every position of a layer patched", xlabel="layer",
                                     ylabel="example"))  # fmt: skip
    return written


# ------------------------------------------------------------------------------------------------------ CLI
def _parser() -> SentenceParser:
    parser = SentenceParser(prog=PROG, description=(
        "Compare a base and a fine-tuned causal LM on a small probe of (prompt, response) pairs: gradient x input "
        "attribution of each prompt token to the response's log-probability in both models (Wu et al. 2024), and "
        "cross-model activation patching of every (decoder block, position) (Prakash et al. 2024). Inputs: --base, "
        "--tuned, --probe. Outputs in --out: analysis.json (everything), analysis.md (tables), attribution_<i>.png, "
        "patching_<i>.png per example and patching_summary.png."))  # fmt: skip
    parser.add_argument("--base", required=True, help="input: the base model, a bundled alias or a saved Hugging "
                        "Face folder")  # fmt: skip
    parser.add_argument("--tuned", required=True, help="input: the fine-tuned model, a saved Hugging Face folder or "
                        "a peft adapter folder (its base read from adapter_config.json)")  # fmt: skip
    parser.add_argument("--probe", required=True, help="input: a JSONL (or CSV/JSON/Parquet) file whose records hold "
                        "a prompt and a response (or answer) column")  # fmt: skip
    parser.add_argument("--out", required=True, help="output: the folder written (analysis.json, analysis.md, PNGs)")
    parser.add_argument("--max-examples", type=int, default=8, help="the first n probe records used (default 8)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example; a longer prompt keeps its "
                        "end (default 128)")  # fmt: skip
    parser.add_argument("--prompt-field", default="prompt", help="the prompt column (default prompt)")
    parser.add_argument("--response-field", default=None, help="the response column (default: response, else "
                        "answer)")  # fmt: skip
    parser.add_argument("--component", default=None, help="patch this submodule of every block (e.g. mlp, "
                        "self_attn) instead of the block's output")  # fmt: skip
    parser.add_argument("--reverse", action="store_true", help="patch the base model's activations into the tuned "
                        "model instead of the tuned model's into the base")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=16, help="patched sequences per forward pass (default 16)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return parser


def _load(value: str, option: str) -> tuple[nn.Module, Any]:
    from lightning_ft.curation.generation import GenerationService

    try:
        service = GenerationService(value)
    except UserError as err:
        raise UserError(f"{option} cannot be loaded: {err}") from None
    return service.model, service.tokenizer


def _pairs(args: Any) -> list[tuple[str, str]]:
    from lightning_ft.curation.records import read_pool

    records = read_pool(str(args.probe), argument="--probe", fields=[args.prompt_field],
                        options={args.prompt_field: "--prompt-field"})[: args.max_examples]  # fmt: skip
    field = args.response_field or next((f for f in ("response", "answer") if f in records[0]), None)
    if field is None:
        raise UserError(f"--probe {args.probe} has neither a 'response' nor an 'answer' column (its columns are "
                        f"{', '.join(sorted(records[0]))}): pass --response-field with the column of the "
                        "responses.")  # fmt: skip
    read_pool(str(args.probe), argument="--probe", fields=[field], options={field: "--response-field"})
    pairs = [(str(r[args.prompt_field]), str(r[field])) for r in records]
    empty = next((i for i, (_, response) in enumerate(pairs) if not response.strip()), None)
    if empty is not None:
        raise UserError(f"--probe {args.probe}: record {empty + 1} has an empty {field!r}: give every record a "
                        "response to score, or drop that record.")  # fmt: skip
    return pairs


def main(argv: list[str] | None = None) -> int:
    """``lightning-ft analyze-shift ...``: write the tables and heatmaps; returns the exit status (0)."""
    from lightning_ft.core.io import atomic_dir, check_output

    args = _parser().parse_args(argv)
    if args.max_examples < 1 or args.max_length < 2 or args.batch_size < 1:
        raise UserError(f"--max-examples {args.max_examples}, --max-length {args.max_length} and --batch-size "
                        f"{args.batch_size} must be at least 1, 2 and 1: give larger values.")  # fmt: skip
    probe = Path(args.probe).expanduser()
    if not probe.is_file():
        raise UserError(f"--probe {args.probe} is not a file: give a JSONL file of records with a prompt and a "
                        "response column.")  # fmt: skip
    out = check_output(args.out, [("--probe", probe)] + [(o, Path(v)) for o, v in (("--base", args.base),
                       ("--tuned", args.tuned)) if Path(v).exists()], kind="folder", overwrite=args.overwrite,
                       argument="--out")  # fmt: skip
    pairs = _pairs(args)
    base, base_tokenizer = _load(args.base, "--base")
    tuned, tokenizer = _load(args.tuned, "--tuned")
    if tokenizer.get_vocab() != base_tokenizer.get_vocab():
        raise UserError(f"--tuned {args.tuned} and --base {args.base} have different tokenizers, so their tokens "
                        "cannot be compared: give the base model the tuned model was trained from.")  # fmt: skip
    try:
        report = analyze_shift(base, tuned, tokenizer, pairs, max_length=args.max_length, component=args.component,
                               reverse=args.reverse, batch_size=args.batch_size)  # fmt: skip
    except ValueError as err:
        raise UserError(f"--base {args.base} and --tuned {args.tuned} cannot be patched: {err}") from None
    report.update(base=args.base, tuned=args.tuned, probe=str(probe))
    with atomic_dir(out) as tmp:
        write_tables(report, tmp)
        write_figures(report, tmp)
    gaps = [e for e in report["examples"] if not e["no_gap"]]
    best = max(report["layers"], key=lambda r: r["mean_best_position"], default=None)
    print(f"{len(report['examples'])} examples ({len(gaps)} with a gap)"
          + (f"; best single-position recovery in layer {best['layer']} ({best['mean_best_position']:.3f})"
             if best else "") + f" -> {out}")  # fmt: skip
    return 0
