"""The README's main job: degrade the MNI152 template, super-resolve it, score it, draw it.

The template ships inside nilearn's wheel (no download). It is labelled in-distribution for the
default priors, which were trained on deformations of it.
"""

import json
import os
import tempfile
import time

import numpy as np

from .volume import Volume, atomic_write, atomic_write_text, read_volume, write_volume

PREFERRED = ("paired-ddpm", "inversesr-decoder", "inversesr-ldm", "bspline")  # paired first: minutes on a CPU


def mni152_example(crop_to_multiple_of: int = 1) -> Volume:
    """nilearn's 1 mm MNI152 T1 template as a Volume in ITK (LPS) geometry, float32."""
    from nilearn import datasets

    img = datasets.load_mni152_template(resolution=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mni152.nii.gz")
        img.to_filename(path)
        vol = read_volume(path)
    if crop_to_multiple_of > 1:
        k = crop_to_multiple_of
        shape = [n - n % k for n in vol.grid.shape]
        vol = Volume(np.ascontiguousarray(vol.array[: shape[0], : shape[1], : shape[2]]),
                     type(vol.grid)(shape, vol.grid.spacing, vol.grid.origin, vol.grid.direction))
    vol.description = "MNI152 template (nilearn), in-distribution example"
    return vol


def cropped_to_head(vol: Volume, multiple: int = 1, margin: int = 8) -> Volume:
    """`vol` cut to the box around its head (voxels above 2% of the maximum) plus `margin` voxels of air, each size
    a multiple of `multiple`, on the same physical grid. Why: the template carries a wide border of air that the
    demo would otherwise spend a third of its time on, and that no score or picture needs."""
    fg = np.argwhere(vol.array > 0.02 * float(vol.array.max()))
    shape = np.asarray(vol.grid.shape)
    lo = np.maximum(fg.min(0) - margin, 0)
    size = np.minimum(fg.max(0) + 1 + margin, shape) - lo
    size = np.minimum(-(-size // multiple) * multiple, shape - shape % multiple)
    lo = np.minimum(lo, shape - size)
    sl = tuple(slice(int(a), int(a + n)) for a, n in zip(lo, size))
    grid = type(vol.grid)(tuple(int(n) for n in size), vol.grid.spacing, vol.grid.index_to_physical(lo),
                          vol.grid.direction)
    return Volume(np.ascontiguousarray(vol.array[sl]), grid, description=vol.description)


def default_method(available_names) -> str:
    """The first method of PREFERRED that can run here (its prior installed, or no prior needed) and that its
    default prior's quality gate did not find below its baseline."""
    from .methods import get_method

    for name in PREFERRED:
        if name not in available_names:
            continue
        m = get_method(name)
        if not m.needs_prior:
            return name
        try:
            from .priors.card import gate_shortfall
            from .priors.store import default_prior

            prior = default_prior(m.needs_prior, "cpu")
        except Exception:
            continue
        if gate_shortfall(prior.card, name, "cpu"):
            continue  # its own gate had it below plain interpolation: not a default
        return name
    return "bspline"


def save_three_views(path, rows, titles, axis_labels=("sagittal (i)", "coronal (j)", "axial (k)")):
    """PNG: one row per volume (same grid), columns = central slice across each index axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    lo, hi = np.percentile(rows[0], [0.5, 99.5])
    for r, (vol, title) in enumerate(zip(rows, titles)):
        for a in range(3):
            sl = np.take(vol, vol.shape[a] // 2, axis=a)
            ax = axes[r][a]
            ax.imshow(np.rot90(sl), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if a == 0:
                ax.set_ylabel(title, fontsize=9)
            if r == 0:
                ax.set_title(axis_labels[a], fontsize=9)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80), ".png")
    finally:
        plt.close(fig)


def run_demo(out: str = "out", method=None, operator: str = "thick-slice", axis: int = 2, factor: float = 4.0,
             device: str = "auto", settings=None, progress=None, log=None) -> dict:
    """Degrade the MNI152 template, super-resolve it with `method` (default: `default_method`) and the two
    interpolation baselines, score and draw them into `out`.

    settings: the method's settings ({name: value}); progress: a Progress for the method's run; log: a function
    given one line of narration. Returns {"method", "degradation", "scores": {method: scores}, "paths": {...}}.
    """
    import torch

    from .methods import available
    from .metrics import compare
    from .physics import OperatorSpec, lr_grid
    from .pipeline import super_resolve

    os.makedirs(out, exist_ok=True)
    names = [m.name for m in available()]
    method = method or default_method(names)
    spec = OperatorSpec.make(operator, axis, factor)
    hr = cropped_to_head(mni152_example(), int(np.ceil(factor)))
    op = spec.bind_hr(hr.grid.shape)
    lr = Volume(op.forward(torch.as_tensor(hr.array, dtype=torch.float64)).float().numpy(), lr_grid(hr.grid, op))
    paths = {k: os.path.join(out, v) for k, v in
             dict(hr="mni152_hr.nii.gz", lr="mni152_lr.nii.gz", sr="mni152_sr_%s.nii.gz" % method,
                  png="mni152_%s.png" % method, metrics="metrics.json").items()}
    write_volume(hr, paths["hr"])
    write_volume(lr, paths["lr"])
    if log is not None:
        log("example: MNI152 %s -> %s voxels (%s)" % (hr.grid.shape, lr.grid.shape, spec.describe()))
    rows, titles, table = [hr.array], ["truth (1 mm)"], {}
    for name in dict.fromkeys(["trilinear", "bspline", method]):
        t0 = time.monotonic()
        result = super_resolve(lr, name, spec, settings if name == method else None,
                               None if name != method else _prior_for(name, device), device,
                               progress=progress if name == method else None)
        seconds = time.monotonic() - t0
        scores = compare(hr, result.volume, data_range=float(hr.array.max() - hr.array.min()))
        scores["seconds"] = round(seconds, 2)
        table[name] = scores
        if name == method:
            write_volume(result.volume, paths["sr"])
        rows.append(result.volume.array)
        titles.append("%s %.2f dB" % (name, scores["psnr_masked"]))
    save_three_views(paths["png"], rows, titles)
    report = {"method": method, "degradation": op.describe(), "scores": table}
    atomic_write_text(paths["metrics"], json.dumps(report, indent=1))
    return dict(report, paths=paths)


def _prior_for(name, device):
    from .methods import get_method

    m = get_method(name)
    if not m.needs_prior:
        return None
    from .devices import resolve_device
    from .priors.store import default_prior

    return default_prior(m.needs_prior, resolve_device(device))
