"""Test-wide set-up. Without a CUDA device the Triton kernels run under the interpreter, which must be
switched on before any module that defines kernels is imported (triton.jit decides at decoration time)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Runs the test once per ngkernels backend (Triton is interpreted on CPU)."""
    monkeypatch.setenv("NGKERNELS_BACKEND", request.param)
    return request.param
