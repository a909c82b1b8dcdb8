"""The command line as users and the Slicer module call it: contracts, errors, exit codes, no leftovers."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, phantom, rotation

from MRISuperResLib.progress import parse_event
from MRISuperResLib.volume import Volume, read_volume, write_volume


def cli(*args, check=None):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "MRISuperResLib", *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=300)
    if check is not None:
        assert r.returncode == check, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    return r


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    hr = Volume.from_array(phantom((20, 22, 24), seed=5) * 800, spacing=(1.0, 1.0, 1.0),
                           origin=(-10.5, 4.25, 2.0), direction=rotation(0.1, 0.2, 0.3))
    write_volume(hr, str(d / "hr.nii.gz"))
    return d


def test_methods_json_contract():
    items = json.loads(cli("methods", "--json", check=0).stdout)
    names = [m["name"] for m in items]
    assert {"trilinear", "bspline", "sinc"} <= set(names)
    for m in items:
        assert set(m) >= {"name", "title", "description", "settings"}
        for s in m["settings"]:
            assert set(s) >= {"name", "type", "default", "min", "max", "choices", "help"}
            if "iteration" in s["name"]:
                assert s["name"] == "iterations"
        if m["needs_prior"]:  # where a run's defaults come from: the schema, then the prior's card per device
            assert "defaults_from" in m and set(m["default_prior"]) == {"cpu", "cuda"}
            names = {s["name"] for s in m["settings"]}
            for prior, per_device in m["prior_defaults"].items():
                assert all(set(values) <= names for values in per_device.values()), prior
            assert all(p is None or p in m["prior_defaults"] for p in m["default_prior"].values())
            assert set(m["below_baseline_with_default_prior"]) == {"cpu", "cuda"}
    below = {m["name"]: m.get("below_baseline_with_default_prior") for m in items}
    # the shipped LDM prior's own gate has the decoder below B-spline and the paired model above it
    assert "below bspline" in below["inversesr-decoder"]["cpu"] and "synth-brain-ldm" in below["inversesr-decoder"]["cpu"]
    assert below["paired-ddpm"] == {"cpu": None, "cuda": None}


def test_a_method_below_its_baseline_with_its_default_prior_is_not_the_default():
    from MRISuperResLib.demo import default_method

    assert default_method(["paired-ddpm", "inversesr-decoder", "bspline"]) == "paired-ddpm"
    assert default_method(["inversesr-decoder", "inversesr-ldm", "bspline"]) == "inversesr-ldm"
    assert default_method(["inversesr-decoder", "bspline"]) == "bspline"


def test_devices_json():
    items = json.loads(cli("devices", "--json", check=0).stdout)
    assert items[0]["name"] == "cpu"
    for d in items[1:]:
        assert d["name"].startswith("cuda:") and "free_mb" in d


def test_degrade_run_metrics_round_trip(files):
    d = files
    r = cli("degrade", "--input", d / "hr.nii.gz", "--output", d / "lr.nrrd", "--operator", "thick-slice",
            "--axis", 2, "--factor", 4, check=0)
    lr = read_volume(str(d / "lr.nrrd"))
    assert lr.grid.shape == (20, 22, 6) and lr.grid.spacing[2] == pytest.approx(4.0)
    r = cli("run", "--method", "bspline", "--input", d / "lr.nrrd", "--output", d / "sr.nii.gz",
            "--progress", "jsonl", "--residual", d / "res.nii.gz", check=0)
    events = [e for e in map(parse_event, r.stdout.splitlines()) if e]
    kinds = [e["event"] for e in events]
    assert kinds[0] in ("warning", "start") and kinds[-1] == "result"
    assert any("inferred" in e.get("message", "") for e in events if e["event"] == "warning")
    assert events[-1]["output"] == os.path.abspath(str(d / "sr.nii.gz"))
    hr, sr = read_volume(str(d / "hr.nii.gz")), read_volume(str(d / "sr.nii.gz"))
    assert sr.grid.allclose(hr.grid, atol=1e-5)
    assert read_volume(str(d / "res.nii.gz")).grid.allclose(lr.grid, atol=1e-5)
    m = json.loads(cli("metrics", "--reference", d / "hr.nii.gz", "--test", d / "sr.nii.gz", "--json", check=0).stdout)
    assert {"psnr", "psnr_masked", "ssim", "ssim_slices", "data_range"} <= set(m)
    assert m["data_range"] == pytest.approx(float(hr.array.max() - hr.array.min()))
    assert 15 < m["psnr"] < 60


def test_run_with_explicit_operator_and_settings(files):
    d = files
    cli("degrade", "--input", d / "hr.nii.gz", "--output", d / "lr_sr.mha", "--operator", "slice-removal",
        "--axis", 1, "--factor", 2, check=0)
    cli("run", "--method", "trilinear", "--input", d / "lr_sr.mha", "--output", d / "o.mha", "--operator",
        "slice-removal", "--axis", 1, "--factor", 2, check=0)
    assert read_volume(str(d / "o.mha")).grid.shape == (20, 22, 24)


BAD = [
    (["run", "--input", "{d}/missing.nii.gz", "--output", "{d}/x.nii.gz"], 2, "not found"),
    (["run", "--input", "{d}/hr.nii.gz", "--output", "{d}/hr.nii.gz"], 2, "input path"),
    (["run", "--method", "nope", "--input", "{d}/lr.nrrd", "--output", "{d}/x.nii.gz"], 2, "Unknown method"),
    (["run", "--input", "{d}/lr.nrrd", "--output", "{d}/x.nii.gz", "--set", "iterations=3"], 2, "no setting"),
    (["run", "--input", "{d}/lr.nrrd", "--output", "{d}/x.nii.gz", "--set", "junk"], 2, "key=value"),
    (["run", "--input", "{d}/lr.nrrd", "--output", "{d}/x.nii.gz", "--operator", "thick-slice", "--factor", "1"],
     2, "greater than 1"),
    (["run", "--input", "{d}/lr.nrrd", "--output", "{d}/x.nii.gz", "--operator", "thick-slice", "--axis", "5"],
     2, "out of range"),
    (["run", "--input", "{d}/lr.nrrd", "--output", "{d}/nodir/x.nii.gz"], 2, "does not exist"),
    (["run", "--input", "{d}/lr.nrrd", "--output", "{d}/x.txt"], 2, "extension"),
    (["run", "--input", "{d}/hr.nii.gz", "--output", "{d}/x.nii.gz"], 2, "isotropic"),
    (["run", "--input", "{d}/lr.nrrd", "--output", "{d}/x.nii.gz", "--device", "cuda:7"], 2, None),
    (["degrade", "--input", "{d}/hr.nii.gz", "--output", "{d}/x.nii.gz", "--operator", "kspace", "--factor", "0.5"],
     2, "greater than 1"),
    (["metrics", "--reference", "{d}/hr.nii.gz", "--test", "{d}/lr.nrrd"], 2, "different grids"),
    # numbers too large for what consumes them are refused where they are parsed, not met as OverflowError
    (["run", "--input", "{d}/lr.nrrd", "--output", "{d}/x.nii.gz", "--operator", "thick-slice", "--factor", "1e308"],
     2, "too large"),
    (["run", "--input", "{d}/lr.nrrd", "--output", "{d}/x.nii.gz", "--seed", "99999999999999999999999"], 2, "seed"),
    (["run", "--method", "kspace-vdm", "--input", "{d}/lr.nrrd", "--output", "{d}/x.nii.gz", "--set",
      "seed=99999999999999999999999"], 2, "seed"),
    (["run", "--method", "paired-ddpm", "--input", "{d}/lr.nrrd", "--output", "{d}/x.nii.gz", "--set", "patch=30"],
     2, "multiple of 4"),
]


@pytest.mark.parametrize("args, code, words", BAD)
def test_bad_requests_give_one_line_and_no_traceback(files, args, code, words):
    d = files
    if not (d / "lr.nrrd").exists():
        cli("degrade", "--input", d / "hr.nii.gz", "--output", d / "lr.nrrd", "--operator", "thick-slice", check=0)
    before = sorted(os.listdir(d))
    mtime = os.path.getmtime(d / "hr.nii.gz")
    r = cli(*[a.format(d=d) for a in args], "--progress", "jsonl") if args[0] == "run" else cli(
        *[a.format(d=d) for a in args])
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    err_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1
    if words:
        assert words.lower() in err_lines[0].lower()
    if args[0] == "run":
        events = [e for e in map(parse_event, r.stdout.splitlines()) if e]
        assert events[-1]["event"] == "error" and events[-1]["exit_code"] == code
    assert sorted(os.listdir(d)) == before  # nothing written, nothing half-written
    assert os.path.getmtime(d / "hr.nii.gz") == mtime


def test_bad_image_data_errors(tmp_path):
    import SimpleITK as sitk

    arr = np.ones((6, 6, 6), np.float32)
    arr[2, 2, 2] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "nan.nrrd"))
    r = cli("run", "--input", tmp_path / "nan.nrrd", "--output", tmp_path / "o.nrrd", "--operator", "thick-slice")
    assert r.returncode == 2 and "NaN" in r.stderr and "Traceback" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["nan.nrrd"]


def test_batch_over_folder_skips_bad_files_and_resumes(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for n in range(2):
        write_volume(Volume.from_array(phantom((10, 12, 4), seed=n) * 100, spacing=(1, 1, 4)), str(src / ("s%d.nrrd" % n)))
    (src / "broken.nii.gz").write_bytes(b"garbage")
    dst = tmp_path / "out"
    r = cli("run", "--input", src, "--output", dst, "--method", "bspline", "--progress", "jsonl", check=4)
    events = [e for e in map(parse_event, r.stdout.splitlines()) if e]
    assert sorted(os.listdir(dst)) == ["s0.nrrd", "s1.nrrd"]
    assert any(e["event"] == "warning" and "broken.nii.gz" in e["message"] for e in events)
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] <= 1.0
    assert sum(e["event"] == "result" for e in events) == 2
    summary = events[-1]  # some files failed: exit 4, and the last event says which and why
    assert summary["event"] == "summary" and (summary["total"], summary["done"], summary["failed"]) == (3, 2, 1)
    assert [os.path.basename(f["input"]) for f in summary["failures"]] == ["broken.nii.gz"]
    assert summary["failures"][0]["reason"] and summary["failures"][0]["exit_code"] == 2 and summary["exit_code"] == 4
    assert read_volume(str(dst / "s0.nrrd")).grid.shape == (10, 12, 16)
    mtime = os.path.getmtime(dst / "s0.nrrd")
    (dst / "s1.nrrd").write_bytes((dst / "s1.nrrd").read_bytes()[:300])  # cut short, as by a full disk
    r = cli("run", "--input", src, "--output", dst, "--method", "bspline", "--progress", "jsonl", check=4)
    assert os.path.getmtime(dst / "s0.nrrd") == mtime  # resumable: good existing outputs are skipped
    assert "output exists" in r.stdout
    events = [e for e in map(parse_event, r.stdout.splitlines()) if e]
    redone = [os.path.basename(e["output"]) for e in events if e["event"] == "result"]
    assert redone == ["s1.nrrd"]  # the damaged one was redone
    assert (events[-1]["done"], events[-1]["skipped"]) == (1, 1)
    assert read_volume(str(dst / "s1.nrrd")).grid.shape == (10, 12, 16)
    os.remove(src / "broken.nii.gz")
    cli("run", "--input", src, "--output", dst, "--method", "bspline", check=0)  # nothing failed: exit 0
    r = cli("run", "--input", src, "--output", src, "--method", "bspline")
    assert r.returncode == 2 and "input folder" in r.stderr
    r = cli("run", "--input", src, "--output", tmp_path / "x.nii.gz", "--method", "bspline")
    assert r.returncode == 2 and "must be a folder" in r.stderr and not (tmp_path / "x.nii.gz").exists()


def test_demo_cuts_the_template_to_its_head_on_the_same_physical_grid():
    import numpy as np

    from MRISuperResLib.demo import cropped_to_head, mni152_example

    full = mni152_example()
    cut = cropped_to_head(full, multiple=4)
    assert all(n % 4 == 0 for n in cut.grid.shape) and np.prod(cut.grid.shape) < 0.7 * np.prod(full.grid.shape)
    assert float(cut.array.sum()) == float(full.array.sum())  # nothing but air left out
    lo = np.round(np.linalg.solve(np.asarray(full.grid.direction).reshape(3, 3) * np.asarray(full.grid.spacing),
                                  np.asarray(cut.grid.origin) - np.asarray(full.grid.origin))).astype(int)
    sl = tuple(slice(int(a), int(a + n)) for a, n in zip(lo, cut.grid.shape))
    assert np.array_equal(cut.array, full.array[sl])
    assert np.allclose(cut.grid.index_to_physical((0, 0, 0)), full.grid.index_to_physical(lo), atol=1e-6)
