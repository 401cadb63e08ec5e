"""Dispatch: on CPU every kernel falls back to its reference (announced once), the environment variable forces
the reference, and a failed build is reported as the reason of the fallback."""

from __future__ import annotations

import logging

import pytest
import torch

from lightning_ft import cuda_ext
from lightning_ft.cuda_ext import _build, dispatch


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "_noticed", set())
    monkeypatch.delenv(cuda_ext.FORCE_REFERENCE_ENV, raising=False)


def test_cpu_tensors_use_the_reference_with_one_notice(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lightning_ft.cuda_ext.dispatch")
    bits = torch.tensor([True, False, True])
    for _ in range(3):
        assert cuda_ext.backend("pack_bits", bits) == "reference"
        cuda_ext.pack_bits(bits)
    notices = [r.getMessage() for r in caplog.records if "pack_bits uses the PyTorch reference" in r.getMessage()]
    assert notices == ["lightning_ft.cuda_ext: pack_bits uses the PyTorch reference (the tensors are not on a CUDA "
                       "device)."]  # fmt: skip


def test_environment_variable_forces_the_reference(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lightning_ft.cuda_ext.dispatch")
    monkeypatch.setenv(cuda_ext.FORCE_REFERENCE_ENV, "1")
    monkeypatch.setattr(dispatch, "_load", lambda: pytest.fail("the kernel library must not be built"))
    assert cuda_ext.backend("copilot_error", torch.zeros(2, 3)) == "reference"
    assert "LIGHTNING_FT_FORCE_REFERENCE is set" in caplog.text
    out = cuda_ext.copilot_error(torch.zeros(1, 2), torch.tensor([1]))
    assert out.tolist() == [[-0.5, 0.5]]


def test_failed_build_is_the_reason_of_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "_library", None)
    monkeypatch.setattr(dispatch, "_library_error", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(_build, "nvcc_path", lambda: None)
    assert dispatch._load() is None
    assert dispatch._library_error == "the kernel build failed: nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    assert dispatch._load() is None  # tried once per process


def test_sparse_fine_tuning_steps_through_the_dispatch() -> None:
    from lightning_ft.callbacks import sparse_stepping as sparse  # the module whose step calls the dispatch

    assert sparse.sparse_adamw_ is cuda_ext.sparse_adamw_


def test_methods_call_the_dispatch_and_have_no_copy_of_the_kernels_math() -> None:
    from lightning_ft.merging import compeft
    from lightning_ft.sparse import compact

    assert compact.sparse_adamw_ is cuda_ext.sparse_adamw_
    assert compeft.pack_bits is cuda_ext.pack_bits and compeft.unpack_bits is cuda_ext.unpack_bits
