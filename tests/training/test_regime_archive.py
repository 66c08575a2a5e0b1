"""The regime study's archive (training.analysis.study.archive): what a fresh machine needs to go on, and only
that. A run killed after a checkpoint, archived, restored elsewhere and continued logs what an uninterrupted run
logs; a finished and evaluated run travels without its checkpoints."""

from __future__ import annotations

import json
import shutil
import tarfile

from tests.training.conftest import toy_overrides
from training.analysis.study import regime
from training.analysis.study.archive import write_archive
from training.analysis.study.evaluation import replay_dir
from training.analysis.study.regime import RunSpec, build_config, train_run
from training.tracking import read_csv


def test_a_restored_study_continues_exactly(tmp_path, toy_cache, monkeypatch):
    monkeypatch.setattr(regime, "OFF_CHECKPOINT_EVERY", 1)
    tiny = [o for o in toy_overrides("unused", toy_cache) if not o.startswith("log.")]
    killed = RunSpec("test", "killed", "toy.yaml", (*tiny, "normguard.ng_lambda=0"), True, 0)
    done = RunSpec("test", "done", "toy.yaml", (*tiny, "normguard.ng_lambda=0"), True, 1)
    study = tmp_path / "study"
    cfg_killed, _ = build_config(killed, 2, study)
    train_run(cfg_killed.to_dict())
    (cfg_killed.run_dir / "status.json").unlink()  # killed after its step-2 checkpoint, before finishing
    cfg_done, _ = build_config(done, 2, study)
    train_run(cfg_done.to_dict())
    (cfg_done.run_dir / "eval").mkdir()
    (cfg_done.run_dir / "eval" / "step-2.json").write_text(json.dumps({"label": "done"}))
    replay = replay_dir(cfg_done.run_dir)  # a replay under way (--evaluate --replay) travels like an unfinished run
    shutil.copytree(cfg_done.run_dir / "checkpoints" / "step-2", replay / "checkpoints" / "step-2")
    shutil.copy(cfg_done.run_dir / "metrics.csv", replay / "metrics.csv")
    (study / "reference").mkdir()
    (study / "reference" / "data.json").write_text("{}")

    archive = tmp_path / "state.tgz"
    count = write_archive([cfg_killed.run_dir, cfg_done.run_dir, study / "runs" / "never-started"], study, archive)
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        tar.extractall(tmp_path / "restored", filter="data")
    assert len(names) == count
    killed_rel, done_rel = (str(c.run_dir.relative_to(study)) for c in (cfg_killed, cfg_done))
    assert f"{killed_rel}/checkpoints/step-2/model.safetensors" in names  # it resumes from there
    assert not any(n.startswith(f"{killed_rel}/checkpoints/step-1") for n in names)  # only the latest
    assert not any(n.startswith(f"{done_rel}/checkpoints") for n in names)  # finished and evaluated
    assert {f"{done_rel}/eval/step-2.json", f"{done_rel}/status.json", "reference/data.json"} <= names
    assert {f"{done_rel}/replay/metrics.csv", f"{done_rel}/replay/checkpoints/step-2/model.safetensors"} <= names

    restored, _ = build_config(killed, 3, tmp_path / "restored")
    status = train_run(restored.to_dict())
    assert status["resumed"] and status["steps"] == 3
    straight, _ = build_config(killed, 3, tmp_path / "straight")
    train_run(straight.to_dict())
    a, b = read_csv(restored.run_dir / "metrics.csv"), read_csv(straight.run_dir / "metrics.csv")
    assert [r["step"] for r in a] == [1, 2, 3]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
