"""Super-resolution methods. Each module of this package registers one solver, and importing the package imports
every module in it, so a new method is a new module here (docs/methods.md); nothing else lists them."""

import importlib
import pkgutil

from .registry import GridBinding, Method, Setting, SolveResult, available, get_method, register

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.ispkg and m.name != "registry"):
    importlib.import_module("%s.%s" % (__name__, _module))

__all__ = ["GridBinding", "Method", "Setting", "SolveResult", "available", "get_method", "register"]
