"""LiST: lite self-training of a prompt-style classifier with adapters (``lightning-ft self-train``).

LiST (Wang et al., "LiST: Lite Prompted Self-training Makes Parameter-efficient Few-shot Learners", NAACL Findings
2022; official code microsoft/LiST) fine-tunes a frozen language model through a small adapter on a few labels, then
iterates: the teacher pseudo-labels the unlabeled pool, a student (a fresh adapter on the same frozen backbone) trains
on the labels together with re-weighted pseudo-labels, and the student becomes the next teacher. Here the classifier
reads its classes through label words: for a causal LM (SmolLM2 ``Review: {text}\\nSentiment:``) the class logits
are the LM logits of the label words at the prompt's last token; an encoder (all-MiniLM-L6-v2, which ships no MLM
head) mean-pools its last layer into a label-word head, a matrix initialised from the label words' input embeddings
and trained with the adapter. Each label word must be one token. The adapter is LoRA (peft's default target modules
of the architecture), not the paper's Houlsby adapters.

Iteration 0 trains the teacher on the labels alone (``--teacher-epochs``). Iteration ``t >= 1`` pseudo-labels every
unlabeled text with the argmax of the teacher's label-word probabilities (hard labels) and trains a student for
``--student-epochs`` passes over the pool; each step pairs one batch of pseudo-labelled texts with one batch of labels
and minimises ``mean_j CE(labelled_j) + sum_i w_i CE(pseudo_i)``, the weights ``w`` normalised to sum to 1 over the
pseudo batch (the official trainer's form). ``--reweight`` chooses the weights:

* ``meta`` (default, the paper's meta re-weighting): the weight of pseudo example ``i`` is how much one SGD step on it
  would lower the labelled loss, ``w_i = max(0, <grad l_i, grad L_labelled>)`` normalised; this is the meta-gradient
  ``-dL_labelled(theta')/d eps_i`` at ``eps = 0`` of the official ``meta_st`` (one virtual step through ``higher``,
  one sampling step), up to the learning rate, which the normalisation cancels. It is computed in closed form with a
  double backward instead of a differentiable optimiser. By default (``--meta-scope head``) the gradients compared
  are those of the encoder's label-word head, a cheap restriction of the paper's (every trained tensor, ``all``); a
  causal LM, which has no head, compares its adapter's. The paper's warm-up with confidence weights is left out.
* ``confidence``: ``w_i = 1[max_c p_ic > --confidence-threshold]`` normalised (the official ``confidence`` option).
* ``none``: every pseudo-label weighs the same.

Left out: soft pseudo-labels and the optional extra fine-tuning stage on the labels (``semi_finetune``) of the
official code, demonstrations in the prompt, and the paper's knowledge-distillation warm-up of the student. As in the
official ``re_init``, every student starts afresh from the pretrained backbone. Training runs in a plain PyTorch loop,
not a Lightning fit. Each finished iteration (its pseudo-labels and its model) is recorded in ``WORK/state.json``
(replaced atomically); rerunning the same command resumes after the last finished iteration (one interrupted midway
starts again from its pseudo-labelling, which is deterministic), and ``--iterations`` may grow between runs.
Outputs: ``WORK/iteration_<t>/model.pt`` (the adapter and head tensors, loaded by
:meth:`PromptClassifier.load_trainable`), ``WORK/iteration_<t>/pseudo_labels.jsonl`` (text, pseudo-label, its
probability and the true label when the pool has one) and ``WORK/report.json`` (per-iteration accuracy on
``--eval-data`` and pseudo-label accuracy).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ft.curation.rounds import load_rounds, save_rounds, settings_of
from lightning_ft.errors import SentenceParser, UserError

__all__ = [
    "PromptClassifier",
    "confidence_weights",
    "is_causal_lm",
    "label_token_ids",
    "main",
    "meta_parameters",
    "meta_weights",
    "pseudo_label",
    "run",
    "student_loss",
    "weighted_cross_entropy",
]

PROG = "lightning-ft self-train"
STATE_FILE = "state.json"
_EPS = 1e-12
Batch = tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------------------------- the classifier
class PromptClassifier(nn.Module):
    """A frozen backbone with a LoRA adapter whose class logits are read through one label word per class.

    Args:
        model: bundled alias (``smollm2-135m``, ``minilm-l6``), local folder or Hub id; a ``*ForCausalLM``
            architecture reads the label words off its LM head, any other is used as an encoder.
        label_words: one word per class, each a single token of the model's tokenizer.
        lora_r: LoRA rank (``lora_alpha`` is ``2 * lora_r``).
        max_length: tokens per text (a causal LM keeps the end of the prompt, an encoder its start).
        seed: seed of the adapter's initialisation.
        eager_attention: load with eager attention, which has a double backward (``--reweight meta`` through the
            backbone needs it; PyTorch's fused attention on CPU has none).

    Raises:
        UserError: A label word is not one token.
    """

    def __init__(self, model: str, label_words: Sequence[str], *, lora_r: int = 8, max_length: int = 64,
                 seed: int = 0, eager_attention: bool = False) -> None:  # fmt: skip
        super().__init__()
        from transformers import AutoModel, AutoModelForCausalLM

        from lightning_ft.modules.backbone import load_backbone

        self.causal = is_causal_lm(model)
        torch.manual_seed(seed)
        auto, task = (AutoModelForCausalLM, "CAUSAL_LM") if self.causal else (AutoModel, "FEATURE_EXTRACTION")
        extra = {"attn_implementation": "eager"} if eager_attention else {}
        self.backbone, self.tokenizer = load_backbone(auto, model, peft={"r": lora_r, "lora_alpha": 2 * lora_r},
                                                      task_type=task, **extra)  # fmt: skip
        self.tokenizer.truncation_side = "left" if self.causal else "right"
        self.max_length = max_length
        self.register_buffer("label_ids", torch.tensor(label_token_ids(self.tokenizer, label_words)), persistent=False)
        base = self.backbone.get_base_model()
        if self.causal:
            self.body = base.base_model  # the decoder stack (LoRA is injected in place); the LM head stays frozen
            self.head = None
        else:
            self.body = base
            words = base.get_input_embeddings().weight.detach()[self.label_ids].clone()
            self.head = nn.Linear(words.shape[1], len(label_words))
            with torch.no_grad():
                self.head.weight.copy_(words)
                self.head.bias.zero_()
        self.backbone.train()

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise and pad (right) a batch of rendered prompts."""
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=True,
                              return_tensors="pt")  # fmt: skip

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_labels]``: the label words' LM logits at the last prompt token (causal LM), or the
        label-word head on the mean-pooled last layer (encoder)."""
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.causal:
            last = attention_mask.long().sum(1) - 1
            h = hidden[torch.arange(len(hidden), device=hidden.device), last]
            return h @ self.backbone.get_base_model().get_output_embeddings().weight[self.label_ids].T
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors (adapter and head), detached copies."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        """Load tensors saved by :meth:`trainable_state`; every trainable tensor must be among them."""
        missing = {n for n, p in self.named_parameters() if p.requires_grad} - set(state)
        if missing:
            raise UserError(f"the saved classifier lacks {len(missing)} trainable tensors (e.g. {min(missing)}): it "
                            "was trained with other --model or --lora-r; give a new --work-dir.")  # fmt: skip
        self.load_state_dict(state, strict=False)


def is_causal_lm(model: str) -> bool:
    """Whether ``model``'s config names a ``*ForCausalLM`` architecture."""
    from transformers import AutoConfig

    from lightning_ft.assets import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(model, weights=True))
    return any(a.endswith("ForCausalLM") for a in config.architectures or [])


def label_token_ids(tokenizer: Any, label_words: Sequence[str]) -> list[int]:
    """The token id of every label word.

    Raises:
        UserError: A label word is not exactly one token, or two label words are the same token.
    """
    ids = []
    for word in label_words:
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise UserError(f"--label-words {word!r} is {len(tokens)} tokens for this tokenizer, not one: give a "
                            "word the tokenizer keeps whole (for a BPE tokenizer with its leading space, e.g. "
                            "' positive').")  # fmt: skip
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise UserError(f"--label-words {list(label_words)} map two classes to the same token: give distinct words.")
    return ids


# ---------------------------------------------------------------------------------------------- weights and losses
def confidence_weights(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """``1[max_c p_ic > threshold]``, normalised to sum to 1 (all zeros when no example passes)."""
    keep = (probs.max(-1).values > threshold).to(probs.dtype)
    return keep / keep.sum().clamp_min(_EPS)


def meta_weights(
    labelled_logits: torch.Tensor,
    labelled_targets: torch.Tensor,
    pseudo_logits: torch.Tensor,
    pseudo_targets: torch.Tensor,
    params: Sequence[torch.Tensor],
) -> torch.Tensor:
    """The meta re-weighting of a pseudo batch: ``w_i = max(0, <grad l_i, grad L>)`` normalised to sum to 1.

    ``l_i`` is pseudo example ``i``'s cross-entropy, ``L`` the mean labelled cross-entropy, gradients with respect to
    ``params``. ``<grad l_i, grad L>`` is ``-dL(theta - lr * sum_i eps_i grad l_i)/d eps_i / lr`` at ``eps = 0``: the
    labelled loss falls when example ``i`` is up-weighted. Computed as ``d<grad sum_i eps_i l_i, grad L>/d eps``; the
    logits' graph is kept for the training loss. All zeros when no example helps.
    """
    params = list(params)
    labelled_loss = F.cross_entropy(labelled_logits.float(), labelled_targets)
    target_grad = torch.autograd.grad(labelled_loss, params, retain_graph=True, allow_unused=True)
    eps = torch.zeros(len(pseudo_targets), requires_grad=True)
    losses = F.cross_entropy(pseudo_logits.float(), pseudo_targets, reduction="none")
    grads = torch.autograd.grad((eps * losses).sum(), params, create_graph=True, retain_graph=True, allow_unused=True)
    dot = sum((g * t).sum() for g, t in zip(grads, target_grad, strict=True) if g is not None and t is not None)
    if not isinstance(dot, torch.Tensor) or not dot.requires_grad:
        return torch.zeros(len(pseudo_targets))
    align = torch.autograd.grad(dot, eps, retain_graph=True)[0].clamp_min(0.0)
    return (align / align.sum().clamp_min(_EPS)).detach()


def meta_parameters(model: PromptClassifier, scope: str) -> list[torch.Tensor]:
    """The parameters whose gradients the meta re-weighting compares: ``head`` (the label-word head of an encoder;
    a causal LM, which has none, uses its adapter) or ``all`` trainable ones."""
    if scope == "head" and model.head is not None:
        return list(model.head.parameters())
    return [p for p in model.parameters() if p.requires_grad]


def weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i CE(logits_i, targets_i)`` (the weights are used as given)."""
    return (weights.to(torch.float32) * F.cross_entropy(logits.float(), targets, reduction="none")).sum()


def student_loss(
    labelled_logits: torch.Tensor,
    labelled_targets: torch.Tensor,
    pseudo_logits: torch.Tensor | None = None,
    pseudo_targets: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``mean_j CE(labelled_j) + sum_i w_i CE(pseudo_i)``; without a pseudo batch the plain labelled loss."""
    loss = F.cross_entropy(labelled_logits.float(), labelled_targets)
    if pseudo_logits is None or pseudo_targets is None or weights is None:
        return loss
    return loss + weighted_cross_entropy(pseudo_logits, pseudo_targets, weights)


# ---------------------------------------------------------------------------------------------- training
@torch.no_grad()
def class_probabilities(model: PromptClassifier, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Softmax over the label words for every text, ``[N, num_labels]`` (eval mode)."""
    was = model.training
    model.eval()
    try:
        out = [model(**_ids(model.encode(texts[i : i + batch_size]))).float().softmax(-1)
               for i in range(0, len(texts), batch_size)]  # fmt: skip
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.zeros(0, len(model.label_ids))


def pseudo_label(
    model: PromptClassifier, texts: Sequence[str], batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's hard pseudo-labels (argmax of the label-word probabilities) and the probabilities."""
    probs = class_probabilities(model, texts, batch_size)
    return probs.argmax(-1), probs


def _ids(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def train_classifier(
    model: PromptClassifier,
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    pseudo_texts: Sequence[str] = (),
    pseudo_labels: torch.Tensor | None = None,
    pseudo_probs: torch.Tensor | None = None,
    reweight: str = "meta",
    threshold: float = 0.9,
    meta_scope: str = "head",
) -> None:
    """Train ``model``'s adapter (AdamW): on the labels alone, or on pseudo batches each paired with a labelled batch
    (``epochs`` passes over the pseudo-labelled texts, the labels cycled)."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    compared = meta_parameters(model, meta_scope)
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    targets = torch.tensor(list(labels), dtype=torch.long)
    model.train()

    def labelled_batches() -> Any:
        while True:
            for idx in torch.randperm(len(texts), generator=gen).split(batch_size):
                yield _ids(model.encode([texts[i] for i in idx])), targets[idx]

    source = labelled_batches()
    steps = [None] * (epochs * math.ceil(len(texts) / batch_size))
    if pseudo_texts:
        steps = [
            idx for _ in range(epochs) for idx in torch.randperm(len(pseudo_texts), generator=gen).split(batch_size)
        ]
    for idx in steps:
        batch, y = next(source)
        logits = model(**batch)
        if idx is None:
            loss = student_loss(logits, y)
        else:
            assert pseudo_labels is not None and pseudo_probs is not None
            pseudo_logits, yu = model(**_ids(model.encode([pseudo_texts[i] for i in idx]))), pseudo_labels[idx]
            if reweight == "meta":
                w = meta_weights(logits, y, pseudo_logits, yu, compared)
            elif reweight == "confidence":
                w = confidence_weights(pseudo_probs[idx], threshold)
            else:
                w = torch.full((len(idx),), 1.0 / len(idx))
            loss = student_loss(logits, y, pseudo_logits, yu, w)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


# ---------------------------------------------------------------------------------------------- the command
def _parser() -> SentenceParser:
    parser = SentenceParser(prog=PROG, description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("--model", default="minilm-l6",
                        help="bundled alias (minilm-l6, smollm2-135m), local folder or Hub id (default minilm-l6)")  # fmt: skip
    parser.add_argument("--data", required=True, help="the labelled examples: a bundled dataset name or a data file")
    parser.add_argument("--num-labeled", type=int, default=None,
                        help="use the first N labelled records (default: all)")  # fmt: skip
    parser.add_argument("--unlabeled", required=True,
                        help="the unlabeled pool: a bundled dataset or data file (a label column, if any, is only "
                        "used to report pseudo-label accuracy)")  # fmt: skip
    parser.add_argument("--eval-data", default=None, help="labelled held-out data scored after every iteration")
    parser.add_argument("--text-field", default="text", help="column of the text (default text)")
    parser.add_argument("--label-field", default="label", help="column of the class label (default label)")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="the class values in order (default: the sorted values of --data)")  # fmt: skip
    parser.add_argument("--label-words", nargs="+", default=None,
                        help="one single-token word per class (default: ' <label>' for a causal LM, '<label>' for "
                        "an encoder)")  # fmt: skip
    parser.add_argument("--template", default="Review: {text}\nSentiment:",
                        help="renders a record into the prompt (default 'Review: {text}\\nSentiment:')")  # fmt: skip
    parser.add_argument("--iterations", type=int, default=3, help="self-training iterations after the teacher (3)")
    parser.add_argument("--reweight", choices=("meta", "confidence", "none"), default="meta",
                        help="pseudo-label weights (default meta)")  # fmt: skip
    parser.add_argument("--meta-scope", choices=("head", "all"), default="head",
                        help="gradients compared by --reweight meta: the label-word head (default; a causal LM's "
                        "adapter) or every trained tensor")  # fmt: skip
    parser.add_argument("--confidence-threshold", type=float, default=0.9, help="for --reweight confidence (0.9)")
    parser.add_argument("--teacher-epochs", type=int, default=20, help="passes over the labels for the teacher (20)")
    parser.add_argument("--student-epochs", type=int, default=1, help="passes over the pool per student (1)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW learning rate (1e-3)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per batch, each side (16)")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (8)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per text (64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the adapters and the data order (0)")
    parser.add_argument("--work-dir", required=True, type=Path,
                        help="models, pseudo-labels, state.json and report.json; rerun the same command to resume")  # fmt: skip
    return parser


def _check(args: argparse.Namespace) -> None:
    for name in ("iterations", "teacher_epochs", "student_epochs", "batch_size", "lora_r", "max_length"):
        value, low = getattr(args, name), 0 if name == "iterations" else 1
        if value < low:
            raise UserError(f"--{name.replace('_', '-')} {value} must be at least {low}.")
    if args.num_labeled is not None and args.num_labeled < 1:
        raise UserError(f"--num-labeled {args.num_labeled} must be at least 1: the teacher needs labelled examples.")
    if args.learning_rate <= 0:
        raise UserError(f"--learning-rate {args.learning_rate} must be positive.")
    if not 0 <= args.confidence_threshold < 1:
        raise UserError(f"--confidence-threshold {args.confidence_threshold} must be in [0, 1).")


def _examples(args: argparse.Namespace, labels: list[str], source: str, option: str) -> tuple[list[str], list[int]]:
    from lightning_ft.curation.records import read_pool
    from lightning_ft.data.collate import render

    records = read_pool(source, argument=option, fields=(args.text_field, args.label_field),
                        options={args.text_field: "--text-field", args.label_field: "--label-field"})  # fmt: skip
    if option == "--data":
        records = records[: args.num_labeled]
    unknown = sorted({str(r[args.label_field]) for r in records} - set(labels))
    if unknown:
        raise UserError(f"{option} {source} has labels {unknown} outside --labels {labels}: list every class.")
    texts = [render(args.template, r, "--template") for r in records]
    return texts, [labels.index(str(r[args.label_field])) for r in records]


def _pool(args: argparse.Namespace, labels: list[str]) -> tuple[list[str], list[int | None]]:
    from lightning_ft.curation.records import read_pool
    from lightning_ft.data.collate import render

    try:
        records = read_pool(args.unlabeled, argument="--unlabeled", fields=(args.text_field,),
                            options={args.text_field: "--text-field"})  # fmt: skip
    except UserError as err:
        if "holds no records" in str(err):
            raise UserError(f"--unlabeled {args.unlabeled} holds no records: self-training needs unlabeled texts to "
                            "pseudo-label; give a pool of them.") from None  # fmt: skip
        raise
    gold = [labels.index(str(r[args.label_field])) if str(r.get(args.label_field)) in labels else None for r in records]
    return [render(args.template, r, "--template") for r in records], gold


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return settings_of(args, skip=("work_dir", "iterations"))


def _accuracy(model: PromptClassifier, texts: Sequence[str], labels: Sequence[int], batch_size: int) -> float | None:
    if not texts:
        return None
    pred = class_probabilities(model, texts, batch_size).argmax(-1)
    return float((pred == torch.tensor(list(labels))).float().mean())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) the teacher and every self-training iteration; returns the report (``WORK/report.json``)."""
    from lightning_ft.core.io import atomic_file, write_text_atomic
    from lightning_ft.curation.records import read_pool, write_dataset

    _check(args)
    labels = args.labels or sorted({str(r[args.label_field]) for r in read_pool(
        args.data, argument="--data", fields=(args.label_field,), options={args.label_field: "--label-field"})})  # fmt: skip
    if len(labels) < 2:
        raise UserError(f"--labels {labels} names fewer than two classes: list at least two class values.")
    texts, targets = _examples(args, labels, args.data, "--data")
    pool, pool_gold = _pool(args, labels)
    held_out = _examples(args, labels, args.eval_data, "--eval-data") if args.eval_data else ([], [])

    words = args.label_words or [f" {w}" if is_causal_lm(args.model) else w for w in labels]
    if len(words) != len(labels):
        raise UserError(f"--label-words gives {len(words)} words for {len(labels)} classes ({labels}): give one word "
                        "per class, in the order of --labels.")  # fmt: skip

    eager = args.reweight == "meta" and (args.meta_scope == "all" or is_causal_lm(args.model))

    def fresh(seed: int) -> PromptClassifier:
        return PromptClassifier(args.model, words, lora_r=args.lora_r, max_length=args.max_length, seed=seed,
                                eager_attention=eager)  # fmt: skip

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    settings, state_path = _settings(args), work / STATE_FILE
    iterations = load_rounds(state_path, settings, key="iterations")
    for t in range(args.iterations + 1):
        if len(iterations) > t:
            continue
        root = work / f"iteration_{t}"
        model = fresh(args.seed + t)
        options = {"epochs": args.teacher_epochs, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                   "seed": args.seed + t}  # fmt: skip
        entry: dict[str, Any] = {"iteration": t, "role": "teacher" if t == 0 else "student"}
        if t > 0:
            teacher = fresh(args.seed)
            teacher.load_trainable(torch.load(iterations[t - 1]["model"], weights_only=True))
            guess, probs = pseudo_label(teacher, pool, args.batch_size * 2)
            del teacher
            scored = [(int(g), int(y)) for g, y in zip(guess, pool_gold, strict=True) if y is not None]
            entry["pseudo_label_accuracy"] = sum(g == y for g, y in scored) / len(scored) if scored else None
            rows = [{"text": x, "pseudo_label": labels[int(g)], "probability": float(p.max()),
                     **({"label": labels[y]} if y is not None else {})} for x, g, p, y in zip(pool, guess, probs, pool_gold)]  # fmt: skip
            write_dataset(rows, root / "pseudo_labels.jsonl", {"method": "list", "iteration": t, "teacher":
                          iterations[t - 1]["model"], "pseudo_label_accuracy": entry["pseudo_label_accuracy"]})  # fmt: skip
            options.update(epochs=args.student_epochs, pseudo_texts=pool, pseudo_labels=guess, pseudo_probs=probs,
                           reweight=args.reweight, threshold=args.confidence_threshold, meta_scope=args.meta_scope)  # fmt: skip
        train_classifier(model, texts, targets, **options)
        entry["eval_accuracy"] = _accuracy(model, *held_out, args.batch_size * 2)
        entry["model"] = str(root / "model.pt")
        with atomic_file(root / "model.pt") as tmp:
            torch.save(model.trainable_state(), tmp)
        iterations.append(entry)
        save_rounds(state_path, settings, iterations, key="iterations")
    report = {"method": "list", "labels": labels, "iterations": iterations[: args.iterations + 1],
              "final_model": iterations[args.iterations]["model"]}  # fmt: skip
    write_text_atomic(work / "report.json", json.dumps(report, indent=1) + "\n")
    return report


def main(argv: list[str]) -> None:
    """``lightning-ft self-train ...``: parse, run (or resume) and print one line per iteration."""
    args = _parser().parse_args(argv)
    report = run(args)
    for e in report["iterations"]:
        acc = "" if e["eval_accuracy"] is None else f", eval accuracy {e['eval_accuracy']:.3f}"
        pseudo = (
            ""
            if e.get("pseudo_label_accuracy") is None
            else f", pseudo-label accuracy {e['pseudo_label_accuracy']:.3f}"
        )
        print(f"iteration {e['iteration']} ({e['role']}){acc}{pseudo} -> {e['model']}")
    print(f"final model: {report['final_model']}")
