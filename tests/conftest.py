"""Test-wide set-up. Without a CUDA device the Triton kernels run under the interpreter, which must be
switched on before any module that defines kernels is imported (triton.jit decides at decoration time)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    # One Inductor cache per xdist worker: on the H200 run (2026-12-04, -n 12) two workers built the same C++
    # kernel into the shared cache and one loaded the other's half-written .so ("file too short"). Read lazily
    # by Inductor, so setting it here, before any compile, is enough.
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{os.environ.get('USER', 'user')}_{os.environ['PYTEST_XDIST_WORKER']}")

import triton  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7):
    # The interpreter of triton <= 3.6 (the GPU image's version) turns a scalar (a 1-element array) into a loop
    # bound with int(), which numpy >= 2.4 rejects: "only 0-dimensional arrays can be converted to Python
    # scalars" (triton-lang/triton#9171, fixed in later triton). Convert with .item(), as later triton does.
    from triton.runtime import interpreter as _interpreter

    _patch_lang_tensor = _interpreter._patch_lang_tensor

    def _patch_lang_tensor_numpy24(tensor, scope):
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    _interpreter._patch_lang_tensor = _patch_lang_tensor_numpy24

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
