"""The conformance matrix: every method (rows.py) x tiny model (Llama, GPT-2, BERT) x host (our module, a user's own
LightningModule). On every cell that applies: (a) only what the method intends changes, (b) a run resumed from a
mid-run ``last.ckpt`` equals the uninterrupted run bit for bit, (c) every refusal the method's class declares
refuses with its sentence, (d) a 2-process gloo DDP run (one process group for every row, ddp_fit.py) matches one
process, (e) a 2-process gloo FSDP2 run (fsdp_fit.py) matches the DDP run and resumes from its distributed checkpoint
bit for bit, or the method refuses FSDP2 with its declared sentence."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import one_thread  # noqa: F401  (autouse fixture: applies where imported)
from rows import HOSTS, MID, MODELS, ROW, ROWS, build, ddp_rows, fit, fsdp2_rows, params

import lightning_ft.callbacks
import lightning_ft.copilot
import lightning_ft.objectives
from lightning_ft import support
from lightning_ft.objectives import SpanWeights, TokenWeightedDataModule, TokenWeighting

HERE = Path(__file__).resolve().parent
CELLS = [(r.name, m, h) for r in ROWS for m in MODELS for h in HOSTS if r.applies(m, h) is None]
RESUME_CELLS = [cell for cell in CELLS if cell[1] == "llama"]  # resuming is model-independent: one model keeps it fast


def _ids(cells: list[tuple[str, ...]]) -> list[str]:
    return ["-".join(c) for c in cells]


@pytest.fixture(scope="session")
def model_dirs(tiny_llama_dir: Path, tiny_gpt2_dir: Path, tiny_bert_dir: Path) -> dict[str, str]:
    return {"llama": str(tiny_llama_dir), "gpt2": str(tiny_gpt2_dir), "bert": str(tiny_bert_dir)}


class _Runs:
    """The uninterrupted run of each cell, fitted once per session and shared by the properties."""

    def __init__(self, dirs: dict[str, str], root: Path) -> None:
        self.dirs, self.root = dirs, root
        self.cache: dict[tuple[str, str, str], tuple[dict[str, torch.Tensor], L.LightningModule, Any]] = {}

    def get(self, name: str, model: str, host: str) -> tuple[dict[str, torch.Tensor], L.LightningModule, Any]:
        key = (name, model, host)
        if key not in self.cache:
            L.seed_everything(0)
            initial = params(build(ROW[name], model, host, self.dirs[model])[0])
            module, probe = fit(ROW[name], model, host, self.dirs[model], self.root / "-".join(key))
            self.cache[key] = (initial, module, probe)
        return self.cache[key]


@pytest.fixture(scope="session")
def runs(model_dirs: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> _Runs:
    return _Runs(model_dirs, tmp_path_factory.mktemp("matrix"))


# ---------------------------------------------------------------------------------------------- the rows themselves
def test_every_method_has_a_row_and_every_cell_is_run_or_declared_not_applicable() -> None:
    methods = {lightning_ft.callbacks.SparseFineTuning, lightning_ft.callbacks.HalfFineTuning,
               lightning_ft.callbacks.LayerFreezing, lightning_ft.callbacks.LayerwiseSampling,
               lightning_ft.callbacks.LiNeS}  # fmt: skip
    for package in (lightning_ft.objectives, lightning_ft.copilot):
        methods |= {getattr(package, n) for n in package.__all__ if n.endswith("Mixin")}
    rules = {getattr(lightning_ft.callbacks, n) for n in ("LotteryTicket", "Magnitude", "PrincipalWeights", "Random",
                                                          "Sensitivity")}  # fmt: skip
    covered = {row.declared for row in ROWS}
    assert methods <= covered, f"no row for {sorted(m.__name__ for m in methods - covered)}"
    for rule in rules:
        assert any(type(getattr(r.callback("ours"), "rule", None)) is rule for r in ROWS if r.callback), rule
    assert any(row.declared is lightning_ft.objectives.TokenWeighting for row in ROWS)
    for row in ROWS:
        assert set(row.na) <= {*MODELS, *HOSTS, "ddp"} and all(reason.strip() for reason in row.na.values()), row.name
        assert any(row.applies(m, h) is None for m in MODELS for h in HOSTS), row.name


# ---------------------------------------------------------------------------------------------- (a) what changes
def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.detach() != before[n]).reshape(-1) for n, p in module.named_parameters() if not torch.equal(p, before[n])
    }


@pytest.mark.parametrize(("name", "model", "host"), CELLS, ids=_ids(CELLS))
def test_only_the_intended_parameters_change(name: str, model: str, host: str, runs: _Runs) -> None:
    row = ROW[name]
    if host in row.refuses:
        kind, fragment = row.refuses[host]
        with pytest.raises(kind, match=fragment):
            runs.get(name, model, host)
        return
    initial, module, probe = runs.get(name, model, host)
    allowed = probe.allowed(module)
    changed = _changed(initial, module)
    assert changed, "nothing trained"
    assert not set(changed) - set(allowed), f"changed but not intended: {sorted(set(changed) - set(allowed))[:3]}"
    for tensor, entries in changed.items():
        mask = allowed[tensor]
        if mask is not None:
            assert not (entries & ~mask).any(), f"{tensor}: entries outside the masks changed"
    if row.check in ("trainable", "structured", "rewritten"):  # every tensor that trains (or was rewritten) moves
        assert set(changed) == set(allowed), f"trainable but unchanged: {sorted(set(allowed) - set(changed))[:3]}"


# ---------------------------------------------------------------------------------------------- (b) resume
@pytest.mark.parametrize(("name", "model", "host"), RESUME_CELLS, ids=_ids(RESUME_CELLS))
def test_a_resumed_run_equals_the_uninterrupted_run(
    name: str, model: str, host: str, runs: _Runs, model_dirs: dict[str, str], tmp_path: Path
) -> None:
    row = ROW[name]
    if host in row.refuses:
        return  # refused before training (test_only_the_intended_parameters_change)
    _, full, full_probe = runs.get(name, model, host)
    mid = runs.root / f"{name}-{model}-{host}" / "ckpt" / "mid.ckpt"
    resumed, probe = fit(row, model, host, model_dirs[model], tmp_path, ckpt=str(mid))
    assert resumed.trainer.global_step == full.trainer.global_step
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), f"{n}: {(p - q).abs().max():.3g}"
    for a, b in zip(full.trainer.optimizers, resumed.trainer.optimizers, strict=True):  # moments, GaLore bases...
        _assert_same(a.state_dict(), b.state_dict(), "optimizer")
    if probe.method is not None:  # masks, compact states, draws, schedule position, events...
        _assert_same(full_probe.method.state_dict(), probe.method.state_dict(), type(probe.method).__name__)
    if row.check == "selection":  # the same tensors train at every resumed step, requires_grad included
        assert probe.watch.history == full_probe.watch.history[MID:]
        assert probe.watch.requires_grad == full_probe.watch.requires_grad[MID:]


def _assert_same(a: Any, b: Any, where: str) -> None:
    """``a`` and ``b`` are equal, tensors bit for bit, recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {set(a) ^ set(b)}"
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ---------------------------------------------------------------------------------------------- (c) refusals
def declared_refusals(cls: type) -> dict[str, str]:
    """The refusal sentences a class declares or inherits, by feature (empty when no class in its MRO declares)."""
    declared = support.support_of(cls)
    return {} if declared is support.GENERIC else dict(declared.refusals)


_LORA = {"r": 2, "target_modules": ["q_proj"]}
REFUSALS = [(r.name, f) for r in ROWS for f in sorted(declared_refusals(r.declared))]


@pytest.fixture(scope="session")
def wrapped(model_dirs: dict[str, str]) -> dict[str, Any]:
    """Our module on a LoRA and on an nf4-quantized (LoRA) tiny Llama, built once."""
    from lightning_ft.modules import CausalLMModule

    return {
        "lora": CausalLMModule(model=model_dirs["llama"], peft=_LORA, output_dir=""),
        "quantized": CausalLMModule(model=model_dirs["llama"], peft=_LORA, quantization="nf4", output_dir=""),
    }


@pytest.mark.parametrize(("name", "feature"), REFUSALS, ids=_ids(REFUSALS))
def test_every_declared_refusal_refuses_with_its_sentence(
    name: str, feature: str, model_dirs: dict[str, str], wrapped: dict[str, Any]
) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    row = ROW[name]
    strategy = ModelParallelStrategy() if feature == "fsdp2" else L.Trainer(accelerator="cpu", logger=False).strategy
    precision = "bf16-mixed" if feature == "mixed" else "32-true"
    trainer = types.SimpleNamespace(strategy=strategy, precision=precision, callbacks=[], datamodule=None)
    mixin = row.module is not None and row.callback is None and row.declared is not TokenWeighting
    if feature in wrapped and mixin:  # a mixin refuses such a backbone when it is built: its module is the method
        kwargs = {"peft": _LORA, **({"quantization": "nf4"} if feature == "quantized" else {})}
        with pytest.raises(ValueError) as err:
            row.module(model_dirs["llama"], **kwargs)  # type: ignore[misc]
        name = row.module.cls.__name__  # type: ignore[union-attr]
        assert str(err.value) == declared_refusals(row.declared)[feature].format(name=name, strategy="", model="")
        return
    if feature in wrapped:
        module = wrapped[feature]
    elif row.module is not None:
        module = row.module(model_dirs["llama"])
    else:
        module = build(row, "llama", "ours", model_dirs["llama"])[0]
    if row.declared is TokenWeighting:  # the DataModule that applies the weights checks the provider's declaration
        method: Any = TokenWeightedDataModule(weighting=SpanWeights(), control=None)
        trainer.lightning_module = module
    else:
        method = row.callback("ours") if row.callback is not None else module
    checked = method.weighting if row.declared is TokenWeighting else method
    expected = declared_refusals(row.declared)[feature].format(
        name=type(checked).__name__, strategy=type(strategy).__name__, model=type(module.backbone).__name__
    )  # the sentence names the method's own class (CopilotCausalLM, a user's subclass...)
    with pytest.raises(ValueError) as err:
        if row.callback is not None:  # the callback's own setup consults the declaration
            trainer.callbacks = [method]
            method.setup(trainer, module, "fit")
        elif row.declared is TokenWeighting:  # the DataModule's setup does, before it loads any data
            method.trainer = trainer
            method.setup("fit")
        else:  # the module's own setup does
            module._trainer = trainer
            module.setup("fit")
    assert str(err.value) == expected


def test_declared_support_is_the_public_lookup() -> None:
    """The refusals above come from the same declarations ``check_support`` reads (the README table's rows); the
    legacy sharded strategies are refused by every method with one sentence naming ModelParallelStrategy."""
    fsdp2 = types.SimpleNamespace(strategy=type("ModelParallelStrategy", (), {})(), precision="32-true")
    for row in ROWS:
        name = row.declared.__name__
        for legacy in ("FSDPStrategy", "DeepSpeedStrategy"):
            trainer = types.SimpleNamespace(strategy=type(legacy, (), {})(), precision="32-true")
            with pytest.raises(ValueError) as err:
                support.check_support(row.declared, trainer)
            assert str(err.value) == support.legacy_refusal(support.support_of(row.declared), name, legacy)
            assert "strategy='ddp'" in str(err.value)
        refusals = declared_refusals(row.declared)
        if "fsdp2" not in refusals:
            support.check_support(row.declared, fsdp2)  # supported: no refusal
            continue
        with pytest.raises(ValueError) as err:
            support.check_support(row.declared, fsdp2)
        assert str(err.value) == refusals["fsdp2"].format(name=name, strategy="ModelParallelStrategy", model="NoneType")


# ---------------------------------------------------------------------------------------------- (d) DDP
DDP_ROWS = [row.name for row in ddp_rows()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun_rows(script: str, model_dir: str, out: Path, rows: list[str]) -> Path:
    """Run ``script`` (ddp_fit.py or fsdp_fit.py) for ``rows`` in ONE 2-process gloo group under torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(HERE / script), model_dir, str(out), *rows]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.fixture(scope="session")
def ddp_results(model_dirs: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every DDP row fitted in ONE 2-process gloo group (ddp_fit.py, run by torchrun); rank 0's weights per row."""
    return _torchrun_rows("ddp_fit.py", model_dirs["llama"], tmp_path_factory.mktemp("ddp"), DDP_ROWS)


@pytest.mark.ddp
@pytest.mark.parametrize("name", DDP_ROWS)
def test_two_process_ddp_matches_one_process(name: str, runs: _Runs, ddp_results: Path) -> None:
    result = torch.load(ddp_results / f"{name}.pt", weights_only=True)
    assert result["ranks_agree"], "the two processes ended with different weights"
    initial, single, _ = runs.get(name, "llama", "ours")
    assert any(not torch.equal(result["params"][n], initial[n]) for n in initial), "nothing trained under DDP"
    if ROW[name].ddp_differs:
        return  # declared: the processes agree, but by design not with one process
    for n, p in single.named_parameters():
        # another summation order changes the float rounding, which Adam's normalisation amplifies where a gradient
        # is near zero: ~1e-5 after 6 steps on an AVX-512 Xeon, but on an AVX2 EPYC (whose BLAS sums in another
        # order from run to run) a few entries of a matrix with near-zero gradients moved by up to 3e-3. Training
        # other entries or batches moves most entries by ~lr = 1e-2, so: at most 0.1% of a tensor's entries beyond
        # 1e-4, and none beyond lr
        diff = (result["params"][n] - p.detach()).abs()
        assert diff.max().item() <= 1e-2, f"{n}: {diff.max().item():.3g}"
        assert (diff > 1e-4).float().mean().item() <= 1e-3, f"{n}: {(diff > 1e-4).float().mean().item():.2%} beyond 1e-4"


# ---------------------------------------------------------------------------------------------- (e) FSDP2
FSDP2_ROWS = [row.name for row in fsdp2_rows()]


@pytest.fixture(scope="session")
def fsdp2_results(model_dirs: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every FSDP2 row fitted, then resumed from its step-MID distributed checkpoint, in ONE 2-process gloo group
    (fsdp_fit.py, run by torchrun); rank 0's gathered weights and method state per row."""
    return _torchrun_rows("fsdp_fit.py", model_dirs["llama"], tmp_path_factory.mktemp("fsdp2"), FSDP2_ROWS)


@pytest.mark.ddp
@pytest.mark.parametrize("name", FSDP2_ROWS)
def test_fsdp2_matches_ddp_and_resumes_from_its_distributed_checkpoint(
    name: str, fsdp2_results: Path, ddp_results: Path, runs: _Runs
) -> None:
    row = ROW[name]
    result = torch.load(fsdp2_results / f"{name}.pt", weights_only=False)
    refusals = declared_refusals(row.declared)
    if "fsdp2" in refusals:  # refused in setup(), on both processes, with its sentence
        cls = row.module.cls if row.callback is None and row.module is not None else row.declared  # type: ignore[union-attr]
        expected = refusals["fsdp2"].format(name=cls.__name__, strategy="FSDP2Strategy", model="LlamaForCausalLM")
        assert "refused" in result, f"{name} declares an FSDP2 refusal but trained under FSDP2"
        assert result["refused"].startswith(expected), result["refused"]
        return
    assert "refused" not in result, result.get("refused")
    assert result["frozen_stateless"], "a tensor left out had a gradient or optimizer state, or was not sharded"
    ddp = torch.load(ddp_results / f"{name}.pt", weights_only=True)["params"]
    assert result["params"].keys() == ddp.keys()
    initial = runs.get(name, "llama", "ours")[0]
    assert any(not torch.equal(result["params"][n], initial[n]) for n in initial), "nothing trained under FSDP2"
    for n, p in ([] if row.fsdp2_differs else ddp.items()):  # the same reduction (a mean over the two processes' gradients), sharded
        diff = (result["params"][n] - p).abs().max().item()
        assert diff <= 1e-5, f"{n}: {diff:.3g}"
    for n, p in result["params"].items():
        assert torch.equal(result["resumed"][n], p), f"resumed {n}: {(result['resumed'][n] - p).abs().max():.3g}"
    _assert_same(result["state"], result["resumed_state"], name)
