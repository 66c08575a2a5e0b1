"""The native library: CMake configure + build + ctest, the AOT generator's output, and the C launch rule.

One CMake build per session (the generator compiles every kernel specialisation for sm_80 and sm_90, about
two minutes on 2 cores with a cold Triton cache). On a machine without a GPU the ctest run must report the
GPU comparison as skipped, with its message; on a GPU it must pass.
"""

from __future__ import annotations

import ctypes
import json
import shutil

import pytest
import torch

from ngkernels import aot
from ngkernels.ops import fm_normguard as ops
from tests.native.helpers import run

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


def test_build_links_and_ctest_passes_or_skips(build_dir):
    lib = build_dir / "libngkernels.so"
    assert lib.exists() and (build_dir / "test_ngkernels").exists()
    proc, out = run(["ctest", "--test-dir", str(build_dir), "--output-on-failure", "-V"], 600)
    assert proc.returncode == 0, out[-6000:]
    assert "argument checks, error codes and launch plan: ok" in out, out[-4000:]
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in (8, 9):
        assert "0 failure(s)" in out and "Skipped" not in out, out[-4000:]
    else:
        assert "SKIP:" in out and "Skipped" in out, out[-4000:]


def test_generator_output_covers_every_specialisation(build_dir):
    manifest = json.loads((build_dir / "aot" / "manifest.json").read_text())
    specs = aot.specialisations(aot.ARCHS)
    assert [k["name"] for k in manifest["kernels"]] == [s.name for s in specs]
    assert manifest["archs"] == [80, 90] and manifest["triton"] == aot.triton.__version__
    targets = {80: "sm_80", 90: "sm_90a"}
    runtime = {kind: aot.kernel_params(name)[0] for kind, name in aot.KERNELS.items()}
    for k in manifest["kernels"]:
        cubin = (build_dir / "aot" / "cubins" / f"{k['name']}.cubin").read_bytes()
        assert cubin[:4] == b"\x7fELF" and len(cubin) == k["cubin_size"] > 1000, k["name"]
        assert k["target"] == targets[k["arch"]], k
        assert k["entry"] == aot.KERNELS[k["kind"]]
        assert k["num_params"] == len(runtime[k["kind"]]) + k["scratch_params"], k
        assert k["num_warps"] == manifest["tiles"][k["tile"]]["num_warps"]
        assert not k["spills"], k["name"]
        if k["aligned"]:  # the divisibility hints reach the code: 128-bit loads, as in the JIT's kernels
            assert k["vector_loads"], k["name"]
    # both variants of every flag set, dtype, tile and arch
    seen = {(k["kind"], k["arch"], k["dtype"], k["tile"], k["aligned"], k["flags"]) for k in manifest["kernels"]}
    assert len(seen) == len(specs)
    assert {k["arch"] for k in manifest["kernels"]} == {80, 90}
    assert {k["dtype"] for k in manifest["kernels"]} == set(aot.DTYPES)


@pytest.fixture(scope="session")
def libngkernels(build_dir):
    lib = ctypes.CDLL(str(build_dir / "libngkernels.so"))  # loads without a driver: libcuda is dlopen'ed lazily

    class Plan(ctypes.Structure):
        _fields_ = [(n, ctypes.c_int64) for n in ("rows", "block_n", "n_row_blocks", "n_splits", "chunk",
                                                     "num_warps", "tile")]

    lib.ng_launch_plan.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.POINTER(Plan)]
    lib.ng_launch_plan.restype = ctypes.c_int
    lib.ng_status_string.restype = ctypes.c_char_p
    lib.Plan = Plan
    return lib


def _c_plan(lib, B, N, sms, splits):
    plan = lib.Plan()
    assert lib.ng_launch_plan(B, N, sms, splits, ctypes.byref(plan)) == 0
    return tuple(getattr(plan, n) for n, _ in lib.Plan._fields_)


SIZES = [1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 64, 100, 127, 128, 129, 255, 256, 1000, 1023, 1024, 1025, 2047,
         2048, 3000, 4095, 4096, 4097, 8192, 10000, 65536, 70000, 262144, 1_000_003, 16 * 64 * 64 * 4]


@pytest.mark.parametrize("sms", [ops.CPU_SMS, 108, 132])
def test_c_launch_rule_matches_the_python_plan(build_dir, libngkernels, monkeypatch, sms):
    """The C rule is ops.launch_plan over the compiled tiles, one wave being the tile's programs_per_sm (derived by
    the generator from the cubins' registers) x the SMs: exactly the Python plan wherever N's tile is compiled."""
    monkeypatch.delenv("NGKERNELS_SPLITS", raising=False)
    manifest = json.loads((build_dir / "aot" / "manifest.json").read_text())
    per_sm = [t["programs_per_sm"] for t in manifest["tiles"]]
    assert all(1 <= p <= 32 for p in per_sm)
    exact = 0
    for B in SIZES[:24]:
        for N in SIZES:
            for splits in (0, 1, 3, 300):
                c = _c_plan(libngkernels, B, N, sms, splits)
                assert c == aot.aot_launch_plan(B, N, sms, per_sm, splits), (B, N, splits)
                py = ops.launch_plan(B, N, per_sm[c[6]] * sms, splits)
                if py.block_n == c[1]:
                    assert c[:6] == (py.rows, py.block_n, py.n_row_blocks, py.n_splits,
                                     py.chunk_blocks * py.block_n, py.num_warps), (B, N, splits, c, py)
                    exact += 1
                    continue
                tile = aot.aot_tiles()[c[6]]
                assert c[1] == tile.block_n == min(b for b in aot.AOT_BLOCK_NS if b >= py.block_n)
                assert c[0] == tile.rows and c[2] == -(-B // tile.rows) and c[5] == tile.num_warps
                assert py.n_splits == c[3] == 1 and c[4] == tile.block_n  # short rows: no split
    assert exact > 1000  # the comparison is not vacuous


def test_configure_without_cuda_toolkit_skips_native(tmp_path):
    proc, out = run(["cmake", "-S", ".", "-B", tmp_path / "build", "-DCMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=ON"], 120)
    assert proc.returncode == 0, out
    words = " ".join(out.split())  # CMake wraps warnings
    assert "CUDA toolkit not found" in words and "skipping libngkernels" in words, out
    assert not (tmp_path / "build" / "CMakeFiles" / "ngkernels.dir").exists()
