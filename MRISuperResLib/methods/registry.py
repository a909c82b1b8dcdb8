"""Method registry: what each method is, and what it declares about itself.

A method is a solver function

    solve(y, physics, prior, settings, progress, generator) -> SolveResult

y: LR measurement, torch tensor (m_i, m_j, m_k) in the input's intensity units; physics: a bound
`Operator`; prior: a loaded prior or None; settings: validated dict; progress: a `Progress`;
generator: a seeded torch.Generator. It returns the HR estimate on the operator's HR grid.
Registering it with `register(...)` makes it visible to the CLI, the benchmark and the Slicer panel, and declares
what they need to know about it, so that none of them tests a method's name:
    needs_prior  the kind of prior it solves with ("ldm", "vdm", "paired"); None for the baselines
    operators    the degradations it is built for
    grid         a GridBinding when it solves on its prior's grid (the pipeline brings the input there and back);
                 None when it runs on the input's own grid
    gate         the benchmark degradations on which `bench --gate` measures it against its baseline
Adding a method: docs/methods.md.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import InputError
from ..physics.operators import KINDS as OPERATOR_KINDS
from ..settings import SEED, Setting, SolveResult

# Setting, SolveResult and SEED live in settings.py (every layer uses them); a method module takes them from here.
__all__ = ["GridBinding", "Method", "SEED", "Setting", "SolveResult", "available", "get_method", "register"]


@dataclass(frozen=True)
class GridBinding:
    """A method solved on its prior's grid. The pipeline registers the input to the prior's space, hands the solver
    the operator seen from there, and blends the result back onto the input's grid (native.py), pasting the observed
    data there when the method's bool setting `paste` is on, spread as its choice setting `spread` says
    (Operator.data_consistency)."""

    paste: str
    spread: str

    def paste_from(self, settings: dict) -> Tuple[bool, str]:
        return settings.get(self.paste, False), settings.get(self.spread, "none")


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
    grid: Optional[GridBinding] = None
    gate: Sequence[str] = ()

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


def register(name, title, description, settings=(), generative=False, needs_prior=None, operators=OPERATOR_KINDS,
             grid: Optional[GridBinding] = None, gate: Sequence[str] = ()):
    """Decorator: register `solve` under `name`, with what it declares (module docstring)."""

    def deco(solve):
        if name in _REGISTRY:
            raise ValueError("method %s registered twice" % name)
        method = Method(name, title, description, solve, tuple(settings), generative, needs_prior, tuple(operators),
                        grid, tuple(gate))
        if grid is not None:
            _check_grid(method)
        _REGISTRY[name] = method
        return solve

    return deco


def _check_grid(m: Method):
    if not m.needs_prior:
        raise ValueError("method %s: only a method with a prior can be bound to the prior's grid" % m.name)
    types = {s.name: s.type for s in m.settings}
    for role, setting, want in (("paste", m.grid.paste, "bool"), ("spread", m.grid.spread, "choice")):
        if types.get(setting) != want:
            raise ValueError("method %s: its grid binding's %s names %r, which is not a %s setting of the method"
                             % (m.name, role, setting, want))


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
