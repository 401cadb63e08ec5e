"""Dynamic Logits Fusion: the fused logits and the KL-matching weights against exact oracles, the small models' cached
steps against full re-runs, generation against a cache-free reference loop on tiny Llamas of two sizes, the refusals,
the predict hook, and SmolLM2 as both sizes."""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lightning_ft.decoding import (
    PAPER_ALPHA_GRID,
    DynamicLogitsFusion,
    IncrementalLM,
    LogitsFusionCausalLM,
    alpha_candidates,
    check_same_vocabulary,
    choose_alphas,
    fuse_generate,
    fuse_logits,
    kl_divergence,
)
from lightning_ft.errors import UserError

PROMPTS = ["Review: good", "Review: a long and dull film\nSentiment:", "bad"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: these models are too small to split, and a shared machine makes threads spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _llama(tokenizer: Any, hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    """A random Llama with the tiny tokenizer; a wide init so that the next-token logits are far from uniform."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.3,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _perturbed(model: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """A copy of ``model`` whose last MLP and head moved a little: a stand-in for a fine-tuned expert."""
    expert = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (expert.model.layers[-1].mlp.down_proj.weight, expert.lm_head.weight):
            param.add_(scale * param.std() * torch.randn(param.shape, generator=gen))
    return expert.eval()


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two sizes of tiny Llama with one tokenizer: large (64 wide, 3 blocks), small (32 wide, 2 blocks), two experts
    fine-tuned (perturbed) from the small one; each also saved as an HF folder."""
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    small = _llama(tok, 32, 2, seed=0)
    models = {"large": _llama(tok, 64, 3, seed=1), "small": small,
              "expert": _perturbed(small, 2), "expert2": _perturbed(small, 3)}  # fmt: skip
    root = tmp_path_factory.mktemp("fusion_models")
    dirs = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs[name] = root / name
    return {"tok": tok, **models, "dirs": dirs}


def _batch(tok: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tok(p)["input_ids"] for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# ---------------------------------------------------------------------- exact oracles
def test_fused_logits_equal_the_formula_on_hand_made_logits() -> None:
    large = torch.tensor([[1.0, 2.0, 3.0]])
    base = torch.tensor([[0.5, 0.5, 0.5]])
    experts = torch.tensor([[[1.5, 0.5, 0.0], [0.5, 2.5, 0.5]]])  # shifts (1, 0, -0.5) and (0, 2, 0)
    fused = fuse_logits(large, base, experts, torch.tensor([[0.5, 2.0]]))
    assert torch.equal(fused, torch.tensor([[1.5, 6.0, 2.75]]))
    assert torch.equal(fuse_logits(large, base, experts, torch.zeros(1, 2)), large)


def test_kl_divergence_is_the_definition_and_zero_probability_tokens_add_nothing() -> None:
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    expected = float((p * (p / q).log()).sum())
    assert kl_divergence(p.log(), q.log()).item() == pytest.approx(expected, rel=1e-6)
    masked = torch.tensor([0.0, 1.0, float("-inf")])
    assert kl_divergence(masked, masked).item() == 0.0
    assert torch.isfinite(kl_divergence(masked, torch.zeros(3)))


def _brute_force(
    large: np.ndarray, base: np.ndarray, experts: np.ndarray, grid: list[float]
) -> list[tuple[float, ...]]:
    """Per row, the grid point minimising the paper's objective, by loops in float64 (first one on ties)."""

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max())
        return e / e.sum()

    def kl(p: np.ndarray, q: np.ndarray) -> float:
        return float(np.sum(p * np.log(p / q)))

    best = []
    for b in range(large.shape[0]):
        P, Q = softmax(large[b]), softmax(base[b])
        Qs = [softmax(e) for e in experts[b]]
        scores = []
        for alphas in itertools.product(grid, repeat=len(Qs)):
            Pt = softmax(large[b] + sum(a * (e - base[b]) for a, e in zip(alphas, experts[b])))
            scores.append((sum((kl(Pt, P) - kl(Qi, Q)) ** 2 + (kl(P, Pt) - kl(Q, Qi)) ** 2 for Qi in Qs), alphas))
        best.append(min(scores, key=lambda s: s[0])[1])
    return best


@pytest.mark.parametrize("experts", [1, 2])
def test_chosen_weights_are_the_brute_force_minimiser_of_the_kl_matching_objective(experts: int) -> None:
    gen = torch.Generator().manual_seed(experts)
    large, base = torch.randn(5, 40, generator=gen) * 2, torch.randn(5, 40, generator=gen)
    shifted = base[:, None] + torch.randn(5, experts, 40, generator=gen)
    chosen = choose_alphas(large, base, shifted, alpha_candidates(PAPER_ALPHA_GRID, experts, "joint"))
    expected = _brute_force(
        large.double().numpy(), base.double().numpy(), shifted.double().numpy(), list(PAPER_ALPHA_GRID)
    )
    torch.testing.assert_close(chosen, torch.tensor(expected, dtype=torch.float32))
    assert len({tuple(r) for r in chosen.tolist()}) > 1  # the weights differ between rows: a per-row choice


def test_one_expert_search_tries_each_expert_alone_and_ties_keep_the_smallest_weight() -> None:
    cands = alpha_candidates(PAPER_ALPHA_GRID, 3, "one_expert")
    assert cands.shape == (1 + 3 * 20, 3) and cands[0].abs().sum() == 0
    assert ((cands != 0).sum(1) <= 1).all()
    logits = torch.randn(2, 10)
    same = torch.stack([logits, logits, logits], dim=1)  # experts equal to the base: every candidate ties
    assert choose_alphas(logits * 3, logits, same, cands).abs().sum() == 0


@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # GPT-2's learned absolute positions see left-padding mistakes
def test_incremental_small_model_logits_equal_a_full_rerun(
    tiny: dict[str, Any], kind: str, request: pytest.FixtureRequest
) -> None:
    tok = tiny["tok"]
    model = (
        tiny["small"]
        if kind == "llama"
        else AutoModelForCausalLM.from_pretrained(request.getfixturevalue("tiny_gpt2_dir")).eval()
    )
    ids, mask = _batch(tok, PROMPTS)
    stream = IncrementalLM(model)
    gen = torch.Generator().manual_seed(0)
    steps = [stream.step(ids, mask)]
    for _ in range(4):
        new = torch.randint(0, len(tok), (len(PROMPTS), 1), generator=gen)
        ids, mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
        steps.append(stream.step(new, mask))
    for row in range(len(PROMPTS)):  # each row alone, unpadded, without a cache
        alone = ids[row][mask[row].bool()]
        full = model(input_ids=alone[None]).logits[0, -5:].float()
        torch.testing.assert_close(torch.stack([s[row] for s in steps]), full, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- generation on two sizes of tiny Llama
def test_expert_equal_to_small_base_reproduces_the_large_models_greedy_generation_exactly(tiny: dict[str, Any]) -> None:
    ids, mask = _batch(tiny["tok"], PROMPTS)
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tiny["tok"].pad_token_id}
    plain = tiny["large"].generate(input_ids=ids, attention_mask=mask, **options)
    with DynamicLogitsFusion(tiny["small"], [copy.deepcopy(tiny["small"])], attention_mask=mask) as fusion:
        fused = tiny["large"].generate(input_ids=ids, attention_mask=mask, logits_processor=[fusion], **options)
    assert torch.equal(fused, plain)
    assert fusion.alphas.shape == (8, len(PROMPTS), 1) and fusion.alphas.abs().sum() == 0


def _reference(tiny: dict[str, Any], prompt: str, experts: list[str], alpha: float | None, steps: int) -> str:
    """Greedy fused decoding of one prompt alone, every model re-run on the whole sequence at every step."""
    tok = tiny["tok"]
    ids = torch.tensor([tok(prompt)["input_ids"]])
    cands = alpha_candidates(PAPER_ALPHA_GRID, len(experts), "one_expert")
    for _ in range(steps):
        with torch.no_grad():
            large, base = (tiny[n](input_ids=ids).logits[:, -1] for n in ("large", "small"))
            shifted = torch.stack([tiny[e](input_ids=ids).logits[:, -1] for e in experts], dim=1)
        alphas = (
            torch.full((1, len(experts)), alpha) if alpha is not None else choose_alphas(large, base, shifted, cands)
        )
        token = fuse_logits(large, base, shifted, alphas).argmax(-1)
        if token.item() == tok.eos_token_id:
            break
        ids = torch.cat([ids, token[:, None]], dim=1)
    return tok.decode(ids[0, len(tok(prompt)["input_ids"]) :], skip_special_tokens=True)


@pytest.mark.parametrize(
    ("experts", "alpha"), [(["expert"], None), (["expert", "expert2"], None), (["expert"], 1.0), (["expert"], 0.5)]
)
def test_batched_cached_generation_equals_a_cache_free_reference_loop(
    tiny: dict[str, Any], experts: list[str], alpha: float | None
) -> None:
    found = fuse_generate(tiny["large"], tiny["small"], [tiny[e] for e in experts], PROMPTS, tokenizer=tiny["tok"],
                          max_new_tokens=6, alpha=alpha)  # fmt: skip
    assert found == [_reference(tiny, p, experts, alpha, 6) for p in PROMPTS]


def test_dynamic_weights_vary_and_differ_from_proxy_tuning(tiny: dict[str, Any]) -> None:
    ids, mask = _batch(tiny["tok"], PROMPTS)
    with DynamicLogitsFusion(tiny["small"], [tiny["expert"], tiny["expert2"]], attention_mask=mask) as fusion:
        tiny["large"].generate(input_ids=ids, attention_mask=mask, logits_processor=[fusion], max_new_tokens=6,
                               do_sample=False, pad_token_id=tiny["tok"].pad_token_id)  # fmt: skip
    chosen = fusion.alphas.reshape(-1, 2)
    assert ((chosen != 0).sum(1) <= 1).all()  # one expert acts per step (the paper's multi-expert search)
    assert len({tuple(r) for r in chosen.tolist()}) > 2 and not (chosen == 1).all()


def test_sampling_is_seeded_and_draws_from_the_fused_distribution(tiny: dict[str, Any]) -> None:
    args = (tiny["dirs"]["large"], tiny["dirs"]["small"], [tiny["dirs"]["expert"]], PROMPTS)
    first = fuse_generate(*args, max_new_tokens=6, do_sample=True, temperature=1.5, seed=3, device="cpu")
    assert first == fuse_generate(*args, max_new_tokens=6, do_sample=True, temperature=1.5, seed=3, device="cpu")
    nucleus_of_one = fuse_generate(*args, max_new_tokens=6, do_sample=True, top_p=1e-6, seed=4, device="cpu")
    assert nucleus_of_one == fuse_generate(*args, max_new_tokens=6, device="cpu")  # top-1 of the fused logits


def test_a_lora_adapter_folder_is_an_expert(tiny: dict[str, Any], tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(copy.deepcopy(tiny["small"]), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    lora.save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": str(tiny["dirs"]["small"])}))
    merged = lora.merge_and_unload().eval()
    args = (tiny["dirs"]["large"], tiny["dirs"]["small"])
    found = fuse_generate(*args, [tmp_path / "adapter"], PROMPTS, max_new_tokens=6, alpha=1.0, device="cpu")
    assert found == fuse_generate(*args, [merged], PROMPTS, max_new_tokens=6, alpha=1.0, device="cpu")
    assert found != fuse_generate(*args, [tiny["dirs"]["small"]], PROMPTS, max_new_tokens=6, device="cpu")


def test_a_wider_large_head_keeps_its_padding_rows_at_zero_probability(tiny: dict[str, Any]) -> None:
    ids, mask = _batch(tiny["tok"], PROMPTS)
    vocab = len(tiny["tok"])
    scores = torch.randn(len(PROMPTS), vocab + 5)
    with DynamicLogitsFusion(tiny["small"], [tiny["expert"]], alpha=1.0, attention_mask=mask) as fusion:
        fused = fusion(ids, scores)
    with torch.no_grad():
        base, expert = (tiny[n](input_ids=ids, attention_mask=mask).logits[:, -1] for n in ("small", "expert"))
    torch.testing.assert_close(fused[:, :vocab], scores[:, :vocab] + expert - base, atol=1e-5, rtol=1e-5)
    assert torch.isneginf(fused[:, vocab:]).all()


# ---------------------------------------------------------------------- refusals
def test_mismatched_tokenizers_are_refused_in_one_sentence(
    tiny: dict[str, Any], smollm2_dir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    tiny["small"].save_pretrained(other)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(other)
    with pytest.raises(UserError, match=r"^experts\[0\]'s tokenizer differs from large's .*share one tokenizer\.$"):
        fuse_generate(tiny["dirs"]["large"], tiny["dirs"]["small"], [other], PROMPTS, device="cpu")
    check_same_vocabulary(
        [("large", tiny["tok"]), ("small_base", AutoTokenizer.from_pretrained(tiny["dirs"]["small"]))]
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"experts": []}, r"^experts is empty: give at least one"),
        ({"alpha_grid": []}, r"^alpha_grid is empty: give weights in \[0, 5\]"),
        ({"alpha_grid": [0.0, -0.5]}, r"^alpha_grid holds -0.5: give weights in \[0, 5\]"),
        ({"alpha_grid": [0.0, float("nan")]}, r"^alpha_grid holds nan"),
        ({"alpha": [1.0, 1.0]}, r"^alpha has 2 weights for 1 experts: give one weight per expert"),
        ({"alpha": 7.0}, r"^alpha holds 7.0: give weights in \[0, 5\]"),
        ({"search": "greedy"}, r"^search='greedy' is not a search"),
        ({"experts": "many", "search": "joint"}, r"^a joint search over 4 experts tries 21\^4 weight vectors"),
    ],
)  # fmt: skip
def test_refusals_name_the_argument_and_the_fix(tiny: dict[str, Any], kwargs: dict[str, Any], match: str) -> None:
    experts = kwargs.pop("experts", [tiny["expert"]])
    experts = [tiny["expert"]] * 4 if experts == "many" else experts
    with pytest.raises(UserError, match=match):
        DynamicLogitsFusion(tiny["small"], experts, **kwargs)


def test_beam_reordering_is_refused(tiny: dict[str, Any]) -> None:
    ids, mask = _batch(tiny["tok"], PROMPTS[:2])
    with DynamicLogitsFusion(tiny["small"], [tiny["expert"]], attention_mask=mask) as fusion:
        fusion(ids, torch.zeros(2, len(tiny["tok"])))
        step = torch.cat([ids, torch.tensor([[5], [6]])], 1)
        with pytest.raises(UserError, match="beam search reorders them"):
            fusion(step.flip(0), torch.zeros(2, len(tiny["tok"])))


# ---------------------------------------------------------------------- the predict hook
def test_the_module_predicts_with_fusion_and_without_it_as_its_host(tiny: dict[str, Any]) -> None:
    dirs = tiny["dirs"]
    with pytest.raises(UserError, match="fusion_small_base and fusion_experts go together"):
        LogitsFusionCausalLM(model=str(dirs["large"]), fusion_small_base=str(dirs["small"]))
    with pytest.raises(UserError, match=r"^fusion_alpha_grid holds 3.5e\+20"):
        LogitsFusionCausalLM(model=str(dirs["large"]), fusion_small_base=str(dirs["small"]),
                             fusion_experts=[str(dirs["expert"])], fusion_alpha_grid=[0.0, 3.5e20])  # fmt: skip
    module = LogitsFusionCausalLM(model=str(dirs["large"]), fusion_small_base=str(dirs["small"]),
                                  fusion_experts=[str(dirs["expert"]), str(dirs["expert2"])], max_new_tokens=6)  # fmt: skip
    ids, mask = _batch(tiny["tok"], PROMPTS)
    rows = module.predict_step({"input_ids": ids, "attention_mask": mask, "prompt": PROMPTS}, 0)
    expected = fuse_generate(dirs["large"], dirs["small"], [dirs["expert"], dirs["expert2"]], PROMPTS,
                             max_new_tokens=6, device="cpu")  # fmt: skip
    assert [r["completion"] for r in rows] == expected
    batch = {"input_ids": ids, "attention_mask": mask, "prompt": PROMPTS}
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    [predicted] = trainer.predict(module, DataLoader([batch], batch_size=None))
    assert predicted == rows  # through the Trainer's predict loop (setup checks the declared support)
    count = sum(p.numel() for p in module.parameters())  # the small models are not parameters, not checkpointed
    assert count == sum(p.numel() for p in module.backbone.parameters())
    plain = LogitsFusionCausalLM(model=str(dirs["large"]), max_new_tokens=6)
    out = plain.predict_step({"input_ids": ids, "attention_mask": mask}, 0)
    reference = tiny["large"].generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                       pad_token_id=tiny["tok"].pad_token_id)  # fmt: skip
    assert [r["completion"] for r in out] == tiny["tok"].batch_decode(
        reference[:, ids.shape[1] :], skip_special_tokens=True
    )


# ---------------------------------------------------------------------- SmolLM2 as both sizes
@pytest.mark.slow
def test_smollm2_as_both_sizes_chooses_weight_one_and_becomes_the_expert(smollm2_dir: Path) -> None:
    """With L = s the objective is zero exactly at a = 1 (P~ = Q_1), so the fused model decodes as the expert."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    expert = copy.deepcopy(base)
    with torch.no_grad():
        weight = expert.model.layers[-1].mlp.down_proj.weight
        weight.add_(0.5 * weight.std() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    prompts = ["The capital of France is", "Review: a warm, funny film.\nSentiment:"]
    ids, mask = _batch(tok, prompts)
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with DynamicLogitsFusion(base, [expert], attention_mask=mask) as fusion:
        fused = base.generate(input_ids=ids, attention_mask=mask, logits_processor=[fusion], **options)
    assert (fusion.alphas == 1.0).all()
    assert torch.equal(fused, expert.generate(input_ids=ids, attention_mask=mask, **options))
    assert not torch.equal(fused, base.generate(input_ids=ids, attention_mask=mask, **options))
