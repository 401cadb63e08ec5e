"""Exact oracles of the sparse fine-tuning building blocks: top-k, the compact AdamW step and its re-selection,
and the artifact (save/load, apply/revert, composition, the HF folder written by ``apply_sparse``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_ft.sparse import (
    CompactState,
    SparseDelta,
    allocate,
    apply_sparse,
    global_topk,
    sparse_adamw_,
    tensor_topk,
)
from lightning_ft.sparse.compact import mask_gradient_


# ---------------------------------------------------------------------------------------------------- top-k
def test_global_topk_matches_a_sorted_oracle_and_breaks_ties_by_position() -> None:
    gen = torch.Generator().manual_seed(1)
    scores = {
        "a": torch.rand(7, 5, generator=gen),
        "b": torch.tensor([0.5, 0.5, 0.5, 0.25]),
        "c": torch.rand(11, generator=gen) * 2,
    }
    flat = torch.cat([s.flatten() for s in scores.values()])
    owner = [(n, i) for n, s in scores.items() for i in range(s.numel())]
    for k in (0, 1, 5, 17, 30, flat.numel(), flat.numel() + 3):
        got = global_topk(scores, k)
        assert sum(v.numel() for v in got.values()) == min(k, flat.numel())
        # oracle: stable sort by descending score, ties by (tensor order, index)
        order = sorted(range(flat.numel()), key=lambda j: (-float(flat[j]), j))[:k]
        expected: dict[str, list[int]] = {n: [] for n in scores}
        for j in order:
            expected[owner[j][0]].append(owner[j][1])
        for name in scores:
            assert got[name].tolist() == sorted(expected[name])


def test_tensor_topk_and_exact_allocation() -> None:
    score = torch.tensor([[0.1, 0.9], [0.9, 0.3]])
    assert tensor_topk(score, 1).tolist() == [1]  # tie between flat 1 and 2: the lower index wins
    assert tensor_topk(score, 3).tolist() == [1, 2, 3]
    assert tensor_topk(torch.tensor([float("nan"), 1.0]), 1).tolist() == [1]
    shares = allocate({"a": 10, "b": 30, "c": 7}, 11)
    assert sum(shares.values()) == 11 and shares == {"a": 2, "b": 7, "c": 2}
    assert allocate({"a": 3, "b": 5}, 100) == {"a": 3, "b": 5}


# ---------------------------------------------------------------------------------------------------- compact AdamW
def test_compact_adamw_at_full_density_is_torch_adamw_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(0)
    ref = torch.nn.Parameter(torch.randn(6, 4, generator=gen))
    mine = ref.detach().clone()
    opt = torch.optim.AdamW([ref], lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    state = CompactState.create(mine, torch.arange(mine.numel()))
    for _ in range(5):
        grad = torch.randn(6, 4, generator=gen)
        ref.grad = grad.clone()
        opt.step()
        sparse_adamw_(mine, grad, state, lr=3e-2, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1)
    assert torch.equal(ref.detach(), mine)
    assert torch.equal(opt.state[ref]["exp_avg"].flatten(), state.exp_avg)
    assert state.step == 5 and state.indices.dtype == torch.int32


def test_compact_adamw_touches_only_the_selected_entries_and_matches_adamw_there() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 8, generator=gen)
    idx = torch.tensor([0, 3, 17, 39])
    start = weight.clone()
    state = CompactState.create(weight, idx)
    ref = torch.nn.Parameter(start.reshape(-1)[idx].clone())
    opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.5)
    for _ in range(3):
        grad = torch.randn(5, 8, generator=gen)
        sparse_adamw_(weight, grad, state, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.5)
        ref.grad = grad.reshape(-1)[idx].clone()
        opt.step()
    outside = torch.ones(40, dtype=torch.bool)
    outside[idx] = False
    assert torch.equal(weight.reshape(-1)[outside], start.reshape(-1)[outside])
    assert torch.equal(weight.reshape(-1)[idx], ref.detach())
    assert state.nbytes == 4 * (4 + 4 + 4)  # int32 indices + two fp32 moments, no master copy for fp32


def test_bf16_weights_keep_an_fp32_master_copy_of_the_selected_entries() -> None:
    weight = torch.ones(4, 4, dtype=torch.bfloat16)
    state = CompactState.create(weight, torch.tensor([5]))
    assert state.master is not None and state.master.dtype == torch.float32
    for _ in range(10):  # steps far below bf16's resolution at 1.0 accumulate in the master copy
        sparse_adamw_(weight, torch.ones(4, 4, dtype=torch.bfloat16), state, lr=1e-4, beta1=0.9, beta2=0.999,
                      eps=1e-8, weight_decay=0.0)  # fmt: skip
    assert state.master[0] < 1.0 - 9e-4
    assert weight.reshape(-1)[5] == state.master[0].to(torch.bfloat16)
    assert torch.equal(weight.reshape(-1)[torch.arange(16) != 5], torch.ones(15, dtype=torch.bfloat16))


def test_remap_carries_moments_of_kept_entries_and_the_step_count() -> None:
    weight = torch.zeros(10)
    old = CompactState.create(weight, torch.tensor([1, 4, 7]))
    old.exp_avg.copy_(torch.tensor([1.0, 4.0, 7.0]))
    old.exp_avg_sq.copy_(torch.tensor([10.0, 40.0, 70.0]))
    old.step = 12
    new = old.remap(weight, torch.tensor([0, 4, 7, 9]))
    assert new.indices.tolist() == [0, 4, 7, 9]
    assert new.exp_avg.tolist() == [0.0, 4.0, 7.0, 0.0] and new.exp_avg_sq.tolist() == [0.0, 40.0, 70.0, 0.0]
    assert new.step == 12


def test_mask_gradient_zeroes_everything_outside() -> None:
    grad = torch.arange(1.0, 13.0).reshape(3, 4)
    mask_gradient_(grad, torch.tensor([0, 5, 11]))
    assert grad.flatten().nonzero().squeeze(1).tolist() == [0, 5, 11]
    assert grad.flatten()[[0, 5, 11]].tolist() == [1.0, 6.0, 12.0]


# ---------------------------------------------------------------------------------------------------- artifact
def _delta(seed: int, keys: dict[str, tuple[int, ...]], k: int) -> tuple[SparseDelta, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    base = {key: torch.randn(shape, generator=gen) for key, shape in keys.items()}
    current = {key: t.clone() for key, t in base.items()}
    selected = {}
    for key, t in current.items():
        idx = torch.randperm(t.numel(), generator=gen)[:k].sort().values
        t.view(-1)[idx] += torch.randn(k, generator=gen)
        selected[key] = idx
    return SparseDelta.from_tensors(current, base, selected, base="tiny"), current


def test_artifact_round_trip_apply_revert_and_compose(tmp_path: Path) -> None:
    shapes = {"w.a": (4, 6), "w.b": (9,)}
    a, tuned_a = _delta(0, shapes, 5)
    b, _ = _delta(1, shapes, 3)
    path = a.save(tmp_path / "a.safetensors")
    loaded = SparseDelta.load(path)
    assert loaded.base == "tiny" and loaded.shapes == a.shapes and loaded.numel == 10
    for key in shapes:
        assert torch.equal(loaded.indices[key], a.indices[key]) and torch.equal(loaded.values[key], a.values[key])
    gen = torch.Generator().manual_seed(0)
    base = {key: torch.randn(shape, generator=gen) for key, shape in shapes.items()}  # same draw as _delta(0)
    live = {key: t.clone() for key, t in base.items()}
    loaded.apply_to(live)
    for key in shapes:
        torch.testing.assert_close(live[key], tuned_a[key], rtol=0, atol=1e-6)
        changed = (live[key] != base[key]).flatten().nonzero().squeeze(1)
        assert set(changed.tolist()) <= set(a.indices[key].tolist())
    loaded.apply_to(live, scale=-1.0)
    for key in shapes:
        torch.testing.assert_close(live[key], base[key], rtol=0, atol=1e-6)
    both = a + b
    for key in shapes:
        torch.testing.assert_close(both.delta(key), a.delta(key) + b.delta(key), rtol=0, atol=0)
        assert both.indices[key].tolist() == sorted(set(a.indices[key].tolist()) | set(b.indices[key].tolist()))


def test_artifact_refuses_a_model_it_does_not_fit(tmp_path: Path) -> None:
    a, _ = _delta(0, {"w.a": (4, 6)}, 2)
    with pytest.raises(KeyError, match="touches 'w.a', which the model does not have"):
        a.apply_to({"w.b": torch.zeros(4, 6)})
    with pytest.raises(ValueError, match=r"has shape \(4, 6\) but the model's has \(6, 4\)"):
        a.apply_to({"w.a": torch.zeros(6, 4)})
    bogus = tmp_path / "x.safetensors"
    from safetensors.torch import save_file

    save_file({"t": torch.zeros(2)}, str(bogus))
    with pytest.raises(ValueError, match="is not a lightning-ft sparse fine-tuning artifact"):
        SparseDelta.load(bogus)


def test_apply_sparse_writes_an_hf_folder_with_both_deltas_added(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    keys = {"model.layers.0.self_attn.q_proj.weight": base["model.layers.0.self_attn.q_proj.weight"].shape,
            "model.layers.1.mlp.down_proj.weight": base["model.layers.1.mlp.down_proj.weight"].shape}  # fmt: skip
    parts = []
    for seed in (3, 4):
        gen = torch.Generator().manual_seed(seed)
        cur = {k: base[k].clone() for k in keys}
        sel = {}
        for k, t in cur.items():
            idx = torch.randperm(t.numel(), generator=gen)[:20].sort().values
            t.view(-1)[idx] += 0.5
            sel[k] = idx
        parts.append(SparseDelta.from_tensors(cur, base, sel).save(tmp_path / f"d{seed}.safetensors"))
    out = apply_sparse(str(tiny_llama_dir), parts, tmp_path / "out")
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for key in keys:
        want = base[key] + SparseDelta.load(parts[0]).delta(key) + SparseDelta.load(parts[1]).delta(key)
        torch.testing.assert_close(merged[key], want, rtol=0, atol=1e-6)
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(ValueError, match="scales has 1 values for 2 artifacts"):
        apply_sparse(str(tiny_llama_dir), parts, tmp_path / "bad", scales=[1.0])
