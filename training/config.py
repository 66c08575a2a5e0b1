"""One dataclass tree for a whole run; YAML files under training/configs/; `key=value` dotted overrides.

    cfg = load_config("training/configs/toy.yaml", ["method.name=awm", "normguard.ng_lambda=0.1"])

Every key is checked against the tree and every value against its field's type (and range) before any
work starts: an unknown key or a bad value is a ValueError that names the key and, for a typo, the
closest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TRACKERS = ("csv", "tensorboard", "wandb")  # log.trackers: csv is always on (training.tracking)
DEFAULT_CONFIG = CONFIG_DIR / "toy.yaml"


@dataclass
class ToyConfig:
    """The embedded default's tiny SD3-architecture transformer, its synthetic data and its pretraining."""

    image_size: int = 16  # pixels (the toy works in pixel space: 3 channels, values in [-1, 1])
    patch_size: int = 4  # 16 tokens of 4x4x3 values: the inner width must exceed 48 to carry the noise through
    num_layers: int = 2
    num_attention_heads: int = 4
    attention_head_dim: int = 16
    pretrain_steps: int = 800
    pretrain_batch_size: int = 64
    pretrain_lr: float = 1e-3
    caption_dropout: float = 0.1  # captions dropped to the empty prompt, so CFG works
    cache_dir: str = "outputs/cache"  # pretrained reference weights, keyed by a hash of this section


@dataclass
class ModelConfig:
    type: str = "toy"  # a key of training.models.MODELS: toy | toy_flux | sd3 | flux
    path: str = ""  # local diffusers pipeline folder (sd3 / flux)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # frozen weights' dtype
    resolution: int = 512  # image size for sd3 / flux
    max_sequence_length: int = 256  # T5 tokens for sd3 / flux
    free_text_encoders: bool = False  # sd3 / flux: encode the fixed prompt pool once, then drop the text encoders
    guidance: float = 3.5  # flux: distilled guidance embedded by FLUX.1-dev (ignored by schnell)
    toy: ToyConfig = field(default_factory=ToyConfig)


@dataclass
class FinetuneConfig:
    mode: Literal["lora", "full"] = "lora"
    lora_r: int = 8
    lora_alpha: float = 16.0
    target_modules: list[str] = field(default_factory=list)  # empty: the model's attention projections
    init_lora_weights: Literal["gaussian", "default"] = "gaussian"  # both start with lora_B = 0


@dataclass
class SamplingConfig:
    """The rollout sampler. Evaluation uses the ODE with eval.num_steps and the same shift / CFG / rescale."""

    sampler: Literal["ode", "sde"] = "ode"
    num_steps: int = 10
    shift: float = 1.0  # sigma' = shift*sigma / (1 + (shift-1)*sigma); SD3.5 uses 3.0
    guidance_scale: float = 1.0  # 1 = no CFG (NFT / AWM / DPO train CFG-free)
    noise_level: float = 0.7  # SDE eta (Flow-GRPO's noise_level)
    rescale_to_reference: bool = False  # inference baseline: rescale v to ||v_ref|| each step
    rescale_phi: float = 1.0  # blend of the rescaled and the raw v (guidance_rescale-style), 1 = fully rescaled


@dataclass
class RolloutConfig:
    prompts_per_step: int = 8
    group_size: int = 8  # images per prompt; any value, independent of processes x batch
    batch_size: int = 64  # images per sampler forward, per process
    prompts: list[str] = field(default_factory=list)  # prompt pool (empty: the toy's captions / prompt_file)
    prompt_file: str = ""  # one prompt per line


@dataclass
class RewardConfig:
    name: str = "caption_match"  # a key of training.rewards.REWARDS
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the reward's constructor


@dataclass
class NormGuardConfig:
    """L = L_base + ng_lambda * hinge(||v_theta|| - (1+margin) ||v_ref||), v_ref from the reference policy."""

    ng_lambda: float = 0.0  # 0 turns NormGuard off (the norm ratio is still logged)
    margin: float = 0.0
    squared: bool = False
    relative: bool = False  # hinge on ||v||/||v_ref|| - (1+margin): scale-free across timesteps
    per_token: bool = False  # norms per spatial token ([B,C,H,W] -> [B*H*W, C]) instead of per sample
    # adaptive: lambda is a multiplier, starting at ng_lambda and updated once per RL step by projected dual ascent,
    #   lambda <- clip(lambda + lambda_lr * g, 0, lambda_max), g = the step's mean of ratio_i - (1 + margin)
    #   (constraint "ratio": settles where the mean ratio ||v||/||v_ref|| is 1 + margin) or of its positive part
    #   ("hinge": lambda never falls). The update is ngkernels.NormGuard's (training/methods/base.py).
    adaptive: bool = False
    lambda_lr: float = 1.0  # dual step size, per RL step
    lambda_max: float = 10.0
    constraint: Literal["ratio", "hinge"] = "ratio"


TimestepScheme = Literal["sampler", "stratified", "logit_normal", "uniform"]


@dataclass
class NFTConfig:
    """DiffusionNFT (NVlabs/DiffusionNFT train_nft_sd3.py)."""

    beta: float = 1.0  # v+ = beta v + (1-beta) v_old, v- = (1+beta) v_old - beta v
    loss_form: Literal["x0", "velocity"] = "x0"  # x0: adaptive-weighted (authors' code); velocity: paper eq.
    kl_beta: float = 1e-4  # weight of mean((v - v_ref)^2)
    adv_clip_max: float = 5.0
    old_decay_rate: float = 0.001  # old <- d old + (1-d) theta, d = min(rate * step, max)
    old_decay_max: float = 0.5
    timesteps: TimestepScheme = "sampler"
    num_timesteps: int = 4  # per sample and step


@dataclass
class AWMConfig:
    """Advantage Weighted Matching (scxue/advantage_weighted_matching train_sd3_awm.py)."""

    weighting: Literal["ghuber", "uniform", "t", "t2"] = "ghuber"
    ghuber_p: float = 0.25
    clip_range: float = 1.0
    adv_max: float = 1.0
    adv_clip_max: float = 5.0
    kl_beta: float = 1e-3  # mean((v - v_ref)^2)
    ema_beta: float = 1.0  # mean((v - v_ema)^2)
    ema_decay_rate: float = 0.001  # ema <- d ema + (1-d) theta, d = min(rate * step, max)
    ema_decay_max: float = 0.3
    timesteps: TimestepScheme = "stratified"
    num_timesteps: int = 4


@dataclass
class DPOConfig:
    """Flow-DPO (yifan123/flow_grpo train_sd3_dpo.py) on each prompt's best/worst pair."""

    beta: float = 100.0
    ref_update_every: int = 0  # 0: fixed reference (adapter disabled); k: copy the learner to "ref" every k steps
    timesteps: TimestepScheme = "logit_normal"
    num_timesteps: int = 2


@dataclass
class GRPOConfig:
    """Flow-GRPO (yifan123/flow_grpo train_sd3.py) and Flow-GRPO-Fast (train_sd3_fast.py): PPO on the SDE
    rollout's own transitions (always the SDE sampler, with sampling.noise_level; training/methods/grpo.py)."""

    clip_range: float = 1e-4  # PPO clip of the ratio (authors: 1e-4; 1e-5 for the Fast / no-CFG configs)
    adv_clip_max: float = 5.0  # advantages clamped to [-5, 5]
    kl_beta: float = 0.04  # kl_beta * mean((mu - mu_ref)^2) / (2 std^2) (authors: 0.04 ocr/geneval, 0.01 pickscore)
    timestep_fraction: float = 0.99  # trained transitions per image: ceil(fraction * stochastic steps)
    sde_window: int = 0  # 0: Flow-GRPO (every step but the last stochastic); w: Flow-GRPO-Fast, w SDE steps
    sde_window_range_end: int = 0  # Fast: the window starts in [0, end - w]; 0: num_steps // 2 (authors' *_nocfg)
    timesteps: Literal["rollout"] = "rollout"  # the rollout's own transitions (no train_sigmas scheme)
    num_timesteps: int = 0  # > 0 overrides timestep_fraction: trained transitions per image and inner epoch


@dataclass
class MethodConfig:
    name: Literal["nft", "awm", "dpo", "grpo"] = "nft"
    nft: NFTConfig = field(default_factory=NFTConfig)
    awm: AWMConfig = field(default_factory=AWMConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)


@dataclass
class TrainConfig:
    steps: int = 30  # RL steps (one rollout each)
    batch_size: int = 16  # training items per micro-batch, per process (each item x its timesteps)
    grad_accum: int = 1  # micro-batches per optimizer update
    inner_epochs: int = 1  # passes over each rollout
    lr: float = 3e-4
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    adv_std: Literal["global", "group"] = "global"  # advantage = (r - prompt mean) / (std + 1e-4)
    seed: int = 0
    num_threads: int = 0  # CPU threads per process (0: torch's default); tiny models run fastest on 1


@dataclass
class EvalConfig:
    every: int = 10  # steps between evaluations (0: only before and after)
    num_prompts: int = 16  # 0: every prompt of the pool
    samples_per_prompt: int = 2
    num_steps: int = 0  # sampler steps for evaluation (0: sampling.num_steps)
    grid_prompts: int = 8  # prompts of the sample grid <run_dir>/samples/step-N.png at each evaluation (0: none)


@dataclass
class LogConfig:
    output_dir: str = "outputs"
    run_name: str = "toy_nft"
    checkpoint_every: int = 10  # steps (0: only at the end)
    keep_checkpoints: int = 2
    ratio_buckets: int = 4  # sigma buckets for the logged norm ratio ||v||/||v_ref||
    trackers: list[str] = field(default_factory=lambda: ["csv", "tensorboard"])  # csv (always on), tensorboard, wandb
    progress: bool = True  # tqdm bars


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    normguard: NormGuardConfig = field(default_factory=NormGuardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.log.output_dir) / self.log.run_name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------
# Ranges checked after loading (dotted key -> (predicate, what it must be))

_POSITIVE = (lambda x: x > 0, "> 0")
_AT_LEAST_1 = (lambda x: x >= 1, ">= 1")
_NON_NEGATIVE = (lambda x: x >= 0, ">= 0")
_UNIT = (lambda x: 0 <= x <= 1, "in [0, 1]")
RANGES = {
    "model.resolution": _AT_LEAST_1, "model.max_sequence_length": _AT_LEAST_1,
    "model.toy.image_size": _AT_LEAST_1, "model.toy.patch_size": _AT_LEAST_1, "model.toy.num_layers": _AT_LEAST_1,
    "model.toy.num_attention_heads": _AT_LEAST_1, "model.toy.attention_head_dim": _AT_LEAST_1,
    "model.toy.pretrain_steps": _NON_NEGATIVE, "model.toy.pretrain_batch_size": _AT_LEAST_1,
    "model.toy.pretrain_lr": _POSITIVE, "model.toy.caption_dropout": _UNIT,
    "finetune.lora_r": _AT_LEAST_1, "finetune.lora_alpha": _POSITIVE,
    "sampling.num_steps": _AT_LEAST_1, "sampling.shift": _POSITIVE, "sampling.guidance_scale": _POSITIVE,
    "sampling.noise_level": _NON_NEGATIVE, "sampling.rescale_phi": _UNIT,
    "rollout.prompts_per_step": _AT_LEAST_1, "rollout.group_size": (lambda x: x >= 2, ">= 2 (advantages compare "
                                                                                     "images of one prompt)"),
    "rollout.batch_size": _AT_LEAST_1,
    "normguard.ng_lambda": _NON_NEGATIVE, "normguard.margin": (lambda x: x > -1, "> -1"),
    "normguard.lambda_lr": _POSITIVE, "normguard.lambda_max": _NON_NEGATIVE,
    "method.nft.beta": _POSITIVE, "method.nft.kl_beta": _NON_NEGATIVE, "method.nft.adv_clip_max": _POSITIVE,
    "method.nft.old_decay_rate": _NON_NEGATIVE, "method.nft.old_decay_max": _UNIT,
    "method.nft.num_timesteps": _AT_LEAST_1,
    "method.awm.ghuber_p": _POSITIVE, "method.awm.clip_range": _POSITIVE, "method.awm.adv_max": _POSITIVE,
    "method.awm.adv_clip_max": _POSITIVE, "method.awm.kl_beta": _NON_NEGATIVE, "method.awm.ema_beta": _NON_NEGATIVE,
    "method.awm.ema_decay_rate": _NON_NEGATIVE, "method.awm.ema_decay_max": _UNIT,
    "method.awm.num_timesteps": _AT_LEAST_1,
    "method.dpo.beta": _POSITIVE, "method.dpo.ref_update_every": _NON_NEGATIVE, "method.dpo.num_timesteps": _AT_LEAST_1,
    "method.grpo.clip_range": _POSITIVE, "method.grpo.adv_clip_max": _POSITIVE, "method.grpo.kl_beta": _NON_NEGATIVE,
    "method.grpo.timestep_fraction": (lambda x: 0 < x <= 1, "in (0, 1]"), "method.grpo.sde_window": _NON_NEGATIVE,
    "method.grpo.sde_window_range_end": _NON_NEGATIVE, "method.grpo.num_timesteps": _NON_NEGATIVE,
    "train.steps": _AT_LEAST_1, "train.batch_size": _AT_LEAST_1, "train.grad_accum": _AT_LEAST_1,
    "train.inner_epochs": _AT_LEAST_1, "train.lr": _POSITIVE, "train.weight_decay": _NON_NEGATIVE,
    "train.max_grad_norm": _POSITIVE, "train.num_threads": _NON_NEGATIVE,
    "eval.every": _NON_NEGATIVE, "eval.num_prompts": _NON_NEGATIVE, "eval.samples_per_prompt": _AT_LEAST_1,
    "eval.num_steps": _NON_NEGATIVE, "eval.grid_prompts": _NON_NEGATIVE,
    "log.checkpoint_every": _NON_NEGATIVE, "log.keep_checkpoints": _AT_LEAST_1, "log.ratio_buckets": _AT_LEAST_1,
}


# ---------------------------------------------------------------------------------------------------
# Loading

def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, known) -> ValueError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys here: {sorted(known)}"
    return ValueError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """value checked (and, for int -> float, converted) against the annotated type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"config key {key!r} must be one of {list(choices)}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key {key!r} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key {key!r} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"config key {key!r} must be a string, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and item is str:
            value = [str(v) for v in str(value).split(",") if v] if isinstance(value, str) else [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r} must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"config key {key!r}: unsupported annotation {tp!r}")  # a bug in this file, not user input


def _merge(node, data: dict, prefix: str) -> None:
    """Writes a nested mapping onto a dataclass node, checking every key and value."""
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix or '<root>'!r} must be a mapping, got {data!r}")
    fields = _fields(type(node))
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise _unknown_key(dotted, fields)
        tp = fields[key]
        if dataclasses.is_dataclass(tp):
            _merge(getattr(node, key), value, dotted + ".")
        else:
            setattr(node, key, _coerce(dotted, value, tp))


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true/false are booleans. YAML 1.1 (PyYAML's default) also reads
    yes/no/on/off as booleans, so `train.mixed_precision: no` became False and was refused."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _load_yaml(text):
    return yaml.load(text, Loader=_Loader)


def _is_text(tp) -> bool:
    """A string-typed field (str, a Literal of strings, list[str]): an override's text is taken as given."""
    if tp is str:
        return True
    if typing.get_origin(tp) is Literal:
        return all(isinstance(c, str) for c in typing.get_args(tp))
    return typing.get_origin(tp) is list and typing.get_args(tp) == (str,)


def _read_value(raw: str, tp) -> Any:
    """An override's value: YAML, except that a string-typed key takes the text as given (`log.run_name=1e-4`
    is the name "1e-4"; a list of strings `[a, no]` holds the strings "a" and "no")."""
    if not raw.strip():
        return ""
    if tp is not None and _is_text(tp):
        if typing.get_origin(tp) is list:
            return yaml.load(raw, Loader=yaml.BaseLoader)  # every scalar a string
        return raw.strip()
    return _load_yaml(raw)


def apply_override(cfg: Config, override: str) -> None:
    """One `a.b.c=value` override; the value is read as YAML (1e-4, true, [a, b], null ...), except for string-typed
    keys, which take the text as given."""
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like key=value (e.g. train.steps=10)")
    key, raw = override.split("=", 1)
    key = key.strip()
    try:
        value = _read_value(raw, _field_type(cfg, key))
    except yaml.YAMLError as err:
        raise ValueError(f"override {override!r}: cannot read the value: {err}") from None
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        dotted = ".".join(parts[: i + 1])
        if isinstance(node, dict):  # free-form mapping (reward.kwargs.*): the rest of the key is one entry
            node[".".join(parts[i:])] = value
            return
        fields = _fields(type(node))
        if part not in fields:
            raise _unknown_key(dotted, fields)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(fields[part]):
                _merge(getattr(node, part), value, dotted + ".")
            else:
                setattr(node, part, _coerce(dotted, value, fields[part]))
            return
        node = getattr(node, part)
        if not (dataclasses.is_dataclass(node) or isinstance(node, dict)):
            raise ValueError(f"config key {dotted!r} is a value, not a section; cannot set {key!r}")


def _field_type(cfg: Config, dotted: str):
    """The annotated type of a dotted key, or None (unknown key, a section, or inside a free-form mapping)."""
    node = type(cfg)
    tp = None
    for part in dotted.split("."):
        if node is None or not dataclasses.is_dataclass(node):
            return None
        tp = _fields(node).get(part)
        if tp is None:
            return None
        node = tp if dataclasses.is_dataclass(tp) else None
    return None if dataclasses.is_dataclass(tp) else tp


def _get(cfg: Config, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: Config) -> Config:
    """Ranges and cross-field rules; registry names (model type, reward) are checked here too.

    The names come from the leaf registry modules training.models.registry / training.rewards.registry: they
    import nothing of the models, so config and models do not import each other (importing one runs its package's
    __init__, which registers the built-ins, so the registry is complete when read)."""
    for key, (ok, what) in RANGES.items():
        value = _get(cfg, key)
        if not ok(value):
            raise ValueError(f"config key {key!r} must be {what}, got {value!r}")
    if cfg.normguard.adaptive and cfg.normguard.lambda_max < cfg.normguard.ng_lambda:
        raise ValueError(f"normguard.lambda_max ({cfg.normguard.lambda_max}) must be >= normguard.ng_lambda "
                         f"({cfg.normguard.ng_lambda}), the adaptive multiplier's starting value")
    toy = cfg.model.toy
    if toy.image_size % toy.patch_size:
        raise ValueError(f"model.toy.image_size ({toy.image_size}) must be a multiple of model.toy.patch_size "
                         f"({toy.patch_size})")
    from training.models.registry import MODELS  # a leaf module: no cycle (its package registers the built-ins)
    from training.rewards.registry import REWARDS
    from training.toy import is_toy

    if cfg.model.type not in MODELS:
        raise ValueError(f"config key 'model.type' must be one of {sorted(MODELS)}, got {cfg.model.type!r}")
    if not is_toy(cfg.model.type) and not cfg.model.path:
        raise ValueError(f"model.type={cfg.model.type!r} needs model.path (a local diffusers pipeline folder)")
    if cfg.reward.name not in REWARDS:
        raise ValueError(f"config key 'reward.name' must be one of {sorted(REWARDS)}, got {cfg.reward.name!r}")
    unknown = [t for t in cfg.log.trackers if t not in TRACKERS]
    if unknown:
        raise ValueError(f"config key 'log.trackers': unknown tracker(s) {unknown}; known: {list(TRACKERS)}")
    if cfg.rollout.prompt_file and not Path(cfg.rollout.prompt_file).is_file():
        raise ValueError(f"rollout.prompt_file {cfg.rollout.prompt_file!r} does not exist")
    if not is_toy(cfg.model.type) and not (cfg.rollout.prompts or cfg.rollout.prompt_file):
        raise ValueError("sd3/flux runs need prompts: set rollout.prompts or rollout.prompt_file")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file (default: training/configs/toy.yaml) <- overrides, then validated."""
    cfg = Config()
    path = DEFAULT_CONFIG if path is None else Path(path)
    if not path.is_file():
        candidate = CONFIG_DIR / path
        candidate = candidate if candidate.suffix else candidate.with_suffix(".yaml")
        if not candidate.is_file():
            raise ValueError(f"config file {str(path)!r} not found (nor {str(candidate)!r})")
        path = candidate
    with open(path) as f:
        data = _load_yaml(f) or {}
    _merge(cfg, data, "")
    for override in overrides:
        apply_override(cfg, override)
    return validate(cfg)


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    _merge(cfg, data, "")
    return validate(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def diff_configs(a: Config, b: Config, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ."""
    out = []
    for f in dataclasses.fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(va):
            out += diff_configs(va, vb, f"{prefix}{f.name}.")
        elif va != vb:
            out.append(f"{prefix}{f.name}")
    return out


__all__ = ["Config", "load_config", "apply_override", "validate", "config_from_dict", "dump_config",
           "diff_configs", "DEFAULT_CONFIG", "CONFIG_DIR"]
