"""GroupNorm (+ SiLU) that keeps only its input for the backward pass.

Notation: x (N, C, ...) input; groups g of C/G channels each; mu_g, rstd_g = 1 / sqrt(var_g + eps) over a group's
channels and all voxels; gamma_c, beta_c the affine weights; y = gamma_c (x - mu_g) rstd_g + beta_c; out = silu(y)
(or y, without SiLU).

Why: under bf16 autocast, eager `silu(group_norm(x))` saves an fp32 copy of x (for group_norm) and the fp32 y (for
silu): 8 bytes per element on top of the 2 of x. In the published decoder's first full-resolution residual block
(128 channels at 160 x 224 x 160) that is 5.9 GB of the 7.3 GB its recomputation holds, the largest term of the
decoder's peak (budget.py).

1. forward: for each chunk of whole groups, the kernel nn.GroupNorm itself runs (aten native_group_norm) on an
   fp32 copy of the chunk, then SiLU; the result is written into `out` in `out_dtype` (the caller passes the dtype
   the next convolution would cast to anyway).
2. saved for backward: x only (and the affine weights).
3. backward: per chunk, recompute y (fp32), dy = dout * silu'(y) with silu'(y) = s (1 + y (1 - s)), s = sigmoid(y),
   then aten native_group_norm_backward(dy, ...) -> dx (and dgamma, dbeta when they require grad).
Exact: the same kernels per group as eager, in fp32, so outputs and gradients equal eager ones to float32 rounding
(Testing/Python/test_priors_acceleration.py). Transients: a few fp32 chunks. A tensor of at most WHOLE_ELEMENTS is one
chunk (its temporaries are small, and more chunks would mean more kernel launches); a larger one is cut into chunks of
at most 1/16 of it and CHUNK_ELEMENTS, but at least one group (at the published size: one or two groups).
"""

from typing import Optional

import torch

WHOLE_ELEMENTS = 2 ** 24  # 64 MB of fp32 temporaries
CHUNK_ELEMENTS = 2 ** 25  # 128 MB


def _chunks(n_channels: int, groups: int, voxels: int, batch: int):
    per_group = n_channels // groups
    total = batch * n_channels * voxels
    limit = total if total <= WHOLE_ELEMENTS else min(CHUNK_ELEMENTS, total // 16)
    per_chunk = max(1, limit // max(1, batch * per_group * voxels))
    for g0 in range(0, groups, per_chunk):
        g1 = min(groups, g0 + per_chunk)
        yield g0 * per_group, g1 * per_group, g1 - g0


def _device_type(x: torch.Tensor) -> str:
    return x.device.type if x.device.type in ("cuda", "cpu") else "cpu"


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, silu, out_dtype):
        n, c = x.shape[:2]
        voxels = x[0, 0].numel()
        out = torch.empty_like(x, dtype=out_dtype)  # x's layout (channels-last stays channels-last)
        with torch.autocast(_device_type(x), enabled=False):
            for c0, c1, g in _chunks(c, groups, voxels, n):
                # contiguous: the kernel needs it, and a channel slice of a channels-last x is not (the CPU loads
                # priors channels-last, priors/folder.py)
                xc = x[:, c0:c1].float().contiguous()
                y = torch.ops.aten.native_group_norm(xc, _part(weight, c0, c1), _part(bias, c0, c1), n, c1 - c0,
                                                     voxels, g, eps)[0]
                out[:, c0:c1] = torch.nn.functional.silu(y, inplace=True) if silu else y
        ctx.save_for_backward(x, weight, bias)
        ctx.groups, ctx.eps, ctx.silu = groups, eps, silu
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        n, c = x.shape[:2]
        voxels = x[0, 0].numel()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = torch.empty_like(x) if need_x else None
        dw = torch.zeros(c, dtype=torch.float32, device=x.device) if need_w and weight is not None else None
        db = torch.zeros(c, dtype=torch.float32, device=x.device) if need_b and bias is not None else None
        with torch.autocast(_device_type(x), enabled=False):
            for c0, c1, g in _chunks(c, ctx.groups, voxels, n):
                xc = x[:, c0:c1].float().contiguous()
                wc, bc = _part(weight, c0, c1), _part(bias, c0, c1)
                y, mean, rstd = torch.ops.aten.native_group_norm(xc, wc, bc, n, c1 - c0, voxels, g, ctx.eps)
                dy = dout[:, c0:c1].float()
                if ctx.silu:  # y <- silu'(y) = s (1 + y (1 - s)) = s (1 + y - y s), in place: few temporaries
                    s = torch.sigmoid(y)
                    ys = y * s
                    y.sub_(ys).add_(1.0).mul_(s)
                    del s, ys
                    dy = dy * y
                del y
                gx, gw, gb = torch.ops.aten.native_group_norm_backward(
                    dy.contiguous(), xc, mean, rstd, wc, n, c1 - c0, voxels, g,
                    [need_x, dw is not None, db is not None])
                if dx is not None:
                    dx[:, c0:c1] = gx
                if dw is not None:
                    dw[c0:c1] = gw
                if db is not None:
                    db[c0:c1] = gb
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(bias.dtype)
        return dx, dw, db, None, None, None, None


def _part(t: Optional[torch.Tensor], c0: int, c1: int) -> Optional[torch.Tensor]:
    return None if t is None else t[c0:c1].float()


def group_norm_silu(x: torch.Tensor, norm: torch.nn.GroupNorm, silu: bool = True,
                    out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """silu(norm(x)) (or norm(x)), saving only x for backward; see the module docstring.

    out_dtype: default x's dtype, or autocast's dtype when autocast is on for x's device (the dtype the following
    convolution casts to, so its values are those of eager autocast).
    """
    if out_dtype is None:
        dev = _device_type(x)
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    return _GroupNormSiLU.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu, out_dtype)
