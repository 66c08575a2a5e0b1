"""Turn a results CSV into its markdown table and PNG plot (and, on CUDA, the issue's targets checked).

    python -m benchmarks.report benchmarks/results/<device-slug>.csv     # writes .md and .png beside it
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from benchmarks.cases import IMPLS, MODES, SHAPE_SETS
from benchmarks.results import read_rows
from benchmarks.train_step import TRAIN_STEP

SHAPE_ORDER = [s for shape_set in SHAPE_SETS.values() for s in shape_set]
MEMORY_SLACK_MIB = 1.0  # the per-sample partials, stats and ticket buffers (kilobytes) on top of the gradient


def _num(value):
    return float(value) if value not in (None, "") else None


def _ms(value):
    v = _num(value)
    return "" if v is None else (f"{v:.4g}" if v < 100 else f"{v:.0f}")


def _pct(value):
    v = _num(value)
    return "" if v is None else f"{100 * v:.1f}%"


def _ratio(a, b):
    a, b = _num(a), _num(b)
    return "" if not a or not b else f"{b / a:.2f}x"


def _shape_key(row):
    shape = row["shape"]
    return (SHAPE_ORDER.index(shape) if shape in SHAPE_ORDER else len(SHAPE_ORDER), shape)


def index_rows(rows):
    """{(op, shape, dtype): {(impl, mode): row}} for the op rows, in shape order."""
    table = defaultdict(dict)
    for row in sorted((r for r in rows if r["op"] != TRAIN_STEP), key=_shape_key):
        table[(row["op"], row["shape"], row["dtype"])][(row["impl"], row["mode"])] = row
    return table


def _distinct(rows, key):
    return ", ".join(sorted({r[key] for r in rows if r.get(key)})) or "-"


def header(rows) -> list[str]:
    op_rows = [r for r in rows if r["op"] != TRAIN_STEP]
    copy = sorted({f"{float(r['copy_gbps']):.1f}" for r in rows if r.get("copy_gbps")}, key=float)
    dims = sorted({(r["shape"], r["dims"]) for r in rows if r["op"] != TRAIN_STEP}, key=lambda s: _shape_key(
        {"shape": s[0]}))
    return [
        f"# ngkernels benchmarks: {_distinct(rows, 'device')}",
        "",
        f"- torch {_distinct(rows, 'torch')}, triton {_distinct(rows, 'triton')}, "
        f"ngkernels {_distinct(rows, 'ngkernels')}, commit {_distinct(rows, 'git_commit')}",
        f"- run (UTC): {_distinct(rows, 'date')}; timer: {_distinct(op_rows, 'timer')}; "
        f"1-min load average at start: {_distinct(rows, 'load_avg')}; torch threads: {_distinct(rows, 'threads')}",
        f"- device-to-device copy (bytes read + written), measured in the run: {', '.join(copy) or '-'} GB/s",
        "- shapes: " + ", ".join(f"{s} [{d.replace('x', ',')}]" for s, d in dims),
        "- minimal bytes of a full pass: each input (v and v_ref and/or target) read once + the gradient written "
        "once; bandwidth fraction = (minimal bytes / full-pass time) / copy bandwidth",
        "",
    ]


def full_pass_table(table) -> list[str]:
    lines = [
        "## Full pass (forward + backward), median ms",
        "",
        "| op | shape | dtype | ngkernels | eager | compile | ngk vs eager | ngk vs compile "
        "| BW ngk | BW eager | BW compile | launches ngk / eager / compile (kernels+memsets) "
        "| peak extra MiB ngk / eager / compile | grad MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for (op, shape, dtype), cells in table.items():
        full = {impl: cells.get((impl, "full"), {}) for impl in IMPLS}
        if not any(full.values()):
            continue
        ngk = full["ngkernels"].get("median_ms")

        def launches(r):
            if not r.get("launches_kernels"):
                return "-"
            return f"{r['launches_kernels']}+{r.get('launches_memsets') or 0}"

        grad = next((r["grad_mib"] for r in full.values() if r.get("grad_mib")), "")
        lines.append(
            f"| {op} | {shape} | {dtype} | " + " | ".join(_ms(full[i].get("median_ms")) for i in IMPLS)
            + f" | {_ratio(ngk, full['eager'].get('median_ms'))} | {_ratio(ngk, full['compile'].get('median_ms'))} | "
            + " | ".join(_pct(full[i].get("bw_fraction")) for i in IMPLS)
            + " | " + " / ".join(launches(full[i]) for i in IMPLS)
            + " | " + " / ".join(_ms(full[i].get("peak_extra_mib")) or "-" for i in IMPLS)
            + f" | {_ms(grad)} |")
    return lines + [""]


def mode_table(table) -> list[str]:
    lines = [
        "## Forward and backward, median ms",
        "",
        "| op | shape | dtype | mode | ngkernels | eager | compile |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for (op, shape, dtype), cells in table.items():
        for mode in MODES:
            if mode == "full" or not any((i, mode) in cells for i in IMPLS):
                continue
            lines.append(f"| {op} | {shape} | {dtype} | {mode} | "
                         + " | ".join(_ms(cells.get((i, mode), {}).get("median_ms")) for i in IMPLS) + " |")
    return lines + [""]


def cudagraph_table(table) -> list[str]:
    rows = [(key, cells) for key, cells in table.items() if any(r.get("cudagraph_ms") for r in cells.values())]
    if not rows:
        return []
    lines = [
        "## CUDA-graph replays (launch-bound shapes), median ms",
        "",
        "| op | shape | dtype | mode | ngkernels | eager | compile |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for (op, shape, dtype), cells in rows:
        for mode in ("forward", "full"):  # a retained graph's backward cannot be captured
            lines.append(f"| {op} | {shape} | {dtype} | {mode} | "
                         + " | ".join(_ms(cells.get((i, mode), {}).get("cudagraph_ms")) or "-" for i in IMPLS) + " |")
    notes = sorted({f"{r['impl']} {r['mode']} {r['shape']} {r['dtype']}: {r['notes']}"
                    for cells in table.values() for r in cells.values() if "cudagraph" in (r.get("notes") or "")})
    return lines + [""] + [f"- {n}" for n in notes] + ([""] if notes else [])


def train_step_overhead(rows):
    """[(shape, dtype, off_ms, on_ms, overhead)] from the end-to-end rows."""
    steps = defaultdict(dict)
    for r in rows:
        if r["op"] == TRAIN_STEP:
            steps[(r["shape"], r["dtype"])][r["impl"]] = _num(r["median_ms"])
    return [(shape, dtype, s["normguard_off"], s["normguard_on"], s["normguard_on"] / s["normguard_off"] - 1)
            for (shape, dtype), s in steps.items() if s.get("normguard_off") and s.get("normguard_on")]


def train_step_table(rows) -> list[str]:
    overheads = train_step_overhead(rows)
    if not overheads:
        return []
    notes = sorted({f"{r['impl']}: {r['notes']} (timer: {r['timer']})" for r in rows
                    if r["op"] == TRAIN_STEP and r.get("notes")})
    spread = {(r["shape"], r["dtype"], r["impl"]): f"{_ms(r['p20_ms'])}-{_ms(r['p80_ms'])}"
              for r in rows if r["op"] == TRAIN_STEP}
    lines = ["## One training step, NormGuard off vs on, median ms (p20-p80)", "",
             "| model | dtype | off | on | overhead |", "|---|---|---:|---:|---:|"]
    lines += [f"| {shape} | {dtype} | {_ms(off)} ({spread[shape, dtype, 'normguard_off']}) | "
              f"{_ms(on)} ({spread[shape, dtype, 'normguard_on']}) | {100 * o:+.2f}% |"
              for shape, dtype, off, on, o in overheads]
    return lines + [""] + [f"- {n}" for n in notes] + ([""] if notes else [])


def targets(rows) -> list[tuple[str, str, bool]]:
    """Issue 4's H100 targets for the fused fm+normguard op: (target, measured, holds)."""
    table = index_rows(rows)
    out = []

    def full(impl, shape, dtype):
        return table.get(("fm_normguard", shape, dtype), {}).get((impl, "full"), {})

    dtypes = sorted({r["dtype"] for r in rows if r["op"] == "fm_normguard"})
    for dtype in dtypes:
        for shape in ("XL", "M"):
            ngk, comp, eag = (full(i, shape, dtype) for i in ("ngkernels", "compile", "eager"))
            if not ngk:
                continue
            frac = _num(ngk.get("bw_fraction"))
            out.append((f"{shape} {dtype}: >= 90% of copy bandwidth", _pct(frac), frac is not None and frac >= 0.9))
            for name, peer, factor in (("torch.compile", comp, 1.5), ("eager", eag, 5.0)):
                if peer:
                    speedup = _num(peer["median_ms"]) / _num(ngk["median_ms"])
                    out.append((f"{shape} {dtype}: >= {factor}x faster than {name}", f"{speedup:.2f}x",
                                speedup >= factor))
        s = full("ngkernels", "S", dtype)
        if s.get("launches_kernels"):
            n = int(s["launches_kernels"]) + int(s.get("launches_memsets") or 0)
            out.append((f"S {dtype}: <= 2 launches per full pass", f"{n} ({s['kernel_names']})", n <= 2))
        f, xl = full("ngkernels", "F", dtype), full("ngkernels", "XL", dtype)
        if f.get("bw_fraction") and xl.get("bw_fraction"):
            ratio = float(xl["bw_fraction"]) / float(f["bw_fraction"])
            out.append((f"F {dtype}: bandwidth fraction within 1.3x of XL's",
                        f"F {_pct(f['bw_fraction'])} vs XL {_pct(xl['bw_fraction'])} ({ratio:.2f}x)", ratio <= 1.3))
        for shape in SHAPE_SETS["full"]:
            r = full("ngkernels", shape, dtype)
            if r.get("peak_extra_mib") and r.get("grad_mib"):
                peak, grad = float(r["peak_extra_mib"]), float(r["grad_mib"])
                out.append((f"{shape} {dtype}: peak extra memory <= gradient (+{MEMORY_SLACK_MIB:g} MiB)",
                            f"{peak:.2f} MiB vs {grad:.2f} MiB", peak <= grad + MEMORY_SLACK_MIB))
    for shape, dtype, _off, _on, overhead in train_step_overhead(rows):
        out.append((f"training step {shape} {dtype}: NormGuard adds <= 1%", f"{100 * overhead:+.2f}%",
                    overhead <= 0.01))
    return out


def targets_table(rows) -> list[str]:
    if not any(r["device_type"] == "cuda" for r in rows):
        return ["## Targets", "", "Issue 4's targets are for an H100; they are checked only in CUDA results.", ""]
    checked = targets(rows)
    lines = ["## Targets (issue 4, H100)", "", "| target | measured | holds |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in checked]
    return lines + [""]


def render_markdown(rows) -> str:
    table = index_rows(rows)
    lines = header(rows) + full_pass_table(table) + mode_table(table) + cudagraph_table(table)
    lines += train_step_table(rows) + targets_table(rows)
    notes = sorted({r["notes"] for r in rows if r["op"] != TRAIN_STEP and r.get("notes")
                    and "cudagraph" not in r["notes"]})
    methods = sorted({r["memory_method"] for r in rows if r.get("memory_method")})
    lines += ["## Notes", "", f"- peak extra memory: {', '.join(methods) or '-'} (allocations of one full pass "
              "above what was allocated before it, the gradient included)"]
    lines += [f"- {n}" for n in notes]
    if any((_num(r.get("bw_fraction")) or 0) > 1 for r in rows):
        lines.append("- a bandwidth fraction above 100% means the case's data stayed in caches that the large copy "
                     "(DRAM to DRAM) cannot use")
    return "\n".join(lines) + "\n"


def render_plot(rows, png_path: Path):
    """Full-pass time (log) and bandwidth fraction per shape/dtype, one bar per implementation, one row per op."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = index_rows(rows)
    ops = [op for op in ("fm_normguard", "normguard", "flow_matching") if any(k[0] == op for k in table)]
    fig, axes = plt.subplots(len(ops), 2, figsize=(14, 3.6 * len(ops)), squeeze=False)
    width = 0.8 / len(IMPLS)
    for row_axes, op in zip(axes, ops):
        keys = [k for k in table if k[0] == op]
        labels = [f"{shape}\n{dtype}" for _, shape, dtype in keys]
        for j, impl in enumerate(IMPLS):
            cells = [table[k].get((impl, "full"), {}) for k in keys]
            x = [i + (j - (len(IMPLS) - 1) / 2) * width for i in range(len(keys))]
            times = [_num(c.get("median_ms")) or 0.0 for c in cells]
            fractions = [100 * (_num(c.get("bw_fraction")) or 0.0) for c in cells]
            row_axes[0].bar(x, times, width, label=impl)
            row_axes[1].bar(x, fractions, width, label=impl)
        for ax, title in zip(row_axes, ("full pass time (ms, log)", "effective bandwidth (% of copy)")):
            ax.set_xticks(range(len(keys)), labels)
            ax.set_title(f"{op}: {title}")
            ax.grid(axis="y", alpha=0.3)
        row_axes[0].set_yscale("log")
        row_axes[0].legend()
    fig.suptitle(f"{_distinct(rows, 'device')} - torch {_distinct(rows, 'torch')}, triton {_distinct(rows, 'triton')}"
                 f", {_distinct(rows, 'date')}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def render(csv_path, md_path=None, png_path=None):
    csv_path = Path(csv_path)
    rows = read_rows(csv_path)
    if not rows:
        raise ValueError(f"{csv_path} has no rows")
    md_path = Path(md_path or csv_path.with_suffix(".md"))
    png_path = Path(png_path or csv_path.with_suffix(".png"))
    markdown = render_markdown(rows)
    if any(r["op"] != TRAIN_STEP for r in rows):
        try:
            render_plot(rows, png_path)
        except ImportError as err:  # the GPU image may lack matplotlib: say so, draw it later from the CSV
            markdown += f"- plot not drawn here ({err}); run `python -m benchmarks.report {csv_path.name}`\n"
            print(f"warning: {csv_path.with_suffix('.png').name} not drawn: {err}")
    md_path.write_text(markdown)
    return md_path, png_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", help="results CSV written by the benchmark suite")
    parser.add_argument("--md", help="markdown output (default: beside the CSV)")
    parser.add_argument("--png", help="plot output (default: beside the CSV)")
    args = parser.parse_args(argv)
    for path in render(args.csv, args.md, args.png):
        print(path)


if __name__ == "__main__":
    main()
