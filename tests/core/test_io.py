"""The one atomic writer (lightning_ft.core.io) and every writer that goes through it.

Each writer is made to fail half-way (its save function writes one file, or part of one, then raises) over a
previous result, which must stay byte-identical, with no temporary sibling left behind; a completed write replaces
the previous result whole. New folders get 0777 less the umask (not mkdtemp's 0700), new files 0666 less the umask.
"""

from __future__ import annotations

import errno
import os
import stat
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lightning_ft.core import io
from lightning_ft.core.io import atomic_dir, atomic_file, check_finite, check_output
from lightning_ft.errors import UserError


class DiskFull(OSError):
    def __init__(self, path: Any) -> None:
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root``: a file's bytes, a link's target, a folder's mode."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        out[key] = os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else oct(p.stat().st_mode)
    return out


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------------------ the writer itself
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_atomic_dir_replaces_the_folder_whole_or_not_at_all(
    tmp_path: Path, exchange: bool, monkeypatch: pytest.MonkeyPatch, umask_022: None
) -> None:
    if not exchange:
        monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text("old config")
    (target / "model.safetensors").write_bytes(b"old weights")
    before = _tree(tmp_path)
    with pytest.raises(DiskFull), atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("new config")
        raise DiskFull(tmp / "model.safetensors")
    assert _tree(tmp_path) == before  # no new config beside the old weights, no temporary folder
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("new config")
    assert _tree(tmp_path) == {"out": before["out"], "out/config.json": b"new config"}  # the old files are gone


def test_a_new_folder_gets_the_umask_mode_and_a_replaced_one_keeps_its_own(tmp_path: Path, umask_022: None) -> None:
    with atomic_dir(tmp_path / "new") as tmp:
        (tmp / "f").write_text("x")
    assert _mode(tmp_path / "new") == 0o755  # mkdtemp made it 0700: other users could not read an exported model
    (tmp_path / "kept").mkdir(mode=0o750)
    with atomic_dir(tmp_path / "kept") as tmp:
        (tmp / "f").write_text("x")
    assert _mode(tmp_path / "kept") == 0o750


def test_atomic_file_replaces_the_file_whole_or_not_at_all(tmp_path: Path, umask_022: None) -> None:
    target = tmp_path / "artifact.safetensors"
    target.write_bytes(b"old artifact")
    target.chmod(0o640)
    with pytest.raises(DiskFull), atomic_file(target) as tmp:
        tmp.write_bytes(b"half")
        raise DiskFull(tmp)
    assert _tree(tmp_path) == {"artifact.safetensors": b"old artifact"}
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"new artifact")
    assert _tree(tmp_path) == {"artifact.safetensors": b"new artifact"} and _mode(target) == 0o640
    with atomic_file(tmp_path / "sub" / "new.bin") as tmp:
        tmp.write_bytes(b"x")
    assert _mode(tmp_path / "sub" / "new.bin") == 0o644


def test_atomic_file_follows_a_link_and_keeps_it(tmp_path: Path) -> None:
    (tmp_path / "epoch=0-step=3.ckpt").write_bytes(b"old")
    (tmp_path / "last.ckpt").symlink_to("epoch=0-step=3.ckpt")
    with atomic_file(tmp_path / "last.ckpt") as tmp:
        tmp.write_bytes(b"new")
    assert _tree(tmp_path) == {"epoch=0-step=3.ckpt": b"new", "last.ckpt": "epoch=0-step=3.ckpt"}


def test_check_output_and_check_finite_say_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w").write_text("x")
    inputs = [("--model", tmp_path / "model")]
    with pytest.raises(UserError, match=r"^--output .*/model/w is inside the input --model .*/model: writing there"):
        check_output(tmp_path / "model" / "w", inputs, kind="file")
    with pytest.raises(UserError, match=r"^--output .*/model already exists and is not empty: give --overwrite"):
        check_output(tmp_path / "model", [], kind="folder")
    assert check_output(tmp_path / "model", [], kind="folder", overwrite=True) == tmp_path / "model"
    (tmp_path / "empty").write_bytes(b"")
    assert check_output(tmp_path / "empty", inputs, kind="file") == tmp_path / "empty"  # nothing to lose
    check_finite({"a": torch.ones(2), "steps": torch.tensor([3])}, "x")
    with pytest.raises(UserError, match=r"^the heads file h would hold NaN or inf values in 'b' \(the fit diverged\)"):
        check_finite({"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")])}, "the heads file h")


# ------------------------------------------------------------------------------------------ every writer
def _fail_after_one_file(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    """Make ``target`` (a save function taking tensors and a file name) write a part of the file, then fail."""

    def disk_full(tensors: Any, filename: Any, *args: Any, **kwargs: Any) -> None:
        Path(filename).write_bytes(b"part of a file")
        raise DiskFull(filename)

    monkeypatch.setattr(target, disk_full)


def test_save_pretrained_atomic_is_readable_by_others_and_keeps_the_previous_export_when_a_save_fails(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask_022: None
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_ft.modules.backbone import save_pretrained_atomic

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    save_pretrained_atomic(model, tokenizer, tmp_path / "hf_model")
    assert _mode(tmp_path / "hf_model") == 0o755  # was mkdtemp's 0700
    before = _tree(tmp_path)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)

    def broken(*args: Any, **kwargs: Any) -> None:  # the weights are written, then the tokenizer save fails
        raise DiskFull(tmp_path / "hf_model" / "tokenizer.json")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", broken)
    with pytest.raises(DiskFull):
        save_pretrained_atomic(model, tokenizer, tmp_path / "hf_model")
    assert _tree(tmp_path) == before


def test_save_hf_folder_keeps_the_previous_folder_and_writes_its_extra_files_inside(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_ft.merging import save_hf_folder

    state = load_file(tiny_llama_dir / "model.safetensors")
    save_hf_folder(state, str(tiny_llama_dir), tmp_path / "out", extra_files={"note.json": "{}"})
    assert (tmp_path / "out" / "note.json").read_text() == "{}" and (tmp_path / "out" / "config.json").is_file()
    before = _tree(tmp_path)
    _fail_after_one_file(monkeypatch, "lightning_ft.core.weights.writer._create_shard")
    with pytest.raises(DiskFull):
        save_hf_folder(state, str(tiny_llama_dir), tmp_path / "out", overwrite=True)
    assert _tree(tmp_path) == before


def _delta(value: float) -> Any:
    from lightning_ft.sparse import SparseDelta

    return SparseDelta(shapes={"w": (4,)}, indices={"w": torch.tensor([1, 2], dtype=torch.int32)},
                       values={"w": torch.tensor([0.5, value])})  # fmt: skip


def test_sparse_delta_save_is_atomic_and_refuses_non_finite_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "sparse_delta.safetensors"
    _delta(1.0).save(path)
    before = _tree(tmp_path)
    with pytest.raises(UserError, match=r"^the sparse delta .*sparse_delta.safetensors would hold NaN or inf values "
                                        r"in 'w' \(the fit diverged\), so nothing was written"):  # fmt: skip
        _delta(float("nan")).save(path)
    assert _tree(tmp_path) == before
    _fail_after_one_file(monkeypatch, "lightning_ft.sparse.artifact.save_file")
    with pytest.raises(DiskFull):
        _delta(2.0).save(path)
    assert _tree(tmp_path) == before


def test_compress_keeps_the_previous_artifact(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_ft.merging import compress

    compress(tiny_llama_dir, tiny_llama_dir, tmp_path / "c.safetensors", density=0.5)  # an (empty) update
    before = _tree(tmp_path)
    _fail_after_one_file(monkeypatch, "lightning_ft.merging.compeft.save_file")
    with pytest.raises(DiskFull):
        compress(tiny_llama_dir, tiny_llama_dir, tmp_path / "c.safetensors", density=0.5, overwrite=True)
    assert _tree(tmp_path) == before


def test_save_heads_is_atomic_and_refuses_diverged_heads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_ft.objectives.heads import MultiTokenHeadsMixin

    heads = nn.ModuleList([nn.Linear(2, 2)])
    owner = types.SimpleNamespace(aux_heads=heads, _heads_signature=lambda: {"num_heads": 1})
    path = tmp_path / "aux_heads.safetensors"
    MultiTokenHeadsMixin.save_heads(owner, path)  # type: ignore[arg-type]
    before = _tree(tmp_path)
    with torch.no_grad():
        heads[0].weight[0, 0] = float("nan")
    with pytest.raises(UserError, match=r"^the auxiliary heads file .*aux_heads.safetensors would hold NaN or inf "
                                        r"values in '0.weight'"):  # fmt: skip
        MultiTokenHeadsMixin.save_heads(owner, path)  # type: ignore[arg-type]
    assert _tree(tmp_path) == before
    with torch.no_grad():
        heads[0].weight[0, 0] = 1.0
    _fail_after_one_file(monkeypatch, "safetensors.torch.save_file")
    with pytest.raises(DiskFull):
        MultiTokenHeadsMixin.save_heads(owner, path)  # type: ignore[arg-type]
    assert _tree(tmp_path) == before


def test_copilot_lambda_rewrite_keeps_the_last_link_and_a_failed_write_keeps_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_ft.copilot.mixin import CopilotMixin

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"state_dict": {"copilot_lambda_value": torch.tensor(0.0)}, "copilot": {}}, folder / "epoch=0-step=4.ckpt")
    (folder / "last.ckpt").symlink_to("epoch=0-step=4.ckpt")  # ModelCheckpoint(save_last="link"), the CLI's default
    owner = types.SimpleNamespace(copilot_lambda=0.5, lambda_sweep=[{"lambda": 0.5}],
                                  copilot_lambda_value=torch.tensor(0.5))  # fmt: skip
    trainer = types.SimpleNamespace(is_global_zero=True, strategy=types.SimpleNamespace(barrier=lambda name: None),
                                    checkpoint_callback=types.SimpleNamespace(last_model_path=str(folder / "last.ckpt")))  # fmt: skip
    before = _tree(tmp_path)

    def disk_full(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        Path(f).write_bytes(b"part of a checkpoint")
        raise DiskFull(f)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", disk_full)
        with pytest.raises(DiskFull):
            CopilotMixin._record_lambda_in_last_checkpoint(owner, trainer)  # type: ignore[arg-type]
    assert _tree(tmp_path) == before
    CopilotMixin._record_lambda_in_last_checkpoint(owner, trainer)  # type: ignore[arg-type]
    assert os.readlink(folder / "last.ckpt") == "epoch=0-step=4.ckpt"  # still the link Lightning keeps up to date
    checkpoint = torch.load(folder / "last.ckpt", weights_only=False)
    assert checkpoint["copilot"]["lambda"] == 0.5 and float(checkpoint["state_dict"]["copilot_lambda_value"]) == 0.5
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]


def test_reports_and_predictions_keep_the_previous_file_when_a_write_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_ft.callbacks.predictions import JsonlPredictionWriter
    from lightning_ft.core.io import write_text_atomic

    target = write_text_atomic(tmp_path / "report.json", "old")

    def half_written(self: Path, text: str, encoding: str | None = None) -> int:
        with open(self, "w", encoding=encoding) as f:
            f.write(text[:1])
        raise DiskFull(self)

    monkeypatch.setattr(Path, "write_text", half_written)
    with pytest.raises(DiskFull):
        write_text_atomic(target, "new and longer")
    monkeypatch.undo()
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    import lightning_ft.callbacks.lines as lines_module
    import lightning_ft.callbacks.report as report_module

    assert report_module.write_text_atomic is write_text_atomic is lines_module.write_text_atomic
    # predictions: records stream into a partial file that replaces predictions.jsonl only when predict ends
    (tmp_path / "predictions.jsonl").write_text('{"old": 1}\n')
    writer = JsonlPredictionWriter(output_dir=str(tmp_path))
    pred_trainer = types.SimpleNamespace(default_root_dir=str(tmp_path), global_rank=0, world_size=1)
    writer.on_predict_start(pred_trainer, None)  # type: ignore[arg-type]
    writer.write_on_batch_end(pred_trainer, None, [{"completion": "a"}], None, None, 0, 0)  # type: ignore[arg-type]
    assert (tmp_path / "predictions.jsonl").read_text() == '{"old": 1}\n'  # interrupted here: the old file is whole
    writer.on_predict_end(pred_trainer, None)  # type: ignore[arg-type]
    assert (tmp_path / "predictions.jsonl").read_text() == '{"completion": "a"}\n'
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_a_diverged_model_is_not_exported_over_the_previous_export(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from lightning_ft.modules.backbone import save_pretrained_atomic

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    out = save_pretrained_atomic(model, None, tmp_path / "hf_model")
    before = _tree(out)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match=r"the model exported to .*hf_model would hold NaN or inf values in "
                                        r"'model.layers.0.mlp.up_proj.weight' \(the fit diverged\)"):  # fmt: skip
        save_pretrained_atomic(model, None, out)
    assert _tree(out) == before
