"""Affine resampling between grids and registration of a moved, oblique head back to the reference."""

import numpy as np
import pytest
import torch
from conftest import rotation, smooth_volume

from MRISuperResLib.errors import InputError
from MRISuperResLib.physics.resample import AffineResample
from MRISuperResLib.registration import register
from MRISuperResLib.volume import Grid, Volume


def test_resample_identity_and_shift():
    g = Grid((6, 7, 8), (1.0, 2.0, 1.5), (3.0, -1.0, 2.0), rotation(0.2, 0.3, 0.1))
    x = torch.rand(6, 7, 8, dtype=torch.float64)
    torch.testing.assert_close(AffineResample(g, g)(x), x)
    # dst shifted by one voxel along j: dst voxel q samples src voxel q + e_j
    origin = g.index_to_physical([0, 1, 0])
    dst = Grid((6, 6, 8), g.spacing, origin, g.direction)
    torch.testing.assert_close(AffineResample(g, dst)(x), x[:, 1:, :])


def test_resample_adjoint():
    src = Grid((9, 8, 7), (1.0, 1.0, 1.0))
    dst = Grid((5, 6, 7), (1.3, 1.1, 0.9), (0.5, 0.2, -0.3), rotation(0.1, -0.2, 0.3))
    T = np.eye(4)
    T[:3, 3] = [0.7, -0.4, 0.2]
    r = AffineResample(src, dst, T)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(src.shape, generator=g, dtype=torch.float64)
    y = torch.randn(dst.shape, generator=g, dtype=torch.float64)
    assert float((r(x) * y).sum()) == pytest.approx(float((x * r.adjoint(y)).sum()), rel=1e-9)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """nilearn's 2 mm MNI152 template (inside the wheel), as a Volume in ITK geometry."""
    from nilearn import datasets

    from MRISuperResLib.volume import read_volume

    path = str(tmp_path_factory.mktemp("ref") / "t.nii.gz")
    datasets.load_mni152_template(resolution=2).to_filename(path)
    return read_volume(path)


def _moved(reference, T, direction):
    c = reference.grid.index_to_physical(np.asarray(reference.grid.shape) / 2)
    shape = (90, 100, 40)
    spacing = (2.0, 2.0, 5.0)  # thick oblique slices
    origin = c - direction @ (np.asarray(shape) * np.asarray(spacing) / 2)
    g = Grid(shape, spacing, origin, direction)
    return Volume(AffineResample(reference.grid, g, T)(torch.as_tensor(reference.array)).numpy(), g)


def test_rigid_registration_recovers_motion_within_half_a_voxel(reference):
    T = np.eye(4)
    T[:3, :3] = rotation(0.12, -0.08, 0.15)
    T[:3, 3] = [5.0, -3.0, 4.0]
    native = _moved(reference, T, rotation(0.3, 0.1, -0.2))
    mask = reference.array > 0.15 * reference.array.max()
    r = register(native, reference, mask)
    pts = reference.grid.index_to_physical(np.argwhere(mask)[::50])
    ph = np.c_[pts, np.ones(len(pts))]
    err = np.linalg.norm((ph @ np.linalg.inv(r.native_to_prior).T - ph @ np.linalg.inv(T).T)[:, :3], axis=1)
    assert err.max() < 1.0  # half of the 2 mm reference voxel
    assert r.ncc > 0.9


def test_registration_refuses_wrong_contrast_and_non_brains(reference):
    T = np.eye(4)
    native = _moved(reference, T, np.eye(3))
    mask = reference.array > 0.15 * reference.array.max()
    inverted = Volume(np.where(native.array > 0, native.array.max() - native.array, 0).astype(np.float32), native.grid)
    with pytest.raises(InputError, match="T1"):
        register(inverted, reference, mask)
    blob = Volume(smooth_volume(native.grid.shape, seed=1, scale=6.0) * 100, native.grid)
    with pytest.raises(InputError, match="not match"):
        register(blob, reference, mask)
