"""Image quality against a reference: PSNR and SSIM, whole volume and inside a head mask.

Conventions (FACTS.md section 5): the data range is explicit (the reference's max - min unless
given); SSIM uses an 11-tap Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03. `ssim` is 3D (a
3D window over the volume); `ssim_slices` is the mean of 2D SSIM over the slices along `axis`
(2D windows in each slice). Masked scores average only voxels inside the mask.
"""

from typing import Optional

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import InputError
from .volume import Volume

WINDOW_SIGMA = 1.5
WINDOW_TRUNCATE = 5.0 / 1.5  # 11 taps: radius 5


def head_mask(vol: Volume) -> np.ndarray:
    """Foreground (head) mask: Otsu threshold, largest component, holes filled, slightly dilated."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(vol.array.transpose(2, 1, 0)))
    fg = sitk.OtsuThreshold(img, 0, 1)
    arr = sitk.GetArrayFromImage(fg).transpose(2, 1, 0).astype(bool)
    labels, n = ndimage.label(arr)
    if n > 1:
        sizes = ndimage.sum(arr, labels, index=np.arange(1, n + 1))
        arr = labels == (1 + int(np.argmax(sizes)))
    arr = ndimage.binary_closing(arr, iterations=2)
    for a in range(3):  # fill holes slice by slice along every axis: ventricles are dark in T1
        arr = np.stack([ndimage.binary_fill_holes(s) for s in np.moveaxis(arr, a, 0)], axis=0)
        arr = np.moveaxis(arr, 0, a)
    return ndimage.binary_dilation(arr, iterations=1)


def psnr(ref: np.ndarray, test: np.ndarray, data_range: float, mask: Optional[np.ndarray] = None) -> float:
    """In dB; infinite for identical volumes (`metrics --json` writes that as null)."""
    diff = (np.asarray(test, np.float64) - np.asarray(ref, np.float64)) ** 2
    mse = float(diff[mask].mean()) if mask is not None else float(diff.mean())
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(data_range ** 2 / mse))


def _ssim_map(ref: np.ndarray, test: np.ndarray, data_range: float, axes) -> np.ndarray:
    """Per-voxel SSIM with a Gaussian window over `axes` (3 axes: 3D SSIM; 2 axes: per-slice 2D SSIM)."""
    x = np.asarray(ref, np.float64)
    y = np.asarray(test, np.float64)
    sig = [WINDOW_SIGMA if a in axes else 0.0 for a in range(x.ndim)]

    def blur(v):
        return ndimage.gaussian_filter(v, sig, truncate=WINDOW_TRUNCATE, mode="reflect")

    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def ssim(ref, test, data_range: float, mask=None) -> float:
    m = _ssim_map(ref, test, data_range, axes=(0, 1, 2))
    return float(m[mask].mean() if mask is not None else m.mean())


def ssim_slices(ref, test, data_range: float, axis: int = 2, mask=None) -> float:
    """Mean 2D SSIM over slices along `axis` (slices empty in the mask are skipped)."""
    in_plane = tuple(a for a in range(3) if a != axis)
    m = _ssim_map(ref, test, data_range, axes=in_plane)
    if mask is None:
        return float(m.mean())
    vals = [float(s[k].mean()) for s, k in zip(np.moveaxis(m, axis, 0), np.moveaxis(mask, axis, 0)) if k.any()]
    return float(np.mean(vals)) if vals else float("nan")


def compare(reference: Volume, test: Volume, mask="auto", data_range: Optional[float] = None,
            slice_axis: int = 2, atol: float = 1e-4) -> dict:
    """All scores of `test` against `reference`; both must share one grid."""
    differ = reference.grid.differences(test.grid, atol=atol)
    if differ:
        raise InputError("Reference and test volumes are on different grids: %s (reference vs test)." % "; ".join(differ),
                         "Compare volumes on the same grid (resample the test volume onto the reference first).")
    if isinstance(mask, Volume):
        differ = mask.grid.differences(reference.grid, atol=atol)
        if differ:
            raise InputError("The mask is on a different grid from the reference: %s (mask vs reference)."
                             % "; ".join(differ), "Give a mask on the reference grid.")
        m = mask.array > 0.5
    elif mask == "auto":
        m = head_mask(reference)
    elif mask in (None, "none"):
        m = None
    else:
        raise InputError("Unknown mask option %r." % (mask,), "Use auto, none or a mask file.")
    ref, tst = reference.array, test.array
    dr = float(ref.max() - ref.min()) if data_range is None else float(data_range)
    out = {"data_range": dr, "psnr": psnr(ref, tst, dr), "ssim": ssim(ref, tst, dr),
           "ssim_slices": ssim_slices(ref, tst, dr, slice_axis), "slice_axis": slice_axis,
           "ssim_kind": "ssim: 3D Gaussian window (11 taps, sigma 1.5); ssim_slices: mean 2D SSIM over slices"}
    if m is not None:
        out.update(psnr_masked=psnr(ref, tst, dr, m), ssim_masked=ssim(ref, tst, dr, m),
                   ssim_slices_masked=ssim_slices(ref, tst, dr, slice_axis, m), mask_fraction=float(m.mean()))
    return out
