"""Chunked, resumable training; export to a prior folder; the `train` command line."""

import json
import os

import numpy as np
import pytest
import torch

from MRISuperResLib.errors import InputError, UserError
from MRISuperResLib.priors.folder import CARD_FILE, file_digest, load_network, read_card
from MRISuperResLib.training.autoencoder import AutoencoderTask
from MRISuperResLib.training.ldm import LDMTask, alphas_cumprod, default_unet
from MRISuperResLib.training.trainer import CHECKPOINT, LOG_FILE, TrainConfig, Trainer, load_checkpoint, read_run

TINY_AE = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": [4, 8], "latent_channels": 3,
           "num_res_blocks": 1, "norm_num_groups": 4, "norm_eps": 1e-6, "attention_levels": [False, False],
           "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False}
TINY_SYNTH = {"shape": [64, 64, 64], "orientation": "LAS", "downsample": 4, "head": True}


def ae_task(**kw):
    opts = AutoencoderTask.default_options(network=TINY_AE, synth=TINY_SYNTH, patch=(8, 8, 8), **kw)
    torch.manual_seed(0)
    return AutoencoderTask(opts, "cpu")


def run(tmp_path, name, steps, chunk=0, resume=False, clock=None, lr=1e-3):
    folder = str(tmp_path / name)
    os.makedirs(folder, exist_ok=True)
    task = ae_task()
    cfg = TrainConfig(steps=steps, chunk_steps=chunk, max_minutes=0, checkpoint_every=2, lr=lr, seed=3)
    kw = {"clock": clock} if clock else {}
    trainer = Trainer(task, cfg, folder, **kw)
    if resume:
        assert trainer.restore()
    return trainer, trainer.train(), folder


def _log_losses(folder):
    with open(os.path.join(folder, LOG_FILE)) as f:
        return [json.loads(line)["loss"] for line in f]


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    a, ra, fa = run(tmp_path, "a", 3)
    assert ra.finished and ra.reason == "done"
    _, rb, fb = run(tmp_path, "b", 3, chunk=1)
    assert rb.step == 1 and rb.reason == "chunk" and not rb.finished
    _, rb, _ = run(tmp_path, "b", 3, chunk=1, resume=True)
    assert rb.step == 2
    b, rb, _ = run(tmp_path, "b", 3, chunk=1, resume=True)
    assert rb.step == 3 and rb.finished
    sa, sb = a.task.ae.state_dict(), b.task.ae.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert _log_losses(fa) == _log_losses(fb)
    ca, cb = load_checkpoint(fa), load_checkpoint(fb)
    assert ca["step"] == cb["step"] == 3
    ma = ca["optimizer"]["state"]
    mb = cb["optimizer"]["state"]
    assert all(torch.equal(ma[k]["exp_avg"], mb[k]["exp_avg"]) for k in ma)


def test_a_differently_seeded_run_differs(tmp_path):
    a, _, _ = run(tmp_path, "a", 2)
    folder = str(tmp_path / "c")
    os.makedirs(folder)
    task = ae_task()
    Trainer(task, TrainConfig(steps=2, max_minutes=0, lr=1e-3, seed=4), folder).train()
    sa, sc = a.task.ae.state_dict(), task.ae.state_dict()
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_time_limit_stops_and_checkpoints(tmp_path):
    ticks = iter(range(0, 10_000, 40))  # every clock read advances 40 s
    folder = str(tmp_path / "t")
    os.makedirs(folder)
    trainer = Trainer(ae_task(), TrainConfig(steps=50, max_minutes=1.0, lr=1e-3), folder, clock=lambda: next(ticks))
    result = trainer.train()
    assert result.reason == "time" and 1 <= result.step < 50
    assert load_checkpoint(folder)["step"] == result.step


def test_training_reduces_the_loss(tmp_path):
    """A tiny autoencoder fitted to one brain's patches: the L1 error must fall well below its start."""
    folder = str(tmp_path / "fit")
    os.makedirs(folder)
    torch.manual_seed(0)
    task = AutoencoderTask(AutoencoderTask.default_options(network=TINY_AE, synth=TINY_SYNTH, patch=(8, 8, 8),
                                                           pool=1, edge_weight=0.0), "cpu")
    Trainer(task, TrainConfig(steps=25, max_minutes=0, lr=1e-2, checkpoint_every=0), folder).train()
    losses = _log_losses(folder)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot be read"):
        load_checkpoint(str(folder))


def test_export_card_matches_files_and_loads_back(tmp_path):
    from MRISuperResLib.training.cli import export_run
    from MRISuperResLib.training.trainer import write_run

    trainer, _, folder = run(tmp_path, "e", 2)
    write_run(folder, "autoencoder", trainer.task.options, trainer.config)
    out = str(tmp_path / "prior")
    card = export_run(trainer.task, folder, out, "tiny", eval_count=1)
    assert card == read_card(out, autoencoder=True)
    entry = card["networks"]["autoencoder"]
    assert entry["sha256"] == file_digest(os.path.join(out, entry["weights"]))
    assert card["training"]["steps"] == 2 and card["training"]["held_out_metrics"]["heldout_count"] == 1
    grid = trainer.task.synth.grid()
    assert card["grid"] == {"shape": [16, 16, 16], "spacing": [4.0, 4.0, 4.0], "orientation": "LAS",
                            "origin": list(grid.origin), "direction": [float(v) for v in grid.direction],
                            "space": card["grid"]["space"]}
    # The exported box is the one prior_grid() rebuilds for registration, to the micrometre.
    from MRISuperResLib.priors.reference import prior_grid

    back = prior_grid(card)
    assert back.shape == grid.shape and np.allclose(back.origin, grid.origin, atol=1e-6)
    assert np.allclose(back.direction, grid.direction, atol=1e-9)
    net = load_network(out, card, "autoencoder")
    ref = trainer.task.ae.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in net.state_dict().items())
    with open(os.path.join(out, entry["weights"]), "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    with pytest.raises(InputError, match="checksum"):
        load_network(out, card, "autoencoder")


def test_schedule_is_the_published_scaled_linear_one():
    from monai.networks.schedulers import DDPMScheduler

    sched = {"type": "scaled_linear_beta", "num_train_timesteps": 1000, "beta_start": 0.0015, "beta_end": 0.0205}
    ours = alphas_cumprod(sched)
    ref = DDPMScheduler(1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0205).alphas_cumprod
    assert torch.allclose(ours, ref.float(), rtol=1e-5, atol=1e-7)
    assert abs(float(1 - ours[0]) - 0.0015) < 1e-7


def test_ldm_task_resumes_with_its_latent_cache(tmp_path):
    torch.manual_seed(0)
    ae = AutoencoderTask(AutoencoderTask.default_options(network=TINY_AE, synth=TINY_SYNTH), "cpu").ae
    unet = default_unet(3, True, (8, 16))
    unet["norm_num_groups"] = 4
    small = dict(TINY_SYNTH, shape=[32, 32, 32])
    opts = LDMTask.default_options(ae_kwargs=TINY_AE, synth=small, network=unet, pool=3)

    def go(name, steps, chunk=0, resume=False):
        folder = str(tmp_path / name)
        os.makedirs(folder, exist_ok=True)
        torch.manual_seed(0)
        task = LDMTask(opts, "cpu", autoencoder=ae if not resume else None)
        trainer = Trainer(task, TrainConfig(steps=steps, chunk_steps=chunk, max_minutes=0, lr=1e-3), folder)
        if resume:
            assert trainer.restore()
        trainer.train()
        return task

    a = go("a", 3)
    go("b", 3, chunk=2)
    b = go("b", 3, resume=True)
    assert a.scale_factor == b.scale_factor and set(a.cache) == set(b.cache)
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # The frozen autoencoder came back from the checkpoint, not from the original module.
    assert all(torch.equal(v, ae.state_dict()[k]) for k, v in b.ae.state_dict().items())
    card = b.card()
    assert card["kind"] == "ldm" and card["latent"]["shape"] == [3, 4, 4, 4]
    assert card["conditioning"]["names"] == ["contrast", "scale", "csf_volume", "brain_volume"]


def test_cli_train_resume_export(tmp_path, capsys):
    from MRISuperResLib.cli import main

    ae_dir, ldm_dir = str(tmp_path / "ae"), str(tmp_path / "ldm")
    base = ["--grid", "64", "64", "64", "--downsample", "4", "--threads", "1", "--device", "cpu"]
    code = main(["train", "autoencoder", "--run-dir", ae_dir, "--steps", "2", "--patch", "8", "8", "8",
                 "--channels", "4", "8", "--norm-groups", "4"] + base)
    assert code == 0 and load_checkpoint(ae_dir)["step"] == 2
    # A second new run into the same folder would overwrite it.
    assert main(["train", "autoencoder", "--run-dir", ae_dir, "--steps", "2"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "ldm", "--run-dir", ae_dir, "--resume"]) == 2
    code = main(["train", "ldm", "--run-dir", ldm_dir, "--autoencoder", ae_dir, "--steps", "3", "--chunk-steps", "2",
                 "--channels", "8", "16", "--norm-groups", "4", "--pool", "2", "--threads", "1", "--device", "cpu"])
    assert code == 0 and load_checkpoint(ldm_dir)["step"] == 2
    capsys.readouterr()
    out = str(tmp_path / "prior")
    code = main(["train", "ldm", "--run-dir", ldm_dir, "--resume", "--export", out, "--eval-count", "1",
                 "--progress", "jsonl", "--device", "cpu"])
    assert code == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert events[-1]["event"] == "result" and events[-1]["finished"] and events[-1]["step"] == 3
    assert any(e["event"] == "progress" for e in events)
    card = read_card(out, autoencoder=True)
    assert card["kind"] == "ldm" and set(card["networks"]) == {"autoencoder", "unet"}
    assert "--resume" in card["training"]["command"] and card["training"]["steps"] == 3
    # The card says how its autoencoder was trained and how well it reconstructs held-out brains.
    assert card["training"]["autoencoder"]["steps"] == 2
    assert "train autoencoder" in card["training"]["autoencoder"]["command"]
    assert "--patch 8 8 8" in card["training"]["autoencoder"]["command"]
    assert 0 < card["training"]["held_out_metrics"]["autoencoder_heldout_psnr_db"] < 100
    assert "autoencoder_training" not in card["training"]["options"]
    # A new LDM run on this prior's autoencoder inherits that record, not the UNet run's command.
    from MRISuperResLib.training.ldm import autoencoder_provenance

    assert autoencoder_provenance(out) == card["training"]["autoencoder"]
    older = tmp_path / "older"  # an LDM card written before the record existed: say so, do not guess
    older.mkdir()
    (older / CARD_FILE).write_text(json.dumps(dict(card, training={k: v for k, v in card["training"].items()
                                                              if k != "autoencoder"})))
    assert "does not record" in autoencoder_provenance(str(older))["note"]
    for role, entry in card["networks"].items():
        assert file_digest(os.path.join(out, entry["weights"])) == entry["sha256"]
        load_network(out, card, role)
    assert os.path.exists(os.path.join(out, CARD_FILE))
    # The prior store (what the methods use) accepts the exported folder as an LDM prior.
    from MRISuperResLib.priors.store import load_prior

    prior = load_prior(out, kind="ldm")
    assert prior.name == "prior" and prior.unet is not None and prior.autoencoder is not None
    # Both of its networks can be trained further from it; the autoencoder's record is its own, not the UNet's.
    capsys.readouterr()
    for task, folder in (("autoencoder", "ae_more"), ("ldm", "ldm_more")):
        extra = ["--autoencoder", out, "--pool", "2"] if task == "ldm" else ["--patch", "8", "8", "8"]
        assert main(["train", task, "--run-dir", str(tmp_path / folder), "--steps", "1", "--init-from", out]
                    + extra + base) == 0
        start = read_run(str(tmp_path / folder))["options"]["init_from"]
        assert start["steps"] == (2 if task == "autoencoder" else 3)
        assert ("train autoencoder" if task == "autoencoder" else "train ldm") in start["command"]
    assert "differs from the prior's training" not in capsys.readouterr().err


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="lr"):
        TrainConfig(lr=0)
    with pytest.raises(InputError, match="multiple"):
        AutoencoderTask(AutoencoderTask.default_options(network=TINY_AE, synth=TINY_SYNTH, patch=(7, 8, 8)), "cpu")


@pytest.mark.parametrize("task, extra", [
    ("vdm", ["--crop", "16", "--batch-size", "2"]),
    ("paired", ["--patch", "16", "16", "16"]),
])
def test_cli_plugin_tasks_train_and_resume(tmp_path, task, extra):
    """vdm and paired live in their own modules; the command line finds, trains and resumes them."""
    import importlib.util

    from MRISuperResLib.cli import main

    if importlib.util.find_spec("MRISuperResLib.training." + task) is None:
        pytest.skip("training/%s.py is not there" % task)
    folder = str(tmp_path / task)
    args = ["train", task, "--run-dir", folder, "--steps", "2", "--chunk-steps", "1", "--grid", "32", "32", "32",
            "--channels", "8", "16", "--norm-groups", "4", "--threads", "1", "--device", "cpu"] + extra
    assert main(args) == 0 and load_checkpoint(folder)["step"] == 1
    assert main(["train", task, "--run-dir", folder, "--resume", "--device", "cpu"]) == 0
    assert load_checkpoint(folder)["step"] == 2


def test_paired_resume_may_change_the_timestep_draw_but_not_the_network(tmp_path, capsys):
    from MRISuperResLib.cli import main

    folder = str(tmp_path / "paired")
    base = ["train", "paired", "--run-dir", folder, "--grid", "32", "32", "32", "--channels", "8", "16",
            "--norm-groups", "4", "--patch", "16", "16", "16", "--threads", "1", "--device", "cpu"]
    assert main(base + ["--steps", "1"]) == 0
    assert "high_t_fraction" not in read_run(folder)["options"]
    assert main(["train", "paired", "--run-dir", folder, "--resume", "--steps", "2", "--high-t-fraction", "0.5",
                 "--device", "cpu"]) == 0
    run_now = read_run(folder)
    assert run_now["options"]["high_t_fraction"] == 0.5 and run_now["options"]["network"]["channels"] == [8, 16]
    assert "high_t_fraction changed on resume" in capsys.readouterr().err and load_checkpoint(folder)["step"] == 2
    assert main(["train", "paired", "--run-dir", folder, "--resume", "--steps", "3", "--high-t-fraction", "2",
                 "--device", "cpu"]) == 2
    assert "between 0 and 1" in capsys.readouterr().err


def test_new_autoencoders_train_on_the_posterior_mean():
    """The default (deterministic) autoencoder keeps a ~0 posterior std through training; sampled runs still learn it."""
    task = ae_task()
    before = task.ae.quant_conv_log_sigma.conv.bias.detach().clone()
    assert all(p.requires_grad is False for p in task.ae.quant_conv_log_sigma.parameters())
    assert not any(p is task.ae.quant_conv_log_sigma.conv.bias for p in task.parameters())
    loss, parts = task.loss(0, torch.Generator().manual_seed(0))
    loss.backward()
    x = task.batch([1])
    _, sigma = task.ae.encode(x)
    assert float(sigma.max()) < 1e-5 and torch.equal(task.ae.quant_conv_log_sigma.conv.bias, before)
    sampled = ae_task(sample_posterior=True)
    assert any(p is sampled.ae.quant_conv_log_sigma.conv.bias for p in sampled.parameters())


def test_weight_average_follows_its_formula_survives_resume_and_is_exported(tmp_path):
    from MRISuperResLib.training.cli import export_run
    from MRISuperResLib.training.trainer import write_run

    folder = str(tmp_path / "avg")
    os.makedirs(folder)
    task = ae_task()
    w0 = {k: v.clone() for k, v in task.ae.state_dict().items()}
    cfg = TrainConfig(steps=1, max_minutes=0, lr=1e-2, seed=3, ema=0.5)
    trainer = Trainer(task, cfg, folder)
    trainer.train()
    w1 = task.ae.state_dict()
    avg = load_checkpoint(folder)["average"]
    assert avg["decay"] == 0.5
    moved = [k for k in w0 if w0[k].is_floating_point() and not torch.equal(w0[k], w1[k])]
    assert moved
    for k in moved:  # one step from the starting weights: avg = 0.5 w0 + 0.5 w1
        assert torch.allclose(avg["modules"]["autoencoder"][k], 0.5 * w0[k] + 0.5 * w1[k], atol=1e-7)
    # A resume keeps the average and goes on updating it; a chunked run equals an uninterrupted one.
    cfg2 = TrainConfig(steps=3, max_minutes=0, lr=1e-2, seed=3, ema=0.5)
    resumed = Trainer(ae_task(), cfg2, folder)
    assert resumed.restore()
    resumed.train()
    straight_dir = str(tmp_path / "straight")
    os.makedirs(straight_dir)
    straight = Trainer(ae_task(), cfg2, straight_dir)
    straight.train()
    a = load_checkpoint(folder)["average"]["modules"]["autoencoder"]
    b = load_checkpoint(straight_dir)["average"]["modules"]["autoencoder"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not all(torch.equal(a[k], resumed.task.ae.state_dict()[k]) for k in a)
    # Export writes the average, and the card says so.
    write_run(folder, "autoencoder", resumed.task.options, cfg2)
    card = export_run(resumed.task, folder, str(tmp_path / "prior"), "tiny", eval_count=0)
    net = load_network(str(tmp_path / "prior"), card, "autoencoder")
    assert all(torch.equal(v, a[k]) for k, v in net.state_dict().items())
    assert "average" in card["training"]["weights"] and card["training"]["train"]["ema"] == 0.5
    assert "no held-out metrics" in card["training"]["data"] and not card["training"]["held_out_metrics"]
    with pytest.raises(UserError, match="--ema"):
        TrainConfig(ema=1.0)


def test_worker_processes_draw_the_same_batches_as_the_training_process(tmp_path):
    """--workers changes where batches are drawn, not what the run learns: same draws, same steps."""
    from MRISuperResLib.diffusion.paired_model import default_unet as paired_unet
    from MRISuperResLib.training.paired import PairedTask

    opts = PairedTask.default_options(synth=TINY_SYNTH, network=paired_unet((8, 16)), patch=(8, 8, 8), margin=2,
                                      batch_size=2)
    states, losses = [], []
    for workers in (0, 2):
        folder = str(tmp_path / ("w%d" % workers))
        os.makedirs(folder)
        torch.manual_seed(0)
        task = PairedTask(opts, "cpu")
        cfg = TrainConfig(steps=4, max_minutes=0, checkpoint_every=0, lr=1e-3, seed=5)
        result = Trainer(task, cfg, folder, workers=workers).train()
        assert result.finished
        states.append(task.unet.state_dict())
        losses.append(_log_losses(folder))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert all(torch.allclose(states[0][k], states[1][k], atol=1e-6) for k in states[0])
    assert losses[0][0] != losses[0][1]  # the steps drew different batches


def test_workers_need_a_task_that_draws_without_its_network(tmp_path):
    from MRISuperResLib.cli import main

    task = ae_task()
    with pytest.raises(InputError, match="negative"):
        Trainer(task, TrainConfig(steps=1), str(tmp_path), workers=-1)
    torch.manual_seed(0)
    unet = default_unet(3, True, (8, 16))
    unet["norm_num_groups"] = 4
    opts = LDMTask.default_options(ae_kwargs=TINY_AE, synth=dict(TINY_SYNTH, shape=[32, 32, 32]), network=unet, pool=1)
    ldm = LDMTask(opts, "cpu", autoencoder=task.ae)  # its batches are latents made by the autoencoder
    with pytest.raises(InputError, match="without --workers"):
        Trainer(ldm, TrainConfig(steps=1), str(tmp_path), workers=2)
    folder = tmp_path / "neg"
    assert main(["train", "paired", "--run-dir", str(folder), "--grid", "32", "32", "32", "--channels", "8", "16",
                 "--norm-groups", "4", "--patch", "16", "16", "16", "--device", "cpu", "--workers", "-1"]) == 2
    assert not folder.exists()  # nothing written for a run that never started


def test_init_from_a_prior_starts_a_new_run_with_its_network(tmp_path, capsys):
    """A lost run folder is no dead end: `--init-from PRIOR` takes the prior's architecture, weights (sha256 checked)
    and, for a VDM, its gamma end points; the new run's card records where it started."""
    from MRISuperResLib.cli import main
    from MRISuperResLib.diffusion.vdm import tabulate

    first, prior = str(tmp_path / "first"), str(tmp_path / "prior")
    base = ["--grid", "32", "32", "32", "--crop", "16", "--batch-size", "2", "--threads", "1", "--device", "cpu"]
    assert main(["train", "vdm", "--run-dir", first, "--steps", "2", "--channels", "8", "16", "--norm-groups", "4",
                 "--export", prior, "--eval-count", "1", "--lr", "0.01"] + base) == 0
    card = read_card(prior, autoencoder=True)
    second = str(tmp_path / "second")
    # no --channels: the architecture is the prior's, not the default 32-64-64
    assert main(["train", "vdm", "--run-dir", second, "--steps", "1", "--lr", "1e-12", "--init-from", prior] + base) == 0
    err = capsys.readouterr().err
    assert "architecture comes from prior 'prior'" in err and "starting from prior 'prior'" in err
    from MRISuperResLib.training.cli import make_task

    run2 = read_run(second)
    assert run2["options"]["network"]["channels"] == [8, 16]
    task = make_task("vdm", run2["options"], "cpu")
    start = load_checkpoint(second)  # one step at a vanishing learning rate: still the prior's weights
    assert start["step"] == 1
    task.unet.load_state_dict(start["modules"]["unet"])
    ref = load_network(prior, card, "unet")
    for (k, a), (k2, b) in zip(sorted(task.unet.state_dict().items()), sorted(ref.state_dict().items())):
        assert k == k2 and torch.allclose(a, b, atol=1e-8)
    task.gamma.load_state_dict(start["modules"]["gamma"])
    table = tabulate(task.gamma)
    assert table[0] == pytest.approx(card["vdm"]["gamma_table"][0], abs=1e-5)
    assert table[-1] == pytest.approx(card["vdm"]["gamma_table"][-1], abs=1e-4)
    again = str(tmp_path / "again")
    assert main(["train", "export", "--run-dir", second, "--out", again, "--eval-count", "0", "--device", "cpu"]) == 0
    rec = read_card(again, autoencoder=True)["training"]
    assert rec["init_from"]["prior"] == "prior" and rec["init_from"]["steps"] == 2 and rec["steps"] == 1
    assert "--init-from" in rec["command"] and "init_from" not in rec["options"]
    # a wrong kind of prior, --init-from with --resume, and a tampered weight file are clear errors
    assert main(["train", "paired", "--run-dir", str(tmp_path / "p"), "--init-from", prior, "--device", "cpu"]) == 2
    assert "is a vdm prior without" in capsys.readouterr().err
    assert main(["train", "vdm", "--run-dir", second, "--resume", "--init-from", prior]) == 2
    assert "--init-from starts a new run" in capsys.readouterr().err
    with open(os.path.join(prior, card["networks"]["unet"]["weights"]), "ab") as f:
        f.write(b"x")
    assert main(["train", "vdm", "--run-dir", str(tmp_path / "third"), "--init-from", prior] + base) == 2
    assert "sha256" in capsys.readouterr().err


def test_an_exported_autoencoder_starts_a_new_autoencoder_run(tmp_path, capsys):
    """`train autoencoder` exports a prior of kind 'autoencoder'; --init-from takes that as well as an LDM prior,
    so a longer run (on another machine, with other patches or batches) goes on from the exported weights."""
    from MRISuperResLib.cli import main

    first, prior, second = (str(tmp_path / n) for n in ("first", "prior", "second"))
    base = ["--grid", "32", "32", "32", "--patch", "16", "16", "16", "--threads", "1", "--device", "cpu"]
    assert main(["train", "autoencoder", "--run-dir", first, "--steps", "2", "--channels", "4", "8",
                 "--norm-groups", "4", "--export", prior, "--eval-count", "1", "--lr", "0.01"] + base) == 0
    card = read_card(prior, autoencoder=True)
    assert card["kind"] == "autoencoder"
    assert main(["train", "autoencoder", "--run-dir", second, "--steps", "1", "--lr", "1e-12", "--batch-size", "2",
                 "--init-from", prior] + base) == 0
    assert "starting from prior 'prior'" in capsys.readouterr().err
    run2 = read_run(second)
    assert run2["options"]["network"]["channels"] == [4, 8] and run2["options"]["batch_size"] == 2
    start = load_checkpoint(second)["modules"]["autoencoder"]
    ref = load_network(prior, card, "autoencoder").state_dict()
    assert sorted(start) == sorted(ref)
    assert all(torch.allclose(start[k], ref[k], atol=1e-8) for k in ref)
    # an autoencoder prior holds no UNet: `train ldm` cannot start from it
    assert main(["train", "ldm", "--run-dir", str(tmp_path / "l"), "--autoencoder", prior, "--init-from", prior,
                 "--device", "cpu"]) == 2
    assert "is an autoencoder prior without the unet" in capsys.readouterr().err
    # a run from a prior that itself started from another keeps the whole lineage
    again, third = str(tmp_path / "again"), str(tmp_path / "third")
    assert main(["train", "export", "--run-dir", second, "--out", again, "--eval-count", "0", "--device", "cpu"]) == 0
    assert main(["train", "autoencoder", "--run-dir", third, "--steps", "1", "--init-from", again] + base) == 0
    lineage = read_run(third)["options"]["init_from"]
    assert lineage["steps"] == 1 and lineage["earlier"]["prior"] == "prior" and lineage["earlier"]["steps"] == 2


def test_a_paired_run_from_a_prior_keeps_the_prior_s_residual_scale():
    """x0 targets are residuals in units of the prior's scale: a run on other data (mixed contrasts) must keep it."""
    from MRISuperResLib.priors.folder import read_card
    from MRISuperResLib.priors.store import find_prior
    from MRISuperResLib.training.paired import PairedTask
    from MRISuperResLib.training.warmstart import load_into, options_from_prior

    synth = {"shape": [160, 224, 160], "orientation": "LAS", "downsample": 1, "head": True, "contrast": "mixed"}
    options = options_from_prior("paired", PairedTask.default_options(synth=synth), "synth-brain-paired")
    task = PairedTask(options, "cpu")
    load_into(task, options)
    assert task._scale() == read_card(find_prior("synth-brain-paired"))["paired"]["residual_scale"]
