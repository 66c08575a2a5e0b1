"""`python -m training.analysis.study`: the command line of the study (training.analysis.study.run)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from training.analysis.study import __doc__ as STUDY_DOC
from training.analysis.study.grid import StudySettings
from training.analysis.study.run import run_study


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.analysis.study", description=STUDY_DOC.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny toy and budget (minutes; for tests, not results)")
    parser.add_argument("--out", default="outputs/study", help="output directory (default: outputs/study)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--samples-per-prompt", type=int, default=None, help="evaluation images per caption")
    parser.add_argument("--seeds", default=None, help="comma-separated training seeds (default 0,1; --quick: 0)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep every per-step checkpoint (default: only the final and matched ones)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = parser.parse_args(argv)
    settings = StudySettings.quick() if args.quick else StudySettings()
    settings = replace(settings, overrides=[*settings.overrides, *args.overrides], workers=args.workers,
                       keep_checkpoints=args.keep_checkpoints)
    if args.samples_per_prompt is not None:
        settings = replace(settings, samples_per_prompt=args.samples_per_prompt)
    if args.seeds is not None:
        try:
            settings = replace(settings, seeds=tuple(int(x) for x in args.seeds.split(",") if x.strip()))
        except ValueError:
            parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if settings.workers < 1:
        parser.error("--workers must be >= 1")
    try:
        path = run_study(args.out, settings,
                         command=" ".join(["python -m training.analysis.study",
                                           *(argv if argv is not None else sys.argv[1:])]))
    except ValueError as err:
        print(f"study error: {err}", file=sys.stderr)
        return 2
    print(path.read_text())
    print(f"written: {path}")
    return 0
