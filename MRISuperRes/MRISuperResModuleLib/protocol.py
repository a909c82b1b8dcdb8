"""The worker protocol as the Slicer side sees it: CLI arguments out, JSON-lines events in.

The library speaks snake_case (JSON keys, setting names on the command line); the module speaks
camelCase (Slicer's convention). This file is the one place that translates between them:

    event keys      eta_s, exit_code      ->  etaS, exitCode        (`translateEvent`)
    schema keys     needs_prior, ...      ->  needsPrior, ...       (`camelKeys`)
    run request     RunRequest (camelCase) ->  `run --method ... --set key=value --progress jsonl`

Setting *names* (e.g. ``num_samples``) are identifiers of the library and travel unchanged both ways.
Nothing here imports torch, qt or the library itself: the worker is another process.
"""

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

OPERATORS = ("slice-removal", "thick-slice", "downsample", "kspace")
PROFILES = ("gaussian", "box")


def toCamel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def toSnake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def camelKeys(obj):
    """Schema JSON (methods, devices, models) with every key in camelCase; values untouched."""
    if isinstance(obj, dict):
        return {toCamel(str(k)): camelKeys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [camelKeys(v) for v in obj]
    return obj


def translateEvent(event: dict) -> dict:
    # Top-level keys only: nested dicts (info.settings) are keyed by setting names, which stay as they are.
    return {toCamel(str(k)): v for k, v in event.items()}


def parseEventLine(line) -> Optional[dict]:
    """The camelCase event in one stdout line, or None for anything that is not a protocol event."""
    # The library's reader is the one definition of a protocol line; that module imports only the standard
    # library, so Slicer's process stays free of torch.
    from MRISuperResLib.progress import parse_event

    obj = parse_event(line)
    return None if obj is None else translateEvent(obj)


def formatValue(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return repr(value)
    return str(value)


@dataclass
class Degradation:
    """An explicit degradation (overrides the one the worker infers from the voxel spacing)."""

    operator: str = "thick-slice"
    axes: Sequence[int] = (2,)
    factors: Sequence[float] = (4.0,)
    profile: str = "gaussian"

    def args(self) -> List[str]:
        if self.operator not in OPERATORS:
            raise ValueError("Unknown degradation operator %r; use one of %s." % (self.operator, ", ".join(OPERATORS)))
        out = ["--operator", self.operator, "--axis"] + [str(int(a)) for a in self.axes]
        out += ["--factor"] + [formatValue(float(f)) for f in self.factors] + ["--profile", self.profile]
        return out


@dataclass
class RunRequest:
    """Everything one `run` of the worker needs, in the module's terms."""

    inputPath: str
    outputPath: str
    method: str = "bspline"
    settings: Dict[str, object] = field(default_factory=dict)
    degradation: Optional[Degradation] = None
    model: Optional[str] = None
    device: str = "auto"
    seed: Optional[int] = None
    uncertaintyPath: Optional[str] = None
    residualPath: Optional[str] = None

    def args(self) -> List[str]:
        out = ["run", "--method", self.method, "--input", self.inputPath, "--output", self.outputPath,
               "--device", self.device or "auto", "--progress", "jsonl"]
        if self.degradation is not None:
            out += self.degradation.args()
        if self.model:
            out += ["--model", self.model]
        if self.seed is not None:
            out += ["--seed", str(int(self.seed))]
        for key in sorted(self.settings or {}):
            out += ["--set", "%s=%s" % (key, formatValue(self.settings[key]))]
        if self.uncertaintyPath:
            out += ["--uncertainty", self.uncertaintyPath]
        if self.residualPath:
            out += ["--residual", self.residualPath]
        return out
