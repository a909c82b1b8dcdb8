"""Real faults around the command line: a full disk, cut files, lying headers, too little memory, killed runs.

Each fault is made real in a child process (file-size and address-space limits, a small tmpfs, signals), never
mocked: the point is what niftilib, ITK and the kernel actually do.
"""

import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, phantom

from MRISuperResLib.progress import parse_event
from MRISuperResLib.volume import PARTIAL_PREFIX, Volume, write_volume

GB = 2 ** 30


def _env():
    # no .pyc writes: under a file-size limit they would fail (harmlessly, but noisily)
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")


def _limits(fsize=None, address=None):
    def apply():
        # Ignored, SIGXFSZ leaves the write to fail with EFBIG, as a full disk makes it fail with ENOSPC.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if address is not None:
            resource.setrlimit(resource.RLIMIT_AS, (address, address))
    return apply


def cli(*args, fsize=None, address=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "MRISuperResLib", *map(str, args)], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=timeout, preexec_fn=_limits(fsize, address))


def events(r):
    return [e for e in map(parse_event, r.stdout.splitlines()) if e]


def partials(folder):
    return [n for n in os.listdir(folder) if n.startswith(PARTIAL_PREFIX)]


def noise_lr(path, shape=(20, 22, 6), seed=0):
    """Noise does not compress: outputs are as large as their voxels."""
    arr = np.random.default_rng(seed).random(shape).astype(np.float32) * 1000
    write_volume(Volume.from_array(arr, spacing=(1, 1, 4)), str(path))
    return path


@pytest.fixture(scope="module")
def address_limit():
    """An address-space limit 3 GiB above what the command line maps once it has imported everything."""
    code = ("import MRISuperResLib.cli, MRISuperResLib.pipeline, MRISuperResLib.methods\n"
            "print([ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmSize:')][0])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip()) * 1024 + 3 * GB


# ---- a full disk ----

@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_full_disk_keeps_the_existing_output(tmp_path, suffix):
    lr = noise_lr(tmp_path / "lr.nrrd")
    out = tmp_path / ("out" + suffix)
    write_volume(Volume.from_array(phantom((8, 8, 8)) * 10), str(out))  # a good result from an earlier run
    before = out.read_bytes()
    r = cli("run", "--method", "bspline", "--input", lr, "--output", out, "--progress", "jsonl", fsize=16 * 1024)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "disk full" in r.stderr and "Traceback" not in r.stderr
    assert events(r)[-1]["event"] == "error" and events(r)[-1]["exit_code"] == 2
    assert out.read_bytes() == before
    assert partials(tmp_path) == []


def test_full_tmpfs_keeps_the_existing_output(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN); the ulimit -f test covers the fault")
    try:
        lr = noise_lr(tmp_path / "lr.nrrd", shape=(24, 24, 8))  # 24 x 24 x 32 float32 output: 74 kB > 64 kB
        out = disk / "out.nii"
        write_volume(Volume.from_array(phantom((10, 10, 10)) * 10), str(out))
        before = out.read_bytes()
        r = cli("run", "--method", "trilinear", "--input", lr, "--output", out)
        assert r.returncode == 2 and "disk full" in r.stderr, r.stderr[-2000:]
        assert out.read_bytes() == before
        assert sorted(os.listdir(disk)) == ["out.nii"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_failed_residual_write_replaces_nothing(tmp_path):
    """The main output is written (small, compressed), the residual is not (larger than the limit): neither
    existing file is touched, none is removed."""
    arr = np.zeros((24, 24, 8), np.float32)
    arr[6:18, 6:18, 2:6] = 100  # a block: the HR output compresses to under 1 kB, the .nii residual is 18 kB
    lr = tmp_path / "lr.nii"
    write_volume(Volume.from_array(arr, spacing=(1, 1, 4)), str(lr))
    out, res = tmp_path / "sr.nii.gz", tmp_path / "res.nii"
    write_volume(Volume.from_array(phantom((8, 8, 8)) * 10), str(out))
    write_volume(Volume.from_array(phantom((8, 8, 8), seed=1) * 10), str(res))
    before = {p: p.read_bytes() for p in (out, res)}
    r = cli("run", "--method", "bspline", "--input", lr, "--output", out, "--residual", res, fsize=8 * 1024)
    assert r.returncode == 2 and "res.nii" in r.stderr and "disk full" in r.stderr, r.stderr[-2000:]
    assert {p: p.read_bytes() for p in (out, res)} == before
    assert partials(tmp_path) == []


# ---- inputs that are not what their header says ----

def test_truncated_input_is_refused_by_run_batch_and_metrics(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    good = noise_lr(src / "good.nii.gz")
    data = good.read_bytes()
    (src / "cut.nii.gz").write_bytes(data[:len(data) // 2])
    cut = src / "cut.nii.gz"
    r = cli("run", "--method", "bspline", "--input", cut, "--output", tmp_path / "o.nii.gz")
    assert r.returncode == 2 and "cut.nii.gz is truncated" in r.stderr
    r = cli("metrics", "--reference", good, "--test", cut)
    assert r.returncode == 2 and "cut.nii.gz is truncated" in r.stderr
    r = cli("run", "--method", "bspline", "--input", src, "--output", tmp_path / "out", "--progress", "jsonl")
    assert r.returncode == 4, r.stderr[-2000:]
    summary = events(r)[-1]
    assert summary["event"] == "summary" and (summary["done"], summary["failed"]) == (1, 1)
    assert "truncated" in summary["failures"][0]["reason"]
    assert sorted(os.listdir(tmp_path / "out")) == ["good.nii.gz"]


def test_huge_header_is_refused_before_allocating(tmp_path, address_limit):
    """2000 x 2000 x 500 float32 (8 GB) declared in a small file, under an address-space limit: exit 3."""
    lr = noise_lr(tmp_path / "lr.nii")
    data = bytearray(lr.read_bytes())
    struct.pack_into("<8h", data, 40, 3, 2000, 2000, 500, 1, 1, 1, 1)
    (tmp_path / "huge.nii").write_bytes(bytes(data))
    r = cli("run", "--method", "bspline", "--input", tmp_path / "huge.nii", "--output", tmp_path / "o.nii.gz",
            address=address_limit)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "2000 x 2000 x 500" in r.stderr and "GB" in r.stderr and "Traceback" not in r.stderr


def test_huge_factor_is_refused_before_allocating(tmp_path, address_limit):
    lr = noise_lr(tmp_path / "lr.nii")
    r = cli("run", "--method", "bspline", "--input", lr, "--output", tmp_path / "o.nii.gz", "--operator",
            "thick-slice", "--factor", "1e6", "--progress", "jsonl", address=address_limit)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "6000000" in r.stderr and "GB" in r.stderr and "Traceback" not in r.stderr
    assert events(r)[-1]["exit_code"] == 3
    assert partials(tmp_path) == [] and not (tmp_path / "o.nii.gz").exists()


# ---- killed runs ----

def _start_slow_write(tmp_path, out):
    """A run whose output takes a second or more to compress (4M noisy voxels), started in the background."""
    lr = noise_lr(tmp_path / "lr.nii", shape=(128, 128, 64))
    return subprocess.Popen([sys.executable, "-m", "MRISuperResLib", "run", "--method", "trilinear", "--input",
                             str(lr), "--output", str(out), "--operator", "thick-slice", "--factor", "4",
                             "--progress", "jsonl"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), cwd=ROOT)


def _wait_for_partial(proc, folder, timeout=240):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if partials(folder):
            return
        if proc.poll() is not None:
            pytest.fail("the run ended before it wrote: %s" % proc.stderr.read()[-2000:])
        time.sleep(0.002)
    proc.kill()
    pytest.fail("no temporary file appeared")


def test_sigkill_during_a_write_leaves_a_partial_that_the_next_run_removes(tmp_path):
    out = tmp_path / "sr.nii.gz"
    proc = _start_slow_write(tmp_path, out)
    _wait_for_partial(proc, tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    left = partials(tmp_path)
    assert left and not out.exists()
    assert str(proc.pid) in left[0]  # the owner's PID, so the next run can tell it is gone
    noise_lr(tmp_path / "small.nrrd")
    r = cli("run", "--method", "bspline", "--input", tmp_path / "small.nrrd", "--output", tmp_path / "o.nrrd")
    assert r.returncode == 0, r.stderr[-2000:]
    assert partials(tmp_path) == []


def test_sigterm_is_reported_like_a_cancel_and_cleans_up(tmp_path):
    out = tmp_path / "sr.nii.gz"
    write_volume(Volume.from_array(phantom((8, 8, 8)) * 10), str(out))
    before = out.read_bytes()
    proc = _start_slow_write(tmp_path, out)
    _wait_for_partial(proc, tmp_path)
    proc.terminate()
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    last = [e for e in map(parse_event, stdout.splitlines()) if e][-1]
    assert last["event"] == "error" and last["exit_code"] == 143 and "SIGTERM" in last["message"]
    assert out.read_bytes() == before
    assert partials(tmp_path) == []


# ---- requests refused where they are parsed ----

def test_argument_errors_are_events_with_jsonl(tmp_path):
    r = cli("run", "--input", "x.nii.gz", "--output", "y.nii.gz", "--no-such-flag", "--progress", "jsonl")
    assert r.returncode == 2 and "--no-such-flag" in r.stderr
    ev = events(r)
    assert len(ev) == 1 and ev[0]["event"] == "error" and ev[0]["exit_code"] == 2 and "--no-such-flag" in ev[0]["message"]
    r = cli("run", "--input", "x.nii.gz", "--output", "y.nii.gz", "--device")  # no jsonl: stderr only
    assert r.returncode == 2 and r.stdout == ""


def test_metrics_json_is_strict_and_grid_mismatch_says_what_differs(tmp_path):
    vol = Volume.from_array(phantom((12, 12, 12)) * 100)
    write_volume(vol, str(tmp_path / "a.nii.gz"))
    r = cli("metrics", "--reference", tmp_path / "a.nii.gz", "--test", tmp_path / "a.nii.gz", "--json")
    assert r.returncode == 0, r.stderr

    def no_constants(name):
        raise AssertionError("not strict JSON: %s" % name)

    scores = json.loads(r.stdout, parse_constant=no_constants)
    assert scores["psnr"] is None and scores["ssim"] == pytest.approx(1.0)
    shifted = Volume.from_array(vol.array, origin=(0.0, 0.0, 2.0))
    write_volume(shifted, str(tmp_path / "b.nii.gz"))
    r = cli("metrics", "--reference", tmp_path / "a.nii.gz", "--test", tmp_path / "b.nii.gz")
    assert r.returncode == 2
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")][0]
    assert "origin" in line and "size" not in line and "spacing" not in line
