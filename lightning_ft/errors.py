"""The one error path of the ``lightning-ft`` commands.

A user's mistake (a config value, a file, a refused combination, a missing asset) is printed as one line,
``lightning-ft <command>: error: <sentence>``, on stderr, with exit status 1 (2 for a command-line usage
mistake) and no traceback; ``--debug`` or ``LIGHTNING_FT_DEBUG=1`` shows the traceback as well. Anything else
is a bug: its traceback is printed, followed by one line saying so.

What counts as a user's mistake (:func:`is_user_error`):

* :class:`UserError` (and :class:`UsageError`), raised wherever a sentence is written for the user;
* a ``ValueError``, ``TypeError``, ``KeyError``, ``ImportError`` or ``FileNotFoundError`` raised by a ``raise``
  statement of lightning-ft, Lightning, jsonargparse, transformers or peft (they check the values a config hands
  them: trainer settings, model folders, peft and generation arguments); the same types raised by Python itself
  (``int("x")``, a bad unpacking) are bugs;
* Lightning's ``MisconfigurationException`` and a missing bundled asset;
* a file-system refusal (no such file, permission denied, is a folder, disk full, read-only).

Only the command-line entry points use :func:`run_command`; importing the library changes nothing.
:func:`explain_parse_error` turns a jsonargparse parse error (a tree of the reasons of every type it tried) into
the one sentence that matters, with a suggestion for a misspelt option, class or argument.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import inspect
import linecache
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

__all__ = [
    "DEBUG_ENV",
    "SentenceParser",
    "UsageError",
    "UserError",
    "config_problem",
    "debug_requested",
    "argparse_sentence",
    "did_you_mean",
    "exit_code",
    "explain_parse_error",
    "import_class",
    "is_user_error",
    "run_command",
    "user_message",
]

T = TypeVar("T")

DEBUG_ENV = "LIGHTNING_FT_DEBUG"
BUG_SENTENCE = "this is a bug in lightning-ft, not a mistake in your input: please report it with the traceback above."

_PACKAGE = Path(__file__).resolve().parent
# libraries whose explicit ValueError/TypeError/... are argument checks written for the user
_CHECKING_PACKAGES = ("lightning_ft", "lightning", "jsonargparse", "transformers", "peft")
_CHECK_TYPES = (ValueError, TypeError, KeyError, ImportError, FileNotFoundError)
_FS_ERRNOS = frozenset(
    {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOSPC, errno.EROFS,
     errno.ENAMETOOLONG, getattr(errno, "EDQUOT", errno.ENOSPC)}
)  # fmt: skip


class UserError(ValueError):
    """A mistake in what the user gave (a value, a file, a refused combination): the CLI prints its one sentence.

    It is a ``ValueError``, so code that catches ``ValueError`` keeps working.
    """

    exit_code = 1


class UsageError(UserError):
    """A command-line mistake (unknown command or option, a value of the wrong type): exit status 2.

    Args:
        message: The one sentence.
        usage: The one usage line shown above it (``usage: lightning-ft fit ...``), or ``None``.
    """

    exit_code = 2

    def __init__(self, message: str, usage: str | None = None) -> None:
        super().__init__(message)
        self.usage = usage


def debug_requested(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether tracebacks were asked for (``--debug`` or ``LIGHTNING_FT_DEBUG``)."""
    rest = [arg for arg in argv if arg != "--debug"]
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")
    return rest, env or len(rest) != len(argv)


def _raised_by_statement_in(err: BaseException, packages: tuple[str, ...]) -> bool:
    """Whether ``err`` came from a ``raise`` statement in a file of one of ``packages``."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return False
    last = frames[-1]
    line = (linecache.getline(last.filename, last.lineno or 0) or last.line or "").strip()
    if not line.startswith("raise"):
        return False
    parts = Path(last.filename).parts
    if "site-packages" in parts or "dist-packages" in parts:
        return any(part in packages for part in parts)
    try:  # an editable install of lightning-ft lives outside site-packages
        Path(last.filename).resolve().relative_to(_PACKAGE)
    except ValueError:
        return False
    return "lightning_ft" in packages


def _is_misconfiguration(err: BaseException) -> bool:
    return any(
        cls.__name__ == "MisconfigurationException" and cls.__module__.startswith("lightning") for cls in type(err).__mro__
    )


def _is_missing_asset(err: BaseException) -> bool:
    return type(err).__name__ == "AssetMissingError" and type(err).__module__ == "lightning_ft.assets"


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is a user's mistake to print as one sentence (see the module docstring) rather than a bug."""
    if isinstance(err, UserError) or _is_misconfiguration(err) or _is_missing_asset(err):
        return True
    if isinstance(err, OSError) and not isinstance(err, ImportError) and err.errno in _FS_ERRNOS:
        return True
    return isinstance(err, _CHECK_TYPES) and _raised_by_statement_in(err, _CHECKING_PACKAGES)


def exit_code(err: BaseException) -> int:
    """The exit status for a user error: 2 for usage mistakes, else 1."""
    return int(getattr(err, "exit_code", 1)) if isinstance(err, UserError) else 1


def user_message(err: BaseException) -> str:
    """The error's sentence on one line (a file-system error reads ``cannot use '<path>': <reason>.``)."""
    if isinstance(err, OSError) and err.errno in _FS_ERRNOS and err.strerror:
        where = f" {str(err.filename)!r}" if err.filename else ""
        other = f" -> {str(err.filename2)!r}" if err.filename2 else ""
        return f"cannot use{where}{other}: {err.strerror.rstrip('.')}."
    text = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else str(err)
    text = " ".join(str(text).split())
    return text or type(err).__name__


def _fail(prog: str, message: str, usage: str | None, code: int) -> NoReturn:
    if usage:
        print(usage, file=sys.stderr)
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_command(prog: str, fn: Callable[[], T], *, debug: bool = False) -> T:
    """Run one command, answering a user's mistake with one line on stderr.

    Args:
        prog: The command's name as the user typed it (``lightning-ft fit``).
        fn: The command.
        debug: Print the traceback of user errors as well.

    Returns:
        What ``fn`` returns.

    Raises:
        SystemExit: 1 (2 for usage mistakes) after printing ``<prog>: error: <sentence>`` for a user error; 1
            after printing the traceback and the bug line for any other exception; 130 on Ctrl-C. ``SystemExit``
            raised by ``fn`` (``--help``, ``--print_config``) passes through.
    """
    try:
        return fn()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        _fail(prog, "interrupted.", None, 130)
    except BaseException as err:  # noqa: BLE001 - every error ends here, as one line or as a bug report
        if not is_user_error(err):
            traceback.print_exc(file=sys.stderr)
            _fail(prog, BUG_SENTENCE, None, 1)
        if debug:
            traceback.print_exc(file=sys.stderr)
        _fail(prog, user_message(err), getattr(err, "usage", None), exit_code(err))


# ---------------------------------------------------------------------------------------------- parser messages
# jsonargparse explains a rejected value with a tree of every type it tried; these turn it into one sentence.
_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "dict": "a mapping",
               "list": "a list", "NoneType": "null"}  # fmt: skip


@dataclass
class _Node:
    text: str
    children: list[_Node] = field(default_factory=list)


@dataclass
class _Expect:
    """One type a rejected value was checked against (those of one union are merged into one sentence)."""

    key: str
    kind: str | None
    choices: list[str]
    value: str | None
    whole: str | None = None  # the value of the whole option (a list, when ``value`` is one of its items)


_Reason = tuple[int, str] | _Expect  # (rank, sentence), rank 0 the most specific


def did_you_mean(word: str, options: Iterable[str], quote: bool = False) -> str:
    """``": did you mean 'x'?"`` for the option closest to ``word``, or ``"."`` when none is close."""
    choices = sorted(set(options))
    lowered = {o.lower(): o for o in choices}
    found = difflib.get_close_matches(word, choices, n=1, cutoff=0.6) or [
        lowered[m] for m in difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    ]
    if not found:
        return "."
    return f": did you mean {found[0]!r}?" if quote else f": did you mean {found[0]}?"


def import_class(path: str, classes: Mapping[str, type] | None = None) -> type | None:
    """The class a config's ``class_path`` names (a dotted path, or a short name among ``classes``), or ``None``."""
    if "." not in path:
        return (classes or {}).get(path)
    module, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return found if isinstance(found, type) else None


def config_files(argv: list[str]) -> list[str]:
    """The ``--config`` files of a command line, in order."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def config_problem(argv: list[str]) -> str | None:
    """The sentence for the first ``--config`` file that is not a YAML mapping, or ``None``."""
    import yaml

    for file in config_files(argv):
        try:
            data = yaml.safe_load(Path(file).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            return f"--config {file} is not a readable text file."
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            return f"--config {file} is not valid YAML: {getattr(err, 'problem', None) or err}{where}."
        if not isinstance(data, dict):
            return (f"--config {file} must hold a mapping of options (trainer:, model:, data:, ...), not "
                    f"{_TYPE_WORDS.get(type(data).__name__, type(data).__name__)}.")  # fmt: skip
    return None


def _tree(text: str) -> list[_Node]:
    root = _Node("")
    stack: list[tuple[int, _Node]] = [(-1, root)]
    for line in text.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        while stack[-1][0] >= indent:
            stack.pop()
        node = _Node(line.strip())
        stack[-1][1].children.append(node)
        stack.append((indent, node))
    return root.children


def _join(key: str, name: str, cls: str | None) -> str:
    if cls is None:
        return f"{key}.{name}" if key else name
    return f"{key}[{cls.rpartition('.')[2]}].{name}" if key.endswith("callbacks") else f"{key}.init_args.{name}"


def _explain(nodes: list[_Node], key: str, cls: str | None, classes: Mapping[str, type], out: list[_Reason],
             given: str | None = None) -> None:  # fmt: skip
    """Append every reason of a jsonargparse message tree to ``out``."""
    errors = next((n for n in nodes if n.text == "Errors:"), None)
    if errors is not None:  # a union: the reasons of each type tried (the siblings only describe the union)
        given = next((n.text.split(": ", 1)[1] for n in nodes if n.text.startswith("Given value: ")), given)
        nodes = [n for n in nodes if n.text.startswith("- ") and "Does not validate" not in n.text] + errors.children
    for node in nodes:
        text = node.text
        if text.startswith("- "):
            _explain([_Node(text[2:], node.children)], key, cls, classes, out, given)
        elif match := re.match(r'Parser key "([^"]+)":\s*(.*)$', text):
            rest = [_Node(match[2], node.children)] if match[2] else node.children
            _explain(rest, _join(key, match[1], cls) if key or cls else match[1], cls, classes, out, given)
        elif match := re.match(r"Problem with given class_path '([^']+)':\s*(.*)$", text):
            rest = [_Node(match[2], node.children)] if match[2] else node.children
            _explain(rest, key, match[1], classes, out, given)
        elif (leaf := _leaf(text, node.children, key, cls, classes, given)) is not None:
            out.append(leaf)


def _leaf(text: str, children: list[_Node], key: str, cls: str | None, classes: Mapping[str, type],
          given: str | None) -> _Reason | None:  # fmt: skip
    where = key or "the config"
    if text.startswith(("Expected a <class 'NoneType'>", "Expected a path but", "Subclass types expect")):
        return None
    if match := (re.match(r"Expected a dot import path string: (.+)$", text)
                 or re.match(r"module '[\w.]+' has no attribute '(\w+)'", text)):  # fmt: skip
        name = match[1].strip()
        return 0, f"{where}: {name!r} is not a class lightning-ft knows{did_you_mean(name.rpartition('.')[2], classes)}"
    if match := re.match(r"No module named '([^']+)'", text):
        return 0, (f"{where}: there is no module {match[1]!r} to import the class from: give a class name lightning-ft "
                   "knows (HalfFineTuning, CausalLMModule, ...) or the full import path of your own class.")  # fmt: skip
    if match := re.match(r"Import path\s*(\S*)\s+does not correspond to a subclass of (\w+)", text):
        path, base = match[1] or given or "the class", match[2]
        options = sorted(n for n, c in classes.items() if n != base and base in (k.__name__ for k in c.__mro__))
        closest = did_you_mean(path.rpartition(".")[2], options)
        example = closest if closest != "." else f": name one, e.g. {', '.join(options[:3])}." if options else "."
        return 1, f"{where}: {path} is not a {base}{example}"  # rank 1: another type of a union may say more
    if match := re.match(r"the following arguments are required: (.+)$", text):
        names = [n.strip() for n in match[1].split(",")]
        owner = f"{cls.rpartition('.')[2]} needs" if cls else "needs"
        return 0, f"{where}: {owner} {', '.join(names)}: give {_join(key, names[0], cls)}."
    if (match := re.match(r"Option '([^']+)' is not accepted", text)) and cls:
        found = import_class(cls, classes)
        names = list(inspect.signature(found).parameters) if found is not None else []
        return 0, f"{where}: {cls.rpartition('.')[2]} has no argument {match[1]!r}{did_you_mean(match[1], names, True)}"
    if match := re.match(r"Expected an? (.+?)(?:\. Got value: (.*))?$", text):
        kind = re.sub(r"<class '([\w.]+)'>", r"\1", match[1])
        value = match[2] if match[2] is not None else given
        if literal := re.fullmatch(r"typing\.Literal\[(.*)\]", kind):
            return _Expect(key, None, [c.strip() for c in literal[1].split(",")], value, given)
        return _Expect(key, kind, [], value, given)
    if match := re.match(r"Path is not a file: (.+)$", text):
        path = match[1].strip().strip("'")
        return 0, f"--config {path} is a folder: give a YAML file." if where == "config" else f"{where}: {path} is a folder."
    if match := re.match(r"File does not exist: (.+)$", text):
        path = match[1].strip().strip("'")
        return 0, f"--config {path} does not exist." if where == "config" else f"{where}: {path} does not exist."
    if text.startswith("Not a valid subclass of"):
        return 2, f"{where}: each entry needs a class_path (a class name) and its init_args."
    return 1, " ".join([text, *(c.text for c in children)])


def _expect_sentence(group: list[_Expect]) -> tuple[int, str]:
    key = group[0].key or "the value"
    value = next((e.value for e in group if e.value is not None), None)
    whole = next((e.whole for e in group if e.whole is not None), None)
    kinds = list(dict.fromkeys(e.kind for e in group if e.kind))
    choices = list(dict.fromkeys(c for e in group for c in e.choices))
    wanted = [_TYPE_WORDS.get(k, k) for k in kinds] + ([f"one of {', '.join(choices)}"] if choices else [])
    items = whole is not None and whole.startswith("[") and value != whole
    if items:
        text = f"{key} must be a list of {' or '.join(wanted)}s (got {whole})".replace("a strings", "strings")
    else:
        text = f"{key} must be {' or '.join(wanted)}" + (f" (got {value})" if value is not None else "")
    if "str" not in kinds or value is None:
        return 0, f"{text}."
    if value in ("True", "False"):
        return 0, f"{text}: YAML reads yes/no/on/off/true/false without quotes as booleans: quote them, e.g. 'yes'."
    read_as = "a mapping" if value.startswith("{") else "a list" if value.startswith("[") else "a number"
    return 0, f"{text}: YAML read {'an item' if items else 'it'} as {read_as}: put the text in quotes."


def _merge_expects(found: list[_Reason]) -> list[tuple[int, str]]:
    groups: dict[str, list[_Expect]] = {}
    order: list[str | tuple[int, str]] = []
    for item in found:
        if isinstance(item, _Expect):
            if item.key not in groups:
                groups[item.key] = []
                order.append(item.key)
            groups[item.key].append(item)
        else:
            order.append(item)
    return [_expect_sentence(groups[item]) if isinstance(item, str) else item for item in order]


def explain_parse_error(message: str, argv: list[str], *, prog: str, options: Iterable[str],
                        classes: Mapping[str, type], usage: str | None = None) -> UsageError:  # fmt: skip
    """One sentence for a jsonargparse parse error.

    Args:
        message: The parser's message (a tree of the reasons of each type it tried).
        argv: The command line (to find the ``--config`` files and tell command-line options from config keys).
        prog: The command, as the sentences name it (``lightning-ft fit``).
        options: The command's option names, without dashes (``trainer.max_steps``), for suggestions.
        classes: The classes a config may name by short name, for suggestions.
        usage: The usage line to show above the sentence.
    """
    first = message.strip().splitlines()[0] if message.strip() else ""
    options = list(options)
    if match := re.match(r"unrecognized arguments: (\S+)", first):
        option = match[1].split("=", 1)[0]
        return UsageError(f"{option} is not an option of {prog}{did_you_mean(option, [f'--{o}' for o in options])}", usage)
    if match := re.match(r"(?:Subcommand '\w+' does not accept option|Option) '([^']+)'(?: is not accepted)?$", first):
        key = match[1]
        source = "" if any(a.startswith(f"--{key}") for a in argv) else " (in the config)"
        return UsageError(f"{key}{source} is not an option of {prog}{did_you_mean(key, options)}", usage)
    if first.startswith(("Problems parsing config", "Unexpected config")):
        return UsageError(config_problem(argv) or " ".join(message.split()), usage)
    found: list[_Reason] = []
    _explain(_tree(message), "", None, classes, found)
    reasons = _merge_expects(found)
    best = min(reasons, key=lambda item: item[0])[1] if reasons else " ".join(message.split())
    return UsageError(best, usage)


def argparse_sentence(message: str, options: Iterable[str], prog: str) -> str:
    """An ``argparse`` error message as one sentence, with a suggestion for a misspelt option or choice.

    Args:
        message: What ``ArgumentParser.error`` was given.
        options: The parser's ``--long`` option strings.
        prog: The command's name (``lightning-ft merge``), named in the pointer to ``--help``.
    """
    if match := re.match(r"unrecognized arguments: (\S+)", message):
        option = match[1].split("=", 1)[0]
        return f"{option} is not an option of {prog}{did_you_mean(option, list(options))}"
    if match := re.match(r"argument ([^:]+): invalid choice: '?([^']*?)'? \(choose from (.*)\)$", message):
        option, value = match[1].split("/")[-1], match[2]
        choices = [c.strip().strip("'") for c in match[3].split(",")]
        return f"{option} must be one of {', '.join(choices)} (got {value}){did_you_mean(value, choices)}"
    if match := re.match(r"argument ([^:]+): invalid (int|float) value: '(.*)'$", message):
        kind = "an integer" if match[2] == "int" else "a number"
        return f"{match[1].split('/')[-1]} must be {kind} (got {match[3]})."
    if match := re.match(r"argument ([^:]+): expected (?:one|at least one) argument", message):
        return f"{match[1].split('/')[-1]} needs a value."
    if match := re.match(r"the following arguments are required: (.*)$", message):
        names = match[1].split(", ")
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
        return f"{listed} {'is' if len(names) == 1 else 'are'} required: see {prog} --help."
    return message.rstrip(".") + "."


class SentenceParser(argparse.ArgumentParser):
    """The argparse parser of the commands that run no LightningCLI (``merge``, ``estimate``, ``data``, ...): a
    command-line mistake is answered with one sentence (a :class:`UsageError`), a misspelt option named first."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.sentence(message), self.usage_line())

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        """Parse, naming a misspelt option first (argparse would report the required option it hides instead)."""
        options = self._long_options()
        for arg in args or []:
            option = arg.split("=", 1)[0]
            if option.startswith("--") and option != "--" and not any(o.startswith(option) for o in options):
                self.error(f"unrecognized arguments: {option}")
        return super().parse_args(args, namespace)

    def usage_line(self) -> str:
        """The usage text on one line (shown above the sentence)."""
        return " ".join(self.format_usage().split())

    def sentence(self, message: str) -> str:
        """argparse's message as one sentence, with a suggestion for a misspelt option or choice."""
        return argparse_sentence(message, self._long_options(), self.prog)

    def _long_options(self) -> list[str]:
        return [o for action in self._actions for o in action.option_strings if o.startswith("--")]
