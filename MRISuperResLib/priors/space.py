"""Between the input's HR grid and a prior's grid, and between input intensities and the prior's range.

Geometry: the input is assumed to be in the prior's space already (MNI-aligned, same voxel size), with any
size and field of view. Per axis the two grids are centre-aligned: with d = n_hr - n_prior,
    d >= 0 (crop): prior[0:n_prior]          <-> hr[d//2 : d//2 + n_prior]
    d <  0 (pad):  prior[-d//2 : -d//2 + n_hr] <-> hr[0:n_hr]
HR voxels outside the prior's field of view keep a fill (e.g. the interpolated input).

Intensity: u = r0 + (r1 - r0) * (v - lo) / (hi - lo), lo/hi robust percentiles of the LR input, [r0, r1] the
prior's range; `to_input` inverts it exactly.
"""

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch


@dataclass(frozen=True)
class CropPad:
    hr_shape: Tuple[int, int, int]
    prior_shape: Tuple[int, int, int]

    def _slices(self):
        hr, pr = [], []
        for n, p in zip(self.hr_shape, self.prior_shape):
            d = int(n) - int(p)
            if d >= 0:
                hr.append(slice(d // 2, d // 2 + p))
                pr.append(slice(0, p))
            else:
                hr.append(slice(0, n))
                pr.append(slice((-d) // 2, (-d) // 2 + n))
        return tuple(hr), tuple(pr)

    @property
    def identity(self) -> bool:
        return tuple(self.hr_shape) == tuple(self.prior_shape)

    def covered_fraction(self) -> float:
        """Share of HR voxels inside the prior's field of view."""
        hr, _ = self._slices()
        inside = 1
        for s in hr:
            inside *= s.stop - s.start
        total = 1
        for n in self.hr_shape:
            total *= n
        return inside / total

    def to_prior(self, x: torch.Tensor, background: float = 0.0) -> torch.Tensor:
        """(..., n_hr) -> (..., n_prior): crop, pad with `background`."""
        if self.identity:
            return x
        hr, pr = self._slices()
        out = x.new_full(tuple(x.shape[:-3]) + tuple(self.prior_shape), float(background))
        out[(Ellipsis,) + pr] = x[(Ellipsis,) + hr]
        return out

    def to_hr(self, x: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """(..., n_prior) -> (..., n_hr): the prior's voxels where it covers the HR grid, `fill` elsewhere."""
        if self.identity:
            return x
        hr, pr = self._slices()
        out = fill.to(x.dtype).expand(tuple(x.shape[:-3]) + tuple(self.hr_shape)).clone()
        out[(Ellipsis,) + hr] = x[(Ellipsis,) + pr]
        return out


@dataclass(frozen=True)
class IntensityMap:
    lo: float
    hi: float
    r0: float = 0.0
    r1: float = 1.0

    @classmethod
    def fit(cls, y: torch.Tensor, intensity: dict) -> "IntensityMap":
        """From the card's "intensity" entry: robust min-max ("percentiles") or none ("normalisation": "none")."""
        r0, r1 = (float(v) for v in (intensity or {}).get("range", (0.0, 1.0)))
        if str((intensity or {}).get("normalisation", "")).lower().startswith("none"):
            return cls(r0, r1, r0, r1)
        p_lo, p_hi = (float(v) for v in (intensity or {}).get("percentiles", (0.0, 99.5)))
        flat = y.detach().flatten().float()
        lo, hi = (float(v) for v in torch.quantile(_subsample(flat), torch.tensor(
            [p_lo / 100.0, p_hi / 100.0], device=flat.device)))
        if not hi > lo:
            hi = lo + 1.0  # a constant input: keep the map invertible
        return cls(lo, hi, r0, r1)

    def to_prior(self, v: torch.Tensor) -> torch.Tensor:
        return self.r0 + (self.r1 - self.r0) * (v - self.lo) / (self.hi - self.lo)

    def to_input(self, u: torch.Tensor) -> torch.Tensor:
        return self.lo + (self.hi - self.lo) * (u - self.r0) / (self.r1 - self.r0)


def _subsample(flat: torch.Tensor, limit: int = 1 << 24) -> torch.Tensor:
    # torch.quantile refuses inputs above 2**24 elements; a regular stride keeps it deterministic
    if flat.numel() <= limit:
        return flat
    return flat[:: flat.numel() // limit + 1]


def shape_of(seq: Sequence[int]) -> Tuple[int, int, int]:
    return tuple(int(s) for s in seq)


# ITK physical space is LPS: +x towards Left, +y towards Posterior, +z towards Superior.
_LABELS = (("L", "R"), ("P", "A"), ("S", "I"))


def orientation_code(direction) -> str:
    """Three letters naming where each index axis points (ITK direction, row-major 3x3; column a = axis a)."""
    d = [[float(v) for v in row] for row in _rows(direction)]
    code = ""
    for a in range(3):
        col = [d[r][a] for r in range(3)]
        r = max(range(3), key=lambda i: abs(col[i]))
        code += _LABELS[r][0 if col[r] > 0 else 1]
    return code


def direction_of(code: str) -> Tuple[float, ...]:
    """The axis-aligned ITK direction (row-major 3x3) an orientation code names; inverse of `orientation_code`."""
    d = [[0.0] * 3 for _ in range(3)]
    rows = set()
    for a, letter in enumerate(str(code).upper()[:3]):
        for r, (pos, neg) in enumerate(_LABELS):
            if letter in (pos, neg):
                d[r][a] = 1.0 if letter == pos else -1.0
                rows.add(r)
    if len(str(code)) != 3 or len(rows) != 3:
        raise ValueError("orientation %r does not name three different axes (e.g. LAS, RAS, LPS)" % (code,))
    return tuple(v for row in d for v in row)


def reorientation(source: str, target: str):
    """(perm, flips) with y = flip(x.permute(perm), flips) turning axes labelled `source` into `target`.

    Used to present an input to a prior in the card's orientation (e.g. "LAS"); `undo_reorientation` inverts it.
    """
    pairs = {"L": "R", "R": "L", "P": "A", "A": "P", "S": "I", "I": "S"}
    perm, flips = [], []
    for t in target.upper():
        for a, s in enumerate(source.upper()):
            if s == t or s == pairs[t]:
                perm.append(a)
                if s != t:
                    flips.append(len(perm) - 1)
                break
        else:
            raise ValueError("orientation %s has no axis along %s" % (source, t))
    return tuple(perm), tuple(flips)


def apply_reorientation(x: torch.Tensor, perm, flips) -> torch.Tensor:
    n = x.dim()
    y = x.permute(*range(n - 3), *[n - 3 + p for p in perm])
    return y.flip([n - 3 + f for f in flips]) if flips else y


def undo_reorientation(y: torch.Tensor, perm, flips) -> torch.Tensor:
    n = y.dim()
    x = y.flip([n - 3 + f for f in flips]) if flips else y
    inv = [perm.index(a) for a in range(3)]
    return x.permute(*range(n - 3), *[n - 3 + p for p in inv])


def _rows(direction):
    flat = [float(v) for v in (direction.flatten() if hasattr(direction, "flatten") else _flatten(direction))]
    return [flat[0:3], flat[3:6], flat[6:9]]


def _flatten(seq):
    out = []
    for v in seq:
        out.extend(_flatten(v) if isinstance(v, (list, tuple)) else [v])
    return out
