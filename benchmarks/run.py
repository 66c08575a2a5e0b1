"""The benchmark suite without pytest-benchmark: same cases, same measurements, same CSV/markdown/plot.

For machines where pytest-benchmark is not installed (the GPU image). Times: `triton.testing.do_bench` on
CUDA (as in the pytest suite), perf_counter medians on CPU.

    python -m benchmarks.run --shapes full [--device cuda] [--results DIR] [--ops fm_normguard] [--dtypes bf16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import cases, harness, results, timers, train_step

try:
    from tqdm import tqdm
except ImportError:  # the GPU image may lack it: plain iteration, one line per case
    def tqdm(items, desc="", unit=""):
        for i, item in enumerate(items):
            print(f"{desc} {i + 1}/{len(items)} {unit}: {getattr(item, 'id', item)}", flush=True)
            yield item


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=tuple(cases.SHAPE_SETS), default="full")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--results", type=Path, default=None,
                        help="folder for <device>.csv/.md/.png (default: benchmarks/results; smoke: .benchmarks/smoke)")
    parser.add_argument("--ops", nargs="+", choices=tuple(cases.OPS), default=None)
    parser.add_argument("--impls", nargs="+", choices=cases.IMPLS, default=None)
    parser.add_argument("--dtypes", nargs="+", choices=tuple(cases.DTYPES), default=None)
    parser.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (default: torch's)")
    parser.add_argument("--max-time", type=float, default=1.0, help="CPU: seconds of timed rounds per case")
    parser.add_argument("--train-step-rounds", type=int, default=30,
                        help="alternated training steps per NormGuard setting (0: skip the end-to-end step)")
    args = parser.parse_args(argv)

    device = cases.resolve_device(args.device)
    cases.check_timed_backend(device)
    harness.set_threads(args.threads)
    env = results.environment(device)
    copy_gbps = timers.copy_bandwidth_gbps(device)
    print(f"{env['device']}: device-to-device copy {copy_gbps:.1f} GB/s")

    def timer(fn):
        if device.type == "cuda":
            return timers.time_cuda(fn)
        return timers.time_perf_counter(fn, max_time_s=args.max_time)

    recorder = harness.Recorder(args.results or results.default_results_dir(args.shapes))
    selected = cases.cases(args.shapes, ops=args.ops, impls=args.impls, dtypes=args.dtypes)
    for case in tqdm(selected, desc="benchmarks", unit="case"):
        if case.mode == "full" and case.impl != "eager":
            cases.check_agreement(case, device)
        recorder.add(harness.measure(case, device, env, copy_gbps, timer))
    if args.train_step_rounds > 0:
        reason = train_step.unavailable_reason()
        if reason:
            print(f"training step not measured: {reason}")
        else:
            for row in train_step.measure(device, env, rounds=args.train_step_rounds):
                recorder.add(row)
    for path in recorder.finish().values():
        print(path)


if __name__ == "__main__":
    main()
