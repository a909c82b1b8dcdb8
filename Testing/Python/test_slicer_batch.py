"""The headless batch script, run as a separate process with plain Python and the slicer-core wheel.

Every documented exit code is produced here by a real run (the README's table is checked against the
script's own list). In Slicer the same script runs as `Slicer --no-main-window --python-script ...`.
"""

import importlib.metadata
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("slicer")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "MRISuperRes", "Resources", "Scripts", "MRISuperResBatch.py")


def _batch(*args, python=sys.executable, timeout=180):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([python, SCRIPT] + list(args), capture_output=True, text=True, env=env, timeout=timeout)


def _inputs(tmp_path):
    import SimpleITK as sitk

    folder = tmp_path / "in"
    folder.mkdir()
    img = sitk.GetImageFromArray(np.random.default_rng(0).random((3, 6, 5)).astype(np.float32))
    img.SetSpacing((1.0, 1.0, 3.0))
    sitk.WriteImage(img, str(folder / "a.nii.gz"))
    (folder / "b.nrrd").write_text("not an image")  # a volume file that cannot be read
    (folder / "notes.txt").write_text("not a volume")
    return folder


def test_exit_0_when_all_succeed(tmp_path):
    import SimpleITK as sitk

    inputs, out = _inputs(tmp_path), tmp_path / "out"
    proc = _batch("--input-folder", str(inputs), "--output-folder", str(out), "--method", "trilinear",
                  "--pattern", "a*")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done: 1 of 1 volumes, 0 failed." in proc.stdout
    result = sitk.ReadImage(str(out / "a_SR-trilinear.nii.gz"))
    assert result.GetSize() == (5, 6, 9)
    np.testing.assert_allclose(result.GetSpacing(), (1, 1, 1), atol=1e-6)
    np.testing.assert_allclose(result.GetOrigin(), (0, 0, -1.0), atol=1e-5)  # same outer bounds as the input
    assert sorted(os.listdir(inputs)) == ["a.nii.gz", "b.nrrd", "notes.txt"]


def test_exit_1_when_some_fail_and_the_others_are_written(tmp_path):
    inputs, out = _inputs(tmp_path), tmp_path / "out"
    proc = _batch("--input-folder", str(inputs), "--output-folder", str(out), "--method", "trilinear")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "done: 1 of 2 volumes, 1 failed." in proc.stdout
    assert re.search(r"failed: Could not read the input .*b\.nrrd\. Check that it is a readable volume", proc.stderr)
    assert sorted(os.listdir(out)) == ["a_SR-trilinear.nii.gz"]  # the good one is still written
    assert sorted(os.listdir(inputs)) == ["a.nii.gz", "b.nrrd", "notes.txt"]


@pytest.mark.parametrize("args, message", [
    (["--output-folder", "OUT"], "the following arguments are required: --input-folder"),
    (["--input-folder", "IN", "--output-folder", "OUT", "--no-such-option"], "unrecognized arguments"),
    (["--input-folder", "MISSING", "--output-folder", "OUT"], "input folder MISSING does not exist"),
    (["--input-folder", "IN", "--output-folder", "IN"], "must differ from the input folder"),
    (["--input-folder", "IN", "--output-folder", "OUT", "--set", "steps"], "--set steps is not KEY=VALUE"),
    (["--input-folder", "IN", "--output-folder", "OUT", "--pattern", "*.mha"], "no volume"),
])
def test_exit_2_for_bad_arguments(tmp_path, args, message):
    inputs = _inputs(tmp_path)
    paths = {"IN": str(inputs), "OUT": str(tmp_path / "out"), "MISSING": str(tmp_path / "missing")}
    proc = _batch(*[paths.get(a, a) for a in args])
    assert proc.returncode == 2 and message.replace("MISSING", paths["MISSING"]) in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_exit_3_when_the_worker_python_lacks_packages(tmp_path):
    """A real Python with MRML (slicer-core, vtk, numpy) but neither torch nor SimpleITK: no run starts."""
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                          text=True, check=True).stdout.strip()
    for dist in ("slicer-core", "vtk", "numpy"):
        d = importlib.metadata.distribution(dist)
        for top in sorted({str(f).split("/")[0] for f in d.files or []} - {".."}):
            src = os.path.join(str(d.locate_file("")), top)
            if os.path.exists(src) and not os.path.exists(os.path.join(site, top)):
                os.symlink(src, os.path.join(site, top))
    inputs = _inputs(tmp_path)
    proc = _batch("--input-folder", str(inputs), "--output-folder", str(tmp_path / "out"), python=python)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert re.search(r"lacks .*torch.*run again with --install-dependencies", proc.stderr)
    proc = _batch("--input-folder", str(inputs), "--output-folder", str(tmp_path / "out"), "--install-dependencies",
                  python=python)
    assert proc.returncode == 3 and "ship with Slicer" in proc.stderr and "SimpleITK is missing" in proc.stderr
    assert os.listdir(tmp_path / "out") == []


def test_exit_130_when_interrupted(tmp_path):
    inputs, out, temp = _inputs(tmp_path), tmp_path / "out", tmp_path / "temp"
    temp.mkdir()
    env = dict(os.environ, PYTHONPATH=REPO, TMPDIR=str(temp))  # the Logic's temp folders go there
    proc = subprocess.Popen([sys.executable, SCRIPT, "--input-folder", str(inputs), "--output-folder", str(out),
                             # a run of a minute or more (64 samples, each a network call), so the Ctrl+C below
                             # lands while it runs; trilinear could finish first on an idle machine
                             "--method", "paired-ddpm", "--set", "samples=64", "--pattern", "a*"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            # as from a terminal: a shell's background job (CI, nohup ... &) ignores SIGINT, and a
                            # child would inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stdout.readline()  # "[1/1] a.nii.gz -> ...": the run is being set up
    assert first.startswith("[1/1] a.nii.gz"), first + proc.stderr.read()
    runs = temp / "MRISuperRes"
    deadline = time.monotonic() + 60
    while not (runs.is_dir() and os.listdir(runs)) and time.monotonic() < deadline:
        time.sleep(0.05)  # the worker starts once the run's temp folder exists; it then takes seconds
    assert os.listdir(runs), "the run did not start"
    proc.send_signal(signal.SIGINT)  # Ctrl+C
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "error: interrupted." in err
    assert os.listdir(out) == [] and os.listdir(runs) == []  # the run's temp folder is gone


def test_readme_documents_every_exit_code():
    source = open(SCRIPT).read()
    codes = [int(c) for c in re.search(r"EXIT_OK, .* = ([0-9, ]+)\n", source).group(1).split(",")]
    readme = open(os.path.join(REPO, "MRISuperRes", "README.md")).read()
    section = readme.split("## Headless batch", 1)[1].split("\n## ", 1)[0]
    for code in codes:
        assert re.search(r"^\| `%d` \|" % code, section, re.M), code
