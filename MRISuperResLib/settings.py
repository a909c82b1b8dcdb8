"""The settings a method takes, and what a solver returns: the types every layer shares.

One typed `Setting` schema drives the command line, the Slicer panel and validation; `SolveResult` is what every
solver returns. They sit below the methods and the priors so that a solver in any package can use them without
importing the registry.
"""

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Sequence

import torch

from .errors import InputError

TYPES = ("int", "float", "bool", "choice", "str")


def parse_key_values(items) -> Dict[str, str]:
    """--set KEY=VALUE items as {key: value} (values stay text; each method's Setting parses its own)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise InputError("--set %r is not key=value." % item, "Example: --set iterations=50")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


@dataclass(frozen=True)
class Setting:
    name: str
    type: str
    default: Any
    help: str
    min: Optional[float] = None
    max: Optional[float] = None
    choices: Optional[Sequence[str]] = None
    multiple_of: Optional[int] = None  # int settings: the value must be a multiple of this (0 included)

    def __post_init__(self):
        if self.type not in TYPES:
            raise ValueError("setting %s: type must be one of %s" % (self.name, TYPES))
        if self.type == "choice" and not self.choices:
            raise ValueError("setting %s: a choice needs choices" % self.name)

    def parse(self, value, method: str):
        """Convert a CLI string (or a Python value) to this setting's type and check its range."""
        where = "Setting '%s' of method '%s'" % (self.name, method)
        try:
            if self.type == "int":
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                v = int(str(value).strip()) if isinstance(value, str) else int(value)
            elif self.type == "float":
                v = float(value)
                if not math.isfinite(v):
                    raise ValueError
            elif self.type == "bool":
                if isinstance(value, bool):
                    v = value
                elif str(value).strip().lower() in ("1", "true", "yes", "on"):
                    v = True
                elif str(value).strip().lower() in ("0", "false", "no", "off"):
                    v = False
                else:
                    raise ValueError
            else:
                v = str(value)
        except (TypeError, ValueError):
            raise InputError("%s must be of type %s, got %r." % (where, self.type, value),
                             "Example: --set %s=%s" % (self.name, self.default)) from None
        if self.type == "choice" and v not in self.choices:
            raise InputError("%s must be one of %s, got %r." % (where, ", ".join(self.choices), v), "")
        if self.min is not None and v < self.min:
            raise InputError("%s must be >= %s, got %s." % (where, _number(self.min), v), "")
        if self.max is not None and v > self.max:
            raise InputError("%s must be <= %s, got %s." % (where, _number(self.max), v), "")
        if self.multiple_of and v % self.multiple_of:
            near = max(self.multiple_of, int(round(v / self.multiple_of)) * self.multiple_of)
            raise InputError("%s must be a multiple of %d, got %s." % (where, self.multiple_of, v),
                             "Example: --set %s=%d" % (self.name, near))
        return v

    def to_json(self) -> dict:
        d = asdict(self)
        d["choices"] = list(self.choices) if self.choices else None
        return d


@dataclass
class SolveResult:
    """HR estimate (tensor on the HR grid) and optional extras, e.g. {'uncertainty': tensor}."""

    x: torch.Tensor
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)
    info: Dict[str, Any] = field(default_factory=dict)


def _number(x) -> str:
    return str(int(x)) if float(x).is_integer() else "%g" % x


# The Slicer panel's integer fields and the synthetic-data seeds (training/synth.py) are 32-bit.
SEED = Setting("seed", "int", 0, "Random seed (same seed, same result on the same device).", min=0, max=2 ** 31 - 1)
