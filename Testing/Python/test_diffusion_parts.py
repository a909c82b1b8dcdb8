"""Building blocks of the pixel-space diffusion methods: gamma, VDM loss, cosine schedule, DDIM, sliding window.

Also holds the tiny-prior builders the method tests import.
"""

import math

import pytest
import torch

from MRISuperResLib.diffusion import cosine, paired_model, patches, vdm
from MRISuperResLib.diffusion.cards import paired_card, vdm_card
from MRISuperResLib.errors import InputError
from MRISuperResLib.priors.ddim import ddim_step
from MRISuperResLib.priors.store import Prior


def _randomise(net, seed, scale=0.05):
    # MONAI zero-initialises the output convolution; random weights everywhere make the network matter.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net.eval().requires_grad_(False)


def tiny_vdm(seed=0, exponents=(3,)):
    """(unet kwargs, unet, gamma) of a very small VDM."""
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(seed)
    kw = vdm.default_unet(exponents, channels=(8, 16))
    unet = DiffusionModelUNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})
    return kw, unet, vdm.MonotoneGamma(hidden=8)


def tiny_vdm_prior(seed=0):
    kw, unet, gamma = tiny_vdm(seed)
    card = vdm_card("tiny-vdm", vdm.tabulate(gamma, 101), (3,), (16, 16, 8))
    card["networks"] = {"unet": {"class": "DiffusionModelUNet", "kwargs": kw, "weights": "unet.safetensors"}}
    return Prior(card, {"unet": _randomise(unet, seed)}), kw


def tiny_paired(seed=0, patch=(8, 8, 8)):
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(seed)
    kw = paired_model.default_unet(channels=(8, 16))
    unet = DiffusionModelUNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})
    card = paired_card("tiny-paired", patch, 0.5, [{"operator": "slice-removal", "axes": [2], "factors": [2.0]}],
                       (16, 16, 16))
    card["networks"] = {"unet": {"class": "DiffusionModelUNet", "kwargs": kw, "weights": "unet.safetensors"}}
    return Prior(card, {"unet": _randomise(unet, seed)}), kw


# ---- gamma and the VDM loss ----

def test_monotone_gamma_is_increasing_with_its_endpoints():
    g = vdm.MonotoneGamma(hidden=16, gamma_min=-10.0, gamma_max=4.0)
    with torch.no_grad():
        g.l2.weight.normal_(0, 3)  # a wiggly h must still give a monotone gamma
        v = g(torch.linspace(0, 1, 501))
    assert bool((v[1:] >= v[:-1] - 1e-6).all())
    assert float(v[0]) == pytest.approx(-10.0, abs=1e-5) and float(v[-1]) == pytest.approx(4.0, abs=1e-4)
    table = vdm.tabulate(g, 101)
    tg = vdm.TabulatedGamma(table)
    t = torch.rand(50)
    assert torch.allclose(tg(t), g(t).detach(), atol=0.05)
    assert float(tg(torch.tensor([0.0]))) == pytest.approx(table[0])


def test_tabulated_gamma_rejects_bad_tables():
    with pytest.raises(InputError, match="not increasing"):
        vdm.TabulatedGamma([0.0, 1.0, 0.5])
    with pytest.raises(InputError, match="malformed"):
        vdm.TabulatedGamma([1.0])


def test_variance_preserving_closed_forms():
    for g in (-12.0, -1.5, 0.0, 3.0):
        assert vdm.alpha2(g) + vdm.sigma2(g) == pytest.approx(1.0, abs=1e-12)
        assert vdm.alpha2(g) / vdm.sigma2(g) == pytest.approx(math.exp(-g))  # SNR = exp(-gamma)
        gt = torch.tensor(g, dtype=torch.float64)
        assert float(vdm.alpha2(gt)) == pytest.approx(vdm.alpha2(g), abs=1e-12)


def test_ancestral_step_matches_the_gaussian_posterior():
    # With the true noise, the step's mean is the mean of q(z_s | z_t, x) (VDM eq. 33).
    g_t, g_s = 1.0, -2.0
    x, eps = torch.randn(1000, dtype=torch.float64), torch.randn(1000, dtype=torch.float64)
    a_t, s_t2 = math.sqrt(vdm.alpha2(g_t)), vdm.sigma2(g_t)
    a_s, s_s2 = math.sqrt(vdm.alpha2(g_s)), vdm.sigma2(g_s)
    z_t = a_t * x + math.sqrt(s_t2) * eps
    a_ts = a_t / a_s
    s_ts2 = s_t2 - a_ts ** 2 * s_s2
    mu = (a_ts * s_s2 / s_t2) * z_t + (a_s * s_ts2 / s_t2) * x
    got = vdm.ancestral_step(z_t, eps, g_t, g_s, None)
    assert torch.allclose(got, mu, atol=1e-10)


def test_vdm_loss_trains_network_and_gamma_endpoints():
    _, unet, gamma = tiny_vdm(1)
    unet.train()
    model = vdm.VDM(unet, gamma, (3,))
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    params = list(unet.parameters()) + list(gamma.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(5):  # the same draws every step: the loss of this batch must fall
        opt.zero_grad()
        loss, parts = vdm.vdm_loss(model, x, torch.Generator().manual_seed(3))
        loss.backward()
        assert gamma.gamma_0.grad is not None and float(gamma.gamma_0.grad.abs()) > 0
        opt.step()
        losses.append(float(loss.detach()))
    assert set(parts) >= {"diffusion", "prior", "recon"}
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


# ---- cosine schedule and DDIM ----

def test_cosine_schedule_keeps_signal_where_the_published_formula_lost_it():
    ab = cosine.cosine_alpha_bar(1000)
    assert bool((ab[1:] < ab[:-1]).all())
    assert float(ab[0]) > 0.999 and float(ab[-1]) < 1e-3
    assert float(ab[200]) > 0.85  # the seed project's schedule had no signal left by step ~200
    t = 500
    want = math.cos(((t + 1) / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    assert float(ab[t]) == pytest.approx(want, rel=1e-6)


def test_ddim_step_with_true_noise_is_exact():
    ab = cosine.cosine_alpha_bar(1000)
    x0, eps = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    pairs = cosine.sampling_pairs(10, ab)
    assert pairs[-1][2] == 1.0 and [p[0] for p in pairs] == sorted([p[0] for p in pairs], reverse=True)
    bound = float(x0.abs().max())
    for _t, ab_t, ab_prev in pairs:
        z = math.sqrt(ab_t) * x0 + math.sqrt(1 - ab_t) * eps
        want = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
        assert torch.allclose(ddim_step(z, eps, ab_t, ab_prev), want, atol=1e-9)
        assert torch.allclose(ddim_step(z, eps, ab_t, ab_prev, clip=bound), want, atol=1e-9)
    # A wrong eps near t = T would blow x0_hat up by 1/sqrt(ab_t); the clip bounds the final step's output.
    t, ab_t, _ = pairs[0]
    z = math.sqrt(ab_t) * x0 + math.sqrt(1 - ab_t) * eps
    out = ddim_step(z, -eps, ab_t, 1.0, clip=2.0)
    assert float(out.abs().max()) <= 2.0 + 1e-12
    with pytest.raises(ValueError, match="noise"):
        ddim_step(z, eps, 0.5, 0.8, eta=1.0)


def test_condition_vector_names_operator_and_factors():
    v = paired_model.condition_vector("thick-slice", "box", (1.0, 1.0, 4.0))
    assert v.shape == (len(paired_model.CONDITION_NAMES),)
    assert v[paired_model.CONDITION_NAMES.index("thick-slice-box")] == 1 and float(v[:5].sum()) == 1
    assert float(v[7]) == pytest.approx(math.log(4.0)) and float(v[5]) == 0.0
    with pytest.raises(InputError):
        paired_model.condition_vector("warp", "gaussian", (1, 1, 2))


def test_paired_loss_decreases():
    prior, _ = tiny_paired(2)
    model = paired_model.PairedModel.from_prior(prior)
    model.unet.train().requires_grad_(True)
    hr = torch.rand(1, 1, 8, 8, 8) * 2 - 1
    up = hr + 0.1 * torch.randn(hr.shape)
    cond = paired_model.condition_vector("slice-removal", "gaussian", (1, 1, 2))[None]
    opt = torch.optim.Adam(model.unet.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):  # the same draws every step: the loss of this batch must fall
        opt.zero_grad()
        loss, _ = paired_model.paired_loss(model, hr, up, cond, torch.Generator().manual_seed(1))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_paired_loss_high_t_fraction_moves_the_draws_to_the_end_of_the_schedule():
    prior, _ = tiny_paired(2)
    model = paired_model.PairedModel.from_prior(prior)
    hr = torch.rand(64, 1, 8, 8, 8) * 2 - 1
    cond = paired_model.condition_vector("slice-removal", "gaussian", (1, 1, 2))[None].expand(64, -1)
    n = model.alpha_bar.numel()
    with torch.no_grad():
        _, uniform = paired_model.paired_loss(model, hr, hr, cond, torch.Generator().manual_seed(3))
        _, high = paired_model.paired_loss(model, hr, hr, cond, torch.Generator().manual_seed(3), high_t_fraction=1.0)
        _, half = paired_model.paired_loss(model, hr, hr, cond, torch.Generator().manual_seed(3), high_t_fraction=0.5)
    assert high["t_mean"] >= paired_model.HIGH_T_FROM * n
    assert uniform["t_mean"] < 0.75 * n and uniform["t_mean"] < half["t_mean"] < high["t_mean"]


# ---- sliding window ----

@pytest.mark.parametrize("shape,patch,overlap", [((1, 2, 20, 17, 9), (8, 8, 8), 0.25), ((2, 1, 5, 30, 12), (8, 8, 8), 0.5),
                                                 ((1, 1, 33, 7), (16, 16), 0.0), ((3, 1, 4, 4, 4), (8, 8, 8), 0.25)])
def test_sliding_window_identity_gives_back_the_input(shape, patch, overlap):
    x = torch.randn(shape)
    calls = []

    def ident(p):
        assert tuple(p.shape[2:]) == patch
        calls.append(p.shape[0])
        return p

    out = patches.sliding_window(ident, x, patch, overlap, batch=3)
    assert out.shape == x.shape
    assert torch.allclose(out, x, atol=1e-6, rtol=0)
    assert max(calls) <= 3 * shape[0]


def test_sliding_window_blends_a_per_patch_offset_smoothly():
    # Each patch adds its own constant; the blend must be a convex combination (within the offsets' range).
    x = torch.zeros(1, 1, 24, 24, 24)
    count = [0]

    def offset(p):
        out = torch.cat([p[i:i + 1] + float(count[0] + i) for i in range(p.shape[0])], 0)
        count[0] += p.shape[0]
        return torch.cat([out, 2 * out], 1)  # channel count may change

    out = patches.sliding_window(offset, x, (8, 8, 8), 0.5, batch=5)
    assert out.shape == (1, 2, 24, 24, 24)
    assert float(out[:, 0].min()) >= 0 and float(out[:, 0].max()) <= count[0] - 1
    assert torch.allclose(out[:, 1], 2 * out[:, 0])
    assert patches.corners(24, 8, 0.5) == [0, 4, 8, 12, 16]
    assert patches.corners(21, 8, 0.25) == [0, 6, 12, 13]


def test_sampling_chain_starts_where_x0_is_recoverable():
    ab = cosine.cosine_alpha_bar(1000)
    pairs = cosine.sampling_pairs(5, ab)
    t0, ab0, _ = pairs[0]
    assert cosine.START_ALPHA_BAR <= ab0 < 2 * cosine.START_ALPHA_BAR  # as late as it can start, no later
    assert [p[0] for p in pairs] == sorted((p[0] for p in pairs), reverse=True) and pairs[-1][2] == 1.0


def test_noise_in_opposite_pairs_and_an_odd_count_leaves_the_last_sample_free():
    from MRISuperResLib.diffusion.noise import sample_noise

    e = sample_noise((5, 3, 4), torch.Generator().manual_seed(1), antithetic=True)
    assert torch.equal(e[2:4], -e[0:2]) and not torch.allclose(e[4], -e[0]) and not torch.allclose(e[4], -e[1])
    free = sample_noise((5, 3, 4), torch.Generator().manual_seed(1))
    assert torch.equal(free[:2], e[:2]) and not torch.allclose(free[2:4], e[2:4])
    assert torch.equal(sample_noise((1, 3), torch.Generator().manual_seed(1), antithetic=True),
                       sample_noise((1, 3), torch.Generator().manual_seed(1)))
