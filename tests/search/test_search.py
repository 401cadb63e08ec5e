"""``lightning-ft search`` (AutoPEFT) on the tiny Llama: one search of real in-process fits shared by the tests
(2 trials, then resumed to 4), its Pareto front and front YAMLs, the trainable-parameter objective against a hand
count, failed and interrupted trials (parallel subprocess trials of a stand-in fit), one sentence per mistake, and one
low-fidelity trial of the shipped config on the bundled SmolLM2 (its grouped-query adapter count)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from lightning_ft.cli import main
from lightning_ft.search import front, trial
from lightning_ft.search import study as study_module
from lightning_ft.search.space import default_space, load_space
from lightning_ft.search.study import STUDY_NAME

# the tiny Llama (hidden 32, FFN 64, 4 heads of 8, 2 KV heads): LoRA parameters per layer and rank
ATTN_PER_RANK = (32 + 32) + (32 + 16) + (32 + 16) + (32 + 32)  # q, k, v, o: r * (in + out)
FFN_PER_RANK = 3 * (32 + 64)  # gate, up, down


def _base(root: Path, model: Path, data: Path, **model_args: Any) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 4, "limit_val_batches": 2, "num_sanity_val_steps": 0,
                    "log_every_n_steps": 1, "val_check_interval": 4, "check_val_every_n_epoch": None},
        "model": {"class_path": "lightning_ft.modules.CausalLMModule",
                  "init_args": {"model": str(model), "learning_rate": 1e-3, "warmup_steps": 1, "max_new_tokens": 2,
                                "peft": {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
                                **model_args}},
        "data": {"class_path": "lightning_ft.data.InstructionDataModule",
                 "init_args": {"dataset": str(data), "label_options": ["positive", "negative"], "train_size": 16,
                               "val_size": 8, "test_size": 0, "batch_size": 4, "eval_batch_size": 8, "max_length": 40,
                               "control_size": 0}},
    }  # fmt: skip
    path = root / "base.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _study(out: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}")


def _trial_dirs(out: Path) -> set[str]:
    return {p.name for p in (out / "trials").iterdir()}


def _hand_count(choices: dict[str, Any]) -> int:
    return len(choices["layers"]) * (choices["attn_rank"] * ATTN_PER_RANK + choices["ffn_rank"] * FFN_PER_RANK)


@dataclass
class Search:
    out: Path
    base: Path
    first_dirs: set[str]
    first_trials: list[optuna.trial.FrozenTrial]


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, sentiment_jsonl: Path) -> Search:
    """2 trials of 2 steps, then the same command with --trials 4 (in-process fits)."""
    root = tmp_path_factory.mktemp("search")
    base = _base(root, tiny_llama_dir, sentiment_jsonl)
    out = root / "out"
    argv = ["search", "--config", str(base), "--out", str(out), "--trial-steps", "2", "--trial-val-batches", "1",
            "--ranks", "0,2,4", "--sampler", "random"]  # fmt: skip
    main([*argv, "--trials", "2"])
    first_dirs, first_trials = _trial_dirs(out), _study(out).trials
    main([*argv, "--trials", "4"])
    return Search(out, base, first_dirs, first_trials)


def test_resume_runs_only_the_missing_trials(search: Search) -> None:
    study = _study(search.out)
    ended = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)]
    assert len(ended) == 4 and len(search.first_dirs) == 2
    new = [t for t in ended if t.number not in {f.number for f in search.first_trials}]
    assert len(new) == 2  # exactly two more trials; each fitted unless a completed trial had measured its config
    fitted = {f"trial-{t.number:04d}" for t in new if "duplicate_of" not in t.user_attrs}
    assert _trial_dirs(search.out) - search.first_dirs == fitted
    before = {t.number: t.datetime_complete for t in search.first_trials}
    assert all(study.trials[n].datetime_complete == done for n, done in before.items())  # the first ones kept


def test_front_is_the_non_dominated_completed_trials(search: Search) -> None:
    completed = [t for t in _study(search.out).trials if t.state == optuna.trial.TrialState.COMPLETE]
    first = {json.dumps(t.params, sort_keys=True): t.number for t in reversed(completed)}
    completed = [t for t in completed if first[json.dumps(t.params, sort_keys=True)] == t.number]  # once per config
    assert completed, "the tiny search must complete trials"
    rows = json.loads((search.out / "front.json").read_text())
    assert rows
    on_front = {row["trial"] for row in rows}
    for t in completed:
        dominated = any(o.values[0] <= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values
                        for o in completed)  # fmt: skip
        assert (t.number in on_front) == (not dominated), f"trial {t.number} {t.values}"
    for row in rows:
        t = _study(search.out).trials[row["trial"]]
        assert row["val/target_loss"] == t.values[0] and row["trainable_params"] == t.values[1]
    table = (search.out / "front.md").read_text()
    assert all(f"| {n} |" in table for n in on_front)
    assert (search.out / "front.csv").read_text().count("\n") == len(rows) + 1
    assert (search.out / "front.png").stat().st_size > 0


def test_front_yamls_run_at_full_fidelity(search: Search, tmp_path: Path) -> None:
    base = yaml.safe_load(search.base.read_text())
    rows = json.loads((search.out / "front.json").read_text())
    for row in rows:
        path = Path(row["yaml"])
        config = yaml.safe_load(path.read_text())
        assert config["trainer"] == base["trainer"]  # no low-fidelity overrides, no TrialResult callback
        assert config["model"]["init_args"]["peft"] == row["peft"]
        name = path.stem
        main(["fit", "--config", str(path), "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path),
              "--run_name", name, "--wandb", "disabled"])  # fmt: skip
        assert (tmp_path / name / "hf_model" / "adapter_config.json").is_file()


def test_trainable_objective_is_the_built_models_count(search: Search, tiny_llama_dir: Path) -> None:
    from lightning_ft.modules import CausalLMModule

    space = default_space(2, ranks=(0, 2, 4))
    params = {"layers_0": False, "layers_1": True, "attn_rank": 2, "ffn_rank": 4}
    peft = space.peft(params, {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0})
    assert peft["layers_to_transform"] == [1] and peft["alpha_pattern"]["gate_proj"] == 8 and peft["lora_dropout"] == 0
    module = CausalLMModule(model=str(tiny_llama_dir), peft=peft)
    built = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert built == 2 * ATTN_PER_RANK + 4 * FFN_PER_RANK == 1600
    for t in _study(search.out).trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert t.values[1] == _hand_count(t.user_attrs["choices"]), t.user_attrs["choices"]


FAKE_FIT = """
import json, sys, yaml
config = yaml.safe_load(open(sys.argv[-1]))
peft = config["model"]["init_args"]["peft"]
ranks = peft["rank_pattern"]
if peft["layers_to_transform"] == [0]:
    sys.exit(3)  # a crash
trainable = len(peft["layers_to_transform"]) * sum(ranks.values())
metric = None if ranks.get("q_proj") == 2 else 1.0 / (1 + trainable)  # NaN, which JSON writes as null
path = next(c["init_args"]["path"] for c in config["trainer"]["callbacks"] if c["class_path"].endswith("TrialResult"))
json.dump({"metrics": {"val/target_loss": metric}, "trainable_params": trainable}, open(path, "w"))
"""


def _expected(choices: dict[str, Any]) -> str:
    if choices["layers"] == [0]:
        return "FAIL"
    return "FAIL" if choices["attn_rank"] == 2 else "COMPLETE"


def test_failed_and_interrupted_trials_are_recorded(tmp_path: Path, tiny_llama_dir: Path, sentiment_jsonl: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    fake = tmp_path / "fake_fit.py"
    fake.write_text(FAKE_FIT)
    monkeypatch.setattr(trial, "fit_command", lambda config: [sys.executable, str(fake), str(config)])
    base, out = _base(tmp_path, tiny_llama_dir, sentiment_jsonl), tmp_path / "out"
    argv = ["search", "--config", str(base), "--out", str(out), "--jobs", "2", "--ranks", "0,2,4", "--seed", "3",
            "--sampler", "random"]  # fmt: skip
    main([*argv, "--trials", "6"])
    left_running = _study(out).ask()  # a search that died during this trial
    main([*argv, "--trials", "8"])
    study = _study(out)
    stale = study.trials[left_running.number]
    assert stale.state == optuna.trial.TrialState.FAIL and "interrupted" in stale.user_attrs["error"]
    ran = [t for t in study.trials if "peft" in t.user_attrs]
    assert len(ran) == 7  # 6, then one more: the interrupted trial counts as failed
    states = {t.number: (t.state.name, _expected(t.user_attrs["choices"])) for t in ran}
    assert all(state == expected for state, expected in states.values()), states
    assert {"FAIL", "COMPLETE"} <= {state for state, _ in states.values()}
    reasons = {t.user_attrs["error"].split(":")[0] for t in ran if t.state.name == "FAIL"}
    assert reasons <= {"exit status 3", "val/target_loss is NaN or infinite"}
    rows = json.loads((out / "front.json").read_text())
    assert rows and len({json.dumps(r["peft"], sort_keys=True) for r in rows}) == len(rows)  # each config once


def test_sigterm_stops_an_in_process_search(tmp_path: Path, tiny_llama_dir: Path, sentiment_jsonl: Path,
                                            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    def fit_like_lightning(config: Path, log: Path) -> str:
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during the fit
            time.sleep(5)
        except KeyboardInterrupt:  # Lightning's answer: a graceful shutdown, then exit status 1
            return "exit status 1: the fit failed"
        return "the signal did not arrive"

    monkeypatch.setattr(study_module, "run_in_process", fit_like_lightning)
    handler = signal.getsignal(signal.SIGTERM)
    base = _base(tmp_path, tiny_llama_dir, sentiment_jsonl)
    with pytest.raises(SystemExit) as exit_info:
        main(["search", "--config", str(base), "--out", str(tmp_path / "out"), "--trials", "3"])
    assert exit_info.value.code == 130 and "search: error: interrupted." in capsys.readouterr().err
    assert [
        (t.state.name, t.user_attrs["error"]) for t in _study(tmp_path / "out").trials if "peft" in t.user_attrs
    ] == [("FAIL", "interrupted")]
    assert signal.getsignal(signal.SIGTERM) is handler  # put back


def test_pareto_front_oracle() -> None:
    points = [front.FrontPoint(n, m, k, {}, {}) for n, (m, k) in enumerate([(1.0, 10), (0.5, 20), (0.6, 30), (1.0, 5),
                                                                             (0.5, 20), (2.0, 1)])]  # fmt: skip
    assert [p.number for p in front.pareto_front(points)] == [5, 3, 1, 4]
    assert [p.number for p in front.pareto_front(points, maximize=True)] == [5]  # the largest metric, fewest params
    points = [front.FrontPoint(n, m, k, {}, {}) for n, (m, k) in enumerate([(1.0, 10), (2.0, 20), (1.5, 30)])]
    assert [p.number for p in front.pareto_front(points, maximize=True)] == [0, 1]
    assert [p.number for p in front.pareto_front(points)] == [0]


def test_space_file_prefix_length(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text("peft_type: PREFIX_TUNING\ndimensions:\n"
                    "  - {name: prefix_length, kind: value, key: num_virtual_tokens, choices: [1, 4, 8]}\n")  # fmt: skip
    space = load_space(path, num_layers=2)
    assert space.peft({"prefix_length": 4}, None) == {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}
    path.write_text("dimensions:\n  - {name: attn, kind: rank, modules: [q_proj], choices: [0, 4]}\n")
    with pytest.raises(ValueError, match="rank choices|are LoRA choices"):
        load_space(path, num_layers=2, default_peft_type="PREFIX_TUNING")


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-ft search: error:")]
    assert len(lines) == 1, lines
    return int(exit_info.value.code or 0), lines[0].split(": error: ", 1)[1]


@pytest.mark.parametrize(
    ("options", "code", "sentence"),
    [
        (["--trials", "0"], 2, "--trials must be at least 1 (got 0)."),
        (["--ranks", "2,x"], 2, "--ranks takes distinct non-negative integers separated by commas"),
        (["--ranks", "0,0"], 2, "--ranks takes distinct non-negative integers"),
        (["--attention-modules", "attn.c_attn"], 1, "has no module named attn.c_attn: give its projections' names"),
        (["--space", "s.yaml", "--ranks", "2"], 2, "--space replaces the default space, so --ranks does not apply"),
    ],
)
def test_bad_options(options: list[str], code: int, sentence: str, tmp_path: Path, tiny_llama_dir: Path,
                     sentiment_jsonl: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    base = _base(tmp_path, tiny_llama_dir, sentiment_jsonl)
    found = _error(capsys, ["search", "--config", str(base), "--out", str(tmp_path / "out"), *options])
    assert found[0] == code and sentence in found[1], found


def test_an_input_inside_the_search_folder_is_refused(
    tmp_path: Path, tiny_llama_dir: Path, sentiment_jsonl: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = _base(tmp_path, tiny_llama_dir, sentiment_jsonl)
    code, sentence = _error(capsys, ["search", "--config", str(base), "--out", str(tmp_path)])
    assert code == 1 and sentence == (f"--config {base} lies inside --out {tmp_path}, where the search writes its "
                                      "trials and front: give another --out, or move the file.")  # fmt: skip
    assert not (tmp_path / "study.db").exists()


def test_base_config_without_peft_module(
    tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "user.yaml"
    base.write_text(yaml.safe_dump({"model": {"class_path": "helpers.UserModule",
                                              "init_args": {"path": str(tiny_llama_dir)}}}))  # fmt: skip
    code, sentence = _error(capsys, ["search", "--config", str(base)])
    assert code == 1 and sentence == (f"--config {base}: UserModule takes no peft argument, so a search has nothing to "
                                      "configure: use a module with one, e.g. lightning_ft.modules.CausalLMModule.")  # fmt: skip


def test_unknown_metric_after_the_trial(tmp_path: Path, tiny_llama_dir: Path, sentiment_jsonl: Path,
                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    def fit(config: Path, log: Path) -> None:  # what TrialResult writes after a fit of the CausalLMModule
        result = {"metrics": {"train/loss": 5.8, "val/target_acc": 0.5, "val/target_loss": 35.0}, "trainable_params": 9}
        (config.parent / "trial_result.json").write_text(json.dumps(result))

    monkeypatch.setattr(study_module, "run_in_process", fit)
    base = _base(tmp_path, tiny_llama_dir, sentiment_jsonl)
    argv = ["search", "--config", str(base), "--out", str(tmp_path / "out"), "--trials", "3", "--metric", "val_loss"]
    code, sentence = _error(capsys, argv)
    assert code == 1 and sentence == ("--metric val_loss is not a metric the trials log (they log: train/loss, "
                                      "val/target_acc, val/target_loss): pass one of them.")  # fmt: skip
    assert [t.state.name for t in _study(tmp_path / "out").trials if "peft" in t.user_attrs] == ["FAIL"]  # stopped


def test_missing_optuna(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)
    base = tmp_path / "base.yaml"
    base.write_text("model: {init_args: {model: x}}\n")
    code, sentence = _error(capsys, ["search", "--config", str(base)])
    assert code == 1 and "pip install optuna" in sentence


@pytest.mark.slow
def test_a_search_on_smollm2_counts_its_grouped_query_adapters(tmp_path: Path, sentiment_jsonl: Path) -> None:
    """One low-fidelity trial of the shipped config on the bundled SmolLM2 (30 layers, hidden 576, FFN 1536, k/v 192)."""
    base = yaml.safe_load(Path("configs/autopeft_search.yaml").read_text())
    base["data"]["init_args"].update(dataset=str(sentiment_jsonl), label_field="label", train_size=16, val_size=8,
                                     test_size=0, control=None, control_size=0, batch_size=4, max_length=40)  # fmt: skip
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    out = tmp_path / "out"
    main(["search", "--config", str(path), "--out", str(out), "--trials", "1", "--trial-steps", "2",
          "--trial-val-batches", "1", "--ranks", "2,4", "--sampler", "random"])  # fmt: skip
    (done,) = _study(out).trials
    choices = done.user_attrs["choices"]  # r * (in + out) per projection: q, o 576 -> 576; k, v 576 -> 192 (GQA)
    per_layer = choices["attn_rank"] * (2 * (576 + 576) + 2 * (576 + 192)) + choices["ffn_rank"] * 3 * (576 + 1536)
    assert done.state.name == "COMPLETE" and done.values[1] == len(choices["layers"]) * per_layer
    assert 0 < done.values[0] < 20  # a finite answer loss
