"""End to end: one training step of the trainer's toy model and method, NormGuard off vs on (overhead in %)."""

from __future__ import annotations

import math

import pytest

from benchmarks import train_step

ROUNDS = {"smoke": (2, 1), "full": (30, 3)}  # (alternated steps per setting, warm-up steps)


def test_train_step_normguard_overhead(bench_device, bench_env, recorder, pytestconfig):
    reason = train_step.unavailable_reason()
    if reason:
        pytest.skip(reason)
    rounds, warmup = ROUNDS[pytestconfig.getoption("bench_shapes")]
    rows = train_step.measure(bench_device, bench_env, rounds=rounds, warmup=warmup)
    for row in rows:
        recorder.add(row)
    assert [r["impl"] for r in rows] == ["normguard_off", "normguard_on"]
    assert all(math.isfinite(r["median_ms"]) and r["median_ms"] > 0 for r in rows)
