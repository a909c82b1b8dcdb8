"""paired-ddpm learning from the scan: pairs from the scan's own slices, the 2D network, its guards and its place in
the output."""

import hashlib
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import ROOT, check_answer_independent_of_storage, smooth_volume
from test_diffusion_parts import tiny_paired

from MRISuperResLib.metrics import psnr
from MRISuperResLib.physics import OperatorSpec, lr_grid
from MRISuperResLib.pipeline import super_resolve
from MRISuperResLib.priors.from_scan import (
    _validation_gain,
    apply_through_plane,
    degrade_along,
    learn_from_slices,
    make_network,
    sample_phase,
    slice_pairs,
    why_not_adaptable,
)
from MRISuperResLib.progress import Progress
from MRISuperResLib.volume import Grid, Volume


@pytest.mark.parametrize("kind", ["slice-removal", "thick-slice"])
@pytest.mark.parametrize("axis", [0, 2])
def test_a_pair_is_the_runs_operator_applied_along_an_in_plane_axis(kind, axis):
    # The run degrades `axis` by 4; a slice's pairs are the same operator along each in-plane axis, B-spline back,
    # shown with the degraded axis last.
    spec = OperatorSpec.make(kind, axis=axis, factor=4)
    y = torch.as_tensor(smooth_volume((24, 28, 20), seed=axis, scale=1.5) * 2 - 1)  # the LR input, sharp in-plane
    inputs, targets, phases = slice_pairs(y, spec, axis)
    b, c = [d for d in range(3) if d != axis]
    assert len(inputs) == len(phases) == 2 * y.shape[axis]
    for d, first in ((b, 0), (c, 1)):
        op = OperatorSpec.make(kind, axis=d, factor=4).bind_hr(tuple(y.shape))
        want = op.upsample(op.forward(y.double()), "cubic")
        for s in (0, 3, y.shape[axis] - 1):
            got, tgt = inputs[2 * s + first], targets[2 * s + first]
            img, sharp = want.select(axis, s), y.double().select(axis, s)  # over (b, c)
            if d == b:
                img, sharp = img.T, sharp.T  # the degraded axis last
            assert torch.allclose(got.double(), img, atol=1e-6)
            assert torch.allclose(tgt.double(), sharp, atol=1e-6)
            assert torch.equal(phases[2 * s + first], sample_phase(op, d))
    # Along the run's own axis, the same helper is the run's operator itself.
    physics = spec.bind_hr(tuple(y.shape))
    assert torch.allclose(degrade_along(y.double(), spec, axis), physics.upsample(physics.forward(y.double()), "cubic"),
                          atol=1e-9)


@pytest.mark.parametrize("kind", ["slice-removal", "thick-slice"])
def test_the_phase_marks_each_voxels_distance_to_the_nearest_sample(kind):
    # 4x along j over 16 voxels: each LR sample stands at its block's centre, 1.5, 5.5, 9.5, 13.5 (slice removal
    # interpolates between the block's two middle voxels); -1 on a sample, +1 midway between two.
    op = OperatorSpec.make(kind, axis=1, factor=4).bind_hr((3, 16, 5))
    got = sample_phase(op, 1).double().numpy()
    want = np.abs(np.arange(16)[:, None] - (np.arange(4) * 4.0 + 1.5)[None]).min(1) - 1.0
    inner = slice(0, 16) if kind == "slice-removal" else slice(4, 12)  # a Gaussian profile is cut at the ends
    np.testing.assert_allclose(got[inner], want[inner], atol=1e-6 if kind == "slice-removal" else 0.01)
    assert got.min() >= -1.0 and got.max() <= 1.0


def test_inputs_without_finer_in_plane_detail_are_not_adapted():
    iso = OperatorSpec.make("slice-removal", axis=2, factor=4).bind_lr((16, 16, 16))
    assert "in-plane spacing" in why_not_adaptable(replace(iso, hr_spacing=(1.0, 1.0, 0.25)))
    assert why_not_adaptable(replace(iso, hr_spacing=(1.0, 1.0, 1.0))) is None
    k = OperatorSpec.make("kspace", axis=(0, 1), factor=2).bind_lr((16, 16, 16))
    assert "several axes" in why_not_adaptable(k)


def test_the_network_is_applied_on_the_planes_through_the_thick_axis():
    # A network that adds one everywhere adds one to the volume; one that adds the column index (a ramp along the
    # last image axis) adds the index along the thick axis, whichever it is.
    v = torch.as_tensor(smooth_volume((10, 12, 14), seed=2)).float()
    net = make_network(depth=1)
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.fill_(1.0)
    assert torch.allclose(apply_through_plane(net, v, 1, torch.zeros(v.shape[1])), v + 1.0, atol=1e-6)

    class Ramp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.arange(x.shape[-1], dtype=x.dtype).expand_as(x[:, :1])

    class Phase(Ramp):
        def forward(self, x):
            return x[:, 1:2]  # the phase channel itself

    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = v.shape[axis]
        ramp = torch.arange(v.shape[axis], dtype=v.dtype).reshape(shape)
        phase = torch.rand(v.shape[axis])
        assert torch.allclose(apply_through_plane(Ramp(), v, axis, phase), v + ramp, atol=1e-6)
        # the phase is laid along the thick axis, as in training
        assert torch.allclose(apply_through_plane(Phase(), v, axis, phase), v + phase.reshape(shape), atol=1e-6)


def test_the_held_out_score_tells_a_harmful_network_from_a_useful_one():
    torch.manual_seed(0)
    t = [torch.rand(16, 16) * 2 - 1 for _ in range(3)]
    x = [a + 0.1 * torch.randn(16, 16) for a in t]
    net = make_network(depth=1)
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.fill_(0.3)  # a constant offset: worse than its input
    p = [torch.zeros(16) for _ in range(3)]
    assert _validation_gain(net, x, t, p, -2.0, "cpu") < -3.0
    with torch.no_grad():
        net[0].bias.zero_()
    assert _validation_gain(net, x, t, p, -2.0, "cpu") == pytest.approx(0.0, abs=1e-9)
    assert _validation_gain(net, [], [], [], -2.0, "cpu") is None


def _striped_head(shape=(40, 40, 40), period=6.0):
    """A head whose detail is known and alike along every axis: a product of cosines of one period inside a ball."""
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    c = [(n - 1) / 2.0 for n in shape]
    r = np.sqrt(sum(((a - m) / (0.45 * n)) ** 2 for a, m, n in zip((i, j, k), c, shape)))
    tex = np.cos(2 * np.pi * i / period) * np.cos(2 * np.pi * j / period) * np.cos(2 * np.pi * k / period)
    return np.where(r < 1.0, 0.6 + 0.3 * tex, 0.0).astype(np.float32)


def _degraded(truth, spec, spacing=(1.0, 1.0, 1.0)):
    op = spec.bind_hr(truth.shape)
    return Volume(op.forward(torch.as_tensor(truth, dtype=torch.float64)).float().numpy(),
                  lr_grid(Grid(truth.shape, spacing), op))


@pytest.mark.parametrize("kind", ["thick-slice", "slice-removal"])
def test_learning_from_the_scan_beats_the_prior_as_it_came(kind):
    # A tiny prior that adds nothing to B-spline (its output layer zeroed, as MONAI initialises it); the scan's
    # slices show the 2D network what the thick axis hides: the same stripes, along the in-plane axes.
    prior = tiny_paired(1, patch=(8, 8, 8))[0]
    prior.card["schedule"]["prediction"] = "sample"  # as the shipped prior: x0 itself, not eps amplified ~30x at t = T
    with torch.no_grad():
        for p in prior.networks["unet"].out[-1].parameters():
            p.zero_()
    truth = _striped_head()
    spec = OperatorSpec.make(kind, axis=2, factor=2 if kind == "thick-slice" else 4)
    lr = _degraded(truth, spec)
    common = {"steps": 1, "samples": 1, "mean_start": True, "patch": 16, "keep_air": False}
    events = []
    plain = super_resolve(lr, "paired-ddpm", spec, dict(common, adapt="off"), prior, device="cpu")
    tuned = super_resolve(lr, "paired-ddpm", spec, dict(common, adapt="on", adapt_steps=300, adapt_seconds=0), prior,
                          device="cpu", progress=Progress(events.append))
    mask = truth > 0
    p_plain = psnr(truth, plain.volume.array, 1.0, mask)
    p_tuned = psnr(truth, tuned.volume.array, 1.0, mask)
    assert p_tuned > p_plain + 1.0, (p_plain, p_tuned)
    rec = tuned.info["adapted"]
    assert rec["steps"] == 300 and rec["loss_last"] < rec["loss_first"] and rec["weight"] == 0.8
    assert rec["held_out_slices"] >= 1 and rec["validation_gain_db"] > 0.5
    # the time split bench reports: the learning, then the sampling
    phases = tuned.info["phase_seconds"]
    assert set(phases) == {"adaptation", "sampling"} and phases["sampling"] > 0
    assert phases["adaptation"] >= rec["seconds"] > 0 and plain.info["phase_seconds"]["adaptation"] < rec["seconds"]
    # The bar shows the phase with an ETA, then sampling takes the rest of it.
    learn = [e for e in events if e["event"] == "progress" and e["message"].startswith("learning from this scan")]
    assert len(learn) == 300 and learn[-1]["fraction"] <= 0.5 + 1e-9 and learn[-1]["eta_s"] is not None
    rest = [e for e in events if e["event"] == "progress" and e not in learn]
    assert rest and rest[-1]["fraction"] == pytest.approx(1.0) and min(e["fraction"] for e in rest) >= 0.5
    assert plain.info["adapted"] is None
    if kind == "thick-slice":
        # the output is the stated blend: weight 1 is the 2D network alone, the default 0.8 of it with the prior's
        alone = super_resolve(lr, "paired-ddpm", spec, dict(common, adapt="on", adapt_steps=300, adapt_seconds=0,
                                                            adapt_weight=1.0), prior, device="cpu")
        np.testing.assert_allclose(tuned.volume.array, 0.8 * alone.volume.array + 0.2 * plain.volume.array, atol=1e-5)


def test_the_uncertainty_map_adds_the_networks_doubt():
    # With learning the map is the root sum of squares of (1 - w) x the diffusion samples' spread and w x the spread
    # of the network's two answers (its two families of planes): at w = 1 the samples agree and only the doubt is left.
    shape = (32, 28, 32)  # unlike along i and j, so the two families of planes see different images
    truth = (_striped_head(shape) * (0.8 + 0.4 * smooth_volume(shape, seed=5))).astype(np.float32)
    spec = OperatorSpec.make("thick-slice", axis=2, factor=2)
    lr = _degraded(truth, spec)
    prior = tiny_paired(1, patch=(8, 8, 8))[0]
    common = {"steps": 1, "samples": 2, "patch": 16, "keep_air": False, "adapt": "on", "adapt_steps": 100,
              "adapt_seconds": 0}
    maps = {}
    for w in (1.0, 0.5, 0.25):  # the same network and the same samples each time: only the weight differs
        out = super_resolve(lr, "paired-ddpm", spec, dict(common, adapt_weight=w), prior, device="cpu")
        assert out.info["adapted"]["weight"] == w
        maps[w] = out.extras["uncertainty"].array.astype(np.float64)
    doubt2 = maps[1.0] ** 2
    spread2 = (maps[0.5] ** 2 - 0.25 * doubt2) / 0.25  # the diffusion samples' variance
    assert doubt2.max() > 1e-6 and spread2.max() > 1e-6
    np.testing.assert_allclose(maps[0.25] ** 2, 0.5625 * spread2 + 0.0625 * doubt2, rtol=1e-4, atol=1e-8)


def test_auto_learns_where_it_was_measured_to_help():
    prior = tiny_paired(2, patch=(8, 8, 8))[0]
    truth = _striped_head((24, 24, 48))
    for kind, factor, learns in (("slice-removal", 8, True), ("slice-removal", 4, True), ("slice-removal", 3, False),
                                 ("thick-slice", 6, True), ("thick-slice", 4, False)):
        spec = OperatorSpec.make(kind, axis=2, factor=factor)
        out = super_resolve(_degraded(truth, spec), "paired-ddpm", spec, {"steps": 1, "adapt": "auto", "adapt_steps": 2},
                            prior, device="cpu")
        assert (out.info["adapted"] is not None) == learns, (kind, factor)


def test_the_learning_is_repeatable_and_stops_at_its_budget():
    y = torch.as_tensor(smooth_volume((20, 20, 8), seed=4) * 2 - 1).float()
    spec = OperatorSpec.make("slice-removal", axis=2, factor=4)
    a, rec_a = learn_from_slices(y, spec, 2, torch.Generator().manual_seed(3), 5)
    b, _ = learn_from_slices(y, spec, 2, torch.Generator().manual_seed(3), 5)
    c, _ = learn_from_slices(y, spec, 2, torch.Generator().manual_seed(4), 5)
    same = [torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())]
    assert all(same) and not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    assert rec_a["steps"] == 5 and rec_a["held_out_slices"] == 1  # 8 slices: one held out
    ticks = iter(range(1000))
    _, rec = learn_from_slices(y, spec, 2, None, 100, seconds=3.0, clock=lambda: float(next(ticks)))
    assert rec["steps"] == 3  # one second a step on this clock


def test_learning_from_the_scan_does_not_depend_on_how_the_scan_is_stored():
    """The network learns in the network's view, so the same physical scan stored LPS or LAS learns the same
    network and gets the same answer; with a card that names no orientation each is learnt as stored."""
    prior = tiny_paired(3, patch=(8, 8, 8))[0]
    truth = _striped_head((24, 22, 16))
    spec = OperatorSpec.make("thick-slice", axis=2, factor=2)
    lps = _degraded(truth, spec)  # identity direction: rows run posterior

    def run(p, volume):
        out = super_resolve(volume, "paired-ddpm", spec, {"steps": 1, "samples": 2, "patch": 8, "adapt": "on",
                                                          "adapt_steps": 3, "adapt_seconds": 0}, p, device="cpu",
                            seed=5)
        assert out.info["adapted"]["steps"] == 3
        return out

    check_answer_independent_of_storage(run, prior, lps)


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
                                                  "adapt_seconds": 0, "patch": 32}, prior, device="cpu")
    assert out.info["adapted"]["steps"] == 2
    assert all(torch.equal(v, weights[k]) for k, v in prior.networks["unet"].state_dict().items())
    assert _digests(folder) == before
