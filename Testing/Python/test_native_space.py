"""Clinical inputs in native space: an oblique, moved, thick-slice head with a skull, made from a known volume.

The prior is a tiny random LDM whose grid sits off the origin in LAS; the truth is its decoder's image of a
latent z*, written as the prior's reference. The head is the truth moved by a known rigid transform onto an
oblique grid, with a bright skull shell around the brain, then 5 mm thick slices (factor 4 along k).
"""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import rotation, smooth_volume

from MRISuperResLib import native
from MRISuperResLib.errors import InputError
from MRISuperResLib.orientation import orientation_code
from MRISuperResLib.physics import OperatorSpec, hr_grid, lr_grid
from MRISuperResLib.physics.resample import AffineResample
from MRISuperResLib.pipeline import super_resolve
from MRISuperResLib.priors import store, synthetic
from MRISuperResLib.priors.folder import file_digest
from MRISuperResLib.priors.reference import prior_grid, prior_reference
from MRISuperResLib.progress import Progress
from MRISuperResLib.volume import Grid, Volume, write_volume

N, SP = 24, 2.5  # the prior's grid: a 60 mm box
CENTRE = np.array([4.0, -6.0, 10.0])  # where the box sits in physical space
LAS = np.diag([1.0, -1.0, 1.0])
BRAIN_MM = 0.9 * N * SP / 2  # brain: a ball inscribed in the box
SKULL = (1.45, 1.75)  # the skull shell, in brain radii: beyond the region the prior is fitted in
RUN = {"iterations": 100, "lr": 0.1, "init": "encode", "checkpointing": False}


def _points(grid):
    return grid.index_to_physical(np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1))


def _radius(pts):
    """Distance from the brain's centre in brain radii (prior physical space)."""
    return np.linalg.norm(pts - CENTRE, axis=-1) / BRAIN_MM


def _psnr(x, ref, mask):
    rng = float(ref[mask].max() - ref[mask].min())
    return float(10 * np.log10(rng ** 2 / np.mean((x[mask] - ref[mask]) ** 2)))


def _tiny_prior(seed=1):
    card = synthetic.tiny_card(image=(N, N, N), channels=(8, 8, 8), orientation="LAS")
    card["grid"].update(spacing=[SP] * 3, direction=LAS.ravel().tolist(),
                        origin=(CENTRE - LAS @ ((N - 1) / 2 * SP * np.ones(3))).tolist())
    prior = synthetic.random_prior(card, seed=seed)
    with torch.no_grad():
        # a random decoder centres its images on 0; a head is positive on a dark background, which the
        # registration's moments initialiser and the brain/background contrast rely on
        prior.autoencoder.decoder.blocks[-1].conv.bias += 3.0
    return prior


def _with_reference(prior, truth, folder):
    """The truth as the prior's reference, padded with background so the reference covers the prior's box."""
    pg = prior_grid(prior.card)
    m = 6
    rg = Grid(tuple(n + 2 * m for n in pg.shape), pg.spacing, pg.index_to_physical([-m] * 3), pg.direction)
    image = np.zeros(rg.shape, np.float32)
    image[m:-m, m:-m, m:-m] = truth
    os.makedirs(folder, exist_ok=True)
    files = {"image": "reference.nii.gz", "mask": "reference_mask.nii.gz"}
    write_volume(Volume(image, rg), os.path.join(folder, files["image"]))
    write_volume(Volume((_radius(_points(rg)) < 1).astype(np.float32), rg), os.path.join(folder, files["mask"]))
    ref = dict(files, sha256={f: file_digest(os.path.join(folder, f)) for f in files.values()})
    return store.Prior(dict(prior.card, reference=ref), prior.networks, folder)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    prior = _tiny_prior()
    z = torch.randn((1,) + tuple(prior.card["latent"]["shape"]), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        truth = prior.autoencoder.decode(z)[0, 0].numpy()
    prior = _with_reference(prior, truth, str(tmp_path_factory.mktemp("prior")))
    pg = prior_grid(prior.card)
    motion = np.eye(4)  # native -> prior: about 13 degrees and a few mm, about the brain's centre
    motion[:3, :3] = rotation(0.12, -0.1, 0.16)
    motion[:3, 3] = np.array([3.0, -2.0, 2.5]) + CENTRE - motion[:3, :3] @ CENTRE
    d = rotation(0.2, -0.15, 0.1)  # oblique slices
    shape, sp = (80, 80, 80), 1.25
    g = Grid(shape, (sp,) * 3, CENTRE - d @ ((np.asarray(shape) - 1) / 2 * sp), d)
    r = _radius(_points(g) @ motion[:3, :3].T + motion[:3, 3])
    head = AffineResample(pg, g, motion)(torch.as_tensor(truth)).numpy()
    head = head + ((r > SKULL[0]) & (r < SKULL[1])) * 1.5 * float(truth.max())
    spec = OperatorSpec.make("thick-slice", 2, 4)
    op = spec.bind_hr(shape)
    lr = Volume(op.forward(torch.as_tensor(head)).numpy(), lr_grid(g, op))
    return SimpleNamespace(prior=prior, truth=truth, prior_grid=pg, motion=motion, hr=g, head=head, brain=r < 1,
                           skull=r > SKULL[0], spec=spec, lr=lr)


@pytest.fixture(scope="module")
def runs(scene):
    events = []
    out = super_resolve(scene.lr, "inversesr-decoder", scene.spec, RUN, scene.prior, "cpu", 0, Progress(events.append))
    bspline = super_resolve(scene.lr, "bspline", scene.spec, None, None, "cpu")
    return SimpleNamespace(out=out, bspline=bspline, events=events)


def test_output_lies_on_the_native_hr_grid(scene, runs):
    op = scene.spec.bind_lr(scene.lr.grid.shape)
    want = hr_grid(scene.lr.grid, op)
    for result in (runs.out, runs.bspline):
        got = result.volume.grid
        assert got.shape == want.shape == scene.hr.shape
        for a, b in ((got.origin, want.origin), (got.spacing, want.spacing), (got.direction, want.direction)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        assert result.residual.grid == scene.lr.grid
    assert any("registering" in e.get("message", "") for e in runs.events)


def test_registration_recovers_the_motion_within_half_a_voxel(scene, runs):
    info = runs.out.info["registration"]
    assert info["mode"] == "rigid" and info["ncc_in_brain"] > 0.8
    pts = _points(scene.prior_grid)[_radius(_points(scene.prior_grid)) < 1]
    ph = np.c_[pts, np.ones(len(pts))]
    got = ph @ np.linalg.inv(np.asarray(info["native_to_prior"])).T
    want = ph @ np.linalg.inv(scene.motion).T
    assert np.linalg.norm((got - want)[:, :3], axis=1).mean() < 0.5 * min(scene.hr.spacing)


def test_prior_beats_bspline_inside_the_brain(scene, runs):
    ours = _psnr(runs.out.volume.array, scene.head, scene.brain)
    base = _psnr(runs.bspline.volume.array, scene.head, scene.brain)
    assert ours > base + 1.0, (ours, base)
    assert 0.0 < runs.out.info["registration"]["blend_fraction"] < 1.0


def test_outside_the_priors_support_the_output_is_bspline(scene, runs):
    t = np.asarray(runs.out.info["registration"]["native_to_prior"])
    outside_box = ~native._inside(scene.hr, scene.prior_grid, t)
    assert outside_box.any() and scene.skull.any()
    for where in (outside_box, scene.skull):
        np.testing.assert_allclose(runs.out.volume.array[where], runs.bspline.volume.array[where], rtol=0, atol=1e-4)
    inside = runs.out.volume.array[scene.brain] - runs.bspline.volume.array[scene.brain]
    assert np.abs(inside).mean() > 0.05  # and inside the brain the prior did change it


def test_registration_refuses_a_non_brain(scene):
    noise = Volume(smooth_volume(scene.lr.grid.shape, seed=1, scale=2.0) * 6.0, scene.lr.grid)
    with pytest.raises(InputError, match="(?i)registration"):
        super_resolve(noise, "inversesr-decoder", scene.spec, dict(RUN, iterations=1), scene.prior, "cpu")


def test_an_input_on_the_priors_grid_is_not_registered(scene):
    op = OperatorSpec.make("thick-slice", 2, 2).bind_hr(scene.prior_grid.shape)
    lr = Volume(op.forward(torch.as_tensor(scene.truth)).numpy(), lr_grid(scene.prior_grid, op))
    out = super_resolve(lr, "inversesr-decoder", op.spec, dict(RUN, iterations=2), scene.prior, "cpu")
    assert out.info["registration"]["mode"] == "none" and "prior's grid" in out.info["registration"]["reason"]
    assert out.volume.grid.allclose(scene.prior_grid)
    # off the grid with registration off: the input's physical coordinates are taken as the prior's
    off = super_resolve(scene.lr, "inversesr-decoder", scene.spec, dict(RUN, iterations=1), scene.prior, "cpu",
                        registration="none")
    assert off.info["registration"]["mode"] == "identity"


def test_prior_grid_from_an_old_card_and_the_decoded_reference():
    card = synthetic.tiny_card(orientation="LAS")
    g = prior_grid(card)
    assert orientation_code(g.direction) == "LAS" and g.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_allclose(g.index_to_physical((np.asarray(g.shape) - 1) / 2), 0.0, atol=1e-9)
    prior = synthetic.random_prior(card, seed=0)
    image, mask = prior_reference(prior)
    assert image.grid == g and mask.dtype == bool and mask.shape == g.shape and 0 < mask.sum() < mask.size
    assert prior_reference(prior)[0] is image  # decoded once per prior


def test_a_changed_reference_file_is_refused(scene, tmp_path):
    prior = _with_reference(_tiny_prior(), scene.truth, str(tmp_path))
    with open(os.path.join(str(tmp_path), "reference_mask.nii.gz"), "ab") as f:
        f.write(b"x")
    with pytest.raises(InputError, match="corrupt"):
        prior_reference(prior)


def test_prior_space_operator_is_adjoint(scene):
    pg = Grid((6, 7, 5), (2.0, 2.0, 2.0), (1.0, -2.0, 0.5), LAS)
    ng = Grid((10, 9, 8), (1.0, 1.2, 1.1), (-2.0, -14.0, -3.0), rotation(0.1, 0.2, -0.1))
    t = np.eye(4)
    t[:3, 3] = [0.5, -0.3, 0.2]
    op = OperatorSpec.make("thick-slice", 2, 4).bind_hr(ng.shape)
    mask = torch.rand(op.lr_shape, generator=torch.Generator().manual_seed(1)) > 0.3
    a = native.PriorSpaceOperator(op, AffineResample(pg, ng, t), AffineResample(ng, pg, np.linalg.inv(t)), mask)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(pg.shape, generator=gen, dtype=torch.float64)
    y = torch.randn(op.lr_shape, generator=gen, dtype=torch.float64)
    assert a.hr_shape == pg.shape and a.lr_shape == op.lr_shape
    assert float((a(x) * y).sum()) == pytest.approx(float((x * a.adjoint(y)).sum()), rel=1e-9)
    assert torch.equal(a.data_consistency(x, y), x) and a.upsample(y, "cubic").shape == pg.shape


def test_cli_takes_a_registration_mode(tmp_path, capsys):
    from MRISuperResLib.cli import build_parser, main

    run = next(a for a in build_parser()._subparsers._group_actions[0].choices["run"]._actions
               if a.dest == "registration")
    assert tuple(run.choices) == native.MODES and run.default == "auto"
    lr = Volume.from_array(np.random.default_rng(0).random((8, 8, 4)).astype(np.float32), spacing=(1, 1, 2))
    write_volume(lr, str(tmp_path / "lr.nii.gz"))
    rc = main(["run", "--method", "bspline", "--input", str(tmp_path / "lr.nii.gz"), "--output",
               str(tmp_path / "hr.nii.gz"), "--registration", "rigid", "--progress", "jsonl"])
    events = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert rc == 0
    assert next(e for e in events if e["event"] == "start")["registration"] == "rigid"
    assert any(e["event"] == "warning" and "no registration" in e["message"] for e in events)
    assert events[-1]["info"]["registration"]["mode"] == "not used"
