"""train vdm / train paired tasks: a few resumable steps on synthetic brains, export, load, super-resolve."""

import numpy as np
import pytest
import torch

from MRISuperResLib.diffusion import vdm
from MRISuperResLib.physics import OperatorSpec
from MRISuperResLib.pipeline import super_resolve
from MRISuperResLib.priors.store import load_prior
from MRISuperResLib.training.export import export_prior
from MRISuperResLib.training.trainer import TrainConfig, Trainer
from MRISuperResLib.volume import Volume

SYNTH = {"shape": [32, 32, 24], "orientation": "LAS", "downsample": 1, "head": True}




def _train(task, run_dir, steps):
    run_dir.mkdir(parents=True, exist_ok=True)
    t = Trainer(task, TrainConfig(steps=steps, checkpoint_every=0, max_minutes=0, lr=1e-3), str(run_dir))
    return t, t.train()


def test_vdm_task_trains_resumes_exports_and_samples(tmp_path):
    from MRISuperResLib.training.vdm import VDMTask

    opts = VDMTask.default_options(synth=SYNTH, network=vdm.default_unet((3,), channels=(8, 16)), exponents=(3,),
                                   crop=16, batch_size=2)
    torch.manual_seed(0)
    task = VDMTask(opts, "cpu")
    x = task.slices([1, 2], torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 16, 16) and float(x.min()) >= -1 and float(x.max()) <= 1
    _, res = _train(task, tmp_path / "run", 2)
    assert res.finished and np.isfinite(res.last_loss)
    torch.manual_seed(0)
    again = VDMTask(opts, "cpu")  # resuming a finished run restores the same weights
    t2 = Trainer(again, TrainConfig(steps=2), str(tmp_path / "run"))
    assert t2.restore() and t2.step == 2
    assert torch.equal(again.gamma.gamma_0, task.gamma.gamma_0)
    card = export_prior(task, str(tmp_path / "prior"), "test-vdm", training={"steps": 2})
    assert card["kind"] == "vdm" and len(card["vdm"]["gamma_table"]) == vdm.TABLE_SIZE
    prior = load_prior(str(tmp_path / "prior"), "cpu", kind="vdm")
    spec = OperatorSpec.make("kspace", (0, 1), 2.0)
    lr = Volume.from_array(np.random.default_rng(0).random((8, 8, 4)).astype(np.float32) * 100)
    out = super_resolve(lr, "kspace-vdm", spec, {"steps": 2}, prior, device="cpu")
    assert out.volume.grid.shape == (16, 16, 4) and out.info["residual_rel"] < 1e-4


def test_paired_task_trains_exports_and_samples(tmp_path):
    from MRISuperResLib.diffusion.paired_model import default_unet
    from MRISuperResLib.training.paired import PairedTask

    ops = [{"operator": "slice-removal", "axes": [2], "factors": [2.0]},
           {"operator": "thick-slice", "axes": [0], "factors": [2.0], "profile": "box"}]
    opts = PairedTask.default_options(synth=SYNTH, network=default_unet((8, 16)), patch=(8, 8, 8), margin=4,
                                      operators=ops, batch_size=1)
    torch.manual_seed(0)
    task = PairedTask(opts, "cpu")
    hr, up, cond = task.pairs([3, 4], torch.Generator().manual_seed(1))
    assert hr.shape == up.shape == (2, 1, 8, 8, 8) and cond.shape == (2, 8)
    assert float((hr - up).abs().mean()) > 0  # the degradation lost something to learn back
    _, res = _train(task, tmp_path / "run", 2)
    assert res.finished and task.residual_scale > 0
    card = export_prior(task, str(tmp_path / "prior"), "test-paired",
                        method_defaults={"paired-ddpm": {"cpu": {"steps": 7}}})
    assert card["paired"]["residual_scale"] == pytest.approx(task.residual_scale)
    assert card["method_defaults"]["paired-ddpm"] == {"cpu": {"steps": 7}}  # the command line wins
    prior = load_prior(str(tmp_path / "prior"), "cpu", kind="paired")
    lr = Volume.from_array(np.random.default_rng(0).random((8, 8, 5)).astype(np.float32) * 100)
    out = super_resolve(lr, "paired-ddpm", OperatorSpec.make("slice-removal", 2, 2.0), {"steps": 2}, prior,
                        device="cpu")
    assert out.volume.grid.shape == (8, 8, 10) and np.isfinite(out.volume.array).all()


def test_sample_prediction_converts_to_the_true_noise():
    """A perfect x0 ("sample") predictor yields the exact eps the DDIM step needs."""
    from MRISuperResLib.diffusion.cosine import cosine_alpha_bar
    from MRISuperResLib.diffusion.paired_model import PairedModel

    x0 = torch.randn(2, 1, 4, 4, 4, dtype=torch.float64)
    eps = torch.randn(2, 1, 4, 4, 4, dtype=torch.float64)
    ab = cosine_alpha_bar(1000)
    t = torch.tensor([10, 900])
    z = ab[t].sqrt().view(-1, 1, 1, 1, 1) * x0 + (1 - ab[t]).sqrt().view(-1, 1, 1, 1, 1) * eps

    class Oracle(torch.nn.Module):
        def forward(self, x, timesteps):
            return x0

    model = PairedModel(Oracle(), (4, 4, 4), 1.0, ab, prediction="sample")
    torch.testing.assert_close(model.eps(z, z, torch.zeros(2, 8, dtype=torch.float64), t), eps)


def test_paired_prior_trained_through_plane_sees_other_thick_axes_as_k(tmp_path):
    from MRISuperResLib.diffusion.paired_model import CONDITION_NAMES, default_unet
    from MRISuperResLib.training.paired import PairedTask

    ops = [{"operator": "slice-removal", "axes": [2], "factors": [2.0]}]
    opts = PairedTask.default_options(synth=SYNTH, network=default_unet((8, 16)), patch=(8, 8, 8), margin=4,
                                      operators=ops, batch_size=1)
    torch.manual_seed(0)
    task = PairedTask(opts, "cpu")
    task._scale()
    export_prior(task, str(tmp_path / "prior"), "test-paired-k")
    prior = load_prior(str(tmp_path / "prior"), "cpu", kind="paired")
    seen = []
    unet = prior.networks["unet"]

    class Spy(torch.nn.Module):  # records what the real network is given
        def __init__(self):
            super().__init__()
            self.inner = unet

        def forward(self, x, timesteps):
            seen.append(x.detach().clone())
            return self.inner(x, timesteps=timesteps)

    prior.networks["unet"] = Spy()
    rng = np.random.default_rng(0)
    vol = rng.random((12, 10, 8)).astype(np.float32)
    lr = Volume.from_array(vol[::3])  # thick axis i, factor 3
    out = super_resolve(lr, "paired-ddpm", OperatorSpec.make("slice-removal", 0, 3.0), {"steps": 1}, prior,
                        device="cpu")
    assert out.info["axis_turned_to_k"] == 0 and out.volume.grid.shape == (12, 10, 8)
    k = 2 + CONDITION_NAMES.index("log_factor_k")
    i = 2 + CONDITION_NAMES.index("log_factor_i")
    assert seen and all(torch.allclose(x[:, k], torch.tensor(np.log(3.0), dtype=x.dtype)) for x in seen)
    assert all(float(x[:, i].abs().max()) == 0.0 for x in seen)


@pytest.mark.parametrize("stored_axis", [0, 1])
def test_non_axial_training_pairs_are_what_paired_ddpm_shows_the_network_for_such_scans(stored_axis):
    """A pair turned by --non-axial-share: the operator along a stored in-plane axis, then the network view."""
    from MRISuperResLib.diffusion.paired_model import default_unet
    from MRISuperResLib.orientation import apply_reorientation, direction_of, network_view
    from MRISuperResLib.training.paired import PairedTask

    ops = [{"operator": "slice-removal", "axes": [2], "factors": [2.0]}]
    opts = PairedTask.default_options(synth=SYNTH, network=default_unet((8, 16)), patch=(8, 8, 8), margin=4,
                                      operators=ops, batch_size=1)
    opts["non_axial_share"] = 1.0
    task = PairedTask(opts, "cpu")
    big, inner = (16, 16, 16), (slice(4, 12),) * 3
    las = direction_of("LAS")
    perm, flips, codes = network_view(las, las, to_k=stored_axis)
    assert codes["network"] == ("SAL" if stored_axis == 0 else "LSA")
    for g in range(40):
        gen = torch.Generator().manual_seed(g)
        state = gen.get_state()
        hr, up, _ = task.pairs([5], gen)
        gen.set_state(state)  # the same draws again: operator, turn, corner
        torch.randint(0, 1, (1,), generator=gen)
        if task._turn(gen)[2] != stored_axis:
            continue
        corner = [int(torch.randint(0, n - b + 1, (1,), generator=gen)) for n, b in zip(SYNTH["shape"], big)]
        block = task.synth.sample(5, patch=list(big), corner=corner).image.double()  # as stored, LAS
        op = OperatorSpec.make("slice-removal", stored_axis, 2.0).bind_hr(big)
        expect_up = apply_reorientation(op.upsample(op.forward(block), "cubic"), perm, flips)[inner]
        torch.testing.assert_close(up[0, 0], (expect_up * 2 - 1).float(), rtol=0, atol=1e-6)
        torch.testing.assert_close(hr[0, 0], (apply_reorientation(block, perm, flips)[inner] * 2 - 1).float(),
                                   rtol=0, atol=1e-6)
        assert float((hr - up).abs().mean()) > 1e-3
        return
    pytest.fail("no draw turned axis %d to k" % stored_axis)


def test_without_a_non_axial_share_the_training_draws_are_unchanged():
    """Earlier runs resume with the same brains: no random number is drawn for the turn unless a share is set."""
    from MRISuperResLib.diffusion.paired_model import default_unet
    from MRISuperResLib.training.paired import PairedTask

    opts = PairedTask.default_options(synth=SYNTH, network=default_unet((8, 16)), patch=(8, 8, 8), margin=4,
                                      batch_size=1)
    for share in (None, 0.3):
        if share is not None:
            opts["non_axial_share"] = share
        gen = torch.Generator().manual_seed(3)
        PairedTask(opts, "cpu").pairs([7], gen)
        ref = torch.Generator().manual_seed(3)
        torch.randint(0, len(opts["operators"]), (1,), generator=ref)  # the operator, then one corner per axis
        for _ in range(3):
            torch.randint(0, 2, (1,), generator=ref)
        assert torch.equal(gen.get_state(), ref.get_state()) == (share is None)
