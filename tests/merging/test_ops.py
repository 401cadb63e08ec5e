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


def test_ties_trim_elect_disjoint_mean_with_weights() -> None:
    t1 = torch.tensor([3.0, -1.0, 0.5, -2.0])
    t2 = torch.tensor([-1.0, 2.0, 0.4, -1.0])
    t3 = torch.tensor([2.0, 3.0, -4.0, 0.1])
    # density 0.5 keeps k = max(1, int(2.0)) = 2 each: t1 -> [3,0,0,-2], t2 -> [-1,2,0,0] (the tie of |-1| goes
    # to the entry torch.argsort puts first, as in mergekit), t3 -> [0,3,-4,0]
    assert torch.equal(ops.magnitude_mask(t2, 0.5), torch.tensor([True, True, False, False]))
    assert int(ops.magnitude_mask(t2, 0.1).sum()) == 1  # int(0.4) = 0, but at least one entry is kept
    trimmed = torch.stack([t * ops.magnitude_mask(t, 0.5) for t in (t1, t2, t3)])
    assert torch.equal(ops.elect_sign(trimmed), torch.tensor([1.0, 1.0, -1.0, -1.0]))  # sign of [2, 5, -4, -2]
    assert torch.equal(ops.ties([t1, t2, t3], density=0.5), torch.tensor([3.0, 2.5, -4.0, -2.0]))
    assert torch.equal(ops.ties([t1, t2, t3], density=0.5, normalize=False), torch.tensor([3.0, 5.0, -4.0, -2.0]))
    assert torch.equal(ops.ties([t1, t2, t3], density=0.5, lam=0.5), torch.tensor([1.5, 1.25, -2.0, -1.0]))
    # weights multiply before the election: D2 = 4 * [-1,2,0,0] turns entry 0's sum to -1, so only D2 is kept there;
    # normalize divides by the weights of the agreeing models: entry 1 (8 + 3) / (4 + 1)
    weighted = ops.ties([t1, t2, t3], density=0.5, weights=[1.0, 4.0, 1.0])
    assert torch.equal(weighted, torch.tensor([-1.0, 2.2, -4.0, -2.0]))


def test_elect_sign_zero_sum_elects_plus_and_pruned_entries_never_agree() -> None:
    trimmed = torch.tensor([[1.0, -2.0, -1.0, -1.0], [-1.0, 0.0, 0.0, 0.0]])  # sums [0, -2, -1, -1]
    assert torch.equal(ops.elect_sign(trimmed), torch.tensor([1.0, -1.0, -1.0, -1.0]))  # 0 elects +1 (mergekit)
    merged = ops.combine(trimmed, torch.ones(2, 1), consensus=True, normalize=True)
    assert torch.equal(merged, torch.tensor([1.0, -2.0, -1.0, -1.0]))  # the zeros of model 2 do not count


def test_breadcrumbs_kept_entries_per_tensor_and_per_row() -> None:
    values = torch.arange(1, 101, dtype=torch.float32) * torch.where(torch.arange(100) % 3 == 0, -1.0, 1.0)
    x = values[torch.randperm(100)].view(10, 10)
    mask = ops.breadcrumbs_mask(x, density=0.2, gamma=0.05)
    assert int(mask.sum()) == 20
    assert sorted(x[mask].abs().tolist()) == [float(v) for v in range(76, 96)]  # top 5 and bottom 75 dropped
    assert int(ops.breadcrumbs_mask(torch.arange(10.0), 0.25, 0.1).sum()) == 2  # int(2.5)
    wide = ops.breadcrumbs_mask(x, density=0.9, gamma=0.2)  # density + gamma > 1: only 10 dropped at the top
    assert sorted(x[wide].abs().tolist()) == [float(v) for v in range(1, 91)]
    assert bool(ops.breadcrumbs_mask(x, density=1.0, gamma=0.5).all())  # density >= 1 keeps everything (mergekit)
    merged = ops.breadcrumbs([x, -x], density=0.2, gamma=0.05, lam=0.5)
    assert torch.equal(merged, torch.zeros_like(x))
    assert torch.equal(ops.breadcrumbs([x], density=0.2, gamma=0.05, lam=2.0), 2 * x * mask)
    rows = torch.tensor([[5.0, -4.0, 3.0, 2.0, 1.0], [1.0, 2.0, -3.0, 4.0, 5.0]])
    expected = torch.tensor([[False, True, True, False, False], [False, False, True, True, False]])
    assert torch.equal(ops.breadcrumbs_mask(rows, 0.4, 0.2, scope="row"), expected)  # per row: drop 1, keep 2
    with pytest.raises(ValueError, match="gamma=1.5 must be between 0 and 1"):
        ops.breadcrumbs_mask(x, 0.5, 1.5)


def test_dare_rescale_and_draws() -> None:
    delta, kept = torch.tensor([1.0, -2.0, 3.0, -4.0]), torch.tensor([0.0, -2.0, 0.0, -4.0])
    assert torch.equal(ops.l1_rescale(delta, kept), kept * (torch.tensor(10.0) / torch.tensor(6.0)))  # L1, not 1/p
    assert torch.equal(ops.l1_rescale(delta, torch.zeros(4)), torch.zeros(4))
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    assert torch.equal(ops.sparsify(delta, "bernoulli", 1.0, generator=gen), delta)
    assert torch.equal(gen.get_state(), state)  # density 1 draws nothing
    drawn = ops.sparsify(delta, "bernoulli", 0.5, rescale=False, generator=gen)
    mask = torch.bernoulli(torch.full((4,), 0.5), generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, delta * mask)


def test_soup_linear_and_task_arithmetic() -> None:
    a, b, base = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 4.0]), torch.tensor([10.0, 10.0])
    assert torch.equal(ops.uniform_soup([a, b]), torch.tensor([2.0, 1.0]))
    assert torch.equal(ops.task_arithmetic([a, b], lam=0.5), torch.tensor([2.0, 1.0]))
    assert torch.equal(ops.task_arithmetic([a, b], weights=[2.0, 0.0]), torch.tensor([2.0, -4.0]))
    assert torch.equal(ops.task_arithmetic([a, b], weights=[2.0, 0.0], normalize=True), torch.tensor([1.0, -2.0]))
    assert torch.equal(ops.linear(base, [a, b], [1.0, 3.0]), torch.tensor([2.5, 2.5]))  # (a + 3b) / 4
    # normalize false: the model is 1 * (base + a) + 3 * (base + b) = [50, 50], i.e. the task vector [40, 40]
    assert torch.equal(ops.linear(base, [a, b], [1.0, 3.0], normalize=False), torch.tensor([40.0, 40.0]))
    with pytest.raises(ValueError, match="sum of the weights, which is 0"):
        ops.linear(base, [a, b], [1.0, -1.0])


def test_ternarize_and_bit_packing() -> None:
    x = torch.tensor([0.5, -3.0, 0.0, 2.0, -0.1])
    mask = torch.tensor([False, True, False, True, True])
    assert torch.equal(ops.ternarize(x, mask, 1.5), torch.tensor([0.0, -1.5, 0.0, 1.5, -1.5]))
    bits = torch.rand(19) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == 3
    assert torch.equal(unpack_bits(packed, 19), bits)


def test_registry_resolves_mergekit_parameters_and_refuses_in_one_sentence() -> None:
    with pytest.raises(ValueError, match="Did you mean 'ties'"):
        get_method("tie")
    with pytest.raises(ValueError, match="has no parameter 'k'"):
        get_method("ties").resolve({"k": 20})
    with pytest.raises(ValueError, match=r"no parameter 'densty' \(did you mean 'density'\?\)"):
        get_method("ties").resolve({"densty": 0.2})
    resolved = get_method("ties").resolve({"density": 0.3, "scaling": 0.5}, [None, {"density": 0.5, "weight": 2}])
    assert resolved.params == {"normalize": True, "lambda": 0.5, "int8_mask": False, "rescale": False}
    assert resolved.models == [{"weight": 1.0, "density": 0.3}, {"weight": 2.0, "density": 0.5}]  # own block wins
    assert get_method("breadcrumbs").resolve({}, [{}]).models == [{"weight": 1.0, "density": 1.0, "gamma": 0.01}]
    with pytest.raises(ValueError, match="Both 'scaling' and 'lambda' are set"):
        get_method("ties").resolve({"scaling": 0.5, "lambda": 1.0})
    with pytest.raises(ValueError, match="'normalize' is a global parameter of 'ties'"):
        get_method("ties").resolve({}, [{"normalize": False}])
    with pytest.raises(ValueError, match="has no per-model parameter 'gamma'"):
        get_method("ties").resolve({}, [{"gamma": 0.1}])
    with pytest.raises(ValueError, match="density=1.5 must be between 0 and 1"):
        get_method("dare_ties").resolve({}, [{"density": 1.5}])
    with pytest.raises(ValueError, match="per-layer lists .* are not supported"):
        get_method("ties").resolve({"weight": [0.1, 0.9]}, [{}])
    with pytest.raises(ValueError, match="use method 'linear' for a weighted average"):
        get_method("uniform_soup").resolve({}, [{"weight": 2.0}])
    seed = get_method("dare_linear").resolve({}, [{}]).params["seed"]
    assert isinstance(seed, int)  # drawn once when not given, and reported
