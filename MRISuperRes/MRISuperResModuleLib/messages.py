"""The worker's messages in the panel's words: the one place that turns command-line talk into GUI talk.

The library writes for its command line ("override with --operator/--axis/--factor", "--set steps=20",
"input.nrrd: ..."). The panel shows the same facts with the names of its own controls and volumes:

    --set lr=0.001                 ->  Method settings > Learning rate = 0.001
    --operator/--axis/--factor     ->  Input > Override
    --device cpu                   ->  Method > Device: cpu
    /tmp/.../input.nrrd            ->  'T1_thick'
    {"operator": "thick-slice", "axes": [2], "factors": [4.0], ...}  ->  thick slices along axis 2 (k), factor 4

Qt-free and torch-free; the Widget calls `forPanel` on every message, log line and error it shows, and
`errorText` for dialogs. The Logic and the batch script keep the worker's own words (their users type flags).
"""

import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Optional

from .presenter import AXIS_NAMES, settingLabel

# Exit code -> what to do, when the error itself gives no such line (`runs.MRISuperResError.fix`).
FIXES = {
    1: "This is a bug in MRISuperRes: please report it with the log (Log section).",
    2: "Change the input or the setting named above, then press Apply again.",
    3: "Choose the CPU, a smaller model or fewer samples (Method section), then press Apply again.",
}
DEFAULT_FIX = "See the Log section for details."

_FLAG_WORDS = [
    (r"--operator/--axis/--factor", "Input > Override"),
    (r"distinct --output/--uncertainty/--residual", "distinct output volumes (Outputs section)"),
    (r"--output/--uncertainty/--residual", "the Outputs section"),
    (r"--model (?:NAME\|PATH|NAME or PATH|NAME|PATH)", "Method > Model"),
    (r"--device (\w+)", r"Method > Device: \1"),
    (r"--registration (\w+)", r"\1 registration (not offered in this panel)"),
    (r"--operator", "Input > Operator"),
    (r"--axis", "Input > Axis"),
    (r"--factor", "Input > Factor"),
    (r"--profile", "Input > Slice profile"),
    (r"--model", "Method > Model"),
    (r"--device", "Method > Device"),
    (r"--seed", "Method > Seed"),
    (r"--method", "Method"),
    (r"--output", "Outputs > Output volume"),
    (r"--uncertainty", "Outputs > Uncertainty"),
    (r"--residual", "Outputs > Residual"),
    (r"--allow-unverified", "an unverified import (not offered in this panel)"),
]
_COMMANDS = [
    (r"`python -m MRISuperResLib models import [^`]*`", "Method > Model > Import model..."),
    (r"`python -m MRISuperResLib models list`", "the Model list (Method section)"),
    (r"`models list`", "the Model list"),
    (r"`(?:python -m MRISuperResLib )?train \w+`", "the library's training command"),
]


@dataclass
class MessageContext:
    """What the panel knows that the worker does not: which temp file is which volume."""

    paths: Dict[str, str] = field(default_factory=dict)  # temp path -> words, e.g. "/tmp/x/input.nrrd" -> "'T1'"
    tempDir: Optional[str] = None


def contextForRun(run) -> MessageContext:
    """The words for a `runs.SuperResolutionRun`'s temp files."""
    request = run.request
    name = run.inputNode.GetName() if run.inputNode is not None else "input"
    words = {request.inputPath: "'%s'" % name, request.outputPath: "the output volume",
             request.uncertaintyPath: "the uncertainty volume", request.residualPath: "the residual volume"}
    return MessageContext({p: w for p, w in words.items() if p}, run.tempDir)


def describeDegradation(d: dict) -> str:
    """{"operator": "thick-slice", "axes": [2], "factors": [4.0], "profile": "gaussian"} in words."""
    kind = d.get("operator", "?")
    axes = [int(a) for a in d.get("axes", [])]
    factors = ", ".join("%g" % float(f) for f in d.get("factors", []))
    where = ", ".join("%d (%s)" % (a, AXIS_NAMES[a]) for a in axes if 0 <= a < 3)
    what = {"thick-slice": "thick slices", "slice-removal": "slice removal", "downsample": "downsampling",
            "kspace": "truncated k-space"}.get(kind, kind)
    text = "%s along axis %s, factor %s" % (what, where, factors)
    if d.get("profile"):
        text += ", %s profile" % d["profile"]
    return text


def _setting(m) -> str:
    label = "Method settings > %s" % settingLabel(m.group(1))
    value = m.group(2)
    return label if value in ("N", "VALUE", "value") else "%s = %s" % (label, value)


def _degradation(m) -> str:
    try:
        return describeDegradation(json.loads(m.group(0)))
    except (ValueError, TypeError, AttributeError):
        return m.group(0)


def forPanel(text, context: Optional[MessageContext] = None) -> str:
    """`text` with temp files named as volumes, flags and commands named as controls."""
    text = str(text)
    context = context or MessageContext()
    # longest paths first, so a folder never eats part of a file name inside it
    for path in sorted(context.paths, key=len, reverse=True):
        words = context.paths[path]
        text = text.replace(path, words)
        if os.path.basename(path):
            text = re.sub(r"(?<![\w./\\-])%s(?![\w.])" % re.escape(os.path.basename(path)), words, text)
    if context.tempDir:
        text = text.replace(context.tempDir, "the run's temporary folder")
    for pattern, words in _COMMANDS:
        text = re.sub(pattern, words, text)
    text = re.sub(r"--set (\w+)=([^\s,;)]*[^\s,;).])", _setting, text)
    text = re.sub(r"--set key=value", "a method setting", text)
    text = re.sub(r"--set\b", "Method settings", text)
    text = re.sub(r"\{[^{}]*\"operator\"[^{}]*\}", _degradation, text)
    text = re.sub(r"\(override with Input > Override\)", "(to change it: Input > Override)",
                  _flags(text))
    return text


def _flags(text: str) -> str:
    for pattern, words in _FLAG_WORDS:
        text = re.sub(pattern + r"(?![\w-])", words, text)
    # a flag no control stands for: its words, not its spelling
    return re.sub(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)", lambda m: "the '%s' option" % m.group(1).replace(
        "-", " "), text)


def errorText(error, context: Optional[MessageContext] = None) -> str:
    """A dialog's text for an MRISuperResError: what went wrong, then a "How to fix" line that is never empty."""
    problem = forPanel(getattr(error, "problem", str(error)), context)
    fix = forPanel(getattr(error, "fix", "") or "", context) or FIXES.get(getattr(error, "exitCode", None), DEFAULT_FIX)
    return "%s\n\nHow to fix: %s" % (problem, fix)
