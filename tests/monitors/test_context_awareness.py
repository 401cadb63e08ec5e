"""Context-awareness: the user attention ratio against a manual computation from ``output_attentions`` and against
the closed form of uniform attention, the sdpa -> eager switch and its undoing, the dialogue masks, the indicator
annotation, the callback's logging, history, JSON and resume, and the refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import Recorder, make_data, make_trainer
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_ft.modules import CausalLMModule
from lightning_ft.monitors.context_awareness import (
    ContextAwareness,
    annotate_indicator,
    append_indicator,
    default_layer,
    dialogue_ratios,
    encode_dialogue,
    user_attention_ratio,
)


def _batch(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Two right-padded rows (lengths 10 and 7) with user and response masks."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (2, 10), generator=g)
    mask = torch.tensor([[1] * 10, [1] * 7 + [0] * 3])
    user = torch.zeros(2, 10, dtype=torch.bool)
    user[0, 1:5], user[1, 2:4] = True, True
    response = torch.zeros(2, 10, dtype=torch.bool)
    response[0, 6:10], response[1, 4:7] = True, True
    return ids, mask, user, response


def test_ratio_equals_a_manual_computation_from_output_attentions(tiny_llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()
    ids, mask, user, response = _batch()
    with torch.no_grad():
        attentions = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    for layer in (0, 1):
        expected = []
        for b in range(2):
            rows = response[b].nonzero().flatten().tolist()
            cols = user[b].nonzero().flatten().tolist()
            per_row = [max(sum(attentions[layer][b, h, r, c].item() for c in cols) for h in range(4)) for r in rows]
            expected.append(sum(per_row) / len(per_row))
        got = user_attention_ratio(model, ids, mask, user, response, layer)
        assert got.tolist() == pytest.approx(expected, abs=1e-6)
    # every column a user column: each softmax row sums to 1; no response row: nan
    everything = mask.bool()
    assert user_attention_ratio(model, ids, mask, everything, response, 1).tolist() == pytest.approx([1.0, 1.0])
    assert math.isnan(user_attention_ratio(model, ids, mask, user, torch.zeros_like(response), 0)[0].item())


def test_uniform_attention_gives_the_share_of_user_tokens_before_each_response_token(tiny_llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.q_proj.weight.zero_()  # every score 0: row r attends 1/(r+1) to each column c <= r
    ids, mask, user, response = _batch(1)
    expected = []
    for b in range(2):
        rows = response[b].nonzero().flatten().tolist()
        expected.append(sum(user[b, : r + 1].sum().item() / (r + 1) for r in rows) / len(rows))
    assert expected[0] == pytest.approx((4 / 7 + 4 / 8 + 4 / 9 + 4 / 10) / 4)
    assert user_attention_ratio(model, ids, mask, user, response, 1).tolist() == pytest.approx(expected, abs=1e-6)


def test_an_sdpa_model_runs_the_probe_eagerly_and_is_switched_back(tiny_llama_dir: Path) -> None:
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="sdpa").eval()
    eager = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()
    ids, mask, user, response = _batch(2)
    got = user_attention_ratio(sdpa, ids, mask, user, response, 0)
    assert got.tolist() == pytest.approx(user_attention_ratio(eager, ids, mask, user, response, 0).tolist(), abs=1e-6)
    assert sdpa.config._attn_implementation == "sdpa"
    assert all(
        getattr(m.config, "_attn_implementation", "sdpa") == "sdpa" for m in sdpa.modules() if hasattr(m, "config")
    )


def test_dialogue_masks_cover_the_prompt_text_and_the_response(tiny_llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    enc = encode_dialogue(tokenizer, "what is good here", "the food is good")
    decode = lambda key: tokenizer.decode([t for t, m in zip(enc["input_ids"], enc[key]) if m])
    # byte-level BPE joins a word to the space before it: that token holds prompt (response) text, so it counts
    assert decode("user_mask") == " what is good here" and decode("response_mask") == " the food is good"
    assert tokenizer.decode(enc["input_ids"]) == "User: what is good here\nAssistant: the food is good"
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    enc = encode_dialogue(tokenizer, "what is good here", "the food is good")
    assert decode("user_mask") == "what is good here" and decode("response_mask") == "the food is good"
    assert tokenizer.decode(enc["input_ids"]) == "<user>what is good here\n<assistant>the food is good"
    assert (
        len(encode_dialogue(tokenizer, "what is good here", "the food is good " * 20, max_length=16)["input_ids"]) == 16
    )


def test_the_indicator_is_appended_exactly_to_the_turns_above_the_threshold() -> None:
    assert append_indicator("Summarize the passage") == "Summarize the passage. [IND]"
    assert append_indicator("What is it?") == "What is it? [IND]"
    assert append_indicator("What is it? [IND]") == "What is it? [IND]"
    assert append_indicator("Use this", "<ctx>") == "Use this. <ctx>"
    records = [{"prompt": p, "response": "r", "id": i} for i, p in enumerate(["a 1", "b?", "c", "d", "e"])]
    out = annotate_indicator(records, [0.61, 0.9, 0.6, float("nan"), 0.1])
    assert [r["prompt"] for r in out] == ["a 1. [IND]", "b? [IND]", "c", "d", "e"]
    assert [r["id"] for r in out] == [0, 1, 2, 3, 4] and records[0]["prompt"] == "a 1"  # copies; input untouched
    assert [r["prompt"] for r in annotate_indicator(records, [0.5] * 5, threshold=0.4)][2] == "c. [IND]"
    with pytest.raises(ValueError, match=r"ratios has 2 values for 5 records"):
        annotate_indicator(records, [0.1, 0.2])


def test_the_default_layer_is_the_middle_block() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    for layers, expected in ((32, 15), (30, 14), (2, 0), (1, 0)):
        config = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=layers,
                             num_attention_heads=1, num_key_value_heads=1)  # fmt: skip
        with torch.device("meta"):
            assert default_layer(LlamaForCausalLM(config)) == expected


def test_fit_logs_keeps_history_writes_json_and_resumes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    def run(root: Path, ckpt: str | None = None) -> tuple[ContextAwareness, Recorder, CausalLMModule]:
        L.seed_everything(0)
        module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=5e-2, warmup_steps=0, output_dir="")
        callback = ContextAwareness(num_dialogues=5, batch_size=2, max_length=48)
        recorder = Recorder()
        trainer = make_trainer(root, 6 if ckpt is None else 10, val_check_interval=3, limit_val_batches=1,
                               enable_checkpointing=True, logger=[CSVLogger(root, name="csv"), recorder],
                               callbacks=[callback, ModelCheckpoint(dirpath=root / "ckpt", save_last=True)])  # fmt: skip
        trainer.fit(module, make_data(), ckpt_path=ckpt)
        return callback, recorder, module

    first, recorder, module = run(tmp_path)
    assert [h["step"] for h in first.history] == [0, 3, 6]
    assert module.backbone.config._attn_implementation == "sdpa"  # switched back after every probe
    measured = dialogue_ratios(module.backbone.eval(), module.tokenizer, first.dialogues, 0, max_length=48)
    ratios = [r for r in measured if not math.isnan(r)]  # a response cut off by max_length is not measured
    assert len(ratios) >= 2
    last = first.history[-1]
    assert last["user_attention_ratio"] == pytest.approx(sum(ratios) / len(ratios), abs=1e-6)
    assert last["above_threshold"] == sum(r > 0.6 for r in ratios) / len(ratios)
    logged = [(step, m) for step, m in recorder.metrics if "context/user_attention_ratio" in m]
    assert [step for step, _ in logged] == [0, 3, 6] and logged[-1][1]["context/above_threshold"] == last[
        "above_threshold"
    ]
    written = json.loads((tmp_path / "context_awareness.json").read_text())
    assert written["history"] == first.history and written["layer"] == 0 and written["dialogues"] == 5
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"context/user_attention_ratio", "context/above_threshold"} <= set(header)
    resumed, _, _ = run(tmp_path, ckpt=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [h["step"] for h in resumed.history] == [0, 3, 6, 9, 10] and resumed.history[:3] == first.history


def test_bad_settings_are_refused(tiny_llama_dir: Path) -> None:
    from lightning_ft.errors import UserError

    with pytest.raises(ValueError, match=r"num_dialogues=0 must be at least 1"):
        ContextAwareness(num_dialogues=0)
    with pytest.raises(ValueError, match=r"threshold=1.5 must be in \[0, 1\]"):
        ContextAwareness(threshold=1.5)
    with pytest.raises(ValueError, match=r"layer=-1 must be 0 or more"):
        ContextAwareness(layer=-1)
    with pytest.raises(ValueError, match=r"every_n_validations=-1 must be 0"):
        ContextAwareness(every_n_validations=-1)
    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    with pytest.raises(
        UserError, match=r"layer=2 is past the last attention layer of LlamaForCausalLM: pick one of 0 .. 1"
    ):
        ContextAwareness(layer=2).setup(make_trainer(Path("."), 1), module, "fit")
    with pytest.raises(UserError, match=r"dataset='chitchat' has no records with non-empty 'question'"):
        ContextAwareness(prompt_field="question").setup(make_trainer(Path("."), 1), module, "fit")


def test_smollm2_ratio_on_real_dialogues_under_its_chat_template(smollm2_dir: Path) -> None:
    from lightning_ft.assets import load_dataset_records

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, attn_implementation="sdpa").eval()
    records = load_dataset_records("chitchat", shuffle_seed=0)[:4]
    enc = encode_dialogue(tokenizer, records[0]["prompt"], records[0]["response"])
    user_text = tokenizer.decode([t for t, m in zip(enc["input_ids"], enc["user_mask"]) if m])
    assert user_text.strip() == records[0]["prompt"].strip()  # the prompt alone, not the system prompt or role markers
    ratios = dialogue_ratios(model, tokenizer, records, max_length=96)
    assert default_layer(model) == 14 and all(0 < r < 1 for r in ratios)
    assert model.config._attn_implementation == "sdpa"
