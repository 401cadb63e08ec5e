"""A rule reward for the conformance matrix's GRPO row (importable as ``conf_rewards:completion_length`` from the
matrix's processes, whose path holds this folder)."""

from __future__ import annotations


def completion_length(prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    """The completion's length in characters."""
    return [float(len(c)) for c in completions]
