"""B-spline baseline: cubic B-spline interpolation (with prefiltering, so it interpolates the samples).

1. x = B y, with B the per-axis cubic B-spline interpolation matrix from LR samples to HR voxel centres.
"""

from .registry import SolveResult, register


@register("bspline", "B-spline (cubic)", "Cubic B-spline interpolation along the degraded axes (baseline).")
def solve(y, physics, prior, settings, progress, generator):
    progress(0, 1, "interpolating")
    x = physics.upsample(y, "cubic")
    progress(1, 1, "done")
    return SolveResult(x)
