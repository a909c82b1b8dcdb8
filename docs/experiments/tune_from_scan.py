"""Tuning `paired-ddpm`'s learning from the scan (issue 21, 2026-12-06), not part of the package: on one tuning head,
the diffusion model alone (adapt off, default settings), then the 2D network of MRISuperResLib/priors/from_scan.py
trained for each step count, scored alone and blended with the diffusion output at several weights.

    .venv/bin/python docs/experiments/tune_from_scan.py heldout:t1:1000001 sr8 1000,2000 [CACHE_DIR]

(CASE as `bench --cases`, never a gate seed; sr8 | sr4 | ts5; step counts.) Prints one JSON line: masked PSNR over
B-spline (dB) of paired-ddpm, the 2D network ("2d") and the blends ("w0.6": weight 0.6 on the 2D network), and the
network's own score on its held-out slices ("val"). The diffusion output is cached in CACHE_DIR. Results in
docs/benchmarks.md ("Learning from the scan").
"""
import json
import os
import sys
import time

import numpy as np
import torch
from held_out_case import degraded

from MRISuperResLib.intensity import robust_scale
from MRISuperResLib.metrics import psnr
from MRISuperResLib.pipeline import super_resolve
from MRISuperResLib.priors.from_scan import apply_through_plane, learn_from_slices, sample_phase
from MRISuperResLib.priors.store import default_prior

name, deg = sys.argv[1], sys.argv[2]
step_counts = [int(s) for s in sys.argv[3].split(",")]
cache_dir = sys.argv[4] if len(sys.argv) > 4 else "."
hr, spec, op, y, lr, mask, dr = degraded(name, deg)
base = psnr(hr.array, super_resolve(lr, "bspline", spec, {}, None, "cpu", seed=0).volume.array, dr, mask)
cache = os.path.join(cache_dir, "%s_%s_paired.npy" % (name.replace(":", "_"), deg))
if os.path.exists(cache):
    paired = np.load(cache)
else:
    paired = super_resolve(lr, "paired-ddpm", spec, {"adapt": "off"}, default_prior("paired", "cpu"), "cpu",
                           seed=0).volume.array
    np.save(cache, paired)
result = {"case": name, "deg": deg, "paired": round(psnr(hr.array, paired, dr, mask) - base, 3), "runs": []}
scale = robust_scale(y)
yn = scale.to_prior(y)
upsampled = op.upsample(yn, "cubic")
for steps in step_counts:
    t0 = time.time()
    net, record = learn_from_slices(yn, spec, 2, torch.Generator().manual_seed(0), steps, 0.0, -0.98)
    seconds = time.time() - t0
    estimate = scale.to_input(apply_through_plane(net, upsampled, 2, sample_phase(op, 2))).numpy()
    run = {"steps": steps, "train_s": round(seconds), "val": record["validation_gain_db"],
           "2d": round(psnr(hr.array, estimate, dr, mask) - base, 3)}
    for w in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        run["w%.1f" % w] = round(psnr(hr.array, (1 - w) * paired + w * estimate, dr, mask) - base, 3)
    result["runs"].append(run)
print(json.dumps(result))
