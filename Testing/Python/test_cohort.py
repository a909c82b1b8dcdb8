"""Cohorts on Dask (`run --engine dask`): a real local cluster of 2 worker processes, small volumes.

A failing file is recorded and the rest go on; a killed worker's task runs again elsewhere; a rerun skips what is
current; a changed setting redoes everything. Without Dask installed, the cluster tests skip and the CLI says
what to install.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, phantom

from MRISuperResLib import cohort
from MRISuperResLib.errors import EXIT_SOME_FAILED, InputError
from MRISuperResLib.methods import get_method
from MRISuperResLib.priors.folder import file_digest
from MRISuperResLib.progress import parse_event
from MRISuperResLib.volume import Volume, write_volume

needs_dask = pytest.mark.skipif(importlib.util.find_spec("distributed") is None,
                                reason="dask[distributed] not installed (pip install .[cluster])")
GOOD = ["s%d.nii.gz" % n for n in range(6)]
# kspace-vdm has a setting to change (steps) and a prior to keep loaded; one step on 16x16x24 takes a moment.
VDM = ["--method", "kspace-vdm", "--operator", "kspace", "--axis", "2", "--factor", "4"]


def cli(*args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "MRISuperResLib", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def events(r):
    return [e for e in map(parse_event, r.stdout.splitlines()) if e]


def manifest_lines(folder):
    with open(os.path.join(folder, cohort.MANIFEST)) as fh:
        return [json.loads(line) for line in fh]


def mtimes(folder):
    return {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in GOOD}


def make_inputs(folder, names, shape=(16, 16, 6)):
    folder.mkdir()
    for n, name in enumerate(names):
        write_volume(Volume.from_array(phantom(shape, seed=n) * 100, spacing=(1, 1, 4)), str(folder / name))
    return folder


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """6 good volumes and 1 corrupt one through kspace-vdm (1 step) on 2 local workers."""
    d = tmp_path_factory.mktemp("cohort")
    src = make_inputs(d / "in", GOOD)
    (src / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    out = d / "out"
    r = cli("run", "--input", src, "--output", out, *VDM, "--set", "steps=1", "--engine", "dask", "--workers", 2,
            "--progress", "jsonl")
    return src, out, r


@needs_dask
def test_a_corrupt_file_fails_alone_and_the_exit_code_says_so(first_run):
    src, out, r = first_run
    assert r.returncode == EXIT_SOME_FAILED, r.stderr[-3000:]
    assert sorted(os.listdir(out)) == sorted(GOOD + [cohort.MANIFEST])
    lines = manifest_lines(out)
    assert len(lines) == 7
    failed = [e for e in lines if e["status"] == "failed"]
    assert [os.path.basename(e["input"]) for e in failed] == ["corrupt.nii.gz"] and "Cannot read" in failed[0]["error"]
    for e in lines:
        if e["status"] == "ok":
            assert e["input_sha256"] == file_digest(e["input"]) and e["output_sha256"] == file_digest(e["output"])
            assert e["shape"] == [16, 16, 24] and e["settings"]["steps"] == 1 and e["device"] == "cpu"
            assert e["prior"] == "synth-brain-vdm" and len(e["prior_sha256"]) == 64
            assert e["worker"].startswith("tcp://") and e["seconds"] > 0 and e["error"] is None
    evs = events(r)
    start = evs[0]
    assert start["event"] == "start" and start["workers"] == 2 and start["dashboard"].startswith("http")
    assert "dashboard" in r.stderr
    progress = [e for e in evs if e["event"] == "progress"]
    assert [e["step"] for e in progress] == list(range(1, 8)) and progress[-1]["left"] == 0
    assert progress[-1]["done"] == 6 and progress[-1]["failed"] == 1 and progress[-1]["eta_s"] == 0
    summary = evs[-1]
    assert summary["event"] == "summary" and (summary["done"], summary["failed"], summary["skipped"]) == (6, 1, 0)
    assert summary["exit_code"] == EXIT_SOME_FAILED and "corrupt.nii.gz" in summary["failures"][0]["input"]


@needs_dask
def test_each_worker_loads_the_prior_once(first_run):
    _, out, _ = first_run
    loads = {}
    for e in manifest_lines(out):
        if e["status"] == "ok":
            loads.setdefault(e["worker"], []).append(e["prior_load_s"])
    assert sum(len(v) for v in loads.values()) == 6
    for worker, seconds in loads.items():
        assert sum(s > 0 for s in seconds) == 1, (worker, seconds)  # the first task of each worker loads it


@needs_dask
def test_a_rerun_writes_nothing_new(first_run):
    src, out, _ = first_run
    before, n_lines = mtimes(out), len(manifest_lines(out))
    r = cli("run", "--input", src, "--output", out, *VDM, "--set", "steps=1", "--engine", "dask", "--workers", 2,
            "--progress", "jsonl")
    assert r.returncode == EXIT_SOME_FAILED, r.stderr[-3000:]  # the corrupt file is tried again, and fails again
    assert mtimes(out) == before
    new = manifest_lines(out)[n_lines:]
    assert [(os.path.basename(e["input"]), e["status"]) for e in new] == [("corrupt.nii.gz", "failed")]
    summary = events(r)[-1]
    assert (summary["done"], summary["skipped"], summary["failed"]) == (0, 6, 1)


@needs_dask
def test_a_changed_setting_redoes_every_file(first_run, tmp_path):
    src, first_out, _ = first_run
    out = tmp_path / "moved"
    shutil.copytree(first_out, out)  # a copied output folder resumes too: entries match by file name
    before = mtimes(out)
    r = cli("run", "--input", src, "--output", out, *VDM, "--set", "steps=2", "--engine", "dask", "--workers", 2,
            "--progress", "jsonl")
    assert r.returncode == EXIT_SOME_FAILED, r.stderr[-3000:]
    after = mtimes(out)
    assert all(after[n] != before[n] for n in GOOD)
    latest = cohort.read_manifest(str(out / cohort.MANIFEST))
    assert all(latest[n]["status"] == "ok" and latest[n]["settings"]["steps"] == 2 for n in GOOD)
    assert "6 settings changed" in r.stderr
    assert (events(r)[-1]["done"], events(r)[-1]["skipped"]) == (6, 0)


@needs_dask
def test_a_killed_worker_task_runs_again_and_leaves_no_partial(tmp_path):
    names = ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    src = make_inputs(tmp_path / "in", names)
    out = tmp_path / "out"
    out.mkdir()
    stale = out / (cohort.PARTIAL_PREFIX + "left-by-an-earlier-crash.nii.gz")
    stale.write_bytes(b"half a volume")
    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / "b.nii.gz.hold").touch()
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **{cohort.HOLD_ENV: str(hold)})
    proc = subprocess.Popen([sys.executable, "-m", "MRISuperResLib", "run", "--input", str(src), "--output", str(out),
                             "--method", "trilinear", "--operator", "thick-slice", "--axis", "2", "--factor", "4",
                             "--engine", "dask", "--workers", "2", "--progress", "jsonl"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        pid_file = hold / "b.nii.gz.pid"
        deadline = time.monotonic() + 120
        while not pid_file.exists() or not pid_file.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "the held task never started"
            time.sleep(0.1)
        victim = int(pid_file.read_text())
        assert victim != proc.pid
        os.kill(victim, signal.SIGKILL)  # the worker process, in the middle of b's task
        (hold / "b.nii.gz.hold").unlink()
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert sorted(os.listdir(out)) == sorted(names + [cohort.MANIFEST])  # no partial file, the stale one gone
    latest = cohort.read_manifest(str(out / cohort.MANIFEST))
    assert all(latest[n]["status"] == "ok" for n in names)
    assert len(manifest_lines(out)) == 3  # the killed attempt wrote nothing
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)
    summary = [e for e in map(parse_event, stdout.splitlines()) if e][-1]
    assert (summary["done"], summary["failed"]) == (3, 0)


@needs_dask
def test_slicer_batch_script_passes_the_engine_through(tmp_path):
    pytest.importorskip("slicer")
    src = make_inputs(tmp_path / "in", ["a.nii.gz", "b.nrrd"])
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    script = os.path.join(ROOT, "MRISuperRes", "Resources", "Scripts", "MRISuperResBatch.py")
    r = subprocess.run([sys.executable, script, "--input-folder", str(src), "--output-folder", str(tmp_path / "out"),
                        "--method", "bspline", "--engine", "dask", "--workers", "1"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["a.nii.gz", "b.nrrd", cohort.MANIFEST]
    assert "cohort: 2 done, 0 skipped (up to date), 0 failed" in r.stderr  # the library's log, streamed through


def test_without_dask_the_cli_says_what_to_install(tmp_path):
    src = make_inputs(tmp_path / "in", ["a.nii.gz"])
    code = ("import sys; sys.modules['distributed'] = None\n"  # as if dask were not installed: its import fails
            "from MRISuperResLib.cli import main\n"
            "sys.exit(main(['run', '--input', %r, '--output', %r, '--engine', 'dask']))" % (str(src), str(tmp_path / "o")))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and "pip install MRISuperResLib[cluster]" in r.stderr, r.stderr[-2000:]
    r = cli("run", "--input", src, "--output", tmp_path / "o2", "--workers", "2")
    assert r.returncode == 2 and "--engine dask" in r.stderr


def test_worker_keeps_its_prior():
    method, dev = get_method("kspace-vdm"), torch.device("cpu")
    cohort._PRIORS.clear()
    try:
        first, ident, load_s = cohort._worker_prior(method, None, dev)
        again, ident2, load2 = cohort._worker_prior(method, None, dev)
        assert again is first and ident2 == ident and load_s > 0 and load2 == 0
        assert ident[0] == first.name and ident[1] == file_digest(os.path.join(first.folder, "model.json"))
    finally:
        cohort._PRIORS.clear()


def test_manifest_latest_entry_torn_line_and_lock(tmp_path):
    path = tmp_path / cohort.MANIFEST
    path.write_text(json.dumps({"input": "/a/x.nii.gz", "status": "failed"}) + "\n"
                    + json.dumps({"input": "/b/x.nii.gz", "status": "ok"}) + "\n" + '{"input": "/a/y.nii')
    m = cohort.Manifest(str(tmp_path))
    try:
        assert m.latest == {"x.nii.gz": {"input": "/b/x.nii.gz", "status": "ok"}}
        with pytest.raises(InputError, match="Another run"):
            cohort.Manifest(str(tmp_path))
        m.append({"input": "/a/y.nii.gz", "status": "ok"})
    finally:
        m.close()
    latest = cohort.read_manifest(str(path))
    assert latest["y.nii.gz"]["status"] == "ok" and latest["x.nii.gz"]["input"] == "/b/x.nii.gz"


def test_output_integrity_check(tmp_path):
    path = str(tmp_path / "o.nii.gz")
    write_volume(Volume.from_array(phantom((8, 9, 10))), path)
    entry = {"shape": [8, 9, 10], "output_sha256": file_digest(path)}
    assert cohort.output_intact(path, entry)
    assert not cohort.output_intact(path, dict(entry, shape=[8, 9, 11]))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])  # truncated: SimpleITK may still read its header
    assert not cohort.output_intact(path, entry)
    os.remove(path)
    assert not cohort.output_intact(path, entry)


def test_local_workers_split_the_cpu():
    envs = cohort.local_worker_envs(2, "cpu")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = str(max(1, cores // 2))
    assert len(envs) == 2 and all(e[cohort.THREADS_ENV] == threads == e["OMP_NUM_THREADS"] for e in envs)
    assert not any("CUDA_VISIBLE_DEVICES" in e for e in envs)


@pytest.mark.gpu
def test_local_workers_get_one_gpu_each():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    n = torch.cuda.device_count()
    envs = cohort.local_worker_envs(None, "auto")
    assert len(envs) == n and sorted(e["CUDA_VISIBLE_DEVICES"] for e in envs) == sorted(
        (os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(n)))).split(","))
