"""paired-ddpm: seeds, progress per step, projection, uncertainty, conditioning, errors, CLI."""

import numpy as np
import pytest
import torch
from conftest import check_answer_independent_of_storage, phantom, smooth_volume
from scipy import ndimage
from test_cli import cli
from test_diffusion_parts import tiny_paired

from MRISuperResLib.diffusion import cosine, paired_model
from MRISuperResLib.diffusion.cards import write_prior
from MRISuperResLib.errors import InputError
from MRISuperResLib.physics import OperatorSpec
from MRISuperResLib.pipeline import super_resolve
from MRISuperResLib.progress import Progress, parse_event
from MRISuperResLib.volume import Volume, read_volume, write_volume

HR = (12, 10, 8)




@pytest.fixture(scope="module")
def prior():
    return tiny_paired(0)[0]


def _lr(kind="slice-removal", axis=2, factor=2.0, hr=HR):
    spec = OperatorSpec.make(kind, axis, factor)
    x = torch.as_tensor(phantom(hr, 1) * 500.0, dtype=torch.float64)
    return spec, Volume.from_array(spec.bind_hr(hr).forward(x).float().numpy())


def _run(prior, lr, spec, seed=0, events=None, **settings):
    s = {"steps": 2}
    s.update(settings)
    prog = Progress(events.append) if events is not None else None
    return super_resolve(lr, "paired-ddpm", spec, s, prior, device="cpu", seed=seed, progress=prog)


def test_seed_determinism_progress_and_eta(prior):
    spec, lr = _lr()
    ev = []
    a = _run(prior, lr, spec, seed=5, events=ev, steps=2)
    assert np.array_equal(_run(prior, lr, spec, seed=5, steps=2).volume.array, a.volume.array)
    assert not np.allclose(_run(prior, lr, spec, seed=6, steps=2).volume.array, a.volume.array)
    assert [e["step"] for e in ev if e["event"] == "progress"] == [1, 2]
    e1 = _run(prior, lr, spec, seed=5, steps=2, eta=1.0).volume.array
    assert np.array_equal(_run(prior, lr, spec, seed=5, steps=2, eta=1.0).volume.array, e1)
    assert not np.allclose(e1, a.volume.array)
    assert a.volume.grid.shape == HR and a.info["patch"] == [8, 8, 8]


def test_mean_start_is_one_deterministic_estimate(prior):
    spec, lr = _lr()
    a = _run(prior, lr, spec, seed=5, steps=2, mean_start=True)
    # the seed no longer matters (eta 0), and it is not any random sample's answer
    assert np.array_equal(_run(prior, lr, spec, seed=6, steps=2, mean_start=True).volume.array, a.volume.array)
    assert not np.allclose(_run(prior, lr, spec, seed=5, steps=2).volume.array, a.volume.array)
    assert "uncertainty" not in a.extras and a.info["samples"] == 1
    with pytest.raises(InputError, match="mean_start gives one deterministic estimate, so samples=3") as err:
        _run(prior, lr, spec, steps=2, mean_start=True, samples=3)
    assert "Set samples=1" in err.value.fix


def test_projection_makes_the_output_consistent(prior):
    spec, lr = _lr()
    y = torch.as_tensor(lr.array, dtype=torch.float64)
    op = spec.bind_lr(lr.grid.shape)

    def rel(out):
        return float((op.forward(torch.as_tensor(out.volume.array, dtype=torch.float64)) - y).norm() / y.norm())

    assert rel(_run(prior, lr, spec, project=True)) < 1e-4
    assert rel(_run(prior, lr, spec, project=False)) > 1e-3


def test_uncertainty_and_untrained_operator_warning(prior):
    spec, lr = _lr("thick-slice", 0, 2.0)
    ev = []
    out = _run(prior, lr, spec, events=ev, samples=2)
    std = out.extras["uncertainty"].array
    assert std.shape == HR and float(std.max()) > 0
    assert any(e["event"] == "warning" and "not trained on thick-slice" in e["message"] for e in ev)


def test_a_skull_stripped_input_keeps_its_air_and_all_of_its_brain(prior):
    # a brain with an oblique surface on an exactly zero background, as skull stripping leaves a scan
    shape = (24, 24, 16)
    i, j, k = np.meshgrid(*[np.arange(n) - (n - 1) / 2.0 for n in shape], indexing="ij")
    ball = np.sqrt(i ** 2 + j ** 2 + (1.3 * k) ** 2) < 7.0
    hr = np.where(ball, 200.0 + 300.0 * smooth_volume(shape, 3, scale=2.0), 0.0)
    spec = OperatorSpec.make("slice-removal", 2, 2.0)
    lr = Volume.from_array(spec.bind_hr(shape).forward(torch.as_tensor(hr)).float().numpy())
    on = _run(prior, lr, spec, samples=2)
    off = _run(prior, lr, spec, samples=2, keep_air=False)
    interp = super_resolve(lr, "bspline", spec, None, None, device="cpu").volume.array
    a, b = on.volume.array, off.volume.array
    # every voxel of the brain and the voxel around it is the model's, exactly as without the rule
    near = ndimage.binary_dilation(ball, iterations=1)
    assert np.array_equal(a[near], b[near])
    # more than two voxels in-plane and one LR slice (plus the interpolation's reach) away, the model's residual
    # (sample noise in air) is gone: the interpolated input, with no spread
    far = ~ndimage.binary_dilation(ball, structure=np.ones((7, 7, 9), bool))
    assert far.sum() > 100
    assert float(np.abs(b[far] - interp[far]).max()) > 1e-2
    assert np.allclose(a[far], interp[far], atol=1e-4)
    assert float(on.extras["uncertainty"].array[far].max()) < 1e-4
    assert 0.3 < on.info["air_kept"] < 1.0 and off.info["air_kept"] is None


def _gate_row(delta, device="cpu", method="paired-ddpm"):
    return {"method": method, "case": "synthetic-1000000", "label": "held-out synthetic", "degradation":
            "slice-removal-8mm", "baseline": "bspline", "delta_psnr_masked_db": delta, "device": device, "error": None}


def test_a_prior_that_lost_to_its_baseline_on_the_gate_is_announced(prior):
    spec, lr = _lr()
    gated = tiny_paired(0)[0]
    gated.card = dict(gated.card, name="tiny", quality_gate={"rows": [
        _gate_row(-2.5), _gate_row(0.3), _gate_row(-9.0, "cuda"), _gate_row(-7.0, "cpu", "inversesr-decoder")]})
    ev = []
    _run(gated, lr, spec, events=ev)
    said = [e["message"] for e in ev if e["event"] == "warning" and "quality gate" in e["message"]]
    # the worst CPU row of this method only: not the GPU row, not another method's
    assert len(said) == 1 and "2.5 dB masked PSNR below bspline" in said[0] and "'tiny'" in said[0]
    gated.card["quality_gate"]["rows"] = [_gate_row(0.4), _gate_row(-9.0, "cuda")]
    ev = []
    _run(gated, lr, spec, events=ev)
    assert not any("quality gate" in e.get("message", "") for e in ev)


def test_conditioning_on_the_operator_changes_the_prediction(prior):
    model = paired_model.PairedModel.from_prior(prior)
    z = torch.randn(1, 1, 8, 8, 8)
    a = model.eps(z, z, paired_model.condition_vector("slice-removal", "gaussian", (1, 1, 2))[None], 500)
    b = model.eps(z, z, paired_model.condition_vector("kspace", "gaussian", (2, 2, 1))[None], 500)
    assert a.shape == z.shape and float((a - b).abs().max()) > 1e-4


def test_wrong_prior_is_a_clear_error(prior):
    spec, lr = _lr()
    bad = tiny_paired(0)[0]
    bad.card = dict(bad.card, schedule={"type": "scaled_linear_beta"})
    with pytest.raises(InputError, match="cosine"):
        _run(bad, lr, spec)
    with pytest.raises(InputError, match="needs a paired prior"):
        _run(None, lr, spec)
    from test_diffusion_parts import tiny_vdm_prior

    with pytest.raises(InputError, match="vdm prior; paired-ddpm needs a paired prior"):
        _run(tiny_vdm_prior(0)[0], lr, spec)


def test_patch_must_suit_the_unet(prior):
    """Every UNet level halves the patch; sizes that do not halve evenly made "Sizes of tensors must match"."""
    spec, lr = _lr()
    with pytest.raises(InputError, match="multiple of 4") as exc:  # the schema, for the default prior's depth
        _run(prior, lr, spec, patch=30)
    assert "patch=32" in exc.value.fix
    deep = tiny_paired(0)[0]
    unet = dict(deep.card["networks"]["unet"])
    unet["kwargs"] = dict(unet["kwargs"], channels=[8, 8, 8, 8])
    deep.card = dict(deep.card, networks=dict(deep.card["networks"], unet=unet))
    with pytest.raises(InputError, match="multiple of 8 for prior"):  # deeper: its own card says how deep
        _run(deep, lr, spec, patch=12)


def test_cli_run_with_uncertainty(tmp_path):
    prior, kw = tiny_paired(3)
    write_prior(str(tmp_path / "prior"), prior.card, {"unet": (prior.networks["unet"], kw)})
    spec, lr = _lr()
    write_volume(lr, str(tmp_path / "lr.nii.gz"))
    r = cli("run", "--method", "paired-ddpm", "--input", tmp_path / "lr.nii.gz", "--output", tmp_path / "sr.nii.gz",
            "--operator", "slice-removal", "--axis", 2, "--factor", 2, "--model", tmp_path / "prior",
            "--set", "steps=2", "--set", "samples=2", "--uncertainty", tmp_path / "std.nii.gz",
            "--progress", "jsonl", check=0)
    events = [e for e in map(parse_event, r.stdout.splitlines()) if e]
    assert [e["step"] for e in events if e["event"] == "progress"] == [1, 2]
    sr, std = read_volume(str(tmp_path / "sr.nii.gz")), read_volume(str(tmp_path / "std.nii.gz"))
    assert sr.grid.shape == HR and sr.grid.allclose(std.grid) and float(std.array.max()) > 0


class _OracleEps(torch.nn.Module):
    """The exact noise predictor of a model that knows the answer x0*: eps = (z - sqrt(ab) x0*) / sqrt(1 - ab)."""

    def __init__(self, x0, alpha_bar):
        super().__init__()
        self.x0, self.ab = x0, alpha_bar.float()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, timesteps):
        ab = self.ab[timesteps.long()].view(-1, 1, 1, 1, 1)
        assert x.shape[1] == 2 + len(paired_model.CONDITION_NAMES)
        return (x[:, :1] - ab.sqrt() * self.x0) / (1 - ab).sqrt()


def _known_answer():
    """(spec, lr, truth, card, x0): a 16^3 case and the residual x0 a model must answer to give the truth."""
    from MRISuperResLib.intensity import robust_scale

    spec, lr = _lr("thick-slice", 2, 4.0, hr=(16, 16, 16))
    truth = torch.as_tensor(phantom((16, 16, 16), 1) * 500.0, dtype=torch.float64)
    y = torch.as_tensor(lr.array)
    scale = robust_scale(y)
    up = spec.bind_lr(lr.grid.shape).upsample(scale.to_prior(y), "cubic")
    card = tiny_paired(0, patch=(16, 16, 16))[0].card
    x0 = ((scale.to_prior(truth.float()) - up) / card["paired"]["residual_scale"])[None, None]
    return spec, lr, truth, card, x0


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampler_with_an_oracle_model_recovers_the_truth(eta):
    # One window covers the volume, so the oracle sees the whole residual; the DDIM chain, the residual scaling
    # and the way back to input units must then give the truth, far above the B-spline baseline.
    from MRISuperResLib.metrics import psnr
    from MRISuperResLib.priors.store import Prior

    spec, lr, truth, card, x0 = _known_answer()
    prior = Prior(card, {"unet": _OracleEps(x0, cosine.cosine_alpha_bar(1000))})
    out = _run(prior, lr, spec, steps=10, eta=eta, samples=2)
    base = super_resolve(lr, "bspline", spec, {}, None, device="cpu")
    rng = float(truth.max() - truth.min())
    ours = psnr(out.volume.array, truth.numpy(), data_range=rng)
    assert ours > psnr(base.volume.array, truth.numpy(), data_range=rng) + 20
    one = _run(prior, lr, spec, steps=1, eta=eta, mean_start=True)  # one step from zero noise reads x0 directly
    assert psnr(one.volume.array, truth.numpy(), data_range=rng) > psnr(base.volume.array, truth.numpy(),
                                                                        data_range=rng) + 20
    assert float(out.extras["uncertainty"].array.max()) < 1e-3 * rng  # samples agree when the model is certain


class _OddInNoise(_OracleEps):
    """A model whose answer is the truth plus an odd function of its input noise: x0_hat = x0* + c z."""

    def __init__(self, x0, alpha_bar, c):
        super().__init__(x0, alpha_bar)
        self.c = c

    def forward(self, x, timesteps):
        ab = self.ab[timesteps.long()].view(-1, 1, 1, 1, 1)
        return (x[:, :1] - ab.sqrt() * (self.x0 + self.c * x[:, :1])) / (1 - ab).sqrt()


def test_antithetic_pairs_cancel_noise_the_answer_is_odd_in():
    from MRISuperResLib.priors.store import Prior

    spec, lr, truth, card, x0 = _known_answer()
    prior = Prior(card, {"unet": _OddInNoise(x0, cosine.cosine_alpha_bar(1000), 0.05)})
    rng = float(truth.max() - truth.min())
    paired = _run(prior, lr, spec, steps=1, samples=2, seed=3)
    alone = _run(prior, lr, spec, steps=1, samples=2, seed=3, antithetic=False)
    err_paired = float(np.abs(paired.volume.array - truth.numpy()).max()) / rng
    err_alone = float(np.abs(alone.volume.array - truth.numpy()).max()) / rng
    assert err_paired < 1e-4 < 1e-2 < err_alone  # the pair's odd parts cancel; two independent draws' do not
    # each sample is still a draw of the model's answer: their spread is the uncertainty map in both cases
    assert float(paired.extras["uncertainty"].array.mean()) > 1e-3 * rng


class _SkewedAlongI(_OracleEps):
    """A model whose answer is a local function of the input plus an error that runs one way along its first
    axis (i): x0_hat = g up + c ramp_i. A mirror image along i sees the same error, which is the opposite error
    once flipped back."""

    def __init__(self, alpha_bar, g, c):
        super().__init__(torch.zeros(()), alpha_bar)
        self.g, self.c = g, c

    def forward(self, x, timesteps):
        ab = self.ab[timesteps.long()].view(-1, 1, 1, 1, 1)
        n = x.shape[2]
        ramp = (torch.arange(n, dtype=x.dtype) - (n - 1) / 2.0).view(1, 1, n, 1, 1)
        return (x[:, :1] - ab.sqrt() * (self.g * x[:, 1:2] + self.c * ramp)) / (1 - ab).sqrt()


def test_mirrored_samples_come_back_aligned_and_cancel_a_one_way_error():
    from MRISuperResLib.priors.store import Prior

    spec, lr, truth, card, _ = _known_answer()
    prior = Prior(card, {"unet": _SkewedAlongI(cosine.cosine_alpha_bar(1000), 0.1, 0.02)})
    plain = Prior(card, {"unet": _SkewedAlongI(cosine.cosine_alpha_bar(1000), 0.1, 0.0)})
    want = _run(plain, lr, spec, steps=1, samples=4, seed=3).volume.array  # no error: the local part only
    flipped = _run(prior, lr, spec, steps=1, samples=4, seed=3, mirror=True).volume.array
    unflipped = _run(prior, lr, spec, steps=1, samples=4, seed=3, mirror=False).volume.array
    rng = float(truth.max() - truth.min())
    # the mirrored pair is flipped back onto the input's grid, and its error cancels the unmirrored pair's
    assert float(np.abs(flipped - want).max()) < 1e-4 * rng < 1e-2 * rng < float(np.abs(unflipped - want).max())


def test_the_mirror_runs_left_right_whatever_the_index_order():
    from dataclasses import replace

    from MRISuperResLib.methods.paired_ddpm import _mirrors

    op = OperatorSpec.make("slice-removal", 2, 4.0).bind_hr((16, 16, 16))
    assert _mirrors(op, 4, True) == [(), (0,), (), (0,)]  # identity grid: i is left-right; pairs mirrored alike
    coronal_rows = replace(op, hr_direction=(0, 1, 0, 0, 0, -1, -1, 0, 0))  # index axis j runs along x
    assert _mirrors(coronal_rows, 3, False) == [(), (1,), ()]
    sagittal = replace(OperatorSpec.make("slice-removal", 0, 4.0).bind_hr((16, 16, 16)), hr_direction=None)
    assert _mirrors(sagittal, 4, True) == [()] * 4  # thick slices left-right: a mirror would move them


def test_the_network_sees_its_training_orientation_however_the_scan_is_stored(prior):
    """The same physical scan stored LPS (as Slicer loads DICOM) or LAS (as the prior trained) gets the same answer:
    the network is shown the same view of both."""
    import copy

    from MRISuperResLib.methods.paired_ddpm import patch_view
    from MRISuperResLib.priors.store import Prior

    spec, lps = _lr()
    check_answer_independent_of_storage(lambda p, v: _run(p, v, spec, samples=2, seed=4), prior, lps)
    card = copy.deepcopy(prior.card)
    card["grid"]["direction"] = [1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0]
    oriented = Prior(card, prior.networks)

    class Scan:  # a coronal DICOM series: columns left, rows inferior, slices (thick) posterior
        axes = (2,)
        hr_direction = (1, 0, 0, 0, 0, 1, 0, -1, 0)

    # k-only prior: left stays i, superior (rows flipped) goes to j, the thick axis stays k, turned anterior
    assert patch_view(oriented, Scan) == ([0, 1, 2], [1, 2], {"input": "LIP", "network": "LSA"})
    Scan.axes = (0,)  # thick columns (left-right): the network's left-right axis trades places with k
    assert patch_view(oriented, Scan) == ([1, 2, 0], [0, 1], {"input": "LIP", "network": "SAL"})
    Scan.hr_direction = None  # no grid: the thick axis is only turned to k
    assert patch_view(oriented, Scan) == ([2, 1, 0], [], None)


def test_gpu_out_of_memory_halves_the_batch_then_says_what_to_do(prior, monkeypatch):
    """The network is made to fail like a full GPU whenever it gets more than `fits` patches at once."""
    from MRISuperResLib.diffusion import paired_model
    from MRISuperResLib.errors import ResourceError

    spec, lr = _lr()
    real_eps = paired_model.PairedModel.eps
    fits = {"n": 2}
    sizes = []

    def eps(self, z, up, cond, t):
        sizes.append(z.shape[0])
        if z.shape[0] > fits["n"]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_eps(self, z, up, cond, t)

    monkeypatch.setattr(paired_model.PairedModel, "eps", eps)
    events = []
    ref = _run(prior, lr, spec, batch=1, patch=8, overlap=0.0)
    sizes.clear()
    out = _run(prior, lr, spec, events=events, batch=8, patch=8, overlap=0.0)
    assert out.info["batch"] == 2 and max(sizes[-3:]) <= 2  # later steps keep the batch that fitted
    assert any(e.get("event") == "warning" and "retrying with 2 patches" in e.get("message", "") for e in events)
    # the same patches, only grouped differently (batched kernels round differently)
    np.testing.assert_allclose(out.volume.array, ref.volume.array, rtol=0, atol=1e-4 * np.ptp(ref.volume.array))
    fits["n"] = 0
    with pytest.raises(ResourceError, match="one 8x8x8 patch.*patch=64"):
        _run(prior, lr, spec, batch=4, patch=8, overlap=0.0)


@pytest.mark.slow
def test_whole_1mm_brain_fits_patch_wise(prior):
    # 160 x 224 x 160 from 4 mm slices: only the volume-sized buffers grow with the brain, not the network's
    # activations (one batch of patches at a time).
    import resource

    spec = OperatorSpec.make("thick-slice", 2, 4.0)
    lr = Volume.from_array(np.random.default_rng(0).random((160, 224, 40)).astype(np.float32) * 100)
    big = tiny_paired(0, patch=(32, 32, 32))[0]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = super_resolve(lr, "paired-ddpm", spec, {"steps": 1}, big, device="cpu")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024.0
    assert out.volume.grid.shape == (160, 224, 160) and np.isfinite(out.volume.array).all()
    assert grown_mb < 1500, grown_mb
