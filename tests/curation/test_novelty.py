"""CGE (``lightning-ft explore-novelty``): the contrast rule with its plausibility cutoff, cached decoding against a
full re-run, the defining property on SmolLM2 fine-tuned on reviews, the iterative variant and its resume."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lightning_ft.curation import novelty
from lightning_ft.curation.novelty import ContrastSettings, Example, contrastive_generate, plausible_contrast
from lightning_ft.errors import UserError

FT_LOGITS = torch.tensor([2.0, 1.9, -0.5, -1.0, -4.0])
BASE_LOGITS = torch.tensor([2.0, 0.5, -3.0, -1.0, -9.0])


class _FixedLM(torch.nn.Module):
    """A causal LM whose next-token logits are always ``logits`` (the decoding rule alone is under test)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone(), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1), past_key_values=None)


def _rule(alpha: float, gamma: float) -> list[float]:
    """The contrast written out token by token from probabilities (an oracle independent of the implementation)."""
    p_ft, p_base = FT_LOGITS.softmax(-1).tolist(), BASE_LOGITS.softmax(-1).tolist()
    head = [p >= alpha * max(p_ft) for p in p_ft]
    return [math.log(f) - gamma * math.log(b) if keep else -math.inf for f, b, keep in zip(p_ft, p_base, head)]


@pytest.mark.parametrize(("alpha", "gamma"), [(0.1, 1.0), (0.5, 0.5), (0.0, 1.0)])
def test_contrast_with_plausibility_cutoff_equals_the_formula(alpha: float, gamma: float) -> None:
    got = plausible_contrast(FT_LOGITS.log_softmax(-1)[None], BASE_LOGITS.log_softmax(-1)[None], alpha, gamma)[0]
    expected = torch.tensor(_rule(alpha, gamma))
    assert torch.equal(got.isinf(), expected.isinf())
    assert torch.allclose(got[~got.isinf()], expected[~expected.isinf()], atol=1e-6)
    if alpha == 0.1:  # the tokens of highest contrast overall have p_ft below 0.1 * max p_ft: they are cut off
        unconstrained = _rule(0.0, 1.0)
        assert (
            got.isinf().tolist() == [False, False, True, True, True]
            and got[unconstrained.index(max(unconstrained))].isinf()
        )


def test_decoding_takes_the_argmax_and_samples_softmax_of_the_cut_contrast() -> None:
    ft, base = _FixedLM(FT_LOGITS), _FixedLM(BASE_LOGITS)
    greedy = contrastive_generate(ft, base, [[0]], [0], ContrastSettings(3, temperature=0.0), 0, None)[0]
    assert greedy.token_ids == [1, 1, 1]
    settings, n = ContrastSettings(1, alpha=0.1), 600
    drawn = [e.token_ids[0] for e in contrastive_generate(ft, base, [[0]] * n, range(n), settings, 0, None)]
    target = torch.tensor(_rule(0.1, 1.0)).softmax(-1)
    freq = torch.bincount(torch.tensor(drawn), minlength=5).double() / n
    assert freq[2:].sum() == 0  # never outside the plausible head
    assert abs(freq[0] - target[0]) < 4 * math.sqrt(target[0] * (1 - target[0]) / n)
    scored = contrastive_generate(ft, base, [[0]], [5], settings, 0, None)[0]
    token = scored.token_ids[0]
    assert scored.ft_logprobs[0] == pytest.approx(float(FT_LOGITS.log_softmax(-1)[token]), abs=1e-6)
    assert scored.base_logprobs[0] == pytest.approx(float(BASE_LOGITS.log_softmax(-1)[token]), abs=1e-6)


def _tiny_pair(tiny_llama_dir: Path) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ft = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ft, base, AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_cached_decoding_scores_equal_a_full_rerun(tiny_llama_dir: Path) -> None:
    ft, base, tok = _tiny_pair(tiny_llama_dir)
    prompts = [[tok.bos_token_id], tok("a good film")["input_ids"], tok("the worst plot of the year")["input_ids"]]
    settings = ContrastSettings(max_new_tokens=12, batch_size=3)
    examples = contrastive_generate(ft, base, prompts, [1, 2, 3], settings, tok.pad_token_id, tok.eos_token_id)
    assert [len(e.token_ids) for e in examples] == [12, 12, 12]
    tokens = [e.token_ids for e in examples]
    full_ft = novelty.score_tokens(ft, prompts, tokens, tok.pad_token_id)
    full_base = novelty.score_tokens(base, prompts, tokens, tok.pad_token_id)
    for example, f, b in zip(examples, full_ft, full_base):
        assert torch.allclose(torch.tensor(example.ft_logprobs), torch.tensor(f), atol=1e-5)
        assert torch.allclose(torch.tensor(example.base_logprobs), torch.tensor(b), atol=1e-5)
    alone = contrastive_generate(ft, base, prompts[2:], [3], settings, tok.pad_token_id, None)[0]
    assert alone.token_ids == examples[2].token_ids  # an example does not depend on its batch


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def review_adapter(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 with a LoRA adapter fitted briefly (12 steps of 4 reviews cut to 16 tokens) on Rotten Tomatoes, saved."""
    from lightning_ft.assets import load_dataset_records
    from lightning_ft.curation.generation import GenerationService

    torch.manual_seed(0)
    service = GenerationService(smollm2_dir)
    tok, model = service.tokenizer, novelty.with_lora(service.model)
    texts = [r["text"] for r in load_dataset_records("rotten_tomatoes", shuffle_seed=0)[:48]]
    reviews = [Example([tok.bos_token_id], tok(t, add_special_tokens=False)["input_ids"][:16], [], []) for t in texts]
    for start in range(0, len(reviews), 4):
        novelty.lm_update(model, reviews[start : start + 4], 1, 3e-3, tok.pad_token_id)
    path = tmp_path_factory.mktemp("cge") / "reviews_adapter"
    model.save_pretrained(path)
    return path


def test_contrastive_examples_score_higher_than_base_and_fine_tuned_samples(
    smollm2_dir: Path, review_adapter: Path, tmp_path: Path
) -> None:
    from lightning_ft.curation.generation import GenerationService

    out = tmp_path / "novel.jsonl"
    novelty.main(["--base", str(smollm2_dir), "--model", str(review_adapter), "--out", str(out),
                  "--num-examples", "8", "--max-new-tokens", "16"])  # fmt: skip
    rows = _read(out)
    assert len(rows) == 8 and all(r["tokens"] == 16 and r["round"] == 1 for r in rows)
    base = GenerationService(smollm2_dir)
    ft = GenerationService(review_adapter).model
    tok, pad = base.tokenizer, base.tokenizer.pad_token_id
    plain = ContrastSettings(16, alpha=0.0, gamma=0.0)  # gamma 0, no cutoff: ordinary sampling from the first model
    prompts = [[tok.bos_token_id]] * 8
    samples = {"base": contrastive_generate(base.model, base.model, prompts, range(100, 108), plain, pad, None),
               "ft": contrastive_generate(ft, ft, prompts, range(200, 208), plain, pad, None)}  # fmt: skip
    mean = {}
    for name, found in samples.items():
        scored = novelty.score_examples(ft, base.model, prompts, [e.token_ids for e in found], pad)
        mean[name] = sum(e.scores()["contrast"] for e in scored) / len(scored)
    mean["cge"] = sum(r["contrast"] for r in rows) / len(rows)
    rescored = novelty.score_examples(ft, base.model, [r["prompt_ids"] for r in rows], [r["token_ids"] for r in rows],
                                      pad)  # fmt: skip
    assert [e.scores()["contrast"] for e in rescored] == pytest.approx([r["contrast"] for r in rows], abs=1e-3)
    print(f"mean per-token contrast: {mean}")
    assert mean["cge"] > mean["ft"] > mean["base"]
    assert mean["cge"] > mean["base"] + 1.0


def _tiny_fine_tuned(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_ft.assets import load_dataset_records

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = novelty.with_lora(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    texts = [r["text"] for r in load_dataset_records("rotten_tomatoes")[:32]]
    reviews = [Example([tok.bos_token_id], tok(t, add_special_tokens=False)["input_ids"][:16], [], []) for t in texts]
    novelty.lm_update(model, reviews, 5, 1e-2, tok.pad_token_id)
    path = tmp_path / "tiny_ft"
    model.merge_and_unload().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_iterative_rounds_update_the_base_and_resume_without_redoing_a_round(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, out = _tiny_fine_tuned(tiny_llama_dir, tmp_path), tmp_path / "novel.jsonl"
    argv = ["--base", str(tiny_llama_dir), "--model", str(model), "--out", str(out), "--num-examples", "4",
            "--max-new-tokens", "8", "--update-steps", "3", "--learning-rate", "1e-2"]  # fmt: skip
    novelty.main([*argv, "--rounds", "1"])
    first = _read(out)
    calls: list[int] = []
    real = novelty.contrastive_generate

    def counting(*args: Any, **kwargs: Any) -> list[Example]:
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(novelty, "contrastive_generate", counting)
    novelty.main([*argv, "--rounds", "2"])
    rows = _read(out)
    assert calls == [4]  # round 1 was not generated again, round 2 was
    assert rows[:4] == first and [r["round"] for r in rows] == [1] * 4 + [2] * 4
    report = json.loads((tmp_path / "novel.report.json").read_text())
    update = report["rounds"][0]["update"]
    assert update["contrast_after"] < update["contrast_before"]  # the base learnt what round 1 found
    state = json.loads((tmp_path / "novel.rounds" / "state.json").read_text())
    assert [r["round"] for r in state["rounds"]] == [1, 2] and Path(state["rounds"][0]["adapter"]).is_file()
    calls.clear()
    novelty.main([*argv, "--rounds", "2"])
    assert calls == [] and _read(out) == rows


def test_bad_inputs_are_refused_in_one_sentence(tiny_llama_dir: Path, smollm2_dir: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "x.jsonl")
    cases = [
        (["--base", str(tiny_llama_dir), "--model", str(tmp_path / "missing"), "--out", out], "--model cannot be"),
        (["--base", str(tiny_llama_dir), "--model", str(smollm2_dir), "--out", out], "different tokenizers"),
        (["--base", "b", "--model", "m", "--out", out, "--num-examples", "0"], "--num-examples 0 must be at least 1"),
    ]
    for argv, match in cases:
        with pytest.raises(UserError, match=match) as err:
            novelty.main(argv)
        assert "\n" not in str(err.value) and str(err.value).endswith(".")


def test_help_states_inputs_and_outputs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        novelty.main(["--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0
    assert all(option in text for option in ("--base", "--model", "--out", "--rounds", "--num-examples", "--prompts"))
