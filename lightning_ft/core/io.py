"""The one atomic writer: every file and folder lightning-ft writes appears whole, or not at all.

:func:`atomic_dir` yields a temporary folder beside the target (same parent, hence the same file system). When the
block completes, every file in it is flushed to disk (``fsync``) and the folder takes the target's place in one
rename: an exchange of the two names on Linux, so that the target path always names a whole folder, the old one or
the new one; elsewhere two renames, the old folder put back if the second fails. The previous target is then
removed. When the block raises (a failed save, a full disk, Ctrl-C), the temporary folder is removed and the
previous target is left byte-identical. :func:`atomic_file` does the same for one file (temporary sibling,
``fsync``, ``os.replace``); a symbolic link is followed, so the file it points at is replaced and the link kept.

New files and folders get the modes a plain ``open`` / ``mkdir`` would give (0666 / 0777 less the umask, not
``mkdtemp``'s 0700); a replaced target keeps its own mode.

:func:`check_finite` refuses, before anything is written, tensors with NaN or inf values (an edit or export at
fit end of a fit that diverged). :func:`check_output` refuses, in one sentence, an output that is, holds or sits
inside one of the inputs, and an existing output the user did not allow to be replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from lightning_ft.errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = ["atomic_dir", "atomic_file", "check_finite", "check_output", "write_text_atomic"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it races with other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode(target: Path, is_dir: bool) -> int:
    """The mode of the new ``target``: the replaced one's, else the default of a new file or folder."""
    try:
        found = target.stat()
    except OSError:
        found = None
    if found is not None and stat.S_ISDIR(found.st_mode) == is_dir:
        return stat.S_IMODE(found.st_mode)
    return (0o777 if is_dir else 0o666) & ~_umask()


def _fsync(path: Path) -> None:
    """Flush one file, or a folder's entries, to disk."""
    if sys.platform == "win32" and path.is_dir():  # pragma: no cover - folders cannot be opened there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one step (Linux ``renameat2``); ``False`` where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # an old C library
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):  # a file system without the exchange
        return False
    raise OSError(code, os.strerror(code), str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _swap_in(new: Path, target: Path) -> None:
    """Put the folder ``new`` at ``target``; afterwards ``new`` names the previous target, if there was one."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    if _exchange(new, target):
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    os.rename(old, new)  # the caller removes ``new``


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target`` that replaces it only when the block completes.

    Args:
        target: The folder to write (created with its parents; an existing one is replaced as a whole).

    Yields:
        The temporary folder to write into.
    """
    final = Path(target)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, _mode(final, is_dir=True))
        _fsync_tree(tmp)
        _swap_in(tmp, final)
        _fsync(final.parent)
    finally:
        _remove(tmp)  # the unfinished folder, or the previous target after the swap


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` (an empty file) that replaces it only when the block completes.

    Args:
        target: The file to write (its folder is created; a symbolic link is followed).

    Yields:
        The temporary path to write to (by name: ``save_file``, ``torch.save``, ``write_bytes``).
    """
    final = Path(os.path.realpath(target)) if Path(target).is_symlink() else Path(target)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _mode(final, is_dir=False))
        _fsync(tmp)
        os.replace(tmp, final)
        _fsync(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(target: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` through :func:`atomic_file`; returns ``target`` as a path."""
    with atomic_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def _relation(output: Path, source: Path) -> str | None:
    if output == source:
        return "is"
    if output.is_relative_to(source):
        return "is inside"
    if source.is_relative_to(output):
        return "holds"
    return None


def check_output(
    output: str | os.PathLike[str],
    inputs: Iterable[tuple[str, str | os.PathLike[str]]],
    *,
    kind: Literal["folder", "file"],
    overwrite: bool = False,
    argument: str = "--output",
    overwrite_flag: str = "--overwrite",
) -> Path:
    """Refuse an output that would destroy an input or, unless ``overwrite``, a previous result.

    Args:
        output: Where the command writes.
        inputs: ``(argument, path)`` of every input (a bundled alias already resolved to its folder).
        kind: Whether the output is a folder or a file.
        overwrite: Allow an existing output to be replaced.
        argument: The output's name in the sentences.
        overwrite_flag: How the user allows the replacement, for the sentence (``overwrite=True`` in Python).

    Returns:
        The output path.

    Raises:
        UserError: The output is, holds or sits inside an input; it is a file where a folder is written (or the
            reverse); or it exists (a folder with files, a file with bytes) and ``overwrite`` is false.
    """
    out = Path(output).expanduser()
    resolved = out.resolve()
    for name, path in inputs:
        relation = _relation(resolved, Path(path).expanduser().resolve())
        if relation is not None:
            raise UserError(
                f"{argument} {output} {relation} the input {name} {path}: writing there would destroy that input, so "
                f"give an {argument} outside every input."
            )
    if kind == "folder" and out.exists() and not out.is_dir():
        raise UserError(f"{argument} {output} is a file: give the path of a folder (the result is a model folder).")
    if kind == "file" and out.is_dir():
        raise UserError(
            f"{argument} {output} is a folder: give the path of a file, e.g. {out / 'artifact.safetensors'}."
        )
    taken = any(out.iterdir()) if out.is_dir() else out.is_file() and out.stat().st_size > 0
    if taken and not overwrite:
        what = "already exists and is not empty" if kind == "folder" else "already exists"
        raise UserError(f"{argument} {output} {what}: give {overwrite_flag} to replace it, or a new path.")
    return out


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse to write ``tensors`` when one holds a NaN or inf value (checked before anything is written).

    Args:
        tensors: Name -> tensor about to be written.
        what: What would be written, for the sentence (``the sparse delta runs/x/sparse_delta.safetensors``).

    Raises:
        UserError: Naming the first tensor with a non-finite value.
    """
    import torch

    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(
                f"{what} would hold NaN or inf values in {key!r} (the fit diverged), so nothing was written: lower "
                "the learning rate or restart from an earlier checkpoint."
            )
