"""Progress reporting and the JSON-lines protocol the Slicer module reads.

Solvers call a `Progress`; it knows nothing about where events go. The CLI's `JsonLinesSink`
turns them into one JSON object per stdout line:

    {"event": "start",    "method": ..., "input": ..., "output": ..., "device": ...}
    {"event": "progress", "fraction": 0.25, "step": 5, "total": 20, "message": "...", "eta_s": 12.3, ...}
    {"event": "warning",  "message": "..."}
    {"event": "result",   "output": "/path/out.nii.gz", "seconds": 4.2, ...}
    {"event": "summary",  "total": 3, "done": [...], "skipped": [...], "failed": [...]}   (batch, last)
    {"event": "error",    "message": "...", "exit_code": 2}
    {"event": "summary",  "total": 7, "done": 6, "skipped": 0, "failed": 1, ...}   (end of a cohort run)

Readers must skip lines that are not JSON objects (libraries may print to stdout): `parse_event`.
"""

import json
import sys
import time
from typing import Callable, Optional

from .errors import Cancelled

PROTOCOL_VERSION = 1
EVENTS = ("start", "progress", "warning", "result", "error", "summary")


class Progress:
    """Callable passed to solvers: progress(step, total, message, **extra).

    `sink` receives event dicts; `should_cancel` is polled at every report so a caller can stop a
    run between iterations (raises `Cancelled`). `span` maps this run's fraction into a part of a
    larger job (e.g. one file of a batch).
    """

    def __init__(self, sink: Optional[Callable[[dict], None]] = None, should_cancel: Optional[Callable[[], bool]] = None,
                 span=(0.0, 1.0), clock=time.monotonic):
        self.sink = sink or (lambda event: None)
        self.should_cancel = should_cancel or (lambda: False)
        self.span = span
        self.clock = clock
        self.t0 = clock()

    def restart_clock(self):
        self.t0 = self.clock()

    def __call__(self, step: int, total: int, message: str = "", **extra):
        if self.should_cancel():
            raise Cancelled("cancelled at step %d of %d" % (step, total))
        frac = min(1.0, max(0.0, step / total)) if total else 0.0
        elapsed = self.clock() - self.t0
        eta = elapsed * (1 - frac) / frac if frac > 0 else None
        lo, hi = self.span
        event = {"event": "progress", "fraction": round(lo + (hi - lo) * frac, 6), "step": int(step),
                 "total": int(total), "message": message, "eta_s": None if eta is None else round(eta, 2)}
        event.update(extra)
        self.sink(event)

    def warning(self, message: str):
        self.sink({"event": "warning", "message": str(message)})

    def sub(self, lo: float, hi: float) -> "Progress":
        """A Progress reporting into [lo, hi] of this one's span."""
        a, b = self.span
        return Progress(self.sink, self.should_cancel, (a + (b - a) * lo, a + (b - a) * hi), self.clock)


class JsonLinesSink:
    """Writes each event as one JSON line and flushes, so a reading process sees it at once."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def __call__(self, event: dict):
        self.stream.write(json.dumps(event, default=_jsonable) + "\n")
        self.stream.flush()


class TextSink:
    """Human-readable progress on stderr (the default when not `--progress jsonl`)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.last = -1.0

    def __call__(self, event: dict):
        kind = event.get("event")
        if kind == "progress":
            frac = event["fraction"]
            if frac - self.last < 0.05 and event["step"] != event["total"]:
                return
            self.last = frac
            eta = event.get("eta_s")
            self.stream.write("[%3d%%] %s%s\n" % (round(100 * frac), event.get("message", ""),
                                                  "" if eta is None else "  (eta %.0f s)" % eta))
        elif kind == "warning":
            self.stream.write("warning: %s\n" % event["message"])
        elif kind == "error":
            self.stream.write("error: %s\n" % event["message"])
        self.stream.flush()


def parse_event(line) -> Optional[dict]:
    """The event in one stdout line, or None for anything that is not a protocol event."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("event") not in EVENTS:
        return None
    return obj


def _jsonable(obj):
    try:
        return float(obj)
    except (TypeError, ValueError):
        return str(obj)
