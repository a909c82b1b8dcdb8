"""kspace-vdm: data consistency, the noise-level closed form, the k-space equivalence, means, seeds, progress, CLI."""

import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import check_answer_independent_of_storage, phantom
from test_cli import cli
from test_diffusion_parts import tiny_vdm, tiny_vdm_prior

from MRISuperResLib.diffusion import vdm
from MRISuperResLib.diffusion.cards import vdm_card, write_prior
from MRISuperResLib.errors import InputError
from MRISuperResLib.methods import kspace_vdm
from MRISuperResLib.physics import OperatorSpec
from MRISuperResLib.pipeline import super_resolve
from MRISuperResLib.progress import Progress, parse_event
from MRISuperResLib.volume import Volume, read_volume, write_volume

HR = (16, 16, 8)




@pytest.fixture(scope="module")
def prior():
    return tiny_vdm_prior(0)[0]


def _lr(axes=(0, 1), factor=2.0, seed=0, hr=HR):
    spec = OperatorSpec.make("kspace", axes, factor)
    x = torch.as_tensor(phantom(hr, seed) * 300.0 + 20.0)
    op = spec.bind_hr(hr)
    return spec, op, Volume.from_array(op.forward(x.double()).float().numpy(), spacing=(2.0, 2.0, 1.0))


def _run(prior, lr, spec, seed=0, events=None, **settings):
    s = {"steps": 3}
    s.update(settings)
    prog = Progress(events.append) if events is not None else None
    return super_resolve(lr, "kspace-vdm", spec, s, prior, device="cpu", seed=seed, progress=prog)


def _rel_residual(out, lr, spec):
    op = spec.bind_lr(lr.grid.shape)
    y = torch.as_tensor(lr.array, dtype=torch.float64)
    r = op.forward(torch.as_tensor(out.volume.array, dtype=torch.float64)) - y
    return float(r.norm() / y.norm())


@pytest.mark.parametrize("lam", [1.0, 0.3])
def test_projection_reproduces_the_input(prior, lam):
    spec, _, lr = _lr()
    out = _run(prior, lr, spec, **{"lambda": lam})
    assert out.volume.grid.shape == HR
    assert _rel_residual(out, lr, spec) < 1e-4
    assert out.info["residual_rel"] < 1e-4


def test_guidance_without_projection(prior):
    spec, _, lr = _lr()
    hard = _rel_residual(_run(prior, lr, spec, project=False, **{"lambda": 1.0}), lr, spec)
    none = _rel_residual(_run(prior, lr, spec, project=False, **{"lambda": 0.0}), lr, spec)
    # lambda = 1 leaves only the noise of the last level (sigma_0 / alpha_0 = exp(gamma_0 / 2) ~ 1e-3).
    assert hard < 1e-2 and none > 50 * hard


def test_measurement_at_noise_level_closed_form():
    spec = OperatorSpec.make("kspace", (0, 2), (2.0, 3.0))
    op = spec.bind_hr((12, 5, 9))
    g = torch.Generator().manual_seed(0)
    x = torch.randn((12, 5, 9), generator=g, dtype=torch.float64)
    eps = torch.randn((12, 5, 9), generator=g, dtype=torch.float64)
    y = op.forward(x)
    for gam in (-8.0, -1.0, 0.5, 4.0):
        a, s = math.sqrt(1 / (1 + math.exp(gam))), math.sqrt(1 / (1 + math.exp(-gam)))
        y_t = kspace_vdm.measurement_at_level(y, op, gam, eps)
        assert torch.allclose(y_t, a * y + s * op.forward(eps), atol=1e-12)
        assert torch.allclose(y_t, op.forward(a * x + s * eps), atol=1e-10)  # A z_t = y_t under the forward process
        z = torch.randn((12, 5, 9), generator=g, dtype=torch.float64)
        for lam in (1.0, 0.4):
            mixed = kspace_vdm.mix(z, y_t, op, lam)
            assert torch.allclose(op.forward(mixed), lam * y_t + (1 - lam) * op.forward(z), atol=1e-10)
            p = op.dagger(op.forward(mixed - z))  # only the measured subspace moves
            assert torch.allclose(p, mixed - z, atol=1e-10)


def test_mixing_equals_the_kspace_formulation():
    # Odd LR size: the operator is a central crop of the DFT (scaled m/n, phase-shifted), mixing is k-space mixing.
    n, m = 21, 7
    op = OperatorSpec.make("kspace", 2, n / m).bind_hr((1, 1, n))
    g = torch.Generator().manual_seed(1)
    x = torch.randn((1, 1, n), generator=g, dtype=torch.float64)
    y = torch.randn((1, 1, m), generator=g, dtype=torch.float64)
    X, Y = torch.fft.fft(x[0, 0]), torch.fft.fft(y[0, 0])
    k = torch.fft.fftfreq(n, 1 / n)
    band = k.abs() <= m // 2
    delta = (n / m - 1) / 2
    Ax = torch.fft.fft(op.forward(x)[0, 0])
    km = torch.fft.fftfreq(m, 1 / m)
    want = (m / n) * X[[int(v) % n for v in km]] * torch.exp(2j * math.pi * km * delta / n)
    assert torch.allclose(Ax, want, atol=1e-10)
    lam = 0.6
    Yh = torch.zeros(n, dtype=torch.complex128)
    Yh[[int(v) % n for v in km]] = (n / m) * Y * torch.exp(-2j * math.pi * km * delta / n)
    mixed_k = torch.where(band, lam * Yh + (1 - lam) * X, X)
    got = kspace_vdm.mix(x, y, op, lam)[0, 0]
    assert torch.allclose(got, torch.fft.ifft(mixed_k).real, atol=1e-10)


def test_fft_normalisation_keeps_the_mean(prior):
    spec, op, lr = _lr()
    x = torch.as_tensor(phantom(HR, 0) * 300.0 + 20.0, dtype=torch.float64)
    assert float(op.forward(x).mean()) == pytest.approx(float(x.mean()), rel=1e-10)
    out = _run(prior, lr, spec, **{"lambda": 0.5})
    assert float(out.volume.array.mean()) == pytest.approx(float(lr.array.mean()), rel=1e-4)


def test_seed_determinism_and_progress_per_step(prior):
    spec, _, lr = _lr()
    ev = []
    a = _run(prior, lr, spec, seed=3, events=ev, steps=4)
    b = _run(prior, lr, spec, seed=3)
    c = _run(prior, lr, spec, seed=4)
    assert np.array_equal(_run(prior, lr, spec, seed=3, steps=4).volume.array, a.volume.array)
    assert not np.allclose(b.volume.array, c.volume.array)
    steps = [e["step"] for e in ev if e["event"] == "progress"]
    assert steps == [1, 2, 3, 4] and ev[-1]["fraction"] == 1.0


def test_samples_give_an_uncertainty_map(prior):
    spec, _, lr = _lr()
    out = _run(prior, lr, spec, samples=3)
    std = out.extras["uncertainty"].array
    assert std.shape == HR and float(std.min()) >= 0 and float(std.max()) > 0
    assert _rel_residual(out, lr, spec) < 1e-4  # the mean of consistent samples stays consistent
    assert "uncertainty" not in _run(prior, lr, spec).extras


def test_paired_samples_are_the_default_and_can_be_turned_off(prior):
    spec, _, lr = _lr()
    paired = _run(prior, lr, spec, samples=2, seed=3)
    free = _run(prior, lr, spec, samples=2, seed=3, antithetic=False)
    assert not np.allclose(paired.volume.array, free.volume.array)  # the second chain's noise differs
    assert _rel_residual(paired, lr, spec) < 1e-4 and _rel_residual(free, lr, spec) < 1e-4
    assert float(paired.extras["uncertainty"].array.max()) > 0


def test_through_plane_truncation_slices_along_another_axis(prior):
    spec, _, lr = _lr(axes=2, factor=2.0, hr=(12, 16, 16))
    out = _run(prior, lr, spec)
    assert out.info["slice_axis"] == 1 and out.volume.grid.shape == (12, 16, 16)
    assert _rel_residual(out, lr, spec) < 1e-4
    assert kspace_vdm.slice_axis(OperatorSpec.make("kspace", (0, 1), 2).bind_hr(HR)) == 2


def test_the_network_sees_its_training_orientation_however_the_scan_is_stored(prior):
    """Same slices shown to the network and the same noise, whichever way the scan is stored."""
    spec, _, lps = _lr()
    check_answer_independent_of_storage(lambda p, v: _run(p, v, spec, samples=2, seed=4), prior, lps)


def test_clear_errors(prior):
    spec = OperatorSpec.make("kspace", (0, 1, 2), 2.0)
    lr = Volume.from_array(np.random.default_rng(0).random((8, 8, 8)).astype(np.float32))
    with pytest.raises(InputError, match="all three axes"):
        super_resolve(lr, "kspace-vdm", spec, {"steps": 1}, prior, device="cpu")
    with pytest.raises(InputError, match="not built for"):
        super_resolve(lr, "kspace-vdm", OperatorSpec.make("thick-slice", 2, 2.0), {"steps": 1}, prior, device="cpu")
    spec, _, lr = _lr()
    with pytest.raises(InputError, match="needs a VDM prior"):
        super_resolve(lr, "kspace-vdm", spec, {"steps": 1}, None, device="cpu")
    flat = Volume.from_array(np.zeros(lr.grid.shape, np.float32))
    with pytest.raises(InputError, match="constant"):
        super_resolve(flat, "kspace-vdm", spec, {"steps": 1}, prior, device="cpu")
    from test_diffusion_parts import tiny_paired

    with pytest.raises(InputError, match="needs a vdm prior"):
        super_resolve(lr, "kspace-vdm", spec, {"steps": 1}, tiny_paired(0)[0], device="cpu")
    with pytest.raises(InputError, match="lambda"):
        super_resolve(lr, "kspace-vdm", spec, {"lambda": 1.5}, prior, device="cpu")


def test_cli_writes_uncertainty_with_samples(tmp_path):
    kw, unet, gamma = tiny_vdm(5)
    card = vdm_card("cli-vdm", vdm.tabulate(gamma, 101), (3,), HR)
    write_prior(str(tmp_path / "prior"), card, {"unet": (unet, kw)})
    spec, _, lr = _lr()
    write_volume(lr, str(tmp_path / "lr.nii.gz"))
    r = cli("run", "--method", "kspace-vdm", "--input", tmp_path / "lr.nii.gz", "--output", tmp_path / "sr.nii.gz",
            "--operator", "kspace", "--axis", 0, 1, "--factor", 2, "--model", tmp_path / "prior", "--seed", 1,
            "--set", "steps=2", "--set", "samples=2", "--uncertainty", tmp_path / "std.nii.gz",
            "--progress", "jsonl", check=0)
    events = [e for e in map(parse_event, r.stdout.splitlines()) if e]
    assert [e["step"] for e in events if e["event"] == "progress"] == [1, 2]
    assert events[-1]["event"] == "result"
    sr, std = read_volume(str(tmp_path / "sr.nii.gz")), read_volume(str(tmp_path / "std.nii.gz"))
    assert sr.grid.shape == HR and sr.grid.allclose(std.grid)
    assert float(std.array.max()) > 0 and float(std.array.min()) >= 0
    card_back = json.load(open(os.path.join(tmp_path, "prior", "model.json")))
    assert card_back["kind"] == "vdm" and len(card_back["networks"]["unet"]["sha256"]) == 64


class _OracleEps(torch.nn.Module):
    """The exact noise predictor of a prior concentrated on one image: eps = (z - alpha x*) / sigma."""

    def __init__(self, target, g0, g1):
        super().__init__()
        self.target, self.g0, self.g1 = target, g0, g1
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, timesteps):
        g = (self.g0 + timesteps / 1000.0 * (self.g1 - self.g0)).view(-1, 1, 1, 1)
        z = x[:, :1]
        return (z - torch.sigmoid(-g).sqrt() * self.target) / torch.sigmoid(g).sqrt()


@pytest.mark.parametrize("axes", [(0, 1), (2,)])
def test_sampler_with_an_oracle_prior_recovers_the_truth(axes):
    # An exact denoiser of the true image must be followed to it: any error in the noise levels, the ancestral
    # step, the mixing or the slicing would leave the output near the zero-filled (sinc) baseline instead.
    from MRISuperResLib.intensity import robust_scale
    from MRISuperResLib.metrics import psnr
    from MRISuperResLib.priors.store import Prior

    hr = (16, 16, 16)
    spec, op, lr = _lr(axes, 2.0, seed=4, hr=hr)
    truth = torch.as_tensor(phantom(hr, 4) * 300.0 + 20.0)
    scale = robust_scale(torch.as_tensor(lr.array))
    axis = kspace_vdm.slice_axis(op)
    target = torch.movedim(scale.to_prior(truth), axis, 0)[:, None].float()
    table = torch.linspace(-13.3, 5.0, 101).tolist()
    card = vdm_card("oracle", table, (3,), hr)
    prior = Prior(card, {"unet": _OracleEps(target, table[0], table[-1])})
    out = super_resolve(lr, "kspace-vdm", spec, {"steps": 20, "batch": 64, "lambda": 0.5}, prior, device="cpu")
    sinc = super_resolve(lr, "sinc", spec, {}, None, device="cpu")
    rng = float(truth.max() - truth.min())
    ours = psnr(out.volume.array, truth.numpy(), data_range=rng)
    base = psnr(sinc.volume.array, truth.numpy(), data_range=rng)
    assert ours > base + 15, (ours, base)
