"""Reading the Pilot's states during a forward pass, and fusing the Copilot's rectification into its predictions."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessor

from lightning_ft.core.anatomy import decoder_parts, input_embeddings

__all__ = ["CopilotLogitsProcessor", "PilotCapture", "fuse_log_probs", "fuse_probs"]


def fuse_probs(scores: torch.Tensor, rectification: torch.Tensor, lam: float) -> torch.Tensor:
    """``p = softmax(scores) + lam * f``, clamped at zero and renormalised (fp32).

    ``scores`` may be logits or log-probabilities (the softmax is the same). Entries an earlier logits processor
    set to ``-inf`` stay at probability zero.
    """
    probs = torch.softmax(scores.float(), dim=-1)
    fused = probs + lam * rectification.float()
    fused = torch.where(torch.isneginf(scores), torch.zeros_like(fused), fused).clamp_min(0.0)
    return fused / fused.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def fuse_log_probs(scores: torch.Tensor, rectification: torch.Tensor, lam: float) -> torch.Tensor:
    """Log of :func:`fuse_probs` (``-inf`` where the fused probability is zero); ``lam == 0`` returns the Pilot's
    own log-softmax."""
    if lam == 0:
        return torch.log_softmax(scores.float(), dim=-1)
    return fuse_probs(scores, rectification, lam).log()


class PilotCapture:
    """Forward hooks that record, for the latest forward pass of the Pilot, its input embeddings ``X``, the mean of
    its decoder layers' outputs ``pool(h)`` (fp32 running sum, detached) and optionally the LM head's output.

    Use as a context manager; each forward pass inside overwrites the record. Nothing is kept on the autograd graph.
    """

    def __init__(self, backbone: nn.Module, logits: bool = False) -> None:
        parts = decoder_parts(backbone, "CopilotMixin")
        self.embedding = input_embeddings(backbone)
        self.layers = parts.layers
        self.head = parts.head if logits else None
        self.embeds: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._count = 0
        self.logits: torch.Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> PilotCapture:
        self._handles.append(self.embedding.register_forward_hook(self._on_embed))
        self._handles += [layer.register_forward_hook(self._on_layer) for layer in self.layers]
        if self.head is not None:
            self._handles.append(self.head.register_forward_hook(self._on_head))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_embed(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self.embeds = output.detach()
        self._sum, self._count, self.logits = None, 0, None

    def _on_layer(self, module: nn.Module, args: Any, output: Any) -> None:
        hidden = (output[0] if isinstance(output, tuple) else output).detach().float()
        self._sum = hidden.clone() if self._sum is None else self._sum.add_(hidden)
        self._count += 1

    def _on_head(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self.logits = output.detach()

    @property
    def hidden(self) -> torch.Tensor:
        """``[B, n, D]`` fp32 mean of the decoder layers' outputs of the latest forward pass."""
        if self._sum is None or self._count != len(self.layers):
            raise RuntimeError(
                f"the Pilot forward reached {self._count} of its {len(self.layers)} decoder layers: run a full forward "
                "inside the capture."
            )
        return self._sum / self._count


class CopilotLogitsProcessor(LogitsProcessor):
    """A transformers ``LogitsProcessor`` that fuses the Copilot into HF ``generate`` (greedy, beam or sampling).

    At each step it reads the Pilot's states of the new positions (through :class:`PilotCapture`), runs the Copilot
    on them with its cache, feeding back its own previous output, and returns the log of
    ``clamp(p + lam * f, 0)`` renormalised: log-probabilities, as beam search expects. Beam reordering is followed
    by matching each hypothesis to its parent's token prefix. ``lam == 0`` returns the scores untouched.

    With ``share_head`` (no beam search) and a tied Copilot head whose readout matrix is the Pilot's own LM head
    weight (a LoRA Pilot, or frozen embeddings), the Copilot's step runs when the Pilot's head is called and its
    readout rides along in the same product (:func:`~lightning_ft.copilot.decoder.few_rows_product`): one pass over
    the ``[vocab, d]`` matrix per token instead of two. The head's ``forward`` is replaced for the duration of the
    ``with`` block and restored after it.

    Use it as a context manager around ``generate`` so that its hooks are removed afterwards::

        with CopilotLogitsProcessor(module, lam=0.8, attention_mask=mask) as fuse:
            out = module.backbone.generate(input_ids, attention_mask=mask, logits_processor=[fuse])

    Args:
        module: A LightningModule with :class:`~lightning_ft.copilot.CopilotMixin`.
        lam: Fusion weight; ``None`` uses the module's current ``copilot_lambda``.
        attention_mask: The prompt's ``[B, T]`` attention mask (left padding), if any.
        share_head: Compute the readout in the Pilot's head product where possible (only without beam search:
            the step runs before the processor sees the reordered hypotheses).
    """

    def __init__(
        self,
        module: Any,
        lam: float | None = None,
        attention_mask: torch.Tensor | None = None,
        share_head: bool = False,
    ) -> None:
        self.module = module
        self.lam = float(module.copilot_lambda if lam is None else lam)
        self.prompt_mask = attention_mask
        self.capture = PilotCapture(module.backbone)
        self.share_head = share_head
        self._shared_head: nn.Linear | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the sequences seen so far (start a new ``generate`` call)."""
        from lightning_ft.copilot.decoder import DecoderCache

        self.cache = DecoderCache()
        self.ids: torch.Tensor | None = None
        self.next_input: torch.Tensor | None = None
        self._shared_rect: torch.Tensor | None = None

    def __enter__(self) -> CopilotLogitsProcessor:
        self.reset()
        self.capture.__enter__()
        head = decoder_parts(self.module.backbone, "CopilotMixin").head
        if (self.share_head and self.lam != 0 and type(head) is nn.Linear and head.bias is None
                and self.module.copilot.reads_out_through(head.weight)):  # fmt: skip
            head.forward = self._head_with_readout  # an instance attribute: hooks and __call__ are untouched
            self._shared_head = head
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._shared_head is not None:
            del self._shared_head.forward  # back to nn.Linear.forward
            self._shared_head = None
        self.capture.__exit__(*exc)

    @property
    def shares_head(self) -> bool:
        """Whether the Copilot's readout rides in the Pilot's head product inside this ``with`` block."""
        return self._shared_head is not None

    def _head_with_readout(self, states: torch.Tensor) -> torch.Tensor:
        """The Pilot's head over ``states [B, n, d]`` with the Copilot's pre-readout row appended to the product;
        keeps that row's output (the rectification) and returns the Pilot's ``[B, n, vocab]`` logits."""
        from lightning_ft.copilot.decoder import few_rows_product

        assert self._shared_head is not None
        readout = self.module.copilot.readout(self._copilot_step(None))  # [B, d]
        out = few_rows_product(torch.cat((states, readout[:, None].to(states.dtype)), dim=1), self._shared_head.weight)
        self._shared_rect = out[:, -1].float()
        return out[:, :-1]

    @torch.no_grad()
    def _copilot_step(self, input_ids: torch.Tensor | None) -> torch.Tensor:
        """The Copilot's hidden state at the last new position ``[rows, hidden]``; advances its cache and input."""
        copilot = self.module.copilot
        embeds, hidden = self.capture.embeds, self.capture.hidden
        if embeds is None:
            raise RuntimeError(
                "CopilotLogitsProcessor saw no Pilot forward: use it as a context manager around generate."
            )
        rows, new = embeds.shape[:2]
        device, dtype = embeds.device, copilot.dtype
        if self.cache.length == 0:  # the prompt: the Copilot's stream starts at its last position, with input 0
            valid = torch.ones(rows, new, dtype=torch.bool, device=device)
            if self.prompt_mask is not None:
                mask = self.prompt_mask.to(device).bool()
                valid = mask.repeat_interleave(rows // mask.shape[0], dim=0)[:, -new:]
            inputs = torch.zeros(rows, 1, copilot.cfg.hidden_size, dtype=dtype, device=device)
        else:
            if input_ids is not None:
                self._check_length(new, input_ids.shape[1])
                self._follow_reorder(input_ids[:, : self.cache.length])
            assert self.next_input is not None  # set at every step
            valid = torch.ones(rows, new, dtype=torch.bool, device=device)
            inputs = self.next_input[:, None].to(dtype)
        last = torch.full((rows, 1), self.cache.length + new - 1, dtype=torch.long, device=device)
        stream = (last, torch.ones(rows, 1, dtype=torch.bool, device=device))
        out = copilot(inputs, embeds.to(dtype), hidden.to(dtype), valid, self.cache, stream=stream)[:, -1]
        self.next_input = copilot.feedback(out)
        return out

    def _check_length(self, new: int, length: int) -> None:
        if self.cache.length + new != length:
            raise RuntimeError(
                f"CopilotLogitsProcessor tracked {self.cache.length} positions but the Pilot's forward added {new} to a "
                f"sequence of {length}: generate without a cache is not supported (use_cache must stay true)."
            )

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.lam == 0:
            return scores
        if self._shared_rect is not None:
            rectification, self._shared_rect = self._shared_rect, None
            self._check_length(0, input_ids.shape[1])
        else:
            rectification = self.module.copilot.rectify(self._copilot_step(input_ids))
        self.ids = input_ids.clone()
        return fuse_log_probs(scores, rectification, self.lam).to(scores.dtype)

    def _follow_reorder(self, prefix: torch.Tensor) -> None:
        assert self.ids is not None and self.next_input is not None
        if prefix.shape == self.ids.shape and torch.equal(prefix, self.ids):
            return
        same = (prefix[:, None, :] == self.ids[None, :, :]).all(-1)  # [rows, previous rows]
        if not bool(same.any(1).all()):
            raise RuntimeError("CopilotLogitsProcessor could not match a hypothesis to the previous step's sequences.")
        parents = same.float().argmax(1)
        self.cache = self.cache.select(parents)
        self.next_input = self.next_input.index_select(0, parents)
