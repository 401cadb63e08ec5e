"""``lightning-ft estimate``: exact numbers on a tiny config, monotonicity, the table and JSON, and bad inputs.

The tiny config (H=8, I=16, 2 blocks, 2 heads of 4 with 1 key/value head, V=32, untied head) has per block the
matrices q 8x8, k 4x8, v 4x8, o 8x8, gate 16x8, up 16x8, down 8x16 (576 entries) and two norms (16): 592 per
block, 256 + 256 for embedding and head, 8 for the final norm, 1704 in all. Every expected number below is worked
out by hand from that.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lightning_ft.cli import main
from lightning_ft.planning import FitPlan, ModelShape, estimate, load_shape
from lightning_ft.planning.activations import block_token_bytes

TINY = {"model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 32,
        "tie_word_embeddings": False}  # fmt: skip
LLAMA_7B = Path(__file__).resolve().parents[1] / "configs" / "models" / "llama-7b.json"


@pytest.fixture
def tiny() -> ModelShape:
    return ModelShape.from_config(TINY, name="tiny")


@pytest.fixture
def tiny_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def _plan(**changes: Any) -> FitPlan:
    return FitPlan(**{"dtype": "float32", "batch_size": 1, "seq_len": 1, **changes})


# ------------------------------------------------------------------------------------------------ exact numbers
def test_tiny_shape(tiny: ModelShape) -> None:
    assert tiny.block_matrix_numel == 576
    assert tiny.block_numel == 592
    assert tiny.total_numel == 1704
    assert ModelShape.from_config({**TINY, "tie_word_embeddings": True}).total_numel == 1704 - 256


def test_llama_configs_match_the_published_sizes() -> None:
    assert load_shape(str(LLAMA_7B)).total_numel == 6_738_415_616
    assert load_shape(str(LLAMA_7B.with_name("llama-70b.json"))).total_numel == 68_976_648_192


@pytest.mark.parametrize(
    ("dtype", "weights", "optimizer"),
    [("float32", 1704 * 4, 1704 * 8), ("bfloat16", 1704 * 2, 1704 * 4)],  # AdamW: 2 moments in the weights' dtype
)
def test_full_ft(tiny: ModelShape, dtype: str, weights: int, optimizer: int) -> None:
    est = estimate(tiny, _plan(dtype=dtype))
    assert (est.trainable, est.weights, est.gradients, est.optimizer) == (1704, weights, weights, optimizer)


def test_full_ft_activations_and_total(tiny: ModelShape) -> None:
    """Per token and block (fp32): core 2(4*8+4) + 4(2*8+2*4) + 4*2 + 3*4*16 = 368, norms 2*4*8 = 64, q/k/v and
    gate/up inputs 2*4*8 = 64, down input 4*16 = 64: 560; outside 4*8+4 + 2*4*8 = 100; logits 12 * 32 = 384."""
    est = estimate(tiny, _plan())
    assert block_token_bytes(tiny, "train", 4) == 560
    assert est.activations == est.activations_no_ckpt == 2 * 560 + 100
    assert est.activations_ckpt == 2 * 4 * 8 + 100 + 560  # the block inputs, the outside, one recomputed block
    assert est.loss == 384
    # GPU: AdamW's foreach step copies one moment of everything (6816): the step phase is the peak
    assert est.peak_phase == "step"
    assert est.total == 6816 + 13632 + 6816 + 6816
    # CPU: the per-tensor step copies the largest tensor's moment twice (2 * 256 * 4): forward 6816 + 1220 + 384
    cpu = estimate(tiny, _plan(accelerator="cpu"))
    assert cpu.step_temporaries == 2048
    assert cpu.total == 6816 + 13632 + max(6816 + 1220 + 384, 6816 + 2048)


def test_fsdp2_divides_by_the_devices(tiny: ModelShape) -> None:
    est = estimate(tiny, _plan(devices=4, strategy="fsdp2"))
    assert (est.weights, est.gradients, est.optimizer) == (6816 / 4, 6816 / 4, 13632 / 4)
    # gathered: the root group (256 + 256 + 8) and one block (592), plus one block's unsharded gradients
    assert est.buffers == (520 + 592) * 4 + 592 * 4


def test_ddp_buckets_mirror_the_gradients(tiny: ModelShape) -> None:
    est = estimate(tiny, _plan(devices=4, strategy="ddp"))
    assert (est.weights, est.gradients, est.optimizer, est.buffers) == (6816, 6816, 13632, 6816)


def test_lora(tiny: ModelShape) -> None:
    """r=2 on all seven: 2 * (16 + 12 + 12 + 16 + 24 + 24 + 24) = 256 per block; adapters are fp32."""
    est = estimate(tiny, _plan(method="lora", dtype="bfloat16", lora_rank=2))
    assert est.trainable == 512
    assert (est.weights, est.gradients, est.optimizer) == (1704 * 2 + 512 * 4, 512 * 4, 512 * 8)
    only_q = estimate(tiny, _plan(method="lora", lora_rank=2, lora_targets=("attn_q",)))
    assert only_q.trainable == 2 * 2 * 16


def test_hft(tiny: ModelShape) -> None:
    est = estimate(tiny, _plan(method="hft"))
    assert est.trainable == 2 * 296 + 520  # half of each block, the embedding, head and final norm
    assert (est.gradients, est.optimizer) == (1112 * 4, 1112 * 8)


def test_lift(tiny: ModelShape) -> None:
    """Rank 1: min(m + n, m n) per matrix: 16 + 12 + 12 + 16 + 24 + 24 + 24 = 128 per block."""
    est = estimate(tiny, _plan(method="lift", sparse_rank=1))
    assert est.trainable == 256
    assert (est.optimizer, est.gradients) == (256 * 12, 256 * 4)  # int32 index + 2 fp32 moments; fp32 gradient
    assert est.other == 256 * 4 + 2 * 4 * (9 + 5 + 5 + 9 + 17 + 17 + 9)  # CSR columns and row pointers
    assert estimate(tiny, _plan(method="lift", sparse_rank=1, dtype="bfloat16")).optimizer == 256 * 16  # + master
    assert estimate(tiny, _plan(method="lift", sparse_rank=1, accelerator="cpu")).other == est.other + 256 * 8
    ddp = estimate(tiny, _plan(method="lift", sparse_rank=1, devices=2, strategy="ddp"))
    assert ddp.gradients == ddp.buffers == 2 * 576 * 4  # dense, masked gradients of the block matrices
    fsdp2 = estimate(tiny, _plan(method="lift", sparse_rank=1, devices=2, strategy="fsdp2"))
    assert (fsdp2.gradients, fsdp2.optimizer) == (576 * 4, 128 * 12)  # each process: its rows' share


def test_owlore(tiny: ModelShape) -> None:
    plain = estimate(tiny, _plan(method="owlore", active_blocks=1, galore_rank=0))
    assert plain.trainable == 592 + 520
    assert plain.optimizer == (592 + 520) * 8
    # GaLore r=2: moments 2 x r x max(m, n) and the basis r x min(m, n), fp32: q and o 128 + 64 each, k and v 128 + 32
    # each, gate, up and down 256 + 64 each, the norms 2 * 16 * 4 and the outside 2 * 520 * 4
    galore = estimate(tiny, _plan(method="owlore", active_blocks=1, galore_rank=2))
    assert galore.optimizer == 192 + 160 + 160 + 192 + 3 * 320 + 128 + 4160
    # FSDP2 on 2 devices shards the side that follows the weight's rows: the tall q, o, gate and up keep half their
    # moments (64, 64, 128, 128) and their whole basis (64 each); the wide k, v and down half their basis (16, 16,
    # 32) and their whole moments (128, 128, 256); the plain tensors (norms and the outside) are halved
    sharded = estimate(tiny, _plan(method="owlore", active_blocks=1, galore_rank=2, devices=2, strategy="fsdp2"))
    assert sharded.optimizer == (64 + 64 + 128 + 128) + 4 * 64 + (16 + 16 + 32) + (128 + 128 + 256) + (128 + 4160) / 2


def test_quantized_lora_weights(tiny: ModelShape) -> None:
    est = estimate(tiny, _plan(method="lora", dtype="bfloat16", quantization="nf4", lora_rank=2))
    # nf4 matrices at 0.5 + 4/64 bytes; norms, embedding and head cast to fp32; fp32 adapters
    assert est.weights == pytest.approx(2 * 576 * 0.5625 + (2 * 16 + 520) * 4 + 512 * 4, abs=1)


def test_freeze_bottom(tiny: ModelShape) -> None:
    est = estimate(tiny, _plan(freeze_bottom=1))  # block 0 and the embedding frozen
    assert est.trainable == 592 + 256 + 8
    assert est.activations == 560 + 100  # nothing below block 1 trains: block 0 keeps nothing


# ------------------------------------------------------------------------------------------------ monotonicity
def test_monotonicity() -> None:
    shape = load_shape(str(LLAMA_7B))
    for method in ("full_ft", "lora", "hft", "lift", "owlore"):
        est = estimate(shape, FitPlan(method=method))
        assert est.activations_ckpt < est.activations_no_ckpt
        assert estimate(shape, FitPlan(method=method, checkpointing=True)).total <= est.total  # full_ft: step peak
    assert (
        estimate(shape, FitPlan(method="lora", checkpointing=True)).total
        < estimate(shape, FitPlan(method="lora")).total
    )
    totals = [estimate(shape, FitPlan(devices=d, strategy="fsdp2", checkpointing=True)).total for d in (1, 8, 64)]
    assert totals[0] > totals[1] > totals[2]
    assert estimate(shape, FitPlan(method="lora")).total < estimate(shape, FitPlan()).total
    assert (
        estimate(shape, FitPlan(method="lora", quantization="nf4")).total
        < estimate(shape, FitPlan(method="lora")).total
    )
    assert estimate(shape, FitPlan(batch_size=2)).activations > estimate(shape, FitPlan()).activations


# ------------------------------------------------------------------------------------------------ the command
def test_table(capsys: pytest.CaptureFixture[str], tiny_file: Path) -> None:
    main(["estimate", "--model", str(tiny_file), "--method", "lora", "--batch-size", "2", "--seq-len", "16"])
    out = capsys.readouterr().out
    for row in ("weights", "gradients", "optimizer state (AdamW)", "activations", "logits and loss", "total (peak)"):
        assert row in out
    assert "2 moments per trainable element" in out


def test_json(capsys: pytest.CaptureFixture[str], tiny_file: Path, tiny: ModelShape) -> None:
    main(["estimate", "--model", str(tiny_file), "--dtype", "float32", "--batch-size", "1", "--seq-len", "1",
          "--devices", "4", "--strategy", "fsdp2", "--json"])  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    expected = estimate(tiny, _plan(devices=4, strategy="fsdp2"))
    assert data["total"] == expected.total and data["weights"] == 6816 / 4
    assert data["plan"]["strategy"] == "fsdp2" and data["model"]["hidden"] == 8


def test_model_folder_and_bundled_alias(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    main(["estimate", "--model", str(tmp_path), "--json"])
    assert json.loads(capsys.readouterr().out)["model"]["layers"] == 2
    main(["estimate", "--model", "smollm2-135m", "--json"])
    assert json.loads(capsys.readouterr().out)["model"]["vocab"] == 49152


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(["estimate", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return int(exc.value.code), err.strip().splitlines()[-1]


BAD = [
    (["--method", "lorra"], 2, ("--method must be one of full_ft, lora, hft, lift, owlore (got lorra): did you "
                                "mean lora?")),
    (["--batch-size", "0"], 1, "--batch-size must be a positive integer (got 0)."),
    (["--seq-len", "-4"], 1, "--seq-len must be a positive integer (got -4)."),
    (["--batch-size", "two"], 2, "--batch-size must be an integer (got two)."),
    (["--quantization", "nf4"], 1, ("--quantization nf4 freezes the backbone in 4/8 bit, but --method full_ft trains "
     "its weights: use --method lora or --quantization none.")),
    (["--method", "hft", "--quantization", "int8"], 1, ("--quantization int8 freezes the backbone in 4/8 bit, but "
     "--method hft trains its weights: use --method lora or --quantization none.")),
    (["--devices", "8", "--strategy", "single"], 1, ("--strategy single runs on one device, but --devices is 8: pass "
     "--strategy ddp or fsdp2, or --devices 1.")),
    (["--lora-rank", "4"], 1, "--lora-rank applies to --method lora, not full_ft: drop it or change --method."),
    (["--method", "lora", "--lora-targets", "q_proj,lm_head"], 1, ("--lora-targets names 'lm_head', which is not a "
     "linear layer of a block: use all-linear, attention, mlp or kinds from attn_q, attn_k, attn_v, attn_o, mlp_gate, "
     "mlp_up, mlp_down.")),
    (["--method", "owlore", "--active-blocks", "3"], 1, ("--active-blocks must be between 1 and the model's 2 blocks "
     "(got 3).")),
    (["--method", "owlore", "--galore-rank", "-1"], 1, ("--galore-rank must be zero (plain AdamW) or a positive rank "
     "(got -1).")),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "code", "sentence"), BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input(capsys: pytest.CaptureFixture[str], tiny_file: Path, argv: list[str], code: int,
                   sentence: str) -> None:  # fmt: skip
    assert _error(capsys, ["--model", str(tiny_file), *argv]) == (code, f"lightning-ft estimate: error: {sentence}")


def test_bad_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    code, line = _error(capsys, ["--model", str(missing)])
    assert code == 1
    assert line == (f"lightning-ft estimate: error: --model {missing} is neither a bundled alias (minilm-l6, "
                    "smollm2-135m) nor a model folder or config JSON file: give one of these (e.g. "
                    "configs/models/llama-7b.json).")  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "gpt2"}))
    assert _error(capsys, ["--model", str(tmp_path)]) == (1, (
        f"lightning-ft estimate: error: --model {tmp_path} is a 'gpt2' model, which the estimate does not model: give "
        "a Llama-like config (model_type llama, mistral, qwen2)."))  # fmt: skip
    assert _error(capsys, ["--modle", "x"]) == (
        2,
        "lightning-ft estimate: error: --modle is not an option of lightning-ft estimate: did you mean --model?",
    )
    assert _error(capsys, []) == (2, ("lightning-ft estimate: error: --model is required: see lightning-ft estimate "
                                     "--help."))  # fmt: skip
