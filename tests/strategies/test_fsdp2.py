"""FSDP2 (``strategy: fsdp2``, Lightning's ModelParallelStrategy): our modules shard each block, the fit-end export
gathers one tensor at a time onto rank 0 and loads in transformers (and peft), and ``lightning-ft fit`` runs under
``torchrun`` with 2 CPU processes, writing a distributed checkpoint that equals its export. Every method's FSDP2
behaviour (equal to DDP, resumed from its distributed checkpoint bit for bit, or refused) is checked by the conformance
matrix (tests/conformance, property e)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_ft.core.snapshot import PretrainedSnapshot
from lightning_ft.strategies.fsdp2 import _blocks

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}", *args]
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_the_blocks_are_the_decoder_layers(tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert _blocks(llama) == list(llama.model.layers)
    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    assert _blocks(gpt2) == list(gpt2.transformer.h)


def test_the_snapshot_reads_only_a_shards_rows(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    snapshot = PretrainedSnapshot.capture(model)
    name = "model.layers.1.mlp.down_proj.weight"
    whole = snapshot.get(name)
    assert snapshot.storage == "disk" and torch.equal(snapshot.get(name, rows=(3, 5)), whole[3:8])
    assert snapshot.get(name, rows=(whole.shape[0], 0)).shape == (0, whole.shape[1])  # a rank holding no rows


def test_a_merged_adapter_export_is_refused_under_fsdp2(tiny_llama_dir: Path) -> None:
    import types

    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_ft.modules import CausalLMModule

    module = CausalLMModule(model=str(tiny_llama_dir), peft={"r": 2, "target_modules": ["q_proj"]}, merge_adapter=True,
                            output_dir="")  # fmt: skip
    module._trainer = types.SimpleNamespace(strategy=ModelParallelStrategy())
    with pytest.raises(ValueError, match=r"^merge_adapter=True merges the adapter into a whole copy of the model, "):
        module.configure_model()


# ---------------------------------------------------------------------------------------------- the export
@pytest.fixture(scope="module")
def exported(tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full and a LoRA causal LM and a classifier fitted under FSDP2 in one 2-process gloo group, each exporting
    hf_model."""
    out = tmp_path_factory.mktemp("fsdp2_export")
    _torchrun([str(HERE / "fsdp2_export.py"), str(tiny_llama_dir), str(tiny_bert_dir), str(out)])
    return out


@pytest.mark.ddp
@pytest.mark.parametrize("kind", ["full", "classifier"])
def test_the_export_loads_in_transformers_and_equals_the_gathered_weights(exported: Path, kind: str) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    result = torch.load(exported / f"{kind}.pt", weights_only=True)
    auto = AutoModelForCausalLM if kind == "full" else AutoModelForSequenceClassification
    model = auto.from_pretrained(exported / kind / "hf_model")
    loaded = dict(model.named_parameters())
    assert set(loaded) == set(result["weights"])
    for name, tensor in result["weights"].items():
        assert torch.equal(loaded[name], tensor), name
    sizes = sorted((t.numel() * t.element_size() for t in result["weights"].values()), reverse=True)
    # one tensor at a time: at most the one being written and the next one gathered, never the whole model
    assert result["export_peak"] <= sizes[0] + sizes[1] < result["model_bytes"]


@pytest.mark.ddp
def test_a_lora_export_is_the_adapter_and_loads_in_peft(exported: Path, tiny_llama_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = torch.load(exported / "lora.pt", weights_only=True)
    assert (exported / "lora" / "hf_model" / "adapter_config.json").is_file()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                      exported / "lora" / "hf_model")  # fmt: skip
    loaded = dict(model.named_parameters())
    adapters = {n: t for n, t in result["weights"].items() if "lora_" in n}
    assert adapters and all(torch.equal(loaded[n], t) for n, t in adapters.items())
    assert any(not torch.equal(t, torch.zeros_like(t)) for n, t in adapters.items() if "lora_B" in n), "B trained"
    assert result["export_peak"] <= sum(t.numel() * t.element_size() for t in adapters.values())


@pytest.mark.ddp
def test_a_sharded_sparse_fine_tuning_writes_one_artifact_of_every_process_rows(
    exported: Path, tiny_llama_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from lightning_ft.sparse import SparseDelta

    result = torch.load(exported / "sparse.pt", weights_only=True)
    delta = SparseDelta.load(exported / "sparse.safetensors")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    delta.apply(base)
    eligible = sum(p.numel() for n, p in base.named_parameters() if p.ndim == 2 and "layers." in n)
    assert 0 < delta.numel <= round(0.05 * eligible)  # one global top-k over both processes' rows
    for name, param in base.named_parameters():  # base + delta is the fitted model, and only masked entries moved
        assert torch.equal(param, result["weights"][name]), name
        moved = int((param != before[name]).sum())
        assert moved == (delta.indices[name].numel() if name in delta.indices else 0), name
    half = {n: result["weights"][n].numel() // 2 for n in delta.indices}
    assert any(bool((i.long() < half[n]).any()) for n, i in delta.indices.items())  # rank 0's rows (lower half)
    assert any(bool((i.long() >= half[n]).any()) for n, i in delta.indices.items())  # and rank 1's


@pytest.mark.ddp
def test_generation_keeps_the_processes_in_step(exported: Path) -> None:
    # rank 0 stops after 2 tokens, rank 1 after 5: without synced forward passes rank 1 would wait for rank 0 forever
    assert [torch.load(exported / f"generated{rank}.pt") for rank in (0, 1)] == [2, 5]


@pytest.mark.ddp
def test_the_copilot_trains_replicated_beside_a_sharded_pilot(exported: Path, tiny_llama_dir: Path) -> None:
    from lightning_ft.copilot import CopilotCausalLM

    result = torch.load(exported / "copilot.pt", weights_only=False)
    assert result["agree"], "the two processes' Copilots differ: their gradients were not averaged"
    assert any(not torch.equal(t, result["before"][n]) for n, t in result["after"].items()), "the Copilot trained"
    assert [row["lambda"] for row in result["sweep"]] == [0.0, 0.5, 1.0]
    assert result["lambda"] in (0.0, 0.5, 1.0)
    # chosen after the last checkpoint was written, then recorded in its metadata file (a distributed checkpoint)
    assert result["last"]["lambda"] == result["lambda"] and result["last"]["lambda_sweep"] == result["sweep"]
    loaded = CopilotCausalLM(model=str(tiny_llama_dir), copilot_path=str(exported / "copilot" / "copilot"),
                             copilot_layers=2, output_dir="")  # fmt: skip
    assert loaded.copilot_lambda == result["lambda"]
    for name, tensor in loaded.copilot.state_dict().items():
        assert torch.equal(tensor, result["after"][name]), name


@pytest.mark.ddp
def test_galore_on_row_shards_equals_galore_on_whole_matrices_and_resumes_exactly(tmp_path: Path) -> None:
    _torchrun([str(HERE / "galore_fsdp2.py"), str(tmp_path)])
    result = torch.load(tmp_path / "galore.pt", weights_only=False)
    # (global, this process's) basis shapes: a wide matrix keeps its rows of U_r (7 rows: 4 + 3), a tall one all of V_r^T
    assert result["bases"] == {"0.weight": ((7, 3), (4, 3)), "1.weight": ((3, 7), (3, 7)),
                               "3.weight": ((5, 3), (3, 3)), "4.weight": ((3, 5), (3, 5))}  # fmt: skip
    for name, whole in result["whole"].items():
        assert not torch.equal(whole, result["initial"][name]), name
        assert torch.allclose(result["sharded"][name], whole, atol=1e-6, rtol=0), name  # three new bases in 5 steps
        assert torch.equal(result["resumed"][name], result["sharded"][name]), name


# ---------------------------------------------------------------------------------------------- the command line
@pytest.mark.ddp
def test_lightning_ft_fit_runs_under_torchrun_with_fsdp2(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "fsdp2", "max_steps": 4, "gradient_clip_val": 1.0,
                    "num_sanity_val_steps": 0, "val_check_interval": 4, "check_val_every_n_epoch": None,
                    "enable_progress_bar": False,
                    "callbacks": [{"class_path": "ForgettingReport"},
                                  {"class_path": "LiNeS", "init_args": {"alpha": 0.5}}]},
        "model": {"class_path": "lightning_ft.modules.CausalLMModule",
                  "init_args": {"model": str(tiny_llama_dir), "learning_rate": 1e-3, "warmup_steps": 1}},
        "data": {"class_path": "lightning_ft.data.InstructionDataModule",
                 "init_args": {"dataset": "rotten_tomatoes", "prompt_template": "Review: {text}\nSentiment:",
                               "response_template": " {label}", "label_field": "label",
                               "label_options": ["positive", "negative"], "train_size": 32, "val_size": 8,
                               "test_size": 0, "batch_size": 4, "max_length": 48, "control": "humaneval",
                               "control_size": 4}},
    }  # fmt: skip
    (tmp_path / "fsdp2.yaml").write_text(yaml.safe_dump(config))
    fit = ["-m", "lightning_ft.cli", "fit", "--config", "fsdp2.yaml", "--run_name", "sharded"]
    _torchrun(fit, cwd=tmp_path)
    run = tmp_path / "runs" / "sharded"
    last = run / "checkpoints" / "last.ckpt"
    assert (last / ".metadata").is_file() and (last / "meta.pt").is_file()  # a distributed checkpoint: one folder
    assert len(list(last.glob("*.distcp"))) == 2 and (run / "report.md").is_file()
    dcp_to_torch_save(last, tmp_path / "full.pt")
    state = torch.load(tmp_path / "full.pt", weights_only=False)["state_dict"]
    exported = AutoModelForCausalLM.from_pretrained(run / "hf_model")
    for name, param in exported.named_parameters():  # LiNeS re-saved the checkpoint after its edit
        assert torch.equal(param, state[f"backbone.{name}"]), name


@pytest.mark.ddp
def test_caft_heads_train_sharded_and_their_file_holds_the_gathered_heads(exported: Path) -> None:
    from safetensors.torch import load_file

    result = torch.load(exported / "caft.pt", weights_only=True)
    heads = load_file(exported / "heads.safetensors")
    assert heads and all(torch.equal(t, result["weights"][f"aux_heads.{k}"]) for k, t in heads.items())


# ---------------------------------------------------------------------------------------------- sharded top-k
@pytest.mark.ddp
def test_sharded_topk_chooses_exactly_what_one_process_chooses(exported: Path) -> None:
    from fsdp2_export import topk_scores

    from lightning_ft.sparse.topk import global_topk, tensor_topk

    scores = topk_scores()
    ranks = [torch.load(exported / f"topk{r}.pt", weights_only=True) for r in range(2)]
    expected = [global_topk(scores, 37), {n: tensor_topk(s, 3 + i) for i, (n, s) in enumerate(scores.items())}]
    for which, want in enumerate(expected):
        for name, score in scores.items():
            offset = (score.chunk(2)[0].shape[0] if score.shape[0] > 1 else score.shape[0]) * score[0].numel()
            got = torch.cat([ranks[0][which][name], ranks[1][which][name] + offset])
            assert got.tolist() == want[name].tolist(), (which, name)
