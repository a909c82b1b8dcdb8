"""HR grid <-> prior grid by centre crop/pad, and the intensity map to the prior's range."""

import pytest
import torch

from MRISuperResLib.priors.space import (
    CropPad,
    IntensityMap,
    apply_reorientation,
    orientation_code,
    reorientation,
    undo_reorientation,
)


def test_crop_pad_like_mni_to_the_published_grid():
    # 181 x 217 x 181 (MNI) onto 160 x 224 x 160: crop i and k, pad j, at a scale the test can afford
    cp = CropPad((19, 13, 18), (16, 16, 16))
    x = torch.arange(19 * 13 * 18, dtype=torch.float32).reshape(19, 13, 18)
    p = cp.to_prior(x, background=-1.0)
    assert p.shape == (16, 16, 16)
    assert torch.equal(p[:, 1:14, :], x[1:17, :, 1:17])  # centred: d//2 cut in front, the rest behind
    assert bool((p[:, 0] == -1).all()) and bool((p[:, 14:] == -1).all())
    fill = torch.full((19, 13, 18), 7.0)
    back = cp.to_hr(p, fill)
    assert back.shape == x.shape
    assert torch.equal(back[1:17, :, 1:17], x[1:17, :, 1:17])
    assert bool((back[0] == 7).all()) and bool((back[17:] == 7).all()) and bool((back[:, :, 0] == 7).all())
    assert cp.covered_fraction() == pytest.approx(16 * 13 * 16 / (19 * 13 * 18))


def test_crop_pad_identity_and_gradients():
    cp = CropPad((16, 16, 16), (16, 16, 16))
    x = torch.rand(16, 16, 16)
    assert cp.to_prior(x) is x and cp.to_hr(x, x) is x
    cp = CropPad((12, 20, 16), (16, 16, 16))
    xp = torch.rand(16, 16, 16, requires_grad=True)
    cp.to_hr(xp, torch.zeros(12, 20, 16)).sum().backward()
    assert xp.grad.sum() == 12 * 16 * 16  # only the voxels that land on the HR grid get gradient


def test_intensity_map_round_trip_and_range():
    g = torch.Generator().manual_seed(0)
    y = 300 + 900 * torch.rand(20, 20, 5, generator=g)
    m = IntensityMap.fit(y, {"range": [0, 1], "percentiles": [0, 99.5]})
    u = m.to_prior(y)
    assert float(u.min()) == pytest.approx(0.0, abs=1e-6)
    assert float(torch.quantile(u.flatten(), 0.995)) == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(m.to_input(u), y, rtol=1e-6)
    ident = IntensityMap.fit(y, {"range": [0, 1], "normalisation": "none"})
    assert torch.equal(ident.to_prior(y), y)
    const = IntensityMap.fit(torch.full((4, 4, 4), 5.0), {"range": [0, 1]})
    assert torch.isfinite(const.to_prior(torch.full((2,), 5.0))).all()


def test_orientation_codes_and_reorientation():
    assert orientation_code([1, 0, 0, 0, 1, 0, 0, 0, 1]) == "LPS"  # ITK identity
    assert orientation_code([[-1, 0, 0], [0, -1, 0], [0, 0, 1]]) == "RAS"
    assert orientation_code([[0, 0, -1], [0.1, -0.99, 0], [0.99, 0.1, 0]]) == "SAR"
    perm, flips = reorientation("RAS", "LAS")
    assert perm == (0, 1, 2) and flips == (0,)
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    for src in ("SAR", "LPI", "ASL", "LAS"):
        perm, flips = reorientation(src, "LAS")
        y = apply_reorientation(x, perm, flips)
        assert torch.equal(undo_reorientation(y, perm, flips), x)
    perm, flips = reorientation("SAR", "LAS")  # i points Superior, j Anterior, k Right
    y = apply_reorientation(x[0], perm, flips)
    assert y.shape == (5, 4, 3) and y[0, 0, 0] == x[0, 0, 0, 4]
    with pytest.raises(ValueError):
        reorientation("LLS", "LAS")
