"""Instruction-following shift (``lightning-ft analyze-shift``): gradient x input against finite differences and a
hand formula, what cross-model activation patching provably recovers on residual streams, the command's files and
refusals, and one SmolLM2 check."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from lightning_ft.errors import UserError
from lightning_ft.monitors.attribution import (
    attribution_shares,
    cross_model_patching,
    encode_example,
    input_attribution,
    main,
    response_logprob,
)


def _tiny_llama(blocks: int = 4, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=blocks,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg).double().eval()


def _perturb(module: nn.Module, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(scale * torch.randn(param.shape, generator=g, dtype=param.dtype))


def _probe(length: int = 10, first_target: int = 5, last_target: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [1, length] and a target mask on positions first..last (later positions: seen by no target)."""
    ids = torch.randint(0, 64, (1, length), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(length)[None]
    return ids, (positions >= first_target) & (positions <= last_target)


# ------------------------------------------------------------------------------------------------ attribution
def test_gradient_times_input_equals_finite_differences_per_token() -> None:
    model = _tiny_llama()
    ids, target = _probe()
    scores = input_attribution(model, ids, None, target)[0].double()
    table = model.get_input_embeddings()

    def metric(t: int, factor: float) -> float:  # m with the embedding of token t scaled by `factor`
        embeds = table(ids).detach().clone()
        embeds[0, t] *= factor
        with torch.no_grad():
            logprobs = torch.log_softmax(model(inputs_embeds=embeds).logits[0, :-1], -1)
        return float(logprobs.gather(-1, ids[0, 1:, None])[target[0, 1:], 0].sum())

    # Llama's RMSNorm computes in float32 even in a float64 model: a step large enough to stand above its rounding
    eps = 1e-2
    expected = torch.tensor([(metric(t, 1 + eps) - metric(t, 1 - eps)) / (2 * eps) for t in range(ids.shape[1])])
    torch.testing.assert_close(scores, expected.double(), rtol=1e-3, atol=2e-5)
    embeds = table(ids).detach().requires_grad_(True)  # the same gradient, recomputed by hand through autograd
    logprobs = torch.log_softmax(model(inputs_embeds=embeds).logits[0, :-1], -1)
    (grad,) = torch.autograd.grad(logprobs.gather(-1, ids[0, 1:, None])[target[0, 1:], 0].sum(), embeds)
    torch.testing.assert_close(scores, (grad * embeds).sum(-1)[0].detach(), rtol=1e-5, atol=1e-7)
    assert scores[7:].abs().max() == 0  # the last target token and later are seen by no scored position
    assert scores[:7].abs().min() > 0
    assert all(p.grad is None for p in model.parameters())  # only the embeddings were differentiated


class _LinearToy(nn.Module):
    """Logits at t are W h_t with h_t = sum_{s<=t} e_s: a causal bag of embeddings, linear in the embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(11, 5), nn.Linear(5, 11, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.emb

    def forward(self, input_ids: Any = None, attention_mask: Any = None, inputs_embeds: Any = None) -> Any:
        embeds = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        return SimpleNamespace(logits=self.out(embeds.cumsum(dim=1)))


def test_gradient_times_input_equals_the_hand_formula_on_a_linear_toy() -> None:
    toy = _LinearToy().double()
    ids = torch.tensor([[1, 4, 2, 9, 3, 7]])
    target = torch.tensor([[False, False, False, True, True, False]])
    scores = input_attribution(toy, ids, None, target)[0].double()
    e, w = toy.emb.weight[ids[0]].detach(), toy.out.weight.detach()
    probs = torch.softmax(e.cumsum(0) @ w.T, dim=-1)
    # d m / d h_t = W^T (onehot(x_{t+1}) - p_t) for every t predicting a target; e_s reaches every h_t with t >= s
    grads = torch.zeros(6, 5, dtype=torch.float64)
    for t in (2, 3):
        grads[t] = w.T @ (torch.nn.functional.one_hot(ids[0, t + 1], 11).double() - probs[t])
    expected = torch.stack([e[s] @ grads[s:].sum(0) for s in range(6)])
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-9)


def test_shares_are_a_distribution_over_the_prompt() -> None:
    scores = torch.tensor([[0.5, -1.5, 2.0, 3.0]])
    shares = attribution_shares(scores, torch.tensor([[True, True, True, False]]))
    torch.testing.assert_close(shares, torch.tensor([[0.125, 0.375, 0.5, 0.0]]))


# --------------------------------------------------------------------------------------------------- patching
def test_a_model_against_itself_has_no_gap_and_zeros() -> None:
    model = _tiny_llama()
    ids, target = _probe()
    for tuned in (model, copy.deepcopy(model)):
        result = cross_model_patching(model, tuned, ids, None, target)
        assert result.no_gap and result.gap == 0
        assert result.recovered.shape == (4, 10) and result.recovered_all.shape == (4,)
        assert result.recovered.abs().max() == 0 and result.recovered_all.abs().max() == 0


@pytest.mark.parametrize("reverse", [False, True])
def test_one_changed_block_what_residual_streams_make_exact(reverse: bool) -> None:
    base = _tiny_llama()
    tuned = copy.deepcopy(base)
    _perturb(tuned.model.layers[2], seed=5)
    ids, target = _probe()
    result = cross_model_patching(base, tuned, ids, None, target, reverse=reverse, batch_size=4)
    assert not result.no_gap and abs(result.gap) > 0.05
    assert result.direction == ("base->tuned" if reverse else "tuned->base")
    assert result.recovered.shape == (4, 10) and result.positions == list(range(10))
    # blocks 0 and 1 compute the same outputs in both models: patching them changes nothing
    torch.testing.assert_close(result.recovered[:2], torch.zeros(2, 10), atol=1e-9, rtol=0)
    torch.testing.assert_close(result.recovered_all[:2], torch.zeros(2), atol=1e-9, rtol=0)
    # from the changed block on, the whole residual stream of a block determines the rest (blocks 3.., norm, head)
    torch.testing.assert_close(result.recovered_all[2:], torch.ones(2), atol=1e-9, rtol=0)
    # positions at or after the last target token are seen by no scored prediction, at every block
    torch.testing.assert_close(result.recovered[:, 7:], torch.zeros(4, 3), atol=1e-9, rtol=0)
    assert result.recovered[2:, :7].abs().max() > 1e-3
    metric = response_logprob(base if reverse else tuned, ids, None, target)
    assert result.metric_source == pytest.approx(float(metric), abs=1e-9)


def test_last_block_fully_patched_recovers_one_whatever_the_blocks_differ_in() -> None:
    base = _tiny_llama()
    tuned = copy.deepcopy(base)
    for block in tuned.model.layers:
        _perturb(block, seed=7, scale=0.1)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 64, (2, 8), generator=g)  # a batch of two rows of one length
    target = (torch.arange(8) >= 5).expand(2, 8)
    result = cross_model_patching(base, tuned, ids, torch.ones(2, 8), target, positions=[0, 4, 7], batch_size=4)
    assert result.recovered.shape == (4, 3)
    assert result.recovered_all[-1].item() == pytest.approx(1.0, abs=1e-9)
    assert result.recovered[0, 2].item() == pytest.approx(0.0, abs=1e-9)  # layer 0, the last position
    mlp = cross_model_patching(base, tuned, ids, None, target, component="mlp", positions=[4])
    assert mlp.recovered.shape == (4, 1) and not mlp.no_gap
    with pytest.raises(ValueError, match="component='nope' is not a submodule of LlamaDecoderLayer"):
        cross_model_patching(base, tuned, ids, None, target, component="nope")
    with pytest.raises(ValueError, match=r"layers \[4\] and positions .* must lie in \[0, 4\) and \[0, 8\)"):
        cross_model_patching(base, tuned, ids, None, target, layers=[4])
    with pytest.raises(ValueError, match="decoder blocks"):
        cross_model_patching(base, _tiny_llama(blocks=3), ids, None, target)


def test_tuple_returning_blocks_are_patched_too(tiny_gpt2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).double().eval()
    tuned = copy.deepcopy(base)
    _perturb(tuned.transformer.h[1], seed=2)
    ids, target = torch.tensor([[5, 80, 31, 200, 7, 9]]), torch.tensor([[False] * 4 + [True] * 2])
    result = cross_model_patching(base, tuned, ids, None, target)
    torch.testing.assert_close(result.recovered_all, torch.tensor([0.0, 1.0]), atol=1e-9, rtol=0)


# ------------------------------------------------------------------------------------------------ the command
def _probe_file(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {"prompt": "Review: good film\nSentiment:", "response": " positive"},
    {"prompt": "Review: bad plot\nSentiment:", "response": " negative"},
]


@pytest.fixture(scope="module")
def tuned_dirs(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Llama with block 1 perturbed (a saved folder), a LoRA adapter on it, and a copy with a different
    tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("tuned")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tuned = copy.deepcopy(model)
    _perturb(tuned.model.layers[1], seed=9)
    tuned.save_pretrained(root / "full")
    tokenizer.save_pretrained(root / "full")
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn_like(param))
    lora.peft_config["default"].base_model_name_or_path = str(tiny_llama_dir)
    lora.save_pretrained(root / "adapter")
    tokenizer.add_tokens(["<new-token>"])
    tuned.save_pretrained(root / "other_tokenizer")
    tokenizer.save_pretrained(root / "other_tokenizer")
    return {"full": root / "full", "adapter": root / "adapter", "other": root / "other_tokenizer"}


@pytest.mark.parametrize("kind", ["full", "adapter"])
def test_command_writes_tables_and_heatmaps(
    kind: str, tiny_llama_dir: Path, tuned_dirs: dict[str, Path], tmp_path: Path
) -> None:
    probe = _probe_file(tmp_path / "probe.jsonl", ROWS + [{"prompt": "Review: dull\nSentiment:", "response": " no"}])
    out = tmp_path / "shift"
    argv = ["--base", str(tiny_llama_dir), "--tuned", str(tuned_dirs[kind]), "--probe", str(probe), "--out", str(out),
            "--max-examples", "2"]  # fmt: skip
    assert main(argv) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"analysis.json", "analysis.md", "attribution_0.png", "attribution_1.png", "patching_0.png",
                     "patching_1.png", "patching_summary.png"}  # fmt: skip
    assert all((out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names if n.endswith(".png"))
    report = json.loads((out / "analysis.json").read_text())
    assert len(report["examples"]) == 2 and report["direction"] == "tuned->base"
    for example in report["examples"]:
        length, prompt = len(example["token_ids"]), example["prompt_tokens"]
        assert len(example["recovered"]) == 2 and len(example["recovered"][0]) == length
        assert len(example["share_base"]) == prompt == len(example["share_tuned"])
        assert sum(example["share_tuned"]) == pytest.approx(1.0, abs=1e-4)
        assert not example["no_gap"] and example["recovered_all"][-1] == pytest.approx(1.0, abs=1e-4)
        if kind == "full":  # only block 1 differs: block 0 recovers nothing
            assert max(abs(v) for v in example["recovered"][0] + [example["recovered_all"][0]]) < 1e-4
    assert len(report["layers"]) == 2 and report["tokens"]
    markdown = (out / "analysis.md").read_text()
    assert "| layer | all positions patched | best single position |" in markdown and "| token |" in markdown
    with pytest.raises(UserError, match="--out .* --overwrite"):
        main(argv)


def test_help_states_inputs_and_outputs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Inputs: --base, --tuned, --probe" in text and "analysis.json" in text and "patching_<i>.png" in text


def test_refusals_are_one_sentence(tiny_llama_dir: Path, tuned_dirs: dict[str, Path], tmp_path: Path) -> None:
    def refuse(probe: Path, match: str, tuned: Path = tuned_dirs["full"], *extra: str) -> None:
        argv = ["--base", str(tiny_llama_dir), "--tuned", str(tuned), "--probe", str(probe), "--out",
                str(tmp_path / "out"), *extra]  # fmt: skip
        with pytest.raises(UserError, match=match) as err:
            main(argv)
        assert "\n" not in str(err.value) and str(err.value).endswith(".")
        assert not (tmp_path / "out").exists()

    good = _probe_file(tmp_path / "good.jsonl", ROWS)
    refuse(tmp_path / "missing.jsonl", r"--probe .*missing.jsonl is not a file")
    refuse(_probe_file(tmp_path / "empty.jsonl", []), r"--probe .* holds no records")
    refuse(_probe_file(tmp_path / "no_prompt.jsonl", [{"question": "a", "response": "b"}]), "no column 'prompt'")
    refuse(_probe_file(tmp_path / "no_response.jsonl", [{"prompt": "a", "label": "b"}]),
           "neither a 'response' nor an 'answer' column .* pass --response-field")  # fmt: skip
    refuse(_probe_file(tmp_path / "blank.jsonl", [{"prompt": "a", "answer": " "}]), "record 1 has an empty 'answer'")
    refuse(good, "different tokenizers", tuned_dirs["other"])
    refuse(good, "--max-examples 0", tuned_dirs["full"], "--max-examples", "0")
    refuse(good, "component='nope' is not a submodule", tuned_dirs["full"], "--component", "nope")


def test_encoding_keeps_the_prompt_end_and_the_response(tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    full, prompt_len = encode_example(tokenizer, "Review: a good film", " positive", 64)
    limit = len(full) - prompt_len + 3  # the start token, two prompt tokens and the response
    cut, cut_len = encode_example(tokenizer, "Review: a good film", " positive", limit)
    assert len(cut) == limit and cut_len == 3 and cut[0] == full[0] == tokenizer.bos_token_id
    assert cut[cut_len:] == full[prompt_len:] and cut[1:cut_len] == full[prompt_len - 2 : prompt_len]
    tiny, tiny_len = encode_example(tokenizer, "Review: a good film", " positive", 3)
    assert tiny == [full[0], full[prompt_len - 1], full[prompt_len]] and tiny_len == 2  # one token of each is kept


# ---------------------------------------------------------------------------------------------------- SmolLM2
def test_smollm2_one_changed_block(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tuned = copy.deepcopy(base)
    _perturb(tuned.model.layers[20].mlp.down_proj, seed=1, scale=0.05)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids, prompt_len = encode_example(tokenizer, "The capital of France is", " Paris.", 32)
    target = torch.arange(len(ids))[None] >= prompt_len
    result = cross_model_patching(base, tuned, torch.tensor([ids]), None, target, layers=[0, 19, 20, 29],
                                  positions=[len(ids) - 1])  # fmt: skip
    assert result.recovered.shape == (4, 1) and result.layers == [0, 19, 20, 29] and abs(result.gap) > 0.05
    # blocks before the changed one recover nothing; every position of it or a later block recovers all
    torch.testing.assert_close(result.recovered_all, torch.tensor([0.0, 0.0, 1.0, 1.0]), atol=1e-3, rtol=0)
    assert result.recovered.abs().max() < 1e-3  # the last token is seen by no scored prediction
