"""The Copilot decoder: alternating causal self-attention and masked cross-attention to the Pilot's states.

The Copilot's own sequence (its *stream*) is the error sequence: the positions that carry an error (a labelled next
token), in order; the Pilot's states of every position form the cross-attention memory. Layer ``1, 3, 5, ...``
(1-based, the paper's odd layers) self-attend causally over the stream with rotary positions (each element at its
token position); layers ``2, 4, ...`` replace self-attention by cross-attention whose keys and values come from
``[X ; pool(h)]``: the Pilot's input embeddings and its hidden states averaged over layers, concatenated along the
sequence. Every attention is masked so that the stream element at position ``t`` reads only positions ``<= t`` of
the Pilot's states (what the Pilot has computed when it predicts token ``t + 1``) and only stream elements up to
``t``, whose inputs carry the errors of earlier elements. The prompt reaches the Copilot through the memory alone,
so its cost follows the number of error positions, not the sequence length. The layers are Llama-style (RMSNorm,
SwiGLU) so that their weights can be copied from a pretrained decoder of that family. The decoder runs over a whole
sequence (training) or a few new positions at a time with a cache (fused decoding); both give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CopilotConfig", "CopilotDecoder", "CopilotLayer", "DecoderCache", "few_rows_product", "pack_stream"]

# up to this many rows, a CPU product with a vocabulary-sized weight runs as ``(weight @ x^T)^T`` (see few_rows_product)
_FEW_ROWS = 64


def few_rows_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T`` (``F.linear`` without bias) for ``x [..., d]`` and ``weight [V, d]``.

    On the CPU, with at most 64 rows, it is computed as ``(weight @ x^T)^T``: torch runs ``F.linear``'s few-row case as
    a single-threaded matrix-vector product, the transposed form as a multithreaded matrix product that reads
    ``weight`` once for every row (2 cores, SmolLM2's ``[49152, 576]`` head: one row 12 ms by ``F.linear``, two rows
    8 ms this way). Equal to ``F.linear`` up to fp32 summation order.
    """
    rows = x.numel() // max(x.shape[-1], 1)
    if x.device.type != "cpu" or rows > _FEW_ROWS:
        return F.linear(x, weight)
    flat = x.reshape(rows, x.shape[-1])
    return torch.mm(weight, flat.t()).t().reshape(*x.shape[:-1], weight.shape[0])


_LLAMA_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


@dataclass
class CopilotConfig:
    """Shape of a Copilot decoder.

    Attributes:
        vocab_size: Size of the error vectors it reads and the rectification it writes (the Pilot's vocabulary).
        hidden_size: Copilot width.
        pilot_hidden_size: Width of the Pilot states it cross-attends to (aligned by a linear map when different).
        embed_size: Width of the frozen embedding matrix errors are read through (default ``pilot_hidden_size``:
            the Pilot's own embeddings).
        num_layers: Decoder layers (alternating self / cross, starting with self-attention).
        num_heads: Query heads.
        num_kv_heads: Key/value heads (grouped-query attention when fewer than ``num_heads``).
        intermediate_size: SwiGLU width.
        rms_norm_eps: RMSNorm epsilon.
        rope_theta: Rotary base of the self-attention layers.
        attention_bias: Biases on q/k/v (Qwen2-style layers).
        head: The output layer: ``full``, a trainable ``[vocab, hidden]`` map; ``tied``, the frozen embedding matrix
            the errors are read through (as a tied LM head) after a trainable ``[embed_size, hidden]`` map.
    """

    vocab_size: int
    hidden_size: int
    pilot_hidden_size: int
    embed_size: int = 0
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 8
    intermediate_size: int = 1024
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    attention_bias: bool = False
    head: Literal["full", "tied"] = "full"

    def __post_init__(self) -> None:
        self.embed_size = self.embed_size or self.pilot_hidden_size
        if self.head not in ("full", "tied"):
            raise ValueError(f"copilot head={self.head!r} is not an option: use 'full' or 'tied'.")
        if self.num_layers < 2:
            raise ValueError(
                f"copilot num_layers={self.num_layers} must be at least 2 (one self-, one cross-attention)."
            )
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"copilot hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}: "
                "hidden_size must divide by num_heads and num_heads by num_kv_heads."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in fp32 (Llama's)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class _Attention(nn.Module):
    def __init__(self, cfg: CopilotConfig) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)


class _MLP(nn.Module):
    def __init__(self, cfg: CopilotConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of ``x [B, H, n, hd]`` at integer ``positions [B, n]`` (Llama's rotate-half form)."""
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))
    angles = positions.float()[..., None] * inv  # [B, n, hd/2]
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, n, hd]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    half = hd // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class DecoderCache:
    """What decoding a few positions at a time keeps: per layer the keys/values seen so far (the stream's in
    self-attention layers, the memory's in cross-attention layers), the memory's validity and length, and each stream
    element's memory position and validity."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    key_valid: torch.Tensor | None = None  # [B, t] bool, validity of the memory positions seen so far
    length: int = 0  # memory positions seen so far
    stream_positions: torch.Tensor | None = None  # [B, s] long, memory position of each stream element so far
    stream_valid: torch.Tensor | None = None  # [B, s] bool

    def select(self, rows: torch.Tensor) -> DecoderCache:
        """The cache of the given rows (beam search reorders its hypotheses)."""
        pick = lambda t: None if t is None else t.index_select(0, rows)
        return DecoderCache([pick(k) for k in self.keys], [pick(v) for v in self.values], pick(self.key_valid),
                            self.length, pick(self.stream_positions), pick(self.stream_valid))  # fmt: skip


def pack_stream(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream of each row of ``mask [B, t]`` (bool, the error positions): ``positions [B, m]`` (long, in order,
    left-packed; ``m`` is the largest count) and ``kept [B, m]`` (which entries are real; the rest pad)."""
    counts = mask.sum(1)
    width = int(counts.max()) if mask.numel() else 0
    positions = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
    return positions, torch.arange(width, device=mask.device)[None] < counts[:, None]


class CopilotLayer(nn.Module):
    """One pre-norm decoder layer: (self- or cross-) attention then SwiGLU, each with a residual connection.

    Parameter names follow Llama's decoder layer (``self_attn.q_proj`` ..., ``mlp.gate_proj`` ...,
    ``input_layernorm``, ``post_attention_layernorm``) so a pretrained layer's state dict loads directly; a
    cross-attention layer also normalises the memory it reads (``memory_norm``).
    """

    def __init__(self, cfg: CopilotConfig, cross: bool) -> None:
        super().__init__()
        self.cfg, self.cross = cfg, cross
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = _Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = _MLP(cfg)
        self.memory_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if cross else None

    def _heads(self, x: torch.Tensor, proj: nn.Linear, heads: int) -> torch.Tensor:
        return proj(x).view(x.shape[0], x.shape[1], heads, self.cfg.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        memory: torch.Tensor | None,
        cache: DecoderCache | None,
        index: int,
    ) -> torch.Tensor:
        """``x [B, m, d]`` new stream elements at rotary ``positions [B, m]``; ``mask [B, 1, m, keys]`` (True
        attends) over the stream so far (self-attention) or the memory so far (cross-attention); ``memory [B, 2, n, d]``
        (cross layers): ``X`` and ``pool(h)`` at the new memory positions; ``cache`` keeps this layer's keys/values
        (``[B, kv, s, hd]``, or ``[B, kv, 2, t, hd]`` for cross layers)."""
        cfg = self.cfg
        b, m = x.shape[:2]
        h = self.input_layernorm(x)
        q = self.self_attn.q_proj(h).view(b, m, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        if self.cross:
            source = self.memory_norm(memory)  # type: ignore[misc]
            n = source.shape[2]
            k = self.self_attn.k_proj(source).view(b, 2, n, cfg.num_kv_heads, cfg.head_dim).permute(0, 3, 1, 2, 4)
            v = self.self_attn.v_proj(source).view(b, 2, n, cfg.num_kv_heads, cfg.head_dim).permute(0, 3, 1, 2, 4)
        else:
            k = self.self_attn.k_proj(h).view(b, m, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
            v = self.self_attn.v_proj(h).view(b, m, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
            q, k = _rotate(q, positions, cfg.rope_theta), _rotate(k, positions, cfg.rope_theta)
        if cache is not None:
            old_k, old_v = cache.keys[index], cache.values[index]
            if old_k is not None:
                k, v = torch.cat((old_k, k), dim=-2), torch.cat((old_v, v), dim=-2)  # type: ignore[arg-type]
            cache.keys[index], cache.values[index] = k, v
        if self.cross:  # keys [X_0..X_t | h_0..h_t]; the mask is repeated over the two blocks
            k, v = k.flatten(2, 3), v.flatten(2, 3)
            mask = torch.cat((mask, mask), dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=cfg.num_kv_heads != cfg.num_heads)
        x = x + self.self_attn.o_proj(out.transpose(1, 2).reshape(b, m, -1))
        return x + self.mlp(self.post_attention_layernorm(x))


class CopilotDecoder(nn.Module):
    """Reads error vectors over the vocabulary and the Pilot's states; writes a rectification over the vocabulary.

    * ``embed``: the error (or, when decoding, the Copilot's own previous output) of position ``t - 1`` enters
      position ``t`` through a frozen ``[vocab, embed_size]`` matrix (a copy of the Pilot's, or the Copilot
      model's, input embeddings, so an error ``onehot(y) - p`` reads as ``e_y - E^T p``) and a trainable map to
      the Copilot's width (identity at start when the widths agree).
    * ``memory_proj``: aligns the Pilot's width to the Copilot's (identity when equal).
    * the output layer (``head``): ``full``, a trainable projection ``lm_out`` to the vocabulary; ``tied``, a
      trainable map ``out_proj`` to the embedding width read out through the frozen ``embed`` matrix (as a tied LM
      head, whitened by ``(E^T E)^-1``: see :meth:`readout`), with 0.3M instead of 28M trainable parameters on
      SmolLM2. Either starts at zero by default, so an untrained Copilot changes nothing.
    """

    def __init__(self, cfg: CopilotConfig, zero_init_output: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.embed_size), requires_grad=False)
        self.input_proj = nn.Linear(cfg.embed_size, cfg.hidden_size, bias=False)
        self.memory_proj: nn.Module = (
            nn.Identity()
            if cfg.pilot_hidden_size == cfg.hidden_size
            else nn.Linear(cfg.pilot_hidden_size, cfg.hidden_size, bias=False)
        )
        self.layers = nn.ModuleList(CopilotLayer(cfg, cross=i % 2 == 1) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.head == "full":
            self.lm_out = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        else:
            self.out_proj = nn.Linear(cfg.hidden_size, cfg.embed_size, bias=False)
        if cfg.embed_size == cfg.hidden_size:
            with torch.no_grad():
                self.input_proj.weight.copy_(torch.eye(cfg.hidden_size))
        if zero_init_output:
            nn.init.zeros_(self.head_weight)
        self._feedback_key: tuple[int, ...] | None = None
        self._feedback_map: torch.Tensor | None = None

    @property
    def head_weight(self) -> nn.Parameter:
        """The trainable weight of the output layer (``lm_out`` or ``out_proj``)."""
        return self.lm_out.weight if self.cfg.head == "full" else self.out_proj.weight

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the Copilot computes in."""
        return self.head_weight.dtype

    # ------------------------------------------------------------------ initialisation
    def load_pilot_layers(self, layers: list[dict[str, torch.Tensor]]) -> None:
        """Copy pretrained Llama-style decoder layers (plain state dicts, lowest first) into the Copilot's layers.

        Cross-attention layers take the pretrained self-attention projections as their starting point; their
        ``memory_norm`` starts at one. The final norm stays at one: the pretrained final norm scales hidden states
        for logits of magnitude 10 and more, the Copilot writes errors of magnitude 1 and less (and the larger scale
        makes the first optimizer steps overshoot). Fails in one sentence when a layer does not have Llama's
        parameter names.
        """
        for i, (layer, state) in enumerate(zip(self.layers, layers)):
            missing = [k for k in _LLAMA_KEYS if f"{k}.weight" not in state]
            if missing:
                raise ValueError(
                    f"copilot layer {i}: the pretrained layer has no {missing[0]}.weight (not a Llama/Mistral/Qwen2-style "
                    "decoder layer): set copilot_init='random' or give copilot_model a model of that family."
                )
            wanted = layer.state_dict()
            load = {k: v for k, v in state.items() if k in wanted}
            if "memory_norm.weight" in wanted:
                load["memory_norm.weight"] = wanted["memory_norm.weight"]
            layer.load_state_dict(load, strict=True)

    # ------------------------------------------------------------------ running
    def input_rows(self, errors: torch.Tensor) -> torch.Tensor:
        """``[..., vocab]`` error (or rectification) vectors -> ``[..., hidden]`` Copilot inputs."""
        return self.input_proj(self.read(errors))

    def input_rows_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`input_rows` for vectors given by their ``k`` largest entries ``[N, k]`` (values, ids)."""
        return self.input_proj(self.read_sparse(values, indices))

    def forward(
        self,
        inputs: torch.Tensor,
        pilot_embeds: torch.Tensor,
        pilot_hidden: torch.Tensor,
        valid: torch.Tensor,
        cache: DecoderCache | None = None,
        stream: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Hidden states ``[B, m, hidden]`` (after the final norm) of ``m`` new stream elements.

        Args:
            inputs: ``[B, m, hidden]`` Copilot inputs of the new stream elements (:meth:`input_rows` of the error of
                the element before; zero for a row's first).
            pilot_embeds: ``[B, n, pilot_hidden]`` the Pilot's input embeddings at the ``n`` new memory positions
                (``n`` may be 0 when continuing with a cache).
            pilot_hidden: ``[B, n, pilot_hidden]`` the Pilot's layer-averaged hidden states there.
            valid: ``[B, n]`` which new memory positions are real tokens (not padding).
            cache: ``None`` for a whole sequence; a :class:`DecoderCache` (empty at first) to continue one.
            stream: ``(positions [B, m], kept [B, m])`` the memory position (counted from the sequence's start) of
                each new stream element and whether it is real (:func:`pack_stream`); default: every new memory
                position is a stream element, real where ``valid``.
        """
        n = pilot_embeds.shape[1]
        start = cache.length if cache is not None else 0
        key_valid = valid.bool()
        if cache is not None and cache.key_valid is not None:
            key_valid = torch.cat((cache.key_valid, key_valid), dim=1)
        if stream is None:
            positions = torch.arange(start, start + n, device=inputs.device)[None].expand(inputs.shape[0], -1)
            kept = valid.bool()
        else:
            positions, kept = stream[0].long(), stream[1].bool()
        if positions.numel() and int(positions.max()) >= start + n:
            raise ValueError(
                f"CopilotDecoder: a stream element at memory position {int(positions.max())} is past the "
                f"{start + n} memory positions given so far."
            )
        all_positions, all_kept = positions, kept
        if cache is not None:
            if not cache.keys:
                cache.keys, cache.values = [None] * len(self.layers), [None] * len(self.layers)
            if cache.stream_positions is not None:
                all_positions = torch.cat((cache.stream_positions, positions), dim=1)
                all_kept = torch.cat((cache.stream_valid, kept), dim=1)  # type: ignore[arg-type]
            cache.key_valid, cache.length = key_valid, start + n
            cache.stream_positions, cache.stream_valid = all_positions, all_kept
        m, s = positions.shape[1], all_positions.shape[1]
        query = positions[:, :, None]
        own = torch.arange(s - m, s, device=inputs.device)[:, None] == torch.arange(s, device=inputs.device)[None]
        # an element sees the real stream elements at or before its position, and always itself (no row is empty)
        self_mask = ((all_positions[:, None, :] <= query) & all_kept[:, None, :]) | own[None]
        memory_index = torch.arange(start + n, device=inputs.device)[None, None, :]
        # and the real memory positions at or before its own position, and always that position
        cross_mask = ((memory_index <= query) & key_valid[:, None, :]) | (memory_index == query)
        rope = (key_valid.long().cumsum(1) - 1).clamp_min(0).gather(1, positions)  # token index among real tokens
        memory = self.memory_proj(torch.stack((pilot_embeds, pilot_hidden), dim=1).to(inputs.dtype))
        x = inputs
        for i, layer in enumerate(self.layers):
            mask = cross_mask if layer.cross else self_mask
            x = layer(x, rope, mask[:, None], memory if layer.cross else None, cache, i)
        return self.norm(x)

    def rectify(self, hidden: torch.Tensor) -> torch.Tensor:
        """Copilot hidden states -> fp32 rectification vectors over the vocabulary."""
        if self.cfg.head == "full":
            return self.lm_out(hidden).float()
        return few_rows_product(self.readout(hidden).to(self.embed.dtype), self.embed).float()

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied head's pre-readout row ``out_proj(h) (E^T E)^-1`` (fp32): its product with ``embed^T`` is the
        rectification. The rectification is the least-squares lift of ``out_proj(h)`` onto the embeddings' span, so
        that reading it back through ``embed`` (as errors are read) returns ``out_proj(h)`` exactly, and the
        trainable map works at the scale of the error readings ``e_y - E^T p`` (a plain ``E out_proj(h)`` is
        ``E^T E``, about ``vocab * var(E)`` times, larger: AdamW's first steps overshoot the 0.005 error scale)."""
        return self.out_proj(hidden).float() @ self._gram_inverse()

    @torch.no_grad()
    def _gram_inverse(self) -> torch.Tensor:
        key = (id(self.embed), self.embed._version, self.embed.data_ptr())
        if getattr(self, "_gram_key", None) != key:
            embed = self.embed.double()
            gram = embed.T @ embed
            ridge = 1e-8 * float(gram.diagonal().mean())  # keeps a rank-deficient embedding matrix invertible
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            self._gram_inv, self._gram_key = torch.linalg.inv(gram + ridge * eye).float(), key
            self._gram = gram
        return self._gram_inv

    def read(self, errors: torch.Tensor) -> torch.Tensor:
        """``[..., vocab]`` vectors read through the embeddings, ``errors @ embed`` ``[..., embed_size]`` (the part of
        :meth:`input_rows` before the trainable map)."""
        return errors.to(self.embed.dtype) @ self.embed

    def read_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """:meth:`read` of vectors given by their ``k`` largest entries ``[N, k]`` (values, ids)."""
        return (values.to(self.embed.dtype)[..., None] * self.embed[indices.long()]).sum(1)

    def tied_squared_error(self, hidden: torch.Tensor, reading: torch.Tensor, norm_sq: torch.Tensor) -> torch.Tensor:
        """``||rectify(hidden) - e||^2`` per row (fp64) for the tied head, from ``reading = e @ embed`` and
        ``norm_sq = ||e||^2`` alone, without the ``[vocab]``-wide rectification: with ``f = E r``,
        ``||f - e||^2 = r^T (E^T E) r - 2 r . (E^T e) + ||e||^2``. Equal to the dense form up to float rounding,
        gradients included; the dense form's cost (two products with the ``[vocab, embed]`` matrix per row, forward
        and backward) is gone."""
        if self.cfg.head != "tied":
            raise ValueError("tied_squared_error needs copilot head='tied' (a full head has no such identity).")
        r = self.readout(hidden).double()
        self._gram_inverse()
        quad = ((r @ self._gram.to(r.device)) * r).sum(-1)
        return (quad - 2 * (r * reading.double()).sum(-1) + norm_sq.double()).clamp_min(0.0)

    @torch.no_grad()
    def reads_out_through(self, weight: torch.Tensor) -> bool:
        """Whether the tied head's readout matrix ``embed`` equals ``weight`` (e.g. the Pilot's LM head: the paper's
        LoRA Pilot and LoRA Copilot of the same pretrained model share it), checked once per pair of weight versions.
        """
        if self.cfg.head != "tied" or weight.shape != self.embed.shape or weight.dtype != self.embed.dtype:
            return False
        key = tuple(x for w in (weight, self.embed) for x in (id(w), w._version, w.data_ptr()))
        if getattr(self, "_shares_key", None) != key:
            self._shares_key, self._shares = key, bool(torch.equal(weight, self.embed))
        return self._shares

    @torch.no_grad()
    def feedback(self, hidden: torch.Tensor) -> torch.Tensor:
        """``input_rows(rectify(hidden))`` (the next decoding input) without the two ``[vocab, d]`` products: the
        tied head's rectification reads back through ``embed`` as ``out_proj(h)`` itself; the full head's output
        and input maps compose into one ``[hidden, embed]`` matrix ``W^T E``, computed once per set of weights.

        Equal to the two-step form up to float rounding; used when decoding, never under autograd."""
        if self.cfg.head == "tied":
            return self.input_proj(self.out_proj(hidden).to(self.embed.dtype))
        weights = (self.head_weight, self.embed)
        key = tuple(x for w in weights for x in (id(w), w._version, w.data_ptr()))
        if self._feedback_key != key or self._feedback_map is None:
            composed = self.head_weight.float().T @ self.embed.float()
            self._feedback_map, self._feedback_key = composed.to(self.embed.dtype), key
        return self.input_proj(hidden.to(self.embed.dtype) @ self._feedback_map)
