"""Method registry and settings schema.

A method is a solver function

    solve(y, physics, prior, settings, progress, generator) -> SolveResult

y: LR measurement, torch tensor (m_i, m_j, m_k) in the input's intensity units; physics: a bound
`Operator`; prior: a loaded prior or None; settings: validated dict; progress: a `Progress`;
generator: a seeded torch.Generator. It returns the HR estimate on the operator's HR grid.
Registering it with `register(...)` makes it visible to the CLI, the benchmark and the Slicer panel.
"""

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..errors import InputError
from ..physics.operators import KINDS as OPERATOR_KINDS

TYPES = ("int", "float", "bool", "choice", "str")


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


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    description: str
    solve: Callable
    settings: Sequence[Setting] = ()
    generative: bool = False
    needs_prior: Optional[str] = None  # kind of prior the method needs, e.g. "ldm"; None for baselines
    operators: Sequence[str] = OPERATOR_KINDS  # degradations the method is built for

    def setting(self, name) -> Setting:
        for s in self.settings:
            if s.name == name:
                return s
        raise InputError("Method '%s' has no setting '%s'." % (self.name, name),
                         "Its settings: %s." % (", ".join(s.name for s in self.settings) or "none"))

    def resolve_settings(self, overrides: Optional[dict] = None, defaults: Optional[dict] = None) -> dict:
        """Schema defaults, then `defaults` (e.g. from a prior's model card), then user `overrides`."""
        out = {s.name: s.default for s in self.settings}
        for source in (defaults or {}, overrides or {}):
            for k, v in source.items():
                out[k] = self.setting(k).parse(v, self.name)
        return out

    def to_json(self) -> dict:
        return {"name": self.name, "title": self.title, "description": self.description,
                "generative": self.generative, "needs_prior": self.needs_prior, "operators": list(self.operators),
                "settings": [s.to_json() for s in self.settings]}


_REGISTRY: Dict[str, Method] = {}


def register(name, title, description, settings=(), generative=False, needs_prior=None, operators=OPERATOR_KINDS):
    """Decorator: register `solve` under `name`."""

    def deco(solve):
        if name in _REGISTRY:
            raise ValueError("method %s registered twice" % name)
        _REGISTRY[name] = Method(name, title, description, solve, tuple(settings), generative, needs_prior,
                                 tuple(operators))
        return solve

    return deco


def available() -> List[Method]:
    _load_builtin()
    return list(_REGISTRY.values())


def get_method(name: str) -> Method:
    _load_builtin()
    if name not in _REGISTRY:
        raise InputError("Unknown method '%s'." % name, "Available methods: %s." % ", ".join(_REGISTRY))
    return _REGISTRY[name]


def _load_builtin():
    # Importing the package imports every method module, each registering itself.
    from .. import methods  # noqa: F401


def _number(x) -> str:
    return str(int(x)) if float(x).is_integer() else "%g" % x


# The Slicer panel's integer fields and the synthetic-data seeds (training/synth.py) are 32-bit.
SEED = Setting("seed", "int", 0, "Random seed (same seed, same result on the same device).", min=0, max=2 ** 31 - 1)
