"""MRISuperResLogic on a real slicer-core MRML scene with real worker processes.

The worker is the library's CLI (`python -m MRISuperResLib`), or, where a test needs a worker that
misbehaves (junk output, crash, slow run to cancel), a small real Python script written to tmp_path.
"""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402
from vtk.util.numpy_support import vtk_to_numpy  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "MRISuperRes"))

from MRISuperResModuleLib.logic import MRISuperResCancelled, MRISuperResError, MRISuperResLogic, RunOptions  # noqa: E402
from MRISuperResModuleLib.protocol import Degradation  # noqa: E402
from slicer_test_support import addVolume as _addVolume  # noqa: E402
from slicer_test_support import alive as _alive  # noqa: E402
from slicer_test_support import sceneIds as _sceneIds  # noqa: E402
from slicer_test_support import scriptWorker as _scriptWorker  # noqa: E402


def _matrix(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _voxels(node) -> np.ndarray:
    """Voxels indexed [i, j, k]."""
    image = node.GetImageData()
    dims = image.GetDimensions()
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1]).transpose(2, 1, 0).copy()


def _blankTempRoot(tmp_path):
    root = tmp_path / "temp"
    return str(root)


def test_bspline_round_trip_geometry_transform_hierarchy(scene, tmp_path):
    rng = np.random.default_rng(0)
    plane = rng.random((9, 7)).astype(np.float32)
    lr = np.repeat(plane[:, :, None], 5, axis=2) * 100.0  # constant along the thick axis k
    inputNode = _addVolume(scene, lr)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    inputNode.SetAndObserveTransformNodeID(transform.GetID())
    sh = scene.GetSubjectHierarchyNode()
    folder = sh.CreateFolderItem(sh.GetSceneItemID(), "Patient 1")
    sh.CreateItem(folder, inputNode)
    before = _voxels(inputNode)
    imageMTime = inputNode.GetImageData().GetMTime()
    events = []
    tempRoot = _blankTempRoot(tmp_path)

    out = MRISuperResLogic(tempRoot=tempRoot).process(inputNode, method="bspline", progressCallback=events.append)

    # the HR grid: same outer bounds, k spacing / 4, first HR centre half an HR voxel inside the LR voxel edge
    f = 4.0
    lrM = _matrix(inputNode)
    expected = lrM.copy()
    expected[:3, 2] = lrM[:3, 2] / f
    expected[:3, 3] = lrM[:3, 3] + lrM[:3, :3] @ np.array([0.0, 0.0, -0.5 + 0.5 / f])
    np.testing.assert_allclose(_matrix(out), expected, rtol=0, atol=1e-6)
    hr = _voxels(out)
    assert hr.shape == (9, 7, 20)
    np.testing.assert_allclose(hr, np.repeat(lr[:, :, :1], 20, axis=2), rtol=0, atol=1e-3)

    assert out.GetTransformNodeID() == transform.GetID()
    assert sh.GetItemParent(sh.GetItemByDataNode(out)) == folder
    assert out.GetName() == "lr_SR-bspline" and out.GetAttribute("MRISuperRes.generated") == "true"
    display = out.GetDisplayNode()
    assert display is not None and not display.GetAutoWindowLevel() and display.GetWindow() > 0
    # the user's node: same voxels, untouched image, no storage node attached by us
    np.testing.assert_array_equal(_voxels(inputNode), before)
    assert inputNode.GetImageData().GetMTime() == imageMTime and inputNode.GetStorageNodeID() is None
    assert os.listdir(tempRoot) == []  # temp folder removed
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "finished" and "result" in kinds and "progress" in kinds
    assert all("etaS" in e for e in events if e["event"] == "progress")  # camelCase translation


def test_override_degradation_and_existing_output_node(scene, tmp_path):
    inputNode = _addVolume(scene, np.arange(6 * 8 * 5, dtype=np.float32).reshape(6, 8, 5),
                           spacing=(1.0, 1.0, 1.0), angle=0.0)
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "mine")
    ids = _sceneIds(scene)
    out = MRISuperResLogic(tempRoot=_blankTempRoot(tmp_path)).process(
        inputNode, target, method="trilinear",
        options=RunOptions(degradation=Degradation("slice-removal", (0,), (2,)), residual=True))
    assert out is target and _voxels(out).shape == (12, 8, 5)
    np.testing.assert_allclose(np.diag(_matrix(out))[:3], [0.5, 1.0, 1.0], atol=1e-9)
    added = set(_sceneIds(scene)) - set(ids)
    residual = [scene.GetNodeByID(i) for i in added if scene.GetNodeByID(i).GetAttribute("MRISuperRes.role") == "residual"]
    assert len(residual) == 1 and _voxels(residual[0]).shape == (6, 8, 5)


def test_output_must_not_be_input(scene, tmp_path):
    inputNode = _addVolume(scene, np.ones((4, 4, 3), np.float32))
    ids = _sceneIds(scene)
    with pytest.raises(MRISuperResError, match="never overwritten"):
        MRISuperResLogic(tempRoot=_blankTempRoot(tmp_path)).process(inputNode, inputNode)
    assert _sceneIds(scene) == ids


def test_real_worker_user_error_is_surfaced_and_scene_unchanged(scene, tmp_path):
    inputNode = _addVolume(scene, np.random.default_rng(1).random((6, 6, 4)).astype(np.float32))
    ids = _sceneIds(scene)
    tempRoot = _blankTempRoot(tmp_path)
    with pytest.raises(MRISuperResError) as info:
        MRISuperResLogic(tempRoot=tempRoot).process(inputNode, method="no-such-method")
    assert "Unknown method 'no-such-method'" in info.value.problem and info.value.exitCode == 2
    assert _sceneIds(scene) == ids and os.listdir(tempRoot) == []


def test_crashing_worker_without_events(scene, tmp_path):
    build = _scriptWorker(tmp_path, """
        import sys
        print("loading weights...")
        sys.stderr.write("Traceback (most recent call last):\\nRuntimeError: CUDA driver too old\\n")
        sys.exit(1)
    """)
    inputNode = _addVolume(scene, np.random.default_rng(2).random((6, 6, 4)).astype(np.float32))
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "target")
    ids = _sceneIds(scene)
    tempRoot = _blankTempRoot(tmp_path)
    logs = []
    with pytest.raises(MRISuperResError) as info:
        MRISuperResLogic(build, tempRoot=tempRoot).process(inputNode, target, progressCallback=logs.append)
    assert target.GetImageData() is None  # a chosen output node is only filled on success
    assert "exit code 1" in info.value.problem and "CUDA driver too old" in info.value.problem
    assert any(e["event"] == "log" and e["message"] == "loading weights..." for e in logs)
    assert _sceneIds(scene) == ids and os.listdir(tempRoot) == []


def test_non_json_output_is_tolerated(scene, tmp_path):
    build = _scriptWorker(tmp_path, """
        import sys
        print("Using TensorFloat32 cores")
        print("{not json")
        print('{"event": "nonsense", "x": 1}')
        print("[1, 2, 3]")
        sys.stdout.flush()
        from MRISuperResLib.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    inputNode = _addVolume(scene, np.random.default_rng(3).random((6, 5, 4)).astype(np.float32))
    logs = []
    out = MRISuperResLogic(build, tempRoot=_blankTempRoot(tmp_path)).process(inputNode, progressCallback=logs.append)
    assert _voxels(out).shape == (6, 5, 16)
    junk = [e["message"] for e in logs if e["event"] == "log"]
    assert junk[:4] == ["Using TensorFloat32 cores", "{not json", '{"event": "nonsense", "x": 1}', "[1, 2, 3]"]


SLOW_WORKER = """
    import json, os, subprocess, sys, time
    # a grandchild, as data loaders or launchers would create
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(os.environ["PIDFILE"], "w") as f:
        f.write("%d %d" % (os.getpid(), child.pid))
    for step in range(1, 201):
        print(json.dumps({"event": "progress", "fraction": step / 200, "step": step, "total": 200,
                          "message": "iterating", "eta_s": (200 - step) * 0.05}), flush=True)
        time.sleep(0.05)
    sys.exit(0)
"""


def test_cancel_mid_run_kills_tree_and_leaves_scene(scene, tmp_path):
    pidfile = tmp_path / "pids"
    build = _scriptWorker(tmp_path, SLOW_WORKER)

    def buildWithPidfile(cliArgs):
        argv, env = build(cliArgs)
        env["PIDFILE"] = str(pidfile)
        return argv, env

    inputNode = _addVolume(scene, np.random.default_rng(4).random((6, 6, 4)).astype(np.float32))
    ids = _sceneIds(scene)
    tempRoot = _blankTempRoot(tmp_path)
    logic = MRISuperResLogic(buildWithPidfile, tempRoot=tempRoot)
    seen = []

    def onEvent(event):
        seen.append(event)
        if event["event"] == "progress" and event["step"] >= 3:
            logic.cancel()

    t0 = time.monotonic()
    with pytest.raises(MRISuperResCancelled):
        logic.process(inputNode, progressCallback=onEvent)
    assert time.monotonic() - t0 < 8  # well before the 10 s the worker would need
    workerPid, childPid = map(int, pidfile.read_text().split())
    deadline = time.monotonic() + 5
    while (_alive(workerPid) or _alive(childPid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(workerPid) and not _alive(childPid)
    assert _sceneIds(scene) == ids and os.listdir(tempRoot) == []
    assert seen[-1]["event"] == "finished" and seen[-1]["state"] == "cancelled"
    assert max(e.get("step", 0) for e in seen) < 10


def test_non_blocking_run_is_polled(scene, tmp_path):
    build = _scriptWorker(tmp_path, SLOW_WORKER.replace("range(1, 201)", "range(1, 4)"))

    def withPidfile(cliArgs):
        argv, env = build(cliArgs)
        env["PIDFILE"] = str(tmp_path / "pids")
        return argv, env

    inputNode = _addVolume(scene, np.random.default_rng(5).random((6, 6, 4)).astype(np.float32))
    ids = _sceneIds(scene)
    run = MRISuperResLogic(withPidfile, tempRoot=_blankTempRoot(tmp_path)).process(inputNode, blocking=False)
    assert run.state == "running"
    t0 = time.monotonic()
    while not run.poll():
        time.sleep(0.02)
    assert time.monotonic() - t0 < 10
    # exit 0 without a result file is a failure, not a half-made node
    assert run.state == "failed" and "without writing a result" in str(run.error)
    assert run.lastProgress["step"] == 3 and _sceneIds(scene) == ids
    # the grandchild outlived the worker holding its pipes: ended, not waited for
    childPid = int((tmp_path / "pids").read_text().split()[1])
    deadline = time.monotonic() + 5
    while _alive(childPid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(childPid)


def test_stale_temp_folders_of_killed_runs_are_removed(tmp_path):
    root = tmp_path / "temp"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, owner in (("MRISuperRes-run-dead", dead.pid), ("MRISuperRes-run-live", os.getppid()),
                        ("unrelated", dead.pid)):
        (root / name).mkdir(parents=True)
        (root / name / "owner.pid").write_text(str(owner))
        (root / name / "input.nrrd").write_text("x")
    removed = MRISuperResLogic(tempRoot=str(root)).cleanStaleTempFolders()
    assert [os.path.basename(p) for p in removed] == ["MRISuperRes-run-dead"]
    assert sorted(os.listdir(root)) == ["MRISuperRes-run-live", "unrelated"]


@pytest.fixture(scope="module")
def methods():
    return MRISuperResLogic().availableMethods()


def test_listings_from_the_worker(methods):
    logic = MRISuperResLogic()
    names = [m["name"] for m in methods]
    assert "bspline" in names and all("needsPrior" in m for m in methods)
    assert logic.missingDependencies() == []


def test_default_prior_method_round_trip(scene, tmp_path, methods):
    logic = MRISuperResLogic(tempRoot=_blankTempRoot(tmp_path))
    methods = [m for m in methods if m.get("needsPrior")]
    models = [m for m in logic.availableModels() if m.get("status") == "installed"]
    usable = [m for m in methods if any(p.get("kind") == m["needsPrior"] for p in models)]
    if not usable:
        pytest.skip("no prior-based method has its prior installed (methods: %s; installed priors: %s)"
                    % ([m["name"] for m in methods] or "none", [p.get("name") for p in models] or "none"))
    # A thick-slice input (what the worker infers from the spacing); patch priors (paired) work on any grid, so
    # they give a quick round trip on a small volume, grid-bound ones (ldm) only when their grid is small.
    usable = [m for m in usable if "thick-slice" in (m.get("operators") or ["thick-slice"])]
    usable.sort(key=lambda m: m["needsPrior"] != "paired")
    if not usable:
        pytest.skip("no installed prior-based method handles thick slices")
    method = usable[0]
    prior = next(p for p in models if p.get("kind") == method["needsPrior"])
    grid = prior.get("grid") or {}
    shape = [int(n) for n in (grid.get("shape") or (16, 16, 16))]
    spacing = [float(x) for x in (grid.get("spacing") or (1.0, 1.0, 1.0))]
    if method["needsPrior"] == "paired":
        shape, spacing = [24, 24, 24], [1.0, 1.0, 1.0]
    elif np.prod(shape) > 48 ** 3:
        pytest.skip("the default %s prior %s works on a %s grid: too large for a quick test"
                    % (method["needsPrior"], prior.get("name"), "x".join(map(str, shape))))
    settings = {s["name"]: s.get("min") or 1 for s in method["settings"]
                if s["name"] in ("iterations", "steps", "num_samples", "samples")}
    lrShape = (shape[0], shape[1], max(2, shape[2] // 4))
    inputNode = _addVolume(scene, np.random.default_rng(6).random(lrShape).astype(np.float32), angle=0.0,
                           spacing=(spacing[0], spacing[1], spacing[2] * shape[2] / lrShape[2]))
    out = logic.process(inputNode, method=method["name"], settings=settings,
                        options=RunOptions(device="cpu", seed=0))
    assert _voxels(out).shape == tuple(shape) and np.isfinite(_voxels(out)).all()
    assert out.GetAttribute("MRISuperRes.method") == method["name"]


def test_logic_import_does_not_import_torch_or_qt():
    folder = os.path.join(REPO, "MRISuperRes", "MRISuperResModuleLib")
    names = sorted(n[:-3] for n in os.listdir(folder) if n.endswith(".py") and n != "__init__.py")
    assert {"logic", "presenter", "messages", "dependencies", "runs"} <= set(names)
    code = ("import sys; sys.path.insert(0, %r); import %s; "
            "bad = [m for m in ('torch', 'qt', 'ctk', 'MRISuperResLib') if m in sys.modules]; print(bad)"
            % (os.path.join(REPO, "MRISuperRes"), ", ".join("MRISuperResModuleLib." + n for n in names)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_library_does_not_import_slicer_qt_vtk():
    code = ("import sys; sys.path.insert(0, %r); import MRISuperResLib.cli, MRISuperResLib.pipeline, "
            "MRISuperResLib.methods; "
            "print([m for m in ('slicer', 'qt', 'vtk', 'ctk') if m in sys.modules])" % REPO)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
