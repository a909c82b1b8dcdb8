"""The HR grid rule: same direction and outer bounds, spacing / factor, LR samples at their physical positions."""

import itertools
import warnings

import numpy as np
import pytest
import torch
from conftest import rotation

from MRISuperResLib.physics import KINDS, OperatorSpec, PartialBlockWarning, hr_grid, lr_grid
from MRISuperResLib.volume import Grid

LR = Grid((20, 24, 9), (1.1, 0.9, 4.0), (-80.25, 10.5, 33.0), rotation(0.2, -0.4, 0.7))


def _spec(kind, axis, factor):
    multi = kind in ("downsample", "kspace")
    return OperatorSpec.make(kind, axis if not multi else [axis], factor)


@pytest.mark.parametrize("kind, axis, factor", list(itertools.product(KINDS, (0, 1, 2), (2, 3, 4))))
def test_hr_grid_keeps_bounds_and_direction(kind, axis, factor):
    op = _spec(kind, axis, factor).bind_lr(LR.shape)
    hr = hr_grid(LR, op)
    assert hr.shape[axis] == LR.shape[axis] * factor
    np.testing.assert_allclose(hr.direction, LR.direction, atol=1e-12)
    np.testing.assert_allclose(hr.spacing[axis], LR.spacing[axis] / factor, atol=1e-12)
    np.testing.assert_allclose(hr.bounds(), LR.bounds(), atol=1e-6)


@pytest.mark.parametrize("kind, axis", list(itertools.product(KINDS, (0, 1, 2))))
def test_lr_samples_sit_at_their_physical_position(kind, axis):
    """Physical point of LR voxel j == physical point of HR continuous index c_j = j f + (f-1)/2."""
    f = 4
    op = _spec(kind, axis, f).bind_lr(LR.shape)
    hr = hr_grid(LR, op)
    for j in (0, 3, LR.shape[axis] - 1):
        ijk = np.zeros(3)
        ijk[axis] = j
        c = ijk.copy()
        c[axis] = j * f + (f - 1) / 2
        np.testing.assert_allclose(LR.index_to_physical(ijk), hr.index_to_physical(c), atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_degrade_then_hr_grid_returns_the_original_grid(kind):
    hr0 = Grid((16, 20, 24), (1.0, 1.0, 1.0), (3.5, -7.25, 11.0), rotation(0.1, 0.2, -0.3))
    spec = _spec(kind, 2, 4)
    op = spec.bind_hr(hr0.shape)
    lr = lr_grid(hr0, op)
    np.testing.assert_allclose(lr.bounds(), hr0.bounds(), atol=1e-6)
    back = hr_grid(lr, spec.bind_lr(lr.shape))
    assert back.allclose(hr0, atol=1e-6)


def test_non_dividing_degrade_extends_the_far_bound_by_under_one_lr_voxel():
    hr0 = Grid((10, 10, 18), (1.0, 1.0, 1.0))
    with pytest.warns(PartialBlockWarning):
        op = OperatorSpec.make("thick-slice", 2, 4).bind_hr(hr0.shape)
    lr = lr_grid(hr0, op)
    assert lr.shape[2] == 5
    np.testing.assert_allclose(lr.bounds()[0], hr0.bounds()[0], atol=1e-9)  # near bound kept
    overshoot = lr.bounds()[1][2] - hr0.bounds()[1][2]
    assert 0 < overshoot < lr.spacing[2]


def test_non_integer_factor_grid():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PartialBlockWarning)
        op = OperatorSpec.make("thick-slice", 2, 2.5).bind_lr((8, 8, 9))
    lr = Grid((8, 8, 9), (1.0, 1.0, 2.5))
    hr = hr_grid(lr, op)
    assert hr.shape[2] == round(9 * 2.5)
    assert hr.spacing[2] == pytest.approx(1.0)
    assert hr.bounds()[0][2] == pytest.approx(lr.bounds()[0][2])


def test_forward_of_linear_ramp_gives_physical_coordinate():
    """A ramp equal to the physical z coordinate degrades (slice removal) to the LR voxels' own z."""
    lr = Grid((4, 4, 6), (1.0, 1.0, 4.0), (0.0, 0.0, 10.0))
    op = OperatorSpec.make("slice-removal", 2, 4).bind_lr(lr.shape)
    hr = hr_grid(lr, op)
    z_hr = hr.index_to_physical(np.stack(np.meshgrid(*[np.arange(n) for n in hr.shape], indexing="ij"), -1))[..., 2]
    z_lr = lr.index_to_physical(np.stack(np.meshgrid(*[np.arange(n) for n in lr.shape], indexing="ij"), -1))[..., 2]
    np.testing.assert_allclose(op.forward(torch.as_tensor(z_hr)).numpy(), z_lr, atol=1e-9)
