"""Differentiable resampling between two grids related by an affine map (the native-space link).

Notation: `src` is the grid the image x lives on (e.g. the prior's grid), `dst` the grid we want it
on (e.g. the input's native HR grid), and `T` a 4x4 affine taking physical points of `dst` to
physical points of `src` (the registration's transform). Then

    R x (q) = x( src^-1( T( dst(q) ) ) )      trilinear, zero outside src (plus a support mask),

with `dst(q)` the physical point of dst voxel q. R is linear in x; its adjoint is the scatter
that torch's autograd gives for grid_sample (`adjoint` uses it, exact to float precision).
Shapes: x (..., n_i, n_j, n_k) on src, R x (..., d_i, d_j, d_k) on dst; axes i, j, k.
No pseudo-inverse: R is not injective in general.
"""

import numpy as np
import torch
import torch.nn.functional as F

from ..volume import Grid


def index_to_physical_matrix(grid: Grid) -> np.ndarray:
    """4x4 matrix taking homogeneous (i, j, k, 1) to physical (x, y, z, 1)."""
    m = np.eye(4)
    m[:3, :3] = grid.direction_matrix * np.asarray(grid.spacing)[None, :]
    m[:3, 3] = grid.origin
    return m


class AffineResample:
    """R: images on `src` -> images on `dst`, through the physical affine `dst_to_src` (4x4)."""

    def __init__(self, src: Grid, dst: Grid, dst_to_src=None):
        self.src, self.dst = src, dst
        t = np.eye(4) if dst_to_src is None else np.asarray(dst_to_src, dtype=np.float64)
        # dst index -> src index, one 4x4 matrix: the whole map is affine.
        self.index_map = np.linalg.inv(index_to_physical_matrix(src)) @ t @ index_to_physical_matrix(dst)
        self._grid_cache = {}

    @property
    def hr_shape(self):
        return self.src.shape

    @property
    def lr_shape(self):
        return self.dst.shape

    def _grid(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in self._grid_cache:
            m = torch.as_tensor(self.index_map, dtype=torch.float64)
            axes = [torch.arange(n, dtype=torch.float64) for n in self.dst.shape]
            q = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)  # (d_i, d_j, d_k, 3)
            p = q @ m[:3, :3].T + m[:3, 3]  # src continuous index (i, j, k)
            size = torch.as_tensor(self.src.shape, dtype=torch.float64)
            norm = 2.0 * p / (size - 1).clamp(min=1) - 1.0
            # grid_sample wants (x, y, z) = (last, middle, first) tensor dims = (k, j, i)
            self._grid_cache[key] = norm.flip(-1).unsqueeze(0).to(like.device, like.dtype)
        return self._grid_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-3]
        flat = x.reshape((1, -1) + tuple(x.shape[-3:]))
        out = F.grid_sample(flat, self._grid(x), mode="bilinear", padding_mode="zeros", align_corners=True)
        return out.reshape(tuple(lead) + tuple(self.dst.shape))

    __call__ = forward

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = torch.zeros(tuple(y.shape[:-3]) + tuple(self.src.shape), dtype=y.dtype, device=y.device,
                            requires_grad=True)
            (g,) = torch.autograd.grad(self.forward(x), x, grad_outputs=y)
        return g

    def support(self, like: torch.Tensor) -> torch.Tensor:
        """1 where a dst voxel maps inside the src grid, 0 outside (same interpolation as forward)."""
        return self.forward(torch.ones(self.src.shape, dtype=like.dtype, device=like.device))


class Composed:
    """A after R: x on the prior's grid -> native HR grid -> native LR measurement."""

    def __init__(self, outer, inner):
        self.outer, self.inner = outer, inner

    @property
    def hr_shape(self):
        return self.inner.hr_shape

    @property
    def lr_shape(self):
        return self.outer.lr_shape

    def forward(self, x):
        return self.outer.forward(self.inner.forward(x))

    __call__ = forward

    def adjoint(self, y):
        return self.inner.adjoint(self.outer.adjoint(y))
