"""Where a prior's grid lies in physical (LPS) space, and the reference image native inputs are registered to.

Grid: shape and spacing from the card; origin and direction from the card when it gives them (exported priors
do). Older cards name only an orientation code: the direction then follows from the code and the box is centred
on the physical origin, which MNI-like spaces put near the middle of the brain.

Reference: the card's `reference` files (mean brain and brain mask, sha256-checked) when present. Otherwise the
prior's decoder applied to the zero latent, the centre of the latent distribution, with a brain mask from
Otsu's threshold, its largest component and its holes filled (metrics.head_mask).
"""

import os
import weakref
from typing import Optional, Tuple

import numpy as np
import torch

from ..errors import InputError
from ..metrics import head_mask
from ..orientation import direction_of
from ..volume import Grid, Volume, read_volume

# Decoding the zero latent of the published prior takes minutes on a CPU, and reading and checking the files
# costs seconds; a benchmark or batch reuses one prior for many runs, so the reference lives as long as its prior.
_CACHE = weakref.WeakKeyDictionary()


def card_direction(card: dict) -> Optional[np.ndarray]:
    """The direction (3x3, LPS) of the arrays the prior trained on: grid.direction, else what grid.orientation
    names; None when the card says neither."""
    g = card.get("grid") or {}
    if g.get("direction") is not None:
        return np.asarray(g["direction"], dtype=np.float64).reshape(3, 3)
    if not g.get("orientation"):
        return None
    try:
        return np.asarray(direction_of(g["orientation"])).reshape(3, 3)
    except ValueError as exc:
        raise InputError("Model card: grid.orientation is not usable (%s)." % exc,
                         "Give grid.direction (9 numbers, LPS) or an orientation code such as LAS.") from None


def prior_grid(card: dict) -> Grid:
    g = card.get("grid") or {}
    shape = tuple(int(n) for n in g["shape"])
    spacing = [float(s) for s in (g.get("spacing") or (1.0, 1.0, 1.0))]
    direction = card_direction(card)
    if direction is None:
        direction = np.asarray(direction_of("LPS")).reshape(3, 3)
    if g.get("origin") is not None:
        origin = np.asarray(g["origin"], dtype=np.float64)
    else:
        origin = -direction @ ((np.asarray(shape) - 1) / 2.0 * np.asarray(spacing))
    return Grid(shape, spacing, origin, direction)


def prior_reference(prior) -> Tuple[Volume, np.ndarray]:
    """(reference image, boolean brain mask on its grid), in the prior's physical space."""
    if prior not in _CACHE:
        ref = (prior.card or {}).get("reference")
        _CACHE[prior] = _read_reference(prior, ref) if ref else _decoded_reference(prior)
    return _CACHE[prior]


def _read_reference(prior, ref: dict) -> Tuple[Volume, np.ndarray]:
    from .folder import file_digest

    folder = getattr(prior, "folder", None)
    if not folder:
        raise InputError("Prior '%s' names reference files but has no folder to read them from." % prior.name,
                         "Load the prior from its folder (--model PATH).")
    sums = ref.get("sha256") or {}
    vols = []
    for key in ("image", "mask"):
        name = ref.get(key)
        path = os.path.join(folder, str(name))
        if not name or not os.path.isfile(path):
            raise InputError("The reference %s of prior '%s' is missing (%s)." % (key, prior.name, path),
                             "Re-export or re-import the prior.")
        want = sums.get(name)
        got = file_digest(path)
        if not want or got != want:
            raise InputError("Reference file %s of prior '%s' is corrupt, changed or unchecked (sha256 %s, card "
                             "says %s)." % (path, prior.name, got, want), "Re-export or re-import the prior.")
        vols.append(read_volume(path))
    image, mask = vols
    if not image.grid.allclose(mask.grid, atol=1e-4):
        raise InputError("The reference image and mask of prior '%s' are on different grids." % prior.name,
                         "Re-export the prior.")
    return image, mask.array > 0.5


def _decoded_reference(prior) -> Tuple[Volume, np.ndarray]:
    from .generator import LatentGenerator

    gen = LatentGenerator(prior, checkpointing=False)
    with torch.no_grad():
        z = torch.zeros((1,) + gen.latent_shape, device=prior.device)
        x = gen.decode(z)[0, 0].to("cpu", torch.float32).numpy()
    image = Volume(np.ascontiguousarray(x), prior_grid(prior.card), description="decoded zero latent")
    return image, head_mask(image)
