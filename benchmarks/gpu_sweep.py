"""The device check's kernel measurements, in one process and a fixed time budget (issue 11):

    python -m benchmarks.gpu_sweep --out DIR [--budget-s 150] [--dtypes bf16 fp32]
    python -m benchmarks.gpu_sweep --out DIR --rehearse        # this CPU: same code, tiny shapes, host timers
    python -m benchmarks.gpu_sweep --replot benchmarks/results/sweep-graph-nvidia-h200.csv  # redraw its PNG

For each of the suite's shapes (S, M, T, F, XL): the fused fm + NormGuard op forward and full pass (forward +
backward) as a fraction of the device-to-device copy bandwidth measured in the same run, against the same math
as one eager expression and under torch.compile (one dynamic-shape compile for all shapes); the launch-plan
variants the issue asks to decide by measurement (the default tile, 8 KiB, vs the other of 4096 / 2048, L2 keep policy on vs off, an aligned vs a
misaligned view); launches and peak extra memory of a full pass; the compiled-variant count over a varying-B
loop; the cost of the per-launch ticket memset; and the reduce-overhead step at S.

Timing: on CUDA each input set's call is captured in a CUDA graph and the replays are timed back to back
(`graph_time`), so the numbers are device time, not the host's dispatch. The first H200 run of this script
(2026-12-04) timed one eager call between events instead: every op then took ~0.2 ms whatever its size
(host-bound on that machine), which says nothing about bandwidth; those rows are kept in
benchmarks/results/sweep-nvidia-h200.* as per-call latency. Where capture fails the row falls back to that
per-call timing and says so (column `timer`).

Bytes moved: forward 3N elements read (v, v_ref, target); full pass 3N + 2N read + N written = 6N (the floor is
4N: read the three inputs, write the gradient). Inputs rotate among enough copies to exceed twice the L2, so a
repeat never finds its data in the cache (METHOD: do not time the cache).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import ngkernels
from benchmarks.profiling import peak_extra_memory_cuda
from benchmarks.timers import copy_bandwidth_gbps, time_once_ms
from ngkernels.ops import fm_normguard as ops
from ngkernels.reference import reference_loss

SHAPES = {"S": (16, 16 * 64 * 64), "M": (16, 16 * 128 * 128), "T": (8, 4096 * 64), "F": (8, 262144),
          "XL": (64, 16 * 128 * 128)}
REHEARSAL_SHAPES = {"S": (4, 300), "T": (8, 4096 * 2), "F": (2, 9000)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
START = time.monotonic()


def elapsed():
    return time.monotonic() - START


def bench(fn, reps, device):
    """Median seconds of fn() over reps calls after 3 warm-ups (CUDA events per call; host clock on CPU)."""
    for _ in range(3):
        fn()
    times = [time_once_ms(fn, device) / 1e3 for _ in range(reps)]
    times.sort()
    return times[len(times) // 2]


def graph_time(fns, reps, device):
    """Seconds per call of fns (one per input set), each captured once in a CUDA graph, replayed round-robin
    reps times between two events: device time without host dispatch gaps."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture: compiles, autograd and allocator state
        for fn in fns:
            fn()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for fn in fns:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        graphs.append(g)
    for g in graphs:
        g.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        for g in graphs:
            g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / (reps * len(graphs))


def timed(make, sets, reps, device):
    """(seconds per call, timer name): CUDA-graph replays where capture works, else per-call events."""
    if device.type == "cuda":
        try:
            return graph_time([make(fn_set) for fn_set in ([s] for s in sets)], reps, device), "graph"
        except Exception as exc:  # e.g. an op that syncs: time it per call instead
            print(f"graph capture failed ({type(exc).__name__}: {exc}); per-call timing", flush=True)
    return bench(make(sets), reps, device), "per-call"


def eager_expression(v, target, v_ref):
    """The same math as one eager PyTorch expression (the reference, which upcasts like the kernels)."""
    return reference_loss(v, target, v_ref, ng_lambda=0.5)[0]


def make_sets(B, N, dtype, device, l2_bytes, offset=0):
    per_set = 3 * B * N * torch.finfo(dtype).bits // 8
    n = max(1, min(8, math.ceil(2 * l2_bytes / per_set)))
    sets = []
    for i in range(n):
        base = torch.randn(3, B * N + offset, device=device, dtype=torch.float32).to(dtype)
        v, t, r = (base[j, offset:].view(B, N) for j in range(3))
        r.mul_(0.9)  # v_ref a bit shorter on average: a mix of active and inactive rows
        sets.append((v, t, r))
    return sets


def full_pass_fn(loss_fn, sets):
    state = {"i": 0}
    leaves = [s[0].detach().clone().requires_grad_() for s in sets]

    def run():
        i = state["i"] = (state["i"] + 1) % len(sets)
        v = leaves[i]
        v.grad = None
        loss_fn(v, sets[i][1], sets[i][2]).backward()
    return run


def forward_fn(loss_fn, sets):
    state = {"i": 0}

    def run():
        i = state["i"] = (state["i"] + 1) % len(sets)
        with torch.no_grad():
            loss_fn(*sets[i])
    return run


def ngk(v, target, v_ref):
    return ngkernels.fm_normguard_loss(v, target, v_ref, ng_lambda=0.5)


def count_launches(fn, device):
    if device.type != "cuda":
        return ""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if str(e.device_type).endswith("CUDA"))


def _safe(measure, fn, device):
    try:
        return measure(fn, device)
    except Exception as exc:  # a profiler quirk must not cost the timing row
        return f"{type(exc).__name__}: {exc}"[:80]


def peak_extra_bytes(fn, device):
    """Peak bytes of one full pass above the steady state (the previous gradient is freed as the new one is made)."""
    if device.type != "cuda":
        return ""
    fn.reset = getattr(fn, "reset", lambda: None)
    return int(peak_extra_memory_cuda(fn))


def plot(csv_path: Path, png_path: Path, title: str = "") -> Path:
    """Full-pass and forward time as a fraction of copy bandwidth, per shape, one panel per dtype: the figure
    the issue asks for (bars: ngkernels and its variants, eager, compile)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("full_frac_copy")]
    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in rows)]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(2, len(dtypes), figsize=(6 * len(dtypes), 7), squeeze=False)
    for col, dname in enumerate(dtypes):
        shapes = list(dict.fromkeys(r["shape"] for r in rows if r["dtype"] == dname))
        width = 0.8 / len(impls)
        for row_i, key in enumerate(("full_frac_copy", "fwd_frac_copy")):
            ax = axes[row_i][col]
            for k, impl in enumerate(impls):
                vals = {r["shape"]: float(r[key]) for r in rows if r["dtype"] == dname and r["impl"] == impl}
                xs = [i + (k - len(impls) / 2 + 0.5) * width for i, s in enumerate(shapes) if s in vals]
                ax.bar(xs, [vals[s] for s in shapes if s in vals], width, label=impl)
            ax.axhline(0.9, color="k", ls="--", lw=0.8)
            ax.set_xticks(range(len(shapes)), shapes)
            ax.set_ylim(0, 1)
            ax.set_title(f"{dname}: {'full pass (6N bytes)' if row_i == 0 else 'forward (3N bytes)'}")
            ax.set_ylabel("fraction of copy bandwidth")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title or csv_path.stem)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_sweep", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--replot", type=Path, metavar="CSV", help="only redraw CSV's plot (CSV with .png) and exit")
    p.add_argument("--title", default="", help="the plot's title (--replot; a run names device and versions)")
    p.add_argument("--budget-s", type=float, default=150.0, help="stop starting new measurements after this")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=tuple(DTYPES))
    p.add_argument("--shapes", nargs="+", default=None)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--rehearse", action="store_true", help="CPU: tiny shapes, Triton interpreter (no timings)")
    args = p.parse_args(argv)
    if args.replot:
        print(plot(args.replot, args.replot.with_suffix(".png"), args.title))
        return 0
    if args.out is None:
        p.error("--out is required (or --replot CSV)")
    if args.rehearse:
        device = torch.device("cpu")
        shapes, reps, l2 = REHEARSAL_SHAPES, 2, 1 << 16
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device: gpu_sweep is for a GPU machine (rehearse with --rehearse)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        shapes, reps = SHAPES, args.reps
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
    if args.shapes:
        shapes = {k: shapes[k] for k in args.shapes}
    args.out.mkdir(parents=True, exist_ok=True)
    rows, notes = [], {}

    def record(**row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out / "sweep.csv", "w", newline="") as f:  # rewritten after every row: nothing lost
            w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            w.writeheader()
            w.writerows(rows)

    bw = copy_bandwidth_gbps(device, (1 << 30) if device.type == "cuda" else (1 << 22)) * 1e9
    notes["copy_bandwidth_GBps"] = bw / 1e9
    notes["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    notes["torch"], notes["triton"] = torch.__version__, __import__("triton").__version__
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    compiled = torch.compile(eager_expression, dynamic=True)

    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for sname, (B, N) in shapes.items():
            if elapsed() > args.budget_s:
                notes.setdefault("skipped", []).append(f"{sname}-{dname}")
                continue
            esize = torch.finfo(dtype).bits // 8
            fwd_bytes, full_bytes = 3 * B * N * esize, 6 * B * N * esize
            sets = make_sets(B, N, dtype, device, l2)
            other_tile = "2048" if ops.tile_for(dtype) == 4096 else "4096"  # the default's alternative
            variants = [("ngkernels", ngk, {}), (f"ngkernels-tile{other_tile}", ngk, {"NGKERNELS_TILE": other_tile}),
                        ("ngkernels-l2keep", ngk, {"L2_KEEP": True}), ("eager", eager_expression, {}),
                        ("compile", compiled, {})]
            for name, fn, setting in variants:
                if elapsed() > args.budget_s:
                    break
                old_env = os.environ.get("NGKERNELS_TILE")
                if "NGKERNELS_TILE" in setting:
                    os.environ["NGKERNELS_TILE"] = setting["NGKERNELS_TILE"]
                ops.L2_KEEP = setting.get("L2_KEEP", False)
                try:
                    t_fwd, timer = timed(lambda s, fn=fn: forward_fn(fn, s), sets, reps, device)
                    t_full, _ = timed(lambda s, fn=fn: full_pass_fn(fn, s), sets, reps, device)
                    full = full_pass_fn(fn, sets)
                    record(shape=sname, dtype=dname, B=B, N=N, impl=name, timer=timer, fwd_ms=t_fwd * 1e3,
                           full_ms=t_full * 1e3,
                           fwd_frac_copy=fwd_bytes / t_fwd / bw, full_frac_copy=full_bytes / t_full / bw,
                           full_frac_copy_floor4N=(4 * B * N * esize) / t_full / bw,
                           launches_full=_safe(count_launches, full, device),
                           peak_extra_bytes=_safe(peak_extra_bytes, full, device),
                           grad_bytes=B * N * esize)
                except Exception as exc:  # one variant's failure must not cost the rest of the sweep
                    record(shape=sname, dtype=dname, impl=name, error=f"{type(exc).__name__}: {exc}"[:300])
                finally:
                    ops.L2_KEEP = False
                    if old_env is None:
                        os.environ.pop("NGKERNELS_TILE", None)
                    else:
                        os.environ["NGKERNELS_TILE"] = old_env
            if sname in ("S", "XL", "F") and elapsed() < args.budget_s:  # misaligned views (offset 1 element)
                mis = make_sets(B, N, dtype, device, l2, offset=1)
                t_fwd, timer = timed(lambda s: forward_fn(ngk, s), mis, reps, device)
                t_full, _ = timed(lambda s: full_pass_fn(ngk, s), mis, reps, device)
                record(shape=sname, dtype=dname, B=B, N=N, impl="ngkernels-misaligned", timer=timer, fwd_ms=t_fwd * 1e3,
                       full_ms=t_full * 1e3, fwd_frac_copy=fwd_bytes / t_fwd / bw,
                       full_frac_copy=full_bytes / t_full / bw)
            del sets

    if device.type == "cuda" and elapsed() < args.budget_s + 60:
        # compiled variants over a varying-B loop at S's N
        caches = lambda: {k: len(getattr(ops, k).device_caches[0][0]) for k in ("_fwd_kernel", "_bwd_kernel")}
        before = caches()
        for B in (1, 2, 3, 5, 7, 9, 16, 17, 33, 64, 100, 129, 255):
            v, t, r = make_sets(B, 16 * 32 * 32, torch.bfloat16, device, 0)[0]
            full_pass_fn(ngk, [(v, t, r)])()
        after = caches()
        notes["variants_over_varying_B"] = {k: after[k] - before[k] for k in before}
        # the per-launch ticket memset: alone, eager and as a graph node
        z = lambda: torch.zeros(9, dtype=torch.int32, device=device)
        notes["memset_eager_us"] = bench(z, 200, device) * 1e6
        # reduce-overhead at S: the same full pass as CUDA graphs
        B, N = SHAPES["S"]
        sets = make_sets(B, N, torch.bfloat16, device, l2)
        try:
            ro = torch.compile(ngk, mode="reduce-overhead", fullgraph=True)
            notes["reduce_overhead_S_bf16_fwd_ms"] = bench(forward_fn(ro, sets), reps, device) * 1e3
            notes["eager_ngkernels_S_bf16_fwd_ms"] = bench(forward_fn(ngk, sets), reps, device) * 1e3
        except Exception as exc:
            notes["reduce_overhead_error"] = f"{type(exc).__name__}: {exc}"[:500]
        notes["occupancy_ctas_per_sm"] = {str(k[1]) + str(k[2][:6]): v for k, v in ops._OCCUPANCY.items()}
    notes["wall_s"] = elapsed()
    (args.out / "sweep_notes.json").write_text(json.dumps(notes, indent=1, default=str))
    lines = ["| shape | dtype | impl | fwd ms | full ms | fwd/copy | full/copy | launches | peak extra MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['impl']} | error: {r['error'][:80]} |||||")
            continue
        pe = r.get("peak_extra_bytes", "")
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['impl']} | {r['fwd_ms']:.4f} | {r['full_ms']:.4f} | "
                     f"{r['fwd_frac_copy']:.2f} | {r['full_frac_copy']:.2f} | {r.get('launches_full', '')} | "
                     f"{pe / 2**20 if isinstance(pe, int) else ''} |")
    (args.out / "sweep.md").write_text("\n".join(lines) + "\n\n```\n" + json.dumps(notes, indent=1, default=str)
                                       + "\n```\n")
    print("\n".join(lines))
    print(json.dumps(notes, indent=1, default=str))
    try:
        plot(args.out / "sweep.csv", args.out / "sweep.png",
             f"{notes['device']}, torch {notes['torch']}, triton {notes['triton']}, copy {bw / 1e9:.0f} GB/s")
    except Exception as exc:  # no matplotlib: the CSV and table are the results, the plot is a view of them
        print(f"plot skipped: {type(exc).__name__}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
