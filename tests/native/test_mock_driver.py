"""libngkernels end to end without a GPU: a mock libcuda.so.1 hands every launch to the Triton interpreter.

The library runs its whole host path: argument checks, launch plan, workspace layout, kernel selection
(arch, dtype, tile, aligned or generic, flags), module loading, ticket and ones memsets, parameter
marshalling in the kernels' order with Triton's trailing scratch pointers. The mock then identifies the
cubin the library picked (by its hash in the generator's manifest), decodes the parameter buffer with the
kernel's signature and runs that specialisation's kernel in the interpreter on host memory. The loss,
per-sample stats and gradient must match the ngkernels Python op. Only the cubins' machine code is left to
the GPU run of ctest (and to tests/ngkernels/test_gpu_targets.py, which compiles the same kernels).

Runs in a child process: the mock must be the process's first libcuda.so.1, and the kernels must be interpreted.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import struct
import sys
from pathlib import Path

import pytest
import torch

from tests.native.helpers import CUDA_INCLUDE, ROOT, native_env, run

MOCK_ENV = "NGKERNELS_TEST_MOCK_DRIVER"  # "<mock libcuda.so.1>:<build dir>" in the child process


if not os.environ.get(MOCK_ENV):

    @pytest.mark.skipif(torch.cuda.is_available(), reason="a real driver is loaded here; ctest runs on the GPU")
    def test_library_matches_python_op_through_mock_driver(build_dir, tmp_path):
        mock = tmp_path / "libcuda.so.1"
        proc, out = run(["cc", "-shared", "-fPIC", "-O1", f"-I{CUDA_INCLUDE}", "-Wl,-soname,libcuda.so.1", "-o", mock,
                         ROOT / "tests" / "native" / "mock_libcuda.c"], 120)
        assert proc.returncode == 0, out
        env = native_env(TRITON_INTERPRET="1", **{MOCK_ENV: f"{mock}{os.pathsep}{build_dir}"})
        env.pop("NGKERNELS_BACKEND", None)
        proc, out = run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"], 900, env=env)
        assert proc.returncode == 0, out[-8000:]
        assert " passed" in out and " failed" not in out and "skipped" not in out, out[-3000:]

else:
    import ngkernels
    from ngkernels import aot
    from ngkernels.ops import fm_normguard as ops
    from ngkernels.options import reduction_code

    _mock_path, _build = os.environ[MOCK_ENV].split(os.pathsep)
    MOCK = ctypes.CDLL(_mock_path, mode=ctypes.RTLD_GLOBAL)  # libngkernels' dlopen("libcuda.so.1") finds it
    LIB = ctypes.CDLL(str(Path(_build) / "libngkernels.so"))
    MANIFEST = json.loads((Path(_build) / "aot" / "manifest.json").read_text())
    TILES = [aot.Tile(**{k: v for k, v in t.items() if k != "programs_per_sm"}) for t in MANIFEST["tiles"]]
    BY_SHA = {}
    for _k in MANIFEST["kernels"]:
        BY_SHA.setdefault(_k["cubin_sha256"], []).append(_k)
    TORCH_TYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "i32": torch.int32}
    DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

    class Inputs(ctypes.Structure):
        _fields_ = [("batch", ctypes.c_int64), ("numel", ctypes.c_int64), ("dtype", ctypes.c_int),
                    ("v", ctypes.c_void_p), ("v_row_stride", ctypes.c_int64),
                    ("target", ctypes.c_void_p), ("target_row_stride", ctypes.c_int64),
                    ("v_ref", ctypes.c_void_p), ("v_ref_row_stride", ctypes.c_int64), ("weight", ctypes.c_void_p)]

    class Options(ctypes.Structure):
        _fields_ = [("ng_lambda", ctypes.c_float), ("margin", ctypes.c_float), ("relative", ctypes.c_int),
                    ("squared", ctypes.c_int), ("reduction", ctypes.c_int), ("splits", ctypes.c_int)]

    LIB.ng_default_options.restype = Options
    LIB.ng_status_string.restype = ctypes.c_char_p
    LIB.ng_last_error.restype = ctypes.c_char_p
    LIB.ng_workspace_size.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_size_t)]
    _P = ctypes.c_void_p
    LIB.ng_fm_normguard.argtypes = LIB.ng_normguard.argtypes = [
        ctypes.POINTER(Inputs), ctypes.POINTER(Options), _P, _P, _P, _P, _P, ctypes.c_size_t, _P]
    LIB.ng_loss_forward.argtypes = [ctypes.POINTER(Inputs), ctypes.POINTER(Options), _P, _P, _P, _P,
                                    ctypes.c_size_t, _P]
    LIB.ng_loss_backward.argtypes = [ctypes.POINTER(Inputs), ctypes.POINTER(Options), _P, _P, _P, _P,
                                     ctypes.c_size_t, _P]
    LIB.ng_query_device.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]

    LAUNCHES = []

    def _cubin_size(ptr):
        h = ctypes.string_at(ptr, 64)
        assert h[:4] == b"\x7fELF"
        (phoff,), (shoff,) = struct.unpack_from("<Q", h, 0x20), struct.unpack_from("<Q", h, 0x28)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", h, 0x36)
        return max(phoff + phentsize * phnum, shoff + shentsize * shnum)

    def _at(address, dtype):
        """A tensor starting at a raw address (the interpreter only uses the pointer). Equal sizes for every
        dtype: the interpreter merges tensors that start at one address (e.g. T = V when there is no target)."""
        return torch.frombuffer((ctypes.c_char * 64).from_address(address), dtype=dtype)

    def _launch(cubin, gx, gy, gz, block_x, shared, params):
        """The mock's cuLaunchKernelEx: run the kernel the library picked in the Triton interpreter."""
        try:
            candidates = BY_SHA[hashlib.sha256(ctypes.string_at(cubin, _cubin_size(cubin))).hexdigest()]
            k = candidates[0]
            kind, dtype = k["kind"], k["dtype"]
            names = aot.kernel_params(aot.KERNELS[kind])[0]
            sig = aot.signature_of(kind, dtype)
            args = {}
            for i, name in enumerate(names):
                ty, address = sig[name], params[i]
                if ty.startswith("*"):
                    args[name] = _at(ctypes.c_uint64.from_address(address).value, TORCH_TYPES[ty[1:]])
                else:
                    ctype = {"i32": ctypes.c_int32, "i64": ctypes.c_int64, "fp32": ctypes.c_float}[ty]
                    args[name] = ctype.from_address(address).value
            scratch = [ctypes.c_uint64.from_address(params[len(names) + j]).value for j in range(k["scratch_params"])]
            tile = TILES[k["tile"]]
            flags = {n: bool(k["flags"] >> i & 1) for i, n in enumerate(MANIFEST["flags"][kind])}
            constexprs = dict(ACC=ops.tl.float32, ROWS=tile.rows, BLOCK_N=tile.block_n)
            constexpr_names = aot.kernel_params(aot.KERNELS[kind])[1]
            constexprs.update({k: v for k, v in aot.FIXED_CONSTEXPRS.items() if k in constexpr_names})
            if kind == "fwd":
                constexprs.update(BLOCK_S=tile.block_s, BLOCK_B=ops.BLOCK_B)
            LAUNCHES.append(dict(candidates=[c["name"] for c in candidates], kernel=k, grid=(gx, gy, gz),
                                 block_x=block_x, shared=shared, scratch=scratch, args=dict(args)))
            getattr(ops, aot.KERNELS[kind])[(gx, gy, gz)](**args, **flags, **constexprs)
        except BaseException as exc:  # an exception must not unwind through C
            LAUNCHES.append(dict(error=repr(exc)))

    _LAUNCH_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                                  ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p))(_launch)
    MOCK.mock_configure.argtypes = [type(_LAUNCH_FN), ctypes.c_int, ctypes.c_int, ctypes.c_size_t]
    MOCK.mock_module_loads.restype = ctypes.c_int

    def _device(cc, sms=132, ctx=None):
        MOCK.mock_configure(_LAUNCH_FN, cc, sms, 0x1000 + cc if ctx is None else ctx)  # one context per cc

    def _ptr(t):
        return None if t is None else t.data_ptr()

    def _inputs(v, target, v_ref, weight, v_stride=None, ref_stride=None):
        B, N = v.shape
        return Inputs(B, N, DTYPE_CODE[v.dtype], _ptr(v), v.stride(0) if v_stride is None else v_stride,
                      _ptr(target), 0 if target is None else target.stride(0), _ptr(v_ref),
                      (0 if v_ref is None else v_ref.stride(0)) if ref_stride is None else ref_stride, _ptr(weight))

    def _options(ng_lambda=1.0, margin=0.0, relative=False, squared=False, reduction="mean", splits=0):
        return Options(ng_lambda, margin, int(relative), int(squared), reduction_code(reduction), splits)

    def _check(status):
        assert status == 0, (LIB.ng_status_string(status), LIB.ng_last_error())
        errors = [x["error"] for x in LAUNCHES if "error" in x]
        assert not errors, errors

    def _workspace(B, N):
        size = ctypes.c_size_t()
        assert LIB.ng_workspace_size(B, N, ctypes.byref(size)) == 0
        ws = torch.full((size.value + 3,), 0x5A, dtype=torch.uint8)  # poisoned, and base not 256-aligned
        return ws[3:], size.value

    def _make(B, N, dtype, seed, pad=0, ref_broadcast=False):
        gen = torch.Generator().manual_seed(seed)
        scale = torch.linspace(0.5, 1.6, B)[:, None]  # some hinge terms active, some not
        v = (torch.randn(B, N + pad, generator=gen) * scale).to(dtype)[:, :N]  # row stride N + pad
        target = torch.randn(B, N, generator=gen).to(dtype)
        v_ref = torch.randn(1 if ref_broadcast else B, N, generator=gen).to(dtype).expand(B, N)
        weight = torch.rand(B, generator=gen) + 0.5
        return v, target, v_ref, weight

    def _expected(op, v, target, v_ref, weight, go, **opts):
        """The Python op (CPU, torch backend): loss, stats [3, B] with NaN for absent terms, gradient."""
        vg = v.detach().clone().requires_grad_(True)
        reduction = opts["reduction"]
        nan = torch.full((v.shape[0],), float("nan"))
        hinge = {k: opts[k] for k in ("margin", "relative", "squared")}
        if op == "fused":
            loss, st = ngkernels.fm_normguard_loss(vg, target, v_ref, weight=weight, ng_lambda=opts["ng_lambda"],
                                                   reduction=reduction, return_stats=True, **hinge)
            stats = torch.stack([st.v_norm, st.ref_norm, st.mse])
        elif op == "normguard":
            loss = ngkernels.normguard_loss(vg, v_ref, reduction=reduction, **hinge)
            stats = torch.stack([ngkernels.velocity_norms(v), ngkernels.velocity_norms(v_ref), nan])
        else:  # flow matching alone
            loss = ngkernels.flow_matching_loss(vg, target, weight=weight, reduction=reduction)
            stats = torch.stack([ngkernels.velocity_norms(v), nan,
                                 ngkernels.flow_matching_loss(v, target, reduction="none")])
        loss.backward(torch.ones_like(loss) if go is None else go.reshape(loss.shape))
        return loss.detach().reshape(-1), stats, vg.grad

    def _assert_close(got, want, dtype, what):
        mask = ~torch.isnan(want)
        tol = dict(rtol=1e-4, atol=1e-6) if what != "grad" or dtype == torch.float32 else \
            dict(rtol=1.6e-2, atol=1e-4) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=1e-5)
        torch.testing.assert_close(got.float()[mask], want.float()[mask], **tol, msg=lambda m: f"{what}: {m}")

    # (op, api, B, N, dtype, options, pad, ref_broadcast, with weight, with grad_output, cc)
    CASES = [
        ("fused", "one-shot", 4, 3000, torch.float32, dict(ng_lambda=0.5, margin=0.1), 5, False, True, True, 90),
        ("fused", "one-shot", 3, 70000, torch.bfloat16, dict(relative=True, squared=True, reduction="sum",
                                                              ng_lambda=2.0, margin=0.05), 16, False, False, False, 90),
        ("fused", "pair", 2, 3 * 4096 + 16, torch.float16, dict(reduction="none"), 0, True, True, True, 80),
        ("fused", "pair", 64, 200, torch.float32, dict(squared=True, reduction="sum", ng_lambda=0.3), 0, False,
         True, True, 86),
        ("fused", "one-shot", 600, 16, torch.bfloat16, dict(relative=True, margin=-0.5), 0, False, False, True, 90),
        ("normguard", "one-shot", 300, 48, torch.float16, dict(squared=True, reduction="none"), 0, True, False,
         True, 90),
        ("normguard", "one-shot", 7, 5, torch.bfloat16, dict(relative=True, margin=-0.2), 0, False, False, False, 80),
        ("normguard", "pair", 5, 20000, torch.float32, dict(reduction="sum"), 0, False, False, False, 90),
        ("flow_matching", "pair", 5, 1000, torch.float32, dict(reduction="none"), 0, False, True, True, 90),
        ("flow_matching", "pair", 9, 1024, torch.bfloat16, dict(), 0, False, False, False, 80),
    ]

    @pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}x{c[3]}-{str(c[4])[6:]}-sm{c[10]}"
                                                 for c in CASES])
    def test_case_matches_python_op(case):
        op, api, B, N, dtype, opts, pad, ref_broadcast, with_weight, with_go, cc = case
        opts = {**dict(ng_lambda=1.0, margin=0.0, relative=False, squared=False, reduction="mean"), **opts}
        _device(cc)
        v, target, v_ref, weight = _make(B, N, dtype, seed=B * N, pad=pad, ref_broadcast=ref_broadcast)
        if op == "normguard":
            target = weight = None
        elif op == "flow_matching":
            v_ref = None
        if not with_weight:
            weight = None
        n_loss = B if opts["reduction"] == "none" else 1
        go = torch.rand(n_loss, generator=torch.Generator().manual_seed(1)) + 0.25 if with_go else None
        want_loss, want_stats, want_grad = _expected(op, v, target, v_ref, weight, go, **opts)

        inputs, options = _inputs(v, target, v_ref, weight), _options(**opts)
        loss = torch.full((n_loss,), float("nan"))
        stats = torch.full((3, B), float("nan"))
        coef = torch.full((2, B), float("nan"))
        grad = torch.full((B, N), float("nan"), dtype=dtype)
        ws, ws_bytes = _workspace(B, N)
        LAUNCHES.clear()
        if api == "one-shot":
            fn = LIB.ng_fm_normguard if op == "fused" else LIB.ng_normguard
            _check(fn(inputs, options, _ptr(go), _ptr(loss), _ptr(stats), _ptr(grad), _ptr(ws), ws_bytes, None))
        else:
            _check(LIB.ng_loss_forward(inputs, options, _ptr(loss), _ptr(stats), _ptr(coef), _ptr(ws), ws_bytes,
                                       None))
            _check(LIB.ng_loss_backward(inputs, options, _ptr(coef), _ptr(go), _ptr(grad),
                                        _ptr(ws) if go is None else None, ws_bytes if go is None else 0, None))
        _assert_close(loss, want_loss, dtype, "loss")
        _assert_close(stats, want_stats, dtype, "stats")
        _assert_close(grad, want_grad, dtype, "grad")

        # the library picked the specialisation and geometry its rule says
        assert [x["kernel"]["kind"] for x in LAUNCHES] == ["fwd", "bwd"]
        rows, block_n, n_rb, n_splits, chunk, num_warps, tile = aot.aot_launch_plan(
            B, N, 132, [t["programs_per_sm"] for t in MANIFEST["tiles"]])
        def aligned(*tensors):
            return N % 16 == 0 and all(t is None or (t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0)
                                       for t in tensors)
        expect_aligned = {"fwd": aligned(v, target, v_ref), "bwd": aligned(v, target, grad)}
        for x in LAUNCHES:
            k = x["kernel"]
            assert k["arch"] == (80 if cc < 90 else 90) and k["dtype"] == {0: "fp32", 1: "bf16", 2: "fp16"}[
                DTYPE_CODE[dtype]]
            assert k["tile"] == tile and x["grid"] == (n_rb, n_splits, 1), x["grid"]
            assert x["block_x"] == 32 * num_warps and x["shared"] == k["shared"] and not any(x["scratch"])
            assert x["args"]["chunk_blocks"] * block_n == chunk and x["args"]["B"] == B and x["args"]["N"] == N
            assert k["aligned"] == expect_aligned[k["kind"]], (k["name"], expect_aligned)
        if N > ops.TILE:
            assert n_splits > 1  # the ticket path ran

    def test_modules_load_once_per_context():
        _device(90)
        v, target, v_ref, _ = _make(4, 64, torch.float32, seed=3)
        ws, ws_bytes = _workspace(4, 64)
        loss, grad = torch.empty(1), torch.empty(4, 64)

        def call():
            return LIB.ng_fm_normguard(_inputs(v, target, v_ref, None), _options(), None, _ptr(loss), None,
                                       _ptr(grad), _ptr(ws), ws_bytes, None)
        _check(call())
        loads = MOCK.mock_module_loads()
        _check(call())
        assert MOCK.mock_module_loads() == loads
        _device(90, ctx=0x777000)  # a new context loads its own modules
        _check(call())
        assert MOCK.mock_module_loads() == loads + 2

    @pytest.mark.parametrize("cc", [75, 89, 90, 100, 120])
    def test_device_selection(cc):
        _device(cc, sms=7, ctx=0x200000 + cc)
        got_cc, sms = ctypes.c_int(), ctypes.c_int()
        status = LIB.ng_query_device(ctypes.byref(got_cc), ctypes.byref(sms))
        assert (got_cc.value, sms.value) == (cc, 7)
        if cc // 10 == 8 or cc == 90:
            assert status == 0
        else:
            assert status == 5 and b"8.x" in LIB.ng_last_error(), LIB.ng_last_error()  # NG_ERROR_UNSUPPORTED_DEVICE
            v, target, v_ref, _ = _make(2, 32, torch.float32, seed=4)
            ws, ws_bytes = _workspace(2, 32)
            out = torch.empty(2, 32)
            assert LIB.ng_normguard(_inputs(v, None, v_ref, None), _options(), None, _ptr(out), None, _ptr(out),
                                    _ptr(ws), ws_bytes, None) == 5

    def test_forced_splits(monkeypatch):
        """options.splits, then NGKERNELS_SPLITS, force the split count as in ops.launch_plan."""
        _device(90)
        v, target, v_ref, _ = _make(2, 9000, torch.float32, seed=5)
        want_loss = _expected("fused", v, target, v_ref, None, None, ng_lambda=1.0, margin=0.0, relative=False,
                              squared=False, reduction="mean")[0]
        ws, ws_bytes = _workspace(2, 9000)
        loss, grad = torch.empty(1), torch.empty(2, 9000)
        for splits, env, want in ((2, None, 2), (0, "3", 3), (0, None, 3)):  # 9000 / 4096: at most 3 splits
            if env:
                monkeypatch.setenv("NGKERNELS_SPLITS", env)
            else:
                monkeypatch.delenv("NGKERNELS_SPLITS", raising=False)
            LAUNCHES.clear()
            _check(LIB.ng_fm_normguard(_inputs(v, target, v_ref, None), _options(splits=splits), None, _ptr(loss),
                                       None, _ptr(grad), _ptr(ws), ws_bytes, None))
            assert [x["grid"][1] for x in LAUNCHES] == [want, want]
            _assert_close(loss, want_loss, torch.float32, "loss")

    def test_no_current_context():
        _device(90, ctx=0)
        assert LIB.ng_query_device(None, None) == 4  # NG_ERROR_NO_CONTEXT
        assert b"current" in LIB.ng_last_error()
