"""Copilot decoder, mistake log and fusion: exact properties on small random tensors."""

from __future__ import annotations

import pytest
import torch

from lightning_ft.copilot import (
    CopilotConfig,
    CopilotDecoder,
    DecoderCache,
    MistakeLog,
    PilotCapture,
    Round,
    fuse_log_probs,
    fuse_probs,
    pack_stream,
)

V, D = 50, 16


def _decoder(layers: int = 4, kv: int = 2, seed: int = 0) -> CopilotDecoder:
    torch.manual_seed(seed)
    cfg = CopilotConfig(vocab_size=V, hidden_size=D, pilot_hidden_size=D, num_layers=layers, num_heads=4, num_kv_heads=kv,
                        intermediate_size=32)  # fmt: skip
    dec = CopilotDecoder(cfg, zero_init_output=False)
    with torch.no_grad():
        dec.embed.normal_()
    return dec.eval()


def _inputs(b: int = 2, t: int = 7, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, t, D, generator=g), torch.randn(b, t, D, generator=g), torch.randn(b, t, D, generator=g),
            torch.ones(b, t, dtype=torch.bool))  # fmt: skip


def test_layers_alternate_self_and_cross_attention() -> None:
    dec = _decoder(layers=5)
    assert [layer.cross for layer in dec.layers] == [False, True, False, True, False]
    assert all((layer.memory_norm is not None) == layer.cross for layer in dec.layers)


@pytest.mark.parametrize("t", range(6))
def test_no_position_at_or_after_t_plus_one_reaches_output_t(t: int) -> None:
    """Perturbing the inputs, the Pilot embeddings and hidden states at positions > t leaves outputs <= t unchanged."""
    dec = _decoder()
    x, emb, hid, valid = _inputs()
    base = dec(x, emb, hid, valid)
    x2, emb2, hid2 = x.clone(), emb.clone(), hid.clone()
    for tensor in (x2, emb2, hid2):
        tensor[:, t + 1 :] += 10 * torch.randn_like(tensor[:, t + 1 :])
    out = dec(x2, emb2, hid2, valid)
    torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
    if t + 1 < x.shape[1]:
        assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])  # the perturbation does reach later positions


def test_pilot_state_at_t_reaches_output_t() -> None:
    """Position t reads the Pilot's states at t itself (what the Pilot has when it predicts token t+1)."""
    dec = _decoder()
    x, emb, hid, valid = _inputs()
    base = dec(x, emb, hid, valid)
    hid2 = hid.clone()
    hid2[:, 3] += 5.0
    out = dec(x, emb, hid2, valid)
    torch.testing.assert_close(out[:, :3], base[:, :3], rtol=0, atol=1e-6)
    assert not torch.allclose(out[:, 3], base[:, 3])


@pytest.mark.parametrize("chunks", [[7], [3, 1, 1, 1, 1], [1] * 7, [4, 3]])
def test_cached_decoding_equals_whole_sequence(chunks: list[int]) -> None:
    dec = _decoder()
    x, emb, hid, valid = _inputs()
    valid[0, :2] = False  # left padding in the first row
    full = dec(x, emb, hid, valid)
    cache, outs, start = DecoderCache(), [], 0
    for n in chunks:
        sl = slice(start, start + n)
        outs.append(dec(x[:, sl], emb[:, sl], hid[:, sl], valid[:, sl], cache))
        start += n
    torch.testing.assert_close(torch.cat(outs, 1)[:, 2:], full[:, 2:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(outs, 1)[1], full[1], rtol=1e-5, atol=1e-5)


def test_padding_is_invisible_to_real_positions() -> None:
    dec = _decoder()
    x, emb, hid, valid = _inputs(b=1)
    valid[0, :3] = False
    base = dec(x, emb, hid, valid)
    x2, emb2, hid2 = x.clone(), emb.clone(), hid.clone()
    for tensor in (x2, emb2, hid2):
        tensor[:, :3] = torch.randn_like(tensor[:, :3])
    torch.testing.assert_close(dec(x2, emb2, hid2, valid)[:, 3:], base[:, 3:], rtol=1e-5, atol=1e-6)


def test_zero_initialised_output_writes_zero() -> None:
    torch.manual_seed(0)
    cfg = CopilotConfig(vocab_size=V, hidden_size=D, pilot_hidden_size=D, num_layers=2, num_heads=4, num_kv_heads=4)
    dec = CopilotDecoder(cfg)
    x, emb, hid, valid = _inputs()
    assert torch.count_nonzero(dec.rectify(dec(x, emb, hid, valid))) == 0
    assert torch.equal(dec.input_proj.weight, torch.eye(D))


def test_input_rows_read_errors_through_the_embeddings() -> None:
    dec = _decoder()
    err = torch.randn(3, V)
    torch.testing.assert_close(dec.input_rows(err), (err @ dec.embed) @ dec.input_proj.weight.T)
    values, idx = err.abs().topk(5, dim=-1)
    vals = err.gather(1, idx)
    sparse = torch.zeros_like(err).scatter_(1, idx, vals)
    torch.testing.assert_close(dec.input_rows_sparse(vals, idx), dec.input_rows(sparse), rtol=1e-5, atol=1e-5)
    del values


def test_fusion_formula_and_lambda_zero() -> None:
    g = torch.Generator().manual_seed(0)
    logits, rect = torch.randn(4, V, generator=g), 0.05 * torch.randn(4, V, generator=g)
    p = torch.softmax(logits, -1) + 0.5 * rect
    expected = p.clamp_min(0) / p.clamp_min(0).sum(-1, keepdim=True)
    torch.testing.assert_close(fuse_probs(logits, rect, 0.5), expected)
    torch.testing.assert_close(fuse_probs(torch.log_softmax(logits, -1), rect, 0.5), expected)  # log-probs in
    assert torch.equal(fuse_log_probs(logits, rect, 0.0), torch.log_softmax(logits.float(), -1))
    big = torch.zeros(4, V)
    big[:, 0] = -5.0  # drives token 0 below zero: clamped, never sampled
    assert torch.all(fuse_probs(logits, big, 1.0)[:, 0] == 0)
    masked = logits.clone()
    masked[:, 1] = float("-inf")  # filtered by an earlier processor: stays impossible
    assert torch.all(fuse_probs(masked, torch.ones(4, V), 1.0)[:, 1] == 0)


def _round(rows: int, b: int = 2, t: int = 8, d: int = D, vocab: int = V) -> Round:
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask.view(-1)[:rows] = True
    return Round(torch.zeros(b, t, d, dtype=torch.bfloat16), torch.zeros(b, t, d, dtype=torch.bfloat16),
                 torch.ones(b, t, dtype=torch.bool), mask, torch.zeros(rows, vocab, dtype=torch.bfloat16))  # fmt: skip


def test_mistake_log_never_exceeds_its_caps() -> None:
    one = _round(4).nbytes
    log = MistakeLog(max_rounds=100, max_mib=3.5 * one / 2**20)
    for i in range(20):
        log.push(_round(4))
        assert log.nbytes <= log.max_bytes and len(log) <= 3
    assert log.peak_bytes <= log.max_bytes and len(log) == 3
    rounds = MistakeLog(max_rounds=5, max_mib=100)
    for _ in range(9):
        rounds.push(_round(1))
    assert len(rounds) == 5
    with pytest.raises(ValueError, match="buffer_mib=.*error_storage='topk'"):
        MistakeLog(max_rounds=2, max_mib=0.5 * one / 2**20).push(_round(4))


def test_mistake_log_sampling_is_uniform_and_seeded() -> None:
    log = MistakeLog(max_rounds=4, max_mib=100)
    entries = [_round(1) for _ in range(4)]
    for e in entries:
        log.push(e)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    picks = [id(log.sample(g1)) for _ in range(400)]
    assert picks[:20] == [id(log.sample(g2)) for _ in range(20)]
    counts = [picks.count(id(e)) for e in entries]
    assert min(counts) > 60  # all four rounds drawn


def test_topk_round_rebuilds_its_entries() -> None:
    err = torch.zeros(3, V)
    err[:, 7], err[:, 9] = 0.75, -0.5
    vals, idx = err.abs().topk(2, dim=-1)
    entry = _round(3)
    entry.errors, entry.indices = err.gather(1, idx).to(torch.bfloat16), idx.to(torch.int32)
    assert torch.equal(entry.dense_errors(V), err)


def test_config_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match="num_layers=1"):
        CopilotConfig(vocab_size=V, hidden_size=D, pilot_hidden_size=D, num_layers=1)
    with pytest.raises(ValueError, match="must divide"):
        CopilotConfig(vocab_size=V, hidden_size=D, pilot_hidden_size=D, num_heads=3, num_kv_heads=3)


def test_pilot_capture_refuses_a_model_without_decoder_layers_naming_the_copilot() -> None:
    import transformers

    config = transformers.BertConfig(vocab_size=V, hidden_size=D, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2)  # fmt: skip
    with pytest.raises(ValueError, match=r"^CopilotMixin needs a causal LM .*BertForMaskedLM"):
        PilotCapture(transformers.BertForMaskedLM(config))


def _tied(zero: bool = True) -> CopilotDecoder:
    torch.manual_seed(0)
    cfg = CopilotConfig(vocab_size=V, hidden_size=D, pilot_hidden_size=D, num_layers=2, num_heads=4, num_kv_heads=4,
                        head="tied")  # fmt: skip
    dec = CopilotDecoder(cfg, zero_init_output=zero)
    with torch.no_grad():
        dec.embed.normal_()
    return dec.eval()


def test_tied_head_starts_at_zero_and_reads_out_through_the_frozen_embeddings() -> None:
    dec = _tied()
    x, emb, hid, valid = _inputs()
    assert torch.count_nonzero(dec.rectify(dec(x, emb, hid, valid))) == 0
    assert not hasattr(dec, "lm_out") and dec.head_weight is dec.out_proj.weight
    trainable = {n for n, p in dec.named_parameters() if p.requires_grad}
    assert "out_proj.weight" in trainable and "embed" not in trainable
    with torch.no_grad():
        dec.out_proj.weight.normal_()
    h = torch.randn(3, D)
    gram = dec.embed.double().T @ dec.embed.double()
    lift = ((h @ dec.out_proj.weight.T).double() @ torch.linalg.inv(gram)) @ dec.embed.double().T
    torch.testing.assert_close(dec.rectify(h), lift.float(), rtol=1e-4, atol=1e-5)  # least-squares lift of out_proj(h)
    torch.testing.assert_close(dec.rectify(h) @ dec.embed, h @ dec.out_proj.weight.T, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="head='wide' is not an option"):
        CopilotConfig(vocab_size=V, hidden_size=D, pilot_hidden_size=D, head="wide")  # type: ignore[arg-type]


@pytest.mark.parametrize("head", ["full", "tied"])
def test_feedback_equals_the_input_rows_of_the_rectification_and_follows_weight_updates(head: str) -> None:
    dec = _decoder() if head == "full" else _tied(zero=False)
    h = torch.randn(3, D)
    torch.testing.assert_close(dec.feedback(h), dec.input_rows(dec.rectify(h)), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        dec.head_weight.mul_(2.0)  # an optimizer step changes the weights in place: the composed map follows
    torch.testing.assert_close(dec.feedback(h), dec.input_rows(dec.rectify(h)), rtol=1e-4, atol=1e-4)


def test_error_fit_is_the_rmse_against_onehot_minus_softmax() -> None:
    from lightning_ft.copilot.evaluation import ErrorFit

    scores = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    gold = torch.tensor([1, 2])
    rect = torch.tensor([[0.1, 0.2, -0.3], [0.0, 0.5, 0.0]])
    error = torch.nn.functional.one_hot(gold, 3).float() - torch.softmax(scores, -1)
    fit = ErrorFit()
    fit.update(rect[:1], gold[:1], scores[:1])
    fit.update(rect[1:], gold[1:], scores[1:])
    out = fit.compute_and_reset()
    assert out["copilot_rmse"] == pytest.approx(float((rect - error).pow(2).mean().sqrt()), rel=1e-6)
    assert out["copilot_zero_rmse"] == pytest.approx(float(error.pow(2).mean().sqrt()), rel=1e-6)
    assert fit.compute_and_reset() == {}


def _choose(rows: list[dict[str, float]], **settings: object) -> float:
    from types import SimpleNamespace

    from lightning_ft.copilot.evaluation import CopilotEvaluation
    from lightning_ft.copilot.settings import CopilotSettings

    host = SimpleNamespace(copilot_settings=CopilotSettings(**settings))  # type: ignore[arg-type]
    return CopilotEvaluation.choose_lambda(host, rows)  # type: ignore[arg-type]


def test_auto_lambda_considers_zero_and_chooses_on_the_named_metric() -> None:
    rows = [{"lambda": 0.0, "target_acc": 0.8, "target_loss": 0.40}, {"lambda": 0.1, "target_acc": 0.8, "target_loss": 0.60},
            {"lambda": 0.3, "target_acc": 0.8, "target_loss": 0.35}, {"lambda": 1.0, "target_acc": 0.7, "target_loss": 0.30}]  # fmt: skip
    assert _choose(rows) == 0.3  # accuracy by default on choice data; ties go to the lower loss
    assert _choose(rows, lambda_metric="target_loss") == 1.0
    assert _choose(rows[:2]) == 0.0  # a Copilot that only hurts is switched off
    equal = [{"lambda": lam, "target_acc": 0.8, "target_loss": 0.4} for lam in (0.0, 0.1, 0.5)]
    assert _choose(equal) == 0.0
    tokens = [{"lambda": 0.0, "target_loss": 0.5}, {"lambda": 0.1, "target_loss": 0.4}]
    assert _choose(tokens) == 0.1
    with pytest.raises(ValueError, match="lambda_metric='target_acc' is not measured on this validation data"):
        _choose(tokens, lambda_metric="target_acc")
    with pytest.raises(ValueError, match="lambda_metric='accuracy' is not a validation metric"):
        _choose(rows, lambda_metric="accuracy")


def _stream_mask() -> torch.Tensor:
    where = torch.zeros(3, 9, dtype=torch.bool)
    where[0, [2, 3, 7]] = True
    where[1, 5] = True
    where[2, [0, 3, 4, 8]] = True
    return where


def _stream_inputs(where: torch.Tensor, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    positions, kept = pack_stream(where)
    g = torch.Generator().manual_seed(seed)
    return positions, kept, torch.randn(*positions.shape, D, generator=g)


def test_pack_stream_lists_each_rows_positions_in_order() -> None:
    positions, kept = pack_stream(_stream_mask())
    assert positions[kept].tolist() == [2, 3, 7, 5, 0, 3, 4, 8]
    assert kept.sum(1).tolist() == [3, 1, 4]


@pytest.mark.parametrize("layers", [4, 5])
def test_a_stream_of_every_position_is_the_whole_sequence(layers: int) -> None:
    """Naming every real position as the stream gives the default (every position) exactly."""
    dec = _decoder(layers=layers)
    x, emb, hid, valid = _inputs(b=3, t=9)
    valid[1, 6:] = False  # right padding in one row
    positions, kept = pack_stream(valid)
    packed = torch.zeros(3, positions.shape[1], D)
    packed[kept] = x[valid]
    out = dec(packed, emb, hid, valid, stream=(positions, kept))
    torch.testing.assert_close(out[kept], dec(x, emb, hid, valid)[valid], rtol=1e-5, atol=1e-5)


def test_stream_element_reads_memory_up_to_its_position_and_earlier_elements_only() -> None:
    """The element at position p: the Pilot's states at positions <= p (prompt included) reach it, later ones and
    later elements' inputs do not."""
    dec = _decoder()
    _, emb, hid, valid = _inputs(b=3, t=9)
    where = _stream_mask()
    positions, kept, inputs = _stream_inputs(where)
    base = dec(inputs, emb, hid, valid, stream=(positions, kept))
    for p in range(9):
        emb2, hid2 = emb.clone(), hid.clone()
        emb2[:, p + 1 :] += 10.0
        hid2[:, p + 1 :] -= 10.0
        out = dec(inputs, emb2, hid2, valid, stream=(positions, kept))
        early = kept & (positions <= p)
        torch.testing.assert_close(out[early], base[early], rtol=0, atol=1e-6)
        later = kept & (positions > p)
        if bool(later.any()):
            assert not torch.allclose(out[later], base[later])
    hid3 = hid.clone()
    hid3[0, 1] += 5.0  # a prompt position of row 0 (its stream starts at 2) reaches every element of that row
    out = dec(inputs, emb, hid3, valid, stream=(positions, kept))
    assert all(not torch.allclose(out[0, j], base[0, j]) for j in range(3))
    torch.testing.assert_close(out[1:], base[1:], rtol=0, atol=0)
    inputs2 = inputs.clone()
    inputs2[2, 2:] += 3.0  # row 2's elements 2 and 3 (positions 4 and 8)
    out = dec(inputs2, emb, hid, valid, stream=(positions, kept))
    torch.testing.assert_close(out[2, :2], base[2, :2], rtol=0, atol=1e-6)
    assert not torch.allclose(out[2, 2], base[2, 2])


def test_cached_stream_decoding_equals_the_whole_stream() -> None:
    """Memory given in chunks (the prompt, then one position at a time) with the stream element at each chunk's
    last position equals running the whole stream at once; padding elements and left padding are invisible."""
    dec = _decoder()
    _, emb, hid, valid = _inputs(b=2, t=9)
    valid[0, :2] = False  # left padding
    where = torch.zeros(2, 9, dtype=torch.bool)
    where[:, 4:] = True
    positions, kept, inputs = _stream_inputs(where)
    full = dec(inputs, emb, hid, valid, stream=(positions, kept))
    cache, outs = DecoderCache(), []
    chunks = [(0, 5)] + [(t, t + 1) for t in range(5, 9)]
    for j, (a, z) in enumerate(chunks):
        stream = (torch.full((2, 1), z - 1), torch.ones(2, 1, dtype=torch.bool))
        outs.append(dec(inputs[:, j : j + 1], emb[:, a:z], hid[:, a:z], valid[:, a:z], cache, stream=stream))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    cache = DecoderCache()  # the whole memory first, then one stream element per call with no new memory
    outs = [dec(inputs[:, :1], emb, hid, valid, cache, stream=(positions[:, :1], kept[:, :1]))]
    for j in range(1, positions.shape[1]):
        outs.append(dec(inputs[:, j : j + 1], emb[:, :0], hid[:, :0], valid[:, :0], cache,
                        stream=(positions[:, j : j + 1], kept[:, j : j + 1])))  # fmt: skip
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="past the 9 memory positions"):
        dec(inputs[:, :1], emb[:, :0], hid[:, :0], valid[:, :0], cache, stream=(torch.full((2, 1), 9), kept[:, :1]))


@pytest.mark.parametrize("shape", [(1, 1, 48), (2, 3, 48), (70, 48)])
def test_few_rows_product_equals_linear(shape: tuple[int, ...]) -> None:
    """The decoding readout's product equals F.linear for a few rows (the transposed CPU form) and for many (F.linear
    itself), shapes kept."""
    from lightning_ft.copilot.decoder import few_rows_product

    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(*shape, generator=gen), torch.randn(300, 48, generator=gen)
    out = few_rows_product(x, weight)
    assert out.shape == (*shape[:-1], 300)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight), rtol=1e-5, atol=1e-5)
