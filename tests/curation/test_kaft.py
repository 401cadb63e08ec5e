"""KAFT: counterfactual swaps, exact proportions, cached closed-book answers, refusals, and a short SmolLM2 fit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_trainer

from lightning_ft.curation.generation import GenerationService, GenerationSettings
from lightning_ft.curation.kaft import (
    KnowledgeAwareContexts,
    KnowledgeAwareDataModule,
    closed_book_answer,
    entity_type,
    exact_counts,
    mentions,
    reuters_company_qa,
)


@pytest.fixture(scope="module")
def qa() -> list[dict[str, Any]]:
    """Real context-QA records: company questions about bundled Reuters articles."""
    return reuters_company_qa()


class Canned:
    """A generator with fixed answers (for the tests that only count kinds)."""

    def generate(self, prompts: list[str], settings: Any = None) -> list[list[str]]:
        return [["Acme Corp\nmore"] for _ in prompts]


def _sentence(message: str) -> bool:
    return "\n" not in message and message.rstrip().endswith(".")


def test_entity_types() -> None:
    assert [entity_type(a) for a in ("1987", "42", "two hundred", "March", "champion products inc", "Barack Obama",
                                     "flamingos")] == ["year", "number", "number", "month", "organisation", "name", None]  # fmt: skip
    assert entity_type("earn", label_words=["earn", "acq"]) == "label"
    assert mentions("a two for one split", "two") and not mentions("someone", "one")


def test_counterfactual_targets_are_in_their_context_and_replace_the_gold(qa: list[dict[str, Any]]) -> None:
    records = qa[:60]
    out = KnowledgeAwareContexts(relevant=0.5, counterfactual=0.5, irrelevant=0, seed=3)(records)
    swapped = [o for o in out if o["kaft_kind"] == "counterfactual"]
    assert len(swapped) == 30
    for before, after in zip(records, out):
        gold, target = before["answer"], after["target"]
        if after["kaft_kind"] == "relevant":
            assert after["context"] == before["context"] and target == gold
            continue
        assert mentions(after["context"], target), after
        assert target.lower() != gold.lower() and not mentions(after["context"], gold), after
        assert entity_type(target) == entity_type(gold) == "organisation"
        assert target in {r["answer"] for r in records}  # an entity found in the data
        assert after["question"] == before["question"] and after["kaft_gold"] == gold


@pytest.mark.parametrize(("n", "fractions", "expected"),
                         [(60, (0.5, 0.3, 0.2), (30, 18, 12)), (10, (1 / 3, 1 / 3, 1 / 3), (4, 3, 3)),
                          (7, (0.0, 0.5, 0.5), (0, 4, 3))])  # fmt: skip
def test_proportions_are_exact(
    qa: list[dict[str, Any]], n: int, fractions: tuple[float, float, float], expected: tuple[int, ...]
) -> None:
    assert tuple(exact_counts(n, fractions)) == expected
    kaft = KnowledgeAwareContexts(relevant=fractions[0], counterfactual=fractions[1], irrelevant=fractions[2])
    out = kaft(qa[:n], Canned())
    assert (
        tuple(sum(o["kaft_kind"] == kind for o in out) for kind in ("relevant", "counterfactual", "irrelevant"))
        == expected
    )
    assert all(o["target"] == "Acme Corp" for o in out if o["kaft_kind"] == "irrelevant")  # first line of the answer
    explained = KnowledgeAwareContexts(relevant=fractions[0], counterfactual=fractions[1], irrelevant=fractions[2],
                                       explanation=True)(qa[:n], Canned())  # fmt: skip
    assert all(o["target"].startswith(o["kaft_answer"] + " (the context") for o in explained)


def test_irrelevant_targets_are_the_cached_closed_book_answers(
    qa: list[dict[str, Any]], tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = qa[:12]
    kaft = KnowledgeAwareContexts(relevant=0.25, counterfactual=0.25, irrelevant=0.5, max_new_tokens=6)
    service = GenerationService(str(tiny_llama_dir), cache=tmp_path / "cache", device="cpu")
    first = kaft(records, service)
    irrelevant = [(r, o) for r, o in zip(records, first) if o["kaft_kind"] == "irrelevant"]
    assert len(irrelevant) == 6
    settings = GenerationSettings(max_new_tokens=6)
    for record, out in irrelevant:
        [[completion]] = service.generate([f"Question: {record['question']}\nAnswer:"], settings)
        assert out["target"] == closed_book_answer(completion)
        assert out["context"] != record["context"] and not mentions(out["context"], record["answer"])
        assert out["context"] in {r["context"] for r in records}  # another record's context

    again = GenerationService(str(tiny_llama_dir), cache=tmp_path / "cache", device="cpu")

    def refuse(*args: Any) -> Any:
        raise AssertionError("a second build generated again")

    monkeypatch.setattr(again, "_generate_batch", refuse)
    assert kaft(records, again) == first


def test_refusals_are_one_sentence(qa: list[dict[str, Any]]) -> None:
    with pytest.raises(ValueError, match=r"^relevant=0.5, counterfactual=0.5 and irrelevant=0.5 sum to 1.5") as err:
        KnowledgeAwareContexts(relevant=0.5, counterfactual=0.5, irrelevant=0.5)
    assert _sentence(str(err.value))
    with pytest.raises(ValueError, match=r"^context_field='passage' is not a column of every record") as err:
        KnowledgeAwareContexts(context_field="passage")(qa[:6], Canned())
    assert _sentence(str(err.value))
    lonely = [{"context": "It was founded in 1987.", "question": "When?", "answer": "1987"},
              {"context": "Paris is in France.", "question": "Where?", "answer": "Paris"}]  # fmt: skip
    with pytest.raises(ValueError, match=r"another entity of the same type in the data, but only 0 of 2") as err:
        KnowledgeAwareContexts(relevant=0, counterfactual=1, irrelevant=0)(lonely)
    assert _sentence(str(err.value))
    with pytest.raises(ValueError, match=r"needs the model's closed-book answers: pass a GenerationService") as err:
        KnowledgeAwareContexts()(qa[:6])
    assert _sentence(str(err.value))


def test_the_datamodule_answers_closed_book_with_the_fitted_module(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Without closed_book_model, fit asks the attached module (before training) and caches its answers."""
    from lightning_ft.modules import CausalLMModule

    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    data = KnowledgeAwareDataModule(train_size=12, val_size=4, test_size=0, control_size=0, batch_size=4,
                                    max_length=64, closed_book_max_new_tokens=4,
                                    closed_book_cache=str(tmp_path / "gen"))  # fmt: skip
    make_trainer(tmp_path, 1).fit(module, datamodule=data)
    assert [r["kaft_kind"] for r in data._splits["train"]].count("irrelevant") == 4
    assert len((tmp_path / "gen" / "generations.jsonl").read_text().splitlines()) == 4
    assert all(r["target"] == r["answer"] and r["kaft_kind"] == "relevant" for r in data._splits["val"])
    with pytest.raises(ValueError, match=r"^closed_book_model=None answers with the LightningModule being fitted"):
        KnowledgeAwareDataModule(train_size=12, val_size=0, test_size=0, control_size=0,
                                 tokenizer=str(tiny_llama_dir)).setup("fit")  # fmt: skip


@pytest.mark.slow
def test_kaft_fit_on_smollm2_lowers_the_loss(smollm2_dir: Path, tmp_path: Path) -> None:
    """6 steps of batch 2 (three epochs of 4 KAFT examples: 2 relevant, 1 counterfactual, 1 irrelevant whose target
    is SmolLM2's own closed-book answer), LoRA on the top four blocks; Reuters contexts cut to 24 words so that the
    whole test stays under 40 s on two CPU cores."""
    from lightning_ft.modules import CausalLMModule

    source = tmp_path / "qa.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in reuters_company_qa(context_words=24, question_words=6)))
    peft = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
            "layers_to_transform": [26, 27, 28, 29]}  # fmt: skip
    module = CausalLMModule(model=str(smollm2_dir), learning_rate=2e-3, warmup_steps=0, output_dir="", peft=peft)
    data = KnowledgeAwareDataModule(dataset=str(source), relevant=0.5, counterfactual=0.25, irrelevant=0.25,
                                    train_size=4, val_size=0, test_size=0, control_size=0, batch_size=2,
                                    max_length=96, closed_book_max_new_tokens=8)  # fmt: skip
    data.tokenizer = module.tokenizer
    data.generator = GenerationService(module, cache=tmp_path / "gen")  # as the DataModule makes it during fit
    data.setup("fit")
    kinds = [r["kaft_kind"] for r in data._splits["train"]]
    assert (kinds.count("relevant"), kinds.count("counterfactual"), kinds.count("irrelevant")) == (2, 1, 1)
    batches = list(data.train_dataloader())

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(module.compute_loss(b).item() for b in batches) / len(batches)

    before = mean_loss()
    make_trainer(tmp_path, 6).fit(module, datamodule=data)
    after = mean_loss()
    assert after < 0.7 * before, (before, after)
