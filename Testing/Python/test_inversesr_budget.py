"""Memory/time estimates before a run, refusals with numbers, and the profiling helper."""

import pytest
import torch

from MRISuperResLib.bench import profile
from MRISuperResLib.errors import ResourceError
from MRISuperResLib.methods.inversesr import budget
from MRISuperResLib.priors import synthetic, ukbb


def test_published_decoder_estimate_matches_the_measured_order():
    # FACTS.md: the published decoder keeps about 34 GB for backward at full size (fp32), 15 TFLOP-ish forward,
    # with eager GroupNorms; its low-memory GroupNorms (the default, lowmem_norm.py) keep less
    eager = budget.network_profile(ukbb.card(), with_unet=False, low_memory_norm=False)
    assert 30e9 < eager["decoder_saved"] < 40e9
    p = budget.network_profile(ukbb.card(), with_unet=False)
    assert p["decoder_saved"] < 0.8 * eager["decoder_saved"] and p["decoder_flops"] == eager["decoder_flops"]
    assert 10e12 < p["decoder_flops"] < 20e12
    est = budget.estimate(ukbb.card(), "cpu", 601, profile=p)
    assert est.memory_bytes < p["decoder_saved"]  # per-block checkpointing saves memory
    plain = budget.estimate(ukbb.card(), "cpu", 601, checkpointing=False, profile=p)
    assert plain.memory_bytes > est.memory_bytes and plain.seconds_per_iteration < est.seconds_per_iteration


def test_published_prior_is_refused_on_a_small_cpu():
    p = budget.network_profile(ukbb.card(), with_unet=False)
    est = budget.estimate(ukbb.card(), "cpu", 601, profile=p)
    with pytest.raises(ResourceError) as exc:
        budget.check_fits(est, "inversesr-decoder with prior 'ukbb-brain-ldm'", available=16e9)
    msg = str(exc.value)
    assert "GB of memory" in msg and "16.0 GB are available" in msg and "601 iterations" in msg
    assert "--device cuda" in exc.value.fix
    assert exc.value.exit_code == 3


def test_ldm_estimate_counts_one_unet_step_with_checkpointing():
    card = synthetic.tiny_card()
    p = budget.network_profile(card, with_unet=True)
    assert p["unet_saved"] > 0 and p["unet_flops"] > 0
    a = budget.estimate(card, "cpu", 10, ddim_steps=10, profile=p)
    b = budget.estimate(card, "cpu", 10, ddim_steps=40, profile=p)
    assert a.memory_bytes == b.memory_bytes  # memory does not grow with the chain
    assert b.seconds_per_iteration > a.seconds_per_iteration
    c = budget.estimate(card, "cpu", 10, ddim_steps=40, checkpointing=False, profile=p)
    assert c.memory_bytes > b.memory_bytes
    assert a.total_seconds == pytest.approx(10 * a.seconds_per_iteration)


def test_available_memory_is_positive():
    assert budget.available_memory("cpu") > 0


def test_profile_on_a_tiny_config(device):
    out = profile.profile("inversesr-decoder", device, shape=(16, 16, 8), iterations=2, card=synthetic.tiny_card())
    assert out["seconds_per_iteration"] > 0 and out["peak_memory_gb"] > 0
    assert out["shape"] == [16, 16, 8] and out["iterations"] == 2
    assert out["estimate"]["memory_gb"] >= 0 and out["estimate"]["iterations"] == 2
    assert torch.device(out["device"]).type == torch.device(device).type
    # forward + backward = 3 x the forward FLOPs of the decoder counted at the full tiny grid (16^3), scaled to 16x16x8
    card = synthetic.tiny_card()
    assert card["grid"]["shape"] == [16, 16, 16]
    flops = budget.network_profile(card, False)["decoder_flops"]
    assert out["model_tflop_per_iteration"] * 1e12 == pytest.approx(3 * flops / 2)
    assert out["achieved_tflops"] == pytest.approx(out["model_tflop_per_iteration"] / out["seconds_per_iteration"])


def test_profile_rows_carry_their_settings_and_warnings():
    from MRISuperResLib.bench.cli import profile_table

    row = profile.profile("inversesr-ldm", "cpu", shape=(16, 16, 8), iterations=2, card=synthetic.tiny_card(),
                          ddim_steps=2, settings={"accelerate": "cuda-graphs", "nested_checkpointing": "on"})
    assert row["settings"] == {"accelerate": "cuda-graphs", "nested_checkpointing": "on"}
    assert len(row["warnings"]) == 1 and "needs a CUDA GPU" in row["warnings"][0]
    assert row["first_iteration_seconds"] > 0
    gpu = dict(row, device="cuda:0", seconds_per_iteration=1.2, peak_memory_gb=17.0)
    table = profile_table([row, gpu, {"method": "inversesr-decoder", "device": "cuda", "error": "Refused. Fix."}])
    lines = table.splitlines()
    assert len(lines) == 5 and "accelerate=cuda-graphs, nested_checkpointing=on" in lines[2]
    assert "needs a CUDA GPU" in lines[2] and lines[2].count("|") == lines[0].count("|")
    assert "<= 1.5, <= 16: **not met**" in lines[3] and "| Refused |" in lines[4]
