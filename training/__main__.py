"""`python -m training [--config FILE] [--resume [CHECKPOINT]] [--print-config] [--dry-run] [key=value ...]`
(console script: ngk-train).

With no arguments it runs the embedded default (training/configs/toy.yaml): pretrain the toy reference
(cached), RL post-train it with NFT + NormGuard, print a summary. Multi-process:
`accelerate launch --num_processes 2 --cpu -m training ...` (or a config from training/configs/accelerate/).

User errors (a bad argument, an unknown or ill-typed config key, a missing checkpoint, prompt file, model
folder or tracker package) are one line on stderr and exit code 2, never a traceback: `CliError` and every
`ValueError` raised while the run is set up (config, trackers, Trainer construction) are reported that way.
Errors once training has started are bugs or hardware problems and keep their traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = [  # every one of these is run by tests/test_readme.py
    "python -m training",
    "python -m training method.name=awm normguard.ng_lambda=0.5 log.run_name=awm",
    "python -m training --config sd35m_nft_pickscore model.path=/models/stable-diffusion-3.5-medium "
    "reward.kwargs.path=/models/PickScore_v1 rollout.prompt_file=prompts.txt --dry-run",
    "python -m training --resume train.steps=60",
    "python -m training log.trackers=[csv,tensorboard,wandb]",
]


class CliError(Exception):
    """A user error of the command line: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message over two lines; one line is enough
        raise CliError(f"{message} (see python -m training --help)")


def _split_resume(argv: list[str]) -> list[str]:
    """`--resume key=value` means "resume, and override key": the optional CHECKPOINT of --resume is never a
    key=value override. argparse would take the override as the checkpoint, so a bare --resume followed by an
    override moves to the end of the command line, where it has no value to swallow."""
    out, resume_flags = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if arg == "--resume" and nxt is not None and "=" in nxt and not nxt.startswith("-") \
                and not Path(nxt).exists():
            resume_flags.append(arg)
        elif arg.startswith("--resume=") and "=" in arg[len("--resume="):] and \
                not Path(arg[len("--resume="):]).exists():
            out.append(arg[len("--resume="):])
            resume_flags.append("--resume")
        else:
            out.append(arg)
        i += 1
    return out + resume_flags


def parse_args(argv=None):
    parser = _Parser(
        prog="python -m training",
        description="RL post-training of flow-matching models (NFT / AWM / DPO / GRPO + NormGuard).",
        epilog="examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file (default: training/configs/toy.yaml); a bare "
                                                       "name is looked up in training/configs/")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="continue from the run directory's latest checkpoint (or the given checkpoint "
                             "folder); an argument containing '=' after it is an override, not a CHECKPOINT")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="resolve the config and check what can be checked without loading a model (trackers, "
                             "prompts, the checkpoint to resume), print the run directory and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    argv = list(sys.argv[1:] if argv is None else argv)
    return parser.parse_intermixed_args(_split_resume(argv))  # overrides may come before and after options


def _user_error(err: BaseException, kind: str = "error") -> int:
    text = " ".join(str(err).split())  # one line, whatever the message
    print(f"{kind}: {text}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        from training.config import load_config

        try:
            cfg = load_config(args.config, args.overrides)
            if args.print_config:
                import yaml

                print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
                return 0
            from training.tracking import check_trackers

            check_trackers(cfg.log.trackers)
        except ValueError as err:
            return _user_error(err, "config error")
        if args.dry_run:
            return _dry_run(cfg, args.resume)
        from training.loop import Trainer

        trainer = Trainer(cfg, resume=args.resume)
    except (CliError, ValueError) as err:
        return _user_error(err)
    summary = trainer.run()
    if trainer.accelerator.is_main_process:
        print("\n".join(["", "=== summary ===", *summary.lines()]))
    return 0


def _dry_run(cfg, resume) -> int:
    """The checks that need no model: the prompt pool (file readable, not empty), the reward name, the checkpoint
    --resume would continue from. Prints what the run would do."""
    from training.checkpoint import resume_checkpoint
    from training.guards import check_prompt_file
    from training.prompts import prompt_pool

    check_prompt_file(cfg.rollout.prompt_file)
    prompts = prompt_pool(cfg)
    path = resume_checkpoint(cfg.run_dir, resume)  # the Trainer's choice and its one-line error
    start = f"resume from {path}" if path is not None else "fresh run"
    print(f"dry run: config OK; {start}; {cfg.model.type} model, method {cfg.method.name}, {cfg.train.steps} "
          f"steps, {len(prompts)} prompts, trackers {cfg.log.trackers}; would write to {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
