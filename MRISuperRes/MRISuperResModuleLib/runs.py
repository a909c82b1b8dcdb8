"""One super-resolution run seen from the Slicer side: a worker process plus what its output told us.

States: running -> succeeded | failed | cancelled. Only `succeeded` touches the scene.

A run belongs to the scene it started in: closing that scene (File > Close Scene, `scene.Clear(0)`) or
removing its input or a chosen output node cancels it at once, so one patient's result can never land in
the next patient's scene.
"""

import collections
import os
import time
from typing import Callable, Optional

from .protocol import parseEventLine
from .worker import STDOUT

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"
EXIT_CANCELLED = 130
# Exit code -> what to do; the worker's message already names what was wrong (exit codes: the library's README).
FIXES = {1: "This is a bug in MRISuperRes: please report it with the log.",
         2: "Change the input or the setting named above, and run again.",
         3: "Choose the CPU, a smaller model or fewer samples."}
LOG_LINES = 2000


class MRISuperResError(RuntimeError):
    """A run or request failed; `problem` and `fix` are for the user, `log` holds the worker's output."""

    def __init__(self, problem: str, fix: str = "", exitCode: Optional[int] = None, log=None):
        self.problem = problem
        self.fix = fix
        self.exitCode = exitCode
        self.log = list(log or [])
        super().__init__(problem + (" " + fix if fix else ""))


class MRISuperResCancelled(MRISuperResError):
    """The run was cancelled; nothing was added to the scene."""


class SuperResolutionRun:
    def __init__(self, logic, worker, request, inputNode, outputNode, extraTargets, tempDir,
                 progressCallback: Optional[Callable[[dict], None]] = None):
        self.logic = logic
        self.worker = worker
        self.request = request
        self.inputNode = inputNode
        self.outputNode = outputNode
        self.extraTargets = dict(extraTargets)
        self.extraNodes = {}
        self.tempDir = tempDir
        self.progressCallback = progressCallback
        self.state = RUNNING
        self.lastProgress = None
        self.warnings = []
        self.resultEvent = None
        self.errorEvent = None
        self.error: Optional[MRISuperResError] = None
        self.log = collections.deque(maxlen=LOG_LINES)
        self._cancelRequested = False
        self.startTime = time.monotonic()
        self.scene = logic.scene
        self._observations = []
        self._observeScene()

    # ---- the scene the run belongs to ----

    def _observeScene(self):
        scene = self.scene
        if scene is None or not hasattr(scene, "AddObserver"):
            return
        self._observations = [scene.AddObserver(scene.StartCloseEvent, self._onSceneClosing),
                              scene.AddObserver(scene.NodeRemovedEvent, self._onNodeRemoved)]

    def _forgetScene(self):
        for tag in self._observations:
            self.scene.RemoveObserver(tag)
        self._observations = []

    def _watchedNodes(self):
        nodes = [("input volume", self.inputNode), ("output volume", self.outputNode)]
        nodes += [("%s volume" % role, node) for role, node in self.extraTargets.items()]
        return [(label, node) for label, node in nodes if node not in (None, True, False)]

    def _onSceneClosing(self, caller=None, event=None):
        self.cancel("the scene was closed")

    def _onNodeRemoved(self, caller=None, event=None):
        for label, node in self._watchedNodes():
            if node.GetScene() is not self.scene:  # NodeRemovedEvent: the node has already left the scene
                self.cancel("the %s %r was removed from the scene" % (label, node.GetName()))
                return

    def sceneProblem(self) -> Optional[str]:
        """Why the results must not be added now (scene closing, a node gone), or None."""
        if self.scene is not None and self.scene.IsClosing():
            return "the scene was closed"
        for label, node in self._watchedNodes():
            if node.GetScene() is not self.scene:
                return "the %s %r is no longer in the scene" % (label, node.GetName())
        return None

    @property
    def done(self) -> bool:
        return self.state != RUNNING

    def cancel(self, reason: str = ""):
        """Kill the worker's process tree now; the scene stays as it was. `reason` completes "Cancelled: ..."."""
        if self.done:
            return
        self._cancelRequested = True
        self.worker.kill()
        self._finish(CANCELLED, self._cancelled(reason))

    def _cancelled(self, reason: str = "") -> "MRISuperResCancelled":
        if reason:
            return MRISuperResCancelled("Cancelled: %s. Nothing was added to any scene." % reason, "",
                                        EXIT_CANCELLED, self.log)
        return MRISuperResCancelled("Cancelled; nothing was added to the scene.", "", EXIT_CANCELLED, self.log)

    def poll(self) -> bool:
        """Handle whatever the worker printed since the last call; True once the run is over."""
        if self.done:
            return True
        for stream, line in self.worker.readLines():
            self._handleLine(stream, line)
            if self.done:  # the callback cancelled
                return True
        if self.worker.finished:
            for stream, line in self.worker.readLines():
                self._handleLine(stream, line)
            if not self.done:
                self._complete(self.worker.returncode)
        return self.done

    def wait(self, keepGuiAlive: bool = False, pollInterval: float = 0.05):
        """Block until the run ends; the output node, or raise its error."""
        app = None
        if keepGuiAlive:
            import slicer

            app = getattr(slicer, "app", None)
        while not self.poll():
            if app is not None:
                app.processEvents()
            time.sleep(pollInterval)
        if self.error is not None:
            raise self.error
        return self.outputNode

    def _emit(self, event: dict):
        if self.progressCallback is not None:
            self.progressCallback(event)

    def _handleLine(self, stream: str, line: str):
        event = parseEventLine(line) if stream == STDOUT else None
        if event is None:
            if line.strip():
                self.log.append(line)
                self._emit({"event": "log", "stream": stream, "message": line})
            return
        kind = event["event"]
        if kind == "progress":
            self.lastProgress = event
            self.log.append("[%3d%%] %s" % (round(100 * float(event.get("fraction") or 0)), event.get("message", "")))
        elif kind == "warning":
            self.warnings.append(event.get("message", ""))
            self.log.append("warning: %s" % event.get("message", ""))
        elif kind == "result":
            self.resultEvent = event
        elif kind == "error":
            self.errorEvent = event
            self.log.append("error: %s" % event.get("message", ""))
        self._emit(event)

    def _complete(self, returncode):
        if self._cancelRequested or returncode == EXIT_CANCELLED:
            self._finish(CANCELLED, self._cancelled())
            return
        problem = self.sceneProblem()
        if problem:  # an event was missed (or the scene was swapped): never add to the wrong scene
            self._finish(CANCELLED, self._cancelled(problem))
            return
        if returncode != 0 or self.errorEvent is not None:
            self._finish(FAILED, self._failure(returncode))
            return
        paths = {"output": self.request.outputPath}
        if self.request.uncertaintyPath and os.path.isfile(self.request.uncertaintyPath):
            paths["uncertainty"] = self.request.uncertaintyPath
        if self.request.residualPath and os.path.isfile(self.request.residualPath):
            paths["residual"] = self.request.residualPath
        if not os.path.isfile(paths["output"]):
            self._finish(FAILED, MRISuperResError("The worker ended without writing a result.",
                                                  "Report this with the log.", returncode, self.log))
            return
        try:
            nodes = self.logic.addResults(self, paths)
        except Exception as exc:  # the scene must not end up half-filled, and the temp folder must go
            if not isinstance(exc, MRISuperResError):
                exc = MRISuperResError("Could not load the result (%s: %s)." % (type(exc).__name__, exc),
                                       "Report this with the log.", returncode, self.log)
            self._finish(CANCELLED if isinstance(exc, MRISuperResCancelled) else FAILED, exc)
            return
        self.outputNode = nodes["output"]
        self.extraNodes = {k: v for k, v in nodes.items() if k != "output"}
        self._finish(SUCCEEDED, None)

    def _failure(self, returncode) -> MRISuperResError:
        if self.errorEvent is not None:
            message = str(self.errorEvent.get("message") or "The worker failed.")
            code = self.errorEvent.get("exitCode", returncode)
        else:
            tail = [line for line in self.log if line.strip()][-3:]
            message = "The worker failed (exit code %s)%s" % (returncode, (": " + " | ".join(tail)) if tail else ".")
            code = returncode
        fix = FIXES.get(code, "See the log for details.")
        return MRISuperResError(message, fix, code, self.log)

    def _finish(self, state, error):
        self.state = state
        self.error = error
        self._forgetScene()
        self.logic.removeTempDir(self.tempDir)
        self.logic._forget(self)
        if error is not None:
            self._emit({"event": "finished", "state": state, "message": str(error), "exitCode": error.exitCode})
        else:
            self._emit({"event": "finished", "state": state, "message": "Done in %.1f s."
                        % (time.monotonic() - self.startTime)})
