"""Sliding window with overlap blending: run a patch network over a whole volume.

1. per spatial axis, patch corners 0, s, 2s, ..., n - p (stride s = p * (1 - overlap), the last flush with the end)
2. each patch's output is weighted by a separable window w(u) = sin(pi (u + 1/2) / p)^2 + floor (> 0 everywhere)
3. output = sum_patches w * f(patch) / sum_patches w
An f that is the identity on every patch gives back the input (up to rounding), whatever the overlap.
Inputs smaller than a patch are padded (replicate) and the output is cropped back.
"""

import math
from typing import Callable, List, Sequence

import torch
import torch.nn.functional as F

_FLOOR = 1e-3  # keeps the blend defined at volume borders covered by one patch edge only


def corners(n: int, p: int, overlap: float) -> List[int]:
    """Patch starts along one axis of size n >= p."""
    if n <= p:
        return [0]
    stride = max(1, int(round(p * (1.0 - overlap))))
    starts = list(range(0, n - p + 1, stride))
    if starts[-1] != n - p:
        starts.append(n - p)
    return starts


def window(patch: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    w = None
    for p in patch:
        u = torch.arange(p, device=device, dtype=dtype)
        v = torch.sin(math.pi * (u + 0.5) / p) ** 2 + _FLOOR
        w = v if w is None else w[..., None] * v
    return w


def sliding_window(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, patch: Sequence[int],
                   overlap: float = 0.25, batch: int = 4) -> torch.Tensor:
    """Apply fn to overlapping patches of x (B, C, *spatial) and blend; fn maps (b, C, *patch) -> (b, C', *patch)."""
    patch = tuple(int(p) for p in patch)
    nd = len(patch)
    if x.ndim != nd + 2:
        raise ValueError("x must be (B, C, %s), got %s" % (", ".join("n%d" % a for a in range(nd)), tuple(x.shape)))
    if not 0.0 <= overlap < 1.0:
        raise ValueError("overlap must be in [0, 1)")
    spatial = tuple(x.shape[2:])
    pad = [max(0, p - n) for p, n in zip(patch, spatial)]
    if any(pad):
        flat = []
        for a in reversed(range(nd)):
            flat += [0, pad[a]]
        mode = "replicate" if nd in (2, 3) else "constant"
        x = F.pad(x, flat, mode=mode)
    full = tuple(x.shape[2:])
    starts = [corners(n, p, overlap) for n, p in zip(full, patch)]
    grid = [[]]
    for s in starts:
        grid = [g + [c] for g in grid for c in s]
    w = window(patch, x.device, x.dtype)
    out, norm = None, torch.zeros(full, device=x.device, dtype=x.dtype)
    bsz = x.shape[0]
    for i in range(0, len(grid), max(1, int(batch))):
        chunk = grid[i:i + max(1, int(batch))]
        sls = [tuple(slice(c, c + p) for c, p in zip(corner, patch)) for corner in chunk]
        inp = torch.cat([x[(slice(None), slice(None)) + sl] for sl in sls], 0)
        res = fn(inp)
        if out is None:
            out = torch.zeros((bsz, res.shape[1]) + full, device=x.device, dtype=res.dtype)
        for n, sl in enumerate(sls):
            out[(slice(None), slice(None)) + sl] += res[n * bsz:(n + 1) * bsz] * w
            norm[sl] += w
    out = out / norm
    return out[(slice(None), slice(None)) + tuple(slice(0, n) for n in spatial)]
