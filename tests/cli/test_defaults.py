"""A class a config or the command line names gets its own defaults for every argument it is not given (not the
default class's: jsonargparse carries init_args over a class change), and a command naming no class gets
CausalLMModule and InstructionDataModule. Checked on --print_config, no fitting."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_ft.cli import main

SHIPPED = sorted(str(p) for p in Path("configs").glob("*.yaml") if not p.name.startswith("merge"))  # merge recipes: tests/merging


def init_defaults(cls: type) -> dict[str, Any]:
    """The defaults of ``cls.__init__``, and of the bases' ``__init__`` its ``**kwargs`` forwards to."""
    found: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())
        for param in params:
            if param.default is not param.empty:
                found.setdefault(param.name, param.default)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return found


def _plain(value: Any) -> Any:
    """A Python default as --print_config's YAML gives it back (tuples are lists)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _printed(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def _check_entry(printed: dict[str, Any], given: Any, where: str) -> None:
    """Every init_arg of ``printed`` that ``given`` (the YAML's or command line's entry) does not set is the default."""
    cls = getattr(importlib.import_module(printed["class_path"].rpartition(".")[0]), printed["class_path"].rpartition(".")[2])
    defaults = init_defaults(cls)
    set_args = set((given.get("init_args") or {}) if isinstance(given, dict) else {})
    for name, value in (printed.get("init_args") or {}).items():
        if name in set_args:
            continue
        assert name in defaults, f"{where}: {cls.__name__}.{name} has no default but is set to {value!r}"
        assert value == _plain(defaults[name]), f"{where}: {cls.__name__}.{name} is {value!r}, its default {defaults[name]!r}"


@pytest.mark.parametrize("config", SHIPPED)
def test_shipped_config_gets_its_classes_own_defaults(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    raw = yaml.safe_load(Path(config).read_text())
    printed = _printed(["fit", "--config", config], capsys)
    for key in ("model", "data"):
        if isinstance(raw.get(key), dict) and printed.get(key):
            _check_entry(printed[key], raw[key], f"{config} {key}")
    raw_callbacks = (raw.get("trainer") or {}).get("callbacks") or []
    printed_callbacks = printed["trainer"].get("callbacks") or []
    assert len(printed_callbacks) == len(raw_callbacks)
    for n, (shown, given) in enumerate(zip(printed_callbacks, raw_callbacks)):
        _check_entry(shown, given, f"{config} callback {n}")


@pytest.mark.parametrize(
    ("argv", "model", "data", "given"),
    [
        (["fit"], "lightning_ft.modules.CausalLMModule", "lightning_ft.data.InstructionDataModule", {}),
        (["fit", "--model.init_args.learning_rate", "0.5"], "lightning_ft.modules.CausalLMModule",
         "lightning_ft.data.InstructionDataModule", {"model": {"learning_rate": 0.5}}),
        (["fit", "--model", "SequenceClassificationModule", "--data", "ClassificationDataModule", "--data.max_length", "7"],
         "lightning_ft.modules.SequenceClassificationModule", "lightning_ft.data.ClassificationDataModule",
         {"data": {"max_length": 7}}),
        (["fit", "--model", "SequenceClassificationModule", "--data.max_length", "7"],
         "lightning_ft.modules.SequenceClassificationModule", "lightning_ft.data.InstructionDataModule",
         {"data": {"max_length": 7}}),
    ],
)  # fmt: skip
def test_command_line_classes_and_defaults(
    argv: list[str], model: str, data: str, given: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    printed = _printed(argv, capsys)
    assert (printed["model"]["class_path"], printed["data"]["class_path"]) == (model, data)
    for key in ("model", "data"):
        for name, value in given.get(key, {}).items():
            assert printed[key]["init_args"][name] == value
        _check_entry(printed[key], {"init_args": given.get(key, {})}, f"{' '.join(argv)} {key}")
