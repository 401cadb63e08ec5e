"""How large CorDA's knowledge-preserved adapter input ``|A x|`` is, against LoRA's initialisation, on SmolLM2.

LoRA's gradient for ``B`` is proportional to ``A x``, so the size of ``A x`` on the training tokens sets the adapter's
effective learning rate. This script initialises LoRA r=8 on ``q_proj``, ``v_proj`` and ``down_proj`` of blocks 0, 10
and 20 of the bundled SmolLM2-135M-Instruct, once as LoRA (Kaiming ``A``) and once by CorDA KPM with the benchmark's
context (the HumanEval texts outside the 64 control texts), and reports the mean ``|A x|`` per token on review
batches (the task) and on control batches (the knowledge kept). Results go to ``results/corda_scale.md``.

    python benchmarks/corda_scale.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # helpers.make_data: the test suite's small review DataModule


def main() -> None:
    from helpers import make_data

    from lightning_ft.callbacks.corda import context_covariances, corda_initialise, lora_layers
    from lightning_ft.data.files import load_records
    from lightning_ft.modules import CausalLMModule

    torch.manual_seed(0)
    peft = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"],
            "layers_to_transform": [0, 10, 20]}  # fmt: skip
    module = CausalLMModule(model="smollm2-135m", peft=peft, output_dir="")
    tok = module.tokenizer
    dm = make_data(train_size=16, batch_size=8, max_length=96, control="humaneval", control_size=64,
                   control_max_length=128, split_seed=1234)  # fmt: skip
    dm.tokenizer = tok
    dm.setup("fit")
    control = set(dm.control_texts(1234))
    rest = [r["text"] for r in load_records("humaneval") if r["text"] not in control]
    context = []
    for start in range(0, len(rest), 8):
        enc = tok(rest[start : start + 8], return_tensors="pt", padding=True, truncation=True, max_length=128)
        context.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})

    def inputs(batch: dict[str, Any]) -> dict[str, Any]:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    review, code = inputs(next(iter(dm.train_dataloader()))), inputs(next(iter(dm.control_dataloader())))
    model = module.backbone
    layers = {name: layer for name, layer, _ in lora_layers(model)}

    def ax(batch: dict[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        mask = batch["attention_mask"].bool()

        def hook(name: str) -> Any:
            return lambda m, args, o: out.__setitem__(
                name, m.lora_A["default"](args[0])[mask].norm(dim=-1).mean().item()
            )

        handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
        with torch.no_grad():
            model(**batch)
        for handle in handles:
            handle.remove()
        return out

    lora_review, lora_code = ax(review), ax(code)
    covariances = context_covariances(model, layers, context)
    for name, layer in layers.items():
        corda_initialise(layer, "default", covariances[name], "kpm")
    kpm_review, kpm_code = ax(review), ax(code)
    lines = [
        "# CorDA KPM: the adapter's |A x| against LoRA's initialisation (SmolLM2-135M-Instruct)",
        "",
        (
            "Command: `python benchmarks/corda_scale.py`. LoRA r=8 (alpha 16); KPM context: the "
            f"{len(rest)} HumanEval texts outside the 64 control texts. Mean |A x| per non-padding token, on 8 "
            "training reviews (the task) and the first batch of control texts (the knowledge kept)."
        ),
        "",
        "| layer | LoRA init, reviews | KPM, reviews | ratio | LoRA init, control | KPM, control | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in layers:
        short = name.split("model.layers.")[1]
        lines.append(
            f"| {short} | {lora_review[name]:.3f} | {kpm_review[name]:.3f} | {kpm_review[name] / lora_review[name]:.1f}x "
            f"| {lora_code[name]:.3f} | {kpm_code[name]:.3f} | {kpm_code[name] / lora_code[name]:.1f}x |"
        )
    (HERE / "results" / "corda_scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
