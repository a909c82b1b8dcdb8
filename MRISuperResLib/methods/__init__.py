"""Super-resolution methods. Each module registers one solver; importing this package registers all."""

from . import bspline, sinc, trilinear  # noqa: F401
from .registry import Method, Setting, SolveResult, available, get_method, register

__all__ = ["Method", "Setting", "SolveResult", "available", "get_method", "register"]
