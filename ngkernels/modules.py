"""Thin nn.Module wrappers over `ngkernels.functional`."""

from __future__ import annotations

from torch import nn

from ngkernels import functional as F


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
