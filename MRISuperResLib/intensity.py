"""Between input intensities and a prior's range: one map, fitted robustly to the measurement.

Notation: v an intensity in input units, u the same in the prior's range [r0, r1], [lo, hi] robust percentiles of
the LR input y:
    u = (v - lo) * (r1 - r0) / (hi - lo) + r0        v = (u - r0) * (hi - lo) / (r1 - r0) + lo
The latent prior's card gives [r0, r1] and the percentiles ("intensity"); the pixel-space diffusion priors work in
[-1, 1] (their [0, 1] training range, centred), from percentiles 0.5 and 99.5 with 0 as the floor of a
non-negative input. An input's extremes are often a few hot voxels, hence percentiles. Every operator here keeps
constants (its rows sum to 1), so A(a x + b) = a A(x) + b: data consistency in the prior's range is data
consistency in input units.
"""

from dataclasses import dataclass
from typing import List, Sequence

import torch

from .errors import InputError

_MAX_QUANTILE = 1 << 24  # torch.quantile refuses larger inputs


@dataclass(frozen=True)
class IntensityMap:
    lo: float
    hi: float
    r0: float = 0.0
    r1: float = 1.0

    def to_prior(self, v: torch.Tensor) -> torch.Tensor:
        """Input units -> the prior's range: [lo, hi] maps to [r0, r1]."""
        return (v - self.lo) * ((self.r1 - self.r0) / (self.hi - self.lo)) + self.r0

    def to_input(self, u: torch.Tensor) -> torch.Tensor:
        return (u - self.r0) * ((self.hi - self.lo) / (self.r1 - self.r0)) + self.lo


def quantiles(values: torch.Tensor, qs: Sequence[float]) -> List[float]:
    """The `qs` quantiles of a flat tensor; beyond torch.quantile's size limit, of a regular (so deterministic)
    subsample."""
    step = max(1, -(-values.numel() // _MAX_QUANTILE))
    sub = values[::step]
    return [float(v) for v in torch.quantile(sub, torch.tensor(list(qs), dtype=sub.dtype, device=sub.device))]


def fit(y: torch.Tensor, low: float, high: float, r0: float, r1: float, floor_zero: bool = False) -> IntensityMap:
    """[lo, hi] = the `low` and `high` quantiles of y (lo = 0 with `floor_zero` when y has no negative values, as MRI
    magnitudes); hi falls back to y's maximum when the quantiles meet. A constant y is refused: it has nothing to
    super-resolve, and no map of it is invertible."""
    flat = y.detach().flatten().float()
    if not bool(torch.isfinite(flat).all()):
        raise InputError("The input volume contains NaN or infinite values.",
                         "Replace them (e.g. with 0) before super-resolving.")
    lo, hi = quantiles(flat, (low, high))
    if floor_zero and float(flat.min()) >= 0.0:
        lo = 0.0
    if not hi > lo:
        hi = float(flat.max())
    if not hi > lo:
        raise InputError("The input volume is constant (all voxels %g)." % float(flat.max()),
                         "Give a volume with image content; a constant has nothing to super-resolve.")
    return IntensityMap(lo, hi, r0, r1)


def robust_scale(y: torch.Tensor, low: float = 0.005, high: float = 0.995) -> IntensityMap:
    """The pixel-space diffusion priors' map: percentiles `low`..`high` of y to [-1, 1]."""
    return fit(y, low, high, -1.0, 1.0, floor_zero=True)


def card_map(y: torch.Tensor, intensity: dict) -> IntensityMap:
    """A latent prior's map, from its card's "intensity" entry: robust min-max ("percentiles", default 0 and
    99.5) onto its "range", or the identity ("normalisation": "none")."""
    r0, r1 = (float(v) for v in (intensity or {}).get("range", (0.0, 1.0)))
    if str((intensity or {}).get("normalisation", "")).lower().startswith("none"):
        return IntensityMap(r0, r1, r0, r1)
    p_lo, p_hi = (float(v) for v in (intensity or {}).get("percentiles", (0.0, 99.5)))
    return fit(y, p_lo / 100.0, p_hi / 100.0, r0, r1)
