"""Paired conditional diffusion: a DDPM trained on LR/HR pairs made by the run's operator, sampled with DDIM
patch by patch (sliding window with overlap blending), conditioned on the B-spline upsampled input.

Notation: y the LR input, up = B-spline (cubic) upsampling of y onto the HR grid, cond the operator (kind,
profile, factor per axis), x0 the residual (x - up) / residual_scale, ab the cosine bar-alpha (diffusion/cosine.py),
the model diffusion/paired_model.py, the DDIM step priors/ddim.py.

1. scale y to [-1, 1] (robust percentiles); up = cubic B-spline of y on the HR grid; cond from the operator
   with `adapt`: train a small 2D network on the scan's own acquired slices (priors/from_scan.py)
2. z ~ N(0, I) on the HR grid, `samples` chains side by side; with `mean_start`, z = 0 (one chain)
3. for each (t, ab_t, ab_prev) of the `steps`-step DDIM chain:
   a. eps_hat = UNet([z, up, cond], t) over overlapping 3D patches, blended (diffusion/patches.py)
   b. z = DDIM step with `eta` (fresh noise when eta > 0), x0_hat clipped to the residual's range
4. x = up + residual_scale * z; with `adapt`, x <- (1 - w) x + w n(up), n the 2D network learnt from the scan
   applied through-plane, w = `adapt_weight`; with `keep_air`, x = up wherever the input is air all around (a skull-stripped
   scan's zero background); with `project`, x <- x + A^+ (y - A x)
5. back to input units; the mean over samples is the output, their std the uncertainty (with `adapt`, in root sum
   of squares with w x the std of the 2D network's two answers, its two families of planes).
Every step's noise prediction covers the whole volume before the update, so all patches share one timestep
and one noise draw, and overlapping patches never disagree about z.
Its prior works on patches, not on one grid: it runs on the input's own HR grid, with no registration (native.py).
The network sees the volume flipped and its axes swapped into its training orientation, the degraded axis at k
(patch_view; exact, no resampling), and its answer is turned back.
"""

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..diffusion.cosine import sampling_pairs
from ..diffusion.noise import sample_noise
from ..diffusion.paired_model import PairedModel, condition_of
from ..diffusion.patches import sliding_window
from ..errors import InputError, ResourceError
from ..intensity import robust_scale
from ..orientation import apply_reorientation, network_view, undo_reorientation
from ..priors.ddim import ddim_step
from ..priors.from_scan import learn_from_slices, sample_phase, through_plane_answers, why_not_adaptable
from ..priors.reference import card_direction
from .registry import SEED, Setting, SolveResult, register

AIR_LEVEL = -0.98  # diffusion space: 1% of the input's range above its floor
ADAPT_CHOICES = ("off", "auto", "on")
ADAPT_SHARE = 0.5  # of the progress bar, for the learning when adapt is on (about half the time by default)
# Where `auto` learns from the scan, {kind: smallest factor}: where it was measured with the default prior (tuning
# heads, docs/benchmarks.md: slice removal at 8 mm +0.28 to +2.3 dB over the prior alone, at 4 mm +0.15 to +2.26,
# thick slices at 5 mm +0.18 and +1.17); thick slices at 4 mm not measured
ADAPT_AUTO = {"slice-removal": 4.0, "thick-slice": 5.0}

SETTINGS = [
    Setting("steps", "int", 20, "DDIM sampling steps.", min=1, max=1000),
    Setting("eta", "float", 0.0, "DDIM stochasticity (0: deterministic given the seed, 1: DDPM-like).",
            min=0.0, max=1.0),
    Setting("samples", "int", 1, "Samples; the output is their mean, their std the uncertainty map (with adapt, plus "
            "the doubt of the network learnt from the scan).",
            min=1, max=64),
    # Measured on two held-out tuning heads at 8 mm (T1- and T2-like): 4 samples in pairs scored above 12
    # independent ones in PSNR and SSIM, at a third of the cost (diffusion/noise.py says why).
    Setting("antithetic", "bool", True, "Draw the samples' noise in opposite pairs (z, -z): the mean then cancels "
            "most of the sampling noise, so 4 paired samples do better than 12 independent ones. Each sample is "
            "still a valid draw, so their spread is still the uncertainty map; turn it off for independent samples."),
    # Measured on four tuning heads at 8 mm (T1, T2, FLAIR, PD-like): +0.02 to +0.04 dB, SSIM up; mirroring
    # front-back as well lost 0.08 dB on the T1 head (a brain is near symmetric left-right only)
    Setting("mirror", "bool", True, "Run every other pair of samples on the input mirrored left-right (the "
            "brain's near symmetry) and mirror their answers back: the mean then also averages out the model's "
            "own errors, which the mirror image does not share. Same cost. Off when the thick axis is left-right."),
    # Measured on three skull-stripped tuning heads at 8 mm (T1, T2, PD-like, air exactly zero as after real
    # stripping): SSIM +0.014 to +0.021 (PD-like from below B-spline's to above it), masked PSNR unchanged
    Setting("keep_air", "bool", True, "Keep the interpolated input, with no generated detail, wherever the input "
            "is air within one slice and two voxels in-plane (the zero background of a skull-stripped scan): the "
            "samples' residual there is noise, not anatomy. Its uncertainty there is zero."),
    Setting("mean_start", "bool", False, "Start from the noise's mean (zero) instead of a random draw: "
            "deterministic, and with steps=1 the model's estimate of the conditional mean: near the average of many "
            "random samples (a little lower PSNR and SSIM) at the cost of one. One estimate, so no uncertainty map."),
    Setting("patch", "int", 0, "Cubic patch size at inference (0: the training patch). The network is fully "
            "convolutional; larger patches spend less time on overlaps. A multiple of 4: the default prior's UNet "
            "halves it twice (a deeper prior may need 8 or more, and says so).", min=0, max=512, multiple_of=4),
    Setting("overlap", "float", 0.25, "Overlap of neighbouring patches (fraction of the patch).", min=0.0, max=0.9),
    Setting("batch", "int", 2, "Patches per network call (each needs a few hundred MB on CPU; "
            "raise it on a GPU).", min=1, max=1024),
    Setting("project", "bool", False, "Finish with a projection onto the measurement (A x = y exactly; may ring "
            "for thick-slice profiles)."),
    # off here, on ("auto") in the default prior's card defaults: whether it helps, and at which weight, was
    # measured with that prior (docs/benchmarks.md)
    Setting("adapt", "choice", "off", "Learn from this scan before sampling: a small 2D network is trained on the "
            "scan's own sharp slices, each degraded in-plane the way the scan is degraded through-plane, then restores "
            "the thick axis; the output is its blend with the diffusion model's (the shipped model is not changed). "
            "on: whenever the scan allows it (thick slices or slice removal along one axis, in-plane spacing close to "
            "the output spacing), with a warning when it cannot; auto: the same for slice removal of 4x or more "
            "and thick slices of 5x or more, where it was measured to help. The network's gain on held-out slices is "
            "reported, and a network that does not beat B-spline there is left out. The default prior turns it on "
            "(auto).", choices=ADAPT_CHOICES),
    # 3000: on whole tuning heads at 8 mm, 2000 steps beat 1000 by 0.3 to 0.5 dB (2D alone) and 3000 fit the
    # 10-minute budget of a whole brain on 2 CPU cores
    Setting("adapt_steps", "int", 3000, "Most training steps of the network learnt from the scan.", min=1,
            max=1000000),
    Setting("adapt_seconds", "float", 300.0, "Time budget of that training in seconds (0: no limit; the steps "
            "bound it).", min=0.0, max=86400.0),
    # 0.8: on five tuning heads at 8 mm the best weight was 0.6 to 0.7 on T1-like heads with a scalp, where the
    # prior is strongest, and 0.8 to 1 in FLAIR-like, random and stripped T2-like contrasts (docs/benchmarks.md);
    # 0.8 loses at most 0.03 dB on the first and keeps most of the gain on the others
    Setting("adapt_weight", "float", 0.8, "Share of the network learnt from the scan in the output (the rest is the "
            "diffusion model's; 1: that network alone, 0: the diffusion model alone).", min=0.0, max=1.0),
    SEED,
]


def _check_patch(prior, patch):
    """Each UNet level halves the patch and the skip connections need the halves to meet exactly."""
    levels = len(((prior.card.get("networks") or {}).get("unet") or {}).get("kwargs", {}).get("channels") or [1])
    multiple = 2 ** (levels - 1)
    if any(p % multiple for p in patch):
        raise InputError("Setting 'patch' of method 'paired-ddpm' must be a multiple of %d for prior '%s' (its UNet "
                         "halves the patch %d times), got %s." % (multiple, prior.card.get("name"), levels - 1,
                                                                 "x".join(map(str, patch))),
                         "Example: --set patch=%d" % max(multiple, patch[0] // multiple * multiple))


def _trained_for(prior, physics) -> bool:
    ops = ((prior.card.get("paired") or {}).get("operators")) or []
    return not ops or any(o.get("operator") == physics.spec.kind for o in ops)


def patch_view(prior, physics):
    """(perm, flips, codes) of orientation.network_view: the network sees the scan in the orientation its training
    brains had (the card's grid direction), the degraded axis at k when the prior only learnt through-plane (k)
    degradations.

    A patch network learns the anatomy's orientation too: on a held-out head at 8 mm, the same input stored upside
    down scored 0.23 dB lower (docs/benchmarks.md). Flips and axis swaps are exact: no resampling.
    """
    ops = ((prior.card.get("paired") or {}).get("operators")) or []
    k_only = {a for o in ops for a in o.get("axes", [])} == {2} and len(physics.axes) == 1
    return network_view(card_direction(prior.card), getattr(physics, "hr_direction", None),
                        int(physics.axes[0]) if k_only else None)


def left_right_axis(physics) -> int:
    """The index axis closest to the patient's left-right (LPS x) direction; i when the grid is not known."""
    direction = getattr(physics, "hr_direction", None)
    if direction is None:
        return 0
    return int(np.argmax(np.abs(np.asarray(direction, dtype=np.float64).reshape(3, 3)[0])))


def _mirrors(physics, n_samples: int, antithetic: bool):
    """Per sample, the index axes to flip it along: none or left-right, alternating by pair (both samples of an
    antithetic pair alike, so the pair still cancels its noise); none at all when left-right is the thick axis."""
    lr = left_right_axis(physics)
    if lr in tuple(physics.axes):
        return [()] * n_samples
    half = n_samples // 2 if antithetic else 0
    return [((lr,) if (s % half if half and s < 2 * half else s) % 2 else ()) for s in range(n_samples)]


def input_air(yn, physics) -> torch.Tensor:
    """HR voxels with no input sample above the air level within one LR voxel along the degraded axes and two
    voxels along the others: between such samples there is nothing for the model to restore."""
    busy = (yn > AIR_LEVEL).to(torch.float32)[None, None]
    size = [3 if a in physics.axes else 5 for a in range(3)]
    busy = F.max_pool3d(busy, size, 1, [n // 2 for n in size])[0, 0]
    return physics.upsample(busy.to(yn.dtype), "linear") < 1e-6


def _window_fitting_memory(eps_fn, x, patch, overlap, batch, progress):
    """sliding_window, halving the patches per network call while the GPU runs out of memory.

    The default GPU batch suits a large card; a smaller one fails at the first call, so retrying the whole step
    with half the batch loses nothing. Returns (result, the batch that fitted), which later steps keep.
    """
    while True:
        try:
            return sliding_window(eps_fn, x, patch, overlap, batch), batch
        except torch.cuda.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if batch == 1:
                raise ResourceError("The GPU ran out of memory with one %s patch per network call."
                                    % "x".join(str(p) for p in patch),
                                    "Set a smaller patch (e.g. patch=64) or run on the CPU (--device cpu).") from None
            batch = max(1, batch // 2)
            progress.warning("The GPU ran out of memory; retrying with %d patches per network call." % batch)


def _learn_from_scan(yn, physics, view, settings, progress, generator):
    """(estimate, record, progress): with `adapt` on and a scan that allows it, a function giving the 2D network's
    estimate from the B-spline volume, with the progress left for sampling; or None, None and the same progress.

    The network learns and answers in the view the diffusion network sees (patch_view): the same physical scan
    then gets the same answer however it is stored.
    """
    mode = settings.get("adapt") or "off"
    if mode == "off" or float(settings["adapt_weight"]) == 0.0:
        return None, None, progress
    if mode == "auto" and not max(physics.spec.factors) >= ADAPT_AUTO.get(physics.spec.kind, math.inf):
        return None, None, progress
    reason = why_not_adaptable(physics)
    if reason:
        progress.warning("Not learning from this scan: %s. Sampling with the prior alone." % reason)
        return None, None, progress
    order, flips = view
    axis = order.index(physics.axes[0])
    net, record = learn_from_slices(apply_reorientation(yn, order, flips), physics.spec, axis, generator,
                                    int(settings["adapt_steps"]), float(settings["adapt_seconds"]), AIR_LEVEL,
                                    progress.sub(0.0, ADAPT_SHARE))
    gain = record["validation_gain_db"]
    record["weight"] = float(settings["adapt_weight"])
    if gain is not None and gain <= 0.0:
        progress.warning("The network learnt from this scan did not beat B-spline on its held-out slices (%+.2f dB): "
                         "it is left out of the output." % gain)
        record["weight"] = 0.0
        return None, record, progress.sub(ADAPT_SHARE, 1.0)

    a = physics.axes[0]
    line = [1, 1, 1]
    line[a] = physics.hr_shape[a]
    phase = apply_reorientation(sample_phase(physics, a).reshape(line), order, flips).reshape(-1)  # in the view

    def estimate(base):  # the network's two answers, stacked (through_plane_answers)
        return undo_reorientation(through_plane_answers(net, apply_reorientation(base, order, flips), axis, phase),
                                  order, flips)

    return estimate, record, progress.sub(ADAPT_SHARE, 1.0)  # made now, so the sampling ETA starts with sampling


@register("paired-ddpm", "Paired conditional DDPM",
          "Conditional diffusion model trained on LR/HR pairs of the run's degradation, sampled with DDIM over "
          "overlapping 3D patches.", settings=SETTINGS, generative=True, needs_prior="paired",
          gate=("slice-removal-4mm", "thick-slice-5mm", "slice-removal-8mm"))
def solve(y, physics, prior, settings, progress, generator):
    if prior is None:
        raise InputError("paired-ddpm needs a paired prior.", "Give --model NAME|PATH of a prior made by `train paired`.")
    model = PairedModel.from_prior(prior)
    if not _trained_for(prior, physics):
        progress.warning("Prior '%s' was not trained on %s degradations; expect poor results."
                         % (prior.card.get("name"), physics.spec.kind))
    steps, eta, n_samples = int(settings["steps"]), float(settings["eta"]), int(settings["samples"])
    if settings.get("mean_start") and n_samples > 1:
        raise InputError("mean_start gives one deterministic estimate, so samples=%d would repeat it." % n_samples,
                         "Set samples=1, or turn mean_start off to average random samples (and get an "
                         "uncertainty map).")
    scale = robust_scale(y)
    dev, dtype = y.device, torch.float32
    net_dev = next(model.unet.parameters()).device
    pairs = sampling_pairs(steps, model.alpha_bar)
    started = time.perf_counter()
    with torch.no_grad():
        yn = scale.to_prior(y.to(dtype))
    order, flips, codes = patch_view(prior, physics)
    learnt, adapted, progress = _learn_from_scan(yn, physics, (order, flips), settings, progress, generator)
    adapted_at = time.perf_counter()
    cond = condition_of(physics)
    cond = torch.cat([cond[:-3], cond[-3:][order]]).to(net_dev)
    hr = (n_samples, 1) + tuple(physics.hr_shape)
    hr_view = hr[:2] + tuple(hr[2 + a] for a in order)

    def randn(shape):
        return sample_noise(shape, generator, bool(settings.get("antithetic")), dev, dtype)

    with torch.no_grad():  # sampling only: nothing here is differentiated
        base = physics.upsample(yn, "cubic")
        up = base[None, None].expand(hr)
        mirrors = _mirrors(physics, n_samples, bool(settings.get("antithetic"))) if settings.get("mirror") else []
        if any(mirrors):
            up = torch.stack([up[0].flip([1 + a for a in m]) if m else up[0] for m in mirrors])
        # Why zero: at t = T the chain's input holds no signal, and the network's answer at the noise's mean
        # came within 0.1 dB (PSNR) of the average of 12 random starts on the held-out gate head at 8 mm, at 1/12
        # of the cost; SSIM is lower (0.810 against 0.832), so samples stay the default.
        up = apply_reorientation(up, order, flips)
        z = torch.zeros(hr_view, device=dev, dtype=dtype) if settings.get("mean_start") else randn(hr_view)
        patch = model.patch if not settings.get("patch") else (int(settings["patch"]),) * 3
        _check_patch(prior, patch)
        skipped = [0, 0]
        batch = int(settings["batch"])
        for n, (t, ab_t, ab_prev) in enumerate(pairs, 1):
            def eps_fn(chunk, t=t, ab_t=ab_t):
                # Air (the upsampled input at the floor everywhere in the patch) has no residual to add:
                # answer x0_hat = 0 there (eps = z / sqrt(1 - ab)) instead of running the network.
                eps = chunk[:, :1] / (1.0 - ab_t) ** 0.5
                busy = chunk[:, 1:2].flatten(1).amax(1) > AIR_LEVEL
                skipped[0] += int((~busy).sum())
                skipped[1] += chunk.shape[0]
                if bool(busy.any()):
                    part = chunk[busy].to(net_dev)
                    e = model.eps(part[:, :1], part[:, 1:2], cond.expand(part.shape[0], -1), t)
                    eps[busy] = e.to(dev, dtype)
                return eps

            eps_hat, batch = _window_fitting_memory(eps_fn, torch.cat([z, up], 1), patch, float(settings["overlap"]),
                                                    batch, progress)
            z = ddim_step(z, eps_hat, ab_t, ab_prev, eta, randn(hr_view) if eta > 0 and ab_prev < 1.0 else None,
                          model.clip)
            progress(n, len(pairs), "DDIM step %d of %d (t = %d)" % (n, len(pairs), t))
        x = undo_reorientation(up + model.residual_scale * z, order, flips)[:, 0]
        if any(mirrors):
            x = torch.stack([x[s].flip(list(m)) if m else x[s] for s, m in enumerate(mirrors)])
        doubt = None
        if learnt is not None:
            w = float(settings["adapt_weight"])
            answers = learnt(base)
            x = (1.0 - w) * x + w * answers.mean(0)
            if n_samples > 1:  # only the uncertainty map needs it
                # The samples' spread misses the network's own error: where its two families of planes disagree it
                # is unsure (their std, |a0 - a1| / sqrt 2). With it the map came 3-4x closer to the error's size on
                # tuning heads and ranked voxels as well (docs/benchmarks.md).
                doubt = w * (answers[0] - answers[1]).abs() / math.sqrt(2.0)
        air = input_air(yn, physics) if settings.get("keep_air") else None
        if air is not None:
            x = torch.where(air, base, x)
            doubt = None if doubt is None else torch.where(air, torch.zeros_like(doubt), doubt)
        if settings["project"]:
            x = physics.data_consistency(x, yn)
        out = scale.to_input(x)
        extras = {}
        if n_samples > 1:
            spread = out.std(0)
            if doubt is not None:  # in input units, and added as an independent error
                doubt = doubt * ((scale.hi - scale.lo) / (scale.r1 - scale.r0))
                spread = torch.sqrt(spread ** 2 + doubt ** 2)
            extras["uncertainty"] = spread
    info = {"samples": n_samples, "patch": list(patch), "batch": batch,
            "axis_turned_to_k": order[2] if order[2] != 2 else None,
            "view": codes,
            "mirrored_axis": next((m[0] for m in mirrors if m), None),
            "intensity_scale": [scale.lo, scale.hi],
            "air_patches_skipped": round(skipped[0] / max(skipped[1], 1), 4),
            "air_kept": round(float(air.float().mean()), 4) if air is not None else None, "adapted": adapted,
            "phase_seconds": {"adaptation": round(adapted_at - started, 2),
                              "sampling": round(time.perf_counter() - adapted_at, 2)}}
    return SolveResult(out.mean(0), extras, info)
