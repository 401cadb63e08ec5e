"""SPIN iterations (``lightning-ft spin``): pairs against the model's own answers, the previous iteration as the next
start model and reference, pairs carried forward, resume without refitting or regenerating."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from lightning_ft.cli import main
from lightning_ft.curation.spin import spin_pairs
from lightning_ft.errors import UserError


def _config(tmp_path: Path, model: str, steps: int, peft: dict | None = None, lr: float = 1e-3) -> Path:
    config = yaml.safe_load(Path("configs/spin.yaml").read_text())
    config["trainer"].update(max_steps=steps, val_check_interval=steps, log_every_n_steps=1)
    config["model"]["init_args"].update(model=model, peft=peft)
    config["data"]["init_args"].update(val_size=2, control=None, control_size=0, batch_size=2, max_length=48)
    config["optimizer"]["init_args"]["lr"] = lr
    config["lr_scheduler"]["init_args"]["total_iters"] = 1
    path = tmp_path / "spin.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _trivia(tmp_path: Path, n: int) -> Path:
    from lightning_ft.data.files import load_records

    rows = load_records("trivia")[:n]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n" for r in rows))
    return path


def test_pairs_prefer_the_gold_answer_and_leave_out_identical_answers() -> None:
    pairs = spin_pairs(["a", "b", "c"], [" yes", " no", " maybe"], ["yes ", " nope", " perhaps"], 2)
    assert pairs == [
        {"prompt": "b", "chosen": " no", "rejected": " nope", "spin_iteration": 2},
        {"prompt": "c", "chosen": " maybe", "rejected": " perhaps", "spin_iteration": 2},
    ]


def test_two_iterations_chain_models_carry_pairs_and_resume(tiny_llama_dir: Path, tmp_path: Path) -> None:
    config, data, work = _config(tmp_path, str(tiny_llama_dir), 2), _trivia(tmp_path, 8), tmp_path / "work"
    fits: list[list[str]] = []

    def counting_fit(argv: list[str]) -> None:
        fits.append(argv)
        main(argv)

    argv = ["--fit-config", str(config), "--data", str(data), "--prompt-template", "Q: {prompt}\nA:",
            "--iterations", "2", "--max-new-tokens", "4", "--work-dir", str(work)]  # fmt: skip
    from lightning_ft.curation.spin import main as spin_main

    spin_main(argv, fit=counting_fit)
    state = json.loads((work / "state.json").read_text())["iterations"]
    assert [e["iteration"] for e in state] == [1, 2] and len(fits) == 2
    assert state[0]["start_model"] == str(tiny_llama_dir)
    assert state[1]["start_model"] == state[0]["model"] == str(work / "iteration_1" / "fit" / "hf_model")
    assert fits[1][fits[1].index("--model.init_args.model") + 1] == state[0]["model"]
    first = [json.loads(line) for line in (work / "iteration_1" / "pairs.jsonl").read_text().splitlines()]
    second = [json.loads(line) for line in (work / "iteration_2" / "pairs.jsonl").read_text().splitlines()]
    assert len(first) == state[0]["new_pairs"] > 0
    assert second[state[1]["new_pairs"] :] == first  # iteration 1's own pairs carried forward (--carry 1)
    gold = {r["prompt"]: " " + r["response"] for r in map(json.loads, data.read_text().splitlines())}
    for pair in first:
        assert pair["chosen"] == gold[pair["prompt"].removeprefix("Q: ").removesuffix("\nA:")]
        assert pair["rejected"].strip() != pair["chosen"].strip()
    generated = (work / "iteration_2" / "generations.jsonl").read_text()
    spin_main(argv, fit=counting_fit)  # resumed: every step is done, nothing is fitted or generated again
    assert len(fits) == 2 and (work / "iteration_2" / "generations.jsonl").read_text() == generated
    with pytest.raises(UserError, match="holds iterations of other settings \\(iterations differ\\)"):
        spin_main([a if a != "2" else "3" for a in argv], fit=counting_fit)  # --iterations 3 in the same work dir


def test_bad_arguments_are_refused_in_one_sentence(tmp_path: Path) -> None:
    from lightning_ft.curation.spin import main as spin_main

    config = tmp_path / "c.yaml"
    config.write_text("model: {}\n")
    base = ["--fit-config", str(config), "--data", "trivia", "--work-dir", str(tmp_path / "w")]
    for extra, message in ((["--iterations", "0"], "^--iterations 0 must be at least 1"),
                           (["--carry", "-1"], "^--carry -1 must be 0 or more"),
                           (["--temperature", "-1"], "^--temperature -1.0 must be 0")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            spin_main(base + extra, fit=main)
    with pytest.raises(UserError, match="^--fit-config .* is not a file"):
        spin_main(["--fit-config", str(tmp_path / "none.yaml"), *base[2:]], fit=main)


@pytest.mark.slow
def test_smollm2_one_iteration_lowers_the_loss_on_its_own_pairs(smollm2_dir: Path, tmp_path: Path) -> None:
    """One SPIN iteration with LoRA: against the start model as reference, the exported model's preference loss on
    the iteration's pairs falls below log 2 (its value at the start, where policy = reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_ft.curation.spin import main as spin_main
    from lightning_ft.data.collate import encode_example
    from lightning_ft.objectives import preference_loss

    lora = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    config, data, work = _config(tmp_path, str(smollm2_dir), 8, lora, lr=3e-4), _trivia(tmp_path, 12), tmp_path / "w"
    spin_main(["--fit-config", str(config), "--data", str(data), "--prompt-template", "Q: {prompt}\nA:",
               "--iterations", "1", "--max-new-tokens", "8", "--work-dir", str(work)], fit=main)  # fmt: skip
    state = json.loads((work / "state.json").read_text())["iterations"][0]
    pairs = [json.loads(line) for line in Path(state["pairs"]).read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    start = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    tuned = AutoModelForCausalLM.from_pretrained(state["model"]).eval()

    def logp(model: torch.nn.Module, prompt: str, response: str) -> float:
        ex = encode_example(tok, prompt, response, 64)
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
        with torch.no_grad():
            logits = model(ids).logits[:, :-1].log_softmax(-1)
        mask = labels[:, 1:] != -100
        return float(logits.gather(-1, labels[:, 1:].clamp_min(0).unsqueeze(-1)).squeeze(-1)[mask].sum())

    terms = [[logp(m, p["prompt"], p[k]) for m in (tuned, start) for k in ("chosen", "rejected")] for p in pairs]
    pc, pr, rc, rr = (torch.tensor(col) for col in zip(*terms))
    loss, _ = preference_loss(pc, pr, rc, rr, beta=0.1)
    assert len(pairs) >= 8 and float(loss.mean()) < math.log(2.0) - 0.02, (len(pairs), float(loss.mean()))
