"""Forward operators (HR -> LR) with adjoints and pseudo-inverses.

Notation: x is the HR volume, shape (..., n_i, n_j, n_k); y = A x the LR volume, shape
(..., m_i, m_j, m_k); index axes are ITK's i, j, k = 0, 1, 2 (the last three tensor dims).
Every operator here is separable, A = A_i (x) A_j (x) A_k, with A_a an (m_a, n_a) matrix along
axis a (identity on unaffected axes). So

    forward  y = A x          apply A_a along each affected axis
    adjoint  x = A^T y        apply A_a^T
    dagger   x = A^+ y        apply pinv(A_a); exact Moore-Penrose since pinv(A (x) B) = pinv(A) (x) pinv(B)

Operators are immutable after construction: calling them changes nothing.
"""

import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ..errors import InputError
from . import kernels

KINDS = ("slice-removal", "thick-slice", "downsample", "kspace")
MAX_AXIS_SIZE = 2 ** 31 - 1  # voxels along one axis: ITK's and NIfTI-2's index type is 32-bit at best
PROFILES = ("gaussian", "box")


class PartialBlockWarning(UserWarning):
    """The factor does not divide the image size; the last LR sample covers a partial block."""


@dataclass(frozen=True)
class OperatorSpec:
    """What the degradation is, independent of image size.

    kind: one of KINDS. factors: per index axis (1.0 = untouched). profile: slice profile of
    thick-slice ("gaussian" with FWHM = LR spacing, or "box").
    """

    kind: str
    factors: Tuple[float, float, float]
    profile: str = "gaussian"

    @classmethod
    def make(cls, kind, axis=2, factor=4.0, profile="gaussian") -> "OperatorSpec":
        """Validate user arguments. `axis` may be an int or a sequence of ints; `factor` a number or per-axis list."""
        if kind not in KINDS:
            raise InputError("Unknown operator '%s'." % kind, "Choose one of: %s." % ", ".join(KINDS))
        if profile not in PROFILES:
            raise InputError("Unknown slice profile '%s'." % profile, "Choose one of: %s." % ", ".join(PROFILES))
        axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
        if not axes:
            raise InputError("No axis given.", "Give --axis 0, 1 or 2 (ITK index axes i, j, k).")
        for a in axes:
            if not isinstance(a, (int, np.integer)) or not 0 <= int(a) <= 2:
                raise InputError("Axis %s is out of range." % (a,), "Axes are ITK index axes i, j, k = 0, 1, 2.")
        if kind in ("slice-removal", "thick-slice") and len(axes) != 1:
            raise InputError("%s acts along one axis, %d were given." % (kind, len(axes)), "Give a single --axis.")
        fs = [factor] * len(axes) if np.isscalar(factor) else list(factor)
        if len(fs) != len(axes):
            raise InputError("%d factors for %d axes." % (len(fs), len(axes)), "Give one factor, or one per axis.")
        factors = [1.0, 1.0, 1.0]
        for a, f in zip(axes, fs):
            try:
                f = float(f)
            except (TypeError, ValueError):
                raise InputError("Factor %r is not a number." % (f,), "Give a number > 1, e.g. 4.") from None
            if not math.isfinite(f):
                raise InputError("Factor %g is not a finite number." % f,
                                 "Give the ratio of LR to HR spacing, e.g. 4 for 4 mm slices on a 1 mm grid.")
            if f <= 1.0:
                raise InputError("Factor %g must be greater than 1." % f,
                                 "Give the ratio of LR to HR spacing, e.g. 4 for 4 mm slices on a 1 mm grid.")
            if f > MAX_AXIS_SIZE / 2:  # an LR axis has at least 2 samples
                raise InputError("Factor %g is too large: at most %d, since an HR axis holds at most %d voxels."
                                 % (f, MAX_AXIS_SIZE // 2, MAX_AXIS_SIZE),
                                 "Give the ratio of LR to HR spacing, e.g. 4 for 4 mm slices on a 1 mm grid.")
            if kind == "slice-removal" and abs(f - round(f)) > 1e-9:
                raise InputError("Slice removal keeps 1 of every k slices, so its factor must be an integer (got %g)." % f,
                                 "Use an integer factor, or thick-slice/downsample for non-integer ratios.")
            factors[int(a)] = f
        return cls(kind, tuple(factors), profile)

    @property
    def axes(self) -> Tuple[int, ...]:
        return tuple(a for a in range(3) if self.factors[a] != 1.0)

    def lr_size(self, n: int, f: float) -> int:
        if self.kind == "kspace":
            return max(1, int(round(n / f)))  # keeps the FOV; the effective factor becomes n/m
        return max(1, int(math.ceil(n / f - 1e-9)))

    def hr_size(self, m: int, f: float) -> int:
        return max(1, int(round(m * f)))

    def matrix(self, n: int, m: int, f: float) -> np.ndarray:
        if self.kind == "slice-removal":
            return kernels.linear_sampling(n, m, f)
        if self.kind == "kspace":
            return kernels.band_limit(n, m, f)
        if self.kind == "thick-slice" and self.profile == "gaussian":
            return kernels.gaussian_profile(n, m, f)
        return kernels.box_profile(n, m, f)

    def bind_hr(self, hr_shape) -> "Operator":
        """The operator acting on an HR image of `hr_shape` (used by `degrade`)."""
        hr_shape = tuple(int(s) for s in hr_shape)
        lr, fs = [], []
        for a in range(3):
            f = self.factors[a]
            if f == 1.0:
                lr.append(hr_shape[a])
                fs.append(1.0)
                continue
            m = self.lr_size(hr_shape[a], f)
            if m < 2:
                raise InputError("Factor %g leaves fewer than 2 samples along axis %d (size %d)." % (f, a, hr_shape[a]),
                                 "Use a smaller factor.")
            eff = hr_shape[a] / m if self.kind == "kspace" else f
            if abs(hr_shape[a] / f - round(hr_shape[a] / f)) > 1e-6:
                warnings.warn("Factor %g does not divide size %d along axis %d: the last LR sample covers a partial "
                              "block (effective factor %g)." % (f, hr_shape[a], a, eff), PartialBlockWarning, stacklevel=2)
            lr.append(m)
            fs.append(eff)
        return Operator(self, hr_shape, tuple(lr), tuple(fs))

    def bind_lr(self, lr_shape) -> "Operator":
        """The operator whose LR side is `lr_shape` (used by `run`: the HR grid follows from the input)."""
        lr_shape = tuple(int(s) for s in lr_shape)
        hr = []
        for a in range(3):
            f = self.factors[a]
            if lr_shape[a] * f > MAX_AXIS_SIZE:
                raise InputError("Factor %g makes an HR grid of %.3g voxels along axis %d (%d LR samples); at most %d "
                                 "are possible." % (f, lr_shape[a] * f, a, lr_shape[a], MAX_AXIS_SIZE),
                                 "Give the ratio of LR to HR spacing, e.g. 4 for 4 mm slices on a 1 mm grid.")
            n = lr_shape[a] if f == 1.0 else self.hr_size(lr_shape[a], f)
            if f != 1.0 and abs(lr_shape[a] * f - n) > 1e-6:
                warnings.warn("LR size %d times factor %g is not an integer along axis %d: the HR grid has %d voxels."
                              % (lr_shape[a], f, a, n), PartialBlockWarning, stacklevel=2)
            hr.append(n)
        return Operator(self, tuple(hr), lr_shape, self.factors)

    def describe(self) -> dict:
        d = {"operator": self.kind, "axes": list(self.axes), "factors": [self.factors[a] for a in self.axes]}
        if self.kind == "thick-slice":
            d["profile"] = self.profile
        return d


@dataclass(frozen=True)
class Operator:
    """A spec bound to concrete HR and LR shapes. See the module docstring for the equations."""

    spec: OperatorSpec
    hr_shape: Tuple[int, int, int]
    lr_shape: Tuple[int, int, int]
    factors: Tuple[float, float, float]  # effective factors, used for sample positions
    # mm per HR voxel when the run knows its grid (pipeline.py); a solver that learns from the scan needs it
    hr_spacing: Optional[Tuple[float, float, float]] = None
    # the HR grid's direction (row-major 3x3, columns the index axes); a solver that uses the brain's near
    # left-right symmetry needs to know which index axis runs left-right
    hr_direction: Optional[Tuple[float, ...]] = None
    _cache: Dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def axes(self) -> Tuple[int, ...]:
        return self.spec.axes

    def matrices(self) -> Dict[int, np.ndarray]:
        """{axis: (m_a, n_a) float64 matrix}."""
        if "A" not in self._cache:
            self._cache["A"] = {a: self.spec.matrix(self.hr_shape[a], self.lr_shape[a], self.factors[a])
                                for a in self.axes}
        return self._cache["A"]

    def _numpy(self, key) -> Dict[int, np.ndarray]:
        if key == "A":
            return self.matrices()
        if key == "AT":
            return {a: m.T for a, m in self.matrices().items()}
        if key == "A+":
            return {a: np.linalg.pinv(m) for a, m in self.matrices().items()}
        if key.startswith("spread-"):  # U (A U)^+, U the interpolator: A U (A U)^+ = I, so the result is exact
            ups = self._numpy(key[len("spread-"):])
            return {a: ups[a] @ np.linalg.pinv(m @ ups[a]) for a, m in self.matrices().items()}
        build = _INTERPOLATORS[key]
        return {a: build(self.hr_shape[a], self.lr_shape[a], self.factors[a]) for a in self.axes}

    def _torch(self, key, like: torch.Tensor):
        ck = (key, like.dtype, like.device)
        if ck not in self._cache:
            self._cache[ck] = {a: torch.as_tensor(m, dtype=like.dtype, device=like.device)
                               for a, m in self._numpy(key).items()}
        return self._cache[ck]

    def _apply(self, x: torch.Tensor, mats, expect) -> torch.Tensor:
        if tuple(x.shape[-3:]) != tuple(expect):
            raise ValueError("expected spatial shape %s, got %s" % (tuple(expect), tuple(x.shape[-3:])))
        for a, m in mats.items():
            x = torch.movedim(torch.movedim(x, a - 3, -1) @ m.T, -1, a - 3)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply(x, self._torch("A", x), self.hr_shape)

    __call__ = forward

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self._apply(y, self._torch("AT", y), self.lr_shape)

    def dagger(self, y: torch.Tensor) -> torch.Tensor:
        return self._apply(y, self._torch("A+", y), self.lr_shape)

    def upsample(self, y: torch.Tensor, method: str) -> torch.Tensor:
        """Interpolate LR samples onto the HR grid: 'linear', 'cubic' (B-spline) or 'sinc' (zero-filled k-space)."""
        if method not in _INTERPOLATORS:
            raise ValueError("unknown interpolation %r; choose from %s" % (method, sorted(_INTERPOLATORS)))
        return self._apply(y, self._torch(method, y), self.lr_shape)

    def data_consistency(self, x: torch.Tensor, y: torch.Tensor, spread: str = "none") -> torch.Tensor:
        """Make x reproduce y (A x = y) by adding a correction built from the residual r = y - A x.

        spread "none": x + A^+ r, the orthogonal projection; for slice removal it changes only the observed
        slices, so a generated volume that misses them shows stripes. "linear" or "cubic": x + U (A U)^+ r with U
        that interpolator, the correction spread smoothly between the samples (iterative back-projection,
        Irani & Peleg 1991); just as exact, and it carries a generator's smooth errors (bias, contrast) measured
        at the samples into the voxels between them.
        """
        r = y - self.forward(x)
        if spread == "none":
            return x + self.dagger(r)
        if spread not in _INTERPOLATORS:
            raise ValueError("unknown spread %r; choose 'none' or one of %s" % (spread, sorted(_INTERPOLATORS)))
        return x + self._apply(r, self._torch("spread-" + spread, x), self.lr_shape)

    def describe(self) -> dict:
        d = self.spec.describe()
        d["factors"] = [self.factors[a] for a in self.axes]
        d.update(hr_shape=list(self.hr_shape), lr_shape=list(self.lr_shape))
        return d


_INTERPOLATORS = {
    "linear": lambda n, m, f: kernels.spline_interpolation(n, m, f, 1),
    "cubic": lambda n, m, f: kernels.spline_interpolation(n, m, f, 3),
    "sinc": kernels.sinc_interpolation,
}


def make_operator(kind, axis=2, factor=4.0, profile="gaussian") -> OperatorSpec:
    return OperatorSpec.make(kind, axis, factor, profile)


def spec_from_dict(d: Optional[dict]) -> Optional[OperatorSpec]:
    if not d:
        return None
    return OperatorSpec.make(d["operator"], d["axes"], d["factors"], d.get("profile", "gaussian"))
