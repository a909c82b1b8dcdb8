"""Synthetic T1-like brains from the MNI152 template shipped inside nilearn (offline).

One seed -> one brain. Pseudo-code of `BrainSynth.sample(seed)`:
    1. draw every random number from `seed` (numpy for scalars, torch for fields)
    2. T(x) = c + A (x + u(x) - c) + t: small rotation/scaling + diffeomorphic flow (deform.py)
    3. sample template T1, GM, WM, brain mask and distance-to-brain at T(x) for the output points x
    4. tissue model: GM, WM, CSF intensities (+ a share of the template's own T1, mapped to the same contrast),
       optional head shell; `contrast` picks the tissue order (T1, T2, FLAIR, PD or random, see CONTRASTS)
    5. gamma contrast, low-order multiplicative bias field, scale so the 99.5th percentile is 1
    6. Rician noise, clip to [0, 1]
Optional shares of the brains come skull-stripped (`stripped_share`) or with folding of their own
(`folding_share`: a finer deformation on top of the smooth one).

Seeds below HELDOUT_START are for training, seeds from HELDOUT_START on are held out (never drawn by
the trainer), so held-out metrics are measured on brains no training step has seen.

Geometry: the output box is `shape` voxels of 1 mm centred on the template brain, orientation LAS by
default (the published prior's). Arrays are indexed [i, j, k]. With `downsample` f the grid has
spacing f mm and shape shape // f; its sample n sits at 1 mm index n * f + (f - 1) / 2 (the project's
LR grid rule), and the template is blurred first so the coarse grid is not aliased.
"""

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..volume import Grid
from .deform import Deformation, integrate_velocity, random_velocity, rotation_matrix

HELDOUT_START = 1_000_000
SEED_LIMIT = 2 ** 31 - 1
CONDITIONING_NAMES = ("contrast", "scale", "csf_volume", "brain_volume")
ORIENTATIONS = {"LAS": (-1.0, 1.0, 1.0), "RAS": (1.0, 1.0, 1.0)}  # sign of RAS axis along i, j, k
_SHELL_MM = 30.0
# Relative (CSF, GM, WM) intensity ranges of each contrast, the brightest tissue near 1. "t1" keeps the original
# draws (so training runs and held-out seeds made before contrasts existed render the same brains); "random"
# draws each tissue anywhere, SynthSR's domain randomisation, so the order of tissue brightness is random too.
CONTRASTS = {
    "t2": ((0.9, 1.0), (0.5, 0.7), (0.3, 0.5)),
    "flair": ((0.03, 0.15), (0.7, 0.9), (0.5, 0.68)),
    "pd": ((0.7, 0.9), (0.85, 1.0), (0.6, 0.8)),
    "random": ((0.03, 1.0), (0.03, 1.0), (0.03, 1.0)),
}


def split_of(seed: int) -> str:
    """'train' or 'heldout'."""
    if not 0 <= int(seed) <= SEED_LIMIT:
        raise InputError("Seed %d is out of range." % seed, "Use a seed between 0 and %d." % SEED_LIMIT)
    return "train" if int(seed) < HELDOUT_START else "heldout"


def split_seeds(split: str, count: int, start: int = 0):
    """The first `count` seeds of a split, from offset `start` inside it."""
    base = {"train": 0, "heldout": HELDOUT_START}.get(split)
    if base is None:
        raise InputError("Unknown split '%s'." % split, "Use 'train' or 'heldout'.")
    top = HELDOUT_START if split == "train" else SEED_LIMIT + 1
    if start < 0 or base + start + count > top:
        raise InputError("Seeds %d..%d do not fit in the %s split." % (start, start + count, split),
                         "Ask for fewer seeds or a smaller offset.")
    return list(range(base + start, base + start + count))


@dataclass
class SynthConfig:
    shape: Tuple[int, int, int] = (160, 224, 160)
    orientation: str = "LAS"
    downsample: int = 1
    head: bool = True              # synthetic CSF/skull/scalp shell around the (skull-stripped) template
    deform_std_mm: float = 2.5     # RMS of the velocity field
    deform_spacing_mm: float = 24.0
    max_rotation_deg: float = 8.0
    scale_range: Tuple[float, float] = (0.9, 1.1)
    anisotropy: float = 0.04
    max_translation_mm: float = 4.0
    gamma_range: Tuple[float, float] = (0.7, 1.4)
    bias_std: float = 0.15
    noise_range: Tuple[float, float] = (0.0, 0.03)
    template_mix: Tuple[float, float] = (0.2, 0.7)
    contrast: str = "t1"           # "t1" or a key of CONTRASTS; "mixed": a seed's own draw among all of them
    # share of brains drawn skull-stripped (no shell) although `head` is on: clinical inputs often come stripped,
    # and the brain's edge against air is then an edge the prior must have seen
    stripped_share: float = 0.0
    # share of brains drawn with folding of their own: a second, finer deformation on top of the smooth one, so
    # gyri and sulci bend where the average template's do not (a real brain's individual anatomy)
    folding_share: float = 0.0
    folding_spacing_mm: float = 10.0
    folding_std_mm: float = 2.0

    def __post_init__(self):
        self.shape = tuple(int(n) for n in self.shape)
        if len(self.shape) != 3 or min(self.shape) < 8:
            raise InputError("Grid shape %s is not a 3D shape of at least 8 voxels per axis." % (self.shape,),
                             "Give three sizes such as 160 224 160.")
        if self.orientation not in ORIENTATIONS:
            raise InputError("Orientation '%s' is not supported." % self.orientation, "Use LAS or RAS.")
        if int(self.downsample) < 1 or any(n % int(self.downsample) for n in self.shape):
            raise InputError("Downsample factor %s does not divide the grid shape %s." % (self.downsample, self.shape),
                             "Use a factor (1, 2, 4, ...) that divides every size.")
        self.downsample = int(self.downsample)
        if not 0.0 <= float(self.stripped_share) <= 1.0:
            raise InputError("Skull-stripped share %s is not a fraction." % self.stripped_share,
                             "Give a share between 0 and 1, e.g. --stripped-share 0.3.")
        if not 0.0 <= float(self.folding_share) <= 1.0:
            raise InputError("Folding share %s is not a fraction." % self.folding_share,
                             "Give a share between 0 and 1, e.g. --folding-share 0.3.")
        if self.contrast not in ("t1", "mixed") + tuple(CONTRASTS):
            raise InputError("Contrast '%s' is not supported." % self.contrast,
                             "Use t1, %s or mixed." % ", ".join(CONTRASTS))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class SynthSample:
    image: torch.Tensor            # float32 (i, j, k) in [0, 1]
    mask: torch.Tensor             # bool (i, j, k), brain
    conditioning: torch.Tensor     # float32 (4,) in [0, 1], CONDITIONING_NAMES
    corner: Tuple[int, int, int]   # index of image[0, 0, 0] on the (downsampled) output grid
    params: dict = field(default_factory=dict)


@functools.lru_cache(maxsize=1)
def load_templates():
    """(channels (5, X, Y, Z) float32, RAS origin of voxel 0 in mm, stats). Channels: T1, GM, WM, brain, closeness.

    closeness = 1 - min(distance to brain, 30 mm) / 30: 0 far outside, so zero padding is "no head".
    """
    from nilearn import datasets
    from scipy import ndimage

    t1_img = datasets.load_mni152_template(resolution=1)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(), dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), dtype=np.float32)
    t1 = np.asarray(t1_img.get_fdata(), dtype=np.float32)
    aff = np.asarray(t1_img.affine)
    if not np.allclose(aff[:3, :3], np.eye(3)):
        raise RuntimeError("nilearn's MNI152 template is expected at 1 mm RAS; affine is %s" % aff)
    t1 = t1 / max(float(t1.max()), 1e-6)
    brain = (t1 > 0.02).astype(np.float32)
    # The probability maps spill past the skull-stripped T1; outside it there is no brain to show.
    gm, wm = gm * brain, wm * brain
    dist = ndimage.distance_transform_edt(brain < 0.5).astype(np.float32)
    close = 1.0 - np.minimum(dist, _SHELL_MM) / _SHELL_MM
    chans = torch.from_numpy(np.stack([t1, gm, wm, brain, close]))
    nz = np.argwhere(brain > 0.5)
    stats = {
        "t1_wm": float(np.median(t1[wm > 0.9])),
        "t1_gm": float(np.median(t1[gm > 0.9])),
        "t1_csf": float(np.median(t1[(brain - gm - wm) > 0.9])),
        "bbox_centre": ((nz.min(0) + nz.max(0)) / 2.0).tolist(),
        "brain_ml": float(brain.sum()) / 1000.0,
        "csf_ml": float(np.clip(brain - gm - wm, 0, 1).sum()) / 1000.0,
    }
    return chans, aff[:3, 3].astype(np.float64), stats


@functools.lru_cache(maxsize=4)
def _blurred_templates(factor: int) -> torch.Tensor:
    """Templates averaged over boxes of `factor` mm, centred on each voxel.

    Kernel [1/2, 1, ..., 1, 1/2] / f (f + 1 taps): the average over a continuous box of width f of
    the trilinearly interpolated image, odd-length so it does not shift even factors by half a voxel.
    """
    chans, _, _ = load_templates()
    if factor == 1:
        return chans
    w = [0.5] + [1.0] * (factor - 1) + [0.5]
    h = factor // 2
    out = chans
    for axis in (1, 2, 3):
        n = out.shape[axis]
        pad = [0, 0] * 3
        pad[2 * (3 - axis)] = pad[2 * (3 - axis) + 1] = h  # F.pad lists the last axis first
        padded = F.pad(out[None], pad)[0]
        acc = torch.zeros_like(out)
        for tap, weight in enumerate(w):
            acc.add_(padded.narrow(axis, tap, n), alpha=weight / factor)
        out = acc
    return out.contiguous()


class BrainSynth:
    """Seeded, reproducible generator of synthetic T1-like brains (see module docstring)."""

    def __init__(self, config: Optional[SynthConfig] = None):
        self.config = config or SynthConfig()
        chans, origin, stats = load_templates()
        self.template_shape = tuple(chans.shape[1:])
        self.template_origin = origin
        self.stats = stats
        shape = np.asarray(self.config.shape, dtype=np.float64)
        centre = np.asarray(stats["bbox_centre"])
        # Voxel centres of the output land on template voxel centres when nothing moves (exact crop).
        self.first = np.floor(centre - (shape - 1) / 2.0)
        self.signs = np.asarray(ORIENTATIONS[self.config.orientation])
        if self.signs[0] < 0:
            self.first[0] = self.first[0] + shape[0] - 1  # LAS: output i runs from high to low template i

    @property
    def shape(self) -> Tuple[int, int, int]:
        f = self.config.downsample
        return tuple(n // f for n in self.config.shape)

    def grid(self) -> Grid:
        """The (downsampled) output grid in LPS physical space, for writing samples as images."""
        f = self.config.downsample
        p0 = self._template_points_1mm(np.full(3, (f - 1) / 2.0))
        ras = self.template_origin + p0
        lps_origin = (-ras[0], -ras[1], ras[2])
        direction = np.diag([-self.signs[0], -self.signs[1], self.signs[2]])
        return Grid(self.shape, (float(f),) * 3, lps_origin, direction)

    def _template_points_1mm(self, idx):
        """Template voxel coordinates of continuous 1 mm output indices (..., 3)."""
        return self.first + np.asarray(idx, dtype=np.float64) * self.signs

    # ---- randomness -------------------------------------------------------------------------------
    def params(self, seed: int) -> dict:
        """All scalar random choices of one brain (JSON-able)."""
        split_of(seed)
        c = self.config
        rng = np.random.default_rng([int(seed), 7919])
        u = rng.uniform
        wm = u(0.75, 1.0)
        gm = wm * u(0.55, 0.85)
        csf = gm * u(0.15, 0.5)
        rot = np.deg2rad(u(-c.max_rotation_deg, c.max_rotation_deg, 3))
        return {
            "seed": int(seed),
            "rotation_rad": rot.tolist(),
            "scale": float(u(*c.scale_range)),
            "anisotropy": u(-c.anisotropy, c.anisotropy, 3).tolist(),
            "translation_mm": u(-c.max_translation_mm, c.max_translation_mm, 3).tolist(),
            "intensity": {"wm": wm, "gm": gm, "csf": csf},
            "template_mix": float(u(*c.template_mix)),
            "shell_mm": np.sort(u(1.5, 4.0) + np.cumsum(u([3.0, 4.0, 3.0], [6.0, 9.0, 7.0]))).tolist(),
            "shell_intensity": {"skull": float(u(0.02, 0.15)), "scalp": float(u(0.5, 0.95)),
                                "marrow": float(u(0.2, 0.6))},
            "gamma": float(np.exp(u(np.log(c.gamma_range[0]), np.log(c.gamma_range[1])))),
            "bias": (rng.normal(0, c.bias_std, 9) / np.array([1, 1, 1, 2, 2, 2, 2, 2, 2])).tolist(),
            "noise": float(u(*c.noise_range)),
            "patch_rng": int(rng.integers(0, 2 ** 31 - 1)),
            **self._contrast(rng, wm, gm, csf),
            # drawn last, and only when asked for, so brains of earlier runs render as they did
            **({"stripped": bool(rng.uniform() < c.stripped_share)} if c.stripped_share > 0 else {}),
            **({"folding": bool(rng.uniform() < c.folding_share)} if c.folding_share > 0 else {}),
        }

    def _contrast(self, rng, wm, gm, csf) -> dict:
        """The seed's contrast and its tissue intensities; drawn after every T1 draw so T1 brains stay as they were."""
        name = self.config.contrast
        if name == "mixed":
            name = ("t1",) + tuple(CONTRASTS)
            name = name[int(rng.integers(0, len(name)))]
        if name == "t1":
            return {"contrast": "t1"}
        (c0, c1), (g0, g1), (w0, w1) = CONTRASTS[name]
        return {"contrast": name, "intensity": {"csf": float(rng.uniform(c0, c1)), "gm": float(rng.uniform(g0, g1)),
                                                "wm": float(rng.uniform(w0, w1))}}

    def deformation(self, seed: int, p: Optional[dict] = None) -> Deformation:
        c = self.config
        p = p or self.params(seed)
        scale = p["scale"] * (1.0 + np.asarray(p["anisotropy"]))
        # Output point x shows template point T(x); scaling the map by 1/s makes the brain s times larger.
        matrix = rotation_matrix(p["rotation_rad"]) @ np.diag(1.0 / scale)
        centre = np.asarray(self.stats["bbox_centre"])
        disp, lo, h = None, np.zeros(3), 4.0
        if c.deform_std_mm > 0:
            a = self._template_points_1mm(np.zeros(3))
            b = self._template_points_1mm(np.asarray(c.shape) - 1.0)
            lo = np.minimum(a, b) - h
            lat = [int(math.ceil((top - bottom) / h)) + 1 for bottom, top in zip(lo, np.maximum(a, b) + h)]
            gen = torch.Generator().manual_seed(int(seed) * 2 + 1)
            v = random_velocity(gen, lat, h, c.deform_spacing_mm, c.deform_std_mm)
            if p.get("folding"):
                # drawn after the smooth field from the same generator, which therefore stays as it was
                v = v + random_velocity(gen, lat, h, c.folding_spacing_mm, c.folding_std_mm)
            disp = integrate_velocity(v, h)
        return Deformation(matrix, centre, p["translation_mm"], disp, lo, h)

    # ---- rendering --------------------------------------------------------------------------------
    def _points(self, start, size, step: float = 1.0):
        """Template coordinates of output grid samples start..start+size (downsampled grid).

        Returns (points (a, b, c, 3), axes): the grid is axis-aligned in the template, so axes[d] holds
        the 1D coordinates along d, which lets separable terms (the bias field) skip a 3D stack.
        """
        f = self.config.downsample
        axes = []
        for d, (s, n) in enumerate(zip(start, size)):
            idx = (torch.arange(n, dtype=torch.float64) * step + s) * f + (f - 1) / 2.0
            axes.append((self.first[d] + idx * self.signs[d]).float())
        pts = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
        return pts, axes

    def _render(self, seed, p, deform, points, chans):
        points, axes = points
        tpts = deform(points)
        size = [n - 1 for n in self.template_shape]
        g = (2.0 * tpts / torch.tensor(size, dtype=torch.float32) - 1.0).flip(-1)
        s = F.grid_sample(chans[None], g[None], mode="bilinear", padding_mode="zeros", align_corners=True)[0]
        t1, gm, wm, brain, close = s
        it = p["intensity"]
        csf = (brain - gm - wm).clamp(0, 1)
        tissue = gm * it["gm"] + wm * it["wm"] + csf * it["csf"]
        templ = self._template_in_contrast(t1, it, p.get("contrast", "t1"))
        a = p["template_mix"]
        img = (1 - a) * tissue + a * templ
        if self.config.head and not p.get("stripped"):
            img = img + (1 - brain).clamp(0, 1) * self._shell(close, p)
        img = img.clamp_min(0) ** p["gamma"]
        return img * self._bias(axes, p), brain, csf

    def _template_in_contrast(self, t1, it, contrast):
        """The template's own T1 (its fine detail, beyond the tissue maps) in the brain's contrast: piecewise
        linear through the template's CSF, GM and WM levels onto the drawn intensities (T1: a plain scaling)."""
        st = self.stats
        if contrast == "t1":
            return t1 * (it["wm"] / st["t1_wm"])
        xs = [0.0, st["t1_csf"], st["t1_gm"], st["t1_wm"]]
        ys = [0.0, it["csf"], it["gm"], it["wm"]]
        out = torch.full_like(t1, ys[3]) + (t1 - xs[3]) * ((ys[3] - ys[2]) / (xs[3] - xs[2]))
        for a in (2, 1):  # below each level, the segment down to the next one
            seg = ys[a] + (t1 - xs[a]) * ((ys[a] - ys[a - 1]) / (xs[a] - xs[a - 1]))
            out = torch.where(t1 < xs[a], seg, out)
        return out.clamp_min(0)

    def _shell(self, close, p):
        """CSF gap, skull (with marrow), scalp as smooth layers of distance to the brain."""
        d = (1 - close) * _SHELL_MM
        d1, d2, d3 = p["shell_mm"]
        si = p["shell_intensity"]
        s1, s2, s3 = (torch.sigmoid((d - edge) / 0.7) for edge in (d1, d2, d3))
        csf = p["intensity"]["csf"]
        skull_mid = 0.5 * (d1 + d2)
        marrow = torch.exp(-0.5 * ((d - skull_mid) / (0.15 * (d2 - d1) + 0.3)) ** 2)
        skull = si["skull"] + (si["marrow"] - si["skull"]) * marrow
        return (csf * (1 - s1) + skull * (s1 - s2) + si["scalp"] * (s2 - s3)) * (close > 0)

    def _bias(self, axes, p):
        """exp of a quadratic polynomial of position normalised to about [-1, 1] over the output box."""
        centre = self._template_points_1mm((np.asarray(self.config.shape) - 1) / 2.0)
        q = [((a - float(c)) / (n / 2.0)) for a, c, n in zip(axes, centre, self.config.shape)]
        x, y, z = q[0][:, None, None], q[1][None, :, None], q[2][None, None, :]
        b = [float(v) for v in p["bias"]]
        lin = b[0] * x + b[3] * x * x + b[1] * y + b[4] * y * y + b[2] * z + b[5] * z * z
        return torch.exp(lin + b[6] * x * y + b[7] * y * z + b[8] * x * z)

    def sample(self, seed: int, patch: Optional[Sequence[int]] = None, corner: Optional[Sequence[int]] = None,
               split: Optional[str] = None) -> SynthSample:
        """One brain (or a patch of it: the exact crop of the whole brain at `corner`, random if None)."""
        if split is not None and split_of(seed) != split:
            raise InputError("Seed %d belongs to the %s split, not %s." % (seed, split_of(seed), split),
                             "Draw training seeds below %d and held-out seeds from it on." % HELDOUT_START)
        p = self.params(seed)
        deform = self.deformation(seed, p)
        chans = _blurred_templates(self.config.downsample)
        full = self.shape
        if patch is None:
            size, start = full, (0, 0, 0)
        else:
            size = tuple(int(n) for n in patch)
            if len(size) != 3 or any(n < 1 or n > m for n, m in zip(size, full)):
                raise InputError("Patch %s does not fit the grid %s." % (size, full), "Use a smaller patch.")
            if corner is None:
                rng = np.random.default_rng(p["patch_rng"])
                corner = [int(rng.integers(0, m - n + 1)) for n, m in zip(size, full)]
            start = tuple(int(c) for c in corner)
            if any(s < 0 or s + n > m for s, n, m in zip(start, size, full)):
                raise InputError("Patch corner %s with size %s leaves the grid %s." % (start, size, full),
                                 "Choose a corner inside the grid.")
        # The intensity scale comes from a coarse render of the whole box, so a patch and the full
        # volume share it exactly.
        coarse = self._points((0, 0, 0), [int(math.ceil(m / 4.0)) for m in full], step=4.0)
        cimg, cbrain, ccsf = self._render(seed, p, deform, coarse, chans)
        ref = float(torch.quantile(cimg.flatten()[::7], 0.995)) or 1.0
        img, brain, _ = self._render(seed, p, deform, self._points(start, size), chans)
        img = img / ref
        if p["noise"] > 0:
            gen = torch.Generator().manual_seed(int(seed) * 2 + 2)
            noise = torch.randn((2, *full), generator=gen)
            sl = tuple(slice(s, s + n) for s, n in zip(start, size))
            n1, n2 = noise[(0,) + sl], noise[(1,) + sl]
            img = torch.sqrt((img + p["noise"] * n1) ** 2 + (p["noise"] * n2) ** 2)
        img = img.clamp(0, 1).contiguous()
        voxel_ml = (4.0 * self.config.downsample) ** 3 / 1000.0
        c = self.config
        cond = torch.tensor([
            (math.log(p["gamma"]) - math.log(c.gamma_range[0])) / max(math.log(c.gamma_range[1] / c.gamma_range[0]), 1e-6),
            (p["scale"] - c.scale_range[0]) / max(c.scale_range[1] - c.scale_range[0], 1e-6),
            (float(ccsf.sum()) * voxel_ml / self.stats["csf_ml"] - 0.5) / 1.0,
            (float(cbrain.sum()) * voxel_ml / self.stats["brain_ml"] - 0.6) / 0.8,
        ], dtype=torch.float32).clamp(0, 1)
        return SynthSample(img, brain > 0.5, cond, start, p)


def stream(config: Optional[SynthConfig] = None, split: str = "train", start: int = 0, patch=None):
    """Endless iterator of samples over the seeds of one split, in order from `start`."""
    synth = BrainSynth(config)
    n = start
    while True:
        seed = split_seeds(split, 1, n)[0]
        yield synth.sample(seed, patch=patch)
        n += 1
