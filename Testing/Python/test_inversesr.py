"""InverseSR methods on a tiny random prior: recovery, settings from the card, progress, budget, geometry."""

import json
import os

import numpy as np
import pytest
import torch

from MRISuperResLib.errors import InputError, ResourceError, UserError
from MRISuperResLib.methods import get_method
from MRISuperResLib.methods.inversesr import budget
from MRISuperResLib.methods.inversesr.solver import CropPad
from MRISuperResLib.physics import OperatorSpec
from MRISuperResLib.pipeline import super_resolve
from MRISuperResLib.priors import store, synthetic
from MRISuperResLib.progress import Progress
from MRISuperResLib.volume import Volume


@pytest.fixture(scope="module")
def prior():
    return synthetic.random_prior(synthetic.tiny_card(), seed=1)


def _psnr(x, ref):
    rng = float(ref.max() - ref.min())
    return float(10 * torch.log10(rng ** 2 / ((x - ref) ** 2).mean()))


def test_decoder_recovers_missing_slices_better_than_bspline(prior):
    # HR = D(z*), LR = every other slice along k: the prior's manifold pins down the missing slices
    z_star = torch.randn(1, 3, 8, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        hr = prior.autoencoder.decode(z_star)[0, 0]
    op = OperatorSpec.make("slice-removal", 2, 2).bind_hr(hr.shape)
    y = op.forward(hr)
    m = get_method("inversesr-decoder")
    settings = m.resolve_settings({"iterations": 100, "lr": 0.1, "init": "encode", "checkpointing": False})
    events = []
    res = m.solve(y, op, prior, settings, Progress(events.append), torch.Generator().manual_seed(0))
    base = _psnr(op.upsample(y, "cubic"), hr)
    ours = _psnr(res.x, hr)
    assert res.x.shape == hr.shape
    assert ours > base + 6.0, (ours, base)
    steps = [e for e in events if e["event"] == "progress" and e["step"] > 0]
    assert len(steps) == 100 and all("loss" in e and e["eta_s"] is not None for e in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert "estimated about" in events[0]["message"]


def test_ldm_runs_through_the_pipeline_with_card_defaults(prior, tmp_path, monkeypatch):
    card = dict(prior.card, method_defaults={"inversesr-ldm": {"cpu": {"iterations": 3, "ddim_steps": 2}}})
    p = store.Prior(card, prior.networks)
    rng = np.random.default_rng(0)
    lr = Volume.from_array(rng.random((16, 16, 8)).astype(np.float32) * 500 + 100, spacing=(1, 1, 2))
    events = []
    spec = OperatorSpec.make("slice-removal", 2, 2)
    out = super_resolve(lr, "inversesr-ldm", spec, None, p, "cpu", 4, Progress(events.append))
    assert out.info["settings"]["iterations"] == 3 and out.info["settings"]["ddim_steps"] == 2
    assert out.volume.grid.shape == (16, 16, 16)
    assert set(out.info["conditioning"]) == {"gender", "age", "ventricular_volume", "brain_volume"}
    assert all(0.0 <= v <= 1.0 for v in out.info["conditioning"].values())
    assert len([e for e in events if e["event"] == "progress" and e["step"] > 0]) == 3
    again = super_resolve(lr, "inversesr-ldm", spec, None, p, "cpu", 4, Progress())
    assert np.array_equal(out.volume.array, again.volume.array)  # same seed, same result
    assert "AI" in out.volume.description or "generat" in out.volume.description.lower()
    assert not [e for e in events if e["event"] == "warning" and "strength" in e["message"]]
    # a partial chain started from pure noise is a mistake the run names, with the fix
    events = []
    super_resolve(lr, "inversesr-ldm", spec, {"strength": 0.3, "iterations": 1}, p, "cpu", 4, Progress(events.append))
    warned = [e["message"] for e in events if e["event"] == "warning" and "strength" in e["message"]]
    assert warned and "init=invert" in warned[0]


def test_mni_sized_input_and_paste_observed(prior):
    # an input bigger than the prior's grid along i and k, smaller along j (like 181x217x181 vs 160x224x160)
    hr_shape = (19, 13, 18)
    rng = torch.Generator().manual_seed(2)
    y_hr = 50 + 200 * torch.rand(hr_shape, generator=rng)
    op = OperatorSpec.make("slice-removal", 2, 3).bind_hr(hr_shape)
    y = op.forward(y_hr)
    m = get_method("inversesr-decoder")
    s = m.resolve_settings({"iterations": 2, "paste_observed": True})
    res = m.solve(y, op, prior, s, Progress(), torch.Generator().manual_seed(0))
    assert res.x.shape == hr_shape
    assert torch.allclose(op.forward(res.x), y, atol=1e-3)  # pasted back: data consistent
    assert res.info["fov_coverage"] == pytest.approx(16 * 13 * 16 / (19 * 13 * 18), abs=1e-4)
    s = m.resolve_settings({"iterations": 2, "paste_observed": True, "paste_spread": "linear"})
    spread = m.solve(y, op, prior, s, Progress(), torch.Generator().manual_seed(0))
    assert torch.allclose(op.forward(spread.x), y, atol=1e-3)  # as exact as pasting
    observed = op.matrices()[2].argmax(1)
    between = [k for k in range(hr_shape[2]) if k not in set(observed.tolist())]
    # the correction reaches the slices between the observed ones, which plain pasting leaves as generated
    assert float((spread.x - res.x)[..., between].abs().max()) > 1.0
    s = m.resolve_settings({"iterations": 2, "paste_observed": False})
    res2 = m.solve(y, op, prior, s, Progress(), torch.Generator().manual_seed(0))
    # outside the prior's field of view the output is the interpolated input, in input units
    assert torch.allclose(res2.x[0], op.upsample(y, "cubic")[0], atol=1e-3)


def test_refused_when_it_cannot_fit(prior, monkeypatch):
    monkeypatch.setattr(budget, "available_memory", lambda device: 1e5)
    m = get_method("inversesr-decoder")
    op = OperatorSpec.make("slice-removal", 2, 2).bind_hr((16, 16, 16))
    with pytest.raises(ResourceError, match="but only 0.0 GB are available"):
        m.solve(torch.rand(16, 16, 8), op, prior, m.resolve_settings({"iterations": 5}), Progress(),
                torch.Generator())


def test_nested_checkpointing_auto_turns_on_only_when_needed_to_fit(prior, monkeypatch):
    flat = budget.estimate(prior.card, "cpu", 1).memory_bytes
    nested = budget.estimate(prior.card, "cpu", 1, nested_checkpointing=True).memory_bytes
    assert nested < flat
    monkeypatch.setattr(budget, "available_memory", lambda device: (flat + nested) / 2 / 0.9)
    m = get_method("inversesr-decoder")
    op = OperatorSpec.make("slice-removal", 2, 2).bind_hr((16, 16, 16))
    y = torch.rand(16, 16, 8, generator=torch.Generator().manual_seed(0))
    events = []
    m.solve(y, op, prior, m.resolve_settings({"iterations": 1}), Progress(events.append), torch.Generator())
    assert "with nested checkpointing" in events[0]["message"]
    with pytest.raises(ResourceError):
        m.solve(y, op, prior, m.resolve_settings({"iterations": 1, "nested_checkpointing": "off"}), Progress(),
                torch.Generator())
    monkeypatch.setattr(budget, "available_memory", lambda device: 1e12)
    events = []
    m.solve(y, op, prior, m.resolve_settings({"iterations": 1}), Progress(events.append), torch.Generator())
    assert "nested" not in events[0]["message"]


def test_prior_errors_are_user_errors(prior):
    m = get_method("inversesr-ldm")
    op = OperatorSpec.make("slice-removal", 2, 2).bind_hr((16, 16, 16))
    with pytest.raises(UserError, match="needs a latent diffusion prior"):
        m.solve(torch.rand(16, 16, 8), op, None, m.resolve_settings(), Progress(), torch.Generator())
    vdm = store.Prior(dict(prior.card, kind="vdm"), {})
    with pytest.raises(InputError, match="'ldm'"):
        m.solve(torch.rand(16, 16, 8), op, vdm, m.resolve_settings(), Progress(), torch.Generator())
    with pytest.raises(InputError, match="ddim_steps"):
        m.resolve_settings({"ddim_steps": 0})


def test_cli_run_with_model_path(prior, tmp_path, capsys, monkeypatch):
    from MRISuperResLib.cli import main
    from MRISuperResLib.volume import read_volume, write_volume

    monkeypatch.setenv(store.ENV_VAR, str(tmp_path / "store"))
    folder = synthetic.write_prior(prior, str(tmp_path / "tiny"))
    lr = Volume.from_array(np.random.default_rng(1).random((16, 16, 8)).astype(np.float32), spacing=(1, 1, 2))
    write_volume(lr, str(tmp_path / "lr.nii.gz"))
    rc = main(["run", "--method", "inversesr-decoder", "--input", str(tmp_path / "lr.nii.gz"), "--output",
               str(tmp_path / "hr.nii.gz"), "--operator", "slice-removal", "--axis", "2", "--factor", "2",
               "--model", folder, "--device", "cpu", "--set", "iterations=2", "--progress", "jsonl"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert rc == 0, lines
    assert lines[-1]["event"] == "result" and lines[-1]["info"]["prior"] == "tiny-ldm"
    assert read_volume(str(tmp_path / "hr.nii.gz")).grid.shape == (16, 16, 16)
    assert os.path.exists(str(tmp_path / "hr.nii.gz"))


def test_perceptual_term_uses_the_priors_encoder(prior):
    from MRISuperResLib.methods.inversesr.solver import _perceptual
    from MRISuperResLib.priors.generator import LatentGenerator

    feats = _perceptual(LatentGenerator(prior), CropPad((16, 16, 16), (16, 16, 16)), 0.0)
    a, b = torch.rand(16, 16, 16), torch.rand(16, 16, 16)
    with torch.no_grad():
        assert torch.equal(feats(a), feats(a.clone())) and (feats(a) - feats(b)).abs().max() > 1e-3
    m = get_method("inversesr-decoder")
    op = OperatorSpec.make("slice-removal", 2, 2).bind_hr((16, 16, 16))
    events = []
    m.solve(op.forward(a), op, prior, m.resolve_settings({"iterations": 2, "perceptual_weight": 0.5}),
            Progress(events.append), torch.Generator())
    steps = [e for e in events if e["event"] == "progress" and e["step"] > 0]
    assert all(e["perceptual"] > 0 and e["loss"] > e["data"] for e in steps)


def test_long_runs_are_announced(prior, monkeypatch):
    monkeypatch.setattr(budget, "throughput", lambda device: 1.0)  # a very slow device
    m = get_method("inversesr-decoder")
    op = OperatorSpec.make("slice-removal", 2, 2).bind_hr((16, 16, 16))
    events = []
    m.solve(torch.rand(16, 16, 8), op, prior, m.resolve_settings({"iterations": 1}), Progress(events.append),
            torch.Generator())
    assert any(e["event"] == "warning" and "estimated to take" in e["message"] for e in events)


def test_samples_average_fits_from_independent_starts(prior):
    # samples=2 must be the mean of the two single fits its starts give, and their std the uncertainty
    hr_shape = (16, 16, 16)
    y_hr = 50 + 200 * torch.rand(hr_shape, generator=torch.Generator().manual_seed(3))
    op = OperatorSpec.make("slice-removal", 2, 2).bind_hr(hr_shape)
    y = op.forward(y_hr)
    m = get_method("inversesr-ldm")
    base = {"iterations": 2, "ddim_steps": 2, "strength": 0.3, "init": "noise", "checkpointing": False,
            "paste_observed": True}
    events = []
    both = m.solve(y, op, prior, m.resolve_settings(dict(base, samples=2)), Progress(events.append),
                   torch.Generator().manual_seed(7))
    first = m.solve(y, op, prior, m.resolve_settings(base), Progress(), torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    torch.randn((1,) + tuple(prior.card["latent"]["shape"]), generator=g)  # the first sample's draw
    second = m.solve(y, op, prior, m.resolve_settings(base), Progress(), g)
    assert float((first.x - second.x).abs().max()) > 1e-3  # different starts, different fits
    assert torch.allclose(both.x, (first.x + second.x) / 2, atol=1e-4)
    assert torch.allclose(both.extras["uncertainty"], (first.x - second.x).abs() / 2 ** 0.5, atol=1e-4)
    assert "uncertainty" not in first.extras and both.info["samples"] == 2
    assert torch.allclose(op.forward(both.x), y, atol=1e-3)  # each sample pasted, so the mean is consistent
    steps = [e for e in events if e["event"] == "progress" and e["step"] > 0]
    assert [e["step"] for e in steps] == [1, 2, 3, 4] and steps[-1]["total"] == 4
    assert "sample 2/2" in steps[-1]["message"]


def test_samples_from_one_deterministic_start_are_refused(prior):
    op = OperatorSpec.make("slice-removal", 2, 2).bind_hr((16, 16, 16))
    for method, init, fix in (("inversesr-ldm", "invert", "init=noise"), ("inversesr-decoder", "encode", "init=random")):
        m = get_method(method)
        with pytest.raises(InputError, match="samples=3 would repeat one fit") as err:
            m.solve(torch.rand(16, 16, 8), op, prior, m.resolve_settings({"init": init, "samples": 3}), Progress(),
                    torch.Generator())
        assert fix in err.value.fix


# ---- P: centre crop/pad between the HR grid and the prior's grid ----

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
