"""FAFT, feedback-aware fine-tuning (Chen et al. 2024, "Can We Rely on LLM Agents to Draft Long-Horizon Plans?
Let's Take TravelPlanner as an Example", arXiv 2408.06318, RQ4).

What the paper does: the planner samples several plans per training query; TravelPlanner's programmatic evaluator
scores each plan constraint by constraint (pass/fail); the verdicts are written out as feedback, and the model is
fine-tuned on (query + feedback -> plan) for good and bad plans alike, so that it learns what a plan that satisfies
(or violates) each constraint looks like. At inference the query is conditioned on all-positive feedback, asking
for a plan that satisfies every constraint. The paper reports substantial gains over plain SFT on the same queries.

Reconstructed, not verified (the paper's text and code were not available here; the project spec marks FAFT as
reconstructed): the feedback wording (``Feedback: <constraint>: satisfied; <constraint>: violated; ...``) and its
place (before the prompt, ``feedback_template``), the gold answer added with all-positive feedback (as SFT's
example), and the de-duplication of identical samples of one prompt. The checker is any user function
``checker(answer, record) -> {constraint: bool}`` (the bundled example: :func:`~lightning_ft.curation.faft_checks.
sentiment_format`); the samples come from the shared, disk-cached
:class:`~lightning_ft.curation.generation.GenerationService`, so a rebuild generates nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lightning_ft.assets import cache_dir
from lightning_ft.curation.generation import GenerationService, GenerationSettings
from lightning_ft.curation.records import import_callable
from lightning_ft.data.collate import encode_example, render
from lightning_ft.data.instruction import InstructionDataModule
from lightning_ft.errors import UserError

__all__ = ["FeedbackAwareDataModule", "FeedbackAwareTargets"]

Checker = Callable[[str, Mapping[str, Any]], Mapping[str, bool]]


class FeedbackAwareTargets:
    """Samples answers to training prompts, checks them, and pairs each with its verbalised feedback (FAFT).

    Args:
        checker: the checker, a ``module:function`` string (as YAML gives it) or the function itself:
            ``checker(answer, record) -> {constraint name: bool}``, the same names for every answer.
        num_samples: answers sampled per prompt (identical samples of one prompt are kept once).
        max_new_tokens: tokens per sampled answer.
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        seed: the sampling seed (per prompt and sample, see ``GenerationService``).
        include_gold: also train on the gold answer with all-positive feedback.
        feedback_template: how feedback and prompt combine (``str.format`` fields ``feedback`` and ``prompt``).

    Example::

        targets = FeedbackAwareTargets("lightning_ft.curation.faft_checks:sentiment_format", num_samples=4)
        rows = targets(records, prompts, golds, GenerationService("smollm2-135m", cache="faft-cache"))
        targets.condition(prompt, targets.all_positive())  # the prompt at predict time
    """

    SATISFIED, VIOLATED = "satisfied", "violated"

    def __init__(
        self,
        checker: str | Checker,
        num_samples: int = 4,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        include_gold: bool = True,
        feedback_template: str = "{feedback}\n{prompt}",
    ) -> None:
        if isinstance(checker, str):
            self.checker_name = checker
            checker = import_callable(checker, "checker", "be module:function, e.g. "
                                                           "lightning_ft.curation.faft_checks:sentiment_format")  # fmt: skip
        else:
            self.checker_name = getattr(checker, "__qualname__", repr(checker))
        if not callable(checker):
            raise UserError(f"checker {self.checker_name!r} is not a function: name a function "
                            "checker(answer, record) -> {constraint: bool}.")  # fmt: skip
        self.checker: Checker = checker
        if num_samples < 1 or max_new_tokens < 1:
            raise UserError(f"num_samples={num_samples} and max_new_tokens={max_new_tokens} must both be at least 1.")
        try:
            feedback_template.format(feedback="", prompt="")
        except (KeyError, IndexError, ValueError):
            raise UserError(f"feedback_template={feedback_template!r} may use only the fields {{feedback}} and "
                            "{prompt}.") from None  # fmt: skip
        if "{feedback}" not in feedback_template or "{prompt}" not in feedback_template:
            raise UserError(f"feedback_template={feedback_template!r} must contain both {{feedback}} and {{prompt}}.")
        self.num_samples, self.max_new_tokens, self.seed = num_samples, max_new_tokens, seed
        self.temperature, self.top_p = temperature, top_p
        self.include_gold, self.feedback_template = include_gold, feedback_template
        self.constraints: list[str] | None = None

    def settings(self, chat_template: bool = False) -> Any:
        """The ``GenerationSettings`` of the samples (its fields are part of the cache key)."""
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens, do_sample=True, temperature=self.temperature, top_p=self.top_p,
            num_samples=self.num_samples, seed=self.seed, chat_template=chat_template,
        )  # fmt: skip

    def check(self, answer: str, record: Mapping[str, Any]) -> dict[str, bool]:
        """The checker's verdicts on ``answer``, after checking their form (the first call fixes the constraints)."""
        found = self.checker(answer, record)
        if not isinstance(found, Mapping) or not found:
            raise UserError(f"checker {self.checker_name!r} returned {type(found).__name__} for the answer "
                            f"{answer[:40]!r}: it must return a non-empty dict of constraint name to bool, e.g. "
                            "{'one word': True}.")  # fmt: skip
        bad = [k for k, v in found.items() if not isinstance(k, str) or not isinstance(v, (bool, np.bool_))]
        if bad:
            raise UserError(f"checker {self.checker_name!r} returned non-bool verdicts for {bad!r}: each constraint "
                            "name must be a string and each verdict True or False.")  # fmt: skip
        names = list(found)
        if self.constraints is None:
            self.constraints = names
        elif names != self.constraints:
            raise UserError(f"checker {self.checker_name!r} returned the constraints {names} after {self.constraints}: "
                            "it must return the same constraint names, in the same order, for every answer.")  # fmt: skip
        return {k: bool(v) for k, v in found.items()}

    def verbalise(self, verdicts: Mapping[str, bool]) -> str:
        """``Feedback: <constraint>: satisfied; <constraint>: violated; ...`` in the checker's order."""
        parts = [f"{name}: {self.SATISFIED if ok else self.VIOLATED}" for name, ok in verdicts.items()]
        return "Feedback: " + "; ".join(parts)

    def all_positive(self) -> str:
        """The feedback of an answer that satisfies every constraint (the predict-time condition)."""
        if self.constraints is None:
            raise UserError("the constraint names are not known yet: check one answer first (setup does).")
        return self.verbalise(dict.fromkeys(self.constraints, True))

    def condition(self, prompt: str, feedback: str) -> str:
        """``prompt`` conditioned on ``feedback`` (through ``feedback_template``)."""
        return self.feedback_template.format(feedback=feedback, prompt=prompt)

    def __call__(
        self,
        records: Sequence[Mapping[str, Any]],
        prompts: Sequence[str],
        golds: Sequence[str],
        generator: Any,
        chat_template: bool = False,
    ) -> list[dict[str, Any]]:
        """The FAFT rows of ``records``: per record its distinct sampled answers, then (``include_gold``) its gold.

        Each row holds ``prompt`` (the record's prompt, without feedback), ``answer``, ``verdicts``, ``feedback``
        (verbalised) and ``kind`` (``sample`` or ``gold``). ``generator`` is a ``GenerationService``.
        """
        if not records:
            return []
        self.check(golds[0], records[0])  # fixes the constraint names before any sampling
        samples = generator.generate(list(prompts), self.settings(chat_template))
        rows: list[dict[str, Any]] = []
        for record, prompt, gold, answers in zip(records, prompts, golds, samples):
            for answer in dict.fromkeys(answers):
                verdicts = self.check(answer, record)
                rows.append({"prompt": prompt, "answer": answer, "verdicts": verdicts,
                             "feedback": self.verbalise(verdicts), "kind": "sample"})  # fmt: skip
            if self.include_gold:
                rows.append({"prompt": prompt, "answer": gold, "verdicts": dict.fromkeys(self.constraints or [], True),
                             "feedback": self.all_positive(), "kind": "gold"})  # fmt: skip
        return rows


class FeedbackAwareDataModule(InstructionDataModule):
    """Instruction data whose training split is FAFT's feedback-conditioned samples (:class:`FeedbackAwareTargets`).

    In ``fit`` the training prompts are answered ``num_samples`` times by ``generator`` (default: the LightningModule
    being fitted, before training) through the shared, disk-cached ``GenerationService``; each answer is checked and
    trained on with its feedback in front of the prompt. Validation, test and predict prompts carry all-positive
    feedback (``val/target_acc`` with ``label_options`` scores the options after it); validation and test targets
    are the gold responses.

    Example (YAML, see ``configs/faft.yaml``)::

        data:
          class_path: lightning_ft.curation.faft.FeedbackAwareDataModule
          init_args: {checker: "lightning_ft.curation.faft_checks:sentiment_format", num_samples: 4, sample_max_new_tokens: 8}

    The sampling arguments are prefixed ``sample_`` so that they never meet a LightningModule's own (a logger merges
    the two sets of hyperparameters and refuses a name with two values, e.g. ``CausalLMModule.max_new_tokens``).

    Args:
        checker: the checker's ``module:function`` (see :class:`FeedbackAwareTargets`).
        num_samples: answers sampled per training prompt.
        sample_max_new_tokens: tokens per sampled answer.
        sample_temperature: sampling temperature.
        sample_top_p: nucleus sampling mass.
        sample_seed: the sampling seed; default ``split_seed``.
        include_gold: also train on the gold response with all-positive feedback.
        feedback_template: how feedback and prompt combine (fields ``feedback`` and ``prompt``).
        generator: the model that samples (alias or folder); default: the LightningModule being fitted.
        generation_cache: the generation cache (a folder or ``.jsonl`` file); default: ``curation/generations`` in
            the lightning-ft cache (``$LIGHTNING_FT_CACHE`` or ``~/.cache/lightning_ft``), as the data commands use;
            ``""`` keeps nothing.
        generation_batch_size: prompts per generation batch.
        **kwargs: the arguments of :class:`~lightning_ft.data.InstructionDataModule` (``dataset``,
            ``prompt_template``, ``response_template``, ``train_size``, ``batch_size``, ...).
    """

    def __init__(
        self,
        checker: str = "lightning_ft.curation.faft_checks:sentiment_format",
        num_samples: int = 4,
        sample_max_new_tokens: int = 8,
        sample_temperature: float = 1.0,
        sample_top_p: float = 1.0,
        sample_seed: int | None = None,
        include_gold: bool = True,
        feedback_template: str = "{feedback}\n{prompt}",
        generator: str | None = None,
        generation_cache: str | None = None,
        generation_batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if generation_batch_size < 1:
            raise UserError(f"generation_batch_size={generation_batch_size} must be at least 1.")
        h = self.hparams
        self.targets = FeedbackAwareTargets(
            checker, num_samples=num_samples, max_new_tokens=sample_max_new_tokens, temperature=sample_temperature,
            top_p=sample_top_p,
            seed=h.split_seed if sample_seed is None else sample_seed, include_gold=include_gold,
            feedback_template=feedback_template,
        )  # fmt: skip
        self.generator: Any = None  # the GenerationService, made on first use (or set it before setup)
        self.rows: list[dict[str, Any]] = []
        self._stage: str | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load and split the data; in ``fit`` sample, check and encode the FAFT training examples."""
        if self._encoded:
            return
        self._stage = stage
        super().setup(stage)
        if self.rows:
            h = self.hparams
            train = []
            for row in self.rows:
                answer = self._finish(row["answer"])
                room = h.max_length - min(self._length(answer), h.max_length - 1)
                prompt = self._conditioned(row["prompt"], row["feedback"], room)
                train.append(encode_example(self.tokenizer, prompt, answer, h.max_length, h.mask_prompt))
            self._encoded["train"] = train

    def _load_splits(self, check_fields: bool = True) -> dict[str, list[dict[str, Any]]]:
        splits = super()._load_splits(check_fields)
        train = splits["train"]
        prompts = [render(self.hparams.prompt_template, r, "prompt_template") for r in train]
        golds = [render(self.hparams.response_template, r, "response_template") for r in train]
        if self._stage in (None, "fit"):
            if self.generator is None:
                self.generator = self._service()
            self.rows = self.targets(train, prompts, golds, self.generator, bool(self.hparams.chat_template))
        else:
            self.targets.check(golds[0], train[0])  # the constraint names of the all-positive feedback
        return splits

    def _service(self) -> Any:
        h = self.hparams
        cache = h.generation_cache if h.generation_cache is not None else str(cache_dir() / "curation" / "generations")
        service = GenerationService
        if h.generator is not None:
            return service(h.generator, cache=cache or None, batch_size=h.generation_batch_size)
        module = self.trainer.lightning_module if getattr(self, "trainer", None) is not None else None
        if module is None or getattr(module, "tokenizer", None) is None:
            raise UserError(
                "generator=None samples with the LightningModule being fitted, but none with a tokenizer is attached: "
                "set generator to a model name or folder (e.g. smollm2-135m)."
            )
        return service(module, cache=cache or None, batch_size=h.generation_batch_size)

    def _wrap(self, text: str) -> str:
        if self.hparams.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
        return text

    def _finish(self, answer: str) -> str:
        if self.hparams.chat_template or self.hparams.append_eos:
            answer += self.tokenizer.eos_token or ""
        return answer

    def _length(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _conditioned(self, text: str, feedback: str, room: int) -> str:
        """``text`` conditioned on ``feedback`` (and chat-wrapped), its start cut so that it fits in ``room`` tokens.

        The feedback is kept whole: the DataModule's left truncation would otherwise cut it first.
        """
        full = self._wrap(self.targets.condition(text, feedback))
        for _ in range(4):  # decoding and re-encoding may shift a token or two
            excess = len(self.tokenizer(full, add_special_tokens=True)["input_ids"]) - room
            if excess <= 0 or not text:
                break
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            text = self.tokenizer.decode(ids[min(len(ids), excess) :])
            full = self._wrap(self.targets.condition(text, feedback))
        if not text and len(self.tokenizer(full, add_special_tokens=True)["input_ids"]) > room:
            raise UserError(f"max_length={self.hparams.max_length} leaves no room for the prompt beside the feedback "
                            f"{feedback!r} and the answer: raise max_length or shorten the constraint names.")  # fmt: skip
        return full

    def _prompt(self, record: dict[str, Any]) -> str:
        """The prompt conditioned on all-positive feedback (validation, test, predict and gold examples), cut to fit
        beside the longest option (``label_options``) or the response."""
        h = self.hparams
        if h.label_options:
            reserve = max(self._length(self._finish(render(h.response_template, {h.label_field: o}, "response_template")))
                          for o in h.label_options)  # fmt: skip
        else:
            reserve = self._length(self._response(record))
        room = h.max_length - min(reserve, h.max_length - 1)
        text = render(h.prompt_template, record, "prompt_template")
        return self._conditioned(text, self.targets.all_positive(), room)
