"""When the torch backend's op runs under torch.compile on CPU, and what happens when compiling fails.

Why. Run op by op, the torch backend (`ops/torch_backend.py`) makes several passes over [B, N] per half (bf16 ->
fp32 upcasts, the difference, the square, the reduction, the gradient's multiply-adds), each a full read and
write; torch.compile of the same math fuses each half into one C++ loop and is 2-9x faster on CPU. So on CPU
tensors of at least COMPILE_MIN_NUMEL elements, everything a public op does after checking its arguments
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

When not. Under COMPILE_MIN_NUMEL (small tensors: tests, the toy demo) the compile, seconds once per process and
variant (Inductor's on-disk FX-graph and C++ caches make later processes cheaper), would cost more than it saves.
Not on other devices (CUDA has the Triton kernels), not under a TorchDispatchMode (FakeTensor, opcheck's schema
checks), not while torch.compile traces the caller (it then traces the math itself, see `library.fused_loss`). A
failed compile (e.g. no C++ compiler) warns once and the process keeps the eager path from then on.
NGKERNELS_CPU_COMPILE=0 never compiles, =1 compiles whatever the size (to run the op tests against the compiled
path), auto (the default) from COMPILE_MIN_NUMEL elements.

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

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ngkernels.options import LossOptions

COMPILE_MIN_NUMEL = 1 << 17  # elements of v from which the op runs compiled (S: 2**20; the toy demo: 12288)
CHOICES = ("auto", "0", "1")  # NGKERNELS_CPU_COMPILE: from COMPILE_MIN_NUMEL elements / never / always

_COMPILED: dict = {}  # (function, key) -> the torch.compile wrapper of its own copy
_FAILED: list = []  # the error that switched compiling off for this process (at most one)


def enabled(v2d: torch.Tensor) -> bool:
    """Whether this call runs compiled (the module docstring says why each condition)."""
    if torch.compiler.is_compiling() or v2d.device.type != "cpu" or _FAILED:
        return False
    choice = os.environ.get("NGKERNELS_CPU_COMPILE", "auto")
    if choice not in CHOICES:
        raise ValueError(f"NGKERNELS_CPU_COMPILE must be one of {CHOICES}, got {choice!r}")
    big_enough = v2d.numel() >= COMPILE_MIN_NUMEL if choice == "auto" else choice == "1"
    return big_enough and _get_current_dispatch_mode() is None


@functools.lru_cache(maxsize=64)
def _scalars(ng_lambda: float, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    # two tensors even for equal values (Dynamo guards that distinct inputs do not alias); float64, so that they
    # promote as the eager path's Python floats do (to the other operand's dtype)
    return torch.tensor(ng_lambda, dtype=torch.float64), torch.tensor(margin, dtype=torch.float64)


def with_tensor_scalars(opts: LossOptions) -> LossOptions:
    """opts with ng_lambda and margin as 0-d tensors: inputs of the compiled graph, not constants baked into it."""
    ng_lambda, margin = _scalars(float(opts.ng_lambda), float(opts.margin))
    return opts._replace(ng_lambda=ng_lambda, margin=margin)


def constant_input(x):
    """A constant (no-grad) input as the compiled graph takes it: contiguous and not a view, so that neither its
    row stride nor a view's base becomes a guard."""
    if x is None:
        return None
    return x.detach() if x.is_contiguous() else x.contiguous()


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

    key: what selects the code (dtype, rank, terms, options); each key compiles its own copy of fn, so that the
    variants of one call site (B == 1, N <= 4096, ...) never compete for Dynamo's 8 with other call sites'."""
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
