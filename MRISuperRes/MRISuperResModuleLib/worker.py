"""The worker process: started from a command line, its output read on threads, its tree killable.

The caller polls (`readLines`) from wherever it lives: a loop with a sleep for scripts, a QTimer in
the GUI. Reading happens on threads so a worker that fills its pipes never blocks, and the GUI thread
never waits on a pipe.
"""

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import List, Optional, Sequence, Tuple

STDOUT = "stdout"
STDERR = "stderr"
EXIT_GRACE_S = 1.0


class WorkerProcess:
    """One child process; lines of stdout/stderr arrive in a queue as (stream, line)."""

    def __init__(self, argv: Sequence[str], env: Optional[dict] = None, cwd: Optional[str] = None):
        self.argv = [str(a) for a in argv]
        self.env = env
        self.cwd = cwd
        self.proc = None
        self._lines = queue.Queue()
        self._readers: List[threading.Thread] = []
        self.killed = False
        self._exitSeen = None
        self._stragglersKilled = False

    def start(self) -> "WorkerProcess":
        kwargs = {}
        if os.name == "nt":
            # A new process group lets taskkill /T find the tree; no console window pops up.
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            # Own session = own process group, so one killpg reaches every descendant.
            kwargs["start_new_session"] = True
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=self.env, cwd=self.cwd, text=True,
                                     encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        for name, stream in ((STDOUT, self.proc.stdout), (STDERR, self.proc.stderr)):
            t = threading.Thread(target=self._read, args=(name, stream), daemon=True,
                                 name="MRISuperRes-%s-%d" % (name, self.proc.pid))
            t.start()
            self._readers.append(t)
        return self

    def _read(self, name, stream):
        try:
            for line in iter(stream.readline, ""):
                self._lines.put((name, line.rstrip("\r\n")))
        except (OSError, ValueError):
            pass  # pipe closed under us by kill(): nothing more to read
        finally:
            stream.close()

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> Optional[int]:
        return self.proc.poll() if self.proc else None

    @property
    def finished(self) -> bool:
        """Exited and both pipes drained to EOF (so no line is lost)."""
        if self.returncode is None:
            return False
        if any(t.is_alive() for t in self._readers):
            # Descendants that outlive the worker keep our pipes open: end them after a grace period.
            if self._exitSeen is None:
                self._exitSeen = time.monotonic()
            elif time.monotonic() - self._exitSeen > EXIT_GRACE_S and not self._stragglersKilled:
                self._stragglersKilled = True
                killTree(self.proc.pid)
            return False
        return True

    def readLines(self) -> List[Tuple[str, str]]:
        out = []
        while True:
            try:
                out.append(self._lines.get_nowait())
            except queue.Empty:
                return out

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(0.02)
        return self.returncode

    def kill(self):
        """End the whole process tree now (the worker may have spawned data loaders etc.)."""
        if self.proc is None or self.returncode is not None and not _groupAlive(self.proc.pid):
            return
        self.killed = True
        killTree(self.proc.pid)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _groupAlive(pgid: int) -> bool:
    if os.name == "nt":
        return False
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def killTree(pid: int):
    """Kill `pid` and all its descendants."""
    descendants = []
    try:
        import psutil  # bundled with Slicer; finds children that left the process group

        descendants = psutil.Process(pid).children(recursive=True)
    except Exception:
        pass
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for child in descendants:
        try:
            child.kill()
        except Exception:
            pass


def pythonExecutable() -> str:
    """The interpreter that runs the worker: Slicer's Python launcher in the app, this Python otherwise."""
    try:
        import slicer

        if getattr(slicer, "app", None) is not None:
            import shutil

            found = shutil.which("PythonSlicer")
            if found:
                return found
            suffix = ".exe" if os.name == "nt" else ""
            return os.path.join(os.path.dirname(sys.executable), "PythonSlicer" + suffix)
    except ImportError:
        pass
    return sys.executable
