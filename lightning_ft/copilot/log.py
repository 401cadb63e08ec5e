"""The mistake log: a bounded CPU ring buffer of the Pilot's recent training rounds."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

__all__ = ["ErrorStorage", "MistakeLog", "Round"]

ErrorStorage = Literal["dense", "topk"]


@dataclass
class Round:
    """One training round of the Pilot, detached and on the CPU.

    Attributes:
        embeds: ``[B, T, D]`` the Pilot's input embeddings (``X``).
        hidden: ``[B, T, D]`` its decoder-layer outputs averaged over layers (``pool(h)``).
        valid: ``[B, T]`` real tokens (the attention mask).
        error_mask: ``[B, T]`` positions ``t`` that carry an error ``onehot(y_{t+1}) - p_t`` (a labelled next token).
        errors: ``[N, V]`` the errors of those positions in row-major order (``dense``), or their ``k`` largest
            magnitudes ``[N, k]`` (``topk``) with ``indices``.
        indices: ``[N, k]`` int32 vocabulary ids of ``errors`` for ``topk`` storage, else ``None``.
    """

    embeds: torch.Tensor
    hidden: torch.Tensor
    valid: torch.Tensor
    error_mask: torch.Tensor
    errors: torch.Tensor
    indices: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def dense_errors(self, vocab_size: int) -> torch.Tensor:
        """``[N, V]`` fp32 errors (``topk`` entries scattered into zeros)."""
        if self.indices is None:
            return self.errors.float()
        out = torch.zeros(self.errors.shape[0], vocab_size, dtype=torch.float32, device=self.errors.device)
        return out.scatter_(1, self.indices.long(), self.errors.float())

    def to(self, device: torch.device | str) -> Round:
        return Round(**{k: v.to(device, non_blocking=True) for k, v in self.tensors().items()})


class MistakeLog:
    """The last ``max_rounds`` rounds, evicting the oldest whenever the total exceeds ``max_mib``.

    Args:
        max_rounds: Rounds kept (paper: 128).
        max_mib: Cap on the bytes held, in MiB; a single round larger than the cap is refused.
    """

    def __init__(self, max_rounds: int, max_mib: float) -> None:
        if max_rounds < 1:
            raise ValueError(f"buffer_rounds={max_rounds} must be at least 1.")
        if max_mib <= 0:
            raise ValueError(f"buffer_mib={max_mib} must be positive.")
        self.max_rounds, self.max_bytes = max_rounds, int(max_mib * 2**20)
        self.rounds: deque[Round] = deque()
        self.nbytes = 0
        self.peak_bytes = 0

    def __len__(self) -> int:
        return len(self.rounds)

    def push(self, entry: Round) -> None:
        """Append a round, dropping the oldest ones until both caps hold."""
        size = entry.nbytes
        if size > self.max_bytes:
            raise ValueError(
                f"one Pilot round takes {size / 2**20:.1f} MiB, more than buffer_mib={self.max_bytes / 2**20:g}: raise "
                "buffer_mib, shorten max_length or the batch, or set error_storage='topk'."
            )
        while self.rounds and (len(self.rounds) >= self.max_rounds or self.nbytes + size > self.max_bytes):
            self.nbytes -= self.rounds.popleft().nbytes
        self.rounds.append(entry)
        self.nbytes += size
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def sample(self, generator: torch.Generator) -> Round:
        """A round drawn uniformly from the log."""
        if not self.rounds:
            raise RuntimeError("the mistake log is empty: push a round before sampling.")
        index = int(torch.randint(len(self.rounds), (1,), generator=generator))
        return self.rounds[index]

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": [r.tensors() for r in self.rounds]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds.clear()
        self.nbytes = 0
        for tensors in state.get("rounds", []):
            self.push(Round(**tensors))
