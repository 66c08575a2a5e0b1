"""The benchmark suite cannot rot: run it in smoke mode (one tiny shape) on CPU and check what it writes.

The suite lives in benchmarks/ (not collected by `python -m pytest`); here it runs as a subprocess the way a
user runs it, with its own results folder so the committed results are never touched.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import cases, report, results, train_step

REPO = Path(__file__).resolve().parents[2]
SMOKE_CASES = len(cases.cases("smoke"))


def run(args, tmp_path, timeout=240):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NGKERNELS_BACKEND")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # one compile thread: on a 2-core CI machine a worker pool makes a cold Inductor compile 3x slower
    env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    out = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_rows(rows, ops=None, impls=None):
    expected = {(c.op, c.impl, c.mode, c.shape, c.dtype) for c in cases.cases("smoke", ops=ops, impls=impls)}
    assert {(r["op"], r["impl"], r["mode"], r["shape"], r["dtype"]) for r in rows} == expected
    for r in rows:
        assert r["device"].startswith("CPU (") and r["torch"] == __import__("torch").__version__ and r["date"]
        assert math.isfinite(float(r["median_ms"])) and float(r["median_ms"]) > 0
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        if r["mode"] == "full":
            # 4 tensors (fm_normguard) or 3 of 4*3*8*8 elements, read or written once
            n_tensors = 4 if r["op"] == "fm_normguard" else 3
            element = 2 if r["dtype"] == "bf16" else 4
            assert int(r["min_bytes"]) == n_tensors * 4 * 3 * 8 * 8 * element
            assert 0 < float(r["bw_fraction"]) and float(r["copy_gbps"]) > 0
            # the gradient alone is allocated during a full pass, so the peak is at least its size
            assert float(r["peak_extra_mib"]) >= float(r["grad_mib"]) > 0
            assert r["launches_kernels"] == "" and "no kernel launches on CPU" in r["notes"]
        else:
            assert r["bw_fraction"] == "" and r["peak_extra_mib"] == ""


def test_pytest_benchmark_suite_smoke(tmp_path):
    pytest.importorskip("pytest_benchmark", reason="the suite's declared tool (test extra); run.py covers its absence")
    out = run(["-m", "pytest", "benchmarks", "--benchmark-enable", "--bench-shapes=smoke", "--bench-device=cpu",
               f"--bench-results={tmp_path}", "--bench-max-time=0.05", "--bench-threads=1", "-q", "-p", "no:cacheprovider",
               "--benchmark-columns=median,rounds"],
              tmp_path)
    train_step_runs = train_step.unavailable_reason() is None
    assert f"{SMOKE_CASES + train_step_runs} passed" in out.stdout
    slug = results.device_slug(results.device_name(__import__("torch").device("cpu")))
    rows = read_csv(tmp_path / f"{slug}.csv")
    check_rows([r for r in rows if r["op"] != report.TRAIN_STEP])
    assert {r["timer"] for r in rows if r["op"] != report.TRAIN_STEP} == {"pytest-benchmark"}
    markdown = (tmp_path / f"{slug}.md").read_text()
    if train_step_runs:
        steps = [r for r in rows if r["op"] == report.TRAIN_STEP]
        assert [r["impl"] for r in steps] == ["normguard_off", "normguard_on"]
        assert all(float(r["median_ms"]) > 0 for r in steps)
        assert "## One training step, NormGuard off vs on, median ms (p20-p80)" in markdown
    assert "## Full pass (forward + backward)" in markdown and "checked only in CUDA results" in markdown
    for op in cases.OPS:
        assert f"| {op} | tiny | bf16 |" in markdown and f"| {op} | tiny | fp32 |" in markdown
    png = (tmp_path / f"{slug}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_plain_runner_writes_the_same_csv(tmp_path):
    """The fallback for machines without pytest-benchmark (the GPU image may lack it); compile left out for time."""
    run(["-m", "benchmarks.run", "--shapes", "smoke", "--device", "cpu", "--results", str(tmp_path),
         "--ops", "fm_normguard", "--impls", "ngkernels", "eager", "--max-time", "0.05", "--threads", "1",
         "--train-step-rounds", "0"], tmp_path)
    (csv_path,) = tmp_path.glob("*.csv")
    rows = read_csv(csv_path)
    assert list(rows[0]) == list(results.CSV_COLUMNS)
    check_rows(rows, ops=["fm_normguard"], impls=["ngkernels", "eager"])
    assert {r["timer"] for r in rows} == {"perf_counter"}
    assert csv_path.with_suffix(".md").exists() and csv_path.with_suffix(".png").exists()


def test_interpreter_is_never_timed(monkeypatch):
    monkeypatch.setenv("NGKERNELS_BACKEND", "triton")
    from ngkernels import functional

    monkeypatch.setattr(functional, "triton_interpreted", lambda: True)
    with pytest.raises(ValueError, match="never timed"):
        cases.check_timed_backend(__import__("torch").device("cpu"))


def cuda_row(op, impl, shape, dtype, ms, fraction, **extra):
    row = dict.fromkeys(results.CSV_COLUMNS, "")
    row.update(device="NVIDIA H100 80GB HBM3", device_type="cuda", op=op, impl=impl, mode="full", shape=shape,
               dims="1x1", dtype=dtype, median_ms=str(ms), bw_fraction=str(fraction), copy_gbps="3000")
    row.update({k: str(v) for k, v in extra.items()})
    return row


def test_targets_are_judged_from_cuda_rows():
    """The H100 targets are only checked on a GPU; their logic is checked here on made-up rows."""
    rows = [
        cuda_row("fm_normguard", "ngkernels", "XL", "bf16", 1.0, 0.92, peak_extra_mib=64.1, grad_mib=64),
        cuda_row("fm_normguard", "compile", "XL", "bf16", 1.4, 0.66),
        cuda_row("fm_normguard", "eager", "XL", "bf16", 6.0, 0.15),
        cuda_row("fm_normguard", "ngkernels", "S", "bf16", 0.01, 0.3, launches_kernels=3, launches_memsets=0,
                 kernel_names="a;b;c", peak_extra_mib=9.0, grad_mib=4, cudagraph_ms=0.004),
        cuda_row("fm_normguard", "ngkernels", "F", "bf16", 0.02, 0.8),
        dict(cuda_row("train_step", "normguard_off", "toy", "bf16", 100.0, ""), mode="step"),
        dict(cuda_row("train_step", "normguard_on", "toy", "bf16", 100.5, ""), mode="step"),
    ]
    verdicts = {target: holds for target, _, holds in report.targets(rows)}
    assert verdicts["XL bf16: >= 90% of copy bandwidth"] is True
    assert verdicts["XL bf16: >= 1.5x faster than torch.compile"] is False  # 1.4x
    assert verdicts["XL bf16: >= 5.0x faster than eager"] is True
    assert verdicts["S bf16: <= 2 launches per full pass"] is False
    assert verdicts["F bf16: bandwidth fraction within 1.3x of XL's"] is True  # 0.92 / 0.8 = 1.15
    assert verdicts["XL bf16: peak extra memory <= gradient (+1 MiB)"] is True
    assert verdicts["S bf16: peak extra memory <= gradient (+1 MiB)"] is False
    assert verdicts["training step toy bf16: NormGuard adds <= 1%"] is True
    markdown = report.render_markdown(rows)
    assert "| XL bf16: >= 1.5x faster than torch.compile | 1.40x | **no** |" in markdown
    assert "| fm_normguard | S | bf16 | full | 0.004 | - | - |" in markdown  # the CUDA-graph table
