"""``lightning-ft data``: help that states inputs and outputs, dispatch to the method modules (a missing one breaks only
itself), one-sentence errors, and a filter run end to end on a tiny random model (plumbing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_ft.cli import main
from lightning_ft.curation import cli as data_cli
from lightning_ft.data import InstructionDataModule


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``lightning-ft data <args>``: (exit status, stdout, stderr)."""
    try:
        main(["data", *args])
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) <= 2 and "Traceback" not in err, err  # the usage line (command-line mistakes) and the sentence
    return lines[-1]


@pytest.fixture(scope="module")
def reviews(tmp_path_factory: pytest.TempPathFactory, sentiment_jsonl: Path) -> Path:
    path = tmp_path_factory.mktemp("data") / "reviews.jsonl"
    path.write_text("".join(sentiment_jsonl.read_text().splitlines(keepends=True)[:16]))
    return path


def test_help_states_inputs_outputs_methods_and_examples(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["--help"], capsys)
    assert code == 0
    for words in ("input: --data", "output: --output", "report.json", "examples:", "lightning-ft data filter --data"):
        assert words in out
    for command, methods in data_cli.METHODS.items():
        assert command in out and all(f"--method {m}" in out for m in methods)
    code, out, _ = _run(["select", "--help"], capsys)
    assert code == 0 and "methods:" in out and "input: --data" in out and "lightning-ft data select --method" in out
    assert "  ot " in out and "  kmq " in out  # each method with the first line of its module's docstring
    code, out, _ = _run(["filter", "--help"], capsys)
    assert code == 0 and "--keep-quantiles LOW HIGH" in out and "--min-ppl" in out and "InstructionDataModule" in out


def test_filter_runs_end_to_end_and_writes_what_the_datamodule_reads(
    tmp_path: Path, reviews: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "kept.jsonl"
    args = ["filter", "--data", str(reviews), "--text-field", "text", "--model", str(tiny_llama_dir),
            "--keep-quantiles", "0.25", "0.75", "--output", str(out), "--cache-dir", ""]  # fmt: skip
    code, stdout, err = _run(args, capsys)
    assert code == 0, err
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    report = json.loads((tmp_path / "kept.report.json").read_text())
    assert report["counts"]["pool"] == 16 and report["counts"]["kept"] == len(kept) >= 6
    assert all(report["band"]["min"] <= r["perplexity"] <= report["band"]["max"] for r in kept)
    assert f"wrote {len(kept)} records to {out}" in stdout and "counts: pool=16" in stdout
    data = InstructionDataModule(dataset=str(out), val_size=1, test_size=0, control_size=0,
                                 tokenizer=str(tiny_llama_dir))  # fmt: skip
    data.setup("fit")
    assert len(data._splits["train"]) == len(kept) - 1
    code, _, err = _run(args, capsys)  # the same output again
    assert code == 1 and _error(err) == (
        f"lightning-ft data: error: --output {out} already exists: give --overwrite to replace it, or a new path."
    )


@pytest.mark.parametrize(
    ("args", "code", "sentence"),
    [
        ([], 2, "a data command is needed: one of select, curate, rewrite, filter (see lightning-ft data --help)."),
        (["selct"], 2, "'selct' is not a data command (commands: select, curate, rewrite, filter): did you mean select?"),
        (["select", "--method", "km", "--data", "trivia", "--output", "o.jsonl"], 2,
         "--method must be one of ot, kmq (got km): did you mean kmq?"),
        (["select", "--data", "trivia", "--output", "o.jsonl"], 2, "--method is required: see lightning-ft data select --help."),
        (["filter", "--data", "rotten_tomatoes", "--max-ppl", "9", "--output", "o.jsonl"], 1,
         ("--data rotten_tomatoes has no column 'prompt' (its columns are label, movie, text): pass --prompt-field "
          "with one of them.")),
        (["filter", "--data", "trivia", "--max-ppl", "9", "--output", "o.json"], 1,
         "--output o.json must be a .jsonl file (the dataset is written as JSONL), e.g. o.jsonl."),
        (["filter", "--data", "trivia", "--max-ppl", "9", "--ouput", "o.jsonl"], 2,
         "--ouput is not an option of lightning-ft data filter: did you mean --output?"),
        (["filter", "--data", "trivia", "--output", "o.jsonl", "--model", "none-such"], 1,
         "the perplexity filter needs a band: give --min-ppl and/or --max-ppl, or --keep-quantiles."),
    ],
)  # fmt: skip
def test_mistakes_are_one_sentence(
    args: list[str], code: int, sentence: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    found, _, err = _run(args, capsys)
    assert (found, _error(err)) == (code, f"lightning-ft data: error: {sentence}")
    assert not (tmp_path / "o.jsonl").exists()


def test_empty_pool_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = _run(
        ["filter", "--data", str(empty), "--max-ppl", "9", "--output", str(tmp_path / "o.jsonl")], capsys
    )
    assert code == 1 and _error(err).endswith(
        f"--data {empty} holds no records: give a dataset with at least one record."
    )


def test_a_missing_method_module_breaks_only_its_own_method(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    methods = {**data_cli.METHODS, "select": {**data_cli.METHODS["select"], "gone": "lightning_ft.curation.gone"}}
    monkeypatch.setattr(data_cli, "METHODS", methods)
    code, out, _ = _run(["select", "--help"], capsys)
    assert code == 0 and "gone        (not available: module missing)" in out
    code, _, err = _run(
        ["select", "--method", "gone", "--data", "trivia", "--output", str(tmp_path / "o.jsonl")], capsys
    )
    assert code == 1 and _error(err) == (
        "lightning-ft data: error: --method gone is not available in this installation of lightning-ft "
        "(lightning_ft.curation.gone is missing): use another method of lightning-ft data select."
    )
    code, out, _ = _run(["filter", "--help"], capsys)  # the other commands still work
    assert code == 0 and "--keep-quantiles" in out
