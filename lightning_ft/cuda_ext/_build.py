"""Just-in-time build of the CUDA C kernels: ``nvcc -shared`` into a cached ``.so``, loaded with ctypes.

Nothing is compiled at install time. On first use on a CUDA machine every ``csrc/*.cu`` is compiled in one nvcc
call for the current device's architecture (cudart linked statically, so no CUDA library has to match torch's)
into ``$LIGHTNING_FT_KERNEL_DIR`` (default ``~/.cache/lightning_ft/kernels``); the file name carries a hash of the
sources, the architecture and the nvcc version, so an edit or another card builds anew and a cached build loads
in milliseconds. The sources use no torch headers: torch's CPU wheel cannot compile CUDA through
``torch.utils.cpp_extension`` (no CUDA_HOME), while plain CUDA C with raw pointers builds anywhere nvcc runs.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["SOURCES", "build", "compile_command", "load_library", "nvcc_path"]

CSRC = Path(__file__).with_name("csrc")
SOURCES = sorted(CSRC.glob("*.cu"))
DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}

_c = ctypes
_SIGNATURES: dict[str, list[type]] = {
    "lft_sparse_adamw": [
        _c.c_void_p, _c.c_int, _c.c_void_p, _c.c_int, _c.c_void_p, _c.c_int, _c.c_int64, _c.c_void_p, _c.c_void_p,
        _c.c_void_p, _c.c_float, _c.c_float, _c.c_float, _c.c_float, _c.c_float, _c.c_float, _c.c_float, _c.c_int,
        _c.c_uint64,
    ],
    "lft_copilot_error": [
        _c.c_void_p, _c.c_int, _c.c_int64, _c.c_int64, _c.c_int64, _c.c_void_p, _c.c_int64, _c.c_void_p, _c.c_int,
        _c.c_uint64,
    ],
    "lft_pack_bits": [_c.c_void_p, _c.c_int64, _c.c_void_p, _c.c_uint64],
    "lft_unpack_bits": [_c.c_void_p, _c.c_int64, _c.c_void_p, _c.c_uint64],
}  # fmt: skip


def nvcc_path() -> str | None:
    """The nvcc to use: ``$CUDA_HOME/bin/nvcc``, then ``nvcc`` on PATH, then ``/usr/local/cuda/bin/nvcc``."""
    candidates = [os.environ.get(v, "") for v in ("CUDA_HOME", "CUDA_PATH")]
    for home in filter(None, candidates):
        path = Path(home) / "bin" / "nvcc"
        if path.is_file():
            return str(path)
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def compile_command(nvcc: str, arch: str, output: Path, sources: list[Path] | None = None) -> list[str]:
    """The nvcc command line that builds ``output`` (a shared library) for ``arch`` (e.g. ``"90"``)."""
    files = [str(s) for s in (sources or SOURCES)]
    gencode = f"arch=compute_{arch},code=[sm_{arch},compute_{arch}]"
    return [nvcc, "-shared", "-Xcompiler", "-fPIC", "-O3", "-std=c++17", "-gencode", gencode, "-o", str(output),
            *files]  # fmt: skip


def _cache_dir() -> Path:
    return Path(os.environ.get("LIGHTNING_FT_KERNEL_DIR") or Path.home() / ".cache" / "lightning_ft" / "kernels")


def _fingerprint(nvcc: str, arch: str) -> str:
    digest = hashlib.sha256(arch.encode())
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    digest.update(version.encode())
    for path in [*SOURCES, *sorted(CSRC.glob("*.cuh"))]:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def build(arch: str, cache_dir: Path | None = None) -> Path:
    """Compile the kernels for ``arch`` unless a build of the same sources is cached; return the ``.so`` path.

    Raises:
        RuntimeError: If nvcc is missing or the compilation fails (the message holds nvcc's output).
    """
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    folder = cache_dir or _cache_dir()
    target = folder / f"lightning_ft_kernels_sm{arch}_{_fingerprint(nvcc, arch)}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)  # ranks building at once each write their own file
    os.close(fd)
    done = subprocess.run(compile_command(nvcc, arch, Path(tmp)), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"nvcc failed for sm_{arch}: {(done.stderr or done.stdout).strip()[-2000:]}")
    os.replace(tmp, target)
    return target


def load_library(path: Path) -> ctypes.CDLL:
    """Load a built library and declare its launchers' signatures (each returns a cudaError_t code)."""
    lib = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    return lib
