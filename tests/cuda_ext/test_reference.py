"""The kernels' pure-PyTorch references against exact oracles (hand computations on small tensors), and the
dispatch functions (which run the references on CPU) against the same oracles."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_ft import cuda_ext
from lightning_ft.cuda_ext import reference
from lightning_ft.sparse.compact import CompactState

ADAM = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)


@pytest.fixture(params=["reference", "dispatch"])
def adamw(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    return reference.sparse_adamw_ if request.param == "reference" else cuda_ext.sparse_adamw_


def test_sparse_adamw_first_step_by_hand(adamw) -> None:  # type: ignore[no-untyped-def]
    param = torch.tensor([1.0, 2.0, 3.0, 4.0])
    grad = torch.tensor([0.5, -1.0, 2.0, 0.0])
    state = CompactState.create(param, torch.tensor([1, 3]))
    assert state.indices.dtype == torch.int32 and state.master is None
    adamw(param, grad, state, **{**ADAM, "weight_decay": 0.5})
    # entry 1: decay 2 * (1 - 0.1 * 0.5) = 1.9; m = 0.1 * -1, v = 0.001 * 1; m_hat / (sqrt(v_hat) + eps) = -1
    # entry 3: decay 4 * 0.95 = 3.8; zero gradient, zero moments: no move
    torch.testing.assert_close(param, torch.tensor([1.0, 1.9 + 0.1 / (1 + 1e-8), 3.0, 3.8]), rtol=0, atol=1e-6)
    assert param[0] == 1.0 and param[2] == 3.0  # unselected entries are untouched bit for bit
    torch.testing.assert_close(state.exp_avg, torch.tensor([-0.1, 0.0]))
    torch.testing.assert_close(state.exp_avg_sq, torch.tensor([0.001, 0.0]))
    assert state.step == 1


def test_sparse_adamw_second_step_by_hand(adamw) -> None:  # type: ignore[no-untyped-def]
    param = torch.tensor([0.0, 0.0])
    state = CompactState.create(param, torch.tensor([0]))
    adamw(param, torch.tensor([1.0, 5.0]), state, **ADAM)
    adamw(param, torch.tensor([3.0, 5.0]), state, **ADAM)
    m, v = 0.9 * 0.1 + 0.1 * 3, 0.999 * 0.001 + 0.001 * 9
    expected = -0.1 - 0.1 * (m / (1 - 0.9**2)) / (math.sqrt(v / (1 - 0.999**2)) + 1e-8)
    assert param[1] == 0.0 and abs(float(param[0]) - expected) < 1e-6


def test_sparse_adamw_all_selected_is_torch_adamw_bit_for_bit(adamw) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 5))
    param = weight.detach().clone()
    opt = torch.optim.AdamW([weight], lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, foreach=False)
    state = CompactState.create(param, torch.arange(30))
    for _ in range(3):
        grad = torch.randn(6, 5)
        weight.grad = grad.clone()
        opt.step()
        adamw(param, grad, state, lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1)
    assert torch.equal(param, weight.detach())


def test_sparse_adamw_empty_mask_changes_nothing(adamw) -> None:  # type: ignore[no-untyped-def]
    param = torch.randn(3, 4)
    before = param.clone()
    state = CompactState.create(param, torch.tensor([], dtype=torch.long))
    adamw(param, torch.randn(3, 4), state, **{**ADAM, "weight_decay": 0.1})
    assert torch.equal(param, before) and state.exp_avg.numel() == 0 and state.step == 1


def test_sparse_adamw_non_contiguous_gradient_and_maximize(adamw) -> None:  # type: ignore[no-untyped-def]
    base = torch.randn(4, 3)
    grad_t = torch.randn(3, 4).t()  # a transposed view: not contiguous
    assert not grad_t.is_contiguous()
    idx = torch.tensor([0, 5, 11])
    a, b = base.clone(), base.clone()
    sa, sb = CompactState.create(a, idx), CompactState.create(b, idx)
    adamw(a, grad_t, sa, **ADAM, maximize=True)
    adamw(b, -grad_t.contiguous(), sb, **ADAM)
    assert torch.equal(a, b)


def test_sparse_adamw_bf16_weight_keeps_an_fp32_master(adamw) -> None:  # type: ignore[no-untyped-def]
    param = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    state = CompactState.create(param, torch.tensor([1]))
    assert state.master is not None and state.master.dtype == torch.float32
    for _ in range(3):  # each step moves the master by ~lr * 1e-3: far below bf16's spacing (1/64 at 2)
        adamw(param, torch.tensor([0.0, -1.0, 0.0], dtype=torch.bfloat16), state, **{**ADAM, "lr": 1e-3})
    assert abs(float(state.master[0]) - 2.003) < 1e-6  # the fp32 master accumulates the small steps
    assert param[1] == torch.tensor(2.003, dtype=torch.bfloat16) == 2.0 and param[0] == 1.0 and param[2] == 3.0


def test_copilot_error_by_hand() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0], [1.0, 1.0, 1.0, 1.0]])
    targets = torch.tensor([2, 0, -100])
    for fn in (reference.copilot_error, cuda_ext.copilot_error):
        out = fn(logits, targets)
        assert out.dtype == torch.bfloat16 and out.shape == (3, 4)
        expected = torch.tensor([[-0.25, -0.25, 0.75, -0.25], [0.75, -0.25, -0.25, -0.25], [0.0] * 4])
        assert torch.equal(out.float(), expected)
        assert not out[2].signbit().any()  # ignored rows are +0, not -0


def test_copilot_error_fp32_two_way_and_shapes() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]])
    out = cuda_ext.copilot_error(logits, torch.tensor([0]), dtype=torch.float32)
    torch.testing.assert_close(out, torch.tensor([[0.75, -0.75]]), rtol=0, atol=1e-7)
    torch.manual_seed(0)
    big = torch.randn(2, 3, 7) * 4
    tgt = torch.tensor([[1, 6, -100], [0, 3, 2]])
    out = cuda_ext.copilot_error(big, tgt, dtype=torch.float32)
    assert out.shape == (2, 3, 7)
    torch.testing.assert_close(out.sum(-1), torch.zeros(2, 3), rtol=0, atol=1e-6)  # onehot and softmax both sum to 1
    torch.testing.assert_close(out[0, 0], torch.nn.functional.one_hot(torch.tensor(1), 7) - big[0, 0].softmax(-1))


def test_copilot_error_non_contiguous_and_bf16_logits() -> None:
    torch.manual_seed(1)
    logits = torch.randn(9, 5)
    tgt = torch.tensor([0, 1, 2, 3, 4])
    transposed = logits.t()  # [5, 9], rows not contiguous
    assert not transposed.is_contiguous()
    assert torch.equal(cuda_ext.copilot_error(transposed, tgt), reference.copilot_error(transposed.contiguous(), tgt))
    half = logits.t().to(torch.bfloat16)
    expected = (torch.nn.functional.one_hot(tgt, 9) - half.float().softmax(-1)).to(torch.bfloat16)
    assert torch.equal(cuda_ext.copilot_error(half, tgt), expected)  # the softmax runs in fp32 on bf16 input


def test_pack_and_unpack_bits_by_hand() -> None:
    bits = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
    for pack, unpack in ((reference.pack_bits, reference.unpack_bits), (cuda_ext.pack_bits, cuda_ext.unpack_bits)):
        packed = pack(bits)
        assert packed.dtype == torch.uint8 and packed.tolist() == [0b1101, 1]
        assert torch.equal(unpack(packed, 9), bits)
        assert pack(torch.tensor([], dtype=torch.bool)).numel() == 0 and unpack(packed, 0).numel() == 0
        assert pack(torch.tensor([0.0, -2.0, 0.5])).tolist() == [0b110]  # nonzero is a 1
        assert pack(torch.ones(16, dtype=torch.bool)).tolist() == [255, 255]


def test_pack_bits_non_contiguous_roundtrip_and_errors() -> None:
    torch.manual_seed(0)
    grid = torch.rand(6, 11) > 0.5
    view = grid[:, ::2]  # strided
    assert torch.equal(cuda_ext.unpack_bits(cuda_ext.pack_bits(view), view.numel()), view.flatten())
    with pytest.raises(ValueError, match="count=17 exceeds the 16 bits"):
        cuda_ext.unpack_bits(torch.zeros(2, dtype=torch.uint8), 17)


def test_pack_bits_reference_writes_the_bytes_of_numpy_packbits() -> None:
    """ComPEFT artifacts written before the reference moved here were packed by numpy: same bytes, both ways."""
    import numpy as np

    gen = torch.Generator().manual_seed(0)
    for n in (0, 1, 7, 8, 9, 63, 1001):
        bits = torch.rand(n, generator=gen) > 0.5
        expected = np.packbits(bits.numpy(), bitorder="little")
        packed = reference.pack_bits(bits)
        assert packed.dtype == torch.uint8 and packed.tolist() == expected.tolist()
        back = np.unpackbits(expected, count=n, bitorder="little").astype(bool)
        assert reference.unpack_bits(torch.from_numpy(expected), n).tolist() == back.tolist()
