"""The regime study's state as one file, so that a study spread over sessions survives a fresh machine.

    python -m training.analysis.study.regime --steps B --stages ... --archive FILE     # write
    tar xzf FILE -C outputs/study14                                                    # restore, then go on

Why: the study runs for many hours in sessions of a few, and a session may start on a machine where the ignored
`outputs/` folder is gone (it happened on 2026-12-05: 16 finished FLUX runs were lost with their checkpoints).
The archive holds what the report and a continuation need, and little else:
- every run's config.yaml, metrics.csv, status.json and eval/*.json (the report's inputs);
- the latest checkpoint of a run that still needs it: one without status.json (unfinished: it resumes from
  there, `--resume`) or finished without its final evaluation (it is evaluated from there). A finished,
  evaluated run's checkpoints are left out, and so are the NormGuard-off runs' every-5-step checkpoints (15 MB
  per FLUX run); the early-stopping control evaluates one of them, which `--evaluate --replay` recreates;
- the same for each `<run>/replay` (training.analysis.study.evaluation.replay_and_evaluate);
- `reference/*.json` (the reference model's evaluation and the data floor).
The pretrained base models and the quality feature net are not in it: they are caches the runs rebuild (about
3 min each), the same up to float rounding on another machine (measured on 2026-12-05: the first 10 RL steps of a FLUX-toy
NFT run on a rebuilt cache and a new machine agree with the lost machine's log to 2e-6 relative in reward and
loss, 6e-8 in the norm ratio, 2e-5 in the gradient norm).

Archive a stopped study (kill the driver and its workers first): then every file is complete. As a safety net a
checkpoint is copied before it is packed, and a copy that loses the race with a newer checkpoint (a training run
replaces its checkpoint every 25 steps) is retried with that one, so an archive never holds half of one.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
from pathlib import Path

from training.analysis.study.evaluation import replay_dir
from training.analysis.study.jobs import run_status

RESULT_FILES = ("config.yaml", "metrics.csv", "status.json")


def needs_checkpoint(run_dir: Path) -> bool:
    """Unfinished (no status.json), or finished without the evaluation of its final checkpoint."""
    status = run_status(run_dir)
    return status is None or not (run_dir / "eval" / f"step-{status['steps']}.json").is_file()


def _copy_latest_checkpoint(run_dir: Path, into: Path, tries: int = 3) -> Path | None:
    """A copy of the run's latest complete checkpoint under `into` (same relative layout), or None if it has none."""
    from training.checkpoint import latest_checkpoint

    for _ in range(tries):
        latest = latest_checkpoint(run_dir)
        if latest is None:
            return None
        target = into / latest.name
        try:
            shutil.copytree(latest, target)
            return target
        except (FileNotFoundError, shutil.Error):  # replaced by a newer one while copied: take that one
            shutil.rmtree(target, ignore_errors=True)
    raise RuntimeError(f"{run_dir}: its checkpoints kept changing while archived; stop its training and retry")


def archive_members(run_dir: Path) -> list[Path]:
    """The run's result files (RESULT_FILES, eval/*.json) that exist."""
    found = [run_dir / name for name in RESULT_FILES if (run_dir / name).is_file()]
    return found + sorted((run_dir / "eval").glob("*.json"))


def write_archive(run_dirs: list[Path], out_dir: Path, path: Path) -> int:
    """Packs `run_dirs` (those that exist) and out_dir/reference into the .tgz `path`, paths relative to out_dir;
    -> the number of files. Written to a temporary name and renamed, so a failed archive leaves the old one."""
    out_dir, path = Path(out_dir), Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        count = _pack(run_dirs, out_dir, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return count


def _pack(run_dirs: list[Path], out_dir: Path, tmp: Path) -> int:
    count = 0
    with tempfile.TemporaryDirectory() as scratch, tarfile.open(tmp, "w:gz") as tar:
        def add(file: Path, arcname: Path) -> None:
            nonlocal count
            tar.add(file, arcname=str(arcname))
            count += 1

        for file in sorted((out_dir / "reference").glob("*.json")):
            add(file, file.relative_to(out_dir))
        for run_dir in map(Path, run_dirs):
            for folder in (run_dir, replay_dir(run_dir)):
                if not folder.is_dir():
                    continue
                rel = folder.relative_to(out_dir)
                for file in archive_members(folder):
                    add(file, file.relative_to(out_dir))
                if needs_checkpoint(folder):
                    copy = _copy_latest_checkpoint(folder, Path(scratch) / rel / "checkpoints")
                    for file in sorted(copy.rglob("*")) if copy else ():
                        if file.is_file():
                            add(file, rel / "checkpoints" / file.relative_to(copy.parent))
    return count
