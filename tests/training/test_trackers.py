"""log.trackers: a tracker whose package is missing is a config error before any work (monkeypatched import),
and a real wandb run with WANDB_MODE=offline writes a local run holding the metrics and the sample grids."""

from __future__ import annotations

import importlib.util
import sys
import time

import numpy as np
import pytest

from training.__main__ import main
from training.loop import Trainer
from training.tracking import accelerate_trackers, check_trackers


@pytest.mark.parametrize("tracker, package", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_a_missing_tracker_package_is_a_config_error_before_any_work(monkeypatch, capsys, tmp_path, tracker,
                                                                     package):
    monkeypatch.setitem(sys.modules, package, None)  # `import <package>` now raises ImportError
    with pytest.raises(ValueError, match=f"the '{tracker}' tracker needs the Python package '{package}'.*pip install"):
        check_trackers(["csv", tracker])
    with pytest.raises(ValueError, match=package):
        accelerate_trackers(["csv", tracker], tmp_path, "run")
    code = main([f"log.output_dir={tmp_path}", f"log.trackers=[csv,{tracker}]"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"pip install {package}" in err, err
    assert not any(tmp_path.iterdir())  # nothing was created: no model built, no run directory


def test_csv_alone_needs_no_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    check_trackers(["csv"])
    assert accelerate_trackers(["csv"], "unused", "run") == []


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason="wandb is an optional extra (pip install -e '.[wandb]'); its missing-package path is "
                           "tested above")
def test_wandb_offline_run_holds_the_metrics_and_the_sample_grids(toy_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = toy_cfg("train.steps=2", "eval.every=1", "eval.grid_prompts=3", "log.trackers=[csv,tensorboard,wandb]")
    Trainer(cfg).run()
    runs = list((cfg.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    (record,) = runs[0].glob("run-*.wandb")
    keys = (b"eval_reward", b"norm_ratio", b"reward_mean", b"samples")
    deadline = time.time() + 60  # wandb's service process writes the record; under load it may lag finish()
    while not all(k in record.read_bytes() for k in keys) and time.time() < deadline:
        time.sleep(0.5)
    data = record.read_bytes()
    for key in keys:
        assert key in data, key
    from PIL import Image

    media = sorted((runs[0] / "files" / "media" / "images").glob("samples_*.png"))
    assert len(media) == 3  # one grid per evaluation: steps 0, 1, 2
    grid = np.asarray(Image.open(cfg.run_dir / "samples" / "step-000002.png"))
    assert {np.asarray(Image.open(p)).shape for p in media} == {grid.shape}
    assert any(np.array_equal(np.asarray(Image.open(p)), grid) for p in media)  # the very grid of step 2
    for p in media:
        assert p.relative_to(runs[0] / "files").as_posix().encode() in data  # referenced by the run's history
