"""The benchmark command writes every output with the contracted keys and same-run ratios."""

import csv
import json
import os

import pytest
from conftest import phantom
from test_cli import cli

from MRISuperResLib.volume import Volume, write_volume

KEYS = {"method", "case", "degradation", "psnr", "psnr_masked", "ssim", "ssim_slices", "seconds", "peak_ram_mb",
        "peak_gpu_mb", "device"}


def test_bench_on_a_folder_case(tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    write_volume(Volume.from_array(phantom((32, 32, 32), seed=1) * 300), str(cases / "head1.nii.gz"))
    out = tmp_path / "bench"
    cli("bench", "--out", out, "--cases", cases, "--methods", "trilinear", "--degradations", "slice-removal-4mm",
        "kspace-2x", "--device", "cpu", check=0)
    rows = json.load(open(out / "results.json"))
    assert rows and all(KEYS <= set(r) for r in rows)
    by = {(r["method"], r["degradation"]): r for r in rows}
    # all three baselines in every comparison, each scored
    for m in ("trilinear", "bspline", "sinc"):
        for d in ("slice-removal-4mm", "kspace-2x"):
            assert by[(m, d)]["psnr_masked"] is not None and by[(m, d)]["error"] is None
    assert by[("bspline", "slice-removal-4mm")]["delta_psnr_masked_db"] == 0.0
    assert by[("sinc", "kspace-2x")]["delta_psnr_masked_db"] == 0.0
    d = by[("trilinear", "kspace-2x")]
    assert d["delta_psnr_masked_db"] == pytest.approx(d["psnr_masked"] - by[("sinc", "kspace-2x")]["psnr_masked"],
                                                      abs=1e-3)
    assert all(r["peak_ram_mb"] > 10 for r in rows)
    assert len(list(csv.DictReader(open(out / "results.csv")))) == len(rows)
    assert "| trilinear | head1 | kspace-2x |" in (out / "results.md").read_text()
    for name in ("psnr_masked.png", "head1_slice-removal-4mm.png", "head1_kspace-2x.png"):
        assert os.path.getsize(out / name) > 1000
    assert not [p for p in os.listdir(out) if "partial" in p]


def test_synthetic_cases_are_held_out_heads_on_the_prior_grid():
    from MRISuperResLib.bench.cases import resolve_cases
    from MRISuperResLib.training.synth import HELDOUT_START

    cases = resolve_cases(["synthetic"], synthetic=2)
    assert [c.name for c in cases] == ["synthetic-%d" % HELDOUT_START, "synthetic-%d" % (HELDOUT_START + 1)]
    assert all(c.label == "held-out synthetic" for c in cases)
    vol = cases[0].load()
    assert vol.grid.shape == (160, 224, 160) and vol.grid.spacing == (1.0, 1.0, 1.0)
    assert 0.0 <= vol.array.min() and vol.array.max() <= 1.0 and vol.array.std() > 0.05


def test_stripped_cases_are_held_out_heads_with_nothing_around_the_brain():
    import numpy as np
    from scipy import ndimage

    from MRISuperResLib.bench.cases import CONTRAST_CASES, STRIPPED_CASES, resolve_cases
    from MRISuperResLib.training.synth import HELDOUT_START, BrainSynth, SynthConfig

    cases = resolve_cases(["stripped"])
    assert [c.label for c in cases] == ["held-out skull-stripped"] * 2
    seeds = [int(c.name.rsplit("-", 1)[1]) for c in cases]
    # held out, and apart from the gate's other heads and the tuning heads (1000001-2, 1000021-23)
    assert all(s >= HELDOUT_START for s in seeds)
    assert not set(seeds) & ({HELDOUT_START, HELDOUT_START + 1, HELDOUT_START + 2} | {s for _, s in CONTRAST_CASES}
                              | set(range(HELDOUT_START + 21, HELDOUT_START + 24)))
    vol = cases[0].load()
    contrast, seed = STRIPPED_CASES[0]
    brain = BrainSynth(SynthConfig(contrast=contrast)).sample(seed).mask.numpy()
    far = ~ndimage.binary_dilation(brain, iterations=4)
    # no scalp: past the brain only air and its noise (with its scalp this head's top percent there is above 0.5)
    assert np.percentile(vol.array[far], 99) < 0.15 and vol.array[brain].mean() > 0.3


def test_whole_brain_case_is_the_template_at_the_size_of_a_clinical_1mm_volume():
    import numpy as np

    from MRISuperResLib.bench.cases import resolve_cases
    from MRISuperResLib.demo import mni152_example

    (case,) = resolve_cases(["mni152-181"])
    vol, full = case.load(), mni152_example()
    assert vol.grid.shape == (181, 217, 181) and vol.grid.spacing == full.grid.spacing
    # a centre cut of the template itself: the voxel at its first index sits where the template has it
    lo = (np.asarray(full.grid.shape) - np.asarray(vol.grid.shape)) // 2
    assert np.array_equal(vol.array, full.array[lo[0]:lo[0] + 181, lo[1]:lo[1] + 217, lo[2]:lo[2] + 181])
    assert np.allclose(vol.grid.index_to_physical((0, 0, 0)), full.grid.index_to_physical(lo), atol=1e-6)


def test_phase_seconds_are_shown_beside_a_run_with_more_than_one_phase():
    from MRISuperResLib.bench.report import markdown_table

    row = dict(method="paired-ddpm", case="c", degradation="d", psnr=1.0, psnr_masked=1.0, delta_psnr_masked_db=0.0,
               ssim=0.5, ssim_slices=0.5, seconds=300.0, time_ratio=1.0, peak_ram_mb=1.0, peak_gpu_mb=None,
               device="cpu", error=None, phase_seconds={"adaptation": 100.0, "sampling": 200.0})
    assert "| 300.0 (adaptation 100, sampling 200) |" in markdown_table([row])
    row["phase_seconds"] = {"adaptation": 0.0, "sampling": 300.0}
    assert "| 300.0 |" in markdown_table([row])


def test_gate_summary_compares_with_the_baseline_and_judges_only_the_hard_case():
    from MRISuperResLib.bench.cli import GATE_TARGET_DB, gate_plan
    from MRISuperResLib.bench.report import gate_summary

    def row(method, deg, psnr, prior=None, baseline="bspline"):
        return {"method": method, "case": "c", "label": "held-out synthetic", "degradation": deg, "psnr_masked": psnr,
                "ssim": 0.9, "seconds": 1.0, "baseline": baseline, "prior": prior, "error": None,
                "delta_psnr_masked_db": None}

    rows = [row("bspline", "slice-removal-4mm", 28.0), row("bspline", "slice-removal-8mm", 22.0),
            row("paired-ddpm", "slice-removal-4mm", 27.0, "p"), row("paired-ddpm", "slice-removal-8mm", 23.5, "p"),
            row("sinc", "kspace-4x", 30.0, baseline="sinc"), row("kspace-vdm", "kspace-4x", 30.5, "v", "sinc"),
            row("paired-ddpm", "kspace-4x", 31.0, "p", "sinc"), row("bspline", "thick-slice-5mm", 25.0),
            row("paired-ddpm", "thick-slice-5mm", 26.5, "p")]
    for r in rows:
        base = next(b for b in rows if b["method"] == r["baseline"] and b["degradation"] == r["degradation"])
        r["delta_psnr_masked_db"] = r["psnr_masked"] - base["psnr_masked"]
    out = gate_summary(rows, gate_plan(), GATE_TARGET_DB)
    assert sorted(out) == ["p", "v"]
    p = {r["degradation"]: r for r in out["p"]}
    assert sorted(p) == ["slice-removal-4mm", "slice-removal-8mm", "thick-slice-5mm"]  # k-space is not paired-ddpm's
    assert p["thick-slice-5mm"]["target_db"] == 2.0 and p["thick-slice-5mm"]["meets_target"] is False  # +1.5 < 2
    assert p["slice-removal-4mm"]["meets_target"] is None and p["slice-removal-8mm"]["meets_target"] is True
    assert p["slice-removal-8mm"]["baseline_psnr_masked"] == 22.0
    assert out["v"][0]["meets_target"] is False  # +0.5 dB < 1 dB


def test_update_cards_merges_gate_runs_and_keeps_the_weights_loadable(tmp_path, monkeypatch):
    import json

    from MRISuperResLib.bench.cli import GATE_TARGET_DB, gate_plan
    from MRISuperResLib.bench.report import update_cards
    from MRISuperResLib.priors import synthetic
    from MRISuperResLib.priors.store import load_prior

    monkeypatch.setenv("MRISR_MODELS_DIR", str(tmp_path / "store"))
    folder = synthetic.write_prior(synthetic.random_prior(synthetic.tiny_card(name="gate-ldm")),
                                   str(tmp_path / "store" / "gate-ldm"))

    def rows(case, psnr):
        base = {"method": "bspline", "case": case, "label": "x", "degradation": "slice-removal-8mm",
                "psnr_masked": 20.0, "ssim": 0.8, "seconds": 1.0, "baseline": "bspline", "prior": None,
                "error": None, "delta_psnr_masked_db": 0.0}
        return [base, dict(base, method="inversesr-decoder", prior="gate-ldm", psnr_masked=psnr,
                           delta_psnr_masked_db=psnr - 20.0)]

    meta = {"command": "bench --gate --cases synthetic", "machine": "m", "date": "d1"}
    assert update_cards(rows("synthetic-1", 22.0), meta, gate_plan(), GATE_TARGET_DB) == [folder]
    update_cards(rows("mni152", 20.5), dict(meta, command="bench --gate --cases mni152", date="d2"), gate_plan(), GATE_TARGET_DB)
    update_cards(rows("mni152", 21.5), dict(meta, command="bench --gate --cases mni152", date="d3"), gate_plan(), GATE_TARGET_DB)
    with open(tmp_path / "store" / "gate-ldm" / "model.json") as fh:
        gate = json.load(fh)["quality_gate"]
    got = {(r["case"], r["meets_target"]) for r in gate["rows"]}
    assert got == {("synthetic-1", True), ("mni152", True)}  # the later mni152 run replaced the earlier row
    # the d2 run, its only row replaced, no longer describes anything in the card: dropped, rows renumbered
    assert [r["date"] for r in gate["runs"]] == ["d1", "d3"]
    assert {r["case"]: gate["runs"][r["run"]]["date"] for r in gate["rows"]} == {"synthetic-1": "d1", "mni152": "d3"}
    # a GPU run of the same rows sits beside the CPU ones instead of replacing them
    gpu = [dict(r, device="cuda:0") for r in rows("mni152", 23.0)]
    update_cards(gpu, dict(meta, command="bench --gate --device cuda", date="d4"), gate_plan(), GATE_TARGET_DB)
    with open(tmp_path / "store" / "gate-ldm" / "model.json") as fh:
        rows_now = json.load(fh)["quality_gate"]["rows"]
    assert sorted((r["case"], r.get("device") or "cpu", r["psnr_masked"]) for r in rows_now) == [
        ("mni152", "cpu", 21.5), ("mni152", "cuda:0", 23.0), ("synthetic-1", "cpu", 22.0)]
    load_prior("gate-ldm")  # the card still verifies against its weights


def test_speedups_are_measured_against_the_plain_run_and_keep_the_result(tmp_path):
    from MRISuperResLib.bench import speedups

    configs = [("plain", False, False, False), ("all (default)", True, True, True)]
    rows = speedups.run(str(tmp_path), "cpu", samples=1, shape=(32, 32, 32), configs=configs)
    assert [r["config"] for r in rows] == ["plain", "all (default)"]
    assert rows[0]["x_plain_time"] == 1.0 and rows[1]["x_plain_time"] > 0
    assert all(r["peak_ram_mb"] > 100 and r["seconds"] > 0 for r in rows)
    # the speed-ups may not change the answer beyond float32 rounding. Channels-last makes oneDNN pick other
    # convolution algorithms (another summation order in every layer of the UNet): measured up to 3e-3 of the output's
    # range on this case, under 2^-8 (bf16's precision, the tolerance the GPU paths are held to as well)
    assert rows[1]["max_abs_diff_vs_plain"] < 2 ** -8 * rows[1]["output_range"]
    assert not any(n.endswith(".npy") for n in os.listdir(str(tmp_path)))
    table = speedups.markdown(rows)
    assert table.count("\n") == 3 and "| all (default) | yes | yes | yes |" in table


def test_a_case_whose_size_the_factor_does_not_divide_is_cut_to_tile_and_scored():
    import numpy as np

    from MRISuperResLib.bench import runner
    from MRISuperResLib.bench.cases import Case

    vol = Volume.from_array(phantom((32, 32, 36), seed=2) * 300, spacing=(1.0, 1.0, 1.0), origin=(3.0, -2.0, 5.0))
    logged = []
    rows, _ = runner.run([Case("odd", "user", lambda: vol)], ["slice-removal-8mm"], ["trilinear"], "cpu",
                         log=logged.append)
    assert all(r.error is None and np.isfinite(r.psnr_masked) for r in rows)
    assert any("odd cut to 32x32x32 so that slice-removal-8mm tiles it" in m for m in logged)
    cut = runner.tiled(vol, "slice-removal", 2, 8)
    assert cut.grid.shape == (32, 32, 32) and np.array_equal(cut.array, vol.array[:, :, 2:34])
    assert np.allclose(cut.grid.index_to_physical((0, 0, 0)), vol.grid.index_to_physical((0, 0, 2)), atol=1e-6)
    assert runner.tiled(vol, "slice-removal", 2, 4) is vol and runner.tiled(vol, "kspace", (0, 1), 4) is vol
    assert runner.tiled(vol, "kspace", (0, 1), 3).grid.shape == (30, 30, 36)


def test_a_held_out_draw_named_on_the_command_line_is_that_head_and_slices_cut_its_centre():
    import numpy as np

    from MRISuperResLib.bench.cases import STRIPPED_CASES, resolve_cases, stripped_cases, with_slices

    contrast, seed = STRIPPED_CASES[1]
    (case,) = resolve_cases(["heldout:%s-stripped:%d" % (contrast, seed)])
    gate = stripped_cases()[1]
    assert (case.name, case.label) == (gate.name, gate.label)
    vol = case.load()
    assert np.array_equal(vol.array, gate.load().array)
    (t2,) = resolve_cases(["heldout:T2:1000021"])
    assert t2.label == "held-out contrast" and t2.name == "synthetic-t2-1000021"
    slab = with_slices(case, 16)
    cut = slab.load()
    assert slab.name == gate.name + "-k16" and cut.grid.shape == vol.grid.shape[:2] + (16,)
    lo = (vol.grid.shape[2] - 16) // 2
    assert np.array_equal(cut.array, vol.array[:, :, lo:lo + 16])
    assert np.allclose(cut.grid.index_to_physical((0, 0, 0)), vol.grid.index_to_physical((0, 0, lo)), atol=1e-6)


@pytest.mark.parametrize("spec, message", [
    ("heldout:t2:12", "seed 12 is not a held-out seed"),
    ("heldout:dwi:1000021", "contrast 'dwi' is not one the synthetic heads have"),
    ("heldout:t2", "is not heldout:CONTRAST:SEED"),
])
def test_a_bad_held_out_draw_is_refused_with_what_to_give(spec, message):
    from MRISuperResLib.bench.cases import resolve_cases
    from MRISuperResLib.errors import InputError

    with pytest.raises(InputError) as err:
        resolve_cases([spec])
    assert message in str(err.value) and "heldout:t2:1000021" in str(err.value)


def test_bench_set_reaches_the_methods_that_have_the_setting(tmp_path):
    import numpy as np

    from MRISuperResLib.bench import runner
    from MRISuperResLib.bench.cases import Case
    from MRISuperResLib.priors.store import default_prior

    r = cli("bench", "--out", tmp_path / "b", "--methods", "trilinear", "--set", "samples=2", "--device", "cpu")
    assert r.returncode != 0 and "--set samples: no measured method has such a setting" in r.stderr
    assert "Traceback" not in r.stderr and not os.path.exists(tmp_path / "b" / "results.json")
    r = cli("bench", "--out", tmp_path / "b", "--gate", "--update-cards", "--methods", "paired-ddpm", "--set",
            "samples=2", "--device", "cpu")
    assert r.returncode != 0 and "--update-cards writes the gate of each prior's default settings" in r.stderr

    vol = Volume.from_array(phantom((32, 32, 32), seed=3), spacing=(1.0, 1.0, 1.0))
    prior = default_prior("paired", "cpu")

    def paired(overrides):
        rows, _ = runner.run([Case("p", "user", lambda: vol)], ["slice-removal-4mm"], ["paired-ddpm"], "cpu",
                             log=lambda m: None, load_prior=lambda m: prior, overrides=overrides)
        return {row.method: row for row in rows}

    # adapt off: at 4x slice gaps the default would spend minutes learning from the scan, which this does not test
    two, default = paired({"samples": "2", "adapt": "off"}), paired({"adapt": "off"})
    assert two["paired-ddpm"].settings == {"samples": "2", "adapt": "off"} and two["bspline"].settings == {}
    assert two["bspline"].psnr == default["bspline"].psnr
    assert abs(two["paired-ddpm"].psnr - default["paired-ddpm"].psnr) > 1e-4
    assert np.isfinite(two["paired-ddpm"].psnr_masked)
