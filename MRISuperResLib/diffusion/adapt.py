"""Subject-adaptive fine-tuning: a paired model learns the run's degradation from the scan's own in-plane detail.

A thick-slice scan is sharp within each slice. Degrading it along an in-plane axis with the run's own operator
gives LR/HR pairs of this very subject, in its contrast and intensity scale (SMORE's idea, Zhao et al. 2020;
brain anatomy is taken to be about alike in every direction). A copy of the shipped paired UNet is fine-tuned
on them before sampling; the shipped weights are never touched.

Notation: y the LR input (diffusion units, its own grid), a the degraded axis, f its factor, V = B-spline
upsampling of y onto the HR grid (sharp along the in-plane axes, smooth along a), b an in-plane axis (b != a),
A_b the run's operator (kind, factor, profile) acting along b.

1. a pair: a block of V of patch + 2 margin voxels around a random voxel of the head; hr = block,
   up = B-spline(A_b hr) along b; the centre patch of both (the margin keeps borders like the inside)
2. show the pair as sampling shows the scan: flipped and turned into the prior's training orientation with b at
   k (orientation.network_view, as paired-ddpm's patch view does with the thick axis); mirrored left-right at
   random, as sampling mirrors half of its samples. No other flips or swaps: a patch network learns the anatomy's
   orientation (upside-down inputs lost 0.23 dB), so pairs in orientations sampling never shows would spend the few
   steps on them
3. Adam on a copy of the UNet, the paired loss at the sampling chain's own timesteps (diffusion/paired_model.py), the
   learning rate decaying to zero on a half cosine over the budget
4. stop after `steps` steps or `seconds`, whichever comes first
"""

import copy
import math
import time
import warnings
from typing import List, Optional, Sequence

import torch

from ..errors import InputError
from ..orientation import apply_reorientation, network_view
from ..physics import OperatorSpec
from .paired_model import PairedModel, condition_vector, paired_loss

SELF_PAIR_KINDS = ("slice-removal", "thick-slice")
# The in-plane pairs teach the mapping from f x s to s (s the in-plane spacing); the run needs the mapping from
# its thick spacing to the HR spacing along a. They are the same mapping only when the HR grid is about isotropic.
MAX_SPACING_RATIO = 1.5


def why_not_adaptable(physics) -> Optional[str]:
    """None when the scan holds in-plane detail finer than its thick axis at the run's factor, else the reason."""
    if len(physics.axes) != 1:
        return "%s degrades several axes, so no axis of the input is sharper than the others" % physics.spec.kind
    if physics.spec.kind not in SELF_PAIR_KINDS:
        return "pairs are made for thick slices and slice removal, not %s" % physics.spec.kind
    a = physics.axes[0]
    spacing = getattr(physics, "hr_spacing", None)
    if spacing is not None:
        inplane = [spacing[b] for b in range(3) if b != a]
        ratio = max(inplane) / spacing[a]
        if ratio > MAX_SPACING_RATIO or ratio < 1.0 / MAX_SPACING_RATIO:
            return ("its in-plane spacing (%s mm) is not the output spacing along the thick axis (%.3g mm): the "
                    "slices hold no detail at the scale to restore" % (" x ".join("%.3g" % s for s in inplane),
                                                                        spacing[a]))
    return None


def degrade_along(block: torch.Tensor, spec: OperatorSpec, axis: int) -> torch.Tensor:
    """B-spline upsampling of `spec`'s degradation applied along `axis` of block (i, j, k) instead of its own axis."""
    f = spec.factors[spec.axes[0]]
    along = OperatorSpec.make(spec.kind, axis=int(axis), factor=f, profile=spec.profile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a factor not dividing the block only shifts its last sample
        op = along.bind_hr(tuple(block.shape))
    return op.upsample(op.forward(block), "cubic")


class ScanPairs:
    """LR/HR training pairs drawn from one scan's in-plane detail (module docstring, steps 1-2)."""

    def __init__(self, volume: torch.Tensor, physics, patch: Sequence[int], margin: int = 8,
                 floor: float = -0.9, trained_direction=None):
        """volume: V, the B-spline upsampled input on the HR grid, diffusion units; floor: voxels above it are head;
        trained_direction: the prior's training grid direction (its card), None when unknown (then b only trades
        places with k)."""
        reason = why_not_adaptable(physics)
        if reason:
            raise InputError("This scan cannot teach the model: %s." % reason,
                             "Turn adaptation off (adapt=false), or give the operator of a thick-slice acquisition.")
        # Held in the network's view with the thick axis at k (as sampling shows the scan), so the pairs, their
        # draws and so the fine-tuned weights do not depend on how the scan is stored
        perm, flips, codes = network_view(trained_direction, getattr(physics, "hr_direction", None), physics.axes[0])
        self.volume = apply_reorientation(volume.detach().to("cpu", torch.float32), perm, flips).contiguous()
        self.spec = physics.spec
        self.inplane = [0, 1]
        # the view's left-right axis, None when the grid's direction is unknown
        self.left_right = [c in "LR" for c in codes["network"]].index(True) if codes else None
        self.patch = int(max(patch))
        self.margin = int(margin)
        big = self.patch + 2 * self.margin
        if min(self.volume.shape) < big:
            self.margin = max(0, (min(self.volume.shape) - self.patch) // 2)
            big = self.patch + 2 * self.margin
        if min(self.volume.shape) < big:
            raise InputError("The scan (%s voxels on the output grid) is smaller than one %d^3 training patch."
                             % ("x".join(str(n) for n in self.volume.shape), self.patch),
                             "Turn adaptation off (adapt=false) for volumes this small.")
        self.big = big
        # Centres drawn among head voxels far enough from the borders for a whole block
        lo, hi = big // 2, [n - (big - big // 2) for n in self.volume.shape]
        inner = self.volume[lo:hi[0] + 1, lo:hi[1] + 1, lo:hi[2] + 1]
        centres = (inner > floor).nonzero()
        if centres.shape[0] == 0:
            centres = torch.ones_like(inner, dtype=torch.bool).nonzero()
        self.centres = centres + lo
        factors = [1.0, 1.0, self.spec.factors[physics.axes[0]]]
        self.cond = condition_vector(self.spec.kind, self.spec.profile, factors)

    def pair(self, b: int, centre: Sequence[int]):
        """(hr, up) of the patch centred at `centre` degraded along in-plane axis b (both in the thick axis's view,
        `self.volume`), b then trading places with k as the network view does for a scan thick along b."""
        c = [int(x) - self.big // 2 for x in centre]
        block = self.volume[tuple(slice(s, s + self.big) for s in c)].double()
        up = degrade_along(block, self.spec, b)
        inner = tuple(slice(self.margin, self.margin + self.patch) for _ in range(3))
        return block[inner].transpose(b, 2).float(), up[inner].transpose(b, 2).float()

    def mirror_axis(self, b: int) -> Optional[int]:
        """The left-right axis of b's pairs (b and k swapped); None when it is unknown or k, their degraded axis
        (sampling does not mirror a scan whose thick axis is left-right either)."""
        if self.left_right is None:
            return None
        lr = {b: 2, 2: b}.get(self.left_right, self.left_right)
        return None if lr == 2 else lr

    def draw(self, n: int, generator: torch.Generator):
        """(hr, up, cond): (n, 1, p, p, p) and (n, len(CONDITION_NAMES)), augmented (step 2)."""
        hrs, ups = [], []
        for _ in range(int(n)):
            b = self.inplane[int(torch.randint(0, 2, (1,), generator=generator))]
            centre = self.centres[int(torch.randint(0, self.centres.shape[0], (1,), generator=generator))]
            hr, up = self.pair(b, centre.tolist())
            lr = self.mirror_axis(b)
            if lr is not None and bool(torch.rand(1, generator=generator) < 0.5):
                hr, up = hr.flip(lr), up.flip(lr)
            hrs.append(hr)
            ups.append(up)
        return (torch.stack(hrs)[:, None].contiguous(), torch.stack(ups)[:, None].contiguous(),
                self.cond.expand(int(n), -1).clone())


def adapt(model: PairedModel, pairs: ScanPairs, timesteps: List[int], generator: torch.Generator,
          steps: int, seconds: float = 0.0, lr: float = 1e-4, batch: int = 4, progress=None,
          clock=time.monotonic) -> tuple:
    """A fine-tuned copy of `model` (module docstring, steps 3-4) and a record of what was done.

    The loss draws t only from `timesteps` (the chain that will sample), so the few steps a CPU affords all train
    the estimates sampling uses. `seconds` > 0 ends it early; `steps` bounds it, so a run is repeatable.
    """
    unet = copy.deepcopy(model.unet)
    dev = next(unet.parameters()).device
    unet.train().requires_grad_(True)
    tuned = PairedModel(unet, model.patch, model.residual_scale, model.alpha_bar, model.prediction)
    opt = torch.optim.Adam(unet.parameters(), lr=float(lr))
    t0, losses, done = clock(), [], 0
    with torch.enable_grad():  # the caller samples under no_grad
        for step in range(1, int(steps) + 1):
            # Why decay: single small batches of one scan make the last weights wander (measured: +-0.3 dB between
            # checkpoints 25 steps apart at a constant rate); a rate that ends at zero settles them.
            used = max((step - 1) / int(steps), (clock() - t0) / seconds if seconds else 0.0)
            for group in opt.param_groups:
                group["lr"] = float(lr) * 0.5 * (1.0 + math.cos(math.pi * min(used, 1.0)))
            hr, up, cond = (t.to(dev) for t in pairs.draw(batch, generator))
            loss, _ = paired_loss(tuned, hr, up, cond, generator, timesteps=timesteps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            done = step
            elapsed = clock() - t0
            if progress is not None:
                # with a time budget the step count that fits it is the total (so the bar and its ETA are right)
                total = int(steps) if not seconds else max(step, min(int(steps), int(step * seconds / max(elapsed, 1e-6))))
                progress(step, total, "learning from this scan, step %d of %d" % (step, total), loss=losses[-1])
            if seconds and elapsed >= seconds:
                break
    unet.eval().requires_grad_(False)
    first = sum(losses[:10]) / max(len(losses[:10]), 1)
    last = sum(losses[-10:]) / max(len(losses[-10:]), 1)
    return tuned, {"steps": done, "seconds": round(clock() - t0, 2), "batch": int(batch), "lr": float(lr),
                   "loss_first": round(first, 5), "loss_last": round(last, 5)}
