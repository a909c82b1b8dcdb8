"""Random smooth diffeomorphic deformations and small affine transforms for the synthetic generator.

Notation (all positions in millimetres of the template's voxel frame, axes i, j, k):
    x        a point of the output box (where a sample is wanted)
    v(x)     stationary velocity field, smooth, on a coarse lattice of spacing h
    u(x)     displacement of the flow exp(v): phi(x) = x + u(x)
    A, c, t  affine: rotation @ scaling, centre, translation
    T(x)     = c + A (phi(x) - c) + t, the point of the template that output point x shows

Scaling and squaring (Arsigny et al. 2006): u_0 = v / 2^N; u_{n+1}(x) = u_n(x) + u_n(x + u_n(x)).
Each step composes the flow with itself, so folding cannot appear as long as v / 2^N is small
against the lattice spacing, which `integrate_velocity` guarantees by choosing N.
"""

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _to_grid_coords(points: torch.Tensor, lo: torch.Tensor, spacing: float, shape: Sequence[int]) -> torch.Tensor:
    """Lattice points -> grid_sample's normalised coordinates (align_corners=True, last dim reversed)."""
    size = torch.tensor([max(n - 1, 1) for n in shape], dtype=points.dtype, device=points.device)
    idx = (points - lo) / spacing
    return (2.0 * idx / size - 1.0).flip(-1)


def sample_field(field: torch.Tensor, points: torch.Tensor, lo, spacing: float,
                 padding: str = "border", mode: str = "bilinear") -> torch.Tensor:
    """Trilinearly sample field (C, a, b, c) on a lattice (origin lo, spacing) at points (..., 3) -> (..., C)."""
    lo = torch.as_tensor(lo, dtype=points.dtype, device=points.device)
    shape = field.shape[1:]
    g = _to_grid_coords(points, lo, spacing, shape).reshape(1, 1, 1, -1, 3)
    out = F.grid_sample(field[None], g, mode=mode, padding_mode=padding, align_corners=True)
    return out.reshape(field.shape[0], -1).T.reshape(*points.shape[:-1], field.shape[0])


def lattice_points(lo, spacing: float, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
    """Positions (a, b, c, 3) of a regular lattice."""
    axes = [torch.arange(n, dtype=dtype) * spacing + float(o) for n, o in zip(shape, lo)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def _gaussian_smooth(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (C, a, b, c) in lattice units, edges replicated."""
    if sigma <= 0:
        return field
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=field.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    c = field.shape[0]
    out = field[None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 2 * r + 1
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = r
        pad[2 * (2 - axis) + 1] = r
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k.reshape(shape).expand(c, 1, *shape[2:]), groups=c)
    return out[0]


def random_velocity(generator: torch.Generator, lattice_shape: Sequence[int], spacing: float,
                    control_spacing: float, std_mm: float) -> torch.Tensor:
    """Smooth random velocity (3, a, b, c) in mm: white noise on a control lattice, upsampled, blurred.

    The blur after upsampling removes the trilinear kinks so the field (and its Jacobian) is smooth.
    """
    ctrl = [max(2, int(math.ceil((n - 1) * spacing / control_spacing)) + 1) for n in lattice_shape]
    noise = torch.randn((3, *ctrl), generator=generator, dtype=torch.float32)
    v = F.interpolate(noise[None], size=tuple(lattice_shape), mode="trilinear", align_corners=True)[0]
    v = _gaussian_smooth(v, sigma=0.5 * control_spacing / spacing)
    # Blurring shrinks the amplitude; rescale so std_mm means what it says.
    rms = v.pow(2).mean().sqrt().clamp_min(1e-12)
    return v * (std_mm / rms)


def integrate_velocity(v: torch.Tensor, spacing: float, max_step_fraction: float = 0.25) -> torch.Tensor:
    """Displacement u (3, a, b, c) of exp(v) by scaling and squaring on the lattice of `spacing` mm."""
    vmax = float(v.abs().max()) if v.numel() else 0.0
    n = max(4, int(math.ceil(math.log2(max(vmax / (max_step_fraction * spacing), 1.0)))) + 1)
    u = v / (2 ** n)
    lo = torch.zeros(3, dtype=v.dtype)
    pts = lattice_points(lo, spacing, v.shape[1:], dtype=v.dtype)
    for _ in range(n):
        moved = pts + u.permute(1, 2, 3, 0)
        u = u + sample_field(u, moved, lo, spacing).permute(3, 0, 1, 2)
    return u


def rotation_matrix(angles_rad: Sequence[float]) -> np.ndarray:
    """R = Rz @ Ry @ Rx for rotations about the i, j, k axes."""
    a, b, c = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


class Deformation:
    """The map T(x) = c + A (x + u(x) - c) + t from output points to template points (mm).

    `u` lives on a coarse lattice (origin `lo`, `spacing`) covering the output box; evaluating it at
    any point set (a whole volume, a patch, a coarser grid) gives the same map, which is what makes a
    patch equal to the crop of the full volume.
    """

    def __init__(self, matrix, centre, translation, displacement=None, lo=(0.0, 0.0, 0.0), spacing=1.0):
        self.matrix = torch.as_tensor(np.asarray(matrix), dtype=torch.float32)
        self.centre = torch.as_tensor(np.asarray(centre), dtype=torch.float32)
        self.translation = torch.as_tensor(np.asarray(translation), dtype=torch.float32)
        self.displacement = displacement
        self.lo = torch.as_tensor(np.asarray(lo), dtype=torch.float32)
        self.spacing = float(spacing)

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        p = points
        if self.displacement is not None:
            p = p + sample_field(self.displacement, points, self.lo, self.spacing)
        return (p - self.centre) @ self.matrix.T + self.centre + self.translation


def jacobian_determinant(mapped: torch.Tensor, spacing: float) -> torch.Tensor:
    """det(dT/dx) by central differences of mapped positions (a, b, c, 3) sampled on a lattice.

    Returns (a-2, b-2, c-2): interior points only.
    """
    d = []
    for axis in range(3):
        hi = mapped.narrow(axis, 2, mapped.shape[axis] - 2)
        lo = mapped.narrow(axis, 0, mapped.shape[axis] - 2)
        g = (hi - lo) / (2 * spacing)
        sl = [slice(1, -1)] * 3
        sl[axis] = slice(None)
        d.append(g[tuple(sl)])
    jac = torch.stack(d, dim=-1)  # [..., component, derivative axis]
    return torch.linalg.det(jac.double()).float()
