"""Baseline methods through the common method interface and pipeline."""

import numpy as np
import pytest
import torch
from conftest import smooth_volume

from MRISuperResLib.errors import InputError
from MRISuperResLib.methods import available, get_method
from MRISuperResLib.metrics import psnr
from MRISuperResLib.physics import OperatorSpec, hr_grid, lr_grid
from MRISuperResLib.pipeline import infer_degradation, super_resolve
from MRISuperResLib.progress import Progress
from MRISuperResLib.volume import GENERATED_DESCRIPTION, Grid, Volume


def degrade(hr: Volume, spec: OperatorSpec) -> Volume:
    op = spec.bind_hr(hr.grid.shape)
    y = op.forward(torch.as_tensor(hr.array, dtype=torch.float64)).float().numpy()
    return Volume(y, lr_grid(hr.grid, op))


@pytest.fixture(scope="module")
def smooth_hr():
    return Volume.from_array(smooth_volume((24, 24, 48), seed=2, scale=3.0) * 500, origin=(1.5, -2.0, 7.0))


def test_registry_lists_baselines_with_schema():
    names = [m.name for m in available()]
    for n in ("trilinear", "bspline", "sinc"):
        assert n in names
        j = get_method(n).to_json()
        assert set(j) >= {"name", "title", "description", "settings"}
    with pytest.raises(InputError, match="Unknown method"):
        get_method("magic")


@pytest.mark.parametrize("kind", ["slice-removal", "thick-slice"])
def test_bspline_beats_trilinear_on_smooth_volume(smooth_hr, kind):
    spec = OperatorSpec.make(kind, 2, 4)
    lr = degrade(smooth_hr, spec)
    scores = {}
    for m in ("trilinear", "bspline"):
        out = super_resolve(lr, m, spec, device="cpu")
        assert out.volume.grid.allclose(smooth_hr.grid)
        scores[m] = psnr(smooth_hr.array, out.volume.array, 500.0)
    assert scores["bspline"] > scores["trilinear"] + 0.5, scores


def test_sinc_recovers_band_limited_volume_from_kspace():
    """Zero-filling inverts k-space truncation exactly for band-limited volumes (odd LR size: no split Nyquist bin)."""
    hr = Volume.from_array(smooth_volume((12, 12, 46), seed=4, scale=2.0) * 500)
    spec = OperatorSpec.make("kspace", [2], 2)
    op = spec.bind_hr(hr.grid.shape)
    assert op.lr_shape[2] % 2 == 1
    band_limited = Volume(op.upsample(op.forward(torch.as_tensor(hr.array, dtype=torch.float64)), "sinc")
                          .float().numpy(), hr.grid)
    lr = degrade(band_limited, spec)
    out = super_resolve(lr, "sinc", spec, device="cpu")
    np.testing.assert_allclose(out.volume.array, band_limited.array, atol=1e-3)
    worse = super_resolve(lr, "bspline", spec, device="cpu")
    assert np.abs(worse.volume.array - band_limited.array).max() > 1e-2


@pytest.mark.parametrize("method", ["trilinear", "bspline"])
def test_interpolators_pass_through_samples(method):
    """With slice removal by an odd factor the LR slices are HR slices; interpolation keeps them."""
    lr = Volume.from_array(np.random.default_rng(0).random((5, 6, 7)), spacing=(1, 1, 3))
    spec = OperatorSpec.make("slice-removal", 2, 3)
    out = super_resolve(lr, method, spec, device="cpu")
    np.testing.assert_allclose(out.volume.array[..., 1::3], lr.array, atol=1e-5)
    assert out.info["residual_rel"] < 1e-5
    assert out.residual.grid.allclose(lr.grid)


def test_inferred_degradation_and_output_conventions():
    lr = Volume.from_array(np.random.default_rng(1).random((10, 4, 12)) * 3000, spacing=(0.9, 5.4, 0.9))
    spec = infer_degradation(lr.grid)
    assert spec.kind == "thick-slice" and spec.axes == (1,) and spec.factors[1] == pytest.approx(6.0)
    out = super_resolve(lr, "bspline", device="cpu")
    assert out.volume.array.dtype == np.float32
    assert out.volume.grid.shape == (10, 24, 12)
    assert out.volume.array.max() > 1000  # input units, not rescaled
    assert out.volume.description != GENERATED_DESCRIPTION  # baselines are not generative
    with pytest.raises(InputError, match="isotropic"):
        infer_degradation(Grid((4, 4, 4), (1, 1, 1.2)))
    with pytest.raises(InputError, match="More than one"):
        infer_degradation(Grid((4, 4, 4), (1, 3, 3)))


def test_progress_reaches_the_end():
    events = []
    lr = Volume.from_array(np.random.default_rng(1).random((6, 6, 6)), spacing=(1, 1, 2))
    super_resolve(lr, "bspline", progress=Progress(events.append), device="cpu")
    fr = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fr[-1] == 1.0 and fr == sorted(fr)


def test_hr_grid_of_oblique_input_matches_rule():
    from conftest import rotation

    lr = Volume.from_array(np.random.default_rng(3).random((8, 9, 5)), spacing=(1, 1, 5),
                           origin=(10.0, 20.0, -30.0), direction=rotation(0.4, 0.1, -0.2))
    spec = OperatorSpec.make("thick-slice", 2, 5)
    out = super_resolve(lr, "trilinear", spec, device="cpu")
    assert out.volume.grid.allclose(hr_grid(lr.grid, spec.bind_lr(lr.grid.shape)), atol=1e-9)
    np.testing.assert_allclose(out.volume.grid.bounds(), lr.grid.bounds(), atol=1e-6)
