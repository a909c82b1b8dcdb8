"""MRISuperRes Logic: MRML volume node -> worker process -> new MRML volume node.

1. Check the request (input is a scalar volume, outputs are not the input).
2. Write the input through a separate, unattached storage node into a private temp folder
   (the user's node, its storage node and its file stay untouched).
3. Start the library (`python -m MRISuperResLib run ... --progress jsonl`) in its own process tree.
4. Poll its JSON-lines events (a sleep loop when blocking, the GUI's timer otherwise).
5. On success read every result into detached nodes first, then add them to the scene with the
   input's parent transform, subject-hierarchy folder and a window/level; on error or cancel add
   nothing. Always remove the temp folder.

Imports only slicer (MRML), vtk and numpy at file scope: it runs in plain Python with the
slicer-core wheel and never imports torch, qt or ctk. It never prompts.
"""

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import slicer
import vtk

from .protocol import Degradation, RunRequest, camelKeys
from .runs import MRISuperResCancelled, MRISuperResError, SuperResolutionRun
from .worker import WorkerProcess, pythonExecutable

TEMP_PREFIX = "MRISuperRes-run-"
OWNER_FILE = "owner.pid"
STALE_AFTER_S = 2 * 24 * 3600
_ACTIVE_TEMP_DIRS = set()  # temp folders of runs still going in this process


@dataclass
class RunOptions:
    """What a run needs besides input, output, method and settings (all optional)."""

    degradation: Optional[Degradation] = None  # None: the worker infers it from the voxel spacing
    model: Optional[str] = None  # prior name or folder; None: the method's default prior
    device: str = "auto"
    seed: Optional[int] = None
    uncertainty: object = None  # None/False: not wanted; True: new node; a volume node: fill it
    residual: object = None


def libraryRoot() -> Optional[str]:
    """The folder holding the MRISuperResLib package: beside the module once installed, one up in a source tree."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(folder, "MRISuperResLib", "__init__.py")):
            return folder
    return None


def defaultCommandBuilder(cliArgs: List[str]):
    """argv and environment that run `python -m MRISuperResLib <cliArgs>` in a fresh process."""
    env = dict(os.environ)
    root = libraryRoot()
    if root:
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PYTHONUNBUFFERED"] = "1"  # events must arrive as they happen, not at exit
    env["PYTHONIOENCODING"] = "utf-8"
    return [pythonExecutable(), "-m", "MRISuperResLib"] + list(cliArgs), env


def _pidAlive(pid: int) -> bool:
    try:
        import psutil

        return psutil.pid_exists(pid)
    except ImportError:
        pass
    if os.name == "nt":
        return True  # cannot tell without psutil; the age rule cleans up eventually
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class MRISuperResLogic:
    """Stateless apart from the runs it started; the process runner is injectable for tests."""

    def __init__(self, commandBuilder: Optional[Callable] = None, tempRoot: Optional[str] = None, scene=None):
        self.commandBuilder = commandBuilder or defaultCommandBuilder
        self.tempRoot = tempRoot or self._defaultTempRoot()
        self._scene = scene
        self.runs: List[SuperResolutionRun] = []

    # ---- environment ----

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    @staticmethod
    def _defaultTempRoot() -> str:
        app = getattr(slicer, "app", None)
        base = app.temporaryPath if app is not None else tempfile.gettempdir()
        return os.path.join(base, "MRISuperRes")

    def startWorker(self, cliArgs: List[str]) -> WorkerProcess:
        argv, env = self.commandBuilder(list(cliArgs))
        return WorkerProcess(argv, env).start()

    def query(self, cliArgs: List[str], timeout: float = 300.0):
        """Run a listing sub-command (`methods --json`, ...) to completion; its stdout parsed as JSON, camelCase keys."""
        worker = self.startWorker(cliArgs)
        if worker.wait(timeout) is None:
            worker.kill()
            raise MRISuperResError("The worker did not answer `%s` within %d s." % (" ".join(cliArgs), timeout),
                                   "Check the Python environment (View > Error Log).")
        return self.parseQuery(worker, cliArgs)

    @staticmethod
    def parseQuery(worker: WorkerProcess, cliArgs: List[str]):
        import json

        lines = worker.readLines()
        out = "\n".join(line for stream, line in lines if stream == "stdout")
        err = [line for stream, line in lines if stream == "stderr" and line.strip()]
        if worker.returncode != 0:
            raise MRISuperResError("`%s` failed (exit code %s): %s" % (" ".join(cliArgs), worker.returncode,
                                                                       err[-1] if err else "no message"),
                                   "Install the dependencies (MRISuperResLogic().installDependencies()).",
                                   exitCode=worker.returncode, log=[line for _, line in lines])
        start = min([i for i in (out.find("["), out.find("{")) if i >= 0] or [0])
        try:
            return camelKeys(json.loads(out[start:]))
        except ValueError:
            raise MRISuperResError("`%s` printed no JSON." % " ".join(cliArgs), "Report this with the log.",
                                   log=[line for _, line in lines]) from None

    def availableMethods(self) -> List[dict]:
        return self.query(["methods", "--json"])

    def availableDevices(self) -> List[dict]:
        return self.query(["devices", "--json"])

    def availableModels(self) -> List[dict]:
        """Installed priors, or [] when this library has no `models` command yet."""
        try:
            found = self.query(["models", "list", "--json"])
        except MRISuperResError:
            return []
        return found.get("models", []) if isinstance(found, dict) else found

    # ---- dependencies ----

    def missingDependencies(self) -> List[str]:
        from .dependencies import missingModules

        return missingModules(self.commandBuilder)

    def installDependencies(self, logCallback: Optional[Callable[[str], None]] = None,
                            pipRunner: Optional[Callable] = None) -> List[str]:
        """Install what the worker lacks (torch via the PyTorch extension, the rest with pip, never replacing
        torch, numpy or SimpleITK); returns what was installed. `pipRunner(args, log)` replaces pip (tests)."""
        from .dependencies import install

        return install(self.commandBuilder, logCallback, pipRunner)

    # ---- temp folders ----

    def _newTempDir(self) -> str:
        os.makedirs(self.tempRoot, exist_ok=True)
        path = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self.tempRoot)
        with open(os.path.join(path, OWNER_FILE), "w") as f:
            f.write(str(os.getpid()))
        _ACTIVE_TEMP_DIRS.add(os.path.abspath(path))
        return path

    def removeTempDir(self, path: str):
        _ACTIVE_TEMP_DIRS.discard(os.path.abspath(path))
        shutil.rmtree(path, ignore_errors=True)

    def cleanStaleTempFolders(self) -> List[str]:
        """Remove temp folders of runs that were killed (their owner process is gone) or are days old."""
        removed = []
        if not os.path.isdir(self.tempRoot):
            return removed
        for name in os.listdir(self.tempRoot):
            path = os.path.abspath(os.path.join(self.tempRoot, name))
            if not name.startswith(TEMP_PREFIX) or not os.path.isdir(path) or path in _ACTIVE_TEMP_DIRS:
                continue
            try:
                with open(os.path.join(path, OWNER_FILE)) as f:
                    owner = int(f.read().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            old = time.time() - os.path.getmtime(path) > STALE_AFTER_S
            if owner == os.getpid() or not owner or not _pidAlive(owner) or old:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    # ---- the run ----

    def process(self, inputVolumeNode, outputVolumeNode=None, method: str = "bspline", settings: Optional[dict] = None,
                blocking: bool = True, progressCallback: Optional[Callable[[dict], None]] = None,
                options: Optional[RunOptions] = None):
        """Super-resolve `inputVolumeNode`.

        Blocking: returns the output node, raises `MRISuperResError` (or `MRISuperResCancelled`).
        Non-blocking: returns the `SuperResolutionRun`; the caller polls it (`run.poll()`), its
        `outputNode` is set when it succeeds. `progressCallback(event)` gets camelCase events
        (start, progress, warning, result, error, and `log` for any other output line).
        """
        options = options or RunOptions()
        self._checkRequest(inputVolumeNode, outputVolumeNode, options)
        self.cleanStaleTempFolders()
        tempDir = self._newTempDir()
        try:
            inputPath = os.path.join(tempDir, "input.nrrd")
            writeVolumeFile(inputVolumeNode, inputPath)
            request = RunRequest(inputPath=inputPath, outputPath=os.path.join(tempDir, "output.nrrd"), method=method,
                                 settings=dict(settings or {}), degradation=options.degradation, model=options.model,
                                 device=options.device, seed=options.seed)
            extraTargets = {}
            if options.uncertainty:
                request.uncertaintyPath = os.path.join(tempDir, "uncertainty.nrrd")
                extraTargets["uncertainty"] = options.uncertainty
            if options.residual:
                request.residualPath = os.path.join(tempDir, "residual.nrrd")
                extraTargets["residual"] = options.residual
            worker = self.startWorker(request.args())
        except BaseException:
            self.removeTempDir(tempDir)
            raise
        run = SuperResolutionRun(self, worker, request, inputVolumeNode, outputVolumeNode, extraTargets, tempDir,
                                 progressCallback)
        self.runs.append(run)
        if not blocking:
            return run
        return run.wait(keepGuiAlive=True)

    def cancel(self):
        """Cancel every run this Logic started that is still going (kills their process trees)."""
        for run in list(self.runs):
            run.cancel()

    def _forget(self, run):
        if run in self.runs:
            self.runs.remove(run)

    @staticmethod
    def _checkRequest(inputNode, outputNode, options: RunOptions):
        if inputNode is None or not inputNode.IsA("vtkMRMLScalarVolumeNode") or inputNode.IsA(
                "vtkMRMLLabelMapVolumeNode"):
            raise MRISuperResError("The input is not a scalar volume.", "Select a scalar MRI volume as input.")
        image = inputNode.GetImageData()
        if image is None or min(image.GetDimensions()) < 2:
            raise MRISuperResError("The input volume %r has no 3D image data." % inputNode.GetName(),
                                   "Load a 3D MRI volume first.")
        if image.GetNumberOfScalarComponents() != 1:
            raise MRISuperResError("The input volume %r has %d components per voxel." % (
                inputNode.GetName(), image.GetNumberOfScalarComponents()), "Select a single-channel MRI volume.")
        targets = [n for n in (outputNode, options.uncertainty, options.residual) if n not in (None, True, False)]
        for node in targets:
            if node is inputNode or node.GetID() == inputNode.GetID():
                raise MRISuperResError("An output volume is the input volume %r." % inputNode.GetName(),
                                       "Choose a new output volume; the input is never overwritten.")
            if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
                raise MRISuperResError("Output %r is not a scalar volume node." % node.GetName(),
                                       "Choose a scalar volume (or leave it empty to create one).")
        if len(set(n.GetID() for n in targets)) != len(targets):
            raise MRISuperResError("The same volume is chosen for two outputs.", "Choose distinct output volumes.")

    # ---- results into the scene ----

    def addResults(self, run: SuperResolutionRun, paths: Dict[str, str]) -> Dict[str, object]:
        """Read every result file into detached nodes, then (all read) put them in the scene."""
        loaded = {role: readVolumeFile(path) for role, path in paths.items()}
        scene = run.scene  # the run's own scene, never whichever scene is current now
        problem = run.sceneProblem()
        if problem:
            raise run._cancelled(problem)
        inputNode = run.inputNode
        baseName = "%s_SR-%s" % (inputNode.GetName(), run.request.method)
        targets = {"output": run.outputNode}
        targets.update(run.extraTargets)
        nodes = {}
        for role, detached in loaded.items():
            target = targets.get(role)
            name = baseName if role == "output" else "%s_%s" % (baseName, role)
            if target in (None, True):
                detached.SetName(scene.GenerateUniqueName(name))
                node = scene.AddNode(detached)
            else:
                node = target
                matrix = vtk.vtkMatrix4x4()
                detached.GetIJKToRASMatrix(matrix)
                node.SetIJKToRASMatrix(matrix)
                node.SetAndObserveImageData(detached.GetImageData())
            node.SetDescription("MRISuperRes %s (%s) of %s. Research use only, not for clinical use."
                                % (run.request.method, role, inputNode.GetName()))
            node.SetAttribute("MRISuperRes.generated", "true")
            node.SetAttribute("MRISuperRes.method", run.request.method)
            node.SetAttribute("MRISuperRes.role", role)
            node.SetAndObserveTransformNodeID(inputNode.GetTransformNodeID())
            self._placeInHierarchy(scene, inputNode, node)
            self._setWindowLevel(node)
            nodes[role] = node
        return nodes

    @staticmethod
    def _placeInHierarchy(scene, inputNode, node):
        sh = scene.GetSubjectHierarchyNode() if hasattr(scene, "GetSubjectHierarchyNode") else None
        if sh is None:
            return
        inputItem = sh.GetItemByDataNode(inputNode)
        if not inputItem:
            return  # no hierarchy item (bare scene without the subject hierarchy plugins)
        parent = sh.GetItemParent(inputItem)
        item = sh.GetItemByDataNode(node)
        if item:
            sh.SetItemParent(item, parent)
        else:
            sh.CreateItem(parent, node)

    @staticmethod
    def _setWindowLevel(node):
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        if display is None or node.GetImageData() is None:
            return
        from vtk.util.numpy_support import vtk_to_numpy

        values = vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())
        lo, hi = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
        if hi <= lo:
            lo, hi = float(values.min()), float(values.max()) + 1e-6
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(float(lo), float(hi))


def writeVolumeFile(node, path: str, compress: bool = False):
    """Write `node` with a storage node of our own that never joins the scene or the node."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    storage.SetUseCompression(compress)  # temp files: speed over size
    if not storage.WriteData(node) or not os.path.isfile(path):
        raise MRISuperResError("Could not write volume %r to %s." % (node.GetName(), path),
                               "Check free disk space and that the folder is writable.")


def readVolumeFile(path: str, what: str = "the result"):
    """A new scalar volume node, not in any scene, holding the file's voxels and geometry."""
    node = slicer.vtkMRMLScalarVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    # Keep the file's index axes as they are: axis k of the result is axis k of the input.
    storage.SetForceRightHandedIJKCoordinateSystem(False)
    if not os.path.isfile(path) or not storage.ReadData(node) or node.GetImageData() is None:
        if what == "the result":
            raise MRISuperResError("Could not read the result %s." % path, "Report this with the log.")
        raise MRISuperResError("Could not read %s %s." % (what, path),
                               "Check that it is a readable volume file (.nii.gz, .nii, .nrrd, .mha, .mhd).")
    return node


__all__ = ["MRISuperResLogic", "RunOptions", "Degradation", "MRISuperResError", "MRISuperResCancelled",
           "SuperResolutionRun", "libraryRoot", "writeVolumeFile", "readVolumeFile"]
