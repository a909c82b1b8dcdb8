"""From an input volume to a super-resolved volume on the HR grid, for any registered method.

1. Decide the degradation: the user's operator, or infer it from the voxel spacing.
2. Bind it to the input's size -> the operator A and the HR grid (physics.hr_grid).
3. Methods bound to a prior's grid (registered with a GridBinding): bring the input into the prior's space
   (native.py: registration unless the input already lies on the prior's grid) and solve there.
4. Run the method's solver on the voxels (input intensity units, float32 tensors in i, j, k order).
5. Back on the HR grid (native.py blends the prior's output with the B-spline interpolation outside the
   prior's support, pasting the observed data as the method's GridBinding settings say), float32, marked as
   AI-generated when the method is generative.
The pipeline knows no method by name: what it needs from one, the method declares (methods/registry.py).
"""

import warnings
from dataclasses import dataclass, field, replace
from typing import Dict, Optional

import numpy as np
import torch

from . import memory, native
from .devices import resolve_device
from .errors import InputError, ResourceError
from .methods import get_method
from .physics import OperatorSpec, hr_grid
from .priors.card import gate_shortfall, method_defaults
from .progress import Progress
from .settings import SEED
from .volume import GENERATED_DESCRIPTION, Grid, Volume

THICK_RATIO = 1.5  # an axis is "thick" when its spacing exceeds the finest by more than this


def infer_degradation(grid: Grid) -> OperatorSpec:
    """Thick-slice (Gaussian) along the one axis whose spacing exceeds the finest by > 1.5x; factor = ratio."""
    sp = np.asarray(grid.spacing)
    finest = sp.min()
    thick = [a for a in range(3) if sp[a] > THICK_RATIO * finest]
    if not thick:
        raise InputError("The input's voxels are nearly isotropic (spacing %s mm): no thick axis to infer."
                         % " x ".join("%g" % s for s in sp),
                         "Give the degradation explicitly: --operator ... --axis ... --factor ...")
    if len(thick) > 1:
        raise InputError("More than one axis is coarse (spacing %s mm)." % " x ".join("%g" % s for s in sp),
                         "Give the degradation explicitly, e.g. --operator downsample --axis 0 1 --factor 2 2.")
    a = thick[0]
    return OperatorSpec.make("thick-slice", a, float(sp[a] / finest), "gaussian")


def run_settings(method, settings: Optional[dict] = None, card: Optional[dict] = None, device_type: str = "cpu",
                 seed: Optional[int] = None) -> dict:
    """The settings a run uses: the method's schema, the prior card's defaults for the device, the user's, --seed.

    One function, because a cohort's manifest must know before running whether a file would be made the same way.
    """
    defaults = method_defaults(card, method.name, device_type) if isinstance(card, dict) else None
    resolved = method.resolve_settings(settings, defaults)
    if seed is not None and "seed" in resolved:
        resolved["seed"] = SEED.parse(seed, method.name)
    return resolved


HR_COPIES_HOST = 4  # HR-sized float32 arrays alive at once on the host: result, a solver intermediate, two to write
HR_COPIES_DEVICE = 3  # on a GPU: the estimate, an operator intermediate, the data-consistency correction


def check_grid_fits(op, device) -> None:
    """ResourceError (exit 3) with the numbers when the HR grid cannot even be held, before anything is allocated.

    A floor for every method: the operator's per-axis matrices (float64 and float32, the operator and an
    interpolator) and a few float32 copies of the HR volume. Methods with a prior add their own estimate
    (methods/inversesr/budget.py) when they start.
    """
    hr = 1
    for n in op.hr_shape:
        hr *= int(n)
    matrices = sum(2 * 12.0 * op.hr_shape[a] * op.lr_shape[a] for a in op.axes)
    what = "An HR grid of %s voxels (%s)" % (" x ".join(map(str, op.hr_shape)), _describe_factors(op))
    fix = "Use a smaller --factor (the LR spacing over the HR spacing you want), or a machine with more memory."
    memory.check_host(HR_COPIES_HOST * 4.0 * hr + matrices, what, fix)
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        need = HR_COPIES_DEVICE * 4.0 * hr + matrices / 2
        if need > memory.MARGIN * free:
            raise ResourceError("%s needs about %s on %s, but only %s are free there." % (
                what, memory.describe_bytes(need), device, memory.describe_bytes(free)),
                "Use a smaller --factor, free GPU memory, or run on the CPU (--device cpu).")


def _describe_factors(op) -> str:
    return ", ".join("factor %g along axis %d" % (op.factors[a], a) for a in op.axes)


@dataclass
class RunOutput:
    volume: Volume
    residual: Volume  # |A(x) - y| on the input grid: where the output disagrees with the measurement
    extras: Dict[str, Volume] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def super_resolve(lr: Volume, method: str, spec: Optional[OperatorSpec] = None, settings: Optional[dict] = None,
                  prior=None, device: str = "auto", seed: Optional[int] = None,
                  progress: Optional[Progress] = None, registration: str = "auto") -> RunOutput:
    """`registration` (native.MODES) matters only for methods bound to a prior's grid; see native.py."""
    m = get_method(method)
    progress = progress or Progress()
    native.check_mode(registration)
    grid_bound = m.grid is not None and getattr(prior, "kind", None) == m.needs_prior
    if m.grid is None and registration in ("rigid", "affine"):
        progress.warning("Method %s is not bound to a prior's grid: it runs on the input's grid, no registration."
                         % m.name)
    spec = spec or infer_degradation(lr.grid)
    if spec.kind not in m.operators:
        raise InputError("Method %s is not built for %s degradations." % (m.name, spec.kind),
                         "It handles: %s. Choose another method or operator." % ", ".join(m.operators))
    dev = resolve_device(device)
    card = getattr(prior, "card", None)
    resolved = run_settings(m, settings, card, dev.type, seed)
    shortfall = gate_shortfall(card, m.name, dev.type) if isinstance(card, dict) else None
    if shortfall:
        progress.warning(shortfall)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        op = spec.bind_lr(lr.grid.shape)
    for w in caught:
        progress.warning(str(w.message))
    out_grid = hr_grid(lr.grid, op)
    op = replace(op, hr_spacing=out_grid.spacing, hr_direction=out_grid.direction)
    check_grid_fits(op, dev)
    gen = torch.Generator(device="cpu").manual_seed(int(resolved.get("seed", seed or 0)))
    y = torch.as_tensor(lr.array, dtype=torch.float32, device=dev)
    place = native.link(out_grid, op, y, prior, registration, progress) if grid_bound else None
    progress.restart_clock()
    result = m.solve(y, place.physics(op) if place else op, prior, resolved, progress, gen)
    y = y.to(result.x.device)  # a solver may have fallen back to the CPU
    x, extras = result.x.detach().to(y.dtype), {k: v.detach().to(y.dtype) for k, v in result.extras.items()}
    if place is not None:
        paste, spread = m.grid.paste_from(resolved)
        x, extras = place.back(x, extras, op, y, paste, spread)
    desc = GENERATED_DESCRIPTION if m.generative else "MRISuperRes %s" % m.name

    def wrap(t):
        arr = t.detach().to("cpu", torch.float32).numpy()
        return Volume(np.ascontiguousarray(arr), out_grid, description=desc)

    info = {"method": m.name, "settings": resolved, "degradation": op.describe(), "device": str(dev)}
    info.update(result.info)
    info["registration"] = place.info if place is not None else {
        "mode": "not used", "reason": "%s runs on the input's own grid" % m.name}
    with torch.no_grad():
        res = (op.forward(x) - y).abs().to("cpu").numpy()
    residual = Volume(np.ascontiguousarray(res), lr.grid, description="MRISuperRes residual |A(x) - y|")
    info["residual_rel"] = float(np.linalg.norm(res) / max(float(np.linalg.norm(lr.array)), 1e-12))
    return RunOutput(wrap(x), residual, {k: wrap(v) for k, v in extras.items()}, info)
