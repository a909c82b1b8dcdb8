"""Robust intensity scaling between input units and the priors' [0, 1] range (diffusion space [-1, 1]).

The priors were trained on volumes min-max scaled to [0, 1]; an input's extremes are often a few hot voxels,
so the scale uses percentiles. Every operator here keeps constants (its rows sum to 1), hence
A(a x + b) = a A(x) + b and data consistency in diffusion space is data consistency in input units.
"""

from dataclasses import dataclass

import torch

from ..errors import InputError

_MAX_QUANTILE = 1 << 24  # torch.quantile refuses larger inputs


@dataclass(frozen=True)
class Scale:
    lo: float
    hi: float

    def to_unit(self, v: torch.Tensor) -> torch.Tensor:
        """Input units -> diffusion space, where [lo, hi] maps to [-1, 1]."""
        return (v - self.lo) * (2.0 / (self.hi - self.lo)) - 1.0

    def from_unit(self, u: torch.Tensor) -> torch.Tensor:
        return (u + 1.0) * (0.5 * (self.hi - self.lo)) + self.lo

    def std_from_unit(self, s: torch.Tensor) -> torch.Tensor:
        """A standard deviation in diffusion space, in input units."""
        return s * (0.5 * (self.hi - self.lo))


def robust_scale(y: torch.Tensor, low: float = 0.005, high: float = 0.995) -> Scale:
    """Percentiles `low`..`high` of y (0 as the floor when y has no negative values, as MRI magnitudes)."""
    flat = y.detach().flatten().float()
    if not bool(torch.isfinite(flat).all()):
        raise InputError("The input volume contains NaN or infinite values.",
                         "Replace them (e.g. with 0) before super-resolving.")
    step = max(1, -(-flat.numel() // _MAX_QUANTILE))
    sub = flat[::step]
    lo = float(torch.quantile(sub, low))
    hi = float(torch.quantile(sub, high))
    if float(flat.min()) >= 0.0:
        lo = 0.0
    if not hi > lo:
        hi = float(flat.max())
    if not hi > lo:
        raise InputError("The input volume is constant (all voxels %g)." % float(flat.max()),
                         "Give a volume with image content; a constant has nothing to super-resolve.")
    return Scale(lo, hi)
