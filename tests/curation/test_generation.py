"""GenerationService on the bundled SmolLM2: greedy equals ``model.generate``, sampling is seeded per prompt, the JSONL
cache makes a rerun generate nothing and an interrupted run resume, answer likelihoods equal a hand computation; LoRA
adapter folders, LightningFT modules and quantized loads on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lightning_ft.curation.generation import GenerationService, GenerationSettings, _GumbelSampler
from lightning_ft.errors import UserError

PROMPTS = [
    "Review: a dull, lifeless film.\nSentiment:",
    "The capital of France is",
    "Hi",
    "Review: one of the most moving films of the year.\nSentiment:",
]
GREEDY = GenerationSettings(max_new_tokens=6)  # each decoding step reads SmolLM2's 540 MB of weights: few steps


class Interrupted(RuntimeError):
    """The simulated crash of a generation run."""


def _count_generate(
    service: GenerationService, monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None
) -> list[int]:
    """Record the rows of every ``model.generate`` call; raise :class:`Interrupted` at call ``fail_at``."""
    calls: list[int] = []
    real = type(service.model).generate.__get__(service.model)  # the class's: services may share one model

    def generate(**kwargs: Any) -> Any:
        if fail_at is not None and len(calls) + 1 == fail_at:
            raise Interrupted("simulated crash")
        calls.append(int(kwargs["input_ids"].shape[0]))
        return real(**kwargs)

    monkeypatch.setattr(service.model, "generate", generate)
    return calls


@pytest.fixture(scope="module")
def smollm2() -> GenerationService:
    """The bundled SmolLM2 loaded once by its alias (no cache)."""
    return GenerationService("smollm2-135m", batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def greedy(smollm2: GenerationService) -> list[list[str]]:
    return smollm2.generate(PROMPTS, GREEDY)


def test_greedy_batch_equals_model_generate_on_each_prompt_alone(
    smollm2: GenerationService, greedy: list[list[str]]
) -> None:
    tok, model = smollm2.tokenizer, smollm2.model
    for prompt, [completion] in list(zip(PROMPTS, greedy))[2:]:  # the shortest and the longest prompt, unpadded
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert completion == tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert all(completion.strip() for [completion] in greedy[:2])  # real text came back


def test_rerun_generates_nothing_and_interrupted_run_keeps_finished_rows(
    tmp_path: Path, smollm2: GenerationService, greedy: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    crashing = GenerationService(smollm2.model, tokenizer=smollm2.tokenizer, cache=cache, batch_size=2)
    calls = _count_generate(crashing, monkeypatch, fail_at=2)
    with pytest.raises(Interrupted):
        crashing.generate(PROMPTS, GREEDY)
    assert calls == [2]
    lines = (cache / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["settings"]["max_new_tokens"] == 6 for line in lines)
    with open(cache / "generations.jsonl", "a") as file:
        file.write('{"key": "torn')  # a line cut by the crash
    resumed = GenerationService(smollm2.model, tokenizer=smollm2.tokenizer, cache=cache, batch_size=2)
    assert resumed.fingerprint == crashing.fingerprint  # the same weights: the same cache keys
    calls = _count_generate(resumed, monkeypatch)
    assert resumed.generate(PROMPTS, GREEDY) == greedy
    assert calls == [2]  # only the batch the crash lost
    rerun = GenerationService(smollm2.model, tokenizer=smollm2.tokenizer, cache=cache, batch_size=2)
    calls = _count_generate(rerun, monkeypatch)
    assert rerun.generate(PROMPTS[::-1], GREEDY) == greedy[::-1]
    assert calls == []
    assert len(rerun._read_cache()) == 4  # the torn line was ignored, the rows after it were kept


def test_sampling_is_seeded_per_prompt_not_per_batch(smollm2: GenerationService) -> None:
    settings = GenerationSettings(max_new_tokens=5, do_sample=True, num_samples=2, temperature=1.0, seed=3)
    alone = smollm2.generate(PROMPTS[1:2], settings)
    batched = smollm2.generate(PROMPTS[1:3], settings)
    assert batched[0] == alone[0]
    assert len(set(alone[0])) == 2  # two different samples of one prompt


def test_gumbel_sampler_draws_from_the_tempered_nucleus() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    rows = 20000
    sampler = _GumbelSampler(range(rows), temperature=0.7, top_p=0.9)
    picks = sampler(torch.zeros(rows, 1), logits.expand(rows, -1)).argmax(-1)
    probs = (logits / 0.7).softmax(-1)
    nucleus = int((probs.cumsum(-1) - probs < 0.9).sum())  # the smallest prefix reaching 0.9
    expected = torch.zeros(5)
    expected[:nucleus] = probs[:nucleus] / probs[:nucleus].sum()
    found = torch.bincount(picks, minlength=5).float() / rows
    torch.testing.assert_close(found, expected, atol=0.01, rtol=0)
    assert found[nucleus:].sum() == 0


def test_answer_logprob_and_mean_nll_equal_a_hand_computation(smollm2: GenerationService) -> None:
    prompts, answers = [PROMPTS[1], PROMPTS[0]], [" Paris", " negative, boring"]
    found = smollm2.answer_logprob(prompts, answers)
    nll = smollm2.mean_token_nll(list(zip(prompts, answers)))
    tok = smollm2.tokenizer
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        p, a = tok(prompt)["input_ids"], tok(answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = smollm2.model(torch.tensor([p + a])).logits[0].double().log_softmax(-1)
        values = [logp[len(p) - 1 + j, token].item() for j, token in enumerate(a)]
        assert found[i] == pytest.approx(sum(values), abs=1e-3)
        assert nll[i] == pytest.approx(-np.mean(values), abs=1e-4)


def test_next_token_logprobs_equal_each_text_alone_in_input_order(smollm2: GenerationService) -> None:
    texts = [*PROMPTS, "A longer prompt that is scored in its own batch of the sorted order, " * 3]  # 2 batches of 4
    tokens = smollm2.tokenizer(" positive negative", add_special_tokens=False)["input_ids"]
    found = smollm2.next_token_logprobs(texts, tokens)
    assert found.shape == (len(texts), len(tokens)) and found.dtype == np.float64
    for i, text in enumerate(texts):
        with torch.no_grad():
            logp = smollm2.model(torch.tensor([smollm2.tokenizer(text)["input_ids"]])).logits[0, -1].log_softmax(-1)
        assert found[i] == pytest.approx(logp[tokens].double().numpy(), abs=1e-4)


def test_lora_adapter_folder_loads_base_and_adapter(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == tiny_llama_dir
    service = GenerationService(tmp_path / "adapter", device="cpu")
    plain = GenerationService(tiny_llama_dir, device="cpu")
    assert isinstance(service.model, PeftModel) and service.fingerprint != plain.fingerprint
    text = ["a film about a film"]
    assert service.mean_token_nll(text) == pytest.approx(GenerationService(lora, tokenizer=tiny_llama_dir)
                                                        .mean_token_nll(text), abs=1e-6)  # fmt: skip
    assert service.mean_token_nll(text) != pytest.approx(plain.mean_token_nll(text), abs=1e-6)


def test_lightning_module_is_used_through_its_backbone_and_keeps_its_mode(tiny_llama_dir: Path) -> None:
    from lightning_ft.modules import CausalLMModule

    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    module.train()
    service = GenerationService(module)
    assert service.model is module.backbone and service.tokenizer is module.tokenizer
    [[completion]] = service.generate(["a review"], GenerationSettings(max_new_tokens=3))
    assert isinstance(completion, str) and module.backbone.training
    with pytest.raises(UserError, match=r"needs a tokenizer: pass tokenizer="):
        GenerationService(module.backbone)
    with pytest.raises(UserError, match=r"has no chat template: drop the chat-template option"):
        service.generate(["a review"], GenerationSettings(max_new_tokens=3, chat_template=True))


def test_quantized_load_generates(tiny_llama_dir: Path) -> None:
    service = GenerationService(tiny_llama_dir, quantization="nf4", device="cpu")
    assert "Linear4bit" in {type(m).__name__ for m in service.model.modules()}
    assert service.fingerprint != GenerationService(tiny_llama_dir, device="cpu").fingerprint
    [[completion]] = service.generate(["a review"], GenerationSettings(max_new_tokens=3))
    assert isinstance(completion, str)
