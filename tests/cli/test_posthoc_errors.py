"""Bad inputs of the post-hoc commands (merge, compress, decompress, sparse-apply) through ``lightning-ft``.

Every row is answered with one line ``lightning-ft <command>: error: <sentence>`` on stderr (the last line; the
usage line above it for a command-line mistake, exit 2; exit 1 otherwise) and no traceback, and leaves every file
of the workspace (the inputs and the previous outputs) byte-identical. Nothing is lost: an output that is, holds or
sits inside an input is refused, an existing output needs ``--overwrite``, and a write that fails half-way (a full
disk) leaves the previous output whole.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lightning_ft.cli import main
from lightning_ft.merging import compress
from lightning_ft.sparse import SparseDelta

WS = "{ws}"
OUTSIDE = "give an --output outside every input."
SPARSE_KEY = "model.layers.0.mlp.down_proj.weight"


def _finetune(base: Path, out: Path, seed: int) -> Path:
    shutil.copytree(base, out)
    gen = torch.Generator().manual_seed(seed)
    state = load_file(base / "model.safetensors")
    noisy = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
    save_file(noisy, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _previous_merge(base: Path, out: Path) -> Path:
    """An earlier result: a model folder that an output collision must leave alone."""
    shutil.copytree(base, out)
    (out / "merge_report.md").write_text("# an earlier merge\n")
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """A workspace of inputs and previous outputs (copies: a row that damaged them must not hurt other tests)."""
    root = tmp_path_factory.mktemp("posthoc")
    base = Path(shutil.copytree(tiny_llama_dir, root / "base"))
    _finetune(base, root / "a", 1)
    _finetune(base, root / "b", 2)
    compress(base, root / "a", root / "a.compeft.safetensors", density=0.1)
    state = load_file(base / "model.safetensors")
    shape = tuple(state[SPARSE_KEY].shape)
    delta = SparseDelta(shapes={SPARSE_KEY: shape}, indices={SPARSE_KEY: torch.tensor([0, 5], dtype=torch.int32)},
                        values={SPARSE_KEY: torch.tensor([0.5, -0.25])})  # fmt: skip
    delta.save(root / "a.sparse.safetensors")
    _previous_merge(base, root / "previous")
    (root / "previous.safetensors").write_bytes((root / "a.compeft.safetensors").read_bytes())
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a model")
    (root / "recipe_method.yaml").write_text(yaml.safe_dump(
        {"base": str(base), "models": [str(root / "a")], "method": "tiez", "output": str(root / "fresh")}))  # fmt: skip
    return root


_BASE_A = ["--base", f"{WS}/base", "--models", f"{WS}/a"]
_MERGE = ["merge", *_BASE_A, "--method", "task_arithmetic"]
_COMPRESS = ["compress", "--base", f"{WS}/base", "--model", f"{WS}/a"]
_DECOMPRESS = ["decompress", "--base", f"{WS}/base", "--artifact", f"{WS}/a.compeft.safetensors"]
_SPARSE = ["sparse-apply", "--base", f"{WS}/base", "--sft", f"{WS}/a.sparse.safetensors"]

# (id, command line, exit status, the sentence (exact), or a prefix of it ending in '...')
ROWS: list[tuple[str, list[str], int, str]] = [
    # ---- an output that is, holds or sits inside an input (each command)
    ("merge-output-is-a-model", [*_MERGE, "--output", f"{WS}/a"], 1,
     f"--output {WS}/a is the input --models {WS}/a: writing there would destroy that input, so {OUTSIDE}"),
    ("merge-output-is-the-base", [*_MERGE, "--output", f"{WS}/base"], 1,
     f"--output {WS}/base is the input --base {WS}/base: writing there would destroy that input, so {OUTSIDE}"),
    ("merge-output-inside-a-model", [*_MERGE, "--output", f"{WS}/a/merged"], 1,
     f"--output {WS}/a/merged is inside the input --models {WS}/a: writing there would destroy that input, so "
     f"{OUTSIDE}"),
    ("merge-output-holds-the-inputs", [*_MERGE, "--output", WS], 1,
     f"--output {WS} holds the input --base {WS}/base: writing there would destroy that input, so {OUTSIDE}"),
    ("compress-output-in-the-model", [*_COMPRESS, "--output", f"{WS}/a/model.safetensors"], 1,
     f"--output {WS}/a/model.safetensors is inside the input --model {WS}/a: writing there would destroy that input, "
     f"so {OUTSIDE}"),
    ("decompress-output-is-the-artifact", [*_DECOMPRESS, "--output", f"{WS}/a.compeft.safetensors"], 1,
     f"--output {WS}/a.compeft.safetensors is the input --artifact {WS}/a.compeft.safetensors: writing there would "
     f"destroy that input, so {OUTSIDE}"),
    ("decompress-output-is-the-base", [*_DECOMPRESS, "--output", f"{WS}/base"], 1,
     f"--output {WS}/base is the input --base {WS}/base: writing there would destroy that input, so {OUTSIDE}"),
    ("sparse-apply-output-inside-the-base", [*_SPARSE, "--output", f"{WS}/base/applied"], 1,
     f"--output {WS}/base/applied is inside the input --base {WS}/base: writing there would destroy that input, so "
     f"{OUTSIDE}"),
    ("sparse-apply-output-is-the-artifact", [*_SPARSE, "--output", f"{WS}/a.sparse.safetensors"], 1,
     f"--output {WS}/a.sparse.safetensors is the input --sft {WS}/a.sparse.safetensors: writing there would destroy "
     f"that input, so {OUTSIDE}"),
    # ---- an existing output without --overwrite (each command)
    ("merge-existing-output", [*_MERGE, "--output", f"{WS}/previous"], 1,
     f"--output {WS}/previous already exists and is not empty: give --overwrite to replace it, or a new path."),
    ("compress-existing-output", [*_COMPRESS, "--output", f"{WS}/previous.safetensors"], 1,
     f"--output {WS}/previous.safetensors already exists: give --overwrite to replace it, or a new path."),
    ("decompress-existing-output", [*_DECOMPRESS, "--output", f"{WS}/previous"], 1,
     f"--output {WS}/previous already exists and is not empty: give --overwrite to replace it, or a new path."),
    ("sparse-apply-existing-output", [*_SPARSE, "--output", f"{WS}/previous"], 1,
     f"--output {WS}/previous already exists and is not empty: give --overwrite to replace it, or a new path."),
    ("compress-output-is-a-folder", [*_COMPRESS, "--output", f"{WS}/previous", "--overwrite"], 1,
     f"--output {WS}/previous is a folder: give the path of a file, e.g. {WS}/previous/artifact.safetensors."),
    ("merge-output-is-a-file", [*_MERGE, "--output", f"{WS}/previous.safetensors", "--overwrite"], 1,
     f"--output {WS}/previous.safetensors is a file: give the path of a folder (the result is a model folder)."),
    # ---- missing or wrong inputs
    ("merge-missing-base", ["merge", "--base", f"{WS}/nowhere", "--models", f"{WS}/a", "--method", "ties",
                            "--output", f"{WS}/fresh"], 1,
     f"--base {WS}/nowhere does not exist: give a model folder, a file or a bundled model alias."),
    ("merge-missing-model", ["merge", "--base", f"{WS}/base", "--models", f"{WS}/a", f"{WS}/nowhere", "--method",
                             "ties", "--output", f"{WS}/fresh"], 1,
     f"--models {WS}/nowhere does not exist: give a model folder, a file or a bundled model alias."),
    ("compress-missing-model", ["compress", "--base", f"{WS}/base", "--model", f"{WS}/nowhere", "--output",
                                f"{WS}/fresh.safetensors"], 1,
     f"--model {WS}/nowhere does not exist: give a model folder, a file or a bundled model alias."),
    ("merge-base-not-a-model-folder", ["merge", "--base", f"{WS}/notes", "--models", f"{WS}/a", "--method", "ties",
                                       "--output", f"{WS}/fresh"], 1,
     f"{WS}/notes is not a model folder (no model.safetensors or model.safetensors.index.json in it): give a Hugging "
     "Face model folder saved with safetensors, or a bundled alias."),
    ("merge-model-not-a-model-folder", ["merge", "--base", f"{WS}/base", "--models", f"{WS}/notes", "--method", "ties",
                                        "--output", f"{WS}/fresh"], 1,
     f"{WS}/notes is not an HF folder (model.safetensors), a peft adapter folder, a Lightning .ckpt, a ComPEFT "
     "artifact or a sparse fine-tuning artifact (sparse_delta.safetensors)."),
    ("decompress-not-an-artifact", ["decompress", "--base", f"{WS}/base", "--artifact", f"{WS}/a/model.safetensors",
                                    "--output", f"{WS}/fresh"], 1,
     f"--artifact {WS}/a/model.safetensors is not a ComPEFT artifact: give the .safetensors file lightning-ft "
     "compress wrote."),
    ("sparse-apply-not-an-artifact", ["sparse-apply", "--base", f"{WS}/base", "--sft", f"{WS}/a.compeft.safetensors",
                                      "--output", f"{WS}/fresh"], 1,
     f"--sft {WS}/a.compeft.safetensors is not a sparse fine-tuning artifact: give the sparse_delta.safetensors file "
     "a SparseFineTuning fit writes."),
    # ---- parameters
    ("merge-scaling-not-a-number", [*_MERGE, "--param", "scaling=abc", "--output", f"{WS}/fresh"], 1,
     "scaling='abc' must be a number."),
    ("merge-param-without-equals", [*_MERGE, "--param", "scaling", "--output", f"{WS}/fresh"], 2,
     "--param scaling must be KEY=VALUE, e.g. --param density=0.2."),
    ("merge-bad-density", ["merge", *_BASE_A, "--method", "ties", "--param", "density=1.5", "--output",
                           f"{WS}/fresh"], 1, "density=1.5 must be between 0 and 1."),
    ("merge-lines-beta-not-a-number", [*_MERGE, "--lines-beta", "abc", "--output", f"{WS}/fresh"], 1,
     "LiNeS beta='abc' must be a number or 'sweep'."),
    ("compress-bad-density", [*_COMPRESS, "--density", "0", "--output", f"{WS}/fresh.safetensors"], 1,
     "density=0.0 must be in (0, 1]."),
    ("compress-density-not-a-number", [*_COMPRESS, "--density", "lots", "--output", f"{WS}/fresh.safetensors"], 2,
     "--density must be a number (got lots)."),
    ("merge-unknown-method", ["merge", *_BASE_A, "--method", "tiez", "--output", f"{WS}/fresh"], 2,
     "--method must be one of breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties, greedy_soup, linear, "
     "task_arithmetic, ties, uniform_soup (got tiez): did you mean ties?"),
    ("merge-recipe-unknown-method", ["merge", "--config", f"{WS}/recipe_method.yaml"], 1,
     "Unknown merge method 'tiez': use one of [..."),
    # ---- the command line
    ("merge-config-missing", ["merge", "--config", f"{WS}/nowhere.yaml"], 2, f"--config {WS}/nowhere.yaml does not "
                                                                              "exist."),
    ("merge-no-output", [*_MERGE], 2, "lightning-ft merge needs output (in the --config recipe or as --output)."),
    ("compress-missing-arguments", ["compress", "--base", f"{WS}/base"], 2,
     "--model and --output are required: see lightning-ft compress --help."),
    ("decompress-option-typo", [*_DECOMPRESS, "--outptu", f"{WS}/fresh"], 2,
     "--outptu is not an option of lightning-ft decompress: did you mean --output?"),
]  # fmt: skip


def _fill(text: str, ws: Path) -> str:
    return text.replace(WS, str(ws))


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes (temporary siblings included: none may be left behind)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _last_line(capsys: pytest.CaptureFixture[str], code: int, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.rstrip("\n").splitlines()
    prefix = f"lightning-ft {command}: error: "
    assert [line for line in lines if ": error: " in line] == [lines[-1]] and lines[-1].startswith(prefix), err
    if code == 2:
        assert lines[-2].startswith(f"usage: lightning-ft {command} "), err
    return lines[-1][len(prefix):]


@pytest.mark.parametrize(("argv", "code", "sentence"), [pytest.param(*row[1:], id=row[0]) for row in ROWS])
def test_bad_input_is_one_sentence_and_changes_nothing(
    argv: list[str], code: int, sentence: str, ws: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _snapshot(ws)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([_fill(a, ws) for a in argv])
    said = _last_line(capsys, code, argv[0])
    assert exit_info.value.code == code, said
    expected = _fill(sentence, ws)
    if expected.endswith("..."):
        assert said.startswith(expected[:-3]), said
    else:
        assert said == expected
    assert _snapshot(ws) == before
    assert not (ws / "fresh").exists() and not (ws / "fresh.safetensors").exists()


def test_the_table_covers_every_post_hoc_command() -> None:
    assert len({row[0] for row in ROWS}) == len(ROWS) >= 30
    for command in ("merge", "compress", "decompress", "sparse-apply"):
        rows = [row for row in ROWS if row[1][0] == command]
        assert any(" is the input " in row[3] or " is inside the input " in row[3] for row in rows), command
        assert any("give --overwrite to replace it" in row[3] for row in rows), command


@pytest.fixture
def copy_ws(ws: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ws, tmp_path / "ws"))


@pytest.mark.parametrize(
    ("argv", "output"),
    [
        pytest.param([*_MERGE, "--output", f"{WS}/previous"], "previous", id="merge"),
        pytest.param([*_COMPRESS, "--output", f"{WS}/previous.safetensors"], "previous.safetensors", id="compress"),
        pytest.param([*_DECOMPRESS, "--output", f"{WS}/previous"], "previous", id="decompress"),
        pytest.param([*_SPARSE, "--output", f"{WS}/previous"], "previous", id="sparse-apply"),
    ],
)
def test_overwrite_replaces_the_previous_output_and_nothing_else(
    argv: list[str], output: str, copy_ws: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _snapshot(copy_ws)
    main([*(_fill(a, copy_ws) for a in argv), "--overwrite"])
    after = _snapshot(copy_ws)
    changed = {name for name in set(before) | set(after) if before.get(name) != after.get(name)}
    assert changed and all(name == output or name.startswith(f"{output}/") for name in changed), changed
    assert sorted(p.name for p in copy_ws.iterdir() if p.name.startswith(".")) == []  # no temporary sibling left
    target = copy_ws / output
    if target.is_dir():  # the new result, whole: no file of the earlier one is left in it
        assert (target / "merge_report.md").is_file() == (argv[0] != "sparse-apply")
        assert not (target / "merge_report.md").is_file() or "# Merge:" in (target / "merge_report.md").read_text()
        assert set(load_file(target / "model.safetensors")) == set(load_file(copy_ws / "base" / "model.safetensors"))
    else:
        assert _metadata(target)["format"] == "lightning_ft.compeft"


def _metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


@pytest.mark.parametrize("command", ["merge", "compress", "decompress", "sparse-apply"])
def test_a_write_that_fails_half_way_leaves_the_previous_output_whole(
    command: str, copy_ws: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk while the weights are written: before, config and tokenizer files were already copied over the
    previous folder, beside old weights that no longer matched them (and compress truncated the old artifact)."""

    def disk_full(tensors: Any, filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr("lightning_ft.core.weights.writer._create_shard", disk_full)
    monkeypatch.setattr("lightning_ft.merging.compeft.save_file", disk_full)
    argv = {"merge": _MERGE, "compress": _COMPRESS, "decompress": _DECOMPRESS, "sparse-apply": _SPARSE}[command]
    output = copy_ws / ("previous.safetensors" if command == "compress" else "previous")
    before = _snapshot(copy_ws)
    with pytest.raises(SystemExit) as exit_info:
        main([*(_fill(a, copy_ws) for a in argv), "--output", str(output), "--overwrite"])
    said = _last_line(capsys, 1, command)
    assert exit_info.value.code == 1 and said.startswith("cannot use ") and said.endswith("No space left on device.")
    assert _snapshot(copy_ws) == before
    assert sorted(p.name for p in copy_ws.iterdir() if p.name.startswith(".")) == []
