"""Representation shift: linear CKA against a numpy oracle and its invariances, an unchanged model, a planted shift,
steering with the concept shift vectors reproducing the fine-tuned model, a short SmolLM2 fit with logging, JSON and
resume, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import Recorder, make_data, make_trainer

from lightning_ft.errors import UserError
from lightning_ft.modules import CausalLMModule
from lightning_ft.monitors.representation import (
    RepresentationShift,
    concept_shift_vectors,
    kmeans,
    linear_cka,
    probe_batches,
    record_states,
)
from lightning_ft.monitors.steer import load_shifts, main, steer

TEXTS = ["the film was good", "a slow and boring story", "great acting and music", "i would not watch it again"]


def _numpy_cka(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


@pytest.mark.parametrize("n", [40, 6])  # more samples than features (d x d form) and fewer (Gram form)
def test_cka_equals_a_numpy_oracle_and_keeps_its_invariances(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, 12, generator=g), torch.randn(n, 9, generator=g)
    y = y + 0.5 * x[:, :9]
    assert linear_cka(x, y) == pytest.approx(_numpy_cka(x.double().numpy(), y.double().numpy()), rel=1e-10)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    rotation = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64)).Q
    moved = 3.7 * x.double() @ rotation + torch.randn(12, generator=g, dtype=torch.float64)
    assert linear_cka(x, moved) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, y) < 0.99


@pytest.fixture(scope="module")
def deep_llama_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama with 4 blocks (so that a planted layer has blocks before and after it)."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "deep-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(path)
    return path


def _module(path: Path) -> CausalLMModule:
    return CausalLMModule(model=str(path), warmup_steps=0, output_dir="")


def _add(model: torch.nn.Module, block: int, v: torch.Tensor) -> torch.utils.hooks.RemovableHandle:
    """The "fine-tuned" model: the base with ``v`` added to block ``block``'s output."""
    return model.model.layers[block].register_forward_hook(lambda mod, args, out: out + v)


def test_an_unchanged_model_has_cka_one_and_no_shift_at_every_layer(deep_llama_dir: Path, tmp_path: Path) -> None:
    module = _module(deep_llama_dir)
    callback, trainer = RepresentationShift(probe_texts=TEXTS, num_concepts=3), make_trainer(tmp_path, 1)
    callback.setup(trainer, module, "fit")
    callback.on_fit_start(trainer, module)
    callback.on_fit_end(trainer, module)  # no training step in between
    [entry] = callback.history
    assert entry["shift"] == [0.0] * 4 and entry["cka"] == pytest.approx([1.0] * 4, abs=1e-12)
    assert module.backbone.training and all(m.training for m in module.backbone.modules())  # train mode restored
    shifts = torch.load(tmp_path / "concept_shifts.pt", weights_only=True)
    assert shifts["layer"] == 2 and shifts["shifts"].abs().max() == 0 and shifts["centroids"].shape == (3, 32)
    assert int(shifts["counts"].sum()) == callback.base_states[0].shape[0]


def test_a_planted_vector_shifts_its_layer_by_its_norm_and_nothing_before(deep_llama_dir: Path, tmp_path: Path) -> None:
    module = _module(deep_llama_dir)
    callback, trainer = RepresentationShift(probe_texts=TEXTS), make_trainer(tmp_path, 1)
    callback.setup(trainer, module, "fit")
    callback.on_fit_start(trainer, module)
    v = torch.randn(32, generator=torch.Generator().manual_seed(3))
    _add(module.backbone, 1, v)
    entry = callback.measure()
    assert entry["shift"][0] == 0.0 and entry["cka"][0] == pytest.approx(1.0, abs=1e-12)
    assert entry["shift"][1] == pytest.approx(float(v.norm()), rel=1e-5)
    assert entry["cka"][1] == pytest.approx(1.0, abs=1e-9)  # a constant offset: CKA centres it away
    assert min(entry["shift"][2:]) > 0.01 and min(1 - c for c in entry["cka"][2:]) > 0  # later blocks move


def _shift_file(tiny_llama_dir: Path, root: Path, v: torch.Tensor) -> tuple[Path, torch.nn.Module, list[dict]]:
    """Concept shifts between the tiny Llama and itself with ``v`` added at block 0, saved as concept_shifts.pt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    batches = probe_batches(AutoTokenizer.from_pretrained(tiny_llama_dir), TEXTS)
    base = record_states(model, batches)[0]
    with _add(model, 0, v):
        tuned = record_states(model, batches)[0]
    centroids, labels = kmeans(base, 3)
    shifts, counts = concept_shift_vectors(base, tuned, labels, 3)
    torch.save({"layer": 0, "centroids": centroids, "shifts": shifts, "counts": counts}, root / "concept_shifts.pt")
    return root / "concept_shifts.pt", model, batches


def test_steering_the_base_with_the_shift_vectors_reproduces_the_fine_tuned_logits(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoTokenizer

    v = 0.5 * torch.randn(32, generator=torch.Generator().manual_seed(4))
    file, model, batches = _shift_file(tiny_llama_dir, tmp_path, v)
    shifts = load_shifts(file)
    assert torch.allclose(shifts["shifts"], v.expand(3, -1), atol=1e-5)  # every concept moved by v
    inputs = {k: batches[0][k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        base = model(**inputs).logits
        with _add(model, 0, v):
            tuned = model(**inputs).logits
        for concept in (0, 2, None):
            with steer(model, shifts, concept=concept):
                steered = model(**inputs).logits
            assert torch.allclose(steered, tuned, atol=1e-5) and not torch.allclose(steered, base, atol=1e-3)
        assert torch.equal(model(**inputs).logits, base)  # the hook is gone
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = tokenizer("the film was", return_tensors="pt")
    with _add(model, 0, v), torch.no_grad():
        ids = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(ids[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    argv = ["--model", str(tiny_llama_dir), "--shifts", str(file), "--prompt", "the film was", "--max-new-tokens", "6"]
    assert main(argv + ["--concept", "1"]) == 0 and main(argv + ["--all"]) == 0
    assert capsys.readouterr().out == f"{expected}\n{expected}\n"


def test_a_fit_measures_after_every_nth_validation_and_at_the_end(tiny_llama_dir: Path, tmp_path: Path) -> None:
    logger = Recorder()
    callback = RepresentationShift(probe_texts=TEXTS, every_n_validations=2, filename=None, shifts_filename=None)
    trainer = make_trainer(tmp_path, 5, val_check_interval=1, limit_val_batches=1, logger=logger, callbacks=[callback])
    trainer.fit(CausalLMModule(model=str(tiny_llama_dir), learning_rate=1e-2, warmup_steps=0, output_dir=""),
                make_data(max_length=24))  # fmt: skip
    assert [h["step"] for h in callback.history] == [2, 4, 5]
    assert min(callback.history[-1]["cka"]) < 1 and not list(tmp_path.glob("*.json")) + list(tmp_path.glob("*.pt"))
    logged = [(step, m) for step, m in logger.metrics if "representation/cka_layer_01" in m]
    assert [step for step, _ in logged] == [2, 4, 5] and "representation/shift_layer_00" in logged[0][1]


@pytest.mark.slow
def test_smollm2_fit_logs_cka_below_one_writes_json_and_resumes(smollm2_dir: Path, tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    def run(steps: int, ckpt: str | None = None) -> RepresentationShift:
        L.seed_everything(0)  # LoRA: a small checkpoint
        module = CausalLMModule(model=str(smollm2_dir), learning_rate=2e-3, warmup_steps=0, output_dir="",
                                peft={"r": 4, "target_modules": ["q_proj", "v_proj"]})  # fmt: skip
        callback = RepresentationShift(probe_texts=TEXTS, every_n_validations=0)
        trainer = make_trainer(tmp_path, steps, logger=CSVLogger(tmp_path, name="csv"), callbacks=[callback])
        trainer.fit(module, make_data(max_length=32, batch_size=2), ckpt_path=ckpt)
        trainer.save_checkpoint(tmp_path / "last.ckpt")
        return callback

    first = run(2)
    assert [h["step"] for h in first.history] == [2] and len(first.history[0]["cka"]) == 30
    assert min(first.history[0]["cka"]) < 1 - 1e-6 and max(first.history[0]["shift"]) > 0
    written = json.loads((tmp_path / "representation.json").read_text())
    assert written["history"] == first.history and written["concept_layer"] == 15
    logged = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"representation/cka_layer_00", "representation/shift_layer_29"} <= set(logged)
    assert load_shifts(tmp_path / "concept_shifts.pt")["shifts"].shape == (4, 576)
    resumed = run(3, ckpt=str(tmp_path / "last.ckpt"))
    assert [h["step"] for h in resumed.history] == [2, 3] and resumed.history[0] == first.history[0]
    assert all(torch.equal(a, b) for a, b in zip(resumed.base_states, first.base_states))  # the true base, restored


def test_bad_settings_are_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"probe_texts must be a non-empty list"):
        RepresentationShift(probe_texts=[])
    with pytest.raises(ValueError, match=r"every_n_validations=-1 must be 0"):
        RepresentationShift(every_n_validations=-1)
    with pytest.raises(ValueError, match=r"concept_layer=-1 must be a block index"):
        RepresentationShift(concept_layer=-1)
    with pytest.raises(ValueError, match=r"num_concepts=0 must be at least 1"):
        RepresentationShift(num_concepts=0)
    with pytest.raises(ValueError, match=r"max_length=0 and batch_size=8 must both be at least 1"):
        RepresentationShift(max_length=0)
    module = _module(tiny_llama_dir)
    with pytest.raises(ValueError, match=r"concept_layer=2 is not a block of this 2-block model: give .* 0 to 1"):
        RepresentationShift(concept_layer=2).setup(make_trainer(tmp_path, 1), module, "fit")
    with pytest.raises(ValueError, match=r"num_concepts=500 exceeds the \d+ probe tokens"):
        RepresentationShift(num_concepts=500).setup(make_trainer(tmp_path, 1), module, "fit")


def test_an_encoder_classifier_is_refused_in_one_sentence(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from lightning_ft.modules import SequenceClassificationModule

    module = SequenceClassificationModule(model=str(tiny_bert_dir), num_labels=2, output_dir="")
    with pytest.raises(ValueError, match=r"^RepresentationShift needs a causal LM .* which BertForSequenceClassification "
                                         r"does not expose: use a Llama/Mistral/Qwen2/GPT-2-style AutoModelForCausalLM\.$"):
        RepresentationShift().setup(make_trainer(tmp_path, 1), module, "fit")


def test_steer_refusals_are_one_sentence(tiny_llama_dir: Path, tmp_path: Path) -> None:
    file, _, _ = _shift_file(tiny_llama_dir, tmp_path, torch.ones(32))
    argv = ["--model", str(tiny_llama_dir), "--prompt", "hi"]
    with pytest.raises(UserError, match=r"--shifts .* is not a file"):
        main(argv + ["--shifts", str(tmp_path / "missing.pt")])
    (tmp_path / "other.pt").write_bytes(b"not a tensor file")
    with pytest.raises(UserError, match=r"--shifts .* is not a saved tensor file"):
        main(argv + ["--shifts", str(tmp_path / "other.pt")])
    torch.save({"weights": torch.ones(2)}, tmp_path / "weights.pt")
    with pytest.raises(UserError, match=r"--shifts .* holds no concept shift vectors"):
        main(argv + ["--shifts", str(tmp_path / "weights.pt")])
    with pytest.raises(UserError, match=r"concept 3 is not one of the 3 concepts .* from 0 to 2"):
        main(argv + ["--shifts", str(file), "--concept", "3"])
    with pytest.raises(UserError, match=r"--max-new-tokens 0 must be at least 1"):
        main(argv + ["--shifts", str(file), "--max-new-tokens", "0"])
    with pytest.raises(UserError, match=r"not allowed with argument"):
        main(argv + ["--shifts", str(file), "--concept", "1", "--all"])
    wide = torch.load(file, weights_only=True) | {"shifts": torch.zeros(3, 64), "centroids": torch.zeros(3, 64)}
    torch.save(wide, tmp_path / "wide.pt")
    with pytest.raises(UserError, match=r"hidden size 64, which this 2-block model with hidden size 32 does not match"):
        main(argv + ["--shifts", str(tmp_path / "wide.pt")])
