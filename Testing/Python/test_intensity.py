"""The one intensity map: fitted robustly, invertible, the same for every method; a constant input is refused."""

import pytest
import torch

from MRISuperResLib.errors import InputError
from MRISuperResLib.intensity import IntensityMap, card_map, quantiles, robust_scale


def test_card_map_round_trip_and_range():
    g = torch.Generator().manual_seed(0)
    y = 300 + 900 * torch.rand(20, 20, 5, generator=g)
    m = card_map(y, {"range": [0, 1], "percentiles": [0, 99.5]})
    u = m.to_prior(y)
    assert float(u.min()) == pytest.approx(0.0, abs=1e-6)
    assert float(torch.quantile(u.flatten(), 0.995)) == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(m.to_input(u), y, rtol=1e-6)
    ident = card_map(y, {"range": [0, 1], "normalisation": "none"})
    assert torch.equal(ident.to_prior(y), y)


def test_robust_scale_maps_the_percentiles_to_minus_one_and_one():
    g = torch.Generator().manual_seed(1)
    y = 1000 * torch.rand(30, 30, 6, generator=g)
    m = robust_scale(y)
    assert m.lo == 0.0 and (m.r0, m.r1) == (-1.0, 1.0)  # a non-negative input keeps 0 as its floor
    assert float(m.to_prior(torch.tensor(m.hi))) == pytest.approx(1.0)
    assert torch.allclose(m.to_input(m.to_prior(y)), y, rtol=1e-5, atol=1e-3)
    assert robust_scale(y - 500).lo < 0  # signed inputs keep their own low percentile


def test_a_map_with_the_diffusion_range_is_the_scaling_the_samplers_had():
    # (v - lo) * (2 / (hi - lo)) - 1 and back, to the bit: the samplers' numbers did not move when the maps merged
    v = torch.rand(1000, generator=torch.Generator().manual_seed(2)) * 700 + 3
    m = IntensityMap(3.5, 690.25, -1.0, 1.0)
    assert torch.equal(m.to_prior(v), (v - 3.5) * (2.0 / (690.25 - 3.5)) - 1.0)
    u = m.to_prior(v)
    assert torch.equal(m.to_input(u), (u + 1.0) * (0.5 * (690.25 - 3.5)) + 3.5)


def test_constant_and_non_finite_inputs_are_refused_for_every_prior():
    const = torch.full((4, 4, 4), 5.0)
    with pytest.raises(InputError, match="constant"):
        card_map(const, {"range": [0, 1]})
    with pytest.raises(InputError, match="constant"):
        robust_scale(torch.full((4, 4, 4), -5.0))
    assert (robust_scale(const).lo, robust_scale(const).hi) == (0.0, 5.0)  # non-negative: 0 stays the floor
    bad = torch.rand(4, 4, 4)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        card_map(bad, {"range": [0, 1]})


def test_a_mostly_empty_input_falls_back_to_its_maximum():
    y = torch.zeros(20, 20, 20)
    y[0, 0, 0] = 4.0  # the 99.5th percentile is 0, as the 0th: the map takes the maximum instead
    m = card_map(y, {"range": [0, 1]})
    assert (m.lo, m.hi) == (0.0, 4.0)


def test_quantiles_match_torch_and_subsample_large_inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(10000, generator=g)
    assert quantiles(x, (0.005, 0.995)) == [float(torch.quantile(x, 0.005)), float(torch.quantile(x, 0.995))]
    big = torch.arange((1 << 24) + 10, dtype=torch.float32)
    lo, hi = quantiles(big, (0.0, 1.0))  # torch.quantile alone refuses this size
    assert lo == 0.0 and hi > 0.99 * big[-1]
