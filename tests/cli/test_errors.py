"""The one error path (lightning_ft.errors): what is a user's mistake and what is a bug, the one-line message, the
debug switch; and a clean console, silenced inside the entry point only."""

from __future__ import annotations

import errno
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch  # noqa: F401  (imported here, not inside a captured test: it binds its log handler to stderr)
import pytest
import yaml

from lightning_ft.errors import UsageError, UserError, debug_requested, exit_code, is_user_error, user_message


def _raised(fn: object) -> BaseException:
    try:
        fn()  # type: ignore[operator]
    except BaseException as err:  # noqa: BLE001
        return err
    raise AssertionError("expected an exception")


def test_user_errors_and_bugs_are_told_apart() -> None:
    from lightning_ft.modules.backbone import torch_dtype

    assert is_user_error(UserError("x")) and exit_code(UserError("x")) == 1 and exit_code(UsageError("x")) == 2
    ours = _raised(lambda: torch_dtype("fp8"))  # a `raise ValueError(...)` of lightning-ft: a checked argument
    assert isinstance(ours, ValueError) and is_user_error(ours)
    python = _raised(lambda: debug_requested(None))  # type: ignore[arg-type]  # Python's TypeError inside our code
    assert isinstance(python, TypeError) and not is_user_error(python)
    theirs = _raised(lambda: int("x"))  # a ValueError raised outside the packages that check arguments
    assert not is_user_error(theirs) and not is_user_error(RuntimeError("boom"))
    assert is_user_error(PermissionError(errno.EACCES, "Permission denied", "/out"))
    assert user_message(PermissionError(errno.EACCES, "Permission denied", "/out")) == (
        "cannot use '/out': Permission denied."
    )
    assert user_message(ValueError("two\n   lines")) == "two lines"


def test_debug_is_a_flag_or_an_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIGHTNING_FT_DEBUG", raising=False)
    assert debug_requested(["fit", "--debug", "--config", "a.yaml"]) == (["fit", "--config", "a.yaml"], True)
    assert debug_requested(["fit"]) == (["fit"], False)
    monkeypatch.setenv("LIGHTNING_FT_DEBUG", "1")
    assert debug_requested(["fit"]) == (["fit"], True)
    monkeypatch.setenv("LIGHTNING_FT_DEBUG", "0")
    assert debug_requested(["fit"]) == (["fit"], False)


def test_importing_the_library_installs_no_warning_filter() -> None:
    code = (
        "import logging, warnings; before = list(warnings.filters); "
        "import lightning_ft, lightning_ft.cli, lightning_ft.errors; "
        "assert warnings.filters == before, warnings.filters; "
        "assert not any(logging.getLogger(name).filters for name, _ in lightning_ft.cli._QUIET_LOGS)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_entry_point_leaves_no_filter_behind(tmp_path: Path) -> None:
    from lightning_ft.cli import _QUIET_LOGS, main

    before = list(warnings.filters)
    with pytest.raises(SystemExit):
        main(["fit", "--trainer.max_steps", "many"])
    assert warnings.filters == before
    assert all(not logging.getLogger(name).filters for name, _ in _QUIET_LOGS)


def test_a_fit_prints_no_known_harmless_notice(
    tiny_llama_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_ft.cli import main

    monkeypatch.delenv("WANDB_SILENT", raising=False)  # the suite silences W&B; a user's console does not
    monkeypatch.setenv("WANDB_MODE", "offline")
    rows = [json.dumps({"text": f"review {i}", "label": "positive" if i % 2 else "negative"}) for i in range(16)]
    (tmp_path / "data.jsonl").write_text("\n".join(rows) + "\n")
    config = {
        "trainer": {"accelerator": "cpu", "max_steps": 2, "default_root_dir": str(tmp_path / "runs"),
                    "num_sanity_val_steps": 0, "limit_val_batches": 1, "log_every_n_steps": 1,
                    "callbacks": [{"class_path": "ForgettingReport", "init_args": {"print_table": True}}]},
        "model": {"class_path": "lightning_ft.modules.CausalLMModule",
                  "init_args": {"model": str(tiny_llama_dir), "warmup_steps": 0, "output_dir": ""}},
        "data": {"class_path": "lightning_ft.data.InstructionDataModule",
                 "init_args": {"dataset": str(tmp_path / "data.jsonl"), "label_options": ["positive", "negative"],
                               "val_size": 4, "test_size": 0, "batch_size": 4, "control_size": 0, "max_length": 16}},
    }  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    lightning_log = _Collect()  # Lightning's own handler writes to the stderr it found at import, out of capfd's reach
    logging.getLogger("lightning.pytorch").addHandler(lightning_log)
    try:
        main(["fit", "--config", str(tmp_path / "config.yaml"), "--run_name", "quiet"])
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(lightning_log)
    out, err = capfd.readouterr()
    console = out + err + "\n".join(lightning_log.messages)
    assert "before vs after fine-tuning" in out and "GPU available" in console  # our table, Lightning's own lines
    for notice in ("litlogger", "anonymous setting", "git root", "kernels-community", "Loading weights",
                   "DeprecationWarning", "FutureWarning"):  # fmt: skip
        assert notice not in console, notice


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
