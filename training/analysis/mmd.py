"""The third quality proxy of the regime study (docs/study.md, protocol section 3): the unbiased squared maximum
mean discrepancy between generated images and the toy's data, in pixel space with a Gaussian kernel.

It is a proxy of another kind than the FD and the attribute accuracy: no learned network. So no single feature net
decides a verdict. The kernel's bandwidth is fixed once, from the data alone: the median pairwise distance among
the first 512 reference data images. It does not depend on the images being scored, so every checkpoint is scored
with the same kernel.

    MMD^2_u = mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j),
    k(a, b) = exp(-||a - b||^2 / (2 h^2))

The estimator is unbiased, so it can be slightly negative when both sets come from one distribution. Lower is
better.
"""

from __future__ import annotations

import torch


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """[N, D], [M, D] -> [N, M] kernel matrix (float64)."""
    d2 = torch.cdist(a.double(), b.double()).square()
    return torch.exp(-d2 / (2.0 * bandwidth ** 2))


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, bandwidth: float, k_yy_mean: float | None = None) -> float:
    """Unbiased MMD^2 between sample sets x [N, D] and y [M, D] (N, M >= 2). k_yy_mean: the precomputed
    off-diagonal mean of y's kernel matrix (a fixed reference set's term, computed once)."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need two sample sets [N, D] with the same D, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("need at least two samples per set")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    n = x.shape[0]
    k_xx = gaussian_kernel(x, x, bandwidth)
    xx = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    yy = off_diagonal_mean(y, bandwidth) if k_yy_mean is None else k_yy_mean
    return (xx + yy - 2.0 * gaussian_kernel(x, y, bandwidth).mean()).item()


def off_diagonal_mean(y: torch.Tensor, bandwidth: float) -> float:
    m = y.shape[0]
    k_yy = gaussian_kernel(y, y, bandwidth)
    return ((k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))).item()


def median_bandwidth(x: torch.Tensor) -> float:
    """The median of the pairwise distances ||x_i - x_j||, i < j."""
    d = torch.cdist(x.double(), x.double())
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1)
    return d[i, j].median().item()


class PixelMMD:
    """MMD^2 to a fixed set of data images [M, 3, H, W] in [0, 1]; the bandwidth comes from its first 512."""

    def __init__(self, data_images: torch.Tensor, bandwidth_images: int = 512):
        self.data = data_images.flatten(1).double()
        self.bandwidth = median_bandwidth(self.data[:bandwidth_images])
        self.k_yy_mean = off_diagonal_mean(self.data, self.bandwidth)

    def __call__(self, images: torch.Tensor) -> float:
        return mmd2_unbiased(images.flatten(1), self.data, self.bandwidth, self.k_yy_mean)
