"""What the benchmark suite measures: the ops, their three implementations, the shapes, dtypes and modes, and the
callable one case times.

One case = op x implementation x mode x shape x dtype. The three implementations compute the same loss:
  ngkernels  the package's fused op (Triton on CUDA, its torch backend on CPU; the Triton interpreter is
             never timed),
  eager      `ngkernels.reference.reference_loss`, the plain-PyTorch expression of the math, through autograd,
  compile    that same expression under `torch.compile(fullgraph=True, dynamic=False)`.
Modes: forward (with v requiring grad, as in training), backward (of a retained graph), full (both).
Before a case is timed, `check_agreement` checks it against the eager expression: a fast wrong answer is not
a result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch._functorch import config as functorch_config

import ngkernels
from ngkernels import compiled_cpu
from ngkernels import functional as ngk_functional
from ngkernels import reference

# "backward" mode re-runs the backward of one retained graph. A torch.compile'd backward with donated buffers
# (torch's default) refuses retain_graph=True ("compiled with non-empty donated buffers"), which on CPU is both
# `compile` and the compiled ngkernels path; so the suite turns donation off, for every implementation alike.
functorch_config.donated_buffer = False

# Issue 4's shapes; v, v_ref and target share the shape.
SHAPE_SETS = {
    "full": {
        "S": (16, 16, 64, 64),  # SD3.5 at 512 px, an RL micro-batch
        "M": (16, 16, 128, 128),  # 1024 px
        "T": (8, 4096, 64),  # FLUX-style token layout
        "F": (8, 262144),  # few huge samples
        "XL": (64, 16, 128, 128),  # bandwidth-bound
    },
    "smoke": {"tiny": (4, 3, 8, 8)},
}
LAUNCH_BOUND_SHAPES = ("S", "T", "F")  # also timed as CUDA-graph replays
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
IMPLS = ("ngkernels", "eager", "compile")
MODES = ("forward", "backward", "full")


# ---------------------------------------------------------------------------------------------------
# The ops: which inputs each uses, its ngkernels call and its eager expression (the reference math).

def eager_normguard(v, v_ref):
    return reference.reference_loss(v, v_ref=v_ref)[0]


def eager_flow_matching(v, target):
    return reference.reference_loss(v, target=target)[0]


def eager_fm_normguard(v, target, v_ref):
    return reference.reference_loss(v, target, v_ref)[0]


@dataclass(frozen=True)
class Op:
    name: str
    inputs: tuple  # names of the constant inputs after v, in call order
    ngkernels_fn: Callable
    eager_fn: Callable

    def min_bytes(self, numel: int, element_size: int) -> int:
        """Each input (v and the constants) read once, the gradient written once."""
        return (1 + len(self.inputs) + 1) * numel * element_size


OPS = {
    "normguard": Op("normguard", ("v_ref",), ngkernels.normguard_loss, eager_normguard),
    "flow_matching": Op("flow_matching", ("target",), ngkernels.flow_matching_loss, eager_flow_matching),
    "fm_normguard": Op("fm_normguard", ("target", "v_ref"), ngkernels.fm_normguard_loss, eager_fm_normguard),
}


def configure_dynamo():
    """One compiled graph per (op, shape, dtype): lift the recompile limit, and fail rather than fall back to
    eager when it is hit, so "compile" never silently times eager code."""
    cfg = torch._dynamo.config
    if hasattr(cfg, "recompile_limit"):
        cfg.recompile_limit = 64
    else:
        cfg.cache_size_limit = 64
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True


_COMPILED: dict = {}


def loss_fn(op: Op, impl: str) -> Callable:
    if impl == "ngkernels":
        return op.ngkernels_fn
    if impl == "eager":
        return op.eager_fn
    if impl == "compile":
        if op.name not in _COMPILED:
            configure_dynamo()
            _COMPILED[op.name] = torch.compile(op.eager_fn, fullgraph=True, dynamic=False)
        return _COMPILED[op.name]
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


# ---------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------
# Cases and their callables

@dataclass(frozen=True)
class Case:
    op: str
    impl: str
    mode: str
    shape: str
    dims: tuple
    dtype: str

    @property
    def id(self) -> str:
        return f"{self.op}-{self.impl}-{self.mode}-{self.shape}-{self.dtype}"


def cases(shape_set: str, ops=None, impls=None, modes=None, dtypes=None) -> list[Case]:
    if shape_set not in SHAPE_SETS:
        raise ValueError(f"shape set must be one of {tuple(SHAPE_SETS)}, got {shape_set!r}")
    # (op, shape, dtype) outermost so that the three modes of an implementation reuse its compiled graph
    return [Case(op, impl, mode, shape, dims, dtype)
            for op in (ops or OPS)
            for shape, dims in SHAPE_SETS[shape_set].items()
            for dtype in (dtypes or DTYPES)
            for impl in (impls or IMPLS)
            for mode in (modes or MODES)]


def resolve_device(choice: str) -> torch.device:
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {choice!r}")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but torch.cuda.is_available() is False")
    return torch.device(choice)


def check_timed_backend(device: torch.device):
    """The Triton interpreter runs programs one by one in Python: its times mean nothing, so never take them."""
    if device.type != "cuda" and ngk_functional.resolve_backend(device) == "triton":
        raise ValueError("NGKERNELS_BACKEND=triton on CPU runs the Triton interpreter, which is never timed; "
                         "unset NGKERNELS_BACKEND to benchmark the torch backend")


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> dict:
    """v (leaf, requires grad), target and v_ref; v_ref is smaller so that the hinge is active in every sample."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]

    def randn(scale=1.0):
        return (torch.randn(case.dims, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)

    return {"v": randn().requires_grad_(True), "target": randn(), "v_ref": randn(0.5)}


class Pass:
    """The callable a mode times, with `reset` (drop v.grad, as do_bench's grad_to_none) to run before each call."""

    def __init__(self, case: Case, inputs: dict):
        op = OPS[case.op]
        self.v = inputs["v"]
        args = [inputs["v"]] + [inputs[name] for name in op.inputs]
        fn = loss_fn(op, case.impl)
        if case.impl == "ngkernels":
            # the suite times the steady state: on CPU, the compiled path that a long run switches to once its
            # eager calls have paid for the compile (under auto, after hundreds to thousands of calls; see
            # ngkernels/compiled_cpu.py), from the first call here (NGKERNELS_CPU_COMPILE=0 still times eager)
            compiled_cpu.assume_long_run()
        self.forward = lambda: fn(*args)
        # d(total loss)/d(this loss), made once: in training it belongs to the sum of losses, not to this op, and
        # `loss.backward()` would add a fill kernel to every pass of every implementation
        seed = torch.ones((), dtype=torch.float32, device=self.v.device)
        if case.mode == "forward":
            self.run = self.forward
        elif case.mode == "backward":
            self.loss = self.forward()
            self.run = lambda: self.loss.backward(seed, retain_graph=True)
        elif case.mode == "full":
            self.run = lambda: self.forward().backward(seed)
        else:
            raise ValueError(f"mode must be one of {MODES}, got {case.mode!r}")

    def reset(self):
        self.v.grad = None

    def __call__(self):
        return self.run()

    def warm_up(self, calls: int = 3):
        """First calls compile (torch.compile, Triton JIT) and fill the allocator caches."""
        for _ in range(calls):
            self.reset()
            self.run()
        sync(self.v.device)


# relative to the largest gradient element (gradients of a mean over B*N elements are tiny): bf16 gradients are
# rounded from fp32 by both implementations and may differ by one unit in the last place
AGREEMENT_TOLERANCE = {"fp32": dict(rtol=1e-4, atol=1e-5), "bf16": dict(rtol=1e-2, atol=1e-2)}


def check_agreement(case: Case, device: torch.device):
    """A full pass of `case.impl` gives the loss and gradient of the eager expression on the same inputs
    (raises AssertionError otherwise): a fast wrong answer is not a result."""
    inputs = make_inputs(case, device)
    v = inputs["v"]
    outputs = []
    for impl in (case.impl, "eager"):
        loss = Pass(Case(case.op, impl, "forward", case.shape, case.dims, case.dtype), inputs)()
        loss.backward()
        outputs.append((loss.detach().float(), v.grad.float()))
        v.grad = None
    (loss, grad), (want_loss, want_grad) = outputs
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=0.0)
    scale = want_grad.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    torch.testing.assert_close(grad / scale, want_grad / scale, **AGREEMENT_TOLERANCE[case.dtype])


def sync(device: torch.device):
    """Waits for the device's queued work (CUDA); nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
