"""Helpers of the native-library tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CUDA_INCLUDE = next((Path(p) for p in ("/usr/local/cuda/include", "/usr/include") if Path(p, "cuda.h").exists()),
                    None)


def native_env(**extra):
    """The environment for CMake and the generator: this tree importable, the Triton interpreter off."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # tests/conftest.py sets it on CPU
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run(cmd, timeout, env=None):
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env or native_env(), capture_output=True, text=True,
                          timeout=timeout)
    return proc, proc.stdout + proc.stderr
