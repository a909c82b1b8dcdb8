"""Trilinear baseline: linear interpolation of the LR samples along every degraded axis.

1. x = L y, with L the per-axis linear interpolation matrix from LR sample positions to HR voxel centres.
"""

from .registry import SolveResult, register


@register("trilinear", "Trilinear", "Linear interpolation along the degraded axes (baseline).")
def solve(y, physics, prior, settings, progress, generator):
    progress(0, 1, "interpolating")
    x = physics.upsample(y, "linear")
    progress(1, 1, "done")
    return SolveResult(x)
