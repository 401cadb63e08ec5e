"""The control-set and tokenizer arguments, defined once in ControlDataModule: every DataModule lists them flat
(CLI and YAML) with its own defaults, checks them in one sentence, and truncates control texts the same way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonargparse import ArgumentParser
from transformers import AutoTokenizer

from lightning_ft.data import ClassificationDataModule, InstructionDataModule
from lightning_ft.data.control import ControlDataModule
from lightning_ft.objectives import MultiTaskDataModule

_CONTROL_ARGS = ("control", "control_field", "control_size", "control_max_length", "tokenizer")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("control")
    data, control = root / "reviews.jsonl", root / "general.jsonl"
    rows = [{"text": f"review number {i} was good", "label": ["positive", "negative"][i % 2]} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prose = [{"body": " ".join(["the quick brown fox jumps over the lazy dog"] * 4)} for _ in range(5)]
    control.write_text("".join(json.dumps(r) + "\n" for r in prose))
    return data, control


def _setup(cls: type[ControlDataModule], tokenizer_dir: Path, data: Path, **kwargs: Any) -> Any:
    extra = {"label_options": ["positive", "negative"]} if cls is InstructionDataModule else {}
    dm = cls(dataset=str(data), val_size=2, test_size=2, **extra, **kwargs)
    dm.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (InstructionDataModule, {"control": "humaneval", "control_field": "text", "control_size": 64,
                                 "control_max_length": 128, "tokenizer": None}),
        (ClassificationDataModule, {"control": "hamlet", "control_field": "text", "control_size": 64, "tokenizer": None}),
    ],
)  # fmt: skip
def test_every_datamodule_lists_the_control_arguments_flat_with_its_defaults(cls: type, expected: dict) -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    defaults = vars(parser.get_defaults().data)
    assert {k: defaults[k] for k in _CONTROL_ARGS if k in defaults} == expected
    assert "kwargs" not in defaults and "dataset" in defaults  # the DataModule's own arguments sit beside them
    config = parser.parse_object({"data": {"control_size": 3, "control_field": "body", "max_length": 40}})
    built = parser.instantiate_classes(config).data
    assert (built.hparams.control_size, built.hparams.control_field, built.hparams.max_length) == (3, "body", 40)
    assert built.hparams.control == expected["control"]  # the default reaches hparams too


def test_control_texts_are_truncated_to_control_max_length(tiny_tokenizer_dir: Path, files: tuple[Path, Path]) -> None:
    data, control = files
    dm = _setup(InstructionDataModule, tiny_tokenizer_dir, data, control=str(control), control_field="body",
                control_size=4, control_max_length=7, max_length=30)  # fmt: skip
    assert [len(e["input_ids"]) for e in dm._encoded["control"]] == [7] * 4
    default = _setup(InstructionDataModule, tiny_tokenizer_dir, data, control=str(control), control_field="body",
                     control_max_length=None, max_length=30)  # fmt: skip
    assert [len(e["input_ids"]) for e in default._encoded["control"]] == [30] * 5  # None: the task's max_length


def test_classification_truncates_control_texts_to_max_length(
    tiny_tokenizer_dir: Path, files: tuple[Path, Path]
) -> None:
    data, control = files
    dm = _setup(ClassificationDataModule, tiny_tokenizer_dir, data, control=str(control), control_field="body",
                control_size=4, max_length=9)  # fmt: skip
    assert [len(e["input_ids"]) for e in dm._encoded["control"]] == [9] * 4
    with pytest.raises(
        TypeError, match=r"^ClassificationDataModule truncates control texts to max_length: set max_len"
    ):
        ClassificationDataModule(control_max_length=7)


@pytest.mark.parametrize("cls", [InstructionDataModule, ClassificationDataModule])
def test_a_wrong_control_field_is_named_in_one_sentence(
    cls: type[ControlDataModule], tiny_tokenizer_dir: Path, files: tuple[Path, Path]
) -> None:
    data, control = files
    with pytest.raises(ValueError, match=r"^control_field='text' is not a column of control=.*\(columns: \['body'\]\)"):
        _setup(cls, tiny_tokenizer_dir, data, control=str(control))


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [(InstructionDataModule, {"control_size": -1}, r"^control_size=-1 must be zero or positive"),
     (ClassificationDataModule, {"control_size": -1}, r"^control_size=-1 must be zero or positive"),
     (InstructionDataModule, {"control_max_length": 1}, r"^control_max_length=1 must be at least 2")],
)  # fmt: skip
def test_bad_control_sizes_are_refused_in_one_sentence(cls: type, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def _multitask(data: Path, **kwargs: Any) -> MultiTaskDataModule:
    task = {"dataset": str(data), "label_options": ["positive", "negative"], "val_size": 2, "test_size": 2,
            "max_length": 30}  # fmt: skip
    return MultiTaskDataModule(tasks=[task], **kwargs)


def test_multitask_lists_the_control_arguments_flat_and_saves_them(files: tuple[Path, Path]) -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(MultiTaskDataModule, "data")
    defaults = vars(parser.get_defaults().data)
    assert {k: defaults[k] for k in _CONTROL_ARGS} == {
        "control": "humaneval",
        "control_field": "text",
        "control_size": 64,
        "control_max_length": 128,
        "tokenizer": None,
    }
    assert "kwargs" not in defaults and "weights" in defaults  # its own arguments sit beside them
    config = parser.parse_object({"data": {"tasks": [{"dataset": str(files[0])}], "control_size": 3,
                                           "control_field": "body", "epoch_size": 5}})  # fmt: skip
    built = parser.instantiate_classes(config).data
    assert (built.hparams.control_size, built.hparams.control_field, built.hparams.epoch_size) == (3, "body", 5)
    assert built.hparams.control == "humaneval"  # the default reaches hparams too
    assert "tasks" not in built.hparams  # task objects would stop a checkpoint loading with weights_only=True


def test_multitask_loads_and_truncates_its_control_set_as_the_others(
    tiny_tokenizer_dir: Path, files: tuple[Path, Path]
) -> None:
    data, control = files
    dm = _multitask(data, control=str(control), control_field="body", control_size=4, control_max_length=7)
    dm.tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    dm.setup("fit")
    assert [len(e["input_ids"]) for e in dm._control._encoded["control"]] == [7] * 4
    assert len(dm.val_dataloader()) == 2  # the task's loader, then the control loader
    with pytest.raises(ValueError, match=r"^control_field='text' is not a column of control=.*\(columns: \['body'\]\)"):
        wrong = _multitask(data, control=str(control))
        wrong.tokenizer = dm.tokenizer
        wrong.setup("fit")
    with pytest.raises(ValueError, match=r"^control_size=-1 must be zero or positive"):
        _multitask(data, control_size=-1)


@pytest.mark.parametrize(
    ("config", "cls"),
    [
        ("configs/classification.yaml", ClassificationDataModule),
        ("configs/quickstart.yaml", InstructionDataModule),
        ("configs/multitask.yaml", MultiTaskDataModule),
    ],
)
def test_the_cli_prints_exactly_the_datamodule_arguments(
    config: str, cls: type, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under LightningCLI (whose default DataModule is InstructionDataModule) the forwarded arguments are the class's."""
    import yaml

    from lightning_ft.cli import main

    with pytest.raises(SystemExit):
        main(["fit", "--config", config, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["data"]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    defaults = vars(parser.get_defaults().data)
    assert printed["class_path"].rsplit(".", 1)[1] == cls.__name__
    assert list(printed["init_args"]) == list(defaults)
    given = yaml.safe_load(Path(config).read_text())["data"]["init_args"]
    control = {k: printed["init_args"][k] for k in _CONTROL_ARGS if k in defaults}
    assert control == {k: given.get(k, defaults[k]) for k in control}  # the class's own defaults, not another's
