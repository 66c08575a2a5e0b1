"""The study's grid: {nft, awm, dpo} x NormGuard {off, on} x seeds, its settings and the keys of its runs.

Per seed every run has the same seed and budget; "off" is normguard.ng_lambda=0, "on" the config's NormGuard
settings as they are. Every run writes a checkpoint and the trainer's evaluation (fixed noise) at every step,
for the early-stopping control (training.analysis.study.matching).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

METHODS = ("nft", "awm", "dpo")
NG_STATES = ("off", "on")
REFERENCE = ("reference", "", "", "reference")  # evaluation key (method, ng, seed, checkpoint) of the reference

# --quick: a tiny toy and a tiny budget, for the tests and a smoke test (under a minute; not a result)
QUICK_OVERRIDES = [
    "model.toy.image_size=8", "model.toy.num_layers=1", "model.toy.num_attention_heads=2",
    "model.toy.attention_head_dim=8", "model.toy.pretrain_steps=150", "model.toy.pretrain_batch_size=32",
    "sampling.num_steps=4", "rollout.prompts_per_step=4", "rollout.group_size=4", "train.steps=3",
    "train.batch_size=16", "eval.num_prompts=4", "eval.samples_per_prompt=1",
]


# The study's training budget, fixed before any study result was seen: the embedded demo's 30 steps stop while
# its reward is still climbing, and 100 steps x 12 runs (2 seeds) fit the 30-minute / 2-core budget.
STUDY_OVERRIDES = ["train.steps=100"]


@dataclass
class StudySettings:
    overrides: list[str] = field(default_factory=lambda: list(STUDY_OVERRIDES))  # on top of configs/toy.yaml
    samples_per_prompt: int = 16  # evaluation images per toy caption (16 captions)
    adjoint_samples_per_prompt: int = 4
    few_steps: tuple[int, ...] = (2, 4, 8)
    rescale_phis: tuple[float, ...] = (0.5, 1.0)
    feature_steps: int = 300  # feature-net training steps
    num_reference: int = 2048  # data images for the Frechet distance's reference statistics
    match_window: int = 3
    seeds: tuple[int, ...] = (0, 1)
    workers: int = 2
    keep_checkpoints: bool = False  # True: keep every per-step checkpoint (else only final and matched)
    eval_seed: int = 1000

    @classmethod
    def quick(cls) -> "StudySettings":
        return cls(overrides=list(QUICK_OVERRIDES), samples_per_prompt=2, adjoint_samples_per_prompt=1,
                   few_steps=(2,), rescale_phis=(1.0,), feature_steps=40, num_reference=256, seeds=(0,))


def run_configs(base_overrides: list[str], out_dir: Path, seeds: tuple[int, ...]) -> dict:
    """(method, "off"/"on", seed) -> Config. Per seed the same seed and budget for all; a checkpoint and the
    trainer's evaluation (fixed noise, the policy's own samples) every step, for the matched-reward control."""
    from training.config import load_config
    from training.toy import is_toy

    base = load_config(None, base_overrides)
    if not is_toy(base.model.type):
        raise ValueError(f"the study runs on an embedded toy (model.type=toy or toy_flux), got {base.model.type!r}")
    if base.normguard.ng_lambda <= 0:
        raise ValueError("the base config must have NormGuard on (normguard.ng_lambda > 0); 'off' sets it to 0")
    if not seeds:
        raise ValueError("need at least one seed")
    steps = base.train.steps
    cfgs = {}
    for seed in seeds:
        for method in METHODS:
            for ng in NG_STATES:
                overrides = [*base_overrides, f"method.name={method}", f"train.seed={seed}",
                             f"log.output_dir={out_dir / 'runs'}", f"log.run_name={method}_ng-{ng}_seed-{seed}",
                             "log.checkpoint_every=1", f"log.keep_checkpoints={steps}", "log.progress=false",
                             "log.trackers=[csv]", "eval.grid_prompts=0", "eval.every=1"]
                if ng == "off":
                    overrides.append("normguard.ng_lambda=0")
                cfgs[(method, ng, seed)] = load_config(None, overrides)
    return cfgs


def label(method, ng, seed, which) -> str:
    if method == "reference":
        return "reference"
    return f"{method} NG-{ng} s{seed}" + ("" if which == "final" else " (matched)")


def run_keys(rows):
    """The (method, ng, seed, checkpoint) keys of the evaluation rows, in first-seen order."""
    return list(dict.fromkeys((r["method"], r["normguard"], r["seed"], r["checkpoint"]) for r in rows))


def ng_description(cfg) -> str:
    """The NormGuard settings of a config, as the report names them."""
    ng = cfg.normguard
    form = "relative" if ng.relative else "absolute"
    return (f"lambda={ng.ng_lambda:g}, {form}{', squared' if ng.squared else ''}, margin={ng.margin:g}"
            f"{', per-token' if ng.per_token else ''}")
