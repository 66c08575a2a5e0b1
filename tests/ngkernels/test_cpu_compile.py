"""The compiled CPU path (ngkernels/compiled_cpu.py): right against the float64 oracle on odd sizes, misaligned
and strided views and every dtype, no recompile when B and N vary, the eager path when compiling fails (one
warning), and under auto the switch from eager to compiled at the call the pay-back rule predicts.

The tests of the compiled path force it (NGKERNELS_CPU_COMPILE=1, so that small inputs take it); those of auto
lower its size floor to 64 elements and its prices to a few calls' savings. They share their options and layouts
where they can, so that they share compiled variants (each costs seconds)."""

import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch.utils._python_dispatch import TorchDispatchMode

import ngkernels
from ngkernels import compiled_cpu
from ngkernels import functional
from tests.ngkernels.helpers import check_against_oracle
from tests.ngkernels.helpers import make_inputs
from tests.ngkernels.helpers import oracle

pytestmark = pytest.mark.skipif(
    not torch._dynamo.is_dynamo_supported() or shutil.which(torch._inductor.config.cpp.cxx[1]) is None,
    reason="torch.compile on CPU needs Dynamo and a C++ compiler (the fallback without one is tested below)")

OPTS = dict(ng_lambda=0.7, margin=0.1, relative=True, squared=True, reduction="none")
# a call's `run` key: fm_normguard, float32, a backward follows (what the estimated saving depends on)
KEY = compiled_cpu.Variant(torch.float32, 2, True, True, False, False, False, "mean", True, False)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@pytest.fixture
def compiled_calls(monkeypatch):
    """Compiles from the first call whatever the size (NGKERNELS_CPU_COMPILE=1), with auto's size floor lowered to
    64 elements and its pay-back state fresh (for the tests that set auto); records each compiled call:
    [succeeded, ...]."""
    monkeypatch.setenv("NGKERNELS_BACKEND", "torch")
    monkeypatch.setenv("NGKERNELS_CPU_COMPILE", "1")
    monkeypatch.setattr(compiled_cpu, "COMPILE_MIN_NUMEL", 64)
    monkeypatch.setattr(compiled_cpu, "_FAILED", [])
    monkeypatch.setattr(compiled_cpu, "_FORGONE", {})
    monkeypatch.setattr(compiled_cpu, "_BOUGHT", set())
    monkeypatch.setattr(compiled_cpu, "_LONG_RUN", [])
    # this file compiles more variants than a call site would: keep them all, and fail rather than run eagerly
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 64)
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    calls = []
    run = compiled_cpu.run

    def spy(fn, *args):
        out = run(fn, *args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(compiled_cpu, "run", spy)
    return calls


def variants():
    """Compiled variants of the op so far: Dynamo's cache entries, over the per-key copies of the function."""
    return sum(len(_debug_get_cache_entry_list(compiled._torchdynamo_orig_callable.__code__))
               for (fn, _key), compiled in compiled_cpu._COMPILED.items() if fn is functional._rows_and_loss)


def layout(kind, shape, dtype, seed=0):
    """v, target, v_ref, weight with v (and target) in the given memory layout, values as make_inputs'."""
    v, target, v_ref, weight = make_inputs(shape, dtype, "cpu", seed)
    B, n = shape[0], v[0].numel()
    if kind == "offset1":  # data_ptr one element past the storage start: no 16-byte alignment, odd N
        store = torch.empty(v.numel() + 1, dtype=dtype)
        v = store[1:].view(shape).copy_(v)
    elif kind == "strided":  # rows 3 elements apart from their ends: row stride N + 3, a copy-free [B, N] view
        store = torch.empty(B, n + 3, dtype=dtype)
        v = store[:, 1:n + 1].view(B, n).copy_(v.reshape(B, n))
        target = torch.empty(B, n + 5, dtype=dtype)[:, 2:n + 2].copy_(target.reshape(B, n))
        v_ref = v_ref.reshape(B, n)
    return v, target, v_ref, weight


CASES = [(dt, "odd") for dt in DTYPES] + [("fp32", "offset1"), ("bf16", "offset1"), ("fp32", "strided"),
                                           ("bf16", "strided")]


@pytest.mark.parametrize("dtype, kind", CASES, ids=[f"{d}-{k}" for d, k in CASES])
def test_compiled_path_matches_reference(compiled_calls, dtype, kind):
    dt = DTYPES[dtype]
    v, target, v_ref, weight = layout(kind, (5, 3, 37), dt)  # N = 111
    if dt == torch.float64:  # the float64 path against the float64 oracle: agreement to rounding
        v = v.detach().requires_grad_()
        loss, stats = ngkernels.fm_normguard_loss(v, target, v_ref, weight=weight, return_stats=True, **OPTS)
        v64, ref, ref_stats = oracle("fm_normguard", v, target, v_ref, weight, OPTS)
        assert loss.dtype == torch.float64 and stats.v_norm.dtype == torch.float64
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-14)
        loss.sum().backward()
        ref.sum().backward()
        torch.testing.assert_close(v.grad, v64.grad, rtol=1e-12, atol=1e-14)
    else:
        check_against_oracle("fm_normguard", v, target, v_ref, weight, OPTS, dt)
    assert compiled_calls == [True]


@pytest.mark.parametrize("op", ["normguard", "flow_matching"])
def test_compiled_path_other_ops(compiled_calls, op):
    v, target, v_ref, weight = make_inputs((4, 2, 33), torch.float32, "cpu", seed=2)
    check_against_oracle(op, v, target, v_ref, weight, OPTS, torch.float32)
    assert compiled_calls == [True]


def test_loss_only_graph_matches_the_one_with_stats(compiled_calls):
    """The public ops that return only a loss compile a graph without the stats (stats=False, so that Inductor
    drops e.g. flow_matching's ||v|| reduction): same loss and gradient as the graph that returns them."""
    from ngkernels.options import LossOptions
    v, target, _v_ref, weight = make_inputs((5, 3, 40), torch.float32, "cpu", seed=4)
    opts = LossOptions(0.0, 0.0, False, False, "none")
    results = []
    for stats in (False, True):
        x = v.detach().clone().requires_grad_(True)
        loss, got = functional._fused(x, target, None, weight, opts, stats=stats)
        assert (got is None) == (not stats)
        loss.sum().backward()
        results.append((loss.detach(), x.grad))
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=0)
    assert compiled_calls == [True, True]


def test_constant_inputs_reach_the_graph_as_plain_tensors(compiled_calls):
    """constant_input hands the compiled graph target and v_ref as contiguous non-views without grad: a plain
    tensor as it is (no per-call detach), one that requires grad or is a view of a larger buffer detached, a
    strided one copied. Values and gradient stay the oracle's, and target gets no gradient."""
    plain = torch.randn(4, 6)
    assert compiled_cpu.constant_input(plain) is plain and compiled_cpu.constant_input(None) is None
    wants_grad = torch.randn(4, 6, requires_grad=True)
    view = torch.randn(30)[3:27].view(4, 6)
    strided = torch.randn(4, 9)[:, 1:7]
    for x in (wants_grad, view, strided):
        y = compiled_cpu.constant_input(x)
        assert y is not x and y._base is None and not y.requires_grad and y.is_contiguous()
        assert torch.equal(y, x.detach())
    v, target, v_ref, weight = make_inputs((4, 3, 2), torch.float32, "cpu", seed=5)
    ref_view = torch.cat([v_ref.reshape(-1), torch.zeros(3)])[:v_ref.numel()].view(v_ref.shape)
    check_against_oracle("fm_normguard", v, target, ref_view, weight, OPTS, torch.float32)
    grads = []
    for t, r in ((target.detach().requires_grad_(True), ref_view), (target, v_ref)):
        x = v.detach().requires_grad_(True)
        ngkernels.fm_normguard_loss(x, t, r, weight=weight, **OPTS).sum().backward()
        assert t.grad is None
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])
    assert compiled_calls == [True, True, True]


def test_tensor_scalars_made_once_per_options():
    """The compiled graph takes ng_lambda and margin as 0-d float64 tensors (no recompile when lambda changes),
    made once per distinct options: two distinct tensors (Dynamo guards that inputs do not alias)."""
    from ngkernels.options import LossOptions
    a = compiled_cpu.with_tensor_scalars(LossOptions(0.25, 0.25, True, False, "sum"))
    assert a is compiled_cpu.with_tensor_scalars(LossOptions(0.25, 0.25, True, False, "sum"))
    assert a.ng_lambda is not a.margin and a.ng_lambda.dtype == torch.float64 and a.ng_lambda.dim() == 0
    assert (a.ng_lambda.item(), a.margin.item(), a.relative, a.squared, a.reduction) == (0.25, 0.25, True, False, "sum")
    b = compiled_cpu.with_tensor_scalars(LossOptions(0.5, 0.25, True, False, "sum"))
    assert b.ng_lambda.item() == 0.5 and b.ng_lambda is not a.ng_lambda


def test_velocity_norms_compiled(compiled_calls):
    v = make_inputs((6, 50), torch.bfloat16, "cpu")[0]
    torch.testing.assert_close(ngkernels.velocity_norms(v).double(), v.double().norm(dim=1), rtol=2e-6, atol=0)
    assert compiled_calls == [True]


def test_no_recompile_when_shapes_vary(compiled_calls, monkeypatch):
    """One graph serves every 2 <= B <= 4096 and N > 4096 of a call site (any ng_lambda and margin); B == 1,
    B > 4096 and N <= 4096 add at most one variant each: the bound stated in compiled_cpu's docstring."""
    torch._dynamo.reset()
    monkeypatch.setattr(compiled_cpu, "_COMPILED", {})

    def step(shape, ng_lambda=0.7):
        v, target, v_ref, weight = make_inputs(shape, torch.float32, "cpu", seed=shape[0])
        opts = dict(OPTS, ng_lambda=ng_lambda, margin=0.05 * shape[0])
        check_against_oracle("fm_normguard", v, target, v_ref, weight, opts, torch.float32)

    general = [((4, 3, 5000), 0.7), ((2, 3, 7777), 0.1), ((17, 3, 4099), 2.0), ((3, 2, 2500), 0.3)]
    for shape, lam in general:
        step(shape, lam)
    assert variants() == 1
    for shape in [(6, 3, 100), (1, 3, 6000), (1, 2, 300), (9, 7, 11), (4100, 1, 8)]:
        step(shape)
    bound = variants()
    assert bound <= 5  # B == 1 with both N classes, N <= 4096, B > 4096 (Inductor's cascade sum over the rows)
    for shape, lam in general + [((33, 4, 64), 0.5), ((1, 5, 5001), 0.5), ((5000, 1, 9), 0.5)]:
        step(shape, lam)
    assert variants() == bound
    assert all(compiled_calls) and len(compiled_calls) == 16


def test_plain_path_below_threshold_off_and_under_a_dispatch_mode(compiled_calls, monkeypatch):
    monkeypatch.setenv("NGKERNELS_CPU_COMPILE", "auto")
    compiled_cpu.assume_long_run()  # the price counts as paid: the size floor alone decides
    v, target, v_ref, weight = make_inputs((2, 31), torch.float32, "cpu")  # 62 elements: under the threshold
    check_against_oracle("fm_normguard", v, target, v_ref, weight, OPTS, torch.float32)
    assert compiled_calls == []
    big = torch.zeros(4, 64)
    assert compiled_cpu.enabled(big, KEY)

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with PassThrough():
        assert not compiled_cpu.enabled(big, KEY)
    monkeypatch.setenv("NGKERNELS_CPU_COMPILE", "0")
    assert not compiled_cpu.enabled(big, KEY)
    monkeypatch.setenv("NGKERNELS_CPU_COMPILE", "1")
    assert compiled_cpu.enabled(torch.zeros(2, 3), KEY)
    monkeypatch.setenv("NGKERNELS_CPU_COMPILE", "yes")
    with pytest.raises(ValueError, match="NGKERNELS_CPU_COMPILE"):
        ngkernels.velocity_norms(big)


def test_auto_compiles_at_the_call_that_pays_for_it(compiled_calls, monkeypatch):
    """Ski rental: eager until the estimated savings forgone reach the compile's price, then compiled; the switch
    at the predicted call (here the 3rd: the price is 2.5 calls' savings), the same values on both sides of it."""
    monkeypatch.setenv("NGKERNELS_CPU_COMPILE", "auto")
    v, target, v_ref, weight = layout("odd", (5, 3, 37), torch.float32)  # as the tests above: their compiled code
    key = KEY._replace(rank=3, weight=True, relative=True, squared=True, reduction="none", stats=True)
    monkeypatch.setattr(compiled_cpu, "COMPILE_COST_S", 2.5 * compiled_cpu.estimated_saving_s(v.numel(), key))
    grads = [check_against_oracle("fm_normguard", v, target, v_ref, weight, OPTS, torch.float32)]
    assert compiled_calls == []
    grads.append(check_against_oracle("fm_normguard", v, target, v_ref, weight, OPTS, torch.float32))
    assert compiled_calls == []
    assert compiled_cpu._FORGONE[key] == pytest.approx(2 / 2.5 * compiled_cpu.COMPILE_COST_S)
    for n in (1, 2):
        grads.append(check_against_oracle("fm_normguard", v, target, v_ref, weight, OPTS, torch.float32))
        assert compiled_calls == [True] * n
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-5, atol=1e-7)  # compiled vs eager, float32 rounding
    torch.testing.assert_close(grads[3], grads[1], rtol=1e-5, atol=1e-7)


def test_auto_pay_back_arithmetic(compiled_calls, monkeypatch):
    """The rule itself, through `enabled` alone (no compile): calls under the size floor neither compile nor count;
    the first compile's price is paid by all keys' savings together, a later key's VARIANT_COST_S by its own;
    a key that saves nothing never compiles; 0 and 1 ignore the counts."""
    monkeypatch.setenv("NGKERNELS_CPU_COMPILE", "auto")
    big, tiny = torch.zeros(4, 64), torch.zeros(4, 8)
    bf16 = KEY._replace(dtype=torch.bfloat16)
    unit = compiled_cpu.estimated_saving_s(big.numel(), KEY)
    assert compiled_cpu.estimated_saving_s(big.numel(), bf16) > unit > 0  # bf16's eager path has upcasts to fuse
    per_element = [compiled_cpu.estimated_saving_s(n, KEY) / n for n in (1 << 20, compiled_cpu.LARGE_NUMEL)]
    assert per_element[1] > per_element[0]  # past the last-level cache each eager pass goes to DRAM
    bf16_unit = compiled_cpu.estimated_saving_s(big.numel(), bf16)
    monkeypatch.setattr(compiled_cpu, "COMPILE_COST_S", unit + unit + bf16_unit)
    monkeypatch.setattr(compiled_cpu, "VARIANT_COST_S", 1.5 * unit)
    assert not any(compiled_cpu.enabled(tiny, KEY) for _ in range(100))
    assert compiled_cpu._FORGONE == {}
    # the first compile: the savings of all keys together (two fp32 calls, then a bf16 one, pay the price above)
    assert [compiled_cpu.enabled(big, KEY), compiled_cpu.enabled(big, KEY), compiled_cpu.enabled(big, bf16)] == [
        False, False, True]
    assert compiled_cpu.enabled(big, bf16) and not compiled_cpu.enabled(big, KEY._replace(rank=4))
    monkeypatch.setattr(compiled_cpu, "COMPILE_COST_S", 3.5 * unit)
    monkeypatch.setattr(compiled_cpu, "_BOUGHT", set())
    monkeypatch.setattr(compiled_cpu, "_FORGONE", {})
    assert [compiled_cpu.enabled(big, KEY) for _ in range(5)] == [False, False, False, True, True]
    # another key after the first compile: its own savings against VARIANT_COST_S (1.5 calls)
    other = KEY._replace(reduction="sum")
    assert [compiled_cpu.enabled(big, other) for _ in range(3)] == [False, True, True]
    nothing_saved = KEY._replace(target=False)  # normguard fwd+bwd in float32: no measurable saving
    assert compiled_cpu.estimated_saving_s(big.numel(), nothing_saved) == 0.0
    assert not any(compiled_cpu.enabled(big, nothing_saved) for _ in range(1000))
    fresh = KEY._replace(rank=5)
    monkeypatch.setenv("NGKERNELS_CPU_COMPILE", "1")
    assert compiled_cpu.enabled(tiny, fresh) and compiled_cpu.enabled(big, nothing_saved)
    monkeypatch.setenv("NGKERNELS_CPU_COMPILE", "0")
    assert not compiled_cpu.enabled(big, KEY)
    assert fresh not in compiled_cpu._FORGONE  # 0 and 1 count nothing


def test_inside_torch_compile(compiled_calls):
    """Under the caller's torch.compile the torch backend is traced into the caller's graph (no nested compile)."""
    torch._dynamo.reset()
    v, target, v_ref, weight = make_inputs((5, 3, 37), torch.float32, "cpu")

    def step(v):
        return (ngkernels.fm_normguard_loss(v, target, v_ref, weight=weight, **OPTS) * 2.0).sum()

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True, dynamic=False)):
        x = v.clone().requires_grad_()
        fn(x).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0])
    assert compiled_calls == [True]  # the eager call only


def test_fallback_when_compiling_fails(compiled_calls, monkeypatch):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InductorError: no working C++ compiler\nmore detail")
        return run

    monkeypatch.setattr(compiled_cpu, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken)
    v, target, v_ref, weight = make_inputs((4, 40), torch.bfloat16, "cpu")
    with pytest.warns(RuntimeWarning, match="torch.compile of the CPU path failed .*no working C\\+\\+ compiler"):
        check_against_oracle("fm_normguard", v, target, v_ref, weight, OPTS, torch.bfloat16)
    assert compiled_calls == [False]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_against_oracle("fm_normguard", v, target, v_ref, weight, OPTS, torch.bfloat16)
    assert compiled_calls == [False]  # switched off: not tried again


SCRIPT = textwrap.dedent("""
    import os, warnings
    import torch
    import ngkernels
    g = torch.Generator().manual_seed(0)
    v, t, r = (torch.randn(4, 40000, generator=g) for _ in range(3))
    def run():
        x = v.clone().requires_grad_()
        loss = ngkernels.fm_normguard_loss(x, t, 0.5 * r, relative=True)
        loss.backward()
        return loss, x.grad
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = run(), run()
    os.environ["NGKERNELS_CPU_COMPILE"] = "0"
    plain = run()
    for a, b in zip(first + second, plain + plain):
        torch.testing.assert_close(a, b)
    print("WARNINGS", sum("CPU path failed" in str(w.message) for w in caught))
""")


def test_no_cxx_compiler_falls_back_in_a_fresh_process(tmp_path):
    """A real failure: CXX names no compiler and the Inductor cache is empty, so compiling must fail; the op
    still gives the plain path's values, with one warning."""
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"),
               NGKERNELS_BACKEND="torch", NGKERNELS_CPU_COMPILE="1")
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNINGS 1" in done.stdout, done.stdout + done.stderr[-3000:]
