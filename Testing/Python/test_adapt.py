"""Subject-adaptive paired-ddpm: pairs from the scan's own in-plane detail, the fine-tuning, and its guards."""

import hashlib
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import ROOT, check_answer_independent_of_storage, smooth_volume
from test_diffusion_parts import tiny_paired

from MRISuperResLib.diffusion.adapt import ScanPairs, degrade_along, why_not_adaptable
from MRISuperResLib.errors import InputError
from MRISuperResLib.metrics import psnr
from MRISuperResLib.physics import OperatorSpec, lr_grid
from MRISuperResLib.pipeline import super_resolve
from MRISuperResLib.progress import Progress
from MRISuperResLib.volume import Grid, Volume


@pytest.mark.parametrize("kind", ["slice-removal", "thick-slice"])
@pytest.mark.parametrize("b", [0, 1])
def test_a_pair_is_the_runs_operator_applied_along_an_in_plane_axis(kind, b):
    # The run degrades k by 4; a pair degrades in-plane axis b by the same operator, turned so b becomes k.
    spec = OperatorSpec.make(kind, axis=2, factor=4)
    v = torch.as_tensor(smooth_volume((40, 44, 48), seed=b, scale=1.5) * 2 - 1)
    physics = replace(spec.bind_hr(v.shape), hr_spacing=(1.0, 1.0, 1.0))
    pairs = ScanPairs(v, physics, (8, 8, 8), margin=4)
    centre = (20, 22, 24)
    hr, up = pairs.pair(b, centre)
    block = v[12:28, 14:30, 16:32].double()  # patch 8 + 2 x margin 4, the centre voxel at its index 8
    turned = block.transpose(b, 2)  # b at k, where the run's own operator acts
    op = spec.bind_hr(tuple(turned.shape))
    want = op.upsample(op.forward(turned), "cubic")[4:12, 4:12, 4:12]
    assert torch.allclose(up.double(), want, atol=1e-6)
    assert torch.allclose(hr.double(), turned[4:12, 4:12, 4:12], atol=1e-6)
    # Along the run's own axis, the same helper is the run's operator itself.
    whole = physics.upsample(physics.forward(v.double()), "cubic")
    assert torch.allclose(degrade_along(v.double(), spec, 2), whole, atol=1e-9)
    # The pair's conditioning is the run's operator at k (the axis the pair was turned to).
    assert pairs.cond[-3:].tolist() == pytest.approx([0.0, 0.0, float(np.log(4.0))])


def test_inputs_without_finer_in_plane_detail_are_not_adapted():
    iso = OperatorSpec.make("slice-removal", axis=2, factor=4).bind_lr((16, 16, 16))
    assert "in-plane spacing" in why_not_adaptable(replace(iso, hr_spacing=(1.0, 1.0, 0.25)))
    assert why_not_adaptable(replace(iso, hr_spacing=(1.0, 1.0, 1.0))) is None
    k = OperatorSpec.make("kspace", axis=(0, 1), factor=2).bind_lr((16, 16, 16))
    assert "several axes" in why_not_adaptable(k)
    with pytest.raises(InputError, match="cannot teach"):
        ScanPairs(torch.zeros(32, 32, 32), replace(iso, hr_spacing=(1.0, 1.0, 0.25)), (8, 8, 8))


def _striped_head(shape=(40, 40, 40), period=6.0):
    """A head whose detail is known and alike along every axis: a product of cosines of one period inside a ball."""
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    c = [(n - 1) / 2.0 for n in shape]
    r = np.sqrt(sum(((a - m) / (0.45 * n)) ** 2 for a, m, n in zip((i, j, k), c, shape)))
    tex = np.cos(2 * np.pi * i / period) * np.cos(2 * np.pi * j / period) * np.cos(2 * np.pi * k / period)
    return np.where(r < 1.0, 0.6 + 0.3 * tex, 0.0).astype(np.float32)


def test_learning_from_the_scan_beats_the_prior_as_it_came():
    # A tiny prior that adds nothing to B-spline (its output layer zeroed, as MONAI initialises it); the scan's
    # in-plane slices show it what thick slices hide along k, the same stripes attenuated by the slice profile.
    torch.manual_seed(0)
    prior = tiny_paired(1, patch=(8, 8, 8))[0]
    prior.card["schedule"]["prediction"] = "sample"  # as the shipped prior: x0 itself, not eps amplified ~30x at t = T
    with torch.no_grad():
        for p in prior.networks["unet"].out[-1].parameters():
            p.zero_()
    truth = _striped_head()
    spec = OperatorSpec.make("thick-slice", axis=2, factor=2)
    hr_grid = Grid(truth.shape, (1.0, 1.0, 1.0))
    op = spec.bind_hr(truth.shape)
    lr = Volume(op.forward(torch.as_tensor(truth, dtype=torch.float64)).float().numpy(), lr_grid(hr_grid, op))
    common = {"steps": 1, "samples": 1, "mean_start": True, "patch": 16}
    events = []
    plain = super_resolve(lr, "paired-ddpm", spec, common, prior, device="cpu")
    tuned = super_resolve(lr, "paired-ddpm", spec, dict(common, adapt="auto", adapt_steps=60, adapt_seconds=0,
                                                        adapt_lr=1e-3), prior, device="cpu",
                          progress=Progress(events.append))
    mask = truth > 0
    p_plain = psnr(truth, plain.volume.array, 1.0, mask)
    p_tuned = psnr(truth, tuned.volume.array, 1.0, mask)
    assert p_tuned > p_plain + 1.0, (p_plain, p_tuned)
    rec = tuned.info["adapted"]
    assert rec["steps"] == 60 and rec["loss_last"] < rec["loss_first"]
    # the time split bench reports: the fine-tuning, then the sampling
    phases = tuned.info["phase_seconds"]
    assert set(phases) == {"adaptation", "sampling"} and phases["sampling"] > 0
    assert phases["adaptation"] >= rec["seconds"] > 0 and plain.info["phase_seconds"]["adaptation"] < rec["seconds"]
    # The bar shows the phase with an ETA, then sampling takes the rest of it.
    learn = [e for e in events if e["event"] == "progress" and e["message"].startswith("learning from this scan")]
    assert len(learn) == 60 and learn[-1]["fraction"] <= 0.5 + 1e-9 and learn[-1]["eta_s"] is not None
    rest = [e for e in events if e["event"] == "progress" and e not in learn]
    assert rest and rest[-1]["fraction"] == pytest.approx(1.0) and min(e["fraction"] for e in rest) >= 0.5
    assert plain.info["adapted"] is None
    # auto adapts thick slices (above) but not slice removal, where the prior alone measured better
    spec_sr = OperatorSpec.make("slice-removal", axis=2, factor=2)
    op_sr = spec_sr.bind_hr(truth.shape)
    lr_sr = Volume(op_sr.forward(torch.as_tensor(truth, dtype=torch.float64)).float().numpy(), lr_grid(hr_grid, op_sr))
    auto = super_resolve(lr_sr, "paired-ddpm", spec_sr, dict(common, adapt="auto"), prior, device="cpu")
    assert auto.info["adapted"] is None


def test_learning_from_the_scan_does_not_depend_on_how_the_scan_is_stored():
    """Pairs are cut in the network's view, so the same physical scan stored LPS or LAS fine-tunes the same weights
    and gets the same answer; with a card that names no orientation each is learnt as stored."""
    prior = tiny_paired(3, patch=(8, 8, 8))[0]
    truth = _striped_head((24, 22, 16))
    spec = OperatorSpec.make("thick-slice", axis=2, factor=2)
    op = spec.bind_hr(truth.shape)
    lps = Volume(op.forward(torch.as_tensor(truth, dtype=torch.float64)).float().numpy(),
                 lr_grid(Grid(truth.shape, (1.0, 1.0, 1.0)), op))  # identity direction: rows run posterior

    def run(p, volume):
        out = super_resolve(volume, "paired-ddpm", spec, {"steps": 1, "samples": 2, "patch": 8, "adapt": "on",
                                                          "adapt_steps": 3, "adapt_seconds": 0, "adapt_batch": 2,
                                                          "adapt_lr": 1e-2}, p, device="cpu", seed=5)
        assert out.info["adapted"]["steps"] == 3
        return out

    check_answer_independent_of_storage(run, prior, lps)


def test_pairs_mirror_only_across_their_degraded_axis():
    """Sampling mirrors left-right unless left-right is the thick axis; the pairs likewise, in their own view."""
    spec = OperatorSpec.make("slice-removal", axis=2, factor=4)
    v = torch.as_tensor(smooth_volume((32, 32, 32), seed=1) * 2 - 1)
    las = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    axial = replace(spec.bind_hr(v.shape), hr_spacing=(1.0, 1.0, 1.0), hr_direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    pairs = ScanPairs(v, axial, (8, 8, 8), margin=4, trained_direction=las)
    assert pairs.left_right == 0
    assert pairs.mirror_axis(0) is None and pairs.mirror_axis(1) == 0  # b = 0 (left-right) goes to k
    sagittal = replace(OperatorSpec.make("slice-removal", axis=0, factor=4).bind_hr(v.shape),
                       hr_spacing=(1.0, 1.0, 1.0), hr_direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    pairs = ScanPairs(v, sagittal, (8, 8, 8), margin=4, trained_direction=las)
    assert pairs.left_right == 2  # the view SAL: left-right (thick) at k
    assert pairs.mirror_axis(0) == 0 and pairs.mirror_axis(1) == 1  # each pair's k is an in-plane axis
    assert ScanPairs(v, replace(axial, hr_direction=None), (8, 8, 8), margin=4).mirror_axis(1) is None


def test_an_isotropic_input_runs_without_adaptation_and_says_so():
    prior = tiny_paired(2, patch=(8, 8, 8))[0]
    lr = Volume.from_array(smooth_volume((16, 16, 16), seed=3))  # 1 mm everywhere: no axis is sharper
    spec = OperatorSpec.make("slice-removal", axis=2, factor=2)
    events = []
    out = super_resolve(lr, "paired-ddpm", spec, {"steps": 1, "adapt": "on", "adapt_steps": 2}, prior, device="cpu",
                        progress=Progress(events.append))
    warn = [e["message"] for e in events if e["event"] == "warning"]
    assert any("Not learning from this scan" in w and "in-plane spacing" in w for w in warn), warn
    assert out.info["adapted"] is None


def _digests(folder):
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest() for n in sorted(os.listdir(folder))}


def test_the_shipped_weights_are_byte_identical_after_an_adapted_run():
    from MRISuperResLib.priors.store import load_prior

    folder = os.path.join(ROOT, "Resources", "Models", "synth-brain-paired")
    before = _digests(folder)
    prior = load_prior("synth-brain-paired")
    weights = {k: v.clone() for k, v in prior.networks["unet"].state_dict().items()}
    truth = _striped_head((40, 40, 48))
    spec = OperatorSpec.make("slice-removal", axis=2, factor=4)
    op = spec.bind_hr(truth.shape)
    lr = Volume(op.forward(torch.as_tensor(truth, dtype=torch.float64)).float().numpy(),
                lr_grid(Grid(truth.shape, (1.0, 1.0, 1.0)), op))
    out = super_resolve(lr, "paired-ddpm", spec, {"steps": 1, "samples": 1, "adapt": "on", "adapt_steps": 2,
                                                  "adapt_batch": 1, "adapt_seconds": 0, "patch": 32}, prior, device="cpu")
    assert out.info["adapted"]["steps"] == 2
    assert all(torch.equal(v, weights[k]) for k, v in prior.networks["unet"].state_dict().items())
    assert _digests(folder) == before
