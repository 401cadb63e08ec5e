"""UL2's mixture of denoisers: corruption statistics, mixture shares, the prefix-LM mask (as a tensor and inside a
model's forward pass), a CLI fit on a tiny Llama, a short SmolLM2 fit whose denoising loss falls, refused options."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import make_trainer

from lightning_ft.data.collate import IGNORE_INDEX
from lightning_ft.data.ul2 import (
    PAPER_MIXTURE,
    DenoisingDataModule,
    MixtureOfDenoisersCollator,
    PrefixLMMaskMixin,
    noise_spans,
    prefix_lm_mask,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.mark.parametrize(("rate", "mean_span"), [(0.15, 3), (0.15, 8), (0.5, 3), (0.5, 32), (0.15, 64), (0.5, 64)])
def test_corruption_rate_and_mean_span_match_the_settings(rate: float, mean_span: float) -> None:
    """Over 100 texts of 4096 tokens: corrupted share within 0.005 of r, mean span length within 5% of mu.

    The span count is rounded (``round(L * r / mu)``), so the mean span of one length is off by at most half a span
    count: 4.1% for mu=64, r=0.15 at 4096 tokens (9.6 spans rounded to 10), under 0.5% for the others.
    """
    rng = random.Random(0)
    hidden = spans_seen = 0
    lengths: list[int] = []
    for _ in range(100):
        spans = noise_spans(4096, rate, mean_span, rng)
        assert all(a < b for a, b in spans) and all(b < c for (_, b), (c, _) in itertools.pairwise(spans))
        hidden += sum(b - a for a, b in spans)
        spans_seen += len(spans)
        lengths += [b - a for a, b in spans]
    assert abs(hidden / (100 * 4096) - rate) < 0.005
    assert abs(hidden / spans_seen - mean_span) / mean_span < 0.05
    assert len(set(lengths)) > 1  # span lengths vary around the mean


def test_span_corruption_layout_restores_the_text(tokenizer: Any) -> None:
    """Prefix = mode token + text with each span replaced by its sentinel; target = sentinel + span, ..., EOS."""
    collator = MixtureOfDenoisersCollator(tokenizer, max_length=2000)
    rng = random.Random(1)
    text = list(range(100, 300))
    for which, den in enumerate(collator.denoisers):
        ex = collator.corrupt(text, rng, which)
        prefix, target = ex["input_ids"][: ex["prefix_length"]], ex["input_ids"][ex["prefix_length"] :]
        assert ex["labels"] == [IGNORE_INDEX] * len(prefix) + target and target[-1] == tokenizer.eos_token_id
        mode = collator.mode_ids[den.mode]
        assert prefix[len(collator.lead) : len(collator.lead) + len(mode)] == mode
        if den.mode == "S":
            assert prefix[len(collator.lead) + len(mode) :] + target[:-1] == text
            continue
        rebuilt = prefix[len(collator.lead) + len(mode) :]
        for k, (a, b) in enumerate(ex["noise_spans"]):
            s = collator.sentinel(k)
            at = rebuilt.index(s[0])
            assert rebuilt[at : at + len(s)] == s
            rebuilt[at : at + len(s)] = text[a:b]
        assert rebuilt == text


def test_s_denoiser_target_share_is_uniform_with_mean_r(tokenizer: Any) -> None:
    """S(r=0.25): target share averages 0.25 (within 0.01 over 2000 draws) and spreads over 0 .. 0.5."""
    collator = MixtureOfDenoisersCollator(tokenizer, max_length=400, denoisers=[{"mode": "S", "rate": 0.25}])
    rng = random.Random(2)
    shares: list[float] = []
    for _ in range(2000):
        ((a, b),) = collator.corrupt(list(range(100, 300)), rng)["noise_spans"]
        shares.append((b - a) / 200)
    assert abs(sum(shares) / len(shares) - 0.25) < 0.01
    assert min(shares) < 0.02 and 0.47 < max(shares) <= 0.5


def test_mixture_proportions_match_the_weights(tokenizer: Any) -> None:
    """The paper mixture: each denoiser's share within 0.015 of its weight share over 20000 draws; S is 20%."""
    collator = MixtureOfDenoisersCollator(tokenizer, max_length=64)
    rng = random.Random(3)
    counts = [0] * len(PAPER_MIXTURE)
    for _ in range(20000):
        counts[collator.draw(rng)] += 1
    total = sum(d.weight for d in PAPER_MIXTURE)
    for count, den in zip(counts, PAPER_MIXTURE):
        assert abs(count / 20000 - den.weight / total) < 0.015, den
    s_share = sum(c for c, d in zip(counts, PAPER_MIXTURE) if d.mode == "S") / 20000
    assert 0.185 < s_share < 0.215
    custom = MixtureOfDenoisersCollator(tokenizer, 64, denoisers=[{"mode": "R", "rate": 0.15, "mean_span": 3, "weight": 3},
                                                                   {"mode": "S", "rate": 0.5}])  # fmt: skip
    batch = custom([{"input_ids": list(range(50, 90)), "index": i} for i in range(4000)])
    assert abs(float((batch["denoiser"] == 0).float().mean()) - 0.75) < 0.025


def test_mask_tensor_is_bidirectional_on_the_prefix_and_causal_on_the_target() -> None:
    mask = prefix_lm_mask(torch.tensor([3, 5]), 7)
    assert mask.shape == (2, 1, 7, 7) and mask.dtype == torch.float32
    allowed = mask[:, 0] == 0
    for row, prefix in enumerate((3, 5)):
        for i in range(7):
            for j in range(7):
                expected = j <= i or (i < prefix and j < prefix)
                assert bool(allowed[row, i, j]) == expected, (row, i, j)


def test_collated_batch_labels_only_the_target(tokenizer: Any) -> None:
    collator = MixtureOfDenoisersCollator(tokenizer, max_length=48, seed=5)
    items = [{"input_ids": list(range(40, 40 + n)), "index": n} for n in (10, 30, 60)]
    batch = collator(items)
    assert batch["attention_mask"].shape == (3, 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    assert batch["input_ids"].shape[1] <= 48
    labelled = batch["labels"] != IGNORE_INDEX
    assert not (labelled & batch["prefix_mask"].bool()).any()
    assert torch.equal(labelled | batch["prefix_mask"].bool(), batch["padding_mask"].bool())
    again = collator(items)
    assert torch.equal(again["input_ids"], batch["input_ids"])  # seeded by (seed, epoch, index)
    collator.sampler = type("Sampler", (), {"epoch": 1})()
    assert not torch.equal(collator(items)["input_ids"], batch["input_ids"])  # another epoch, another corruption


@pytest.mark.parametrize(("kind", "attn"), [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa"), ("gpt2", "eager")])
def test_model_forward_sees_the_prefix_both_ways_and_the_target_causally(
    kind: str, attn: str, request: pytest.FixtureRequest
) -> None:
    """On the tiny Llama and GPT-2: a prefix position's output changes with a later prefix token, not with a target
    token."""
    from transformers import AutoModelForCausalLM

    folder = request.getfixturevalue(f"tiny_{kind}_dir")
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn).eval()
    ids = torch.arange(20, 30)[None]
    mask = prefix_lm_mask(torch.tensor([5]), 10)

    def hidden(tokens: torch.Tensor, attention: torch.Tensor | None = mask) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=tokens, attention_mask=attention, output_hidden_states=True).hidden_states[-1][0]

    base = hidden(ids)
    later_prefix, target = ids.clone(), ids.clone()
    later_prefix[0, 3] = 99
    target[0, 7] = 99
    assert not torch.allclose(hidden(later_prefix)[1], base[1], atol=1e-5)  # position 1 sees position 3
    changed = hidden(target)
    assert torch.allclose(changed[:7], base[:7], atol=1e-6)  # no prefix or earlier target position sees position 7
    assert not torch.allclose(changed[8], base[8], atol=1e-5)
    causal = hidden(ids, None)
    assert torch.allclose(hidden(later_prefix, None)[1], causal[1], atol=1e-6)  # without the mask: causal only


def test_mask_mixin_casts_the_mask_to_a_half_precision_backbone(tiny_llama_dir: Path) -> None:
    """PrefixLMMaskMixin hands a bfloat16 backbone the same mask in bfloat16; the outputs match the float32 mask's."""
    from transformers import AutoModelForCausalLM

    class Module(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).eval()
            self.seen: torch.Tensor | None = None

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
            self.seen = attention_mask
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask)

    class Mixed(PrefixLMMaskMixin, Module):
        pass

    module, ids, mask = Mixed(), torch.arange(20, 30)[None], prefix_lm_mask(torch.tensor([5]), 10)
    with torch.no_grad():
        cast = module(ids, mask).logits
        assert module.seen is not None and module.seen.dtype == torch.bfloat16
        assert torch.equal(module.seen < 0, mask < 0)
        plain = Module.forward(module, ids, mask).logits  # float32 mask as it is (CPU SDPA and eager accept it)
    assert torch.allclose(cast.float(), plain.float(), atol=1e-2)


def test_fit_from_yaml_on_tiny_llama(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from lightning_ft.cli import main

    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 3, "default_root_dir": str(tmp_path / "runs"),
                    "limit_val_batches": 1, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
                    "val_check_interval": 3, "check_val_every_n_epoch": None, "enable_checkpointing": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}}},
        "model": {"class_path": "lightning_ft.modules.CausalLMModule",
                  "init_args": {"model": str(tiny_llama_dir), "learning_rate": 1e-3, "warmup_steps": 1, "output_dir": ""}},
        "data": {"class_path": "lightning_ft.data.ul2.DenoisingDataModule",
                 "init_args": {"dataset": "rotten_tomatoes", "train_size": 12, "val_size": 4, "batch_size": 4,
                               "max_length": 48, "control_size": 0}},
    }  # fmt: skip
    path = tmp_path / "ul2.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path), "--run_name", "ul2"])
    (metrics,) = tmp_path.glob("**/metrics.csv")
    header, *rows = metrics.read_text().splitlines()
    assert "train/loss" in header and "val/target_loss" in header and rows


def test_smollm2_denoising_loss_falls(smollm2_dir: Path, tmp_path: Path) -> None:
    """SmolLM2 with LoRA, 5 steps of batch 2 (max_length 48) on 4 short real reviews: the loss on a fixed corrupted
    batch of them falls."""
    from lightning_ft.assets import load_dataset_records
    from lightning_ft.modules import CausalLMModule

    short = [r for r in load_dataset_records("rotten_tomatoes", shuffle_seed=0) if 40 <= len(r["text"]) < 80][:4]
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in short))
    lora = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"}
    module = CausalLMModule(model=str(smollm2_dir), peft=lora, learning_rate=3e-3, warmup_steps=0, schedule="constant",
                            output_dir="")  # fmt: skip
    data = DenoisingDataModule(dataset=str(reviews), val_size=0, batch_size=2, max_length=48, control_size=0)
    data.tokenizer = module.tokenizer
    data.setup("fit")
    probe = data.collator([{"input_ids": e["input_ids"]} for e in data._encoded["train"][:2]])
    with torch.no_grad():
        before = module.compute_loss(probe).item()
    make_trainer(tmp_path, 5).fit(module, datamodule=data)
    with torch.no_grad():
        after = module.compute_loss(probe).item()
    assert after < before - 0.5, (before, after)


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"denoisers": [{"mode": "Q", "rate": 0.1}]}, "denoisers[0].mode"),
        ({"denoisers": [{"mode": "R", "rate": 1.5, "mean_span": 3}]}, "denoisers[0].rate"),
        ({"denoisers": [{"mode": "S", "rate": 0.2}, {"mode": "X", "rate": 0.5}]}, "denoisers[1].mean_span"),
        ({"denoisers": [{"mode": "R", "rate": 0.15, "mean_span": 3, "weight": 0}]}, "denoisers[0].weight"),
        ({"denoisers": [{"mode": "R", "rate": 0.15, "span": 3}]}, "denoisers[0]"),
        ({"denoisers": []}, "denoisers"),
        ({"text_field": ""}, "text_field"),
        ({"sentinel_template": "<extra>"}, "sentinel_template"),
        ({"mode_tokens": {"Z": "[Z]"}}, "mode_tokens"),
    ],
)
def test_bad_arguments_are_refused_in_one_sentence(kwargs: dict[str, Any], names: str) -> None:
    with pytest.raises(ValueError) as err:
        DenoisingDataModule(**kwargs)
    message = str(err.value)
    assert message.startswith(names) and message.endswith(".") and "\n" not in message, message


def test_too_short_max_length_and_missing_column_are_refused(tokenizer: Any, tiny_tokenizer_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"^max_length=6 leaves no room"):
        MixtureOfDenoisersCollator(tokenizer, max_length=6)
    data = DenoisingDataModule(
        dataset="rotten_tomatoes", text_field="body", tokenizer=str(tiny_tokenizer_dir), control_size=0
    )
    with pytest.raises(ValueError, match=r"^text_field='body' is not a column of 'rotten_tomatoes'"):
        data.setup("fit")
