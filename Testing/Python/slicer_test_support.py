"""Helpers shared by the Slicer-side tests: volumes on a real slicer-core scene, real worker scripts, pids.

Not a test module (no `test_` prefix); the test files import it from their own folder.
"""

import os
import sys
import textwrap

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULE = os.path.join(REPO, "MRISuperRes")
if MODULE not in sys.path:
    sys.path.insert(0, MODULE)


def addVolume(scene, array_ijk, spacing=(1.0, 1.2, 4.0), origin=(10.0, -20.0, 30.0), angle=0.3, name="lr"):
    """A scalar volume with an oblique IJK-to-RAS (rotation about the RAS z axis)."""
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(*array_ijk.shape)
    image.AllocateScalars(vtk.VTK_FLOAT, 1)
    flat = vtk_to_numpy(image.GetPointData().GetScalars())
    flat[:] = np.asarray(array_ijk, dtype=np.float32).transpose(2, 1, 0).ravel()
    node.SetAndObserveImageData(image)
    c, s = np.cos(angle), np.sin(angle)
    m = vtk.vtkMatrix4x4()
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag(spacing)
    for r in range(3):
        for k in range(3):
            m.SetElement(r, k, rot[r, k])
        m.SetElement(r, 3, origin[r])
    node.SetIJKToRASMatrix(m)
    return node


def sceneIds(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def volumeNames(scene):
    nodes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    return sorted(nodes.GetItemAsObject(i).GetName() for i in range(nodes.GetNumberOfItems()))


def alive(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def scriptWorker(tmp_path, body, extraEnv=None):
    """A command builder that runs `body` (a real Python script) with the CLI arguments."""
    from MRISuperResModuleLib.logic import defaultCommandBuilder

    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(body))

    def build(cliArgs):
        _argv, env = defaultCommandBuilder(cliArgs)
        env.update(extraEnv or {})
        return [sys.executable, str(script)] + list(cliArgs), env

    return build


# Reports progress for `STEPS` x 50 ms (writing its pid first), then runs the library's real CLI, which
# writes a real result: a run that is not stopped in time adds a real volume.
SLOW_THEN_REAL = """
    import json, os, sys, time
    with open(os.environ["PIDFILE"], "w") as f:
        f.write(str(os.getpid()))
    steps = int(os.environ.get("STEPS", "40"))
    for step in range(1, steps + 1):
        print(json.dumps({"event": "progress", "fraction": step / (2 * steps), "step": step, "total": 2 * steps,
                          "message": "warming up", "eta_s": 1.0}), flush=True)
        time.sleep(0.05)
    from MRISuperResLib.cli import main
    sys.exit(main(sys.argv[1:]))
"""

