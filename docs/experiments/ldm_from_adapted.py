"""Does `inversesr-ldm` gain from starting at `paired-ddpm`'s output learnt from the scan instead of at the B-spline
input (issue 21, point 4; 2026-12-06)? Not part of the package. On one tuning head: paired-ddpm with its defaults
(learning from the scan), inversesr-ldm with its defaults, and inversesr-ldm whose start (the volume it encodes
and noises, SDEdit-like, and its fill outside the prior's field of view) is the paired output instead.

    .venv/bin/python docs/experiments/ldm_from_adapted.py heldout:t1:1000002 sr8

Prints one JSON line: masked PSNR over B-spline (dB) and SSIM of each. The start is swapped by handing the solver
an operator whose first cubic upsampling returns it; nothing else of the method changes.
"""
import json
import sys

import numpy as np
import torch
from held_out_case import degraded

from MRISuperResLib.intensity import card_map
from MRISuperResLib.methods.registry import get_method
from MRISuperResLib.metrics import psnr, ssim
from MRISuperResLib.pipeline import super_resolve
from MRISuperResLib.priors.store import default_prior


class StartsAt:
    """The run's operator, except that its first cubic upsampling (the solver's start) is `start`."""

    def __init__(self, physics, start):
        self._physics, self._start = physics, start

    def upsample(self, v, method="linear", *args, **kwargs):
        if method == "cubic" and self._start is not None:
            start, self._start = self._start, None
            assert start.shape == v.shape[:-3] + tuple(self._physics.hr_shape), "the input is not on the prior's grid"
            return start.to(v.device, v.dtype)
        return self._physics.upsample(v, method, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._physics, name)


name, deg = sys.argv[1], sys.argv[2]
hr, spec, op, y, lr, mask, dr = degraded(name, deg)
row = {"case": name, "deg": deg}
bspline = super_resolve(lr, "bspline", spec, {}, None, "cpu", seed=0).volume.array
base = psnr(hr.array, bspline, dr, mask)
paired = super_resolve(lr, "paired-ddpm", spec, {}, default_prior("paired", "cpu"), "cpu", seed=0).volume.array
ldm_prior = default_prior("ldm", "cpu")
runs = {"bspline": bspline, "paired-ddpm": paired,
        "inversesr-ldm": super_resolve(lr, "inversesr-ldm", spec, {}, ldm_prior, "cpu", seed=0).volume.array}
method = get_method("inversesr-ldm")
solve = method.solve
imap = card_map(y, ldm_prior.card.get("intensity") or {})
start = imap.to_prior(torch.as_tensor(paired))
object.__setattr__(method, "solve", lambda y_, physics, *rest: solve(y_, StartsAt(physics, start), *rest))
try:
    runs["inversesr-ldm from paired"] = super_resolve(lr, "inversesr-ldm", spec, {}, ldm_prior, "cpu",
                                                      seed=0).volume.array
finally:
    object.__setattr__(method, "solve", solve)
for label, x in runs.items():
    row[label] = {"db": round(psnr(hr.array, x, dr, mask) - base, 3),
                  "ssim": round(float(ssim(hr.array, np.asarray(x), dr)), 4)}
print(json.dumps(row))
