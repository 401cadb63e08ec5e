"""The CUDA C sources compile with the machine's nvcc for sm_80 and sm_90 (warnings are errors), and the
just-in-time build produces a shared library that ctypes loads; without a GPU a launch returns a CUDA error
code instead of crashing."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import pytest
import torch

from lightning_ft.cuda_ext import _build

NVCC = _build.nvcc_path()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed (set CUDA_HOME or put nvcc on PATH)")


@needs_nvcc
@pytest.mark.parametrize("source", _build.SOURCES, ids=lambda p: p.name)
def test_source_compiles_for_sm80_and_sm90(source: Path, tmp_path: Path) -> None:
    assert NVCC is not None
    cmd = [NVCC, "-c", "-std=c++17", "--Werror", "all-warnings", "-Xcompiler", "-Wall",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           str(source), "-o", str(tmp_path / "k.o")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_sources_and_launchers_are_declared() -> None:
    assert {p.name for p in _build.SOURCES} == {"bits.cu", "copilot_error.cu", "sparse_adamw.cu"}
    text = "".join(p.read_text() for p in _build.SOURCES)
    for name in _build._SIGNATURES:
        assert f'extern "C" int {name}(' in text
    headers = [
        line for p in _build.CSRC.iterdir() for line in p.read_text().splitlines() if line.startswith("#include")
    ]
    assert headers and not [h for h in headers if "torch" in h or "ATen" in h or "c10" in h]  # plain CUDA C only


@needs_nvcc
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_jit_build_loads_and_reports_errors_without_a_gpu(tmp_path: Path) -> None:
    path = _build.build("90", tmp_path)
    assert path.is_file() and path.parent == tmp_path
    assert _build.build("90", tmp_path) == path  # cached: same sources, same file
    lib = _build.load_library(path)
    buf = ctypes.create_string_buffer(8)
    assert lib.lft_pack_bits(None, 0, None, 0) == 0  # nothing to do: no launch
    code = lib.lft_unpack_bits(ctypes.addressof(buf), 8, ctypes.addressof(buf), 0)
    assert code != 0  # e.g. 35 (insufficient driver) or 100 (no device): an error code, not a crash
