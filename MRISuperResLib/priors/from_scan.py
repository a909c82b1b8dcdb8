"""A prior learnt from the scan itself: a small 2D network that restores the thick axis, trained in a few minutes
on a CPU on the scan's own acquired slices (the idea of SMORE, Zhao et al. 2020: brain anatomy is about alike in
every direction, so what a slice loses through-plane can be taught by degrading the slices in-plane).

Notation: y the LR input (prior units), a its thick axis, f the factor, A the run's operator (kind, factor,
profile); b, c the in-plane axes; y_s the acquired slices, images over (b, c) at the HR spacing.

1. pairs: every y_s degraded along b by A (same kind, factor and profile) and B-spline back along b, the target
   y_s itself; the same along c. Each shown with its degraded axis last, the network's convention, and with its
   phase: for each position along that axis, its distance to the nearest sample of A (sample_phase). One slice in
   VALIDATION_EVERY is held out of training to measure the network (step 4).
2. a residual CNN (DEPTH 3x3 convolutions of WIDTH channels, the hidden ones dilated by DILATIONS) takes the image
   and its phase and learns target - input with a squared-error loss: Adam, random PATCH^2 crops of the head
   flipped at random along either axis, the learning rate decaying to zero on a half cosine; it stops after `steps`
   steps or `seconds`, whichever comes first.
3. applied to the B-spline upsampled volume's (b, a) and (c, a) planes, a last, with the phase of the run's own
   samples along a; the mean of both answers.
4. scored on the held-out slices' pairs: masked PSNR over their B-spline input (the record's `validation_gain_db`).

Axes are ITK index axes throughout; pure torch, no MONAI (a network this small needs none).
"""

import math
import time
import warnings
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ..physics import OperatorSpec

SELF_PAIR_KINDS = ("slice-removal", "thick-slice")
# The in-plane pairs teach the mapping from f x s to s (s the in-plane spacing); the run needs the mapping from
# its thick spacing to the HR spacing along a. They are the same mapping only when the HR grid is about isotropic.
MAX_SPACING_RATIO = 1.5
# Measured on whole tuning heads at 8 mm (docs/benchmarks.md, "Learning from the scan in 2D"). Why dilations: a
# voxel midway between two slices 8 mm apart is restored from the anatomy around both, which plain 3x3 layers of
# this depth barely reach (13 voxels across); dilated ones see 29 at the same cost, and the network alone gained
# 0.47-0.58 dB through-plane.
DEPTH, WIDTH, DILATIONS, PATCH, BATCH, LR = 6, 32, (1, 2, 4, 2, 1), 48, 16, 1e-3
VALIDATION_EVERY = 7
PLANES_PER_CALL = 8  # planes per network call when applying: bounds memory on a whole brain


def why_not_adaptable(physics) -> Optional[str]:
    """None when the scan holds in-plane detail at the scale its thick axis lost, else the reason."""
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


def degrade_along(images: torch.Tensor, spec: OperatorSpec, axis: int) -> torch.Tensor:
    """B-spline upsampling of `spec`'s degradation applied along `axis` (0, 1 or 2) of a 3D stack instead of the
    spec's own axis: the same kind, factor and slice profile."""
    op = _along(spec, axis, images.shape)
    return op.upsample(op.forward(images), "cubic")


def _along(spec: OperatorSpec, axis: int, shape):
    f = spec.factors[spec.axes[0]]
    along = OperatorSpec.make(spec.kind, axis=int(axis), factor=f, profile=spec.profile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a factor not dividing the size only makes the last block partial
        return along.bind_hr(tuple(shape))


def sample_phase(op, axis: int) -> torch.Tensor:
    """For each HR position along `axis` of the bound operator `op`, its distance to the nearest LR sample's
    centre, in factors, mapped to [-1, 1] (-1 on a sample, 1 midway between two).

    Why: a CNN is blind to where it stands, and on the B-spline input a voxel on an acquired slice is data while
    one midway is a guess; told the phase, the network alone restored 0.2-0.3 dB more through-plane at 8 mm.
    """
    m = torch.as_tensor(op.matrices()[int(axis)], dtype=torch.float64)  # (LR, HR)
    centres = (m @ torch.arange(m.shape[1], dtype=torch.float64)) / m.sum(1)
    distance = (torch.arange(m.shape[1], dtype=torch.float64)[:, None] - centres[None]).abs().min(1).values
    return (4.0 * distance / float(op.factors[int(axis)]) - 1.0).float()


def slice_pairs(y: torch.Tensor, spec: OperatorSpec, axis: int):
    """(inputs, targets, phases): lists of 2D float32 images, degraded axis last (module docstring, step 1), for
    the acquired slices of y (LR grid, prior units, thick along `axis`) in the order slice, then b before c; each
    pair's phase is a 1D tensor along that last axis."""
    stack = torch.movedim(y.detach().to("cpu", torch.float64), int(axis), 0)  # (slices, b, c)
    along_b, along_c = degrade_along(stack, spec, 1), degrade_along(stack, spec, 2)
    phase_b, phase_c = (sample_phase(_along(spec, d, stack.shape), d) for d in (1, 2))
    inputs, targets, phases = [], [], []
    for s in range(stack.shape[0]):
        inputs += [along_b[s].T.float(), along_c[s].float()]
        targets += [stack[s].T.float(), stack[s].float()]
        phases += [phase_b, phase_c]
    return inputs, targets, phases


def make_network(depth: int = DEPTH, width: int = WIDTH, dilations=DILATIONS) -> nn.Module:
    """Input: (batch, 2, H, W), the image and its phase along W; output: the residual to add to the image."""
    layers, channels = [], 2
    for n in range(depth - 1):
        d = int(dilations[n]) if n < len(dilations) else 1
        layers += [nn.Conv2d(channels, width, 3, padding=d, dilation=d), nn.ReLU()]
        channels = width
    layers.append(nn.Conv2d(channels, 1, 3, padding=1))
    return nn.Sequential(*layers)


def _with_phase(images: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """(batch, 1, H, W) images and their (W,) or (batch, W) phase -> the network's (batch, 2, H, W) input."""
    p = phase.to(images.device, images.dtype)
    p = p.reshape(-1, 1, 1, images.shape[-1]) if p.dim() == 2 else p.reshape(1, 1, 1, -1)
    return torch.cat([images, p.expand(images.shape[0], 1, images.shape[2], images.shape[3])], 1)


def _crops(inputs, targets, phases, rng, n, patch, floor):
    """n random patch x patch crops (input, target, phase) of the head: a crop whose target is air everywhere is
    drawn again (up to 8 times), so the steps train on anatomy, not on a skull-stripped scan's empty background."""
    xs, ts, ps = [], [], []
    for _ in range(n):
        for _attempt in range(8):
            k = int(rng.integers(len(inputs)))
            x, t = inputs[k], targets[k]
            i, j = int(rng.integers(x.shape[0] - patch + 1)), int(rng.integers(x.shape[1] - patch + 1))
            cx, ct, cp = x[i:i + patch, j:j + patch], t[i:i + patch, j:j + patch], phases[k][j:j + patch]
            if float(ct.max()) > floor:
                break
        flips = [d for d in (0, 1) if rng.random() < 0.5]
        if flips:
            cx, ct = cx.flip(flips), ct.flip(flips)
            cp = cp.flip([0]) if 1 in flips else cp
        xs.append(cx)
        ts.append(ct)
        ps.append(cp)
    return torch.stack(xs)[:, None], torch.stack(ts)[:, None], torch.stack(ps)


def _validation_gain(net, inputs, targets, phases, floor, device) -> Optional[float]:
    """Masked PSNR gain (dB) of the network over its B-spline input on held-out pairs; None without any."""
    if not inputs:
        return None
    err_in = err_net = 0.0
    count = 0
    with torch.no_grad():
        for x, t, p in zip(inputs, targets, phases):
            mask = t > floor
            if not bool(mask.any()):
                continue
            out = (x + net(_with_phase(x[None, None].to(device), p))[0, 0].cpu())
            err_in += float(((x - t)[mask] ** 2).sum())
            err_net += float(((out - t)[mask] ** 2).sum())
            count += int(mask.sum())
    if not count or err_net <= 0.0 or err_in <= 0.0:
        return None
    return 10.0 * math.log10(err_in / err_net)


def learn_from_slices(y: torch.Tensor, spec: OperatorSpec, axis: int, generator: Optional[torch.Generator],
                      steps: int, seconds: float = 0.0, floor: float = -0.98, progress=None, clock=time.monotonic):
    """(network, record): the 2D network trained on the slices of y (thick along `axis`, degraded by `spec`'s kind,
    factor and profile; module docstring, steps 1, 2 and 4). Voxels at or below `floor` are air.

    `seconds` > 0 ends it early; `steps` bounds it, so a run is repeatable wherever the steps fit the budget.
    """
    device = y.device
    inputs, targets, phases = slice_pairs(y, spec, axis)
    n_slices = len(inputs) // 2
    held = {s for s in range(n_slices) if n_slices >= VALIDATION_EVERY and s % VALIDATION_EVERY == VALIDATION_EVERY // 2}
    train = [k for k in range(len(inputs)) if k // 2 not in held]
    valid = [k for k in range(len(inputs)) if k // 2 in held]
    # the run's seed, without drawing from its generator: sampling then sees the same noise as without adapting
    seed = int(generator.initial_seed()) % (2 ** 31 - 1) if generator is not None else 0
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the network's initial weights follow the run's seed
        net = make_network().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    tr_in, tr_t, tr_p = [inputs[k] for k in train], [targets[k] for k in train], [phases[k] for k in train]
    crop = min([PATCH] + [min(x.shape) for x in tr_in])  # square crops: the images come in both orientations
    t0, losses, done, elapsed = clock(), [], 0, 0.0
    with torch.enable_grad():  # the caller samples under no_grad
        for step in range(1, int(steps) + 1):
            # Why decay: single small batches make the last weights wander; a rate that ends at zero settles them
            used = max((step - 1) / int(steps), elapsed / seconds if seconds else 0.0)
            for group in opt.param_groups:
                group["lr"] = LR * 0.5 * (1.0 + math.cos(math.pi * min(used, 1.0)))
            x, t, p = (v.to(device) for v in _crops(tr_in, tr_t, tr_p, rng, BATCH, crop, floor))
            # Why squared error: the answer is averaged with the diffusion samples' mean and scored by PSNR; it
            # gained 0.09-0.2 dB over L1 blended on two tuning heads
            loss = (x + net(_with_phase(x, p)) - t).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            done = step
            elapsed = clock() - t0
            if progress is not None:
                # with a time budget, the step count that fits it is the total (so the bar and its ETA are right)
                total = int(steps) if not seconds else max(step, min(int(steps), int(step * seconds / max(elapsed, 1e-6))))
                progress(step, total, "learning from this scan, step %d of %d" % (step, total), loss=losses[-1])
            if seconds and elapsed >= seconds:
                break
    net.eval().requires_grad_(False)
    gain = _validation_gain(net, [inputs[k] for k in valid], [targets[k] for k in valid], [phases[k] for k in valid],
                            floor, device)
    first = sum(losses[:50]) / max(len(losses[:50]), 1)
    last = sum(losses[-50:]) / max(len(losses[-50:]), 1)
    record = {"steps": done, "seconds": round(elapsed, 2), "pairs": len(train), "held_out_slices": len(held),
              "validation_gain_db": None if gain is None else round(gain, 3),
              "loss_first": round(first, 5), "loss_last": round(last, 5)}
    return net, record


def through_plane_answers(net: nn.Module, volume: torch.Tensor, axis: int, phase: torch.Tensor) -> torch.Tensor:
    """The network's two estimates of `volume` (HR grid, B-spline upsampled along `axis`), stacked: from the planes
    (c, a) at each b, then from the planes (b, a) at each c (module docstring, step 3). Where they disagree the
    network is unsure. `phase`: sample_phase of the run's operator along `axis`, in the volume's storage."""
    device = next(net.parameters()).device
    v = torch.movedim(volume, axis, -1)  # (b, c, a)
    out = torch.empty((2,) + tuple(v.shape), dtype=v.dtype, device=v.device)
    with torch.no_grad():
        for family in (0, 1):
            planes = v if family == 0 else v.transpose(0, 1)
            answer = out[family] if family == 0 else out[family].transpose(0, 1)
            for s in range(0, planes.shape[0], PLANES_PER_CALL):
                x = planes[s:s + PLANES_PER_CALL, None].to(device, torch.float32)
                answer[s:s + PLANES_PER_CALL] = (x + net(_with_phase(x, phase)))[:, 0].to(v.device, v.dtype)
    return torch.movedim(out, -1, axis + 1)


def apply_through_plane(net: nn.Module, volume: torch.Tensor, axis: int, phase: torch.Tensor) -> torch.Tensor:
    """The network's estimate of `volume`: the mean of its two answers (through_plane_answers)."""
    return through_plane_answers(net, volume, axis, phase).mean(0)
