"""Bad inputs through the real ``lightning-ft`` entry point, in-process on a tiny model.

Every row is answered with exactly one line ``lightning-ft <command>: error: <sentence>`` on stderr, as the last
line, with exit status 2 for a command-line mistake (then the usage line above it) and 1 otherwise, and no
traceback. A run folder that holds a run is never written over (its files and the inputs stay byte-identical);
``--ckpt_path`` continues it. ``--debug`` / ``LIGHTNING_FT_DEBUG`` show the traceback; an internal error keeps it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch  # noqa: F401  (imported here, not inside a captured test: it binds its log handler to stderr)
import pytest
import torch
import yaml

from lightning_ft.cli import COMMANDS, main

ROOT = "{ws}"
BASE = ["--config", f"{ROOT}/base.yaml"]


def _write_yaml(path: Path, data: Any) -> None:
    path.write_text(yaml.safe_dump(data))


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """A workspace: a base config on the tiny model and a small JSONL file, and one bad file of each kind."""
    from lightning_ft.assets import load_dataset_records

    root = tmp_path_factory.mktemp("bad_inputs")
    rows = load_dataset_records("rotten_tomatoes", shuffle_seed=3)[:40]
    lines = [json.dumps({"text": r["text"][:80], "label": r["label"]}) for r in rows]
    (root / "reviews.jsonl").write_text("\n".join(lines) + "\n")
    broken = list(lines)
    broken[17] = '{"text": "a fine film!" "label": "positive"}'  # line 18, column 25: the missing comma
    (root / "broken.jsonl").write_text("\n".join(broken) + "\n")
    (root / "binary.csv").write_bytes(b"text,label\n\x89PNG\r\n\x1a\n,positive\n")
    _write_yaml(root / "base.yaml", {
        "seed_everything": 0, "wandb": "disabled",
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 1, "default_root_dir": str(root / "runs"),
                    "limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_model_summary": False,
                    "enable_progress_bar": False},
        "model": {"class_path": "lightning_ft.modules.CausalLMModule",
                  "init_args": {"model": str(tiny_llama_dir), "warmup_steps": 0, "output_dir": ""}},
        "data": {"class_path": "lightning_ft.data.InstructionDataModule",
                 "init_args": {"dataset": str(root / "reviews.jsonl"), "label_options": ["positive", "negative"],
                               "train_size": 8, "val_size": 4, "test_size": 0, "batch_size": 4, "control_size": 0,
                               "max_length": 32}},
    })  # fmt: skip
    (root / "bad.yaml").write_text("trainer:\n  max_steps: [1\n")
    (root / "list.yaml").write_text("- fit\n- quickly\n")
    (root / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    _write_yaml(root / "typo_key.yaml", {"trainer": {"max_stepz": 3}})
    _write_yaml(root / "typo_class.yaml", {"trainer": {"callbacks": [{"class_path": "HalfFineTunning"}]}})
    _write_yaml(root / "typo_arg.yaml", {"trainer": {"callbacks": [{"class_path": "HalfFineTuning",
                                                                      "init_args": {"redraww": "epoch"}}]}})  # fmt: skip
    (root / "yes_no.yaml").write_text("data:\n  init_args:\n    label_options: [yes, no]\n")
    (root / "numbers.yaml").write_text("data:\n  init_args:\n    label_options: [1, 0]\n")
    (root / "peft_list.yaml").write_text("model:\n  init_args:\n    peft: [8, 16]\n")
    (root / "template.yaml").write_text("data:\n  init_args:\n    prompt_template: 'Q: {question}'\n")
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "lightning_ft.modules.SequenceClassificationModule",
                                                        "model": "minilm-l6"}}, root / "classifier.ckpt")  # fmt: skip
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "lightning_ft.modules.CausalLMModule",
                                                        "model": str(root / "another-model")}}, root / "other.ckpt")  # fmt: skip
    torch.save({"weights": torch.zeros(2)}, root / "plain.ckpt")
    (root / "notes.ckpt").write_text("not a checkpoint")
    (root / "old-run" / "checkpoints").mkdir(parents=True)
    for name in ("epoch=0-step=9.ckpt", "last.ckpt"):
        (root / "old-run" / "checkpoints" / name).write_bytes(b"")
    return root


# (id, command line, exit status, the sentence, or a part of it)
ROWS: list[tuple[str, list[str], int, str]] = [
    # ---- the command line and the config file (exit 2)
    ("no-command", [], 2, "a command is needed: one of fit, validate, test, predict, merge"),
    ("unknown-command", ["fitt", *BASE], 2, "'fitt' is not a command (commands: fit, validate, test, predict, merge, "
                                            "compress, decompress, sparse-apply, estimate, search, spin, self-train, "
                                            "explore-novelty, data, mitigate-intruders, analyze-shift, steer, compare): did you mean fit?"),
    ("config-missing", ["fit", "--config", f"{ROOT}/nowhere.yaml"], 2, "--config {ws}/nowhere.yaml does not exist."),
    ("config-bad-yaml", ["fit", "--config", f"{ROOT}/bad.yaml"], 2, "--config {ws}/bad.yaml is not valid YAML: "),
    ("config-list", ["fit", "--config", f"{ROOT}/list.yaml"], 2, "--config {ws}/list.yaml must hold a mapping of "
                                                                 "options (trainer:, model:, data:, ...), not a list."),
    ("config-binary", ["fit", "--config", f"{ROOT}/binary.yaml"], 2, "--config {ws}/binary.yaml is not a readable "
                                                                     "text file."),
    ("config-folder", ["fit", "--config", ROOT], 2, "--config {ws} is a folder: give a YAML file."),
    ("option-typo", ["fit", *BASE, "--trainer.max_stepz", "3"], 2,
     "--trainer.max_stepz is not an option of lightning-ft fit: did you mean --trainer.max_steps?"),
    ("config-key-typo", ["fit", *BASE, "--config", f"{ROOT}/typo_key.yaml"], 2,
     "trainer.max_stepz (in the config) is not an option of lightning-ft fit: did you mean trainer.max_steps?"),
    ("not-an-integer", ["fit", *BASE, "--trainer.max_steps", "many"], 2, "trainer.max_steps must be an integer "
                                                                         "(got many)."),
    ("not-a-number", ["fit", *BASE, "--model.init_args.learning_rate", "fast"], 2,
     "model.init_args.learning_rate must be a number (got fast)."),
    ("not-a-choice", ["fit", *BASE, "--model.init_args.dtype", "float64"], 2,
     "model.init_args.dtype must be one of 'float32', 'bfloat16', 'float16' (got float64)."),
    ("bad-precision", ["fit", *BASE, "--trainer.precision", "17"], 2, "trainer.precision must be one of 64, 32, 16, "),
    ("bad-seed", ["fit", *BASE, "--seed_everything", "abc"], 2, "seed_everything must be true or false or an integer "
                                                                "(got abc)."),
    ("class-typo", ["fit", *BASE, "--model.class_path", "CausalLMModul"], 2,
     "model: 'CausalLMModul' is not a class lightning-ft knows: did you mean CausalLMModule?"),
    ("callback-typo", ["fit", *BASE, "--trainer.callbacks+=HalfFineTunning"], 2,
     "trainer.callbacks: 'HalfFineTunning' is not a class lightning-ft knows: did you mean HalfFineTuning?"),
    ("callback-typo-yaml", ["fit", *BASE, "--config", f"{ROOT}/typo_class.yaml"], 2,
     "'HalfFineTunning' is not a class lightning-ft knows: did you mean HalfFineTuning?"),
    ("no-such-module", ["fit", *BASE, "--model.class_path", "my_project.Model"], 2,
     "model: there is no module 'my_project' to import the class from"),
    ("callback-as-model", ["fit", *BASE, "--model", "lightning_ft.callbacks.HalfFineTuning"], 2,
     "model: lightning_ft.callbacks.HalfFineTuning is not a LightningModule: name one, e.g. "),
    ("module-as-data", ["fit", *BASE, "--data", "lightning_ft.modules.CausalLMModule"], 2,
     "data: lightning_ft.modules.CausalLMModule is not a LightningDataModule: name one, e.g. "),
    ("argument-typo", ["fit", *BASE, "--model.init_args.modle", "x"], 2,
     "model: CausalLMModule has no argument 'modle': did you mean 'model'?"),
    ("callback-argument-typo", ["fit", *BASE, "--config", f"{ROOT}/typo_arg.yaml"], 2,
     "trainer.callbacks: HalfFineTuning has no argument 'redraww': did you mean 'redraw'?"),
    ("yaml-booleans", ["fit", *BASE, "--config", f"{ROOT}/yes_no.yaml"], 2,
     "data.init_args.label_options must be a list of strings (got [True, False]): YAML reads yes/no/on/off/true/false "
     "without quotes as booleans: quote them, e.g. 'yes'."),
    ("yaml-numbers", ["fit", *BASE, "--config", f"{ROOT}/numbers.yaml"], 2,
     "data.init_args.label_options must be a list of strings (got [1, 0]): YAML read an item as a number: put the "
     "text in quotes."),
    ("peft-not-a-mapping", ["fit", *BASE, "--config", f"{ROOT}/peft_list.yaml"], 2,
     "model.init_args.peft must be a mapping (got [8, 16])."),
    ("scheduler-argument-missing", ["fit", *BASE, "--lr_scheduler", "StepLR"], 2,
     "lr_scheduler: StepLR needs step_size: give lr_scheduler.init_args.step_size."),
    # ---- values our constructors and Lightning refuse (exit 1)
    ("negative-learning-rate", ["fit", *BASE, "--model.init_args.learning_rate", "-1"], 1,
     "learning_rate=-1.0 must be positive."),
    ("zero-batch-size", ["fit", *BASE, "--data.init_args.batch_size", "0"], 1, "batch_size=0 and eval_batch_size=16 "
                                                                               "must be at least 1."),
    ("callback-value", ["fit", *BASE, "--trainer.callbacks+=HalfFineTuning", "--trainer.callbacks.redraw", "steps"], 1,
     "every_n_steps=None goes with redraw='steps' only and must be a positive integer there."),
    ("no-tasks", ["fit", *BASE, "--data", "lightning_ft.data.sequential.SequentialDataModule",
                  "--data.init_args.tasks", "[]"], 1, "tasks is empty: give one mapping of InstructionDataModule "
                                                      "arguments per task."),
    ("model-missing", ["fit", *BASE, "--model.init_args.model", f"{ROOT}/no-model"], 1,
     "model='{ws}/no-model' is neither a bundled alias (minilm-l6, smollm2-135m) nor a local folder"),
    ("encoder-as-causal-lm", ["fit", *BASE, "--model.init_args.model", "minilm-l6"], 1,
     "model='minilm-l6' is an encoder, not a causal language model: fine-tune it with SequenceClassificationModule"),
    ("quantization-without-peft", ["fit", *BASE, "--model.init_args.quantization", "nf4"], 1,
     "quantization='nf4' freezes the backbone in 4/8 bit, so nothing would train: also set peft"),
    ("wandb-mode", ["fit", *BASE, "--wandb", "sometimes"], 1, "--wandb sometimes is not a W&B mode: use auto, online, "
                                                              "offline or disabled."),
    ("accelerator-name", ["fit", *BASE, "--trainer.accelerator", "tpu9"], 1, "invalid accelerator name"),
    ("negative-max-steps", ["fit", *BASE, "--trainer.max_steps", "-5"], 1, "`max_steps` must be a non-negative "
                                                                           "integer or -1"),
    # ---- refusals of the support matrix, before Lightning's own checks (exit 1)
    ("fsdp-half", ["fit", *BASE, "--trainer.strategy", "fsdp", "--trainer.callbacks+=HalfFineTuning"], 1,
     "HalfFineTuning does not run under FSDPStrategy, which flattens the parameters into sharded pieces: use "
     "strategy='fsdp2' (Lightning's ModelParallelStrategy with FSDP2) or strategy='ddp'."),
    ("deepspeed-sparse", ["fit", *BASE, "--trainer.strategy", "deepspeed_stage_3", "--trainer.callbacks+=SparseFineTuning",
                          "--trainer.callbacks.rule", "Magnitude"], 1,
     "SparseFineTuning does not run under DeepSpeedStrategy, which flattens the parameters into sharded pieces"),
    # ---- checkpoints (exit 1, before the model loads)
    ("ckpt-missing", ["fit", *BASE, "--ckpt_path", f"{ROOT}/last.ckpt"], 1,
     "--ckpt_path {ws}/last.ckpt does not exist: --ckpt_path takes the .ckpt file of a run"),
    ("ckpt-weights-file", ["validate", *BASE, "--ckpt_path", "{model}/model.safetensors"], 1,
     "--ckpt_path {model}/model.safetensors is a weights file, not a Lightning checkpoint: load the model folder that "
     "holds it with --model.init_args.model {model}"),
    ("ckpt-hf-folder", ["fit", *BASE, "--ckpt_path", "{model}"], 1,
     "--ckpt_path {model} is a Hugging Face model folder, not a Lightning checkpoint: load it with "
     "--model.init_args.model {model}"),
    ("ckpt-run-folder", ["fit", *BASE, "--ckpt_path", f"{ROOT}/old-run"], 1,
     "--ckpt_path {ws}/old-run is a folder, not a checkpoint: give a .ckpt file in it, e.g. "
     "{ws}/old-run/checkpoints/last.ckpt."),
    ("ckpt-unreadable", ["test", *BASE, "--ckpt_path", f"{ROOT}/notes.ckpt"], 1,
     "--ckpt_path {ws}/notes.ckpt is not a Lightning checkpoint (torch.load cannot read it)"),
    ("ckpt-no-state", ["fit", *BASE, "--ckpt_path", f"{ROOT}/plain.ckpt"], 1,
     "--ckpt_path {ws}/plain.ckpt is not a Lightning checkpoint (no state_dict in it)"),
    ("ckpt-other-class", ["fit", *BASE, "--ckpt_path", f"{ROOT}/classifier.ckpt"], 1,
     "--ckpt_path {ws}/classifier.ckpt is a checkpoint of SequenceClassificationModule, but the config gives "
     "CausalLMModule: pass the config that trained it, or a checkpoint of this config's model."),
    ("ckpt-other-model", ["predict", *BASE, "--ckpt_path", f"{ROOT}/other.ckpt"], 1,
     "--ckpt_path {ws}/other.ckpt is a checkpoint of model='{ws}/another-model', but the config gives model='{model}'"),
    # ---- data files (exit 1)
    ("dataset-missing", ["fit", *BASE, "--data.init_args.dataset", f"{ROOT}/nowhere.jsonl"], 1,
     "dataset='{ws}/nowhere.jsonl' is neither a bundled dataset"),
    ("jsonl-line-18", ["fit", *BASE, "--data.init_args.dataset", f"{ROOT}/broken.jsonl"], 1,
     "dataset file '{ws}/broken.jsonl', line 18: not valid JSON (Expecting ',' delimiter at column 25): fix or "
     "remove that line."),
    ("binary-csv", ["fit", *BASE, "--data.init_args.dataset", f"{ROOT}/binary.csv"], 1,
     "dataset file '{ws}/binary.csv', line 2: byte 0x89 is not UTF-8 text"),
    ("template-field", ["fit", *BASE, "--config", f"{ROOT}/template.yaml"], 1,
     "prompt_template='Q: {{question}}' uses the field 'question', which the dataset does not have"),
    # ---- the analysis and self-training commands (exit 1)
    ("mitigate-not-an-adapter", ["mitigate-intruders", "--adapter", "{model}", "--output", f"{ROOT}/mitigated"], 1,
     "--adapter {model} holds no adapter_config.json: give a peft LoRA adapter folder"),
    ("compare-no-report", ["compare", "{ws}", "--out", f"{ROOT}/cmp"], 1,
     "{ws} has no report.json: add ForgettingReport to that fit"),
    ("analyze-shift-no-probe", ["analyze-shift", "--base", "{model}", "--tuned", "{model}", "--probe",
                                f"{ROOT}/nowhere.jsonl", "--out", f"{ROOT}/shift"], 1,
     "--probe {ws}/nowhere.jsonl is not a file: give a JSONL file of records with a prompt and a response column."),
    ("self-train-no-labels", ["self-train", "--data", "rotten_tomatoes", "--unlabeled", "rotten_tomatoes",
                              "--num-labeled", "0", "--work-dir", f"{ROOT}/st"], 1,
     "--num-labeled 0 must be at least 1: the teacher needs labelled examples."),
]  # fmt: skip


def _fill(text: str, ws: Path, model: Path) -> str:
    return text.replace("{ws}", str(ws)).replace("{model}", str(model)).replace("{{", "{").replace("}}", "}")


@pytest.mark.parametrize(("argv", "code", "sentence"), [pytest.param(*row[1:], id=row[0]) for row in ROWS])
def test_bad_input_is_one_sentence(
    argv: list[str], code: int, sentence: str, ws: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [_fill(a, ws, tiny_llama_dir) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == code, err
    assert "Traceback" not in err, err
    lines = err.rstrip("\n").splitlines()
    command = next((a for a in args if a in COMMANDS), None)
    prefix = f"lightning-ft {command}: error: " if command else "lightning-ft: error: "
    errors = [line for line in lines if ": error: " in line]
    assert errors == [lines[-1]] and lines[-1].startswith(prefix), err
    assert _fill(sentence, ws, tiny_llama_dir) in lines[-1][len(prefix):], err
    if code == 2:
        assert lines[-2].startswith(f"usage: lightning-ft {command or '{fit,'}"), err
    assert not torch.distributed.is_initialized(), "refused after a process group was started (it would hold its port)"


def test_the_table_holds_forty_distinct_bad_inputs() -> None:
    assert len(ROWS) >= 40 and len({row[0] for row in ROWS}) == len(ROWS)


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file under ``root``: its bytes, or a link's target."""
    return {str(p.relative_to(root)): os.readlink(p) if p.is_symlink() else p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}  # fmt: skip


def test_a_run_folder_is_never_written_over_and_ckpt_path_continues_it(
    ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = yaml.safe_load((ws / "base.yaml").read_text())
    config["trainer"].update(default_root_dir=str(tmp_path / "runs"), max_steps=2, log_every_n_steps=1,
                             limit_val_batches=1)  # checkpoints are then saved after validation  # fmt: skip
    config["model"]["init_args"]["output_dir"] = None  # export runs/first/hf_model
    _write_yaml(tmp_path / "run.yaml", config)
    fit = ["fit", "--config", str(tmp_path / "run.yaml"), "--run_name", "first"]
    main(fit)
    run = tmp_path / "runs" / "first"
    assert (run / "hf_model" / "config.json").is_file() and (run / "checkpoints" / "last.ckpt").is_symlink()
    last = str(run / "checkpoints" / "last.ckpt")
    other = tmp_path / "other.ckpt"
    other.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())  # a checkpoint of another run
    before = {**_snapshot(tmp_path), "data": (ws / "reviews.jsonl").read_bytes()}
    carry_on = f"continue it with --ckpt_path {last} (a checkpoint of this run), or pick another --run_name."
    for argv, fix in ((fit, carry_on), ([*fit, "--ckpt_path", str(other)], carry_on),
                      (["validate", *fit[1:], "--ckpt_path", last], "give this validate its own --run_name."),
                      (["predict", *fit[1:]], "give this predict its own --run_name.")):  # fmt: skip
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and "Traceback" not in err, err
        assert err.strip().endswith(f"--run_name first already holds a run ({run} has checkpoints, hf_model), which "
                                    f"this {argv[0]} would write over: {fix}"), err  # fmt: skip
        assert {**_snapshot(tmp_path), "data": (ws / "reviews.jsonl").read_bytes()} == before

    main([*fit, "--ckpt_path", last, "--trainer.max_steps", "4"])  # continues the run, in the same folder
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["epoch=1-step=4.ckpt", "last.ckpt"], checkpoints  # no last-v1.ckpt beside a stale link
    assert os.readlink(run / "checkpoints" / "last.ckpt") == "epoch=1-step=4.ckpt"
    steps = [json.loads(row.split(",")[1]) for row in (run / "csv" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps[:3] == [0, 1, 1] and min(steps[3:]) > 1, steps  # the first part's rows (train 0, 1, val 1) are kept


def test_debug_flag_and_environment_show_the_traceback(
    ws: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["fit", "--config", str(ws / "base.yaml"), "--trainer.max_steps", "many"]
    for extra, env in ((["--debug"], None), ([], "1")):
        if env:
            monkeypatch.setenv("LIGHTNING_FT_DEBUG", env)
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, *extra])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback (most recent call last)" in err
        assert "lightning_ft.errors.UsageError: trainer.max_steps must be an integer (got many)." in err
        assert err.splitlines()[-1] == "lightning-ft fit: error: trainer.max_steps must be an integer (got many)."


def test_an_internal_error_keeps_its_traceback_and_says_it_is_a_bug(
    ws: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        return None.backbone  # type: ignore[attr-defined]  # an AttributeError: a bug, not the user's mistake

    monkeypatch.setattr("lightning_ft.modules.causal_lm.load_backbone", broken)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ws / "base.yaml")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "Traceback (most recent call last)" in err and "AttributeError: 'NoneType' object has no attribute" in err
    assert err.splitlines()[-1] == ("lightning-ft fit: error: this is a bug in lightning-ft, not a mistake in your "
                                    "input: please report it with the traceback above.")  # fmt: skip
