"""Does `paired-ddpm`'s uncertainty map say where the output is wrong once it learns from the scan (issue 21,
2026-12-06)? Not part of the package. On one tuning head: the diffusion model alone (adapt off, default settings,
its samples' spread), the 2D network of MRISuperResLib/priors/from_scan.py (its two families of planes), their
blend at `adapt_weight` w, and three maps of it:

- "diffusion": (1 - w) x the diffusion samples' spread (the map shipped before this experiment);
- "network": w x the spread of the network's two answers (|a0 - a1| / sqrt 2, the samples' std of two);
- "both": the root sum of squares of the two.

    .venv/bin/python docs/experiments/uncertainty_from_scan.py heldout:t1:1000002 sr8 [CACHE_DIR]

Prints one JSON line per map, inside the head mask, against the blend's absolute error |e|: Spearman's rank
correlation (does the map rank the voxels by error?), RMS |e| / RMS map (1: calibrated in size) and the share of
voxels with |e| <= 1.96 map (0.95 for a calibrated Gaussian). Then one line of masked PSNR over B-spline (dB): the
blend at w, and blends weighted voxel by voxel by the two spreads' inverse variances, w_v = k s_d^2 / (k s_d^2 +
s_n^2) (s_d the diffusion samples' spread, s_n the network's), for several k. Results in docs/benchmarks.md.
"""
import json
import os
import sys

import numpy as np
import torch
from held_out_case import degraded

from MRISuperResLib.intensity import robust_scale
from MRISuperResLib.metrics import psnr
from MRISuperResLib.pipeline import super_resolve
from MRISuperResLib.priors.from_scan import learn_from_slices, sample_phase, through_plane_answers
from MRISuperResLib.priors.store import default_prior


def ranks(v):
    r = np.empty(v.size)
    r[np.argsort(v, kind="stable")] = np.arange(v.size)
    return r


def scores(name, u, err):
    rho = float(np.corrcoef(ranks(u), ranks(err))[0, 1])
    return {"map": name, "spearman": round(rho, 3),
            "rms_ratio": round(float(np.sqrt((err ** 2).mean() / max((u ** 2).mean(), 1e-12))), 3),
            "coverage_1.96": round(float((err <= 1.96 * u).mean()), 3)}


name, deg = sys.argv[1], sys.argv[2]
cache_dir = sys.argv[3] if len(sys.argv) > 3 else "."
w = 0.8
hr, spec, op, y, lr, mask, dr = degraded(name, deg)
cache = os.path.join(cache_dir, "%s_%s_paired_std.npz" % (name.replace(":", "_"), deg))
if os.path.exists(cache):
    stored = np.load(cache)
    paired, spread = stored["mean"], stored["std"]
else:
    run = super_resolve(lr, "paired-ddpm", spec, {"adapt": "off"}, default_prior("paired", "cpu"), "cpu", seed=0)
    paired, spread = run.volume.array, run.extras["uncertainty"].array
    np.savez(cache, mean=paired, std=spread)
scale = robust_scale(y)
yn = scale.to_prior(y)
net, record = learn_from_slices(yn, spec, 2, torch.Generator().manual_seed(0), 3000, 0.0, -0.98)
answers = scale.to_input(through_plane_answers(net, op.upsample(yn, "cubic"), 2, sample_phase(op, 2))).numpy()
blend = (1 - w) * paired + w * answers.mean(0)
err = np.abs(hr.array - blend)[mask]
u_diffusion = ((1 - w) * spread)[mask]
u_network = (w * np.abs(answers[0] - answers[1]) / np.sqrt(2.0))[mask]
for label, u in (("diffusion", u_diffusion), ("network", u_network),
                 ("both", np.sqrt(u_diffusion ** 2 + u_network ** 2))):
    print(json.dumps(dict(scores(label, u, err), case=name, deg=deg)))

base = psnr(hr.array, super_resolve(lr, "bspline", spec, {}, None, "cpu", seed=0).volume.array, dr, mask)
row = {"case": name, "deg": deg, "fixed_w": round(psnr(hr.array, blend, dr, mask) - base, 3)}
s_d2, s_n2 = spread ** 2, (answers[0] - answers[1]) ** 2 / 2.0
for k in (1, 4, 16, 64, 256):
    w_v = k * s_d2 / np.maximum(k * s_d2 + s_n2, 1e-12)
    row["ivw_k%d" % k] = round(psnr(hr.array, (1 - w_v) * paired + w_v * answers.mean(0), dr, mask) - base, 3)
    row["ivw_k%d_mean_w" % k] = round(float(w_v[mask].mean()), 3)
print(json.dumps(row))
