r"""
Transformer Copilot
^^^^^^^^^^^^^^^^^^^

Transformer Copilot (Zou et al., "Transformer Copilot: Learning from the Mistake Log in LLM Fine-tuning",
NeurIPS 2025, arXiv 2505.16270): while the Pilot fine-tunes, a mistake log records its input embeddings, its
layer-averaged hidden states and its token-level error ``onehot(y) - softmax(logits)``; a small Copilot decoder
learns to predict that error from the log, and at inference ``p = p_pilot + lambda * f_copilot`` at every step.

The paper publishes no code. The points it leaves open are arguments here, with these defaults (each marked
UNVERIFIED in ``specs/core-methods.md``):

* Errors exist only at positions with a labelled next token (the response), and the Copilot's own sequence is
  those positions in order (the error sequence, shifted right: its first input is 0); the prompt reaches it only
  through the cross-attention memory, so its cost follows the response length. At decoding its sequence starts at
  the prompt's last position and each generated position gets the Copilot's previous output.
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

The mixin is assembled by concern, each part deriving from the one before: its arguments
(:mod:`~lightning_ft.copilot.settings`), building the decoder (:mod:`~lightning_ft.copilot.building`), its state,
export and checkpoint entry (:mod:`~lightning_ft.copilot.storage`), the mistake-log rounds
(:mod:`~lightning_ft.copilot.rounds`), the two-optimizer step (:mod:`~lightning_ft.copilot.training`), and fused
evaluation, the ``lambda`` sweep and fused decoding (:mod:`~lightning_ft.copilot.evaluation`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from typing_extensions import override

from lightning_ft.copilot.building import build_copilot, wrap_copilot_lora
from lightning_ft.copilot.evaluation import CopilotEvaluation, ErrorFit, fit_datamodule
from lightning_ft.copilot.log import ErrorStorage, MistakeLog
from lightning_ft.copilot.settings import LAMBDA_GRID, CopilotSettings
from lightning_ft.core.host import require_host
from lightning_ft.modules.metrics import EvalMetrics
from lightning_ft.support import MethodSupport

__all__ = ["LAMBDA_GRID", "CopilotMixin"]


class CopilotMixin(CopilotEvaluation):
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
    chosen at the end of ``fit`` from 0 and ``lambda_grid`` on the validation data, by ``lambda_metric``. Whether the
    Copilot learns is logged in validation: ``val/copilot_rmse``, the RMSE of its rectification (decoded as at
    inference) against the Pilot's true error ``onehot(y) - p`` at the scored positions, next to
    ``val/copilot_zero_rmse``, the RMSE of predicting zero (an untrained Copilot). The Copilot is part of Lightning
    checkpoints and is exported beside the HF folder (``copilot_output``), from where ``copilot_path`` loads it. Paper:
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
        lambda_grid: The weights ``auto`` chooses from (paper's grid), besides 0 (the Pilot alone), which ``auto``
            always considers: a Copilot that does not help on the validation data is switched off.
        lambda_metric: The validation metric ``auto`` chooses on: ``target_acc`` (highest; ties go to the lower
            fused target loss, then to the smaller weight) or ``target_loss`` (lowest; ties to the smaller weight).
            Default: accuracy where the validation data has answer options, else the target loss.
        copilot_head: The Copilot's output layer: ``full``, a trainable ``[vocab, hidden]`` projection; ``tied``,
            a trainable ``[hidden, embed]`` map read out through the frozen embedding matrix the errors enter by
            (as a tied LM head; 0.3M instead of 28M trainable parameters on SmolLM2, which the paper's parameter
            count suggests: its Copilots train about 1.2% of the parameters).
        copilot_loss: ``rmse`` (over all entries) or ``token_rmse`` (mean of per-token RMSEs).
        buffer_rounds: Rounds kept in the mistake log (paper: 128).
        buffer_mib: Cap on the log's memory; the oldest rounds go first.
        error_storage: ``dense`` (bf16 over the vocabulary) or ``topk`` (largest magnitudes only).
        error_topk: Entries per token kept by ``topk``.
        checkpoint_buffer: Put every process's mistake log in Lightning checkpoints (gathered onto rank 0 as each is
            written; each process resumes with its own, so resumes continue exactly).
        copilot_seed: Seed of the draws from the log.
        fused_eval: Log the fused metrics in validation and test.
        copilot_output: Where ``on_fit_end`` writes the Copilot; default ``<default_root_dir>/copilot``; ``""``
            disables.
        zero_init_output: Start the output map at zero (an untrained Copilot changes nothing).
        **kwargs: Arguments of the module it is mixed into (``model``, ``peft``, ``learning_rate`` ...).
    """

    support: ClassVar[MethodSupport] = MethodSupport(
        frozenset({"ddp", "fsdp2", "quantized", "lora", "mixed"}),
        {},
        "Pilot and Copilot may both be LoRA; a quantized Pilot needs copilot_model (unquantized) for the Copilot's "
        "initial layers; 16-mixed is refused (one loss scaler, two optimizers). Under FSDP2 the Pilot is sharded and "
        "the (small) Copilot replicated, its gradients averaged over the processes.",
    )

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
        lambda_metric: Literal["target_acc", "target_loss"] | None = None,
        copilot_head: Literal["full", "tied"] = "full",
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
        settings = CopilotSettings(
            copilot_layers=copilot_layers, copilot_init=copilot_init, copilot_model=copilot_model,
            copilot_config=copilot_config, copilot_path=copilot_path, copilot_peft=copilot_peft,
            copilot_learning_rate=copilot_learning_rate, copilot_weight_decay=copilot_weight_decay,
            copilot_warmup_steps=copilot_warmup_steps, copilot_lambda=copilot_lambda, lambda_grid=lambda_grid,
            lambda_metric=lambda_metric, copilot_head=copilot_head,
            copilot_loss=copilot_loss, buffer_rounds=buffer_rounds, buffer_mib=buffer_mib, error_storage=error_storage,
            error_topk=error_topk, checkpoint_buffer=checkpoint_buffer, copilot_seed=copilot_seed,
            fused_eval=fused_eval, copilot_output=copilot_output, zero_init_output=zero_init_output,
        )  # fmt: skip
        super().__init__(**kwargs)
        require_host(self, CopilotMixin, ("backbone", "aligned_logits", "compute_loss", "eval_update", "_log_eval",
                                          "evaluate", "generate"))  # fmt: skip
        self.copilot_settings = settings
        self.register_buffer("copilot_lambda_value", torch.tensor(settings.initial_lambda, dtype=torch.float64))
        self.lambda_sweep = []
        with torch.random.fork_rng(devices=[]):  # building the Copilot must not shift the user's seed stream
            self.copilot = build_copilot(self.backbone, settings)
        if copilot_path:
            self.load_copilot(copilot_path)
        if copilot_peft:
            wrap_copilot_lora(self.copilot, copilot_peft)
        self.mistake_log = MistakeLog(buffer_rounds, buffer_mib)
        self.fused_metrics = EvalMetrics()
        self.error_fit = ErrorFit()
        self._round_store = None

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":
            return
        trainer = self.trainer
        from lightning_ft.core.process_group import destroy_process_group_at_exit
        from lightning_ft.support import check_support

        destroy_process_group_at_exit()  # a clean gloo exit, also for this mixin in a user's own module
        check_support(self, trainer, self.backbone)
        if str(trainer.precision) == "16-mixed":
            raise ValueError(
                "CopilotMixin steps two optimizers, which precision='16-mixed' would share one loss scaler between: "
                "use precision='bf16-mixed' or '32-true'."
            )
        if self.copilot_settings.auto_lambda and fit_datamodule(trainer) is None:
            raise ValueError(
                "copilot_lambda='auto' picks the fusion weight on the validation data of a DataModule, and this fit has "
                "none: pass a datamodule with validation data or set copilot_lambda to a number."
            )
        # Lightning has checked the Trainer's accumulation and clipping settings for automatic optimization; from
        # here on the module steps by hand and honours them itself.
        self.automatic_optimization = False

    @override
    def configure_callbacks(self) -> Any:
        # the first hook of a fit, called before Lightning checks the Trainer's settings: a second fit of this module
        # is checked as automatic optimization again (setup turns it off), instead of refusing gradient_clip_val
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == "fit":
            self.automatic_optimization = True
        return super().configure_callbacks()
