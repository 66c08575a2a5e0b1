"""When the torch backend's op runs under torch.compile on CPU, and what happens when compiling fails.

Why. Run op by op, the torch backend (`ops/torch_backend.py`) makes several passes over [B, N] per half (bf16 ->
fp32 upcasts, the difference, the square, the reduction, the gradient's multiply-adds), each a full read and
write; torch.compile of the same math fuses each half into one C++ loop and is 2-9x faster on CPU. So on CPU
tensors of at least COMPILE_MIN_NUMEL elements, once the eager calls have paid for the compile (see "When not,
and when" below), everything a public op does after checking its arguments
(`functional._rows_and_loss`: the [B, N] rows, the autograd.Function over the fused halves, the stats) runs
under `torch.compile(dynamic=True, fullgraph=True)`: one graph for the forward and one for the backward, which
autograd calls directly. A full pass thus pays torch.compile's call overhead once, as the compiled expression
does (compiling the two halves apart cost two guarded calls plus the eager adapter: 1.5-2x the overhead).

Symbolic sizes cost speed in one place, and Inductor is told to avoid it. With N a symbol, Inductor vectorises a
row's loop 8 (AVX2) floats at a time and handles the N mod 8 tail with a masked vector step inside the same loop
body; that branch (its own cascade-sum accumulator) keeps the compiler from optimising the main step, and the
per-row reductions ran at half the speed of the same C++ with N a constant (fp32 S forward kernel 1.3 ms vs
0.6 ms). `cpp.enable_loop_tail_vec=False` makes the tail a scalar loop after the vector loop, and the kernel
runs as fast as the static one. (Only the tail's rounding changes: float32 accumulation order.)

What the caller does not ask for is not computed. `normguard_loss`, `flow_matching_loss` and `fm_normguard_loss`
without return_stats call with stats=False: the compiled function returns the loss alone, and Inductor drops
what only the stats need, above all flow_matching's ||v_i|| reduction (a second sum in its forward loop, which
made that graph 14 % slower than compile's at T bf16; bf16 flow_matching, measured with benchmarks/cpu_ab.py in
one process: 0.72-0.73x compile with it, 0.93-0.96x without). NormGuard's norms feed the loss and stay.

No recompile per shape. B and N are symbols (dynamic=True), so a new shape reuses the compiled code;
ng_lambda and margin enter as 0-d tensors (`with_tensor_scalars`: a Python float would be baked into the graph,
and a lambda schedule would recompile every step); target, v_ref and weight enter as contiguous non-views
(`constant_input`), because Dynamo guards on strides and on a view's base. What still selects a compiled variant:
  - what changes the code: the input dtype, which of target / v_ref / weight are given, relative, squared, the
    reduction, whether v requires grad, whether the stats are returned;
  - v's rank and layout (contiguous, strided, a view of another tensor: Dynamo guards on the view's base), which
    a call site keeps from step to step;
  - B == 1 (Dynamo specialises sizes equal to 1);
  - N <= 4096 or N > 4096 (Inductor sums float32 rows longer than 4096 in a cascade of 4096-element chunks,
    for accuracy), and likewise B <= 4096 or B > 4096 (the sum over the rows, e.g. per-token rows [32768, 64]);
  - equal sizes in the first call's shape: Dynamo gives equal sizes one symbol ("duck sizing"), so S
    [16, 16, 64, 64] compiles a graph for B == C, and the first B != 16 one general graph (no further ones:
    distinct symbols carry no inequality guard).
So over a run whose B and N vary, a call site (fixed options, dtype and layout) compiles at most 6 variants, plus
one for each size coincidence of its first shape that a later shape breaks; in practice 1 or 2
(tests/ngkernels/test_cpu_compile.py checks the bound). Each (dtype, rank, terms, options) gets its own copy of
the compiled function (`run`'s key), because Dynamo keeps `torch._dynamo.config.recompile_limit` (8) variants
per code object and runs the function eagerly past that: one process with many call sites (the benchmark suite:
3 ops x 2 dtypes x 2 ranks) would otherwise fall back to eager after the eighth.

When not, and when. Not on other devices (CUDA has the Triton kernels), not under a TorchDispatchMode (FakeTensor,
opcheck's schema checks), not while torch.compile traces the caller (it then traces the math itself, see
`library.fused_loss`). A failed compile (e.g. no C++ compiler) warns once and the process keeps the eager path from
then on. On CPU tensors the question is whether the compile pays: the first compile of a process costs about
COMPILE_COST_S (importing Dynamo and Inductor, then Dynamo + Inductor + the C++ build, from Inductor's on-disk cache
when an earlier process filled it: 9.5 s of CPU time on this machine, 11 s wall, more with a cold cache), each later
variant about VARIANT_COST_S, while a compiled call saves only milliseconds (fm_normguard fwd+bwd at S [16, 16, 64,
64]: 4-7 ms of CPU time at 1 thread), so a script or a test that calls the op a few times would pay seconds for
nothing, and a training run that calls it thousands of times would lose more by never compiling. Which one a process
is cannot be known at its first call, so the choice is the ski-rental one (rent until the rent paid equals the
price, then buy): run eagerly (the rent: each eager call pays the saving it forgoes, estimated as
SAVING_NS_PER_ELEMENT[op, backward or not, dtype] x the elements of v, more per element past the last-level cache)
until the estimated savings forgone reach the compile's cost, then compile. The process-wide price (COMPILE_COST_S)
is set against the savings of all the calls together; once one variant has compiled, each further `run` key pays its
own VARIANT_COST_S from its own calls. Whatever the number of calls n turns out to be, the time lost against the
better of "compile at the first call" and "never compile" (known only afterwards) is at most that best choice again,
as far as the estimates are right (2-competitive, the best a deterministic rule can guarantee): at the switch, the
savings forgone are less than the price just paid, and never compiling would have forgone at least that price. The
estimates are constants, not timings of this run, so the switch happens at a call count that depends only on the
calls' shapes, dtypes and options: a training run takes the same path at the same step every time, and reproduces.
Large calls switch soon (fm_normguard fwd+bwd at XL [64, 16, 128, 128]: at the 81st call in fp32, the 75th in bf16;
at S: the 3020th, the 1225th), tiny ones never: under COMPILE_MIN_NUMEL (tests, the toy demo) a call neither
compiles nor counts. Where the measured saving is nil (normguard fwd+bwd in float32: the eager op is already as
fast) the rule never compiles. NGKERNELS_CPU_COMPILE=0 never compiles, =1 compiles whatever the size from the first
call (the tests of the compiled path), auto (the default) is the rule above; `assume_long_run()` makes auto compile
from the first call above the floor (the benchmark suite, which times the steady state).

Known limit: `loss.backward(retain_graph=True)` on a compiled call raises "compiled with non-empty donated
buffers" (torch 2.13's compiled backward; patching torch._functorch.config.donated_buffer around the forward
does not help, because the backward checks the global flag and metadata whose default is None, not []). Set
torch._functorch.config.donated_buffer = False in the process, or NGKERNELS_CPU_COMPILE=0, to retain graphs.
"""

from __future__ import annotations

import functools
import os
import types
import warnings
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ngkernels.options import LossOptions

COMPILE_MIN_NUMEL = 1 << 17  # elements of v under which a call never compiles (S: 2**20; the toy demo: 12288)
# NGKERNELS_CPU_COMPILE: once the eager calls have paid for the compile (ski rental, see the docstring) / never /
# from the first call whatever the size
CHOICES = ("auto", "0", "1")

# The compile's price, in CPU seconds (benchmarks/cpu_payback.py --first-call, torch 2.13, this 2-core machine
# under load, Inductor's on-disk cache warm): importing torch._dynamo and torch._inductor.compile_fx 3.3 s, then
# the first compiled fm_normguard S fp32 fwd+bwd 6.2 s (wall 3.9 + 7.2 s); a second variant (bf16) 1.4 s. (CPU time
# of the process and its waited-for children. With a cold cache, a machine's first process: 4.2 + 15.6 s, and
# 7.1 s for the second variant; the rule prices the usual, warm case.)
COMPILE_COST_S = 9.5  # the first compile of a process
VARIANT_COST_S = 1.5  # each later `run` key
# CPU nanoseconds a call saves per element of v by running compiled instead of eagerly. Measured with
# benchmarks/cpu_payback.py: the benchmark suite's full pass (or the forward alone under no_grad: an evaluation's
# call), eager torch backend vs compiled path timed in alternation, median thread CPU time at 1 torch thread (the
# machine was loaded by other jobs: CPU time leaves out their share of the cores, which wall time would count),
# at S [16, 16, 64, 64] and T [8, 4096, 64]. The value is the median of those (full pass: two runs x S, T; no_grad:
# one run x S, T), rounded; single measurements scatter by up to 2x around it. An estimate too low by a factor a
# delays the switch (worst case 1 + 1/a instead of 2), one too high by b brings it early (1 + b). Key: (op,
# backward follows, dtype); "norms" (velocity_norms: no target, no v_ref) takes normguard's no-grad forward;
# float16 takes bfloat16's numbers and float64 float32's (the same eager passes with and without upcasts; not
# measured). normguard fwd+bwd in float32 saves nothing measurable (-0.10 to +0.08 ns): never compiled under auto.
SAVING_NS_PER_ELEMENT = {
    ("fm_normguard", True, torch.float32): 3.0, ("fm_normguard", True, torch.bfloat16): 7.4,
    ("flow_matching", True, torch.float32): 2.0, ("flow_matching", True, torch.bfloat16): 3.9,
    ("normguard", True, torch.float32): 0.0, ("normguard", True, torch.bfloat16): 2.0,
    ("fm_normguard", False, torch.float32): 1.5, ("fm_normguard", False, torch.bfloat16): 14.7,
    ("flow_matching", False, torch.float32): 1.1, ("flow_matching", False, torch.bfloat16): 2.5,
    ("normguard", False, torch.float32): 0.1, ("normguard", False, torch.bfloat16): 0.9,
}
# From LARGE_NUMEL elements (M [16, 16, 128, 128]: v, target, v_ref and the gradient are 64 MiB in float32,
# beyond this machine's 32 MiB L3) each of the eager path's extra passes goes to DRAM and a compiled call saves
# more per element; measured for fm_normguard fwd+bwd only (same script, 8 and 4 calls each): M fp32 7.4, bf16 7.6;
# XL fp32 7.0, bf16 38.6 ns/element. The smaller of M and XL; the other ops keep their S/T numbers (too low there:
# a later switch).
LARGE_NUMEL = 1 << 22
SAVING_NS_PER_ELEMENT_LARGE = {("fm_normguard", True, torch.float32): 7.0, ("fm_normguard", True, torch.bfloat16): 7.6}
_MEASURED_AS = {torch.float16: torch.bfloat16, torch.float64: torch.float32}

_COMPILED: dict = {}  # (function, key) -> the torch.compile wrapper of its own copy
_FAILED: list = []  # the error that switched compiling off for this process (at most one)
_FORGONE: dict = {}  # under auto: key -> estimated CPU seconds its eager calls would have saved compiled
_BOUGHT: set = set()  # under auto: the keys whose compile has been paid for (they run compiled from then on)
_LONG_RUN: list = []  # [True] after assume_long_run(): under auto the price counts as paid


class Variant(NamedTuple):
    """A call's `run` key: what selects the compiled code, and what its estimated saving depends on."""
    dtype: torch.dtype
    rank: int
    target: bool  # given
    v_ref: bool  # given
    weight: bool  # given
    relative: bool
    squared: bool
    reduction: str
    grad: bool  # a backward will follow
    stats: bool  # the stats are returned

    @property
    def op(self) -> str:
        if self.target:
            return "fm_normguard" if self.v_ref else "flow_matching"
        return "normguard" if self.v_ref else "norms"


def estimated_saving_s(numel: int, key: Variant) -> float:
    """CPU seconds a call on `numel` elements of v would save by running compiled (SAVING_NS_PER_ELEMENT)."""
    op, grad = (key.op, key.grad) if key.op != "norms" else ("normguard", False)
    cell = (op, grad, _MEASURED_AS.get(key.dtype, key.dtype))
    ns = SAVING_NS_PER_ELEMENT.get(cell, 0.0)
    if numel >= LARGE_NUMEL:
        ns = SAVING_NS_PER_ELEMENT_LARGE.get(cell, ns)
    return numel * ns * 1e-9


def _paid_for(numel: int, key: Variant) -> bool:
    """The ski-rental rule (module docstring): adds this call's forgone saving, and buys once the saving forgone
    reaches the price (the process's first compile against all keys' savings, a later one against its own)."""
    if key in _BOUGHT or _LONG_RUN:
        return True
    saving = estimated_saving_s(numel, key)
    _FORGONE[key] = _FORGONE.get(key, 0.0) + saving
    forgone, price = (_FORGONE[key], VARIANT_COST_S) if _BOUGHT else (sum(_FORGONE.values()), COMPILE_COST_S)
    if saving > 0.0 and forgone >= price:
        _BOUGHT.add(key)
        return True
    return False


def assume_long_run():
    """Under auto, from now on in this process every call of at least COMPILE_MIN_NUMEL elements runs compiled:
    the steady state a long run reaches once its first calls have paid for the compile. For benchmarks, which
    time that steady state (NGKERNELS_CPU_COMPILE=0 still never compiles; =1 also compiles smaller calls)."""
    _LONG_RUN[:] = [True]


def enabled(v: torch.Tensor, key: Variant) -> bool:
    """Whether this call runs compiled (the module docstring says why each condition). Under auto, a call that
    could compile but runs eagerly counts towards paying for the compile of its key."""
    if not v.is_cpu or _FAILED or torch.compiler.is_compiling():
        return False
    choice = os.environ.get("NGKERNELS_CPU_COMPILE", "auto")
    if choice not in CHOICES:
        raise ValueError(f"NGKERNELS_CPU_COMPILE must be one of {CHOICES}, got {choice!r}")
    if choice == "0" or _get_current_dispatch_mode() is not None:
        return False
    if choice == "1":
        return True
    return v.numel() >= COMPILE_MIN_NUMEL and _paid_for(v.numel(), key)


@functools.lru_cache(maxsize=64)
def with_tensor_scalars(opts: LossOptions) -> LossOptions:
    """opts with ng_lambda and margin as 0-d tensors: inputs of the compiled graph, not constants baked into it.
    Made once per distinct opts and never written to (every microsecond of the op's Python front counts at S: the
    front, measured in benchmarks/README.md, is what separates the compiled graph from compile's there). Two
    tensors even for equal values (Dynamo guards that distinct inputs do not alias); float64, so that they promote
    as the eager path's Python floats do (to the other operand's dtype)."""
    return opts._replace(ng_lambda=torch.tensor(float(opts.ng_lambda), dtype=torch.float64),
                         margin=torch.tensor(float(opts.margin), dtype=torch.float64))


def constant_input(x):
    """A constant (no-grad) input as the compiled graph takes it: contiguous and not a view, so that neither its
    row stride nor a view's base becomes a guard. A contiguous non-view that needs no grad is passed as it is."""
    if x is None:
        return None
    if not x.is_contiguous():
        return x.contiguous()
    return x.detach() if x.requires_grad or x._base is not None else x


def _inputs_free_to_save():
    """Inductor's min-cut partitioner, told that the op's inputs are free to save for the backward (they are alive
    anyway). Left alone it counts v and target as 2N saved elements against N for v - target, so for float32 the
    forward writes the difference out and the backward reads it back (1.8x slower at S than re-reading v and
    target, which is what the compiled expression and the Triton kernels do).

    The class is made on first use (importing Inductor costs seconds) and published as a module global, so that
    Inductor can pickle it into its on-disk cache key (a local class would switch that cache off)."""
    cls = globals().get("_InputsFreeToSave")
    if cls is None:
        from torch._functorch.partitioners import min_cut_rematerialization_partition
        from torch._inductor.custom_graph_pass import CustomPartitionerFn

        class _InputsFreeToSave(CustomPartitionerFn):
            def __call__(self, gm, joint_inputs, **kwargs):
                kwargs["static_lifetime_input_indices"] = list(range(len(joint_inputs[0])))
                return min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)

            def uuid(self):
                return "ngkernels.compiled_cpu._InputsFreeToSave.1"

        _InputsFreeToSave.__qualname__ = "_InputsFreeToSave"
        globals()["_InputsFreeToSave"] = cls = _InputsFreeToSave
    return cls()


def _inductor_options() -> dict:
    """Inductor settings of the compiled op (the module docstring says why each)."""
    return {"custom_partitioner_fn": _inputs_free_to_save(), "cpp.enable_loop_tail_vec": False}


def _own_code(fn):
    """fn with a code object of its own: Dynamo keeps its compiled variants per code object, at most
    `recompile_limit` (8) of them, and runs the function eagerly past that."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def run(fn, key, *args):
    """torch.compile(fn, dynamic=True, fullgraph=True)(*args), or None once compiling has failed: the failure warns
    once and switches compiling off for the process (it would fail again, seconds each time).

    key: what selects the code (a `Variant`: dtype, rank, terms, options); each key compiles its own copy of fn,
    so that the variants of one call site (B == 1, N <= 4096, ...) never compete for Dynamo's 8 with other call
    sites'."""
    try:
        compiled = _COMPILED.get((fn, key))
        if compiled is None:
            compiled = _COMPILED[(fn, key)] = torch.compile(
                _own_code(fn), dynamic=True, fullgraph=True, options=_inductor_options())
        return compiled(*args)
    except Exception as err:  # noqa: BLE001  (any failure to compile it: the eager path is always right)
        _FAILED.append(err)
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        warnings.warn(f"ngkernels: torch.compile of the CPU path failed ({type(err).__name__}: {first_line}); "
                      "running it eagerly for the rest of this process", RuntimeWarning, stacklevel=3)
        return None
