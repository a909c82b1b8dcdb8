"""Rigid or affine registration of a native-space head to a prior's reference brain (SimpleITK).

1. fixed = the input on its native HR grid (B-spline upsampled), moving = the prior's reference.
2. Centre the moving image on the fixed one (moments), then optimise Mattes mutual information,
   counting only samples that land inside the prior's (dilated) brain mask, so skull, neck and
   anything else the prior does not model do not drive the fit. Three resolution levels.
3. Quality check: normalised cross-correlation inside the brain mask after alignment. Below
   `min_ncc` the input is refused (not a brain, wrong contrast, or failed alignment).

The result `native_to_prior` is a 4x4 affine on physical (LPS) points: exactly what
`physics.resample.AffineResample(prior_grid, native_grid, native_to_prior)` needs.
"""

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import InputError
from .volume import Volume, to_sitk

MIN_NCC = 0.4  # T1 vs T1 after alignment is well above this; inverted contrast (T2) or a non-brain is below
SHRINK = (4, 2, 1)
SAMPLING = 0.1  # share of the fixed image's voxels drawn per level...
MIN_SAMPLES = 50_000  # ...but at least this many: a small or shrunk image gives too few, and a noisy metric


@dataclass
class Registration:
    native_to_prior: np.ndarray  # 4x4 on physical points
    ncc: float
    mode: str
    metric: float

    def describe(self) -> dict:
        return {"mode": self.mode, "ncc_in_brain": round(self.ncc, 4), "mattes_mi": round(self.metric, 4),
                "native_to_prior": np.round(self.native_to_prior, 6).tolist()}


def _to_matrix(tx) -> np.ndarray:
    """4x4 of an ITK matrix-offset transform: T(x) = A (x - c) + c + t."""
    a = np.asarray(tx.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c = np.asarray(tx.GetCenter(), dtype=np.float64)
    t = np.asarray(tx.GetTranslation(), dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = c + t - a @ c
    return m


def _mask_image(mask: np.ndarray, like: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(mask.astype(np.uint8).transpose(2, 1, 0)))
    img.CopyInformation(like)
    return img


def register(native: Volume, reference: Volume, brain_mask: np.ndarray, mode: str = "rigid",
             min_ncc: float = MIN_NCC, seed: int = 0) -> Registration:
    """Align the prior's `reference` (with `brain_mask` on its grid) to the `native` head."""
    if mode not in ("rigid", "affine"):
        raise InputError("Unknown registration mode %r." % mode, "Use rigid or affine.")
    fixed = sitk.Cast(to_sitk(native), sitk.sitkFloat32)
    moving = sitk.Cast(to_sitk(reference), sitk.sitkFloat32)
    mmask = _mask_image(ndimage.binary_dilation(brain_mask, iterations=3), moving)

    base = sitk.Euler3DTransform() if mode == "rigid" else sitk.AffineTransform(3)
    init = sitk.CenteredTransformInitializer(fixed, moving, base, sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    n = float(np.prod(native.grid.shape))
    reg.SetMetricSamplingPercentagePerLevel([min(1.0, max(SAMPLING, MIN_SAMPLES * f ** 3 / n)) for f in SHRINK], seed)
    reg.SetMetricMovingMask(mmask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=150,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(SHRINK))
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(init, inPlace=True)  # `init` becomes the optimised transform
    try:
        reg.Execute(fixed, moving)
    except RuntimeError as exc:
        raise InputError("Registration to the prior's reference failed (%s)." % str(exc).strip().splitlines()[-1][:120],
                         "Check that the input is a T1-weighted head MRI, or pass an input already in the "
                         "prior's space.") from None
    m = _to_matrix(init)
    ncc = alignment_ncc(native, reference, brain_mask, m)
    result = Registration(m, ncc, mode, float(reg.GetMetricValue()))
    if not ncc >= min_ncc:
        raise InputError("The input does not match the prior's brain after %s registration (correlation %.2f inside "
                         "the brain, at least %.2f expected): it may not be a head MRI, or not T1-weighted."
                         % (mode, ncc, min_ncc),
                         "Give a T1-weighted head MRI, try --registration affine, or align it to MNI space first.")
    return result


def alignment_ncc(native: Volume, reference: Volume, brain_mask: np.ndarray, native_to_prior: np.ndarray) -> float:
    """Normalised cross-correlation between native and reference inside the brain, after alignment."""
    import torch

    from .physics.resample import AffineResample

    r = AffineResample(reference.grid, native.grid, native_to_prior)
    ref_on_native = r(torch.as_tensor(reference.array, dtype=torch.float32)).numpy()
    mask_on_native = r(torch.as_tensor(brain_mask, dtype=torch.float32)).numpy() > 0.5
    if mask_on_native.sum() < 100:
        return float("-inf")
    a = native.array[mask_on_native].astype(np.float64)
    b = ref_on_native[mask_on_native].astype(np.float64)
    a -= a.mean()
    b -= b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("-inf")
