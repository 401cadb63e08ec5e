"""``lightning-ft steer``: steer a base model with the concept shift vectors of a fine-tune, without training.

Khayatan et al. 2025 add a concept's shift vector ``delta_c = mean(h_ft | c) - mean(h_base | c)`` to the base
model's hidden state at the layer the concepts were found in, which moves the base model toward the fine-tuned
model's behaviour. The shift vectors come from :class:`~lightning_ft.monitors.representation.RepresentationShift`
(``concept_shifts.pt`` in the run folder). :func:`steer` adds ``scale * delta_c`` of one concept to every token, or,
with no concept, the shift of each token's nearest concept centroid, through a forward hook on that decoder block;
it returns the hook's handle (``handle.remove()``, or use it as a context manager).

    lightning-ft steer --model smollm2-135m --shifts runs/sft/concept_shifts.pt --all --prompt "The movie was"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_ft.core.anatomy import decoder_parts
from lightning_ft.errors import SentenceParser, UserError
from lightning_ft.monitors.representation import nearest_concept

__all__ = ["load_shifts", "main", "steer"]

PROG = "lightning-ft steer"
_KEYS = ("layer", "centroids", "shifts")
DESCRIPTION = (
    "Steer a base model toward a fine-tune without training: add the fine-tune's concept shift vectors (the "
    "concept_shifts.pt a RepresentationShift callback wrote into the run folder) to the base model's hidden states at "
    "the layer the concepts were found in, then continue --prompt. Inputs: --model (the base model) and --shifts. "
    "Output: the greedy continuation of the steered base model, printed on stdout."
)


def _parser() -> SentenceParser:
    parser = SentenceParser(prog=PROG, description=DESCRIPTION)
    parser.add_argument("--model", required=True, help="input: the base model (a bundled alias or a Hugging Face "
                        "model folder), the one the fine-tune started from")  # fmt: skip
    parser.add_argument("--shifts", required=True, help="input: the concept_shifts.pt a RepresentationShift callback "
                        "wrote into the run folder")  # fmt: skip
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--concept", type=int, default=None, help="add this concept's shift vector to every token")
    which.add_argument("--all", action="store_true", help="add to each token the shift vector of its nearest concept "
                       "centroid (the default)")  # fmt: skip
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the shift vectors (default 1)")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated (default 32)")
    return parser


def load_shifts(path: str | Path) -> dict[str, Any]:
    """The concept shift vectors saved by ``RepresentationShift`` (``layer``, ``centroids [k, d]``, ``shifts [k, d]``,
    ``counts``, ...)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--shifts {path} is not a file: give the concept_shifts.pt a RepresentationShift run wrote.")
    try:
        shifts = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is the same mistake
        raise UserError(f"--shifts {path} is not a saved tensor file: give the concept_shifts.pt a "
                        "RepresentationShift run wrote.") from err  # fmt: skip
    if not isinstance(shifts, dict) or any(key not in shifts for key in _KEYS) or (
        shifts["shifts"].ndim != 2 or shifts["centroids"].shape != shifts["shifts"].shape
    ):  # fmt: skip
        raise UserError(f"--shifts {path} holds no concept shift vectors (layer, centroids, shifts): give the "
                        "concept_shifts.pt a RepresentationShift run wrote.")  # fmt: skip
    return shifts


def steer(model: nn.Module, shifts: dict[str, Any], concept: int | None = None, scale: float = 1.0) -> RemovableHandle:
    """Add ``scale`` times a concept's shift vector to the output of block ``shifts["layer"]`` of ``model``.

    Args:
        model: The base causal LM (possibly peft-wrapped).
        shifts: The concept shift vectors (:func:`load_shifts`, or ``RepresentationShift.concept_shifts``).
        concept: The concept whose shift is added to every token; ``None``: each token gets the shift of its nearest
            centroid (its hidden state at that layer, before steering).
        scale: Multiplies the shift vectors.

    Returns:
        The forward hook's handle: ``handle.remove()`` (or ``with steer(...):``) stops steering.

    Raises:
        UserError: The shifts do not fit the model's blocks or hidden size, or ``concept`` is not one of them.
    """
    layers = decoder_parts(model, "steer").layers
    layer, vectors, centroids = int(shifts["layer"]), shifts["shifts"], shifts["centroids"]
    hidden = getattr(getattr(model, "config", None), "hidden_size", vectors.shape[1])
    if layer >= len(layers) or vectors.shape[1] != hidden:
        raise UserError(f"the shift vectors are for block {layer} of a model with hidden size {vectors.shape[1]}, "
                        f"which this {len(layers)}-block model with hidden size {hidden} does not match: give the "
                        "base model the fine-tune started from.")  # fmt: skip
    if concept is not None and not 0 <= concept < len(vectors):
        raise UserError(f"concept {concept} is not one of the {len(vectors)} concepts of the shift vectors: give a "
                        f"concept from 0 to {len(vectors) - 1}.")  # fmt: skip

    def add_shift(module: nn.Module, args: Any, output: Any) -> Any:
        states = output[0] if isinstance(output, tuple) else output
        delta = vectors[concept] if concept is not None else vectors[nearest_concept(states, centroids).cpu()]
        steered = states + scale * delta.to(states.device, states.dtype)
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    return layers[layer].register_forward_hook(add_shift)


def main(argv: list[str] | None = None) -> int:
    """``lightning-ft steer ...``: print the steered base model's continuation of ``--prompt``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_ft.assets import resolve_model

    args = _parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be at least 1.")
    if not args.prompt.strip():
        raise UserError("--prompt is empty: give the text to continue.")
    shifts = load_shifts(args.shifts)
    path = resolve_model(args.model, weights=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    encoded = tokenizer(args.prompt, return_tensors="pt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with steer(model, shifts, args.concept, args.scale), torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad)
    print(tokenizer.decode(out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0
