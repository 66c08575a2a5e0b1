"""`python -m training [--config FILE] [--resume [CHECKPOINT]] [key=value ...]` (console script: ngk-train).

With no arguments it runs the embedded default (training/configs/toy.yaml): pretrain the toy reference
(cached), RL post-train it with NFT + NormGuard, print a summary. Multi-process:
`accelerate launch --num_processes 2 --cpu -m training ...` (or a config from training/configs/accelerate/).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="RL post-training of flow-matching models (NFT / AWM / DPO + NormGuard).",
        epilog="examples:\n  python -m training\n  python -m training method.name=awm normguard.ng_lambda=0.5\n"
               "  python -m training --config training/configs/sd3_nft.yaml model.path=/models/sd3.5-medium\n"
               "  python -m training --resume train.steps=60",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file (default: training/configs/toy.yaml); a bare "
                                                       "name is looked up in training/configs/")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="continue from the run directory's latest checkpoint (or the given one)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from training.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from training.loop import Trainer

    trainer = Trainer(cfg, resume=args.resume)
    summary = trainer.run()
    if trainer.accelerator.is_main_process:
        print("\n".join(["", "=== summary ===", *summary.lines()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
