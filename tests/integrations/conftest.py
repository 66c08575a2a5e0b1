"""The recipe tests build their tensors on the CPU (the trainers' shapes, float64 oracles). Their Triton cases
therefore run the kernels under the interpreter (tests/conftest.py turns it on where there is no GPU). On a CUDA
machine the interpreter is off and the Triton kernels take CUDA tensors only; there, tests/ngkernels (test_ops,
test_launch, test_cuda) check the same kernels on the device, and these cases are reported as skipped with why
(seen on an H200: 21 such cases failed with "NGKERNELS_BACKEND=triton on a non-CUDA tensor needs the Triton
interpreter")."""

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    skip = pytest.mark.skip(reason="Triton on CPU tensors needs the interpreter; the CUDA kernels are checked by "
                                   "tests/ngkernels on this device")
    for item in items:
        if "triton" in item.nodeid.rsplit("::", 1)[-1]:
            item.add_marker(skip)
