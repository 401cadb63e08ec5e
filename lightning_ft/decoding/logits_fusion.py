"""Dynamic Logits Fusion (Fan et al., NeurIPS 2024, https://arxiv.org/abs/2406.15480): weak-to-strong transfer at
decoding time.

A large base model ``L``, a small base model ``s`` and small experts ``s_1..s_m`` fine-tuned from ``s`` share one
vocabulary. At every decoding step the large model's next-token logits become

    z = z_L + sum_i a_i (z_si - z_s)

with the weights ``a`` chosen per step (and per row) by the paper's KL-matching objective (Eq. 3 for one expert, the
multi-expert form of Sec. 3.2 and Algorithm 1 of the appendix). With ``P = softmax(z_L)``, ``P~ = softmax(z)``,
``Q = softmax(z_s)`` and ``Q_i = softmax(z_si)``:

    a* = argmin_a  sum_i [ (KL(P~ || P) - KL(Q_i || Q))^2 + (KL(P || P~) - KL(Q || Q_i))^2 ]

so that the large model moves away from its base distribution by as much as each expert moves away from the small base,
in both KL directions. The paper searches ``a`` over a grid of ``[0, 2]`` in steps of 0.1 (Algorithm 1), the default
here. With several experts the paper's accelerated search ("perform alpha search only for one task, for a total of T
times") lets one expert act per step: the candidates are ``a * e_i`` for every grid value and expert
(``search="one_expert"``, the default); ``search="joint"`` tries the full Cartesian grid instead.

Where the paper is silent, this implementation decides: ties keep the first candidate in grid order (the smallest
weight, expert 1 before expert 2); the objective sees the raw logits, after the processors ``generate`` applies before
custom ones (repetition penalty, minimum length) and before temperature and top-p, so sampling draws from the fused
distribution the objective chose; tokens outside the small models' vocabulary (padding rows of a wider large model's
head) are given zero probability. A fixed ``alpha`` turns the search off: ``alpha=1`` with one expert is static proxy
tuning (Liu et al. 2024; Mitchell et al. 2024), the baseline the paper compares with.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn
from transformers import LogitsProcessor
from typing_extensions import Self

from lightning_ft.errors import UserError

__all__ = [
    "PAPER_ALPHA_GRID",
    "DynamicLogitsFusion",
    "IncrementalLM",
    "alpha_candidates",
    "check_alpha_grid",
    "check_same_vocabulary",
    "choose_alphas",
    "fuse_logits",
    "kl_divergence",
    "kl_matching_loss",
]

Search = Literal["one_expert", "joint"]

#: the paper's grid (Algorithm 1): [0, 2] in steps of 0.1
PAPER_ALPHA_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(21))
ALPHA_LIMIT = 5.0
MAX_JOINT_CANDIDATES = 10_000
_CHUNK_ELEMENTS = 1 << 24  # fused logits evaluated at once per chunk of candidates (64 MiB in fp32)


# ---------------------------------------------------------------------- pure tensor functions
def fuse_logits(
    large: torch.Tensor, small_base: torch.Tensor, experts: torch.Tensor, alphas: torch.Tensor
) -> torch.Tensor:
    """``z_L + sum_i a_i (z_si - z_s)`` in fp32.

    Args:
        large: ``[B, V]`` logits of the large model.
        small_base: ``[B, V]`` logits of the small base model.
        experts: ``[B, m, V]`` logits of the small experts.
        alphas: ``[B, m]`` (or ``[m]``) weights.
    """
    alphas = alphas.float().expand(experts.shape[0], -1)
    shift = experts.float() - small_base.float()[:, None]
    return large.float() + torch.einsum("bm,bmv->bv", alphas, shift)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(p) || softmax(q))`` over the last dimension (fp32); tokens with ``p = 0`` add nothing."""
    log_p = torch.log_softmax(p_logits.float(), dim=-1)
    log_q = torch.log_softmax(q_logits.float(), dim=-1)
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(torch.isneginf(log_p), torch.zeros_like(terms), terms).sum(-1)


def alpha_candidates(grid: Sequence[float], experts: int, search: Search = "one_expert") -> torch.Tensor:
    """The ``[G, m]`` weight vectors the search tries, in tie-breaking order.

    ``one_expert``: the zero vector (when the grid holds 0), then ``a * e_i`` for each expert ``i`` and each non-zero
    grid value ``a``; ``joint``: the Cartesian product of the grid, ``len(grid) ** m`` vectors.
    """
    grid = check_alpha_grid(grid)
    if search == "joint" or experts == 1:
        return torch.tensor(list(itertools.product(grid, repeat=experts)), dtype=torch.float32)
    rows = [[0.0] * experts] if 0.0 in grid else []
    for i in range(experts):
        rows += [[a if j == i else 0.0 for j in range(experts)] for a in grid if a != 0.0]
    return torch.tensor(rows, dtype=torch.float32)


def kl_matching_loss(
    large: torch.Tensor, small_base: torch.Tensor, experts: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    """The paper's objective for every candidate weight vector: ``[B, G]``.

    ``sum_i (KL(P~||P) - KL(Q_i||Q))^2 + (KL(P||P~) - KL(Q||Q_i))^2`` with ``P~ = softmax(fuse_logits(...))``.
    """
    base = small_base.float()[:, None]
    forward = kl_divergence(experts, base)  # [B, m]: KL(Q_i || Q)
    reverse = kl_divergence(base, experts)  # [B, m]: KL(Q || Q_i)
    shift = experts.float() - base
    rows, vocab = large.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, rows * vocab))
    losses = []
    for chunk in candidates.to(large.device).float().split(step):
        fused = large.float()[:, None] + torch.einsum("gm,bmv->bgv", chunk, shift)  # [B, g, V]
        shifted = kl_divergence(fused, large[:, None])[..., None]  # [B, g, 1]: KL(P~ || P)
        back = kl_divergence(large[:, None], fused)[..., None]  # KL(P || P~)
        losses.append(((shifted - forward[:, None]) ** 2 + (back - reverse[:, None]) ** 2).sum(-1))
    return torch.cat(losses, dim=1)


def choose_alphas(
    large: torch.Tensor, small_base: torch.Tensor, experts: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    """``[B, m]``: per row, the candidate with the smallest :func:`kl_matching_loss` (the first one on ties)."""
    best = kl_matching_loss(large, small_base, experts, candidates).argmin(dim=1)
    return candidates.to(large.device)[best]


# ---------------------------------------------------------------------- checks
def check_alpha_grid(grid: Sequence[float], name: str = "alpha_grid") -> list[float]:
    """The grid as floats, or one sentence when it is empty or holds a value outside ``[0, 5]``."""
    values = [float(a) for a in grid]
    bad = next((a for a in values if not (math.isfinite(a) and 0.0 <= a <= ALPHA_LIMIT)), None)
    if not values or bad is not None:
        found = "is empty" if not values else f"holds {bad}"
        raise UserError(f"{name} {found}: give weights in [0, {ALPHA_LIMIT:g}], e.g. the paper's grid 0, 0.1, ..., 2 "
                        "(the default).")  # fmt: skip
    return values


def _fixed_alphas(alpha: float | Sequence[float], experts: int) -> torch.Tensor:
    values = [float(alpha)] * experts if isinstance(alpha, (int, float)) else [float(a) for a in alpha]
    if len(values) != experts:
        raise UserError(f"alpha has {len(values)} weights for {experts} experts: give one weight per expert, a single "
                        "number for all, or None to choose them per step.")  # fmt: skip
    return torch.tensor(check_alpha_grid(values, "alpha"), dtype=torch.float32)


def check_same_vocabulary(tokenizers: Sequence[tuple[str, Any]]) -> None:
    """Refuse, in one sentence, tokenizers whose vocabularies differ from the first one's.

    Args:
        tokenizers: ``(argument name, tokenizer)`` pairs; the first is the reference (the large model's).
    """
    (ref_name, ref), *others = tokenizers
    vocab = ref.get_vocab()
    for name, tok in others:
        other = tok.get_vocab()
        if other != vocab:
            differ = len(set(vocab.items()) ^ set(other.items()))
            raise UserError(f"{name}'s tokenizer differs from {ref_name}'s ({len(other)} and {len(vocab)} tokens, "
                            f"{differ} entries not shared): logits fusion adds logits token by token, so give models of "
                            "one family that share one tokenizer.")  # fmt: skip


# ---------------------------------------------------------------------- small models, one step at a time
class IncrementalLM:
    """A causal LM run one decoding step at a time with its own KV cache, following ``generate``'s sequences.

    The first :meth:`step` reads the (left-padded) prompt with its attention mask; each later one reads only the
    tokens appended since, with the positions ``generate`` gives them (the count of attended tokens before each).

    Args:
        model: A transformers causal LM (possibly peft-wrapped).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.cache: Any = None
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._cache_name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    def reset(self) -> None:
        """Forget the cache (start a new sequence)."""
        self.cache = None

    @torch.no_grad()
    def step(self, new_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` fp32 logits after ``new_ids [B, n]``; ``attention_mask [B, T]`` covers the whole sequence."""
        device = _device_of(self.model)
        mask = attention_mask.to(device)
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -new_ids.shape[1] :]
        cache = {self._cache_name: self.cache}  # transformers renamed past_key_values to cache in 5.x
        out = self.model(input_ids=new_ids.to(device), attention_mask=mask, position_ids=positions, use_cache=True,
                         **cache)  # fmt: skip
        self.cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return out.logits[:, -1].float()


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------- the processor
class DynamicLogitsFusion(LogitsProcessor):
    """A transformers ``LogitsProcessor`` that fuses small experts into the large model's ``generate``.

    The large model is the one generating; this processor runs the small base and the experts itself, each with its
    own KV cache (one new token per step, not the whole prefix), and returns ``z_L + sum_i a_i (z_si - z_s)`` with
    ``a`` chosen per step and per row by the KL-matching objective (see the module docstring), or fixed. Greedy
    decoding and sampling are supported, batched with left padding (pass the prompt's attention mask); beam search is
    not (it reorders rows, which the small models' caches do not follow), and is refused when detected.

    Use it as a context manager around ``generate``, one ``with`` block per call::

        with DynamicLogitsFusion(small_base, [expert], attention_mask=mask) as fusion:
            out = large.generate(input_ids, attention_mask=mask, logits_processor=[fusion], max_new_tokens=32)
        fusion.alphas  # [steps, B, m]: the weights chosen at each step

    Args:
        small_base: The small base model ``s`` (the experts were fine-tuned from it).
        experts: The small experts ``s_1..s_m`` (at least one).
        alpha: ``None`` chooses the weights per step; a number (one weight for every expert) or one number per expert
            fixes them (``1.0``: static proxy tuning).
        alpha_grid: The weights the search tries; default the paper's ``0, 0.1, ..., 2``.
        search: ``one_expert`` (the paper's accelerated multi-expert search: one expert acts per step) or ``joint``
            (every combination of grid values); the same for a single expert.
        attention_mask: The prompt's ``[B, T]`` attention mask (left padding), if any.

    Raises:
        UserError: no experts, a weight outside ``[0, 5]``, a grid too large for a joint search, or small models whose
            vocabulary sizes differ.
    """

    def __init__(
        self,
        small_base: nn.Module,
        experts: Sequence[nn.Module],
        *,
        alpha: float | Sequence[float] | None = None,
        alpha_grid: Sequence[float] | None = None,
        search: Search = "one_expert",
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        experts = list(experts)
        if not experts:
            raise UserError("experts is empty: give at least one small expert fine-tuned from the small base model.")
        if search not in ("one_expert", "joint"):
            raise UserError(f"search={search!r} is not a search: use 'one_expert' (the paper's) or 'joint'.")
        grid = check_alpha_grid(PAPER_ALPHA_GRID if alpha_grid is None else alpha_grid)
        if search == "joint" and len(grid) ** len(experts) > MAX_JOINT_CANDIDATES:
            raise UserError(f"a joint search over {len(experts)} experts tries {len(grid)}^{len(experts)} weight "
                            f"vectors per step (more than {MAX_JOINT_CANDIDATES}): use search='one_expert' or a "
                            "coarser alpha_grid.")  # fmt: skip
        sizes = {_vocab_rows(m) for m in (small_base, *experts)}
        if len(sizes) > 1:
            raise UserError(f"the small base and the experts have heads of different sizes ({sorted(sizes)}): the "
                            "experts must be fine-tuned from the small base model, with its tokenizer.")  # fmt: skip
        self.streams = [IncrementalLM(m) for m in (small_base, *experts)]
        self.fixed = None if alpha is None else _fixed_alphas(alpha, len(experts))
        self.candidates = alpha_candidates(grid, len(experts), search)
        self.prompt_mask = attention_mask
        self.alphas_per_step: list[torch.Tensor] = []
        self._ids: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._modes: list[bool] = []

    def reset(self, attention_mask: torch.Tensor | None = None) -> None:
        """Forget the sequences and weights seen so far (start a new ``generate`` call)."""
        if attention_mask is not None:
            self.prompt_mask = attention_mask
        for stream in self.streams:
            stream.reset()
        self.alphas_per_step = []
        self._ids = self._mask = None

    def __enter__(self) -> Self:
        self.reset()
        self._modes = [s.model.training for s in self.streams]
        for stream in self.streams:
            stream.model.eval()
        return self

    def __exit__(self, *exc: object) -> None:
        for stream, mode in zip(self.streams, self._modes):
            stream.model.train(mode)
        for stream in self.streams:
            stream.reset()  # the caches hold memory; the chosen weights stay readable

    @property
    def alphas(self) -> torch.Tensor:
        """``[steps, B, m]``: the weights used at each step so far."""
        return torch.stack(self.alphas_per_step) if self.alphas_per_step else torch.zeros(0)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        new_ids, mask = self._advance(input_ids)
        small = [stream.step(new_ids, mask).to(scores.device) for stream in self.streams]
        width = min(scores.shape[-1], small[0].shape[-1])
        large, base = scores[:, :width].float(), small[0][:, :width]
        experts = torch.stack([s[:, :width] for s in small[1:]], dim=1)
        if self.fixed is not None:
            alphas = self.fixed.to(scores.device).expand(scores.shape[0], -1)
        else:
            alphas = choose_alphas(large, base, experts, self.candidates)
        self.alphas_per_step.append(alphas.cpu())
        fused = torch.full_like(scores, float("-inf"))
        fused[:, :width] = fuse_logits(large, base, experts, alphas).to(scores.dtype)
        return fused

    def _advance(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens appended since the last step and the attention mask of the whole sequence."""
        rows, length = input_ids.shape
        if self._ids is None:
            mask = torch.ones_like(input_ids)
            if self.prompt_mask is not None:
                prompt = self.prompt_mask.to(input_ids.device).long()
                mask = prompt.repeat_interleave(rows // prompt.shape[0], dim=0)[:, -length:]
            new = input_ids
        else:
            seen = self._ids.shape[1]
            if length <= seen or not torch.equal(input_ids[:, :seen], self._ids):
                raise UserError("DynamicLogitsFusion saw the sequences change between steps (beam search reorders "
                                "them): decode greedily or by sampling with num_beams=1.")  # fmt: skip
            assert self._mask is not None
            new = input_ids[:, seen:]
            mask = torch.cat([self._mask, torch.ones_like(new)], dim=1)
        self._ids, self._mask = input_ids.clone(), mask
        return new, mask


def _vocab_rows(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)
