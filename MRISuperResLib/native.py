"""Into the prior's space and back: how a native-space input meets a grid-bound prior (the InverseSR methods).

Notation: y the LR input; A the bound operator (native HR grid -> y); G_n the native HR grid
(physics.hr_grid), G_p the prior's grid (priors/reference.prior_grid); T the 4x4 native_to_prior map of
physical LPS points; R = AffineResample(G_p, G_n, T) (prior-grid image -> G_n, trilinear, differentiable);
B = A's cubic B-spline upsampling; C the prior's region on G_n; M the LR samples that see only C.

1. Decide. G_n with G_p's direction and spacing (to 1e-3) and an overlapping box, under registration "auto" or
   "none": no resampling at all, the solver gets A itself (methods/inversesr/solver.CropPad crops/pads onto G_p).
   Otherwise T = register(B y on G_n, the prior's reference, its brain mask) ("auto" = rigid), or T = identity
   under "none" (the input's physical coordinates are taken as the prior's).
2. C = the reference brain mask mapped to G_n, dilated DILATE_MM, within G_p's box. The solver's operator is
   x -> M A R x on G_p (PriorSpaceOperator): skull, neck and whatever lies outside the box do not pull the fit
   (k-space samples see the whole image, so kspace keeps them all). Its upsampling is R^-1 B (the native
   interpolation seen from G_p), its data consistency the identity (step 4 pastes on G_n).
3. The solver returns x_p on G_p, in input units (its intensity map is fitted to y as usual).
4. x_n = w R x_p + (1 - w) B y with w = C shrunk by the smoothing's reach, Gaussian-smoothed (SMOOTH_MM): 1 on
   the brain, 0 outside C, so the prior counts only where the data constrained it, and elsewhere (skull, neck,
   outside the prior's box) the output is the B-spline interpolation; every method's output lies on the same
   grid. With paste_observed, x_n <- x_n + A^+(y - A x_n) (or the spread correction, paste_spread).

The grid-agnostic methods (kspace-vdm, paired-ddpm) and the baselines never come here: they run on G_n as is.
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from .errors import InputError
from .physics.resample import AffineResample, Composed, index_to_physical_matrix
from .priors.reference import prior_grid, prior_reference
from .registration import register
from .volume import Grid, Volume, to_sitk

MODES = ("auto", "rigid", "affine", "none")
GRID_TOL = 1e-3
DILATE_MM = 8.0  # the fitted region: the brain and its surroundings (w reaches 1 about 1 mm past the brain)
SMOOTH_MM = 1.5
FOOTPRINT_TOL = 0.01  # an LR sample may draw this share of its weight from outside C


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InputError("Unknown registration mode %r." % (mode,), "Use one of: %s." % ", ".join(MODES))
    return mode


def on_prior_grid(native: Grid, prior: Grid, tol: float = GRID_TOL) -> bool:
    """Same direction and spacing, and boxes that overlap: then crop/pad is exact and needs no resampling."""
    if not (np.allclose(native.direction, prior.direction, rtol=0, atol=tol)
            and np.allclose(native.spacing, prior.spacing, rtol=0, atol=tol)):
        return False
    corners = prior.physical_to_index(native.bounds())  # same axes: the box stays a box in prior indices
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    n = np.asarray(prior.shape)
    return bool(np.all(np.maximum(lo, -0.5) < np.minimum(hi, n - 0.5)))


class PriorSpaceOperator(Composed):
    """x on the prior's grid -> y: M A R x (hr_shape = G_p's shape, lr_shape = A's; axes i, j, k).

    M is a 0/1 mask on the LR grid (None: all ones). adjoint R^T A^T M (exact); no pseudo-inverse.
    `upsample(y, kind)` = R^-1 B_kind y, zero where G_p sees nothing of G_n; `data_consistency` is the
    identity: the observed samples are pasted on G_n instead (module docstring, step 4).
    """

    def __init__(self, op, to_native: AffineResample, to_prior: AffineResample, lr_mask=None):
        super().__init__(op, to_native)
        self.to_prior = to_prior
        self.lr_mask = lr_mask

    def _mask(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.lr_mask is None else y * self.lr_mask.to(y.device, y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mask(super().forward(x))

    __call__ = forward

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return super().adjoint(self._mask(y))

    def upsample(self, y: torch.Tensor, method: str) -> torch.Tensor:
        return self.to_prior(self.outer.upsample(y, method))

    def data_consistency(self, x: torch.Tensor, y: torch.Tensor, spread: str = "none") -> torch.Tensor:
        return x

    def describe(self) -> dict:
        return self.outer.describe()


@dataclass
class NativeLink:
    """How one run's native HR grid meets the prior's grid; `native_to_prior` is None when no resampling is needed."""

    native_grid: Grid
    prior_grid: Grid
    info: dict
    native_to_prior: Optional[np.ndarray] = None  # T
    region: Optional[np.ndarray] = None  # C on G_n, bool

    def __post_init__(self):
        self.resample = self.weight = None
        if self.native_to_prior is not None:
            self.resample = AffineResample(self.prior_grid, self.native_grid, self.native_to_prior)  # R
            self.weight = smooth_weight(self.region, self.native_grid.spacing)
            self.info["blend_fraction"] = round(float(self.weight.mean()), 4)

    def physics(self, op):
        """The operator the solver sees: A itself on the prior's grid, else M A R."""
        if self.resample is None:
            return op
        back = AffineResample(self.native_grid, self.prior_grid, np.linalg.inv(self.native_to_prior))
        mask = footprint_mask(op, self.region)
        if mask is not None:
            if not bool(mask.any()):
                raise InputError("None of the input's samples lies inside the prior's brain region after "
                                 "registration.", "Check the input's field of view, or try --registration affine.")
            self.info["samples_in_prior"] = round(float(mask.float().mean()), 4)
        return PriorSpaceOperator(op, self.resample, back, mask)

    def back(self, x_p: torch.Tensor, extras: dict, op, y: torch.Tensor, paste: bool, spread: str = "none"):
        """Step 4 for the output and any per-voxel maps (e.g. uncertainty: w R e_p); unchanged without resampling."""
        if self.resample is None:
            return x_p, extras
        with torch.no_grad():
            w = torch.as_tensor(self.weight, dtype=y.dtype, device=y.device)
            x = w * self.resample(x_p) + (1 - w) * op.upsample(y, "cubic")
            if paste:
                x = op.data_consistency(x, y, spread)
            return x, {k: w * self.resample(v) for k, v in extras.items()}


def link(native_grid: Grid, op, y: torch.Tensor, prior, mode: str = "auto", progress=None) -> NativeLink:
    """Step 1 of the module docstring; registration errors are InputErrors naming the fix."""
    check_mode(mode)
    pgrid = prior_grid(prior.card)
    if mode in ("auto", "none") and on_prior_grid(native_grid, pgrid):
        return NativeLink(native_grid, pgrid, {"mode": "none", "reason": "the input lies on the prior's grid (same "
                                               "axes and voxel size): cropped or padded onto it, not resampled"})
    reference, mask = prior_reference(prior)
    if mode == "none":
        t = np.eye(4)
        info = {"mode": "identity", "reason": "registration off: the input's physical coordinates are taken as the "
                "prior's", "native_to_prior": t.tolist()}
    else:
        how = "rigid" if mode == "auto" else mode
        if progress is not None:
            progress(0, 1, "registering the input to the prior's reference (%s)" % how)
        with torch.no_grad():
            fixed = op.upsample(y, "cubic").to("cpu", torch.float32).numpy()
        reg = register(Volume(np.ascontiguousarray(fixed), native_grid), reference, mask, how)
        t, info = reg.native_to_prior, reg.describe()
    return NativeLink(native_grid, pgrid, info, t, prior_region(native_grid, pgrid, reference.grid, mask, t))


def prior_region(native: Grid, prior: Grid, mask_grid: Grid, mask: np.ndarray, native_to_prior) -> np.ndarray:
    """C on G_n: the brain dilated DILATE_MM, where R samples wholly within G_p."""
    brain = _map_mask(mask, mask_grid, native, native_to_prior)
    if brain.any():
        brain = ndimage.distance_transform_edt(~brain, sampling=native.spacing) <= DILATE_MM
    return brain & _inside(native, prior, native_to_prior)


def smooth_weight(region: np.ndarray, spacing) -> np.ndarray:
    """w: C shrunk by the Gaussian's reach (4 sigma, rounded up to a voxel), then smoothed by SMOOTH_MM.

    So w > 0 only inside C: the prior's output is used only where the data constrained it, and w is exactly 0
    outside the prior's box.
    """
    sp = np.asarray(spacing, dtype=np.float64)
    reach = 4.0 * SMOOTH_MM + float(sp.max())
    core = region if region.all() else ndimage.distance_transform_edt(region, sampling=sp) > reach
    w = ndimage.gaussian_filter(core.astype(np.float32), SMOOTH_MM / sp, truncate=4.0, mode="nearest")
    return np.clip(w, 0.0, 1.0).astype(np.float32)


def footprint_mask(op, region: np.ndarray) -> Optional[torch.Tensor]:
    """M: LR samples drawing at most FOOTPRINT_TOL of their weight from outside C; None for k-space samples."""
    if op.spec.kind == "kspace":
        return None
    with torch.no_grad():
        outside = op.forward(torch.as_tensor(~region, dtype=torch.float64)).abs()
        total = op.forward(torch.ones(region.shape, dtype=torch.float64)).abs()
    return outside <= FOOTPRINT_TOL * total


def _inside(native: Grid, prior: Grid, native_to_prior) -> np.ndarray:
    """Voxels of G_n whose trilinear sample lies wholly within G_p (no zero padding mixed in)."""
    m = np.linalg.inv(index_to_physical_matrix(prior)) @ np.asarray(native_to_prior) @ index_to_physical_matrix(native)
    axes = [np.arange(n, dtype=np.float64) for n in native.shape]
    out = np.ones(native.shape, dtype=bool)
    for c in range(3):  # continuous prior index c as a sum of three broadcast 1D terms: no N x 3 array
        p = (m[c, 3] + m[c, 0] * axes[0][:, None, None] + m[c, 1] * axes[1][None, :, None]
             + m[c, 2] * axes[2][None, None, :])
        out &= (p >= -1e-6) & (p <= prior.shape[c] - 1 + 1e-6)
    return out


def _map_mask(mask: np.ndarray, mask_grid: Grid, native: Grid, native_to_prior) -> np.ndarray:
    """The mask (in the prior's physical space) on G_n, nearest neighbour."""
    img = to_sitk(Volume(np.ascontiguousarray(mask, dtype=np.float32), mask_grid))
    t = np.asarray(native_to_prior, dtype=np.float64)
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(t[:3, :3].ravel().tolist())
    tx.SetTranslation(t[:3, 3].tolist())
    out = sitk.Resample(img, [int(n) for n in native.shape], tx, sitk.sitkNearestNeighbor, native.origin,
                        native.spacing, native.direction, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0) > 0.5
