"""The synthetic brain generator: reproducibility, split, diffeomorphism, geometry, intensities."""

import socket
import time

import numpy as np
import pytest
import torch
from scipy import ndimage

from MRISuperResLib.errors import InputError
from MRISuperResLib.training import synth as synth_mod
from MRISuperResLib.training.deform import integrate_velocity, jacobian_determinant, lattice_points, random_velocity
from MRISuperResLib.training.synth import HELDOUT_START, BrainSynth, SynthConfig, split_of, split_seeds

SMALL = (64, 80, 64)


@pytest.fixture(scope="module")
def templates_offline():
    """Load nilearn's templates with every network connection refused: they must ship in the wheel."""
    synth_mod.load_templates.cache_clear()
    synth_mod._blurred_templates.cache_clear()
    real_connect = socket.socket.connect

    def refuse(self, *a, **k):
        raise OSError("network disabled in this test")

    socket.socket.connect = refuse
    try:
        return synth_mod.load_templates()
    finally:
        socket.socket.connect = real_connect


@pytest.fixture(scope="module")
def small(templates_offline):
    return BrainSynth(SynthConfig(shape=SMALL))


def test_templates_load_offline(templates_offline):
    chans, origin, stats = templates_offline
    assert chans.shape[0] == 5 and chans.dtype == torch.float32
    assert float(chans[1].max()) <= 1.0 and float(chans[2].max()) <= 1.0
    assert 1000 < stats["brain_ml"] < 2500  # an adult brain, in ml


def test_same_seed_same_brain_different_seed_different(small):
    a, b, c = small.sample(3), small.sample(3), small.sample(4)
    assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask)
    assert torch.equal(a.conditioning, b.conditioning)
    assert float((a.image - c.image).abs().mean()) > 0.02
    assert a.params != c.params


def test_reproducible_in_a_fresh_generator(small):
    other = BrainSynth(SynthConfig(shape=SMALL))
    assert torch.equal(small.sample(11).image, other.sample(11).image)


def test_heldout_split_is_disjoint():
    train = set(split_seeds("train", 1000))
    held = set(split_seeds("heldout", 1000))
    assert not train & held
    assert all(split_of(s) == "train" for s in train) and all(split_of(s) == "heldout" for s in held)
    assert max(train) < HELDOUT_START <= min(held)
    with pytest.raises(InputError, match="do not fit"):
        split_seeds("train", 10, HELDOUT_START - 5)
    with pytest.raises(InputError, match="Unknown split"):
        split_seeds("test", 1)


def test_split_is_enforced_when_asked(small):
    with pytest.raises(InputError, match="held"):
        small.sample(HELDOUT_START + 1, patch=(8, 8, 8), split="train")
    small.sample(HELDOUT_START + 1, patch=(8, 8, 8), split="heldout")


def test_trainer_draws_only_training_seeds():
    from MRISuperResLib.training.autoencoder import draw_train_seeds

    seeds = draw_train_seeds(torch.Generator().manual_seed(0), 5000)
    assert max(seeds) < HELDOUT_START and len(set(seeds)) > 4900
    assert max(draw_train_seeds(torch.Generator().manual_seed(0), 100, pool=7)) < 7


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scaling_and_squaring_is_diffeomorphic_where_the_raw_field_folds(seed):
    g = torch.Generator().manual_seed(seed)
    v = random_velocity(g, (30, 30, 30), 4.0, 16.0, 4.0)
    u = integrate_velocity(v, 4.0)
    pts = lattice_points((0, 0, 0), 4.0, (30, 30, 30))
    assert float(jacobian_determinant(pts + u.permute(1, 2, 3, 0), 4.0).min()) > 0.05
    # The same field used directly as a displacement folds: the check above can fail.
    assert float(jacobian_determinant(pts + v.permute(1, 2, 3, 0), 4.0).min()) < 0


@pytest.mark.parametrize("seed", [5, 6])
def test_generator_map_has_positive_jacobian_everywhere(small, seed):
    deform = small.deformation(seed)
    lo = small._template_points_1mm(np.zeros(3))
    pts = lattice_points(np.minimum(lo, small._template_points_1mm(np.asarray(SMALL) - 1.0)), 1.0, SMALL)
    det = jacobian_determinant(deform(pts), 1.0)
    assert float(det.min()) > 0
    s = small.params(seed)["scale"]
    # On average the map shrinks volumes by the brain's scale factor cubed (it maps output to template).
    assert abs(float(det.mean()) * s ** 3 - 1.0) < 0.15


def test_intensity_range_mask_and_normalisation(templates_offline):
    whole = BrainSynth(SynthConfig(downsample=4))  # the whole default box, cheaply
    for seed in (0, 1):
        x = whole.sample(seed)
        assert x.image.dtype == torch.float32 and x.image.shape == (40, 56, 40)
        assert float(x.image.min()) >= 0.0 and float(x.image.max()) <= 1.0
        q = float(torch.quantile(x.image.flatten()[::3], 0.995))
        assert 0.8 < q <= 1.0
        assert x.mask.dtype == torch.bool and 0.15 < float(x.mask.float().mean()) < 0.5
        assert float(x.image[x.mask].mean()) > 0.3
        assert ((x.conditioning >= 0) & (x.conditioning <= 1)).all()


def test_skull_stripped_mode_has_dark_background(templates_offline):
    s = BrainSynth(SynthConfig(shape=SMALL, head=False, noise_range=(0.0, 0.0)))
    x = s.sample(2)
    far = ~torch.from_numpy(ndimage.binary_dilation(x.mask.numpy(), iterations=4))
    assert float(x.image[far].max()) < 0.05


def test_a_share_of_brains_comes_skull_stripped_and_earlier_brains_stay_as_they_were(templates_offline):
    plain = BrainSynth(SynthConfig(shape=SMALL, noise_range=(0.0, 0.0)))
    mixed = BrainSynth(SynthConfig(shape=SMALL, noise_range=(0.0, 0.0), stripped_share=0.5))
    seeds = range(12)
    stripped = [s for s in seeds if mixed.params(s)["stripped"]]
    assert 0 < len(stripped) < len(seeds)  # a share, not all or none
    assert "stripped" not in plain.params(0)  # no new draw unless asked: a run's old seeds render the same brains
    kept = next(s for s in seeds if s not in stripped)
    assert torch.equal(plain.sample(kept).image, mixed.sample(kept).image)
    x, y = plain.sample(stripped[0]), mixed.sample(stripped[0])
    far = ~torch.from_numpy(ndimage.binary_dilation(x.mask.numpy(), iterations=4))
    assert float(y.image[far].max()) < 0.05 < float(x.image[far].max())  # no scalp around the stripped one


def test_a_share_of_brains_folds_its_own_way_and_earlier_brains_stay_as_they_were(templates_offline):
    plain = BrainSynth(SynthConfig(shape=SMALL, noise_range=(0.0, 0.0), stripped_share=0.5))
    folded = BrainSynth(SynthConfig(shape=SMALL, noise_range=(0.0, 0.0), stripped_share=0.5, folding_share=0.5))
    seeds = range(12)
    own = [s for s in seeds if folded.params(s)["folding"]]
    assert 0 < len(own) < len(seeds)
    assert "folding" not in plain.params(0)
    assert all(plain.params(s)["stripped"] == folded.params(s)["stripped"] for s in seeds)
    kept = next(s for s in seeds if s not in own)
    assert torch.equal(plain.sample(kept).image, folded.sample(kept).image)
    s = own[0]
    a, b = plain.deformation(s).displacement, folded.deformation(s).displacement
    extra = (b - a).pow(2).sum(0).sqrt()
    # millimetres of extra bending, varying over about a centimetre: anatomy moves, the head stays where it was
    assert 0.5 < float(extra.mean()) < 6.0
    x, y = plain.sample(s), folded.sample(s)
    inside = x.mask & y.mask
    assert float((x.image - y.image)[inside].abs().mean()) > 0.02
    assert abs(float(x.mask.float().mean()) - float(y.mask.float().mean())) < 0.1 * float(x.mask.float().mean())


def test_patch_is_exact_crop_of_whole_volume(small):
    full = small.sample(7)
    p = small.sample(7, patch=(16, 24, 20), corner=(10, 20, 30))
    assert p.corner == (10, 20, 30)
    assert torch.allclose(p.image, full.image[10:26, 20:44, 30:50], atol=1e-6)
    assert torch.equal(p.mask, full.mask[10:26, 20:44, 30:50])
    r = small.sample(7, patch=(16, 16, 16))
    assert r.corner == small.sample(7, patch=(16, 16, 16)).corner  # a random corner, but seeded
    with pytest.raises(InputError, match="Patch"):
        small.sample(7, patch=(100, 8, 8))


def test_downsampled_grid_shares_bounds_and_is_cheaper(small):
    coarse = BrainSynth(SynthConfig(shape=SMALL, downsample=2))
    g1, g2 = small.grid(), coarse.grid()
    assert g2.shape == tuple(n // 2 for n in SMALL) and g2.spacing == (2.0, 2.0, 2.0)
    assert np.allclose(g1.bounds(), g2.bounds(), atol=1e-6)
    x = coarse.sample(3)
    assert x.image.shape == g2.shape
    # A 2 mm brain resembles the 2x2x2 average of the 1 mm one (same seed, same anatomy).
    avg = torch.nn.functional.avg_pool3d(small.sample(3).image[None, None], 2)[0, 0]
    assert float(torch.corrcoef(torch.stack([avg.flatten(), x.image.flatten()]))[0, 1]) > 0.9


IDENTITY = dict(deform_std_mm=0, max_rotation_deg=0, scale_range=(1, 1), anisotropy=0, max_translation_mm=0,
                gamma_range=(1, 1), bias_std=0, noise_range=(0, 0), template_mix=(1, 1), head=False)


def _centroid_mm(img, spacing):
    """Intensity centroid in 1 mm index units (sample n of an f mm grid sits at n * f + (f - 1) / 2)."""
    axes = [torch.arange(n, dtype=torch.float64) * spacing + (spacing - 1) / 2.0 for n in img.shape]
    pts = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
    w = img.double()[..., None]
    return (pts * w).sum((0, 1, 2)) / w.sum()


def test_downsampled_brain_is_not_shifted(templates_offline):
    """The coarse grid's blur is centred: the same brain at 1 mm and 2 mm has the same centroid."""
    fine = BrainSynth(SynthConfig(shape=SMALL, **IDENTITY)).sample(0).image
    coarse = BrainSynth(SynthConfig(shape=SMALL, downsample=2, **IDENTITY)).sample(0).image
    assert float((_centroid_mm(coarse, 2.0) - _centroid_mm(fine, 1.0)).abs().max()) < 0.03


def test_identity_settings_reproduce_the_template_on_the_right_grid(templates_offline):
    """With every augmentation off, voxel (i, j, k) shows the template at grid().index_to_physical(i, j, k)."""
    s = BrainSynth(SynthConfig(shape=SMALL, **IDENTITY))
    x = s.sample(0).image.numpy()
    chans, origin, _ = templates_offline
    t1 = chans[0].numpy()
    grid = s.grid()
    rng = np.random.default_rng(0)
    idx = rng.integers(0, SMALL, size=(200, 3))
    lps = grid.index_to_physical(idx)
    ras = lps * np.array([-1, -1, 1])
    tv = np.rint(ras - origin).astype(int)
    assert np.allclose(ras - origin, tv, atol=1e-6)  # output voxels sit on template voxel centres
    expected = t1[tv[:, 0], tv[:, 1], tv[:, 2]]
    got = x[idx[:, 0], idx[:, 1], idx[:, 2]]
    ratio = got[expected > 0.2] / expected[expected > 0.2]
    assert ratio.std() < 1e-4 * ratio.mean()
    assert np.all(got[expected == 0] == 0)
    # LAS: index i grows towards the subject's left, i.e. RAS x decreases.
    assert grid.direction_matrix[0, 0] == 1.0 and np.allclose(grid.spacing, 1.0)


def test_bad_config_is_a_clear_error():
    with pytest.raises(InputError, match="divide"):
        SynthConfig(shape=(64, 80, 64), downsample=3)
    with pytest.raises(InputError, match="Orientation"):
        SynthConfig(orientation="PIR")
    with pytest.raises(InputError, match="stripped share"):
        SynthConfig(stripped_share=1.5)
    with pytest.raises(InputError, match="Folding share"):
        SynthConfig(folding_share=-0.1)


@pytest.mark.slow
def test_full_default_volume_is_fast(templates_offline):
    s = BrainSynth()
    s.sample(0)
    t = time.perf_counter()
    x = s.sample(1)
    # About 1.5-3 s on 2 shared cores; the bound leaves room for a busy machine.
    assert time.perf_counter() - t < 5.0
    assert x.image.shape == (160, 224, 160)


def test_a_run_s_recorded_generator_options_all_reach_its_generator():
    from MRISuperResLib.training.autoencoder import synth_from_options

    s = synth_from_options({"synth": {"shape": list(SMALL), "head": True, "contrast": "mixed",
                                      "stripped_share": 0.3, "folding_share": 0.2}})
    c = s.config
    assert (c.shape, c.contrast, c.stripped_share, c.folding_share) == (SMALL, "mixed", 0.3, 0.2)
    # a run recorded before an option existed gets its default
    assert synth_from_options({"synth": {"shape": list(SMALL)}}).config.folding_share == 0.0
