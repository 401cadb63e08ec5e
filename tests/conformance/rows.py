"""The conformance matrix's rows: one :class:`Row` per fine-tuning method, and how one cell of the matrix fits.

A cell is (row, tiny model, host). ``model`` is ``llama`` (tied embeddings), ``gpt2`` (Conv1D layers) or ``bert``
(an encoder classifier with a new head); ``host`` is ``ours`` (our module, or for a mixin the ready-made class that
mixes it in) or ``user`` (a user's own plain LightningModule, :class:`helpers.UserModule`). A row says how to build
the method for a cell, which cells do not apply (``na``, with the reason), what it may change (``check``) and, for
a user host, the refusal the method declares instead (``refuses``). :func:`fit` runs one cell; ``test_matrix.py``
and ``ddp_fit.py`` check the four properties on every cell. A new method joins by adding one :class:`Row` to
:data:`ROWS` (see README.md beside this file).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from helpers import SelectionWatch, SparseWatch, UserModule, make_trainer

from lightning_ft.callbacks import (
    S2FT,
    CoFiTune,
    CorDAInit,
    HalfFineTuning,
    ImportanceLayerSampling,
    LayerFreezing,
    LayerwiseSampling,
    LiNeS,
    LotteryTicket,
    Magnitude,
    PrincipalWeights,
    Random,
    Sensitivity,
    SparseFineTuning,
)
from lightning_ft.copilot import CopilotCausalLM, CopilotMixin
from lightning_ft.data.sampling import ResumableDataLoader, resume_position
from lightning_ft.errors import UserError
from lightning_ft.modules import CausalLMModule, SequenceClassificationModule
from lightning_ft.monitors import IntruderDimensions
from lightning_ft.monitors import ContextAwareness, ImplicitInferenceProbes, RunDashboard
from lightning_ft.monitors.representation import RepresentationShift
from lightning_ft.objectives import (
    CAFTCausalLM,
    KaSACausalLM,
    KaSALossMixin,
    MaskedThoughtCausalLM,
    MaskedThoughtMixin,
    MultiTokenHeadsMixin,
    GroupRelativeCausalLM,
    GroupRelativeRewardMixin,
    PreferenceCausalLM,
    PreferenceLossMixin,
    TaskBalancedCausalLM,
    TaskBalancedLossMixin,
    TokenWeighting,
)
from lightning_ft.objectives.lofit import LoFiTCausalLM, LoFiTMixin
from lightning_ft.objectives.loramoe import LoRAMoECausalLM, LoRAMoEMixin

MODELS = ("llama", "gpt2", "bert")
HOSTS = ("ours", "user")
STEPS = 6  # 3 batches per epoch: the run crosses an epoch
MID = 4  # the resumed run starts from step 4's last.ckpt, mid-epoch, and redraws at its first step
ROWS_PER_EPOCH, BATCH, LENGTH, VOCAB = 12, 4, 12, 300
LR, WARMUP = 1e-2, 2
Check = Literal["selection", "entries", "trainable", "structured", "rewritten"]

_CAUSAL_ONLY = "a causal-LM objective: an encoder classifier has no next-token loss to reshape"


def _host_refusal(mixin: type, member: str) -> dict[str, tuple[type[Exception], str]]:
    """A mixin on a user's plain LightningModule (no ``member`` of the host contract): refused when built."""
    return {
        "user": (TypeError, f"^{mixin.__name__} needs its host module's `{member}`, which UserHosted lacks: mix it")
    }


@dataclass(frozen=True)
class Row:
    """One method of the matrix.

    Attributes:
        name: The row's id in test names.
        declared: The class whose support declaration (:mod:`lightning_ft.support`) applies.
        callback: Builds the method's callback for a host (``None`` for a module mixin).
        module: Builds our module for a mixin row from a model folder and extra module arguments (``None``: the plain
            module of the model); on a ``user`` host the mixin (``declared``) is mixed into the user's module.
        check: What may change: ``selection`` (exactly the active tensors of each step, :class:`SelectionWatch`),
            ``entries`` (only entries inside the sparse masks, :class:`SparseWatch`), ``trainable`` (exactly the
            tensors that require grad when training starts, every one of them) or ``structured`` (exactly the rows
            and columns the method reports, ``allowed_masks()``, in every tensor it reports) or ``rewritten`` (the
            trainable tensors plus the frozen ones an initialisation rewrote before training, ``rewritten_names()``).
        na: Cells that do not apply, by model or host name (or ``ddp``), with the reason.
        refuses: For a host the method cannot work with: ``(exception type, sentence fragment)`` it raises.
        ddp_differs: Why a 2-process run, by design, does not compute what one process with the same global batch
            does ("": it does, up to float rounding); the processes must still agree.
        batch_extra: Extra batch fields the method reads (e.g. ``task_id``), by name.
        dynamic: Whether the trainable set changes during the fit (DDP then needs unused-parameter detection).
        fsdp2_differs: Why a 2-process FSDP2 run, by design, does not compute what the DDP run does ("": it does).
    """

    name: str
    declared: type
    callback: Callable[[str], L.Callback] | None = None
    module: Callable[..., L.LightningModule] | None = None
    check: Check = "trainable"
    na: dict[str, str] = field(default_factory=dict)
    refuses: dict[str, tuple[type[Exception], str]] = field(default_factory=dict)
    batch_extra: tuple[str, ...] = ()
    dynamic: bool = False
    ddp_differs: str = ""
    fsdp2_differs: str = ""

    def applies(self, model: str, host: str) -> str | None:
        """Why the cell ``(model, host)`` does not apply, or ``None`` when it does."""
        return self.na.get(model) or self.na.get(host)


@dataclass(frozen=True)
class _Causal:
    """Builds our causal-LM module ``cls`` (a ready-made mixin class, or the plain module) from a model folder and
    extra module arguments (e.g. ``peft``)."""

    cls: type[L.LightningModule]
    kwargs: dict[str, Any]

    def __call__(self, path: str, **extra: Any) -> L.LightningModule:
        return self.cls(model=path, learning_rate=LR, warmup_steps=WARMUP, weight_decay=0.1, output_dir="",
                        **{**self.kwargs, **extra})  # fmt: skip


def _causal(kind: str, **kwargs: Any) -> _Causal:
    """Builds our causal-LM module of ``kind`` (a ready-made mixin class, or ``plain``)."""
    return _Causal({"caft": CAFTCausalLM, "masked_thought": MaskedThoughtCausalLM, "plain": CausalLMModule,
                    "task_balanced": TaskBalancedCausalLM, "copilot": CopilotCausalLM, "kasa": KaSACausalLM,
                    "preference": PreferenceCausalLM, "grpo": GroupRelativeCausalLM}[kind],
                   kwargs)  # fmt: skip


def _lora_module(path: str, **extra: Any) -> L.LightningModule:
    """Our module of the model at ``path`` with LoRA r=2 on every linear (or Conv1D) layer (a classifier for BERT)."""
    lora = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": "all-linear"}
    if "bert" in Path(path).name:
        return SequenceClassificationModule(model=path, num_labels=2, learning_rate=LR, warmup_steps=WARMUP,
                                            weight_decay=0.1, output_dir="", peft=lora, **extra)  # fmt: skip
    return _causal("plain", peft=lora)(path, **extra)


def _sft(rule: Callable[[], Any], **budget: Any) -> Callable[[str], L.Callback]:
    return lambda host: SparseFineTuning(rule(), save_path="", **budget)


# fmt: off
ROWS: list[Row] = [
    Row("sft-magnitude", SparseFineTuning, _sft(Magnitude, density=0.05, allocation="per_matrix"), check="entries"),
    Row("sft-random", SparseFineTuning, _sft(lambda: Random(reselect_every=2), density=0.05), check="entries"),
    Row(
        "sft-sensitivity", SparseFineTuning, _sft(lambda: Sensitivity(batches=2), density=0.05), check="entries",
        refuses={"user": (ValueError, "needs UserModule.compute_loss")},
        ddp_differs="each process sums the squared gradients of its own half batches, not of the global batch",
        fsdp2_differs="FSDP2 averages each batch's gradients over the processes before they are squared; DDP's rank 0 "
                      "squares those of its own half batches",
    ),
    Row("sft-lt", SparseFineTuning, _sft(lambda: LotteryTicket(dense_steps=2, l1=0.5), density=0.05), check="entries"),
    Row(
        "sft-lift", SparseFineTuning, _sft(lambda: PrincipalWeights(filter_rank=4, reselect_every=2), rank=2),
        check="entries",
    ),
    Row("hft", HalfFineTuning, lambda host: HalfFineTuning(seed=1), check="selection"),
    Row(
        "hft-reset", HalfFineTuning, lambda host: HalfFineTuning(redraw="steps", every_n_steps=2, reset=True, seed=1),
        check="selection", dynamic=True,
    ),
    Row("freezing", LayerFreezing, lambda host: LayerFreezing(freeze_bottom=1), check="selection"),
    Row("lisa", LayerwiseSampling, lambda host: LayerwiseSampling(num_active=1, interval=2), check="selection",
        dynamic=True),
    Row(
        "owlore", LayerwiseSampling,
        lambda host: LayerwiseSampling(preset="owlore", interval=2, outlier_threshold=2.0, calibration_samples=8,
                                       galore_rank=4, galore_update_proj_gap=2),
        check="selection", dynamic=True,
    ),
    Row(  # switch_every=2: Adam's fresh moments at every switch amplify the float rounding of another summation order
        # (1.1e-4 with a switch every step, against the DDP check's 1e-4; training other layers would differ by ~1e-2)
        "ist", ImportanceLayerSampling, lambda host: ImportanceLayerSampling(interval=2, switch_every=2),
        check="selection", dynamic=True,
    ),
    Row(
        "cofitune", CoFiTune, lambda host: CoFiTune(band=(0.5, 1.0), importance_source="train", importance_batches=2,
                                                    softmask=("input_projection", "output_projection", "attention")),
        check="selection",
        ddp_differs="the importance pass draws its dropout per batch, and two processes split the same rows into other "
                    "batches than one process",
        na={"bert": "CoFiTune trains a band of FFN modules only, so an encoder classifier's new head would never train",
            "gpt2": "GPT-2's fused Conv1D attention has no separate projections for CoFiTune's units: refused in one "
                    "sentence by the layer check"},
    ),
    Row("lines", LiNeS, lambda host: LiNeS(alpha=0.5)),
    Row("intruders", IntruderDimensions, lambda host: IntruderDimensions(top_k=4, filename=None)),  # a monitor
    Row("representation", RepresentationShift,  # a monitor
        lambda host: RepresentationShift(num_concepts=2, filename=None, shifts_filename=None),
        na={"bert": "RepresentationShift hooks a causal LM's decoder blocks: an encoder classifier is refused in one "
                    "sentence (tests/monitors/test_representation.py)"}),
    Row("probes", ImplicitInferenceProbes,  # a monitor
        lambda host: ImplicitInferenceProbes(labels=["acq", "earn"], shots=1, per_label=1, max_words=8, filename=None),
        na={"bert": "ImplicitInferenceProbes scores options under a causal LM: an encoder classifier is refused in one "
                    "sentence (tests/monitors/test_forgetting_probes.py)"}),
    Row("context", ContextAwareness,  # a monitor
        lambda host: ContextAwareness(num_dialogues=2, max_length=48, filename=None)),
    Row("dashboard", RunDashboard, lambda host: RunDashboard()),  # panels, dashboard.json and report.html on rank 0
    Row(
        "s2ft", S2FT, lambda host: S2FT(v_ratio=0.5, o_ratio=0.25, u_ratio=0.1, d_ratio=0.1), check="structured",
        na={"bert": "S2FT freezes everything but its slices, so an encoder classifier's new head would never train",
            "gpt2": "GPT-2's fused Conv1D attention has no separate projections to cut into S2FT's units: refused in "
                    "one sentence (tests/callbacks/test_s2ft.py)"},
    ),
    Row(
        "caft", MultiTokenHeadsMixin, module=_causal("caft", num_heads=2, heads_output="", heads_coefficient=0.5),
        na={"bert": _CAUSAL_ONLY}, refuses=_host_refusal(MultiTokenHeadsMixin, "backbone"),
    ),
    Row(
        "masked-thought", MaskedThoughtMixin, module=_causal("masked_thought", max_rate=0.5, warmup=0.0),
        na={"bert": _CAUSAL_ONLY}, refuses=_host_refusal(MaskedThoughtMixin, "backbone"),
        ddp_differs="the masking draw depends on the process's rank, so two processes mask other tokens than one",
    ),
    Row(
        "token-weights", TokenWeighting, module=_causal("plain"), batch_extra=("loss_weights",),
        na={"bert": _CAUSAL_ONLY, "user": "token weights are a batch field that CausalLMModule's loss reads"},
        ddp_differs="each process divides by its own batch's weight sum, so the mean of two means is not the global one",
    ),
    Row(
        "task-balanced", TaskBalancedLossMixin, module=_causal("task_balanced"), batch_extra=("task_id",),
        na={"bert": _CAUSAL_ONLY}, refuses=_host_refusal(TaskBalancedLossMixin, "compute_loss"),
    ),
    Row(
        "kasa", KaSALossMixin,
        module=_causal("kasa", peft={"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
                                     "kasa_config": {}}),
        na={"bert": _CAUSAL_ONLY,
            "gpt2": "peft's KaSA variant adapts nn.Linear layers only, and GPT-2's projections are Conv1D (c_attn)"},
        refuses=_host_refusal(KaSALossMixin, "backbone"),
    ),
    Row(
        "copilot", CopilotMixin,
        module=_causal("copilot", copilot_layers=2, copilot_output="", zero_init_output=False,
                       checkpoint_buffer=True, buffer_rounds=3),
        na={"bert": _CAUSAL_ONLY,
            "gpt2": "GPT-2's Conv1D layers cannot seed the Llama-style Copilot: refused in one sentence, and "
                    "copilot_init='random' trains (tests/copilot/test_copilot_module.py)"},
        refuses=_host_refusal(CopilotMixin, "backbone"),
        ddp_differs="each process's Copilot trains on a round drawn, by rank, from its own mistake log of its half "
                    "batches",
    ),
    Row(
        "loramoe", LoRAMoEMixin,
        module=_Causal(LoRAMoECausalLM, {"num_experts": 4, "expert_rank": 2, "expert_alpha": 4.0,
                                         "expert_dropout": 0.0, "knowledge_tasks": [1]}),
        batch_extra=("task_id",),
        na={"bert": _CAUSAL_ONLY,
            "gpt2": "GPT-2's FFN projections are Conv1D (c_fc, c_proj), which LoRAMoE's experts do not wrap: refused in "
                    "one sentence (tests/objectives/test_loramoe.py)"},
        refuses=_host_refusal(LoRAMoEMixin, "backbone"),
        ddp_differs="the balancing constraint is the coefficient of variation over each process's own batch, as the "
                    "paper's code computes it, not over the global batch",
    ),
    Row(  # stage 1: scales on every head with the L1 term (GPT-2's attn.c_proj is found by the layer map)
        "lofit-heads", LoFiTMixin,
        module=_Causal(LoFiTCausalLM, {"stage": "heads", "heads_output": "", "init_std": 0.01}),
        na={"bert": _CAUSAL_ONLY}, refuses=_host_refusal(LoFiTMixin, "backbone"),
    ),
    Row(  # stage 2: offsets on three chosen heads of two layers only, scales too
        "lofit", LoFiTMixin,
        module=_Causal(LoFiTCausalLM, {"heads": [[0, 1], [1, 0], [1, 1]], "train_scales": True, "l1_lambda": 1e-3}),
        na={"bert": _CAUSAL_ONLY}, refuses=_host_refusal(LoFiTMixin, "backbone"),
    ),
    Row(  # DPO against the frozen copy of the fit-start model; rows pair up as (0, 2), (1, 3) within each batch
        "dpo", PreferenceLossMixin, module=_causal("preference", beta=0.5), batch_extra=("pair_role",),
        na={"bert": _CAUSAL_ONLY}, refuses=_host_refusal(PreferenceLossMixin, "backbone"),
    ),
    Row(  # 2 sampled completions of 3 tokens per prompt (the rows' first half), rewarded by their token count
        "grpo", GroupRelativeRewardMixin,
        module=_causal("grpo", group_size=2, max_new_tokens=3, beta=0.1, reward="conf_rewards:completion_length"),
        batch_extra=("prompt",), na={"bert": _CAUSAL_ONLY}, refuses=_host_refusal(GroupRelativeRewardMixin, "backbone"),
        ddp_differs="each process samples its own prompts' completions, with its rank in the seed",
    ),
    Row(  # the adapters of every linear layer set from the first 2 training batches' covariance; bases rewritten
        "corda", CorDAInit, lambda host: CorDAInit(mode="kpm", data="train", batches=2), module=_lora_module,
        check="rewritten",
        refuses={"user": (UserError, "^CorDAInit initialises LoRA adapters, and UserModule has none: give the module")},
    ),
]
# fmt: on
ROW = {row.name: row for row in ROWS}


# ---------------------------------------------------------------------------------------------- data
class TokenData(L.LightningDataModule):
    """The cell's training data: fixed random token rows without padding, in a fixed order, resumable mid-epoch.

    Under DDP, rank ``r`` of ``w`` reads rows ``r, r + w, ...`` in batches of ``BATCH // w``, so the processes
    together see exactly the global batches of one process (every row has as many labelled tokens, so averaging the
    per-process means gives the global mean). Run with ``use_distributed_sampler=False``.
    """

    def __init__(self, model: str, extra: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.model, self.extra = model, extra

    def rows(self, rank: int = 0, world: int = 1) -> list[dict[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, VOCAB, (ROWS_PER_EPOCH, LENGTH), generator=gen)
        classes = torch.randint(0, 2, (ROWS_PER_EPOCH,), generator=gen)
        weights = torch.randint(0, 3, (ROWS_PER_EPOCH, LENGTH), generator=gen).float()
        rows = []
        for i in range(rank, ROWS_PER_EPOCH, world):
            row = {"input_ids": ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long)}
            row["labels"] = classes[i] if self.model == "bert" else ids[i]
            if "prompt" in self.extra:  # the first half is an unlabelled prompt
                row["labels"] = torch.cat([torch.full((LENGTH // 2,), -100), ids[i][LENGTH // 2 :]])
            if "loss_weights" in self.extra:
                row["loss_weights"] = weights[i]
            if "task_id" in self.extra:
                row["task_id"] = torch.tensor(i % 2)
            if "pair_role" in self.extra:  # rows 4k, 4k+1 chosen; 4k+2, 4k+3 rejected: whole pairs on every rank
                row["pair_role"] = torch.tensor((i // 2) % 2)
            rows.append(row)
        return rows

    def train_dataloader(self) -> ResumableDataLoader:
        world = self.trainer.world_size
        rows = self.rows(self.trainer.global_rank, world)
        batch = BATCH // world
        _, skip = resume_position(self.trainer, -(-len(rows) // batch))
        return ResumableDataLoader(rows, batch_size=batch, shuffle=False, skip_batches=skip)


# ---------------------------------------------------------------------------------------------- one fit
def build(row: Row, model: str, host: str, path: str) -> tuple[L.LightningModule, list[L.Callback]]:
    """The cell's module and the method's callbacks (with the probe that checks it at every step last)."""
    kind = "classifier" if model == "bert" else "causal"
    mixin = row.module is not None and row.callback is None and row.declared is not TokenWeighting
    if host == "user" and mixin:  # the mixin on their module
        module: L.LightningModule = type("UserHosted", (row.declared, UserModule), {})(path=path, kind=kind)
    elif host == "user":
        module = UserModule(path, kind=kind)
    elif row.module is not None:
        module = row.module(path)
    elif model == "bert":
        module = SequenceClassificationModule(model=path, num_labels=2, learning_rate=LR, warmup_steps=WARMUP,
                                              weight_decay=0.1, output_dir="")  # fmt: skip
    else:
        module = _causal("plain")(path)
    callbacks: list[L.Callback] = [row.callback(host)] if row.callback is not None else []
    return module, callbacks + [Probe(row, callbacks[0] if callbacks else None)]


class Probe(L.Callback):
    """Checks the method at every step (``selection``/``entries``) and records what it may change.

    ``allowed`` (after the fit): per tensor name, ``None`` when the whole tensor may change, else a flat mask of
    the entries that may; names absent may not change.
    """

    def __init__(self, row: Row, method: L.Callback | None) -> None:
        self.row, self.method = row, method
        self.watch: L.Callback | None = None
        if row.check == "selection":
            self.watch = SelectionWatch(method, reset=bool(getattr(method, "reset", False)))
        elif row.check == "entries":
            self.watch = SparseWatch(method)
        self.trainable: set[str] = set()
        self.history: list[tuple[int, frozenset[str]]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.trainable = {n for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.watch is not None:
            self.watch.on_train_batch_start(trainer, pl_module, *args)
        if self.row.check == "selection":
            self.history.append(self.watch.history[-1])  # type: ignore[union-attr]

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self.watch is not None:
            self.watch.on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.watch is not None:
            self.watch.on_train_batch_end(trainer, pl_module, *args)

    def allowed(self, module: L.LightningModule) -> dict[str, torch.Tensor | None]:
        """What the fit may have changed, by the module's parameter names."""
        if self.row.check == "trainable":
            return {name: None for name in self.trainable}
        if self.row.check == "rewritten":  # e.g. CorDA's residual base weights, set before training
            return {name: None for name in self.trainable | set(self.method.rewritten_names(module))}  # type: ignore[union-attr]
        if self.row.check == "structured":  # the chosen units' rows/columns (S2FT), by the model's own names
            prefix = {id(m): n for n, m in module.named_modules()}[id(self.method._model)]  # type: ignore[union-attr]
            masks = self.method.allowed_masks()  # type: ignore[union-attr]
            return {(prefix + "." if prefix else "") + n: mask for n, mask in masks.items()}
        model = self.method._model if self.row.check == "entries" else self.method.selection.model  # type: ignore[union-attr]
        prefix = {id(m): n for n, m in module.named_modules()}[id(model)]
        full = (prefix + ".") if prefix else ""
        if self.row.check == "selection":
            ever = {name for _, active in self.history for name in active}
            return {full + n: None for n in ever}
        union: dict[str, torch.Tensor] = self.watch.union  # type: ignore[union-attr]
        dense = {full + n: None for n in getattr(self.method, "_dense_params", {})}
        return {**dense, **{full + n: union[n] for n in union}}


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter, by name."""
    return {n: p.detach().clone() for n, p in module.named_parameters()}


class KeepMid(L.Callback):
    """Copies ``last.ckpt`` (a file, or a distributed checkpoint's folder) to ``mid.ckpt`` when it holds step
    :data:`MID` (ModelCheckpoint runs after the other callbacks, so at the end of step ``MID + 1`` it is still step
    ``MID``'s): what a crash then would leave."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == MID + 1 and trainer.is_global_zero:
            last = self.folder / "last.ckpt"
            if last.is_dir():  # a distributed checkpoint (FSDP2): a folder of shards
                shutil.copytree(last, self.folder / "mid.ckpt")
            else:
                shutil.copyfile(last, self.folder / "mid.ckpt")
        if trainer.global_step == MID + 1:
            trainer.strategy.barrier()


def fit(
    row: Row, model: str, host: str, path: str, root: Path, ckpt: str | None = None
) -> tuple[L.LightningModule, Probe]:
    """Fit one cell for :data:`STEPS` steps with an atomic ``last.ckpt`` after every step, kept at step :data:`MID` as
    ``root/ckpt/mid.ckpt`` (or resume from ``ckpt``)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    module, callbacks = build(row, model, host, path)
    probe = callbacks[-1]
    callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0))
    callbacks += [KeepMid(root / "ckpt")] if ckpt is None else []
    trainer = make_trainer(root, STEPS, enable_checkpointing=True, callbacks=callbacks)
    trainer.fit(module, TokenData(model, row.batch_extra), ckpt_path=ckpt)
    return module, probe  # type: ignore[return-value]


def fsdp2_rows() -> list[Row]:
    """The rows run under FSDP2 (on the tiny Llama, our host): every DDP row; one that refuses FSDP2 must refuse it
    with its declared sentence there."""
    return [row for row in ROWS if row.applies("llama", "ours") is None and "fsdp2" not in row.na]


def ddp_rows() -> list[Row]:
    """The rows whose 2-process DDP run is compared with one process (on the tiny Llama, our host)."""
    return [row for row in ROWS if row.applies("llama", "ours") is None and "ddp" not in row.na]
