"""A run belongs to its scene: closing the scene or removing the input cancels it, and nothing is added.

Real slicer-core scene, real worker processes (a script that reports progress, then runs the library's
CLI, which would write a real result if the run were not stopped).
"""

import os
import sys
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "MRISuperRes"))

from MRISuperResModuleLib.logic import MRISuperResCancelled, MRISuperResLogic  # noqa: E402
from slicer_test_support import SLOW_THEN_REAL, addVolume, alive, scriptWorker, volumeNames  # noqa: E402


def _logic(tmp_path, steps=40):
    build = scriptWorker(tmp_path, SLOW_THEN_REAL, {"PIDFILE": str(tmp_path / "pid"), "STEPS": str(steps)})
    return MRISuperResLogic(build, tempRoot=str(tmp_path / "temp"))


def _trigger(scene, inputNode, what):
    if what == "close":
        scene.Clear(0)  # what File > Close Scene does
    else:
        scene.RemoveNode(inputNode)


def _waitGone(pid, seconds=5.0):
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


REASONS = {"close": "the scene was closed", "removeInput": "input volume 'lr' was removed"}


@pytest.mark.parametrize("what", ["close", "removeInput"])
def test_blocking_run_is_cancelled_by_its_scene(scene, tmp_path, what):
    inputNode = addVolume(scene, np.random.default_rng(0).random((6, 6, 4)).astype(np.float32))
    logic = _logic(tmp_path)
    events = []

    def onEvent(event):  # a blocking run keeps the GUI alive: the user can close the scene meanwhile
        events.append(event)
        if event["event"] == "progress" and event["step"] == 3:
            _trigger(scene, inputNode, what)

    t0 = time.monotonic()
    with pytest.raises(MRISuperResCancelled) as info:
        logic.process(inputNode, method="trilinear", progressCallback=onEvent)
    assert REASONS[what] in info.value.problem and "Nothing was added" in info.value.problem
    assert time.monotonic() - t0 < 8
    assert _waitGone(int((tmp_path / "pid").read_text()))
    assert events[-1]["event"] == "finished" and events[-1]["state"] == "cancelled"
    assert max(e.get("step", 0) for e in events) < 10
    assert volumeNames(scene) == []  # closed: all gone; removed: the input was the only volume
    assert os.listdir(tmp_path / "temp") == [] and logic.runs == []


@pytest.mark.parametrize("what", ["close", "removeInput"])
def test_non_blocking_run_is_cancelled_by_its_scene(scene, tmp_path, what):
    inputNode = addVolume(scene, np.random.default_rng(1).random((6, 6, 4)).astype(np.float32))
    logic = _logic(tmp_path)
    run = logic.process(inputNode, method="trilinear", blocking=False)
    deadline = time.monotonic() + 15
    while (run.lastProgress is None or run.lastProgress["step"] < 3) and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.02)
    assert run.state == "running"

    _trigger(scene, inputNode, what)
    # cancelled by the scene event itself, before anyone polls again
    assert run.state == "cancelled" and REASONS[what] in run.error.problem
    assert _waitGone(int((tmp_path / "pid").read_text()))
    time.sleep(0.3)
    assert run.poll() and run.state == "cancelled" and run.outputNode is None
    assert volumeNames(scene) == []
    assert os.listdir(tmp_path / "temp") == []


def test_result_ready_but_not_polled_when_the_scene_closes(scene, tmp_path):
    """The reported bug: the worker has written its result; the scene closes before the GUI timer polls."""
    inputNode = addVolume(scene, np.random.default_rng(2).random((6, 6, 4)).astype(np.float32), name="T1_thick")
    logic = _logic(tmp_path, steps=1)
    run = logic.process(inputNode, method="bspline", blocking=False)
    assert run.worker.wait(120) == 0  # finished; nothing read yet
    assert os.path.isfile(run.request.outputPath)
    scene.Clear(0)
    newPatient = addVolume(scene, np.ones((4, 4, 2), np.float32), name="next_patient")
    assert run.poll() and run.state == "cancelled"
    assert volumeNames(scene) == ["next_patient"] and newPatient.GetScene() is scene
    assert os.listdir(tmp_path / "temp") == []


def test_unrelated_removals_do_not_cancel(scene, tmp_path):
    """The control: the same worker does add its volume when other nodes or other scenes change meanwhile."""
    inputNode = addVolume(scene, np.random.default_rng(3).random((6, 6, 4)).astype(np.float32))
    unrelated = addVolume(scene, np.ones((4, 4, 2), np.float32), name="unrelated")
    other = slicer.vtkMRMLScene()
    addVolume(other, np.ones((4, 4, 2), np.float32), name="elsewhere")

    def onEvent(event):
        if event["event"] == "progress" and event["step"] == 1:
            scene.RemoveNode(unrelated)
            other.Clear(0)

    out = _logic(tmp_path, steps=2).process(inputNode, method="trilinear", progressCallback=onEvent)
    assert out.GetScene() is scene and volumeNames(scene) == ["lr", "lr_SR-trilinear"]
