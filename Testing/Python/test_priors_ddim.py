"""The DDIM chain we own: schedules, timesteps, the closed-form update, and the generator's chain."""

import math

import pytest
import torch
from monai.networks.schedulers import NoiseSchedules

from MRISuperResLib.errors import InputError
from MRISuperResLib.priors.ddim import NoiseSchedule, ddim_pairs, ddim_step, ddim_timesteps, inversesr_timesteps


@pytest.mark.parametrize("kind", ["scaled_linear_beta", "linear_beta", "cosine"])
def test_schedule_matches_monai(kind):
    ours = NoiseSchedule(kind, 1000, 0.0015, 0.0205).alpha_bar()
    if kind == "cosine":
        _, _, theirs = NoiseSchedules[kind](num_train_timesteps=1000)
    else:
        theirs = torch.cumprod(1 - NoiseSchedules[kind](num_train_timesteps=1000, beta_start=0.0015,
                                                        beta_end=0.0205), 0)
    assert torch.allclose(ours.float(), theirs.float(), rtol=1e-4, atol=1e-6)
    assert bool((ours[1:] < ours[:-1]).all())


def test_inversesr_chain():
    ts = inversesr_timesteps()
    assert len(ts) == 46 and ts[0] == 991 and ts[1] == 969 and ts[-2] == 23 and ts[-1] == 1
    assert all(a - b == 22 for a, b in zip(ts, ts[1:]))
    assert ddim_timesteps(46) == ts  # the general rule reproduces the paper's chain
    ab = NoiseSchedule().alpha_bar()
    pairs = ddim_pairs(ts, ab, final_alpha_bar=float(ab[0]))
    assert pairs[-1] == (1, float(ab[1]), float(ab[0]))  # last alpha_prev is alpha_bar[0], not 1
    assert pairs[0][2] == float(ab[969])


@pytest.mark.parametrize("n", [1, 2, 10, 50, 999, 1000])
def test_general_chain(n):
    ts = ddim_timesteps(n, 1000)
    assert len(ts) == n and len(set(ts)) == n
    assert ts == sorted(ts, reverse=True) and 0 <= ts[-1] and ts[0] <= 999
    if n > 1:
        assert ts[0] >= 1000 - 1000 // (n - 1) - 2  # spread to near T, not bunched at the start


def test_chain_rejects_bad_steps():
    with pytest.raises(InputError, match="between 1 and 1000"):
        ddim_timesteps(0)
    with pytest.raises(InputError):
        ddim_timesteps(1001)


def test_step_is_closed_form():
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    ab_t, ab_prev = 0.3, 0.8
    x0 = (z - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
    want = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
    assert torch.allclose(ddim_step(z, eps, ab_t, ab_prev), want, atol=1e-6)


def test_chain_with_oracle_noise_lands_on_the_clean_sample():
    # z_t = sqrt(ab_t) x0 + sqrt(1-ab_t) e for a fixed e: a model that predicts e keeps the chain on that
    # path, so the deterministic chain ends exactly at sqrt(ab_0) x0 + sqrt(1-ab_0) e.
    ab = NoiseSchedule().alpha_bar()
    g = torch.Generator().manual_seed(1)
    x0, e = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    ts = ddim_timesteps(20)
    z = math.sqrt(ab[ts[0]]) * x0 + math.sqrt(1 - ab[ts[0]]) * e
    for _t, ab_t, ab_prev in ddim_pairs(ts, ab, final_alpha_bar=float(ab[0])):
        z = ddim_step(z, e, ab_t, ab_prev)
    assert torch.allclose(z, math.sqrt(ab[0]) * x0 + math.sqrt(1 - ab[0]) * e, atol=1e-10)


def test_unknown_schedule_is_a_user_error():
    with pytest.raises(InputError, match="noise schedule"):
        NoiseSchedule("quadratic")
    with pytest.raises(InputError, match="epsilon"):
        NoiseSchedule(prediction="v_prediction")


def test_partial_strength_chain():
    assert ddim_timesteps(4, 1000, strength=0.3) == [298, 199, 100, 1]
    assert ddim_timesteps(1, 1000, strength=0.5) == [500]
    assert ddim_timesteps(46, 1000, strength=1.0) == inversesr_timesteps()
    with pytest.raises(InputError, match="strength"):
        ddim_timesteps(4, 1000, strength=0.0)
    with pytest.raises(InputError, match="between 1 and 11"):
        ddim_timesteps(20, 1000, strength=0.01)
