"""Super-resolution methods. Each module registers one solver; importing this package registers all."""

from . import bspline, inversesr_decoder, inversesr_ldm, kspace_vdm, paired_ddpm, sinc, trilinear  # noqa: F401
from .registry import Method, Setting, SolveResult, available, get_method, register

__all__ = ["Method", "Setting", "SolveResult", "available", "get_method", "register"]
