"""Shared fixtures of the native-library tests: one CMake build of libngkernels per session."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.native.helpers import CUDA_INCLUDE, run


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory):
    """Configure + build in a temporary directory (the generator compiles every kernel: ~2 min cold)."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    if CUDA_INCLUDE is None:
        pytest.skip("no CUDA toolkit headers: CMake skips the native library (test_configure_without_cuda_toolkit)")
    build = tmp_path_factory.mktemp("native") / "build"
    # Triton's default cache, so later sessions on this machine reuse the compiled kernels
    cache = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    proc, out = run(["cmake", "-S", ".", "-B", build, f"-DPython3_EXECUTABLE={sys.executable}",
                     f"-DNGKERNELS_TRITON_CACHE_DIR={cache}", "-DCMAKE_BUILD_TYPE=Release"], 300)
    assert proc.returncode == 0, out
    assert "building libngkernels" in out, out
    proc, out = run(["cmake", "--build", build, "--parallel", str(os.cpu_count() or 2)], 900)
    assert proc.returncode == 0, out[-6000:]
    return build
