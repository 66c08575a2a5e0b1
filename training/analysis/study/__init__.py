"""The NormGuard study on the embedded toy, in one command:

    python -m training.analysis.study [--quick] [--out DIR] [--workers N] [--seeds 0,1] [key=value ...]

1. Trains the grid {nft, awm, dpo} x {NormGuard off, on} x seeds from training/configs/toy.yaml (per seed the
   same seed and budget for all; "off" is normguard.ng_lambda=0, "on" the config's NormGuard settings as they
   are), with a checkpoint and the trainer's evaluation (fixed noise) at every step.
2. Early-stopping control, per method and seed: the NormGuard-off run is taken at its first checkpoint whose
   evaluation reward (trailing mean over `match_window` steps) reaches the NormGuard-on run's final value, so
   the two are also compared at matched reward (if it never does: its best checkpoint, flagged).
3. Evaluates the reference, every final checkpoint and every matched checkpoint with the same instruments and
   the same evaluation noise: reward, norm inflation along the policy's own trajectory, the reward-free quality
   proxy (Frechet distance to the toy's data in a toy-trained CNN's features, attribute accuracy), few-step
   sampling, the renormalisation baseline, and the adjoint sensitivity's batch coherence.
4. Writes study.md (tables), study.csv and friends, and plots into --out.

Layout: grid.py (the runs and settings), jobs.py (worker-process jobs), matching.py (the early-stopping
control), run.py (run_study, end to end), report.py (CSV files and study.md), plots.py, cli.py (the command).

The toy is not tuned for any outcome: the study uses the embedded default's config (with the study's training
budget, STUDY_OVERRIDES) and reports what it measures. Runs and evaluations are spread over `--workers`
processes (the toy trains single-threaded, so 2 workers use 2 cores).
"""

from __future__ import annotations

from training.analysis.study.grid import METHODS, NG_STATES, StudySettings
from training.analysis.study.matching import match_checkpoint
from training.analysis.study.report import adjoint_renorm_prediction
from training.analysis.study.run import run_study

__all__ = ["METHODS", "NG_STATES", "StudySettings", "match_checkpoint", "adjoint_renorm_prediction", "run_study"]
