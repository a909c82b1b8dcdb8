"""Measure seconds per iteration and peak memory of an InverseSR method on a device.

`profile` builds the prior's architecture (default: the published UK Biobank LDM) with random weights, so no
download is needed, runs a few real iterations of the method on a synthetic slice-removal input and reports
the measurement next to the estimate of methods/inversesr/budget.py (`bench --profile` shows both).
"""

import resource
import time
from typing import Optional, Sequence

import torch

from ..methods import get_method
from ..methods.inversesr import budget
from ..physics import OperatorSpec
from ..priors import synthetic, ukbb
from ..progress import Progress


def profile(method: str, device="cpu", shape: Optional[Sequence[int]] = None, iterations: int = 3,
            card: Optional[dict] = None, ddim_steps: Optional[int] = None, seed: int = 0,
            settings: Optional[dict] = None) -> dict:
    """{"seconds_per_iteration", "peak_memory_gb", "estimate", ...} for `method` on `device`.

    settings: overrides of the method's settings (e.g. {"accelerate": "cuda-graphs"}), recorded in the row with
    the warnings the run gave (a fallback of `accelerate` is one).

    shape: the prior's image grid (default the card's, 160 x 224 x 160 for the published prior); it must be
    divisible by the autoencoder's downsampling factor.
    """
    dev = torch.device(device)
    m = get_method(method)
    prior = synthetic.random_prior(card or ukbb.card(), seed=seed, device=dev, image_shape=shape)
    hr_shape = tuple(prior.card["grid"]["shape"])
    op = OperatorSpec.make("slice-removal", 2, 4).bind_hr(hr_shape)
    gen = torch.Generator().manual_seed(seed)
    y = op.forward(torch.rand(hr_shape, generator=gen)).to(dev)
    overrides = dict(settings or {}, iterations=iterations)
    if ddim_steps is not None and any(s.name == "ddim_steps" for s in m.settings):
        overrides["ddim_steps"] = ddim_steps
    resolved = m.resolve_settings(overrides, prior.method_defaults(method, dev.type))
    resolved["iterations"] = iterations
    stamps, warnings = [], []

    def sink(event):
        if event.get("event") == "progress" and event.get("step", 0) > 0:
            stamps.append(time.perf_counter())
        elif event.get("event") == "warning":
            warnings.append(event["message"])

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    result = m.solve(y, op, prior, resolved, Progress(sink), gen)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    total = time.perf_counter() - t0
    # the first iteration includes warm-up (allocator, kernels): report the later ones when there are any
    steps = [b - a for a, b in zip(stamps, stamps[1:])] or [total / max(iterations, 1)]
    if dev.type == "cuda":
        peak, what = torch.cuda.max_memory_allocated(dev), "GPU memory allocated by torch"
    else:
        peak, what = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"
    # Utilisation: the model's forward and backward FLOPs (checkpoint recomputation is overhead, not counted) per
    # measured second, from the run's own estimate (counted on the meta device, budget.network_profile).
    model_flops = result.info["estimate"]["model_tflop_per_iteration"] * 1e12
    s_per_it = sum(steps) / len(steps)
    return {"method": method, "device": str(dev), "shape": list(hr_shape), "iterations": iterations,
            "model_tflop_per_iteration": model_flops / 1e12, "achieved_tflops": model_flops / s_per_it / 1e12,
            "seconds_per_iteration": s_per_it, "seconds_total": total,
            "first_iteration_seconds": (stamps[0] - t0) if stamps else total,  # with capture or compilation
            "peak_memory_gb": peak / budget.GB, "peak_memory_kind": what,
            "estimate": result.info.get("estimate"), "ddim_steps": resolved.get("ddim_steps"),
            "settings": dict(settings or {}), "warnings": warnings}
