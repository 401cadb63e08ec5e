"""How much KaSA's base-weight truncation costs the bundled SmolLM2 before any training.

peft's KaSA variant replaces each adapted base weight by its rank-(k - r) SVD approximation (the r smallest singular
components dropped). For every module kind alone, this script reports the fraction of the weight's Frobenius norm
removed (mean over the 30 blocks) and the language-modelling loss of a fixed code snippet and of 32 HumanEval texts
(the method benchmark's control text) against the unmodified model's. Results: ``benchmarks/results/kasa_truncation.md``.

    python benchmarks/kasa_truncation.py --rank 8
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _control_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            out = model(**batch)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total, count = total + out.loss.item() * n, count + n
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_ft.assets import load_dataset_records, resolve_model

    torch.manual_seed(0)
    path = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    texts = [r["text"] for r in load_dataset_records("humaneval")[:32]]
    batches = []
    for i in range(0, len(texts), 8):
        enc = tok(texts[i : i + 8], return_tensors="pt", padding=True, truncation=True, max_length=128)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append({**enc, "labels": labels})
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    reference = _control_loss(base, batches)
    rows = []
    for kind in (*KINDS, "all-linear"):
        targets = "all-linear" if kind == "all-linear" else [kind]
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                               LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets,
                                          kasa_config={})).eval()  # fmt: skip
        removed = []
        for name, param in model.named_parameters():
            if name.endswith("base_layer.weight"):
                original = base.get_parameter(name.replace("base_model.model.", "", 1).replace(".base_layer", ""))
                removed.append(((param - original).norm() / original.norm()).item())
        rows.append((kind, sum(removed) / len(removed), _control_loss(model, batches)))
        print(rows[-1], flush=True)
    lines = [
        "# KaSA's base-weight truncation on SmolLM2-135M, before training",
        "",
        (
            f"Command: `python benchmarks/kasa_truncation.py --rank {args.rank}`. peft's KaSA variant keeps the "
            f"rank-(k - r) SVD approximation of each adapted base weight (r = {args.rank}); loss on 32 HumanEval texts "
            f"(128 tokens), the method benchmark's control text. Unmodified model: {reference:.4f}."
        ),
        "",
        "| adapted modules | weight norm removed (mean over blocks) | control loss | change |",
        "|---|---|---|---|",
    ]
    lines += [f"| {k} | {r:.2%} | {loss:.4f} | {loss - reference:+.4f} |" for k, r, loss in rows]
    out = HERE / "results" / "kasa_truncation.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
