"""Zero-filled sinc baseline: the LR samples' spectrum, zero-padded to the HR grid.

1. x = (n/m) M^T y per degraded axis, M the central-band (k-space truncation) matrix: the
   band-limited interpolant of y. For k-space truncation with an odd LR size this is A^+ y.
"""

from .registry import SolveResult, register


@register("sinc", "Zero-filled sinc", "Zero-filled k-space (band-limited) interpolation (baseline).")
def solve(y, physics, prior, settings, progress, generator):
    progress(0, 1, "zero-filling k-space")
    x = physics.upsample(y, "sinc")
    progress(1, 1, "done")
    return SolveResult(x)
