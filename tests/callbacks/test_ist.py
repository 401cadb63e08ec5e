"""IST (ImportanceLayerSampling): each probe's losses are those of the model with the drawn layers' PEFT output (or,
for a full model, their update) scaled by the suppression factor, and the scores move by the REINFORCE formula; only
the drawn layers train and hold optimizer state; the update draw follows sigmoid(-s) (or the lowest scores); bad
arguments and unsupported adapters are refused in one sentence; on SmolLM2 with LoRA it learns. Resume, DDP, FSDP2 and
the user's own module are the conformance matrix's row ``ist`` (tests/conformance)."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from helpers import first_batch_loss, make_trainer

from lightning_ft.callbacks import ImportanceLayerSampling
from lightning_ft.modules import CausalLMModule

LAYERS = 8


class _Host(L.LightningModule):
    """A tiny 8-block Llama, LoRA-wrapped (non-zero adapters, so that suppressing one changes the loss) or full."""

    def __init__(self, adapter: str | None = "lora") -> None:
        super().__init__()
        from peft import IA3Config, LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                          num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        model = LlamaForCausalLM(cfg)
        if adapter == "lora":
            model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                     init_lora_weights=False))  # fmt: skip
        elif adapter == "ia3":
            model = get_peft_model(
                model, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
            )
        self.model = model

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _loader(n: int = 32) -> torch.utils.data.DataLoader:
    ids = torch.randint(3, 300, (n, 12), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader([{"input_ids": r, "labels": r} for r in ids], batch_size=4)


def _stub(step: int = 10) -> Any:
    return SimpleNamespace(global_step=step, world_size=1, is_global_zero=True, loggers=[])


def _fitted(
    tmp_path: Path, adapter: str | None, steps: int = 2, **kwargs: Any
) -> tuple[ImportanceLayerSampling, _Host]:
    host = _Host(adapter)
    ist = ImportanceLayerSampling(**{"interval": 1000, **kwargs})
    make_trainer(tmp_path, steps, callbacks=[ist]).fit(host, _loader())
    return ist, host


def _block_of(name: str) -> int | None:
    parts = name.split(".layers.")
    return int(parts[1].split(".")[0]) if len(parts) > 1 else None


@pytest.mark.parametrize("adapter", ["lora", None])
def test_probe_losses_suppress_the_drawn_layers_and_scores_follow_the_formula(
    tmp_path: Path, adapter: str | None
) -> None:
    ist, host = _fitted(tmp_path, adapter)
    model = host.model
    theta0 = {n: p.detach().clone() for n, p in _Host(adapter).model.named_parameters()}  # the same seed: theta_0
    ist.scores = [0.8, -0.4, 0.1, 0.0, -1.2, 0.5, 0.3, -0.1]
    before_scores = list(ist.scores)
    before_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = next(iter(_loader()))
    ist._probe(_stub(), batch, random.Random(3))
    for name, value in before_weights.items():  # the probe leaves every weight as it found it
        assert torch.equal(value, model.get_parameter(name)), name
    f, sets, losses = ist.suppression_factor, ist.last_probe["sets"], ist.last_probe["losses"]
    assert len(sets) == ist.probes and len({tuple(s) for s in sets}) == ist.probes  # distinct sets of L/2 layers
    assert all(len(s) == LAYERS // 2 for s in sets)
    for chosen, loss in zip(sets, losses):  # each loss, recomputed by hand
        with torch.no_grad():
            if adapter == "lora":
                layers = [m for n, m in model.named_modules() if isinstance(getattr(m, "scaling", None), dict)
                          and _block_of(n) in chosen]  # fmt: skip
                for layer in layers:
                    layer.scaling = {k: v * f for k, v in layer.scaling.items()}
            else:
                for name, param in model.named_parameters():
                    if _block_of(name) in chosen:
                        param.copy_(theta0[name] + f * (param - theta0[name]))
            model.eval()
            expected = model(**batch).loss.item()
            model.train()
            if adapter == "lora":
                for layer in layers:
                    layer.scaling = {k: v / f for k, v in layer.scaling.items()}
            else:
                for name, value in before_weights.items():
                    model.get_parameter(name).copy_(value)
        assert loss == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert max(losses) - min(losses) > 1e-4  # the suppression matters: the test could see a wrong set
    rewards = [math.exp(-loss) for loss in losses]
    mean = sum(rewards) / len(rewards)
    p = [1 / (1 + math.exp(-s)) for s in before_scores]
    expected_scores = list(before_scores)
    for chosen, r in zip(sets, rewards):
        for i in chosen:
            expected_scores[i] += 10.0 * (r - mean) * p[i] * (1 - p[i])
    assert ist.scores == pytest.approx(expected_scores, abs=1e-9)
    assert ist.importance == pytest.approx([1 / (1 + math.exp(s)) for s in expected_scores])


def test_symmetric_update_moves_the_other_layers_the_opposite_way(tmp_path: Path) -> None:
    ist, _ = _fitted(tmp_path, "lora", steps=1, score_update="symmetric")
    ist._probe(_stub(), next(iter(_loader())), random.Random(0))
    sets, losses = ist.last_probe["sets"], ist.last_probe["losses"]
    rewards = [math.exp(-loss) for loss in losses]
    mean = sum(rewards) / len(rewards)
    expected = [sum((r - mean) * 0.25 * 10.0 * (1 if i in s else -1) for s, r in zip(sets, rewards)) for i in range(8)]
    assert ist.scores == pytest.approx(expected, abs=1e-9)


class _Steps(L.Callback):
    """Per optimizer step: the blocks whose adapters hold a gradient, the blocks the optimizer keeps state of, and
    the adapters' values."""

    def __init__(self, ist: ImportanceLayerSampling) -> None:
        self.ist = ist
        self.rows: list[tuple[list[int], set[int], set[int]]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        graded = {_block_of(n) for n, p in pl_module.named_parameters() if p.grad is not None}
        self.rows.append((list(self.ist.current_blocks), graded, set()))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.rows[-1][2].update(_block_of(names[id(p)]) for p in trainer.optimizers[0].state)


def test_only_the_drawn_layers_train_and_hold_optimizer_state(tmp_path: Path) -> None:
    host = _Host("lora")
    start = {n: p.detach().clone() for n, p in host.named_parameters() if "lora_" in n}
    ist = ImportanceLayerSampling(interval=3)
    steps = _Steps(ist)
    make_trainer(tmp_path, 7, callbacks=[ist, steps]).fit(host, _loader())
    drawn = [tuple(row[0]) for row in steps.rows]
    assert len(set(drawn)) > 1  # a new draw every step (switch_every=1)
    for blocks, graded, state in steps.rows:
        assert len(blocks) == 2 and graded == set(blocks) and state == set(blocks)
    ever = {b for row in steps.rows for b in row[0]}
    for name, value in start.items():  # adapters of layers never drawn did not move
        assert torch.equal(value, host.get_parameter(name)) == (_block_of(name) not in ever), name
    assert ist.last_probe["step"] == 6 and any(ist.scores)  # probes after steps 3 and 6 (never before the first)


def test_the_update_draw_follows_sigmoid_of_minus_the_score_or_takes_the_lowest(tmp_path: Path) -> None:
    ist, _ = _fitted(tmp_path, "lora", steps=1, update_fraction=1 / LAYERS)
    ist.scores = [-2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 0.0]
    ist.next_probe = 10**9
    counts = Counter()
    for index in range(4000):
        ist.draw(index, _stub(), None)  # type: ignore[arg-type]
        counts[ist.current_blocks[0]] += 1
    weights = [1 / (1 + math.exp(s)) for s in ist.scores]
    for block, weight in enumerate(weights):
        share = weight / sum(weights)
        assert abs(counts[block] / 4000 - share) < 4 * math.sqrt(share * (1 - share) / 4000) + 1e-3, block
    ist.selection_rule = "top_k"
    ist.update_fraction = 0.25
    ist.draw(0, _stub(), None)  # type: ignore[arg-type]
    assert ist.current_blocks == [0, 1]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"update_fraction": 0.0}, "update_fraction=0.0 must be in (0, 1]"),
        ({"suppress_fraction": 1.5}, "suppress_fraction=1.5 must be in (0, 1]"),
        ({"interval": 0}, "interval=0 must be a positive integer"),
        ({"probes": 2.5}, "probes=2.5 must be a positive integer"),
        ({"suppression_factor": 1.0}, "suppression_factor=1.0 must be in [0, 1)"),
        ({"score_lr": -1.0}, "score_lr=-1.0 must be a positive number"),
        ({"selection": "greedy"}, "selection='greedy' is not a known choice"),
        ({"score_update": "all"}, "score_update='all' is not a known choice"),
    ],
)
def test_bad_arguments_are_refused_in_one_sentence(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        ImportanceLayerSampling(**kwargs)


def test_adapters_without_lora_scaling_and_batches_without_labels_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="do not have: use a LoRA-family peft adapter"):
        make_trainer(tmp_path, 1, callbacks=[ImportanceLayerSampling()]).fit(_Host("ia3"), _loader())
    ids = torch.randint(3, 300, (8, 12))
    unlabelled = torch.utils.data.DataLoader([{"input_ids": r} for r in ids], batch_size=4)
    host = _Host("lora")
    host.training_step = lambda batch, batch_idx: (
        host.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    )
    with pytest.raises(ValueError, match="needs 'input_ids' and 'labels' fields"):
        make_trainer(tmp_path, 3, callbacks=[ImportanceLayerSampling(interval=1)]).fit(host, unlabelled)


@pytest.mark.slow
def test_smollm2_lora_ist_learns_with_a_quarter_of_the_layers(smollm2_dir: Path, tmp_path: Path) -> None:
    peft = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}
    module = CausalLMModule(model=str(smollm2_dir), learning_rate=1e-3, warmup_steps=0, output_dir="", peft=peft)
    data, batch, loss_before = first_batch_loss(module, train_size=48, batch_size=4, max_length=40)
    start = {n: p.detach().clone() for n, p in module.backbone.named_parameters() if "lora_" in n}
    ist = ImportanceLayerSampling(interval=4)
    steps = _Steps(ist)
    make_trainer(tmp_path, 8, callbacks=[ist, steps], gradient_clip_val=1.0).fit(module, data)
    with torch.no_grad():
        loss_after = module.compute_loss(batch).item()
    assert all(len(row[0]) == 7 and row[1] == set(row[0]) for row in steps.rows)  # int(0.25 * 30) layers per step
    ever = {b for row in steps.rows for b in row[0]}
    moved = {n for n, v in start.items() if not torch.equal(v, module.backbone.get_parameter(n))}
    assert {_block_of(n) for n in moved} == ever  # B starts at zero: a layer drawn once, first, moves B only
    assert ist.last_probe["step"] == 8 and any(ist.scores)
    assert loss_after < loss_before - 0.1


def test_a_quantized_lora_backbone_trains_only_the_drawn_adapters(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # hidden size 64: bitsandbytes' CPU eval path (the probe's) fails on the fixtures' 32
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(tmp_path / "model")
    peft = {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    module = CausalLMModule(model=str(tmp_path / "model"), quantization="nf4", peft=peft, learning_rate=1e-2,
                            output_dir="")  # fmt: skip
    start = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    ist = ImportanceLayerSampling(interval=1)  # 2 blocks: one trains per step, one is suppressed per probe
    steps = _Steps(ist)
    ids = torch.randint(3, 300, (16, 12), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
    make_trainer(tmp_path, 3, callbacks=[ist, steps]).fit(module, torch.utils.data.DataLoader(rows, batch_size=4))
    assert all(len(row[0]) == 1 and row[1] == set(row[0]) for row in steps.rows)
    moved = {n for n, v in start.items() if not torch.equal(v, module.get_parameter(n))}
    assert moved and all("lora_" in n for n in moved)
    assert {_block_of(n) for n in moved} == {b for row in steps.rows for b in row[0]}
    assert ist.last_probe["step"] == 3 and len(ist.last_probe["losses"]) == 3
