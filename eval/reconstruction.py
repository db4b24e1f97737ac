"""Video reconstruction metrics (paper Table 3): PSNR and SSIM in YUV space, and flicker.

YUV is BT.601 full range (JPEG's YCbCr): Y = 0.299 R + 0.587 G + 0.114 B, Cb and Cr offset by 128,
all three in [0, 255], so one data range serves every channel. Metrics are computed per frame and
averaged over frames and clips; "yuv" figures average the three channels' (PSNR: from the mean
squared error over all three channels; SSIM: the mean of the per-channel SSIMs).

SSIM follows Wang et al. 2004 as scikit-image computes it with `gaussian_weights=True, sigma=1.5,
use_sample_covariance=False`: an 11x11 Gaussian window (radius 3.5 sigma), K1 = 0.01, K2 = 0.03,
averaged over the positions where the window fits inside the frame.

Flicker: mean |(x_hat_{t+1} - x_hat_t) - (x_{t+1} - x_t)| over pixels and channels, in grey
levels: how much the reconstruction's frame-to-frame change departs from the source's. A decoder
that adds per-frame noise scores high even when every single frame looks right.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DATA_RANGE = 255.0
BT601 = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=torch.float64)
BT601_OFFSET = torch.tensor([0.0, 128.0, 128.0], dtype=torch.float64)


def rgb_to_yuv(frames: torch.Tensor) -> torch.Tensor:
    """(n, h, w, 3) RGB in [0, 255] (uint8 or float) -> (n, 3, h, w) float64 YUV (BT.601 full range)."""
    rgb = frames.to(torch.float64)
    return (torch.einsum("nhwc,yc->nyhw", rgb, BT601) + BT601_OFFSET.view(1, 3, 1, 1)).clamp(0, 255)


def psnr(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB over all channels of (n, c, h, w); identical images give inf."""
    mse = (reference.double() - test.double()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(DATA_RANGE**2 / mse)


def gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    return kernel[:, None] * kernel[None, :]


def ssim(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel SSIM of (n, c, h, w) images in [0, 255]: shape (n, c)."""
    x, y = reference.double(), test.double()
    n, c, h, w = x.shape
    window = gaussian_window().to(x.device)
    size = window.shape[0]
    if min(h, w) < size:
        raise ValueError(f"SSIM needs frames of at least {size}x{size} pixels, got {h}x{w}")
    filt = lambda v: F.conv2d(v.reshape(n * c, 1, h, w), window[None, None]).reshape(n, c, h - size + 1, w - size + 1)  # noqa: E731
    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov = filt(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(2, 3))


def flicker(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Per-clip flicker of (b, t, h, w, 3) clips in [0, 255]: shape (b,)."""
    difference = lambda v: v.double().diff(dim=1)  # noqa: E731
    return (difference(test) - difference(reference)).abs().flatten(1).mean(dim=1)


def per_clip_metrics(reference: torch.Tensor, test: torch.Tensor) -> dict[str, torch.Tensor]:
    """Table 3's figures per clip of (b, t, h, w, 3) uint8 source and reconstructed clips, each
    averaged over the clip's frames: psnr_y, psnr_yuv, ssim_y, ssim_yuv (YUV BT.601), flicker."""
    if reference.shape != test.shape:
        raise ValueError(f"reference {tuple(reference.shape)} and reconstruction {tuple(test.shape)} differ in shape")
    clips, frames = reference.shape[:2]
    ref_yuv, test_yuv = rgb_to_yuv(reference.flatten(0, 1)), rgb_to_yuv(test.flatten(0, 1))
    per_channel_ssim = ssim(ref_yuv, test_yuv)
    per_frame = {
        "psnr_y": psnr(ref_yuv[:, :1], test_yuv[:, :1]),
        "psnr_yuv": psnr(ref_yuv, test_yuv),
        "ssim_y": per_channel_ssim[:, 0],
        "ssim_yuv": per_channel_ssim.mean(dim=1),
    }
    return {**{name: values.view(clips, frames).mean(dim=1) for name, values in per_frame.items()}, "flicker": flicker(reference, test)}


def reconstruction_metrics(reference: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
    """Table 3's figures averaged over every frame of every clip (clips have equal lengths, so
    this is the mean of the per-clip figures)."""
    per_clip = per_clip_metrics(reference, test)
    return {**{name: float(values.mean()) for name, values in per_clip.items()}, "clips": int(reference.shape[0]), "frames": int(reference.shape[0] * reference.shape[1])}


def grouped_bootstrap(values: np.ndarray, groups: np.ndarray, resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """Means of `values` (n,) over `resamples` bootstrap draws of whole groups (a video's clips
    share its scene, so clips are not independent draws): (resamples,) float64."""
    names, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=len(names))
    counts = np.bincount(inverse, minlength=len(names))
    draws = np.random.default_rng(seed).integers(0, len(names), size=(resamples, len(names)))
    return sums[draws].sum(axis=1) / counts[draws].sum(axis=1)


def spread(values: np.ndarray, groups: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean, bootstrap standard error and 95 % interval of the mean (videos resampled)."""
    means = grouped_bootstrap(values, groups, resamples, seed)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(values.mean()), "std_error": float(means.std()), "low": float(low), "high": float(high)}


def paired_difference(values: np.ndarray, others: np.ndarray, groups: np.ndarray, lower_is_better: bool = False, seed: int = 0) -> dict[str, float | str]:
    """values - others, paired per item, with its spread (groups resampled) and a verdict: better
    or worse only where the whole 95 % interval lies on that side of zero."""
    figures = spread(values - others, groups, seed=seed)
    better, worse = (figures["high"] < 0, figures["low"] > 0) if lower_is_better else (figures["low"] > 0, figures["high"] < 0)
    verdict = "better" if better else "worse" if worse else "within spread"
    return {**figures, "verdict": verdict if len(set(groups)) >= 2 else "one video: no spread"}
