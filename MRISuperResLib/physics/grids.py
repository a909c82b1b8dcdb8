"""The grids an operator implies, from either side.

One rule for every operator: the HR grid has the same direction and the same outer bounds as
the LR grid, with spacing divided by the factor along the affected axes (when the LR size times
the factor is not an integer, the HR size is rounded and the far bound moves by under a voxel).
LR sample j along axis a then sits at HR continuous index c_j = j f + (f - 1) / 2.
"""

import numpy as np

from ..volume import Grid
from .operators import Operator


def _shift(grid: Grid, shape, spacing, axis_offsets) -> Grid:
    """New grid with `shape` and `spacing` whose origin moves by axis_offsets[a] mm along axis a."""
    origin = np.asarray(grid.origin) + grid.direction_matrix @ np.asarray(axis_offsets, dtype=np.float64)
    return Grid(shape, spacing, origin, grid.direction)


def hr_grid(lr: Grid, op: Operator) -> Grid:
    """HR grid implied by an LR grid (the grid `run` writes)."""
    spacing, offsets = [], []
    for a in range(3):
        f = op.factors[a]
        S = lr.spacing[a]
        s = S / f
        spacing.append(s)
        offsets.append(-S / 2 + s / 2)
    return _shift(lr, op.hr_shape, spacing, offsets)


def lr_grid(hr: Grid, op: Operator) -> Grid:
    """LR grid produced by degrading an HR grid (the grid `degrade` writes)."""
    spacing, offsets = [], []
    for a in range(3):
        f = op.factors[a]
        s = hr.spacing[a]
        S = s * f
        spacing.append(S)
        offsets.append(S / 2 - s / 2)
    return _shift(hr, op.lr_shape, spacing, offsets)
