"""Reference data for native/test_ngkernels.c: inputs and the ngkernels Python op's outputs.

    python native/make_test_data.py --out DIR

writes DIR/cases.txt (one case per line, fields named in FIELDS) and DIR/<case>.<array>.bin (raw little-endian:
inputs in the case's dtype, everything else float32). The outputs come from the public ngkernels ops run on
CPU tensors (the torch backend, i.e. ngkernels/reference.py), so the C test compares the native library with
the Python op. Cases cover every entry point, dtype, reduction and option, row splitting, odd sizes (the
generic variants), padded and broadcast (stride 0) rows, weights and grad_output.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import ngkernels

FIELDS = ("name", "api", "dtype", "B", "N", "has_target", "has_ref", "ref_broadcast", "has_weight", "relative",
          "squared", "reduction", "ng_lambda", "margin", "v_pad", "has_grad_output")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REDUCTIONS = ("none", "mean", "sum")  # ng_reduction order

# api: fused = ng_fm_normguard, normguard = ng_normguard, pair = ng_loss_forward + ng_loss_backward
CASES = [
    dict(name="fmng_fp32_generic", api="fused", dtype="fp32", B=4, N=3000, has_target=1, has_ref=1, has_weight=1,
         reduction="mean", ng_lambda=0.5, margin=0.1, v_pad=5, has_grad_output=1),
    dict(name="fmng_bf16_splits", api="fused", dtype="bf16", B=3, N=70000, has_target=1, has_ref=1, relative=1,
         squared=1, reduction="sum", ng_lambda=2.0, margin=0.05, v_pad=16),
    dict(name="ng_fp16_tokens", api="normguard", dtype="fp16", B=300, N=48, has_ref=1, ref_broadcast=1, squared=1,
         reduction="none", has_grad_output=1),
    dict(name="ng_bf16_tiny_relative", api="normguard", dtype="bf16", B=7, N=5, has_ref=1, relative=1,
         reduction="mean", margin=-0.2),
    dict(name="fm_fp32_pair", api="pair", dtype="fp32", B=5, N=1000, has_target=1, has_weight=1, reduction="none",
         has_grad_output=1),
    dict(name="fmng_fp32_pair_large", api="pair", dtype="fp32", B=2, N=131072, has_target=1, has_ref=1,
         reduction="mean"),
    dict(name="fmng_fp16_rows", api="pair", dtype="fp16", B=64, N=200, has_target=1, has_ref=1, has_weight=1,
         squared=1, reduction="sum", ng_lambda=0.3, has_grad_output=1),
]
DEFAULTS = dict(has_target=0, has_ref=0, ref_broadcast=0, has_weight=0, relative=0, squared=0, ng_lambda=1.0,
                margin=0.0, v_pad=0, has_grad_output=0)


def _save(path: Path, x: torch.Tensor):
    x = x.detach().contiguous().cpu()
    raw = x.view(torch.int16) if x.dtype in (torch.bfloat16, torch.float16) else x.to(torch.float32)
    path.write_bytes(raw.numpy().tobytes())


def make_case(case, out: Path, gen: torch.Generator):
    c = {**DEFAULTS, **case}
    B, N, dtype = c["B"], c["N"], DTYPES[c["dtype"]]
    # rows of v at different scales against v_ref, so that some hinge terms are active and some are not
    scale = torch.linspace(0.5, 1.6, B, dtype=torch.float64)[:, None]
    v = (torch.randn(B, N, generator=gen, dtype=torch.float64) * scale).to(dtype)
    target = torch.randn(B, N, generator=gen, dtype=torch.float64).to(dtype) if c["has_target"] else None
    v_ref = None
    if c["has_ref"]:
        rows = 1 if c["ref_broadcast"] else B
        v_ref = torch.randn(rows, N, generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.rand(B, generator=gen, dtype=torch.float64).float() + 0.5 if c["has_weight"] else None
    red = c["reduction"]
    go = None
    if c["has_grad_output"]:
        go = torch.rand(B if red == "none" else 1, generator=gen, dtype=torch.float64).float() + 0.25

    vg = v.clone().requires_grad_(True)
    ref_full = None if v_ref is None else v_ref.expand(B, N)
    opts = dict(margin=c["margin"], relative=bool(c["relative"]), squared=bool(c["squared"]), reduction=red)
    nan = torch.full((B,), float("nan"))
    if target is not None and v_ref is not None:
        loss, st = ngkernels.fm_normguard_loss(vg, target, ref_full, weight=weight, ng_lambda=c["ng_lambda"],
                                               return_stats=True, **opts)
        stats = torch.stack([st.v_norm, st.ref_norm, st.mse])
    elif v_ref is not None:
        loss = ngkernels.normguard_loss(vg, ref_full, **opts)
        stats = torch.stack([ngkernels.velocity_norms(v), ngkernels.velocity_norms(ref_full), nan])
    else:
        loss = ngkernels.flow_matching_loss(vg, target, weight=weight, reduction=red)
        mse = ngkernels.flow_matching_loss(v, target, reduction="none")
        stats = torch.stack([ngkernels.velocity_norms(v), nan, mse.float()])
    grad_output = go if go is not None else torch.ones(B if red == "none" else 1)
    loss.backward(grad_output.reshape(loss.shape).to(loss.dtype))

    name = c["name"]
    _save(out / f"{name}.v.bin", v)
    if target is not None:
        _save(out / f"{name}.target.bin", target)
    if v_ref is not None:
        _save(out / f"{name}.v_ref.bin", v_ref)
    if weight is not None:
        _save(out / f"{name}.weight.bin", weight)
    if go is not None:
        _save(out / f"{name}.grad_output.bin", go)
    _save(out / f"{name}.loss.bin", loss.reshape(-1))
    _save(out / f"{name}.stats.bin", stats)
    _save(out / f"{name}.grad.bin", vg.grad.float())
    values = {**c, "reduction": REDUCTIONS.index(red)}
    return " ".join(str(values[f]) for f in FIELDS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    lines = [make_case(case, args.out, gen) for case in CASES]
    (args.out / "cases.txt").write_text("# " + " ".join(FIELDS) + "\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
