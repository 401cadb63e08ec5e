"""Exact oracles for the pure task-vector operations on small hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from lightning_ft.merging import ops
from lightning_ft.merging.compeft import pack_bits, unpack_bits
from lightning_ft.merging.registry import get_method


def test_lines_factors_per_block_and_outside() -> None:
    got = [ops.lines_factor(i, 4, 0.2, 0.8) for i in range(4)]
    assert got == pytest.approx([0.2, 0.2 + 0.8 / 3, 0.2 + 1.6 / 3, 1.0], abs=1e-12)
    assert ops.lines_factor(None, 4, 0.2, 0.8) == 0.2  # embeddings / final norm / head: alpha (official)
    assert ops.lines_factor(None, 4, 0.2, 0.8, "one") == 1.0
    assert ops.lines_factor(None, 4, 0.2, 0.8, "last") == pytest.approx(1.0)
    assert ops.lines_factor(0, 1, 0.3, 0.5) == pytest.approx(0.8)  # a single block is also the last


def test_lines_scale_invariants() -> None:
    theta0, theta = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    assert torch.equal(ops.lines_scale(theta0, theta, 1.0), theta)  # alpha=1, beta=0: identity
    assert torch.equal(ops.lines_scale(theta0, theta, 0.0), theta0)  # alpha=beta=0: theta_0
    assert torch.equal(ops.lines_scale(theta0, theta, 0.25), torch.tensor([1.5, 1.0]))
    bf16 = ops.lines_scale(theta0.bfloat16(), theta.bfloat16(), 0.5)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16.float(), torch.tensor([2.0, 0.0]))


def test_lines_alpha_from_norms() -> None:
    assert ops.lines_alpha_from_norms(10.0, 10.0, 2) == 0.5  # task arithmetic: 1 / T
    assert ops.lines_alpha_from_norms(12.0, 4.0, 3) == 1.0


def test_ties_trim_elect_disjoint_mean() -> None:
    t1 = torch.tensor([3.0, -1.0, 0.5, -2.0])
    t2 = torch.tensor([-1.0, 2.0, 0.4, -1.0])
    t3 = torch.tensor([2.0, 3.0, -4.0, 0.1])
    # density 0.5 keeps 2 entries each: t1 -> [3,0,0,-2], t2 -> [-1,2,0,0] (tie: first position), t3 -> [0,3,-4,0]
    assert torch.equal(ops.magnitude_mask(t2, 0.5), torch.tensor([True, True, False, False]))
    trimmed = torch.stack([t * ops.magnitude_mask(t, 0.5) for t in (t1, t2, t3)])
    assert torch.equal(ops.elect_sign(trimmed), torch.tensor([1.0, 1.0, -1.0, -1.0]))  # sign of [2, 5, -4, -2]
    assert torch.equal(ops.ties([t1, t2, t3], density=0.5), torch.tensor([3.0, 2.5, -4.0, -2.0]))
    assert torch.equal(ops.ties([t1, t2, t3], density=0.5, scaling=0.5), torch.tensor([1.5, 1.25, -2.0, -1.0]))


def test_elect_sign_zero_sum_takes_the_majority() -> None:
    trimmed = torch.tensor([[1.0, 2.0, 1.0, -1.0], [-1.0, 1.0, 1.0, 0.0]])  # sums [0, 3, 2, -1]
    assert torch.equal(ops.elect_sign(trimmed), torch.tensor([1.0, 1.0, 1.0, -1.0]))


def test_breadcrumbs_kept_entries() -> None:
    values = torch.arange(1, 101, dtype=torch.float32) * torch.where(torch.arange(100) % 3 == 0, -1.0, 1.0)
    x = values[torch.randperm(100)].view(10, 10)
    mask = ops.breadcrumbs_mask(x, density=0.2, gamma=0.05)
    assert int(mask.sum()) == 20
    assert sorted(x[mask].abs().tolist()) == [float(v) for v in range(76, 96)]  # top 5 and bottom 75 dropped
    assert int(ops.breadcrumbs_mask(torch.arange(10.0), 0.25, 0.1).sum()) == 2  # floor(2.5)
    merged = ops.breadcrumbs([x, -x], density=0.2, gamma=0.05, scaling=0.5)
    assert torch.equal(merged, torch.zeros_like(x))
    assert torch.equal(ops.breadcrumbs([x], density=0.2, gamma=0.05, scaling=2.0), 2 * x * mask)
    with pytest.raises(ValueError, match="density \\+ gamma <= 1"):
        ops.breadcrumbs_mask(x, 0.9, 0.2)


def test_soup_and_task_arithmetic() -> None:
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 4.0])
    assert torch.equal(ops.uniform_soup([a, b]), torch.tensor([2.0, 1.0]))
    assert torch.equal(ops.task_arithmetic([a, b], 0.5), torch.tensor([2.0, 1.0]))
    assert torch.equal(ops.task_arithmetic([a, b], 1.0, weights=[2.0, 0.0]), torch.tensor([2.0, -4.0]))


def test_ternarize_and_bit_packing() -> None:
    x = torch.tensor([0.5, -3.0, 0.0, 2.0, -0.1])
    mask = torch.tensor([False, True, False, True, True])
    assert torch.equal(ops.ternarize(x, mask, 1.5), torch.tensor([0.0, -1.5, 0.0, 1.5, -1.5]))
    bits = torch.rand(19) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == 3
    assert torch.equal(unpack_bits(packed, 19), bits)


def test_registry_refuses_unknown_names_in_one_sentence() -> None:
    with pytest.raises(ValueError, match="Did you mean 'ties'"):
        get_method("tie")
    with pytest.raises(ValueError, match="has no parameter 'k'"):
        get_method("ties").resolve({"k": 20})
    assert get_method("ties").resolve({"density": 0.3}) == {"density": 0.3, "scaling": 1.0}
