"""``lightning-ft mitigate-intruders``: scale down the intruder dimensions of a trained LoRA adapter.

Shuttleworth et al. 2024 (https://arxiv.org/abs/2410.21228) shrink each intruder dimension of the merged weight
``W + dW``: with ``B_int A_int`` its part along the intruder singular vectors, ``W' = W + dW + (lambda - 1) B_int A_int``,
then refit the adapter to ``W' - W`` at its own rank. This runs peft's ``reduce_intruder_dimension`` (the paper's
defaults: top 10 singular vectors, epsilon 0.5, lambda 0.75) on a LoRA adapter folder and writes the mitigated
adapter as a new adapter folder (atomically), with ``intruders.json``: the layers that had intruders and how many.
Lower lambda removes more of them (less forgetting, less task accuracy; the paper's Figure 8).

    lightning-ft mitigate-intruders --adapter runs/lora/hf_model --output runs/lora/mitigated
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lightning_ft.core.io import atomic_dir, check_output
from lightning_ft.errors import SentenceParser, UserError

__all__ = ["main", "mitigate"]

PROG = "lightning-ft mitigate-intruders"


def _parser() -> SentenceParser:
    parser = SentenceParser(prog=PROG, description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("--adapter", required=True, help="input: a peft LoRA adapter folder (adapter_config.json + "
                        "adapter weights), e.g. the hf_model folder of a LoRA run")  # fmt: skip
    parser.add_argument("--output", required=True, help="output: the folder of the mitigated adapter")
    parser.add_argument("--base", default=None, help="the base model (alias or folder); default: the adapter's "
                        "base_model_name_or_path")  # fmt: skip
    parser.add_argument("--top-k", type=int, default=10, help="singular vectors checked per layer (default 10)")
    parser.add_argument("--epsilon", type=float, default=0.5, help="intruder threshold on the cosine similarity "
                        "(default 0.5)")  # fmt: skip
    parser.add_argument("--lambda", dest="lam", type=float, default=0.75, help="the share of each intruder dimension "
                        "kept (default 0.75; 1 changes nothing)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    return parser


def mitigate(
    adapter: str | Path,
    output: str | Path,
    base: str | None = None,
    top_k: int = 10,
    epsilon: float = 0.5,
    lam: float = 0.75,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the mitigated adapter of ``adapter`` to ``output``; returns the report (also ``intruders.json``)."""
    from peft import PeftModel
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    from transformers import AutoModelForCausalLM

    from lightning_ft.assets import resolve_model

    folder = Path(adapter).expanduser()
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(f"--adapter {adapter} holds no adapter_config.json: give a peft LoRA adapter folder (a LoRA "
                        "run's hf_model folder), not a merged model.")  # fmt: skip
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise UserError(f"--adapter {adapter} is a {config.get('peft_type')} adapter: intruder mitigation applies to "
                        "LoRA adapters only.")  # fmt: skip
    if top_k < 1 or not 0 < epsilon <= 1 or not 0 <= lam <= 1:
        raise UserError(f"--top-k {top_k}, --epsilon {epsilon} and --lambda {lam} must be a positive count, a "
                        "similarity in (0, 1] and a share in [0, 1].")  # fmt: skip
    out = check_output(output, [("--adapter", folder)], kind="folder", overwrite=overwrite)
    source = base or config.get("base_model_name_or_path")
    if not source:
        raise UserError(f"--adapter {adapter} does not name its base model: give --base.")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model(source)), str(folder))
    lines: list[str] = []
    reduce_intruder_dimension(model, top_k=top_k, threshold_epsilon=epsilon, mitigation_lambda=lam,
                              logging_sink=lines.append)  # fmt: skip
    layers = {}
    for line in lines:
        found = re.match(r"(.+): Intruders: (\d+)$", line)
        if found:
            layers[found.group(1)] = int(found.group(2))
    report = {"adapter": str(folder), "base": source, "top_k": top_k, "epsilon": epsilon, "lambda": lam,
              "layers_with_intruders": layers, "total": sum(layers.values())}  # fmt: skip
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp / "saved"), selected_adapters=["intruder_reduced"])
        saved = tmp / "saved" / "intruder_reduced"
        for file in saved.iterdir():
            file.rename(tmp / file.name)
        (tmp / "saved" / "intruder_reduced").rmdir()
        for leftover in (tmp / "saved").iterdir():
            leftover.unlink()
        (tmp / "saved").rmdir()
        (tmp / "intruders.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report


def main(argv: list[str]) -> None:
    """``lightning-ft mitigate-intruders ...``."""
    args = _parser().parse_args(argv)
    report = mitigate(args.adapter, args.output, args.base, args.top_k, args.epsilon, args.lam, args.overwrite)
    print(f"{report['total']} intruder dimensions in {len(report['layers_with_intruders'])} layers scaled by "
          f"lambda={report['lambda']} -> {args.output}")  # fmt: skip
