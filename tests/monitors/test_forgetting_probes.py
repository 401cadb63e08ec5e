"""Implicit-inference probes: the prompts rendered exactly, the shots and queries chosen, option scores and accuracy
against a hand computation, the callback's logging, history, JSON and resume, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import Recorder, make_data, make_trainer

from lightning_ft.modules import CausalLMModule
from lightning_ft.monitors.forgetting_probes import (
    CONJUGATE_FORMAT,
    ImplicitInferenceProbes,
    ProbeFormat,
    build_probe_prompts,
    option_scores,
    select_probe_records,
)

SHOTS = [{"text": "stocks rose sharply today", "label": "earn"}, {"text": "oil prices fell", "label": "crude"}]
QUERIES = [{"text": "crude output cut by opec", "label": "crude"}, {"text": "profit up", "label": "earn"}]


def test_prompts_are_the_shots_then_the_query_under_each_format() -> None:
    probe = build_probe_prompts(SHOTS, QUERIES, ["earn", "crude"], label_words={"earn": "earnings", "crude": "oil"},
                                max_words=3)  # fmt: skip
    context = "Article: stocks rose sharply\nTopic: earnings\n\nArticle: oil prices fell\nTopic: oil\n\n"
    assert probe.prompts == [context + "Article: crude output cut\nTopic:", context + "Article: profit up\nTopic:"]
    assert probe.options == [" earnings", " oil"] and probe.gold == [1, 0]
    conjugate = build_probe_prompts(SHOTS, QUERIES[:1], ["earn", "crude"], CONJUGATE_FORMAT, max_words=3)
    question = "Q: WHICH SUBJECT IS THIS NEWS STORY ABOUT?\n"
    expected = f"{question}STOCKS ROSE SHARPLY\nA: EARN\n\n{question}OIL PRICES FELL\nA: CRUDE\n\n{question}CRUDE OUTPUT CUT\nA:"
    assert conjugate.prompts == [expected]
    assert conjugate.options == [" EARN", " CRUDE"] and conjugate.gold == [1]
    custom = ProbeFormat(template="<{text}>", answer="={label}", separator="|", transform=lambda s: s[::-1])
    assert build_probe_prompts(SHOTS[:1], QUERIES[1:], ["earn"], custom, max_words=1).prompts == [
        ">tiforp<|nrae=>skcots<"
    ]
    assert build_probe_prompts([], QUERIES[1:], ["earn"], max_words=None).prompts == ["Article: profit up\nTopic:"]


def test_shots_cover_the_labels_and_queries_are_balanced_and_disjoint() -> None:
    records = [{"text": f"{label} {i}", "label": label} for label in ("a", "b", "c") for i in range(5)]
    records.append({"text": "other", "label": "z"})
    shots, queries = select_probe_records(records, ["a", "b", "c"], shots=4, per_label=2, seed=3)
    assert [s["label"] for s in shots] == ["a", "b", "c", "a"]
    assert sorted(q["label"] for q in queries) == ["a", "a", "b", "b", "c", "c"]
    assert not {s["text"] for s in shots} & {q["text"] for q in queries}
    assert (shots, queries) == select_probe_records(records, ["a", "b", "c"], shots=4, per_label=2, seed=3)


def test_option_scores_are_summed_token_logprobs_and_accuracy_their_argmax(tiny_llama_dir: Path) -> None:
    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    model, tokenizer = module.backbone.eval(), module.tokenizer
    prompts, options = ["Review: good\nSentiment:", "a b c"], [" positive", " negative words", " x"]
    scores = option_scores(model, tokenizer, prompts, options)
    for i, prompt in enumerate(prompts):
        for k, option in enumerate(options):
            p, o = tokenizer(prompt)["input_ids"], tokenizer(option, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logprobs = model(torch.tensor([p + o])).logits[0].double().log_softmax(-1)
            expected = sum(logprobs[len(p) + j - 1, tok] for j, tok in enumerate(o))
            assert scores[i, k].item() == pytest.approx(expected.item(), abs=1e-4)

    callback = ImplicitInferenceProbes(labels=["earn", "acq", "crude"], shots=2, per_label=2, max_words=6)
    callback.setup(make_trainer(Path("."), 1), module, "fit")
    for kind in ("original", "conjugate"):
        probe = callback.probes[kind]
        assert len(probe.prompts) == 6 and sorted(probe.gold) == [0, 0, 1, 1, 2, 2]
        by_hand = option_scores(model, tokenizer, probe.prompts, probe.options).argmax(1)
        assert callback.accuracy(kind) == pytest.approx((by_hand == torch.tensor(probe.gold)).double().mean().item())
    assert callback.probes["conjugate"].prompts[0] == callback.probes["conjugate"].prompts[0].upper()


def test_fit_logs_keeps_history_writes_json_and_resumes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    def run(root: Path, ckpt: str | None = None) -> tuple[ImplicitInferenceProbes, Recorder]:
        L.seed_everything(0)
        module = CausalLMModule(model=str(tiny_llama_dir), learning_rate=5e-2, warmup_steps=0, output_dir="")
        callback = ImplicitInferenceProbes(labels=["earn", "crude"], shots=2, per_label=2, max_words=6)
        recorder = Recorder()
        trainer = make_trainer(root, 6 if ckpt is None else 10, val_check_interval=3, limit_val_batches=1,
                               enable_checkpointing=True, logger=[CSVLogger(root, name="csv"), recorder],
                               callbacks=[callback, ModelCheckpoint(dirpath=root / "ckpt", save_last=True)])  # fmt: skip
        trainer.fit(module, make_data(), ckpt_path=ckpt)
        return callback, recorder

    first, recorder = run(tmp_path)
    assert [h["step"] for h in first.history] == [0, 3, 6]  # the baseline, two validations (the last is fit end's)
    for h in first.history:
        assert 0 <= h["original_acc"] <= 1 and h["gap"] == pytest.approx(h["conjugate_acc"] - h["original_acc"])
    probes = [(step, m) for step, m in recorder.metrics if "probes/gap" in m]
    assert [step for step, _ in probes] == [0, 3, 6]
    assert probes[1][1]["probes/original_acc"] == first.history[1]["original_acc"]
    written = json.loads((tmp_path / "probes.json").read_text())
    assert (
        written["history"] == first.history
        and written["queries"] == 4
        and written["conjugate"]["transform"] == "uppercase"
    )
    logged = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"probes/original_acc", "probes/conjugate_acc", "probes/gap"} <= set(logged)
    resumed, _ = run(tmp_path, ckpt=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [h["step"] for h in resumed.history] == [0, 3, 6, 9, 10] and resumed.history[:3] == first.history


def test_bad_settings_are_refused(tiny_llama_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"shots=-1 must be 0"):
        ImplicitInferenceProbes(shots=-1)
    with pytest.raises(ValueError, match=r"per_label=0 must be at least 1"):
        ImplicitInferenceProbes(per_label=0)
    with pytest.raises(ValueError, match=r"every_n_validations=-2 must be 0"):
        ImplicitInferenceProbes(every_n_validations=-2)
    with pytest.raises(ValueError, match=r"labels=\['a', 'a'\] must name at least two distinct classes"):
        ImplicitInferenceProbes(labels=["a", "a"])
    with pytest.raises(
        ValueError, match=r"conjugate_template/conjugate_answer/conjugation transform 'french' is unknown"
    ):
        ImplicitInferenceProbes(conjugation="french")
    with pytest.raises(ValueError, match=r"template/answer must hold \{text\}"):
        ImplicitInferenceProbes(template="Article:\nTopic:")
    with pytest.raises(ValueError, match=r"template/answer may name only \{text\}"):
        ImplicitInferenceProbes(template="{title}: {text}")
    with pytest.raises(ValueError, match=r"conjugation='identity' with the original template"):
        ImplicitInferenceProbes(conjugation="identity", conjugate_template=ProbeFormat.template)
    from lightning_ft.errors import UserError

    module = CausalLMModule(model=str(tiny_llama_dir), output_dir="")
    with pytest.raises(UserError, match=r"dataset='reuters_r8' has no column 'body'"):
        ImplicitInferenceProbes(text_field="body").setup(make_trainer(Path("."), 1), module, "fit")


def test_an_encoder_classifier_is_refused_in_one_sentence(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from lightning_ft.modules import SequenceClassificationModule

    module = SequenceClassificationModule(model=str(tiny_bert_dir), num_labels=2, output_dir="")
    with pytest.raises(ValueError, match=r"^ImplicitInferenceProbes scores answer options by their log-likelihood under "
                                         r"a causal LM, and BertForSequenceClassification has no LM head: monitor an "
                                         r"AutoModelForCausalLM\.$"):
        ImplicitInferenceProbes().setup(make_trainer(tmp_path, 1), module, "fit")
