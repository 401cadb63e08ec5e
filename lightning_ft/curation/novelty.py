"""CGE: what did fine-tuning teach? Contrastive generation of novel examples (``lightning-ft explore-novelty``).

Contrastive Generative Exploration (Isonuma & Titov, "What's New in My Data? Novelty Exploration via Contrastive
Generation", ICLR 2025, arXiv 2410.14765) writes text that the fine-tuned model prefers over the model it was
fine-tuned from, without access to the fine-tuning data. Each token is drawn by the per-token contrast
``s(v) = log p_ft(v | x<t) - gamma * log p_base(v | x<t)`` (gamma 1) over the plausible tokens
``{v : p_ft(v) >= alpha * max_w p_ft(w)}`` (alpha 0.1, the contrastive-decoding constraint; every other token gets
``-inf``), sampled from ``softmax(s / temperature)`` (temperature 0: the argmax). As in the authors' code, an example
starts from the tokenizer's BOS token (or a user prompt after it) and runs to ``--max-new-tokens`` (EOS does not end
it unless ``--stop-at-eos``). Both models decode incrementally with their own KV caches, in left-padded batches, and
each example draws its noise from its own generator, so an example does not depend on its batch.

The iterative variant (``--rounds`` > 1) makes the examples diverse: after each round the base model is updated on
the round's examples (a LoRA adapter on the base, ``--update-steps`` AdamW steps of the LM loss on the generated
tokens; the paper takes one step per generated batch), so that what was already found stops scoring high, and the
next round contrasts again. The adapter persists, so round ``k`` contrasts with a base trained on every earlier
example. ``WORK/state.json`` records each finished round (its examples and the adapter after its update); rerunning
the command resumes after the last finished round, and a larger ``--rounds`` continues a finished run.

Every example is written to ``--out`` (JSONL, atomically, with ``<stem>.report.json``) with its scores: the mean
per-token contrast ``log p_ft - log p_base`` of its generated tokens (under the base of its round) and each model's
mean per-token NLL.

Example (a LoRA fit of SmolLM2 on the bundled reviews, then four rounds of iterative CGE from the BOS token)::

    lightning-ft fit --config configs/quickstart_lora.yaml --run_name reviews
    lightning-ft explore-novelty --base smollm2-135m --model runs/reviews/hf_model --out runs/novel.jsonl \
        --num-examples 8 --max-new-tokens 64 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_ft.curation.rounds import load_rounds, save_rounds, settings_of
from lightning_ft.errors import SentenceParser, UserError

__all__ = ["ContrastSettings", "Example", "contrastive_generate", "main", "plausible_contrast", "score_tokens"]

PROG = "lightning-ft explore-novelty"
STATE_FILE = "state.json"


@dataclass(frozen=True)
class ContrastSettings:
    """How :func:`contrastive_generate` decodes.

    Args:
        max_new_tokens: Tokens generated per example.
        alpha: The plausibility cutoff: only tokens with ``p_ft >= alpha * max p_ft`` can be drawn (0 keeps all).
        gamma: The weight of the base model's log-probability in the contrast.
        temperature: Divides the contrast before sampling; 0 takes the argmax.
        stop_at_eos: End an example at the EOS token (the paper generates a fixed length).
        batch_size: Examples decoded together.
    """

    max_new_tokens: int = 64
    alpha: float = 0.1
    gamma: float = 1.0
    temperature: float = 1.0
    stop_at_eos: bool = False
    batch_size: int = 8


@dataclass
class Example:
    """One generated example: its prompt and new token ids, and each model's log-probability of every new token."""

    prompt_ids: list[int]
    token_ids: list[int]
    ft_logprobs: list[float]
    base_logprobs: list[float]

    def scores(self) -> dict[str, float]:
        """The mean per-token contrast ``log p_ft - log p_base`` and each model's mean per-token NLL."""
        n = max(len(self.token_ids), 1)
        ft, base = sum(self.ft_logprobs) / n, sum(self.base_logprobs) / n
        return {"contrast": ft - base, "nll_ft": -ft, "nll_base": -base}


def plausible_contrast(
    ft_logprobs: torch.Tensor, base_logprobs: torch.Tensor, alpha: float, gamma: float = 1.0
) -> torch.Tensor:
    """``log p_ft - gamma * log p_base`` on the tokens with ``p_ft >= alpha * max p_ft``, ``-inf`` on the others.

    Args:
        ft_logprobs: Next-token log-probabilities of the fine-tuned model, ``[..., V]``.
        base_logprobs: The same of the base model.
        alpha: The plausibility cutoff in ``[0, 1]`` (0 keeps every token).
        gamma: The weight of the base model.
    """
    contrast = ft_logprobs - gamma * base_logprobs
    if alpha <= 0:
        return contrast
    cutoff = ft_logprobs.max(dim=-1, keepdim=True).values + math.log(alpha)
    return contrast.masked_fill(ft_logprobs < cutoff, float("-inf"))


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _next_logprobs(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache: Any
) -> tuple[torch.Tensor, Any]:
    """The next-token log-probabilities after ``ids`` (the new tokens; ``mask`` covers the cache as well)."""
    positions = _positions(mask)[:, -ids.shape[1] :]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    return out.logits[:, -1].float().log_softmax(-1), out.past_key_values


@torch.no_grad()
def contrastive_generate(
    ft: torch.nn.Module,
    base: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    seeds: Sequence[int],
    settings: ContrastSettings,
    pad_id: int,
    eos_id: int | None,
) -> list[Example]:
    """One contrastive example per prompt (``seeds[i]`` seeds example ``i``), decoded in batches."""
    from lightning_ft.curation.generation import _evaluating

    found: list[Example] = []
    with _evaluating(ft), _evaluating(base):
        for start in range(0, len(prompt_ids), settings.batch_size):
            rows = [list(p) for p in prompt_ids[start : start + settings.batch_size]]
            found += _generate_batch(ft, base, rows, seeds[start : start + len(rows)], settings, pad_id, eos_id)
    return found


def _generate_batch(
    ft: torch.nn.Module,
    base: torch.nn.Module,
    rows: list[list[int]],
    seeds: Sequence[int],
    settings: ContrastSettings,
    pad_id: int,
    eos_id: int | None,
) -> list[Example]:
    from lightning_ft.curation.generation import _GumbelSampler
    from lightning_ft.data.collate import pad_left

    device = next(ft.parameters()).device
    ids, mask = pad_left(rows, pad_id).to(device), pad_left([[1] * len(r) for r in rows], 0).to(device)
    sampler = _GumbelSampler(seeds, settings.temperature, 1.0) if settings.temperature > 0 else None
    ft_cache = base_cache = None
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    tokens, ft_lp, base_lp, alive = [], [], [], []
    for _ in range(settings.max_new_tokens):
        ft_next, ft_cache = _next_logprobs(ft, ids, mask, ft_cache)
        base_next, base_cache = _next_logprobs(base, ids, mask, base_cache)
        scores = plausible_contrast(ft_next, base_next.to(device), settings.alpha, settings.gamma)
        choice = (sampler(ids, scores) if sampler is not None else scores).argmax(-1)
        choice = choice.masked_fill(done, pad_id)
        tokens.append(choice)
        ft_lp.append(ft_next.gather(-1, choice[:, None])[:, 0])
        base_lp.append(base_next.to(device).gather(-1, choice[:, None])[:, 0])
        alive.append(~done)
        if settings.stop_at_eos and eos_id is not None:
            done = done | (choice == eos_id)
        ids, mask = choice[:, None], torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if bool(done.all()):
            break
    stacked = [torch.stack(t, 1).cpu() for t in (tokens, ft_lp, base_lp, alive)]
    return [
        Example(row, stacked[0][i][stacked[3][i]].tolist(), stacked[1][i][stacked[3][i]].tolist(),
                stacked[2][i][stacked[3][i]].tolist())
        for i, row in enumerate(rows)
    ]  # fmt: skip


@torch.no_grad()
def score_tokens(
    model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], token_ids: Sequence[Sequence[int]], pad_id: int
) -> list[list[float]]:
    """Teacher-forced ``log p(token_t | prompt, tokens_<t)`` of each row's tokens (one left-padded forward pass)."""
    from lightning_ft.curation.generation import _evaluating
    from lightning_ft.data.collate import pad_left

    rows = [list(p) + list(t) for p, t in zip(prompt_ids, token_ids, strict=True)]
    device = next(model.parameters()).device
    ids, mask = pad_left(rows, pad_id).to(device), pad_left([[1] * len(r) for r in rows], 0).to(device)
    with _evaluating(model):
        logprobs = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits.float()
    logprobs = logprobs.log_softmax(-1)
    width = ids.shape[1]
    found = []
    for i, toks in enumerate(token_ids):
        n = len(toks)
        picked = logprobs[i, width - n - 1 : width - 1].gather(-1, ids[i, width - n :, None])[:, 0]
        found.append(picked.cpu().tolist())
    return found


def score_examples(
    ft: torch.nn.Module, base: torch.nn.Module, prompt_ids: Sequence[Sequence[int]],
    token_ids: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8,
) -> list[Example]:  # fmt: skip
    """Given prompts and continuations (of any origin) as :class:`Example`, scored by both models (teacher forcing)."""
    found: list[Example] = []
    for s in range(0, len(prompt_ids), batch_size):
        p, t = prompt_ids[s : s + batch_size], token_ids[s : s + batch_size]
        for args in zip(p, t, score_tokens(ft, p, t, pad_id), score_tokens(base, p, t, pad_id)):
            found.append(Example(list(args[0]), list(args[1]), args[2], args[3]))
    return found


def lm_update(model: torch.nn.Module, examples: Sequence[Example], steps: int, lr: float, pad_id: int) -> None:
    """``steps`` AdamW steps of the LM loss on the examples' generated tokens (prompts masked), all in one batch,
    on the trainable parameters of ``model`` (a LoRA-wrapped base)."""
    from lightning_ft.data.collate import IGNORE_INDEX, pad_right

    device = next(model.parameters()).device
    rows = [e.prompt_ids + e.token_ids for e in examples]
    labels = [[IGNORE_INDEX] * len(e.prompt_ids) + e.token_ids for e in examples]
    ids, mask = pad_right(rows, pad_id).to(device), pad_right([[1] * len(r) for r in rows], 0).to(device)
    targets = pad_right(labels, IGNORE_INDEX).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    was_training = model.training
    model.train()
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten(),
                                                 ignore_index=IGNORE_INDEX)  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.train(was_training)


def with_lora(model: torch.nn.Module, rank: int = 8) -> torch.nn.Module:
    """``model`` with a fresh trainable LoRA adapter on all its linear layers (a loaded adapter is merged first)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(model, config)


# ---------------------------------------------------------------------------------------------------- the command
def _parser() -> SentenceParser:
    parser = SentenceParser(prog=PROG, description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("--base", required=True, help="the model before fine-tuning: an alias or HF folder")
    parser.add_argument("--model", required=True,
                        help="the fine-tuned model: an HF folder, or a LoRA adapter folder on --base")  # fmt: skip
    parser.add_argument("--out", required=True, type=Path, help="the examples (JSONL), with <stem>.report.json")
    parser.add_argument("--num-examples", type=int, default=8, help="examples per round (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per example (default 64)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="1 (default): static CGE; > 1: iterative CGE, the base updated after each round")  # fmt: skip
    parser.add_argument("--prompts", type=Path, default=None,
                        help="prompts, cycled over the examples: a .txt file (one a line) or a data file with a "
                        "'prompt' column; default: the BOS token alone")  # fmt: skip
    parser.add_argument("--alpha", type=float, default=0.1, help="plausibility cutoff: p_ft >= alpha * max p_ft "
                        "(default 0.1)")  # fmt: skip
    parser.add_argument("--gamma", type=float, default=1.0, help="weight of log p_base in the contrast (default 1)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0: argmax (default 1)")
    parser.add_argument("--stop-at-eos", action="store_true", help="end an example at EOS (default: fixed length)")
    parser.add_argument("--update-steps", type=int, default=1,
                        help="AdamW steps on the base after each round (default 1, as in the paper)")  # fmt: skip
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="of the base update (default 1e-4)")
    parser.add_argument("--lora-rank", type=int, default=8, help="rank of the base's update adapter (default 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples decoded together (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling and the update (default 0)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="rounds and state.json; rerun the same command to resume (default: OUT's stem + "
                        "'.rounds' beside it)")  # fmt: skip
    return parser


def _check(args: argparse.Namespace) -> None:
    for name in ("num_examples", "max_new_tokens", "rounds", "batch_size", "lora_rank"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1.")
    if args.update_steps < 0:
        raise UserError(f"--update-steps {args.update_steps} must be 0 or more.")
    if not 0 <= args.alpha <= 1:
        raise UserError(f"--alpha {args.alpha} must lie in [0, 1] (0 keeps every token, 0.1 is the paper's).")
    if args.temperature < 0 or args.learning_rate <= 0:
        raise UserError(f"--temperature {args.temperature} must be 0 (argmax) or positive and --learning-rate "
                        f"{args.learning_rate} positive.")  # fmt: skip
    if args.prompts is not None and not args.prompts.is_file():
        raise UserError(f"--prompts {args.prompts} is not a file: give a .txt file with one prompt a line.")


def _load(value: str, option: str) -> tuple[torch.nn.Module, Any]:
    from lightning_ft.curation.generation import GenerationService

    try:
        service = GenerationService(value)
    except UserError as err:
        raise UserError(f"{option} cannot be loaded: {err}") from None
    return service.model, service.tokenizer


def _read_prompts(path: Path | None) -> list[str]:
    if path is None:
        return [""]
    if path.suffix == ".txt":
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        from lightning_ft.curation.records import read_pool

        prompts = [str(r["prompt"]) for r in read_pool(str(path), argument="--prompts", fields=["prompt"])]
    if not prompts:
        raise UserError(f"--prompts {path} holds no prompt: write one prompt a line.")
    return prompts


def _encode(tokenizer: Any, prompt: str) -> list[int]:
    """The BOS token (EOS for a tokenizer without one, as GPT-2 does) and the prompt's tokens."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [start] + list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else [start]


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    # a larger --rounds continues a finished run; the other skipped options change no example
    return settings_of(args, skip=("rounds", "out", "work_dir", "batch_size"))


def _records(examples: list[Example], tokenizer: Any, prompts: list[str], round_: int) -> list[dict[str, Any]]:
    return [
        {"text": tokenizer.decode(e.token_ids, skip_special_tokens=True), "prompt": prompts[i % len(prompts)],
         "round": round_, "index": i, **e.scores(), "tokens": len(e.token_ids), "token_ids": e.token_ids,
         "prompt_ids": e.prompt_ids}
        for i, e in enumerate(examples)
    ]  # fmt: skip


def _examples(path: Path) -> list[Example]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Example(r["prompt_ids"], r["token_ids"], [], []) for r in rows]


def _mean_contrast(ft: torch.nn.Module, base: torch.nn.Module, examples: list[Example], pad_id: int) -> float:
    scored = score_examples(ft, base, [e.prompt_ids for e in examples], [e.token_ids for e in examples], pad_id)
    return sum(e.scores()["contrast"] for e in scored) / len(scored)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) every round; returns the report (also written beside ``--out``)."""
    from lightning_ft.core.io import atomic_file
    from lightning_ft.curation.generation import _row_seed
    from lightning_ft.curation.records import write_dataset

    _check(args)
    prompts = _read_prompts(args.prompts)
    ft, tokenizer = _load(args.model, "--model")
    base, base_tokenizer = _load(args.base, "--base")
    if tokenizer.get_vocab() != base_tokenizer.get_vocab():
        raise UserError(f"--model {args.model} and --base {args.base} have different tokenizers, so their tokens "
                        "cannot be contrasted: give the base model the fine-tuned model was trained from.")  # fmt: skip
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    work = args.work_dir or args.out.with_name(f"{args.out.stem}.rounds")
    work.mkdir(parents=True, exist_ok=True)
    settings, state_path = _settings(args), work / STATE_FILE
    rounds = load_rounds(state_path, settings)
    decode = ContrastSettings(args.max_new_tokens, args.alpha, args.gamma, args.temperature, args.stop_at_eos,
                              args.batch_size)  # fmt: skip
    if args.rounds > 1 or len(rounds) > 1:
        torch.manual_seed(args.seed)
        base = with_lora(base, args.lora_rank)
        adapter = next((e["adapter"] for e in reversed(rounds) if e.get("adapter")), None)
        if adapter is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(base, torch.load(adapter, weights_only=True))
    encoded = [_encode(tokenizer, p) for p in prompts]
    for k in range(1, args.rounds + 1):
        root = work / f"round_{k}"
        if len(rounds) < k:
            rows = [encoded[i % len(encoded)] for i in range(args.num_examples)]
            seeds = [_row_seed(args.seed, f"{k}\0{prompts[i % len(prompts)]}", i) for i in range(args.num_examples)]
            examples = contrastive_generate(ft, base, rows, seeds, decode, pad_id, tokenizer.eos_token_id)
            path = root / "examples.jsonl"
            write_dataset(_records(examples, tokenizer, prompts, k), path, {"method": "cge", "round": k})
            rounds.append({"round": k, "examples": str(path), "adapter": None, "update": None})
            save_rounds(state_path, settings, rounds)
        entry = rounds[k - 1]
        if k < args.rounds and entry["adapter"] is None and args.update_steps > 0:
            from peft import get_peft_model_state_dict

            examples = _examples(Path(entry["examples"]))
            before = _mean_contrast(ft, base, examples, pad_id)
            torch.manual_seed(args.seed + k)
            lm_update(base, examples, args.update_steps, args.learning_rate, pad_id)
            entry["update"] = {"contrast_before": before, "contrast_after": _mean_contrast(ft, base, examples, pad_id)}
            with atomic_file(root / "adapter.pt") as tmp:
                torch.save(get_peft_model_state_dict(base), tmp)
            entry["adapter"] = str(root / "adapter.pt")
            save_rounds(state_path, settings, rounds)
    records = [r for e in rounds[: args.rounds] for r in _read(Path(e["examples"]))]
    report = {"method": "cge", "paper": "https://arxiv.org/abs/2410.14765", "base": args.base, "model": args.model,
              "settings": {**settings, "rounds": args.rounds, "decode": asdict(decode)},
              "rounds": [{**e, "mean_contrast": _mean([r["contrast"] for r in _read(Path(e["examples"]))])}
                         for e in rounds[: args.rounds]], "examples": len(records)}  # fmt: skip
    write_dataset(records, args.out, report)
    return report


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: list[str]) -> None:
    """``lightning-ft explore-novelty ...``: generate (or resume) the rounds and print a summary per round."""
    args = _parser().parse_args(argv)
    report = run(args)
    for entry in report["rounds"]:
        print(f"round {entry['round']}: mean contrast {entry['mean_contrast']:.3f} ({entry['examples']})")
    print(f"{report['examples']} examples -> {args.out}")
