"""How close two pictures are: PSNR and SSIM of uint8 H×W×3 images (higher is closer)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

MAX_PSNR = 100.0  # what identical pictures score, instead of infinity (keeps JSON and tables finite)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over all pixels and channels; :data:`MAX_PSNR` when identical."""
    _check_pair(a, b)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return MAX_PSNR if mse == 0 else min(MAX_PSNR, 10.0 * math.log10(255.0 ** 2 / mse))


def ssim(a: np.ndarray, b: np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004: Gaussian window 11, σ 1.5, K1 0.01, K2 0.03), channel mean."""
    _check_pair(a, b)
    x, y = (torch.from_numpy(i.astype(np.float64)).permute(2, 0, 1)[:, None] for i in (a, b))
    size = min(window, a.shape[0], a.shape[1])
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    kernel = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel)  # 'valid' windows, as the reference implementation

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    index = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(index.mean())


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"compare two H×W×3 pictures of one size, got {a.shape} and {b.shape}")
