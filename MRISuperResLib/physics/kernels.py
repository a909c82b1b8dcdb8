"""One-dimensional sampling matrices along a single index axis.

Every operator in this package is separable: it applies an (m, n) matrix along each affected
axis, mapping n high-resolution (HR) samples to m low-resolution (LR) samples.

The grid rule shared by all of them (see `grids.py`): with factor f, LR sample j sits at the
continuous HR index

    c_j = j * f + (f - 1) / 2,

i.e. LR and HR grids share their outer bounds and the LR sample lies at its physical position,
possibly between HR voxel centres. Matrices are float64 numpy arrays; rows are LR samples.
"""

import math

import numpy as np
from scipy import ndimage


def sample_positions(m: int, f: float) -> np.ndarray:
    """Continuous HR indices c_j of the m LR samples."""
    return np.arange(m, dtype=np.float64) * f + (f - 1.0) / 2.0


def linear_sampling(n: int, m: int, f: float) -> np.ndarray:
    """Linear interpolation of the HR line at c_j (clamped to the HR extent).

    An exact pick of one HR slice when c_j is integral (odd integer f): slice removal.
    """
    c = np.clip(sample_positions(m, f), 0.0, n - 1.0)
    lo = np.floor(c).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = c - lo
    a = np.zeros((m, n))
    rows = np.arange(m)
    np.add.at(a, (rows, lo), 1.0 - w)
    np.add.at(a, (rows, hi), w)
    return a


def box_profile(n: int, m: int, f: float, width: float = None) -> np.ndarray:
    """Average over [c_j - w/2, c_j + w/2] (w = f by default), HR voxels weighted by overlap.

    Weights are renormalised over the part of the box inside the image, so a constant stays
    constant at the borders (a partial last block).
    """
    w = f if width is None else width
    c = sample_positions(m, f)[:, None]
    i = np.arange(n, dtype=np.float64)[None, :]
    overlap = np.clip(np.minimum(c + w / 2, i + 0.5) - np.maximum(c - w / 2, i - 0.5), 0.0, None)
    return _normalise_rows(overlap)


def gaussian_profile(n: int, m: int, f: float, fwhm: float = None) -> np.ndarray:
    """Gaussian slice profile centred at c_j with FWHM = f HR voxels (the LR spacing) by default.

    Each HR voxel's weight is the Gaussian integrated over that voxel, truncated at 4 sigma and
    renormalised inside the image.
    """
    sigma = (f if fwhm is None else fwhm) / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    c = sample_positions(m, f)[:, None]
    i = np.arange(n, dtype=np.float64)[None, :]
    from scipy.special import erf

    def cdf(x):
        return 0.5 * (1.0 + erf(x / (sigma * math.sqrt(2.0))))

    weights = cdf(i + 0.5 - c) - cdf(i - 0.5 - c)
    weights[np.abs(i - c) > 4 * sigma + 0.5] = 0.0
    return _normalise_rows(weights)


def band_limit(n: int, m: int, f: float) -> np.ndarray:
    """Keep the central m frequencies of the n-point DFT and evaluate the result at c_j.

    M[j, i] = (1/n) * sum_k w_k cos(2 pi k (c_j - i) / n), k in the central band of an m-point DFT;
    for even m the Nyquist bin is split between +m/2 and -m/2 (w = 1/2 each), which keeps the
    result real. Rows sum to 1 (the DC term), so LR and HR mean intensities agree.
    """
    k, w = _band(m)
    d = sample_positions(m, f)[:, None] - np.arange(n, dtype=np.float64)[None, :]
    phase = 2.0 * np.pi * d[..., None] * k[None, None, :] / n
    return (np.cos(phase) * w).sum(-1) / n


def _band(m: int):
    half = m // 2
    if m % 2:
        k = np.arange(-half, half + 1, dtype=np.float64)
        w = np.ones_like(k)
    else:
        k = np.arange(-half, half + 1, dtype=np.float64)
        w = np.ones_like(k)
        w[0] = w[-1] = 0.5
    return k, w


def _normalise_rows(a: np.ndarray) -> np.ndarray:
    s = a.sum(axis=1, keepdims=True)
    s[s == 0] = 1.0
    return a / s


# ---- interpolators: LR samples (at c_j) -> HR voxel centres, (n, m) matrices ----

def _lr_coordinates(n: int, m: int, f: float) -> np.ndarray:
    """Continuous LR index of every HR voxel centre, clamped to the LR samples' span."""
    u = (np.arange(n, dtype=np.float64) - (f - 1.0) / 2.0) / f
    return np.clip(u, 0.0, m - 1.0)


def spline_interpolation(n: int, m: int, f: float, order: int) -> np.ndarray:
    """Interpolating B-spline of `order` (1 = linear, 3 = cubic) from LR samples to HR voxels.

    Built column by column: interpolation is linear in the data, so column j is the
    interpolation of the j-th unit vector. Beyond the outermost samples the edge value is kept.
    """
    u = _lr_coordinates(n, m, f)
    if m == 1:
        return np.ones((n, 1))
    eye = np.eye(m)
    cols = [ndimage.map_coordinates(eye[j], u[None, :], order=order, mode="mirror", prefilter=order > 1)
            for j in range(m)]
    return np.stack(cols, axis=1)


def sinc_interpolation(n: int, m: int, f: float) -> np.ndarray:
    """Zero-filled k-space upsampling: the band-limited interpolant of the LR samples at HR voxels."""
    return (n / m) * band_limit(n, m, f).T
