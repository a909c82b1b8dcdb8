"""Feasibility check for issue 21 (2026-12-06), not part of the package: a tiny SMORE-like 2D network trained only
on the scan's own acquired slices (each degraded 8x along one in-plane axis, then B-spline back), applied on the
B-spline volume's i-k and j-k planes, against B-spline and paired-ddpm on a 64-slice slab of a tuning head at 8 mm.

    .venv/bin/python docs/experiments/smore2d_feasibility.py heldout:t2-stripped:1000021 150 [SLICES]

(CASE, training seconds, slab slices: 64 by default, 0 for the whole head.)

Prints masked PSNR over B-spline (dB) for paired-ddpm, the 2D network, and their weighted means. Results in
docs/benchmarks.md ("Learning from the scan in 2D").
"""
import sys
import time

import numpy as np
import torch
import torch.nn as nn

from MRISuperResLib.bench.cases import held_out_draw, with_slices
from MRISuperResLib.metrics import head_mask, psnr
from MRISuperResLib.physics import OperatorSpec, lr_grid
from MRISuperResLib.pipeline import super_resolve
from MRISuperResLib.priors.store import default_prior
from MRISuperResLib.volume import Volume

torch.manual_seed(0); np.random.seed(0)
spec_name = sys.argv[1] if len(sys.argv) > 1 else "heldout:t2-stripped:1000021"
F = 8
slices = int(sys.argv[3]) if len(sys.argv) > 3 else 64  # 0: the whole head
case = held_out_draw(spec_name)
hr = (with_slices(case, slices) if slices else case).load()
x = torch.as_tensor(hr.array, dtype=torch.float64)
spec = OperatorSpec.make("slice-removal", 2, F)
op = spec.bind_hr(hr.grid.shape)
y = op.forward(x).float()
lr = Volume(y.numpy(), lr_grid(hr.grid, op))
mask = head_mask(hr); dr = float(hr.array.max() - hr.array.min())
bs = super_resolve(lr, "bspline", spec, {}, None, "cpu", seed=0).volume.array
print("bspline", psnr(hr.array, bs, dr, mask))
t0 = time.time()
pd = super_resolve(lr, "paired-ddpm", spec, {}, default_prior("paired", "cpu"), "cpu", seed=0).volume.array
print("paired", psnr(hr.array, pd, dr, mask) - psnr(hr.array, bs, dr, mask), time.time() - t0)

# 2D pairs from the acquired slices: y[:, :, s] is a sharp i-j image
sl = y.numpy()  # (I, J, S)
def degrade_1d(img, axis):
    """slice removal F along `axis` of a 2D image, then cubic (B-spline) back, same as the volume operator"""
    a = np.moveaxis(img, axis, -1)[..., None]  # (..., n, 1) -> treat as 3D (rows, n, 1)
    vol = np.ascontiguousarray(np.moveaxis(a, -2, -1))  # (rows, 1, n): the degraded axis at k
    n = vol.shape[2] - vol.shape[2] % F
    vol = vol[:, :, :n]
    sp = OperatorSpec.make("slice-removal", 2, F); o = sp.bind_hr(vol.shape)
    yy = o.forward(torch.as_tensor(vol, dtype=torch.float64)).float()
    v2 = Volume(yy.numpy(), lr_grid(Volume.from_array(vol).grid, o))
    up = super_resolve(v2, "bspline", sp, {}, None, "cpu", seed=0).volume.array
    up = up[:, 0, :]; tgt = vol[:, 0, :]
    return np.moveaxis(up, -1, axis), np.moveaxis(tgt, -1, axis)

pairs = []
for s in range(sl.shape[2]):
    for axis in (0, 1):
        up, tgt = degrade_1d(sl[:, :, s], axis)
        # network convention: degraded axis = last axis (columns)
        if axis == 0:
            up, tgt = up.T, tgt.T
        pairs.append((up.astype(np.float32), tgt.astype(np.float32)))
print("pairs", len(pairs))

net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), *[m for _ in range(4) for m in (nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())],
                    nn.Conv2d(32, 1, 3, padding=1))
opt = torch.optim.Adam(net.parameters(), 1e-3)
P = 48
t0 = time.time(); step = 0
budget = float(sys.argv[2]) if len(sys.argv) > 2 else 150.0
while time.time() - t0 < budget:
    b_in, b_t = [], []
    for _ in range(16):
        up, tgt = pairs[np.random.randint(len(pairs))]
        i = np.random.randint(up.shape[0] - P + 1); j = np.random.randint(up.shape[1] - P + 1)
        b_in.append(up[i:i+P, j:j+P]); b_t.append(tgt[i:i+P, j:j+P])
    a = torch.as_tensor(np.stack(b_in))[:, None]; t = torch.as_tensor(np.stack(b_t))[:, None]
    loss = (net(a) + a - t).abs().mean()
    opt.zero_grad(); loss.backward(); opt.step(); step += 1
print("steps", step, "loss", float(loss.detach()))

def apply(vol):
    out = np.zeros_like(vol); n = 0
    with torch.no_grad():
        # planes i-k (fix j): image (I, K), degraded axis k = last -> as trained
        a = torch.as_tensor(np.ascontiguousarray(vol.transpose(1, 0, 2)))[:, None]
        out += (net(a) + a)[:, 0].numpy().transpose(1, 0, 2); n += 1
        # planes j-k (fix i): image (J, K)
        a = torch.as_tensor(np.ascontiguousarray(vol))[:, None]
        out += (net(a) + a)[:, 0].numpy(); n += 1
    return out / n
sm = apply(bs.astype(np.float32))
base = psnr(hr.array, bs, dr, mask)
print("smore2d", psnr(hr.array, sm, dr, mask) - base)
for w in (0.25, 0.5):
    print("mix", w, psnr(hr.array, (1 - w) * pd + w * sm, dr, mask) - base)
