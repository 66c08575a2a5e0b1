"""Where the time goes: nested sections count each second once, and a run's CSV rows and summary carry the split
(rollout, reward, loss+backward, optimizer, evaluation, checkpoint)."""

from __future__ import annotations

import math
import time

import pytest

from training.loop import Trainer
from training.timing import COLUMNS, StepTimer
from training.tracking import read_csv


def test_nested_sections_are_exclusive():
    timer = StepTimer()
    with timer("rollout"):
        time.sleep(0.05)
        with timer("reward"):
            time.sleep(0.1)
    with timer("loss_backward"):
        with timer("optimizer"):
            time.sleep(0.03)
    row = timer.pop()
    assert row["time/reward"] == pytest.approx(0.1, abs=0.03)
    assert row["time/rollout"] == pytest.approx(0.05, abs=0.03)  # its nested reward is not counted twice
    assert row["time/optimizer"] == pytest.approx(0.03, abs=0.02) and row["time/loss_backward"] < 0.02
    assert timer.pop()["time/reward"] == 0.0  # pop starts the next step from zero
    assert "reward 0.0" in timer.summary() and "(mean over 2 steps)" in timer.summary()
    with pytest.raises(ValueError, match="unknown timing section"):
        with timer("nap"):
            pass


def test_a_run_logs_seconds_per_step_and_section(toy_cfg):
    cfg = toy_cfg("train.steps=2", "eval.every=1")
    summary = Trainer(cfg).run()
    rows = read_csv(cfg.run_dir / "metrics.csv")
    for r in rows:
        parts = [r[c] for c in COLUMNS]
        assert all(math.isfinite(p) and p >= 0 for p in parts)
        assert r["time/rollout"] > 0 and r["time/reward"] > 0 and r["time/loss_backward"] > 0
        assert r["time/optimizer"] > 0 and r["time/eval"] > 0
        assert sum(parts) - r["time/checkpoint"] <= r["seconds"] + 0.01  # the checkpoint ran after the step
    assert rows[0]["time/checkpoint"] == 0 and rows[1]["time/checkpoint"] > 0  # step 1's checkpoint, in row 2
    line = next(x for x in summary.lines() if x.startswith("time per step"))
    for label in ("rollout", "reward", "loss+backward", "optimizer", "evaluation", "checkpoint"):
        assert label in line
