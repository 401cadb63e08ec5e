r"""
Transformer Copilot
^^^^^^^^^^^^^^^^^^^

Transformer Copilot (Zou et al., "Transformer Copilot: Learning from the Mistake Log in LLM Fine-tuning",
NeurIPS 2025, arXiv 2505.16270): while the Pilot fine-tunes, a mistake log records its input embeddings, its
layer-averaged hidden states and its token-level error ``onehot(y) - softmax(logits)``; a small Copilot decoder
learns to predict that error from the log, and at inference ``p = p_pilot + lambda * f_copilot`` at every step.

The paper publishes no code. The points it leaves open are arguments here, with these defaults (each marked
UNVERIFIED in ``specs/core-methods.md``):

* Errors exist only at positions with a labelled next token (the response); elsewhere the Copilot's input is 0.
  At decoding the prompt's inputs are 0 and each generated position gets the Copilot's previous output.
* The ``vocab -> hidden`` input map is a frozen copy of the Pilot's input embeddings followed by a trainable
  square map (``e_y - E^T p`` is what an error reads as); the ``hidden -> vocab`` output map is trainable and
  starts at zero, so an untrained Copilot leaves the Pilot unchanged.
* Rotary positions are kept in the self-attention layers, none in the cross-attention layers; the memory
  ``[X ; pool(h)]`` is RMS-normalised per cross layer (``pool`` = mean of the decoder layers' outputs).
* The loss is the RMSE over every (token, vocabulary) entry of the batch (``copilot_loss='rmse'``), or the mean
  over tokens of per-token RMSEs (``'token_rmse'``).
* The error is computed in fp32 and stored in bf16 over the full vocabulary (``error_storage='dense'``) or as
  its ``error_topk`` largest magnitudes (``'topk'``); the log holds ``buffer_rounds`` rounds within
  ``buffer_mib`` MiB.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from lightning_ft.copilot.decoder import CopilotConfig, CopilotDecoder, DecoderCache
from lightning_ft.copilot.fusion import CopilotLogitsProcessor, PilotCapture, fuse_log_probs
from lightning_ft.copilot.log import ErrorStorage, MistakeLog, Round
from lightning_ft.core.anatomy import decoder_parts, plain_state
from lightning_ft.data.collate import IGNORE_INDEX
from lightning_ft.modules.backbone import atomic_dir, export_path
from lightning_ft.modules.metrics import EvalMetrics
from lightning_ft.support import MethodSupport

__all__ = ["CopilotMixin", "LAMBDA_GRID"]

LAMBDA_GRID = (0.1, 0.3, 0.5, 0.8, 1.0)
_FORMAT = 1


class CopilotMixin:
    """Pilot + Copilot training from the Pilot's mistake log, and fused decoding.

    Mix into :class:`~lightning_ft.modules.CausalLMModule` (ready made as
    :class:`~lightning_ft.copilot.CopilotCausalLM`). Each training batch:

    1. the Pilot computes its usual loss (every other mixin's ``compute_loss`` applies) while hooks record its
       input embeddings and layer-averaged hidden states; its error at the labelled positions is computed in fp32
       from the detached logits and the round goes into the CPU mistake log;
    2. a round drawn uniformly from the log (possibly from older Pilot weights) trains the Copilot on the RMSE
       between its output and the logged error, teacher-forced on the previous errors;
    3. one backward pass over both losses (their graphs are disjoint: the Copilot reads only detached tensors),
       then the Pilot's optimizer steps, then the Copilot's.

    Optimisation is manual (``automatic_optimization`` turns off in ``setup``, after Lightning's own checks), but the
    Trainer's ``accumulate_grad_batches``, ``gradient_clip_val`` and ``gradient_clip_algorithm`` apply exactly as in
    automatic mode: the Pilot's trajectory is the same, bit for bit, as without the Copilot. ``global_step`` counts
    Pilot steps.

    Validation logs the Pilot's metrics (``val/target_acc`` ...) and the fused ones (``val/fused_target_acc``,
    ``val/fused_target_loss``) side by side; fused scores are teacher-forced with the Copilot feeding back its own
    outputs, as when decoding. ``generate`` and ``predict_step`` decode with the fusion (HF ``generate`` with
    :class:`~lightning_ft.copilot.CopilotLogitsProcessor`). With ``copilot_lambda='auto'`` the fusion weight is
    chosen at the end of ``fit`` from ``lambda_grid`` on the validation data (best fused accuracy, or lowest fused
    target loss; ties go to the smaller weight). The Copilot is part of Lightning checkpoints and is exported
    beside the HF folder (``copilot_output``), from where ``copilot_path`` loads it. Paper:
    https://arxiv.org/abs/2505.16270

    Args:
        copilot_layers: Copilot decoder layers (alternating self- and cross-attention; paper: the whole decoder of a
            smaller model).
        copilot_init: ``pretrained``: copy the lowest ``copilot_layers`` decoder layers, the final norm and the input
            embeddings of ``copilot_model`` (default: the Pilot's own pretrained weights); ``random``: a fresh
            decoder shaped by ``copilot_config``.
        copilot_model: A Llama/Mistral/Qwen2-style model (alias, folder or Hub id) with the Pilot's vocabulary.
        copilot_config: Overrides of :class:`~lightning_ft.copilot.CopilotConfig` for ``random`` initialisation.
        copilot_path: A folder written by :meth:`save_copilot` to start from (transfer to another Pilot of the
            family works when the vocabulary and width agree).
        copilot_peft: LoRA for the Copilot's decoder layers (``{r: 16, lora_alpha: 16}``); the output map and the
            small input/memory maps stay fully trainable.
        copilot_learning_rate: Copilot AdamW learning rate. The paper uses 5e-4 for a LoRA Copilot; a fully trained
            Copilot with a zero-initialised output map needs less (its RMSE target is about 0.005 per entry for a
            49k vocabulary, and larger rates overshoot it in the first steps).
        copilot_weight_decay: Copilot AdamW weight decay on matrices.
        copilot_warmup_steps: Copilot warm-up steps; default the Pilot's.
        copilot_lambda: Fusion weight ``lambda``, or ``auto``.
        lambda_grid: The weights ``auto`` chooses from (paper's grid).
        copilot_loss: ``rmse`` (over all entries) or ``token_rmse`` (mean of per-token RMSEs).
        buffer_rounds: Rounds kept in the mistake log (paper: 128).
        buffer_mib: Cap on the log's memory; the oldest rounds go first.
        error_storage: ``dense`` (bf16 over the vocabulary) or ``topk`` (largest magnitudes only).
        error_topk: Entries per token kept by ``topk``.
        checkpoint_buffer: Put the mistake log in Lightning checkpoints (resumes then continue exactly).
        copilot_seed: Seed of the draws from the log.
        fused_eval: Log the fused metrics in validation and test.
        copilot_output: Where ``on_fit_end`` writes the Copilot; default ``<default_root_dir>/copilot``; ``""``
            disables.
        zero_init_output: Start the output map at zero (an untrained Copilot changes nothing).
        **kwargs: Arguments of the module it is mixed into (``model``, ``peft``, ``learning_rate`` ...).
    """

    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "quantized", "lora", "mixed"}),
        {
            "fsdp": "{name} steps the Pilot and the Copilot by hand with two optimizers, which {strategy} would shard "
            "together: use strategy='ddp' (or a single device)."
        },
        "Pilot and Copilot may both be LoRA; a quantized Pilot needs copilot_model (unquantized) for the Copilot's "
        "initial layers; 16-mixed is refused (one loss scaler, two optimizers).",
    )
    backbone: nn.Module
    copilot: CopilotDecoder

    def __init__(
        self,
        *,
        copilot_layers: int = 4,
        copilot_init: Literal["pretrained", "random"] = "pretrained",
        copilot_model: str | None = None,
        copilot_config: dict[str, Any] | None = None,
        copilot_path: str | None = None,
        copilot_peft: dict[str, Any] | None = None,
        copilot_learning_rate: float = 1e-4,
        copilot_weight_decay: float = 0.0,
        copilot_warmup_steps: int | None = None,
        copilot_lambda: float | Literal["auto"] = 1.0,
        lambda_grid: tuple[float, ...] = LAMBDA_GRID,
        copilot_loss: Literal["rmse", "token_rmse"] = "rmse",
        buffer_rounds: int = 128,
        buffer_mib: float = 512.0,
        error_storage: ErrorStorage = "dense",
        error_topk: int = 256,
        checkpoint_buffer: bool = False,
        copilot_seed: int = 0,
        fused_eval: bool = True,
        copilot_output: str | None = None,
        zero_init_output: bool = True,
        **kwargs: Any,
    ) -> None:
        auto = copilot_lambda == "auto"
        checks = [
            (copilot_layers >= 2, f"copilot_layers={copilot_layers} must be at least 2 (one self-, one cross-attention)."),
            (copilot_init in ("pretrained", "random"), f"copilot_init={copilot_init!r} is not an option: use 'pretrained' or 'random'."),
            (copilot_learning_rate > 0, f"copilot_learning_rate={copilot_learning_rate} must be positive."),
            (auto or (isinstance(copilot_lambda, (int, float)) and copilot_lambda >= 0),
             f"copilot_lambda={copilot_lambda!r} must be a number >= 0 or 'auto'."),
            (len(lambda_grid) > 0 and all(x >= 0 for x in lambda_grid), f"lambda_grid={lambda_grid} must list weights >= 0."),
            (copilot_loss in ("rmse", "token_rmse"), f"copilot_loss={copilot_loss!r} is not a loss: use 'rmse' or 'token_rmse'."),
            (error_storage in ("dense", "topk"), f"error_storage={error_storage!r} is not an option: use 'dense' or 'topk'."),
            (error_topk >= 1, f"error_topk={error_topk} must be at least 1."),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        super().__init__(**kwargs)
        self.copilot_args = dict(
            lr=copilot_learning_rate, wd=copilot_weight_decay, warmup=copilot_warmup_steps, auto=auto,
            grid=tuple(float(x) for x in lambda_grid), loss=copilot_loss, storage=error_storage, topk=error_topk,
            checkpoint_buffer=checkpoint_buffer, seed=copilot_seed, fused_eval=fused_eval, output=copilot_output,
        )  # fmt: skip
        self.register_buffer(
            "copilot_lambda_value", torch.tensor(1.0 if auto else float(copilot_lambda), dtype=torch.float64)
        )  # type: ignore[attr-defined]
        self.lambda_sweep: list[dict[str, float]] = []
        with torch.random.fork_rng(devices=[]):  # building the Copilot must not shift the user's seed stream
            self.copilot = self._build_copilot(copilot_layers, copilot_init, copilot_model, copilot_config,
                                               zero_init_output)  # fmt: skip
        if copilot_path:
            self.load_copilot(copilot_path)
        if copilot_peft:
            self._wrap_copilot_lora(copilot_peft)
        self.mistake_log = MistakeLog(buffer_rounds, buffer_mib)
        self.fused_metrics = EvalMetrics()
        self._round_store: dict[str, Any] | None = None

    @property
    def copilot_lambda(self) -> float:
        """The fusion weight ``lambda`` in use (a buffer: it travels with the state dict, e.g. out of DDP spawn)."""
        return float(self.copilot_lambda_value)  # type: ignore[attr-defined]

    @copilot_lambda.setter
    def copilot_lambda(self, value: float) -> None:
        self.copilot_lambda_value.fill_(float(value))  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ building
    def _pilot_parts(self) -> tuple[Any, Any]:
        parts = decoder_parts(self.backbone, "CopilotMixin")
        return parts.layers, parts.config

    def _build_copilot(
        self, n_layers: int, init: str, source: str | None, overrides: dict[str, Any] | None, zero_out: bool
    ) -> CopilotDecoder:
        layers, config = self._pilot_parts()
        base = self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone
        embedding = base.get_input_embeddings().weight
        dtype = embedding.dtype if embedding.dtype.is_floating_point else torch.float32
        if init == "random":
            cfg = CopilotConfig(**{"vocab_size": embedding.shape[0], "hidden_size": int(config.hidden_size),
                                   "pilot_hidden_size": int(config.hidden_size), "num_layers": n_layers,
                                   "num_heads": int(config.num_attention_heads),
                                   "num_kv_heads": int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
                                   "intermediate_size": int(getattr(config, "intermediate_size", 4 * config.hidden_size)),
                                   **(overrides or {})})  # fmt: skip
            decoder = CopilotDecoder(cfg, zero_init_output=zero_out)
            with torch.no_grad():
                decoder.embed.copy_(embedding.detach().float())
            return decoder.to(dtype)
        if source is not None:
            return self._copilot_from_model(source, n_layers, int(config.hidden_size), embedding.shape[0], zero_out).to(
                dtype
            )
        if n_layers > len(layers):
            raise ValueError(f"copilot_layers={n_layers} is more than the Pilot's {len(layers)} decoder layers.")
        states = [_plain_layer_state(layers[i]) for i in range(n_layers)]
        cfg = _config_from(config, n_layers, embedding.shape[0], int(config.hidden_size), states[0])
        decoder = CopilotDecoder(cfg, zero_init_output=zero_out)
        decoder.load_pilot_layers(states)
        with torch.no_grad():
            decoder.embed.copy_(embedding.detach().float())
        return decoder.to(dtype)

    def _copilot_from_model(
        self, source: str, n_layers: int, pilot_hidden: int, vocab: int, zero_out: bool
    ) -> CopilotDecoder:
        from transformers import AutoModelForCausalLM

        from lightning_ft.assets import resolve_model

        model = AutoModelForCausalLM.from_pretrained(resolve_model(source), dtype=torch.float32)
        parts = decoder_parts(model, "CopilotMixin")
        layers, config = parts.layers, parts.config
        embedding = model.get_input_embeddings().weight.detach()
        if embedding.shape[0] != vocab:
            raise ValueError(
                f"copilot_model={source!r} has a vocabulary of {embedding.shape[0]}, the Pilot's has {vocab}: use a model "
                "of the Pilot's family (same tokenizer)."
            )
        if n_layers > len(layers):
            raise ValueError(f"copilot_layers={n_layers} is more than copilot_model's {len(layers)} decoder layers.")
        states = [_plain_layer_state(layers[i]) for i in range(n_layers)]
        cfg = _config_from(config, n_layers, vocab, pilot_hidden, states[0])
        decoder = CopilotDecoder(cfg, zero_init_output=zero_out)
        decoder.load_pilot_layers(states)
        with torch.no_grad():
            decoder.embed.copy_(embedding)  # the Copilot reads errors through its own model's embeddings
        return decoder

    def _wrap_copilot_lora(self, spec: dict[str, Any]) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        options = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.0,
                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}  # fmt: skip
        options.update({k: v for k, v in spec.items() if k != "peft_type"})
        for param in self.copilot.layers.parameters():
            param.requires_grad_(False)
        self.copilot.layers = inject_adapter_in_model(LoraConfig(**options), self.copilot.layers)

    # ------------------------------------------------------------------ saving and loading
    def save_copilot(self, path: str | Path) -> Path:
        """Write the Copilot (weights, shape and ``copilot_lambda``) to a folder that ``copilot_path`` loads."""
        from safetensors.torch import save_file

        with atomic_dir(path) as tmp:
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.copilot.state_dict().items()}
            save_file(tensors, str(tmp / "copilot.safetensors"))
            meta = {"format": _FORMAT, "config": vars(self.copilot.cfg), "lambda": self.copilot_lambda,
                    "lambda_sweep": self.lambda_sweep}  # fmt: skip
            (tmp / "copilot.json").write_text(json.dumps(meta, indent=2))
        return Path(path)

    def load_copilot(self, path: str | Path) -> None:
        """Load a Copilot written by :meth:`save_copilot`; a Copilot of another shape fails with one sentence."""
        from safetensors.torch import load_file

        folder = Path(path)
        if not (folder / "copilot.json").is_file():
            raise ValueError(
                f"copilot_path={str(path)!r} holds no copilot.json: give a folder written by a Copilot fit."
            )
        meta = json.loads((folder / "copilot.json").read_text())
        cfg = CopilotConfig(**meta["config"])
        mine = self.copilot.cfg
        if (cfg.vocab_size, cfg.pilot_hidden_size) != (mine.vocab_size, mine.pilot_hidden_size):
            raise ValueError(
                f"copilot_path={str(path)!r} was trained for vocabulary {cfg.vocab_size} and width "
                f"{cfg.pilot_hidden_size}, this Pilot has {mine.vocab_size} and {mine.pilot_hidden_size}: pair it with "
                "a Pilot of the same family."
            )
        dtype = self.copilot.lm_out.weight.dtype
        decoder = CopilotDecoder(cfg)
        decoder.load_state_dict(load_file(str(folder / "copilot.safetensors")), strict=True)
        self.copilot = decoder.to(dtype)
        self.copilot_lambda = float(meta.get("lambda", self.copilot_lambda))

    def copilot_output_path(self) -> Path | None:
        """Where ``on_fit_end`` writes the Copilot, or ``None`` when disabled."""
        return export_path(self.copilot_args["output"], getattr(self, "_trainer", None), "copilot")

    # ------------------------------------------------------------------ the Pilot's round
    def aligned_logits(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The module's aligned logits; while a round is being recorded, also keep them (detached) for the log."""
        logits, targets, weights = super().aligned_logits(batch)  # type: ignore[misc]
        if self._round_store is not None:
            self._round_store["logits"], self._round_store["targets"] = logits.detach(), targets
        return logits, targets, weights

    def _record_round(self, batch: dict[str, Any], capture: PilotCapture) -> Round:
        from lightning_ft.cuda_ext import copilot_error

        store = self._round_store or {}
        if "logits" not in store or capture.embeds is None:
            raise RuntimeError(
                "CopilotMixin saw no Pilot logits in this training step: compute_loss must go through aligned_logits."
            )
        logits, targets = store["logits"], store["targets"]
        labels = batch["labels"]
        b, t = labels.shape
        columns = _target_columns(labels, logits.shape[1])
        error_mask = torch.zeros(b, t, dtype=torch.bool, device=labels.device)
        labelled = targets != IGNORE_INDEX
        error_mask[:, columns] = labelled
        rows = logits[labelled]
        tgt = targets[labelled]
        indices = None
        if self.copilot_args["storage"] == "topk":
            full = copilot_error(rows, tgt, dtype=torch.float32)
            k = min(self.copilot_args["topk"], full.shape[-1])
            picked = full.abs().topk(k, dim=-1).indices
            errors, indices = full.gather(1, picked).to(torch.bfloat16), picked.to(torch.int32)
        else:
            errors = copilot_error(rows, tgt, dtype=torch.bfloat16)
        mask = batch.get("attention_mask")
        valid = mask.bool() if mask is not None else torch.ones(b, t, dtype=torch.bool, device=labels.device)
        entry = Round(
            capture.embeds.to(torch.bfloat16), capture.hidden.to(torch.bfloat16), valid, error_mask, errors, indices
        )
        return entry.to("cpu")

    # ------------------------------------------------------------------ the Copilot's loss
    def copilot_outputs(self, entry: Round) -> tuple[torch.Tensor, torch.Tensor]:
        """The Copilot's teacher-forced outputs at a round's error positions and the logged errors, both ``[N, V]``
        fp32: the input at position ``t + 1`` is the error of position ``t``, so the output at ``t`` sees the errors
        of positions ``< t`` only."""
        cp = self.copilot
        dtype = cp.lm_out.weight.dtype
        entry = entry.to(self.device)  # type: ignore[attr-defined]
        b, t = entry.valid.shape
        where = entry.error_mask.nonzero()
        inputs = torch.zeros(b, t, cp.cfg.hidden_size, dtype=dtype, device=entry.valid.device)
        if where.shape[0]:
            rows = (
                cp.input_rows_sparse(entry.errors, entry.indices)
                if entry.indices is not None
                else cp.input_rows(entry.errors)
            )
            inputs = inputs.index_put((where[:, 0], where[:, 1] + 1), rows.to(dtype))
        hidden = cp(inputs, entry.embeds.to(dtype), entry.hidden.to(dtype), entry.valid)
        if where.shape[0] == 0:  # nothing to learn from; keep every parameter in the graph (DDP)
            empty = (hidden.sum() + cp.lm_out.weight.sum()).float() * 0.0
            return empty.expand(0, cp.cfg.vocab_size), torch.zeros(0, cp.cfg.vocab_size, device=hidden.device)
        return cp.rectify(hidden[where[:, 0], where[:, 1]]), entry.dense_errors(cp.cfg.vocab_size)

    def copilot_step_loss(self, entry: Round) -> torch.Tensor:
        """RMSE between the Copilot's output and the logged errors of one round (on the module's device)."""
        out, target = self.copilot_outputs(entry)
        if out.shape[0] == 0:
            return out.sum()  # zero, connected to every parameter
        diff = out - target
        if self.copilot_args["loss"] == "token_rmse":
            return diff.pow(2).mean(-1).add(1e-12).sqrt().mean()
        return diff.pow(2).mean().add(1e-12).sqrt()

    # ------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        super().setup(stage)  # type: ignore[misc]
        if stage != "fit":
            return
        trainer = self.trainer  # type: ignore[attr-defined]
        from lightning_ft.strategies.process_group import destroy_process_group_at_exit
        from lightning_ft.support import check_support

        destroy_process_group_at_exit()  # a clean gloo exit, also for this mixin in a user's own module
        check_support(self, trainer, self.backbone)
        if str(trainer.precision) == "16-mixed":
            raise ValueError(
                "CopilotMixin steps two optimizers, which precision='16-mixed' would share one loss scaler between: "
                "use precision='bf16-mixed' or '32-true'."
            )
        if self.copilot_args["auto"] and trainer.datamodule is None:
            raise ValueError(
                "copilot_lambda='auto' picks the fusion weight on the validation data of a DataModule, and this fit has "
                "none: pass a datamodule with validation data or set copilot_lambda to a number."
            )
        # Lightning has checked the Trainer's accumulation and clipping settings for automatic optimization; from
        # here on the module steps by hand and honours them itself.
        self.automatic_optimization = False  # type: ignore[misc]

    def configure_optimizers(self) -> Any:
        from lightning_ft.modules.causal_lm import build_optimizer

        h = self.hparams  # type: ignore[attr-defined]
        mine = {id(p) for p in self.copilot.parameters()}
        pilot = [(n, p) for n, p in self.named_parameters() if p.requires_grad and id(p) not in mine]  # type: ignore[attr-defined]
        copilot = [(n, p) for n, p in self.copilot.named_parameters() if p.requires_grad]
        warmup = self.copilot_args["warmup"] if self.copilot_args["warmup"] is not None else h.warmup_steps
        first = build_optimizer(self, h.learning_rate, h.weight_decay, h.warmup_steps, h.schedule, pilot)  # type: ignore[arg-type]
        second = build_optimizer(self, self.copilot_args["lr"], self.copilot_args["wd"], warmup, h.schedule, copilot)  # type: ignore[arg-type]
        return [first["optimizer"], second["optimizer"]], [first["lr_scheduler"], second["lr_scheduler"]]

    def on_fit_start(self) -> None:
        super().on_fit_start()  # type: ignore[misc]
        if len(self.trainer.optimizers) != 2:  # type: ignore[attr-defined]
            raise ValueError(
                "CopilotMixin builds its own two optimizers (Pilot and Copilot), but this fit replaced them: remove "
                "--optimizer/--lr_scheduler and set learning_rate and copilot_learning_rate instead."
            )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        trainer = self.trainer  # type: ignore[attr-defined]
        size = batch["input_ids"].shape[0]
        self._round_store = {}
        try:
            with PilotCapture(self.backbone) as capture:
                pilot_loss = self.compute_loss(batch)  # type: ignore[attr-defined]
            entry = self._record_round(batch, capture)
        finally:
            self._round_store = None
        self.mistake_log.push(entry)
        from lightning_ft.objectives._common import batch_generator

        draw = batch_generator(self.copilot_args["seed"], trainer.global_step, batch_idx, trainer.global_rank)
        copilot_loss = self.copilot_step_loss(self.mistake_log.sample(draw))
        accumulate = trainer.accumulate_grad_batches
        self.manual_backward((pilot_loss + copilot_loss) / accumulate if accumulate > 1 else pilot_loss + copilot_loss)  # type: ignore[attr-defined]
        if not trainer.fit_loop._should_accumulate():
            self._step_both(trainer)
        self.log("train/loss", pilot_loss.detach(), prog_bar=True, batch_size=size)  # type: ignore[attr-defined]
        self.log("train/copilot_loss", copilot_loss.detach(), prog_bar=True, batch_size=size)  # type: ignore[attr-defined]
        self.log("copilot/buffer_mib", self.mistake_log.nbytes / 2**20, batch_size=size)  # type: ignore[attr-defined]
        self.log("copilot/buffer_rounds", float(len(self.mistake_log)), batch_size=size)  # type: ignore[attr-defined]
        return pilot_loss.detach()

    def _step_both(self, trainer: Any) -> None:
        pilot_opt, copilot_opt = self.optimizers()  # type: ignore[attr-defined]
        pilot_sched, copilot_sched = self.lr_schedulers()  # type: ignore[attr-defined]
        clip, algorithm = trainer.gradient_clip_val, trainer.gradient_clip_algorithm
        if clip:
            self.clip_gradients(pilot_opt, gradient_clip_val=clip, gradient_clip_algorithm=algorithm)  # type: ignore[attr-defined]
        pilot_opt.step()
        pilot_opt.zero_grad()
        pilot_sched.step()
        # the Copilot's optimizer steps outside Lightning's wrapper: global_step counts Pilot steps, and callbacks
        # that act on the Pilot's optimizer (on_before_optimizer_step) never see the Copilot's
        raw = copilot_opt.optimizer
        if clip:
            params = [p for g in raw.param_groups for p in g["params"]]
            if algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, clip)
            else:
                torch.nn.utils.clip_grad_norm_(params, clip)
        raw.step()
        raw.zero_grad(set_to_none=True)
        copilot_sched.step()

    # ------------------------------------------------------------------ fused evaluation
    def eval_update(self, batch: dict[str, Any]) -> None:
        """The Pilot's metrics, and on target batches the fused ones (``fused_target_acc``, ``fused_target_loss``)."""
        if not self.copilot_args["fused_eval"] or batch.get("split") == "control":
            super().eval_update(batch)  # type: ignore[misc]
            return
        with PilotCapture(self.backbone, logits=True) as capture:
            super().eval_update(batch)  # type: ignore[misc]
        parts = self._fusion_parts(batch, capture)
        if parts is not None:
            _update_fused(self.fused_metrics, parts, self.copilot_lambda)

    @torch.no_grad()
    def _fusion_parts(self, batch: dict[str, Any], capture: PilotCapture) -> dict[str, Any] | None:
        """The Pilot's probabilities and the Copilot's rectifications at the scored positions of one batch."""
        if capture.logits is None or capture.embeds is None:
            return None
        logits, input_ids = capture.logits, batch["input_ids"]
        b, t = input_ids.shape
        mask = batch.get("attention_mask")
        valid = mask.bool() if mask is not None else torch.ones(b, t, dtype=torch.bool, device=input_ids.device)
        if "option_token_ids" in batch:  # one token per option: the prediction after the prompt's last token
            where = torch.zeros(b, t, dtype=torch.bool, device=input_ids.device)
            where[torch.arange(b, device=input_ids.device), batch["last_index"]] = True
            probs_at = logits[torch.arange(b, device=input_ids.device), batch["last_index"]]
            kind = {"kind": "option_tokens", "option_ids": batch["option_token_ids"], "gold": batch["label_index"]}
        else:
            labels = batch["labels"]
            columns = _target_columns(labels, logits.shape[1] if logits.shape[1] < t else t - 1)
            aligned = logits if logits.shape[1] < t else logits[:, :-1]
            targets = labels[:, 1:][:, columns]
            labelled = targets != IGNORE_INDEX
            where = torch.zeros(b, t, dtype=torch.bool, device=input_ids.device)
            where[:, columns] = labelled
            probs_at = aligned[labelled]
            kind = {"kind": "sequences" if "label_index" in batch else "tokens", "targets": targets[labelled],
                    "rows": labelled.nonzero()[:, 0], "batch": b}  # fmt: skip
            if "label_index" in batch:
                kind.update(gold=batch["label_index"], num_options=int(batch["num_options"]))
        rect = self.copilot_rollout(capture.embeds, capture.hidden, valid, where)
        return {**kind, "scores": probs_at.float(), "rect": rect}

    @torch.no_grad()
    def copilot_rollout(
        self, embeds: torch.Tensor, hidden: torch.Tensor, valid: torch.Tensor, where: torch.Tensor
    ) -> torch.Tensor:
        """The Copilot's rectifications ``[N, V]`` at the positions ``where`` (row-major), decoding as at inference:
        the input after a scored position is the Copilot's own output there, every other input is zero."""
        cp = self.copilot
        dtype = cp.lm_out.weight.dtype
        b, t = valid.shape
        if not bool(where.any()):
            return torch.zeros(0, cp.cfg.vocab_size, device=valid.device)
        first = int(where.any(0).nonzero()[0])
        last = int(where.any(0).nonzero()[-1])
        if bool((where.sum(1) <= 1).all()):  # one scored position per row: no feedback, every input is zero
            zeros = torch.zeros(b, last + 1, cp.cfg.hidden_size, dtype=dtype, device=valid.device)
            out = cp(zeros, embeds[:, : last + 1].to(dtype), hidden[:, : last + 1].to(dtype), valid[:, : last + 1])
            return cp.rectify(out[where[:, : last + 1]])
        cache = DecoderCache()
        zeros = torch.zeros(b, first + 1, cp.cfg.hidden_size, dtype=dtype, device=valid.device)
        state = cp(
            zeros, embeds[:, : first + 1].to(dtype), hidden[:, : first + 1].to(dtype), valid[:, : first + 1], cache
        )[:, -1]
        out = torch.zeros(b, t, cp.cfg.vocab_size, device=valid.device)
        for pos in range(first, last + 1):
            rect = cp.rectify(state)  # [B, V] at position pos
            out[:, pos] = rect
            if pos == last:
                break
            feed = torch.where(
                where[:, pos, None], cp.input_rows(rect), torch.zeros((), dtype=dtype, device=valid.device)
            )
            nxt = slice(pos + 1, pos + 2)
            state = cp(
                feed[:, None].to(dtype), embeds[:, nxt].to(dtype), hidden[:, nxt].to(dtype), valid[:, nxt], cache
            )[:, 0]
        return out[where]

    def _log_eval(self, prefix: str) -> None:
        super()._log_eval(prefix)  # type: ignore[misc]
        for key, value in self.fused_metrics.compute_and_reset().items():
            if key.startswith("target"):
                self.log(f"{prefix}/fused_{key}", value, prog_bar=key == "target_acc")  # type: ignore[attr-defined]

    @torch.no_grad()
    def evaluate(self, dataloaders: list[Any]) -> dict[str, float]:
        """The module's evaluation outside the Trainer, plus ``fused_target_*`` at the current ``copilot_lambda``."""
        self.fused_metrics.compute_and_reset()
        out = super().evaluate(dataloaders)  # type: ignore[misc]
        fused = {f"fused_{k}": v for k, v in self.fused_metrics.compute_and_reset().items() if k.startswith("target")}
        return {**out, **fused}

    @torch.no_grad()
    def sweep_lambda(self, dataloaders: list[Any], grid: tuple[float, ...] | None = None) -> list[dict[str, float]]:
        """Fused target metrics for each weight of ``grid`` (and 0, the Pilot alone) on target batches; one pass."""
        grid = tuple(grid or self.copilot_args["grid"])
        weights = (0.0, *grid)
        metrics = {lam: EvalMetrics() for lam in weights}
        was_training = self.training  # type: ignore[attr-defined]
        self.eval()  # type: ignore[attr-defined]
        try:
            for loader in dataloaders:
                for raw in loader:
                    batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in raw.items()}  # type: ignore[attr-defined]
                    if batch.get("split") == "control":
                        continue
                    with PilotCapture(self.backbone, logits=True) as capture:
                        self._pilot_forward_for(batch)
                    parts = self._fusion_parts(batch, capture)
                    if parts is not None:
                        for lam in weights:
                            _update_fused(metrics[lam], parts, lam)
        finally:
            self.train(was_training)  # type: ignore[attr-defined]
        return [{"lambda": lam, **metrics[lam].compute_and_reset()} for lam in weights]

    def _pilot_forward_for(self, batch: dict[str, Any]) -> None:
        if "label_index" in batch:
            self(batch["input_ids"], batch.get("attention_mask"))  # type: ignore[operator]
        else:
            self.aligned_logits(batch)

    def choose_lambda(self, rows: list[dict[str, float]]) -> float:
        """The weight of the grid with the best fused accuracy (or lowest fused target loss); ties: the smaller."""
        grid = [r for r in rows if r["lambda"] in self.copilot_args["grid"]]
        if not grid or not any("target_acc" in r or "target_loss" in r for r in grid):
            raise ValueError("copilot_lambda='auto' found no target batches in the validation data: give the DataModule a "
                             "validation split or set copilot_lambda to a number.")  # fmt: skip
        key = (
            (lambda r: (-r["target_acc"], r["lambda"]))
            if "target_acc" in grid[0]
            else (lambda r: (r["target_loss"], r["lambda"]))
        )
        return float(min(grid, key=key)["lambda"])

    # ------------------------------------------------------------------ fit end, checkpoints, generation
    def on_fit_end(self) -> None:
        """Export the Pilot as the module does; choose ``lambda`` if ``auto``; write the Copilot beside it."""
        super().on_fit_end()  # type: ignore[misc]
        trainer = self.trainer  # type: ignore[attr-defined]
        if self.copilot_args["auto"]:
            loaders = trainer.datamodule.val_dataloader()
            rows = self.sweep_lambda(loaders if isinstance(loaders, (list, tuple)) else [loaders])
            chosen = torch.tensor([self.choose_lambda(rows)], dtype=torch.float64)
            chosen = trainer.strategy.broadcast(chosen, src=0)
            self.copilot_lambda, self.lambda_sweep = float(chosen[0]), rows
            for logger in trainer.loggers:
                logger.log_metrics({"copilot/lambda": self.copilot_lambda}, step=trainer.global_step)
                if hasattr(logger, "log_table"):
                    columns = list(rows[0])
                    logger.log_table(
                        key="copilot/lambda_sweep", columns=columns, data=[[r.get(c) for c in columns] for r in rows]
                    )
            self._record_lambda_in_last_checkpoint(trainer)
        path = self.copilot_output_path()
        if path is not None and trainer.is_global_zero:
            self.save_copilot(path)
        trainer.strategy.barrier("lightning_ft.save_copilot")

    def _record_lambda_in_last_checkpoint(self, trainer: Any) -> None:
        """The last checkpoint was written before ``lambda`` was chosen: put the choice into it, so that
        ``validate``/``predict --ckpt_path last.ckpt`` decode with it.

        Written through :func:`lightning_ft.core.io.atomic_file`: a failed write leaves the checkpoint whole, and a
        ``last.ckpt`` link (``save_last="link"``) stays a link to the rewritten checkpoint."""
        from lightning_ft.core.io import atomic_file

        callback = trainer.checkpoint_callback
        last = Path(getattr(callback, "last_model_path", "") or "")
        if trainer.is_global_zero and last.is_file():
            checkpoint = torch.load(last, map_location="cpu", weights_only=False)
            checkpoint["copilot"] = {**checkpoint.get("copilot", {}), "lambda": self.copilot_lambda,
                                     "lambda_sweep": self.lambda_sweep}  # fmt: skip
            if "copilot_lambda_value" in checkpoint.get("state_dict", {}):
                checkpoint["state_dict"]["copilot_lambda_value"] = self.copilot_lambda_value.detach().cpu().clone()  # type: ignore[attr-defined]
            with atomic_file(last) as tmp:
                torch.save(checkpoint, tmp)
        trainer.strategy.barrier("lightning_ft.copilot_lambda")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        state = {"lambda": self.copilot_lambda, "lambda_sweep": self.lambda_sweep}
        if self.copilot_args["checkpoint_buffer"]:
            state["log"] = self.mistake_log.state_dict()
        checkpoint["copilot"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        state = checkpoint.get("copilot", {})
        self.copilot_lambda = float(state.get("lambda", self.copilot_lambda))
        self.lambda_sweep = list(state.get("lambda_sweep", []))
        if "log" in state:
            self.mistake_log.load_state_dict(state["log"])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The module's ``generate`` with the Copilot fused at every step (``copilot_lambda=0``: the Pilot alone).

        ``copilot_lambda`` may be passed to override the module's weight for this call.
        """
        lam = float(kwargs.pop("copilot_lambda", self.copilot_lambda))
        if lam == 0:
            return super().generate(input_ids, attention_mask, **kwargs)  # type: ignore[misc]
        from transformers import LogitsProcessorList

        with CopilotLogitsProcessor(self, lam, attention_mask) as fuse:
            processors = LogitsProcessorList([fuse, *(kwargs.pop("logits_processor", None) or [])])
            return super().generate(input_ids, attention_mask, logits_processor=processors, **kwargs)  # type: ignore[misc]


# ---------------------------------------------------------------------- helpers
def _target_columns(labels: torch.Tensor, kept: int) -> torch.Tensor:
    """Columns ``t`` (predicting ``labels[:, t + 1]``) the aligned logits cover: every one, or those some row needs
    (``CausalLMModule.aligned_logits`` keeps only those when the backbone supports ``logits_to_keep``)."""
    targets = labels[:, 1:]
    if kept == targets.shape[1]:
        return torch.arange(kept, device=labels.device)
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    if keep.numel() != kept:
        raise RuntimeError(f"the Pilot's aligned logits cover {kept} positions, the labels {keep.numel()}.")
    return keep


def _update_fused(metrics: EvalMetrics, parts: dict[str, Any], lam: float) -> None:
    logp = fuse_log_probs(parts["scores"], parts["rect"], lam)
    tiny = math.log(torch.finfo(torch.float32).tiny)
    logp = logp.clamp_min(tiny)  # a fused probability of zero scores as the smallest float, not -inf
    if parts["kind"] == "option_tokens":
        metrics.update_choice(logp[:, parts["option_ids"]], parts["gold"])
        return
    token = logp.gather(1, parts["targets"][:, None]).squeeze(1)
    if parts["kind"] == "sequences":
        per_row = torch.zeros(parts["batch"], device=token.device).index_add_(0, parts["rows"], token)
        metrics.update_choice(per_row.view(-1, parts["num_options"]), parts["gold"])
        return
    metrics.update_lm(-token, parts["targets"], "target")


def _plain_layer_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    refusal = (
        "CopilotMixin cannot copy the quantized Pilot weight {name!r} into the Copilot: set copilot_model to the "
        "unquantized model (e.g. smollm2-135m) or copilot_init='random'."
    )
    return {k: v.float() for k, v in plain_state(layer, refusal).items()}


def _config_from(
    config: Any, n_layers: int, vocab: int, pilot_hidden: int, state: dict[str, torch.Tensor]
) -> CopilotConfig:
    rope = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get(
        "rope_theta", 10000.0
    )
    heads = int(config.num_attention_heads)
    return CopilotConfig(
        vocab_size=vocab, hidden_size=int(config.hidden_size), pilot_hidden_size=pilot_hidden,
        embed_size=int(config.hidden_size), num_layers=n_layers,
        num_heads=heads, num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        intermediate_size=int(config.intermediate_size), rms_norm_eps=float(getattr(config, "rms_norm_eps", 1e-5)),
        rope_theta=float(rope), attention_bias="self_attn.q_proj.bias" in state,
    )  # fmt: skip
