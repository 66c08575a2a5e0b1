"""What every RL method shares: the training batch, the method interface and its config contract, the NormGuard
term. (The timestep schemes the loop trains at live with the sampler's schedule: training.sampling.train_sigmas.)

A method turns a batch of forward-noised rollout samples into per-item losses. Every squared error and every
hinge goes through the ngkernels ops (`flow_matching_loss`, `fm_normguard_loss`); the methods only combine
their per-sample outputs. The NormGuard term and its statistics (||v||, ||v_ref||, for the logged norm ratio)
come from one `fm_normguard_loss(..., return_stats=True)` call, fused with the method's own KL-to-reference
MSE where it has one (`reference_terms`, which returns the KL and the NormGuard parts apart).

Adaptive NormGuard (`normguard.adaptive`): the method holds an `ngkernels.NormGuard(adaptive=True)` (`guard`),
the one home of the dual-ascent update. Its forward gives the hinge times the current lambda and accumulates
the step's ratios (padding rows left out by `row_weight`, which the loop sets per micro-batch); the loop calls
`update_normguard` once per RL step, after the step's last optimizer update, on every process. Why per RL step:
lambda is then one number per step, the same for every micro-batch and process, logged as the `ng_lambda`
column. The guard's buffers (lambda and its statistics) are saved in every checkpoint (the loop registers the
guard with accelerate), so --resume replays the same lambda sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Protocol, runtime_checkable

import torch

import ngkernels
from training.config import Config, NormGuardConfig
from training.models.base import FlowModel

VelocityFn = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


@dataclass
class TrainBatch:
    """Rows = items x timesteps x slots (slot-fastest: DPO's rows alternate winner, loser).

    x_t = (1 - sigma) x0 + sigma noise and target u = noise - x0, all [N, ...]; advantages [N]; cond holds
    batch-first conditioning tensors [N, ...].
    """

    x0: torch.Tensor
    noise: torch.Tensor
    sigma: torch.Tensor
    cond: dict[str, torch.Tensor]
    advantages: torch.Tensor
    slots_per_item: int = 1
    logp_old: Optional[torch.Tensor] = None  # AWM's old log-likelihood surrogate (None: on-policy, detached)

    @property
    def x_t(self) -> torch.Tensor:
        s = self.sigma.view(-1, *([1] * (self.x0.dim() - 1))).to(self.x0.dtype)
        return (1 - s) * self.x0 + s * self.noise

    @property
    def target(self) -> torch.Tensor:
        return self.noise - self.x0


@dataclass
class LossOutput:
    """loss: per-item-row losses [N / slots] (differentiable); terms: named parts of it (detached, same shape);
    v_norm / ref_norm: per-row ||v_theta||, ||v_ref|| [N] from the loss's own pass."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    v_norm: torch.Tensor
    ref_norm: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Item:
    """One training item: the rollout slots it uses (1, or DPO's (winner, loser)) and its advantage."""

    slots: tuple[int, ...]
    advantage: float


@runtime_checkable
class MethodSection(Protocol):
    """What the shared loop reads from every method's config section `method.<name>` (NFTConfig, AWMConfig,
    DPOConfig ...): the timestep scheme of training.sampling.train_sigmas and the timesteps per item. A method's
    own keys sit next to these two; `Method.__init__` checks the section has them."""

    timesteps: str
    num_timesteps: int


class Method:
    """Interface of an RL method over the shared loop (training/loop.py).

    The loop reads the class attributes (`name`, `term_names`, `slots_per_item`), the timesteps to train at
    (`timestep_scheme`, `num_timesteps`, from the method's config section) and calls the hooks below in the
    order setup -> (rollout_policy, make_items, loss, after_step) per RL step."""

    name: str = ""  # also the name of the method's config section, cfg.method.<name>
    term_names: tuple[str, ...] = ()  # the keys of LossOutput.terms, logged per step
    slots_per_item: int = 1  # rollout slots per training item (DPO: 2, the winner and the loser)
    # True: trains on the rollout's own SDE transitions (GRPO); the loop then calls its sample_rollout(velocity, x1,
    # sigmas, step_noise, generators, progress) -> (x0, per-image records) and transition_batch(items, records,
    # generators, prompts per row, encode) -> its batch, instead of forward-noising clean samples
    coupled: bool = False

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.ng = cfg.normguard
        self.guard = build_guard(cfg.normguard)  # None unless normguard.adaptive
        self.row_weight: Optional[torch.Tensor] = None  # set by the loop per micro-batch: 1 real row, 0 padding
        section = getattr(cfg.method, self.name, None)
        if not isinstance(section, MethodSection):
            raise TypeError(f"method {self.name!r}: cfg.method.{self.name} must be a config section with "
                            f"`timesteps` and `num_timesteps` (training.methods.base.MethodSection), got {section!r}")

    @property
    def method_cfg(self) -> MethodSection:
        """This method's config section, cfg.method.<name>: its own keys plus the MethodSection contract."""
        return getattr(self.cfg.method, self.name)

    @property
    def timestep_scheme(self) -> str:
        """How the loop draws the training sigmas of an item (training.sampling.train_sigmas)."""
        return self.method_cfg.timesteps

    @property
    def num_timesteps(self) -> int:
        """Sigmas per item: each item becomes num_timesteps x slots_per_item rows of a TrainBatch."""
        return self.method_cfg.num_timesteps

    def setup(self, model: FlowModel) -> None:
        """Adds the extra policies the method needs (before accelerate wraps the model)."""

    def rollout_policy(self) -> str:
        """The policy that samples rollouts: "default", "reference" or an adapter name."""
        return "default"

    def make_items(self, rewards: torch.Tensor, advantages: torch.Tensor, prompt_ids: torch.Tensor) -> list[Item]:
        """Training items from the whole rollout (every process sees every slot's reward)."""
        return [Item((i,), float(a)) for i, a in enumerate(advantages.tolist())]

    def loss(self, batch: TrainBatch, velocity: VelocityFn, model: FlowModel) -> LossOutput:
        """`velocity` is the (DDP/FSDP-wrapped) model's forward: the trained policy, with gradient; inside
        `model.reference()` / `model.use_adapter(...)` and no_grad the same call gives the reference / old / EMA
        velocities at the same (x_t, sigma, cond). Every forward goes through the wrapper (FSDP needs it)."""
        raise NotImplementedError

    def after_step(self, model: FlowModel, step: int) -> None:
        """Updates the extra policies after RL step `step` (1-based)."""

    def reference_terms(self, model: FlowModel, v: torch.Tensor, v_ref: torch.Tensor,
                        kl_weight: float | torch.Tensor | None = None) -> "ReferenceTerms":
        """`reference_terms` with this method's NormGuard settings (and adaptive guard, if any)."""
        return reference_terms(model, v, v_ref, self.ng, kl_weight, guard=self.guard, stat_weight=self.row_weight)

    def normguard_lambda(self) -> float:
        """The NormGuard multiplier in use for this RL step's loss (the fixed ng_lambda when not adaptive)."""
        return self.ng.ng_lambda if self.guard is None else float(self.guard.lambda_)

    def update_normguard(self) -> None:
        """The adaptive multiplier's dual step on the RL step's accumulated ratios (ngkernels.NormGuard.update;
        all-reduced across processes). Call once per RL step on every process; a no-op when not adaptive."""
        if self.guard is not None:
            self.guard.update()


class ReferenceTerms(NamedTuple):
    """The per-row terms that tie the trained policy to the reference, from one fused ngkernels call.

    loss:      kl + normguard, differentiable (what a method adds to its own loss)
    kl:        kl_weight * mean((v - v_ref)^2), detached; None when the method has no KL term
    normguard: ng_lambda * hinge(||v||, ||v_ref||) (a mean over tokens with normguard.per_token), detached
    v_norm, ref_norm: ||v||, ||v_ref|| per row, from the same pass (the logged norm ratio)
    """

    loss: torch.Tensor
    kl: Optional[torch.Tensor]
    normguard: torch.Tensor
    v_norm: torch.Tensor
    ref_norm: torch.Tensor


def build_guard(ng: NormGuardConfig) -> Optional[ngkernels.NormGuard]:
    """The adaptive NormGuard of a config (None when normguard.adaptive is false): lambda starts at ng_lambda.
    The trainer passes [B, T, D] tokens (model.to_tokens) when per_token, so the channel dim is the last."""
    if not ng.adaptive:
        return None
    return ngkernels.NormGuard(ng.ng_lambda, margin=ng.margin, relative=ng.relative, squared=ng.squared,
                               per_token=ng.per_token, channel_dim=-1, reduction="none", adaptive=True,
                               lambda_lr=ng.lambda_lr, lambda_max=ng.lambda_max, constraint=ng.constraint,
                               return_stats=True)


def reference_terms(model: FlowModel, v: torch.Tensor, v_ref: torch.Tensor, ng: NormGuardConfig,
                    kl_weight: float | torch.Tensor | None = None, guard: Optional[ngkernels.NormGuard] = None,
                    stat_weight: Optional[torch.Tensor] = None) -> ReferenceTerms:
    """Per-row  kl_weight * mse(v, v_ref) + ng_lambda * hinge(||v||, ||v_ref||), its two parts and the norms.

    kl_weight: a number, one weight per row [B], or None (no KL term).
    guard: the adaptive NormGuard (build_guard; None: the fixed ng_lambda of `ng`). stat_weight: the weight of
    each row, or of each item-row (then repeated over the slots of DPO's pairs), in the guard's statistics.

    One fused `fm_normguard_loss(v, v_ref, v_ref, reduction="none", return_stats=True)` call reads v once for
    both terms (target = v_ref: the KL to the reference is the flow-matching MSE towards v_ref). Its stats give
    the MSE, so kl = kl_weight * stats.mse and the NormGuard part is the rest of the per-row loss (both
    detached: only the sum carries the gradient). Without kl_weight the op skips the MSE altogether.
    With ng.per_token the norms are per spatial token (model.to_tokens): the hinge is averaged over tokens, the
    MSE is unchanged (a mean over tokens of per-token means), and the per-row norms are recombined exactly as
    sqrt(sum of squared token norms).
    """
    B = v.shape[0]
    if guard is not None:
        return _adaptive_terms(model, v, v_ref, ng, kl_weight, guard, stat_weight)
    target = None if kl_weight is None else v_ref
    if isinstance(kl_weight, torch.Tensor):  # one weight per row [B]
        weight = kl_weight.to(v.device)
    else:
        weight = None if kl_weight is None else torch.full((B,), float(kl_weight), device=v.device)
    kwargs = dict(ng_lambda=ng.ng_lambda, margin=ng.margin, relative=ng.relative, squared=ng.squared,
                  reduction="none", return_stats=True)
    if not ng.per_token:
        loss, stats = ngkernels.fm_normguard_loss(v, target, v_ref, weight=weight, **kwargs)
        mse, v_norm, ref_norm = stats.mse, stats.v_norm, stats.ref_norm
    else:
        tokens = model.to_tokens(v)
        T, D = tokens.shape[1], tokens.shape[2]
        flat = lambda x: model.to_tokens(x).reshape(B * T, D)  # noqa: E731
        loss, stats = ngkernels.fm_normguard_loss(
            tokens.reshape(B * T, D), None if target is None else flat(target), flat(v_ref),
            weight=None if weight is None else weight.repeat_interleave(T), **kwargs)
        loss = loss.view(B, T).mean(1)
        mse = None if stats.mse is None else stats.mse.view(B, T).mean(1)
        v_norm = stats.v_norm.view(B, T).square().sum(1).sqrt()
        ref_norm = stats.ref_norm.view(B, T).square().sum(1).sqrt()
    kl = None if mse is None else kl_weight * mse
    normguard = loss.detach() if kl is None else loss.detach() - kl
    return ReferenceTerms(loss, kl, normguard, v_norm, ref_norm)


def _adaptive_terms(model, v, v_ref, ng, kl_weight, guard, stat_weight) -> ReferenceTerms:
    """reference_terms with the adaptive guard: the hinge times the guard's current lambda (its forward also
    accumulates the rows' ratios for the step's dual update) plus the KL as its own flow_matching_loss pass (the
    kernels take lambda as a launch constant, so an adaptive lambda cannot be fused; one more read of v)."""
    B = v.shape[0]
    if guard.lambda_.device != v.device:
        guard.to(v.device)
    if stat_weight is not None and stat_weight.numel() != B:
        if B % stat_weight.numel():
            raise ValueError(f"stat_weight has {stat_weight.numel()} entries for {B} rows")
        stat_weight = stat_weight.repeat_interleave(B // stat_weight.numel())
    x, x_ref = (model.to_tokens(v), model.to_tokens(v_ref)) if ng.per_token else (v, v_ref)
    hinge, stats = guard(x, x_ref, stat_weight=None if stat_weight is None else stat_weight.to(v.device))
    loss, kl = hinge, None
    if kl_weight is not None:
        weight = kl_weight.to(v.device) if isinstance(kl_weight, torch.Tensor) else \
            torch.full((B,), float(kl_weight), device=v.device)
        kl_rows = ngkernels.flow_matching_loss(v, v_ref, weight=weight, reduction="none")
        loss, kl = hinge + kl_rows, kl_rows.detach()
    return ReferenceTerms(loss, kl, hinge.detach(), stats.v_norm, stats.ref_norm)


def clipped_advantages(advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """clamp(A, -clip, clip) / clip, in [-1, 1] (NFT and AWM both start from this)."""
    return advantages.clamp(-clip, clip) / clip
