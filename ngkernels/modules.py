"""nn.Module wrappers over `ngkernels.functional`, and `NormGuard`, the drop-in module for existing trainers."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ngkernels import functional as F
from ngkernels.options import REDUCTIONS, accumulation_dtype
from ngkernels.reference import LossStats


class NormGuardLoss(nn.Module):
    def __init__(self, margin=0.0, relative=False, squared=False, reduction="mean"):
        super().__init__()
        self.margin, self.relative, self.squared, self.reduction = margin, relative, squared, reduction

    def forward(self, v, v_ref):
        return F.normguard_loss(v, v_ref, margin=self.margin, relative=self.relative, squared=self.squared,
                                reduction=self.reduction)

    def extra_repr(self):
        return f"margin={self.margin}, relative={self.relative}, squared={self.squared}, reduction={self.reduction!r}"


class FlowMatchingLoss(nn.Module):
    def __init__(self, reduction="mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, v, target, weight=None):
        return F.flow_matching_loss(v, target, weight=weight, reduction=self.reduction)

    def extra_repr(self):
        return f"reduction={self.reduction!r}"


class FMNormGuardLoss(nn.Module):
    def __init__(self, ng_lambda=1.0, margin=0.0, relative=False, squared=False, reduction="mean",
                 return_stats=False):
        super().__init__()
        self.ng_lambda, self.margin, self.relative, self.squared = ng_lambda, margin, relative, squared
        self.reduction, self.return_stats = reduction, return_stats

    def forward(self, v, target, v_ref, weight=None):
        return F.fm_normguard_loss(v, target, v_ref, weight=weight, ng_lambda=self.ng_lambda, margin=self.margin,
                                   relative=self.relative, squared=self.squared, reduction=self.reduction,
                                   return_stats=self.return_stats)

    def extra_repr(self):
        return (f"ng_lambda={self.ng_lambda}, margin={self.margin}, relative={self.relative}, "
                f"squared={self.squared}, reduction={self.reduction!r}")


class NormGuard(nn.Module):
    """NormGuard for an existing trainer: takes (v, v_ref), holds the options, optionally adapts lambda by
    dual ascent, and keeps the norm-ratio statistics a trainer logs.

        guard = ngkernels.NormGuard(ng_lambda=0.1, relative=True)             # fixed lambda
        guard = ngkernels.NormGuard(ng_lambda=0.1, relative=True, adaptive=True, lambda_lr=0.1)
        loss = base_loss + guard(v, v_ref)                                      # hinge only
        loss = policy_loss + guard(v, v_ref, target=v_ref, weight=kl_beta)      # KL-to-ref MSE + hinge, one pass
        ... backward, optimizer.step() ...
        guard.update()                                                          # once per optimizer step
        log(guard.log_dict())                                                   # tensors, no host sync here

    Per sample i (norms over all non-batch dims, or per token, see below):
        per_sample_i = w_i * mean_j (v_ij - target_ij)^2  [if target]  +  lambda * penalty_i
    with penalty_i the hinge of `normguard_loss` (margin, relative, squared). `reduction` ("mean", "sum",
    "none") applies over samples, as in the functional ops. Gradients flow to v only.

    Per-token norms (per_token=True): the hinge is taken per token and averaged over the tokens of a sample;
    the MSE term is unchanged (the mean over tokens of per-token means). `channel_dim` is the feature dim of a
    token; None means 1 for [B, C, H, W] latents (a token = one spatial position, C channels) and the last dim
    for packed [B, L, D] tokens (FLUX). The logged norms are always per sample, recombined exactly as
    sqrt(sum over tokens of squared token norms).

    Adaptive lambda (issue 14). The fixed hinge keeps pushing while any sample is above the margin, so the mean
    ratio ||v||/||v_ref|| ends below 1 + margin. With adaptive=True lambda is a Lagrange multiplier for the
    constraint g = mean_i ratio_i - (1 + margin) <= 0, updated by projected dual ascent
        lambda <- clip(lambda + lambda_lr * g, 0, lambda_max)
    where g is measured over every sample that went through forward() since the last update() (all micro-
    batches of a gradient-accumulation step, all processes when torch.distributed is initialised). The signed
    mean ratio (constraint="ratio", the default) lets lambda fall again when the ratio drops below the target,
    so it settles where the mean ratio equals 1 + margin. constraint="hinge" uses g = mean_i max(0, ratio_i -
    (1 + margin)) instead: g >= 0, so lambda only ever grows (a ramp that stops once no sample exceeds the
    margin), which is the fixed form's overshoot with a schedule; it is offered for comparison.

    Why update() and not an update inside forward: lambda must be one number per optimizer step, the same on
    every process. Inside forward it would change between the micro-batches of one accumulated gradient and
    differ across DDP ranks (each sees its own batch); and logging-only calls would move it. forward() only
    accumulates (sum of ratios, sum of g, count, max) into buffers; update() all-reduces those (one 3-float and
    one 1-float collective) and applies the step. forward() accumulates only in training mode with grad enabled,
    so `torch.no_grad()` or `.eval()` calls (evaluation, logging) leave the state alone.

    Compile / CUDA-graph rule: all state is registered buffers updated in place by torch ops on their device;
    nothing is read back to the host (no .item(), no Python floats from tensors), so forward runs under
    torch.compile(fullgraph=True) and update() never syncs. Every buffer is persistent: state_dict carries
    lambda, the statistics and any pending accumulation, so a resumed run continues exactly. An update whose
    accumulated statistics are non-finite (an fp16 overflow step that GradScaler skips) or empty changes nothing.

    Cost: with a fixed lambda one fused pass (the base MSE, when given, and the hinge read v once). With
    adaptive=True lambda is a device tensor, and the kernels take lambda as a launch constant, so the hinge and
    the MSE are two passes over v (one more read of v; small next to the transformer forward).

    Keep the module out of dtype casts (`model.half()` casts the buffers of submodules too): its state is
    float64 on purpose. Buffers (for logging / checkpoints): lambda_ (the multiplier in use; equals ng_lambda
    when not adaptive), ratio_mean and ratio_max (of the samples seen in the last update), ratio_ema (EMA of
    ratio_mean with decay ema_decay, started at the first update), num_updates.
    """

    CONSTRAINTS = ("ratio", "hinge")
    REDUCTIONS = REDUCTIONS  # ngkernels.options: the one list

    def __init__(self, ng_lambda=1.0, *, margin=0.0, relative=False, squared=False, per_token=False,
                 channel_dim=None, reduction="mean", adaptive=False, lambda_lr=0.1, lambda_max=10.0,
                 constraint="ratio", ema_decay=0.99, sync_processes=True, return_stats=False):
        super().__init__()
        if not (isinstance(ng_lambda, (int, float)) and math.isfinite(ng_lambda) and ng_lambda >= 0):
            raise ValueError(f"ng_lambda must be a finite number >= 0, got {ng_lambda!r}")
        if not margin > -1.0:
            raise ValueError(f"margin must be > -1 (the hinge is at (1 + margin) * ||v_ref||), got {margin}")
        if reduction not in self.REDUCTIONS:
            raise ValueError(f"reduction must be one of {self.REDUCTIONS}, got {reduction!r}")
        if constraint not in self.CONSTRAINTS:
            raise ValueError(f"constraint must be one of {self.CONSTRAINTS}, got {constraint!r}")
        if adaptive and not (math.isfinite(lambda_lr) and lambda_lr > 0):
            raise ValueError(f"lambda_lr must be a finite number > 0, got {lambda_lr!r}")
        if adaptive and not (lambda_max >= ng_lambda):
            raise ValueError(f"lambda_max must be >= the initial ng_lambda ({ng_lambda}), got {lambda_max!r}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
        if channel_dim is not None and not isinstance(channel_dim, int):
            raise ValueError(f"channel_dim must be an int or None, got {channel_dim!r}")
        self.ng_lambda, self.margin, self.relative, self.squared = float(ng_lambda), float(margin), relative, squared
        self.per_token, self.channel_dim, self.reduction = per_token, channel_dim, reduction
        self.adaptive, self.lambda_lr, self.lambda_max = adaptive, float(lambda_lr), float(lambda_max)
        self.constraint, self.ema_decay = constraint, float(ema_decay)
        self.sync_processes, self.return_stats = sync_processes, return_stats
        # float64 scalars: lambda is applied exactly as set (also to float64 inputs), and the sums of many
        # micro-batches' ratios lose nothing; they are a few bytes, updated by device ops
        f64 = dict(dtype=torch.float64)
        self.register_buffer("lambda_", torch.tensor(self.ng_lambda, **f64))
        self.register_buffer("ratio_ema", torch.tensor(0.0, **f64))
        self.register_buffer("ratio_mean", torch.tensor(0.0, **f64))
        self.register_buffer("ratio_max", torch.tensor(0.0, **f64))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int64))
        # pending accumulation since the last update(): [sum of ratios, sum of g, count], running max of ratios
        self.register_buffer("_acc", torch.zeros(3, **f64))
        self.register_buffer("_acc_max", torch.tensor(-math.inf, **f64))

    # -----------------------------------------------------------------------------------------------
    def _token_rows(self, x: torch.Tensor) -> torch.Tensor:
        """[B, ...] -> [B * T, D], one row per token (D = the channel dim's size)."""
        if x.dim() < 3:
            raise ValueError(f"per_token needs [B, C, H, W] latents or [B, L, D] tokens, got shape {tuple(x.shape)}")
        dim = self.channel_dim if self.channel_dim is not None else (1 if x.dim() == 4 else -1)
        t = x.movedim(dim, -1)
        return t.reshape(-1, t.shape[-1])

    def forward(self, v, v_ref, target=None, weight=None, stat_weight=None):
        """-> loss (reduced over samples; [B] for reduction "none"), or (loss, LossStats) with return_stats.

        v: the trained policy's velocity [B, ...] (with grad). v_ref: the frozen reference's velocity at the
        same (x_t, t, c), a constant. target (optional): the base-loss target of a fused weighted MSE term
        (e.g. v_ref itself for a KL-to-reference term). weight: a float or a [B] tensor weighing that MSE.
        stat_weight (optional [B] tensor): each sample's weight in the step's statistics (the dual step and the
        logged ratios); 0 leaves out a padding row (e.g. the zero-weight copies that even out micro-batches
        across processes). It does not touch the loss. LossStats holds per-sample (float32; float64 for
        float64 inputs) v_norm, ref_norm and mse (mse None without a target, and with adaptive=True, whose MSE is
        a separate call).
        """
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            raise ValueError("v must be a torch.Tensor with a batch dimension (shape [B, ...])")
        if weight is not None and target is None:
            raise ValueError("weight weighs the MSE against target; pass target too (or no weight)")
        if self.lambda_.device != v.device:
            raise ValueError(f"NormGuard's state is on {self.lambda_.device} but v is on {v.device}: "
                             f"move the module with guard.to({str(v.device)!r})")
        B = v.shape[0]
        if isinstance(weight, (int, float)):
            acc = accumulation_dtype(v.dtype)
            weight = torch.full((B,), float(weight), device=v.device, dtype=acc)
        T = 1
        if self.per_token:
            rows = self._token_rows(v)
            T = rows.shape[0] // B if B else 1
            v2, r2 = rows, self._token_rows(v_ref)
            t2 = None if target is None else self._token_rows(target)
            w2 = None if weight is None else weight.repeat_interleave(T)
        else:
            v2, r2, t2, w2 = v, v_ref, target, weight
        opts = dict(margin=self.margin, relative=self.relative, squared=self.squared, reduction="none",
                    return_stats=True)
        mse = None
        if not self.adaptive:
            per_row, stats = F.fm_normguard_loss(v2, t2, r2, weight=w2, ng_lambda=self.ng_lambda, **opts)
            mse = stats.mse
        else:
            hinge, stats = F.fm_normguard_loss(v2, None, r2, ng_lambda=1.0, **opts)
            # a copy in the loss's dtype: update() changes lambda_ in place, and autograd keeps this step's value
            per_row = self.lambda_.to(hinge.dtype, copy=True) * hinge
            if t2 is not None:
                per_row = per_row + F.flow_matching_loss(v2, t2, weight=w2, reduction="none")
        if self.per_token:
            per_sample = per_row.view(B, T).mean(1)
            v_norm = stats.v_norm.view(B, T).square().sum(1).sqrt()
            ref_norm = stats.ref_norm.view(B, T).square().sum(1).sqrt()
            mse = None if mse is None else mse.view(B, T).mean(1)
        else:
            per_sample, v_norm, ref_norm = per_row, stats.v_norm, stats.ref_norm
        if stat_weight is not None and (not isinstance(stat_weight, torch.Tensor) or stat_weight.shape != (B,)):
            got = tuple(stat_weight.shape) if isinstance(stat_weight, torch.Tensor) else type(stat_weight).__name__
            raise ValueError(f"stat_weight must be a [B]=({B},) tensor, got {got}")
        if B > 0 and self.training and torch.is_grad_enabled():
            self._accumulate(v_norm, ref_norm, stat_weight)
        if self.reduction == "mean":
            loss = per_sample.mean()
        elif self.reduction == "sum":
            loss = per_sample.sum()
        else:
            loss = per_sample
        return (loss, LossStats(v_norm, ref_norm, mse)) if self.return_stats else loss

    @torch.no_grad()
    def _accumulate(self, v_norm: torch.Tensor, ref_norm: torch.Tensor, w) -> None:
        ratio = v_norm.double() / ref_norm.double().clamp_min(torch.finfo(torch.float32).tiny)
        excess = ratio - (1.0 + self.margin)
        g = excess if self.constraint == "ratio" else excess.clamp_min(0.0)
        if w is None:
            total = ratio.sum()
            self._acc.add_(torch.stack([total, g.sum(), torch.full_like(total, ratio.shape[0])]))
            self._acc_max.copy_(torch.maximum(self._acc_max, ratio.max()))
        else:
            w = w.detach().to(torch.float64)
            self._acc.add_(torch.stack([(w * ratio).sum(), (w * g).sum(), w.sum()]))
            top = torch.where(w > 0, ratio, torch.full_like(ratio, -math.inf)).max()
            self._acc_max.copy_(torch.maximum(self._acc_max, top))

    @torch.no_grad()
    def update(self) -> None:
        """Applies the step's statistics: the dual-ascent step of lambda (adaptive=True) and the logged ratios.

        Call it once per optimizer step, on every process (with torch.distributed initialised and
        sync_processes=True it all-reduces the pending sums). Device ops only; it never syncs with the host.
        """
        acc, top = self._acc, self._acc_max
        if self.sync_processes and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            acc, top = acc.clone(), top.clone()
            dist.all_reduce(acc, op=dist.ReduceOp.SUM)
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
        count = acc[2]
        ok = (count > 0) & torch.isfinite(acc[0]) & torch.isfinite(acc[1])
        mean_ratio = acc[0] / count.clamp_min(1.0)
        g = acc[1] / count.clamp_min(1.0)
        if self.adaptive:
            stepped = (self.lambda_ + self.lambda_lr * g).clamp(0.0, self.lambda_max)
            self.lambda_.copy_(torch.where(ok, stepped, self.lambda_))
        ema = torch.where(self.num_updates == 0, mean_ratio,
                          self.ema_decay * self.ratio_ema + (1.0 - self.ema_decay) * mean_ratio)
        self.ratio_ema.copy_(torch.where(ok, ema, self.ratio_ema))
        self.ratio_mean.copy_(torch.where(ok, mean_ratio, self.ratio_mean))
        self.ratio_max.copy_(torch.where(ok, top, self.ratio_max))
        self.num_updates.add_(ok.to(torch.int64))
        self._acc.zero_()
        self._acc_max.fill_(-math.inf)

    def log_dict(self, prefix: str = "normguard/") -> dict:
        """The values a trainer logs, as detached 0-d tensors (read them with .item() where the trainer already
        syncs, e.g. at its logging step)."""
        return {f"{prefix}lambda": self.lambda_.detach().clone(),
                f"{prefix}ratio_mean": self.ratio_mean.detach().clone(),
                f"{prefix}ratio_max": self.ratio_max.detach().clone(),
                f"{prefix}ratio_ema": self.ratio_ema.detach().clone()}

    def extra_repr(self):
        s = (f"ng_lambda={self.ng_lambda}, margin={self.margin}, relative={self.relative}, squared={self.squared}, "
             f"per_token={self.per_token}, reduction={self.reduction!r}")
        if self.adaptive:
            s += (f", adaptive=True, lambda_lr={self.lambda_lr}, lambda_max={self.lambda_max}, "
                  f"constraint={self.constraint!r}")
        return s
