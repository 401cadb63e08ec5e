"""Token-weighted SFT: the three weight providers on hand-made records, the DataModule's weights and labels,
the weighted loss against a hand computation, and neutral weights reproducing the plain loss exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from objective_checks import first_batch

from lightning_ft.data import InstructionDataModule
from lightning_ft.data.collate import IGNORE_INDEX
from lightning_ft.modules import CausalLMModule
from lightning_ft.objectives import DiffWeights, KeyTokenWeights, SpanWeights, TokenWeightedDataModule

TOOLS = ["get_weather", "get_time", "search_web"]


def _records(n: int = 24) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        tool = TOOLS[i % 3]
        rows.append({
            "query": f"question number {i}", "tools": TOOLS, "tool": tool, "response": f"{tool}(q={i})",
            "correct": f"def f(x):\n    y = x * {i}\n    return y + 1\n",
            "incorrect": f"def f(x):\n    y = x * {i}\n    return y - 1\n",
            "thoughts": f"Draft: maybe {i + 1}", "answer": f"{i}",
        })  # fmt: skip
    return rows


@pytest.fixture()
def records_file(tmp_path: Path) -> Path:
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    return path


def _offsets(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    return [tuple(o) for o in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]


def _covering(offsets: list[tuple[int, int]], char: int) -> int:
    return next(i for i, (s, e) in enumerate(offsets) if s <= char < e)


def test_key_tokens_are_the_first_and_the_diverging_ones(tiny_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    record = _records()[0]  # gold get_weather; get_time diverges at char 4, search_web at char 0
    response = " " + record["response"]
    offsets = _offsets(tok, response)
    provider = KeyTokenWeights(max_weight=9.0)
    keys = provider.key_tokens(record, response, offsets)
    assert keys == {0, _covering(offsets, 1 + 4), _covering(offsets, 1)}
    weights = provider.response_weights(record, response, offsets)
    expected = min(max((len(offsets) - len(keys)) / len(keys), 1.0), 9.0)
    assert [w for i, w in enumerate(weights) if i in keys] == [expected] * len(keys)
    assert all(w == 1.0 for i, w in enumerate(weights) if i not in keys)
    assert KeyTokenWeights(max_weight=1.0).response_weights(record, response, offsets) == [1.0] * len(offsets)


def test_diff_weights_mark_changed_lines_and_characters(tiny_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    correct, incorrect = "a = 1\nb = 2\nc = 3\n", "a = 1\nb = 5\nc = 3\n"
    lines, chars = DiffWeights.changed_spans(correct, incorrect)
    assert lines == [(6, 12)] and chars == [(10, 11)]
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    offsets = _offsets(tok, correct)
    weights = DiffWeights(correct_field="c", incorrect_field="w", line_weight=0.5, token_weight=2.0).response_weights(
        {"c": correct, "w": incorrect}, correct, offsets
    )
    for (s, e), w in zip(offsets, weights):
        on_line, on_char = s < 12 and e > 6, s < 11 and e > 10
        assert w == 1.0 + 0.5 * on_line + 2.0 * on_char
    assert weights[_covering(offsets, 10)] == 3.5 and weights[0] == 1.0


def test_span_weights_split_thoughts_and_answer(tiny_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    response = " Draft: maybe 3\nFinal: 2"
    offsets = _offsets(tok, response)
    weights = SpanWeights(thought_fields=["thoughts"], answer_weight=2.0).response_weights(
        {"thoughts": "Draft: maybe 3"}, response, offsets
    )
    for (s, e), w in zip(offsets, weights):
        assert w == (0.0 if s < 15 and e > 1 else 2.0)


def _opts(path: Path, **kwargs: Any) -> dict[str, Any]:
    opts: dict[str, Any] = dict(
        dataset=str(path),
        prompt_template="Q: {query}\nA:",
        response_template=" {thoughts}\nFinal: {answer}",
        label_options=None,
        val_size=4,
        test_size=0,
        control_size=0,
        batch_size=4,
        max_length=48,
    )
    opts.update(kwargs)
    return opts


def _weighted_dm(path: Path, weighting: Any, **kwargs: Any) -> TokenWeightedDataModule:
    return TokenWeightedDataModule(weighting=weighting, **_opts(path, **kwargs))


def test_weighted_loss_equals_hand_computation(tiny_llama_dir: Path, records_file: Path) -> None:
    weighting = SpanWeights(thought_fields=["thoughts"], thought_weight=0.0, answer_weight=3.0)
    for normalization in ("weights", "tokens"):
        module = CausalLMModule(model=str(tiny_llama_dir), output_dir="", loss_normalization=normalization)
        batch = first_batch(module, _weighted_dm(records_file, weighting, mask_prompt=False))
        labels, weights = batch["labels"], batch["loss_weights"]
        assert (
            (weights[:, :] == 0) & (batch["attention_mask"] == 1) <= (labels == IGNORE_INDEX)
        ).all()  # thoughts ignored
        with torch.no_grad():
            logits = module(batch["input_ids"], batch["attention_mask"]).logits.double()
        num = den = count = 0.0
        for b in range(labels.shape[0]):
            for t in range(1, labels.shape[1]):
                if labels[b, t] != IGNORE_INDEX:
                    ce = -torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item()
                    num, den, count = num + weights[b, t].item() * ce, den + weights[b, t].item(), count + 1
        expected = num / (den if normalization == "weights" else count)
        assert module.compute_loss(batch).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "weighting",
    [
        KeyTokenWeights(max_weight=1.0),
        DiffWeights(correct_field="correct", line_weight=0.0, token_weight=0.0),
        SpanWeights(thought_fields=["thoughts"], thought_weight=1.0, answer_weight=1.0),
    ],
    ids=["pkt", "fait", "ptr"],
)
def test_neutral_weights_give_the_plain_loss_exactly(weighting: Any, tiny_llama_dir: Path, records_file: Path) -> None:
    template = (
        " {correct}"
        if isinstance(weighting, DiffWeights)
        else " {response}"
        if isinstance(weighting, KeyTokenWeights)
        else None
    )
    extra = {"response_template": template} if template else {}
    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    weighted = first_batch(module, _weighted_dm(records_file, weighting, **extra))
    plain_dm = InstructionDataModule(**_opts(records_file, **extra))
    plain = first_batch(module, plain_dm)
    assert torch.equal(weighted["labels"], plain["labels"]) and "loss_weights" not in plain
    assert torch.equal(module.compute_loss(weighted), module.compute_loss(plain))


def test_bad_fields_and_arguments_are_one_sentence(tiny_llama_dir: Path, records_file: Path) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    with pytest.raises(ValueError, match=r"thought_fields='draft' is not a field of the data.*set thought_fields"):
        first_batch(module, _weighted_dm(records_file, SpanWeights(thought_fields=["draft"])))
    with pytest.raises(ValueError, match=r"max_weight=0.5 must be at least 1"):
        KeyTokenWeights(max_weight=0.5)
    with pytest.raises(ValueError, match=r"weighting=.* is not a TokenWeighting"):
        TokenWeightedDataModule(weighting="pkt")  # type: ignore[arg-type]
