import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Tiny test networks run far faster on one thread than on two contended ones.
torch.set_num_threads(1)


def _devices():
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append(pytest.param("cuda", marks=pytest.mark.gpu))
    return out


@pytest.fixture(params=_devices())
def device(request):
    """CPU always; CUDA too when present (marked gpu)."""
    return torch.device(request.param)


def rotation(ax, ay, az):
    """A proper rotation matrix from three angles (radians)."""
    cx, cy, cz = np.cos([ax, ay, az])
    sx, sy, sz = np.sin([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def smooth_volume(shape, seed=0, scale=4.0):
    """A smooth random volume (low-pass noise), values roughly in [0, 1]."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    v = ndimage.gaussian_filter(rng.standard_normal(shape), scale)
    v = (v - v.min()) / (v.max() - v.min())
    return v.astype(np.float32)


def phantom(shape, seed=0):
    """A head-like phantom: an ellipsoid 'skull' shell, a brighter textured interior, dark background."""
    i, j, k = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt((i / 0.8) ** 2 + (j / 0.85) ** 2 + (k / 0.75) ** 2)
    tex = smooth_volume(shape, seed, scale=2.0)
    v = np.where(r < 0.85, 0.4 + 0.6 * tex, 0.0) + np.where((r >= 0.85) & (r < 1.0), 0.9, 0.0)
    return v.astype(np.float32)


# Two builds of one network with the same weights can take different kernels (fused attention blocks its softmax
# sums differently; each CPU's vector width changes summation order), so their outputs agree only to float32
# rounding. A reordered sum of n terms moves by at most about n * eps * sum|terms|; 2^-14 of the output's scale
# (128 float32 eps) covers the few hundred terms of these tiny networks' reductions and is far below any real
# difference (a wrong weight or layer moves outputs by 1e-2 and more).
FLOAT32_PATH_TOLERANCE = 2.0 ** -14


def assert_same_to_float32_rounding(a, b):
    """a equals b up to the rounding of a different float32 kernel path (see FLOAT32_PATH_TOLERANCE)."""
    scale = max(float(b.abs().max()), 1.0)
    diff = float((a - b).abs().max())
    assert diff <= FLOAT32_PATH_TOLERANCE * scale, "max |a - b| = %.3g > %.3g" % (diff, FLOAT32_PATH_TOLERANCE * scale)


@pytest.fixture
def scene():
    """A fresh slicer-core scene as slicer.mrmlScene, cleared afterwards (the Slicer-side tests)."""
    slicer = pytest.importorskip("slicer")
    s = slicer.vtkMRMLScene()
    slicer.mrmlScene = s
    yield s
    s.Clear(1)


def check_answer_independent_of_storage(run, prior, lps):
    """`run(prior, volume)` gives the same answer for the scan `lps` (identity direction: rows run posterior, as
    Slicer loads DICOM) and for the same physical scan stored LAS (rows anterior), with a prior whose card says it
    trained on LAS arrays; with a card that names no orientation, each array is shown as stored: other answers."""
    import copy

    from MRISuperResLib.priors.store import Prior
    from MRISuperResLib.volume import Grid, Volume

    las = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    card = copy.deepcopy(prior.card)
    card["grid"]["direction"] = list(las)
    oriented = Prior(card, prior.networks)
    g = lps.grid
    stored_las = Volume(np.ascontiguousarray(lps.array[:, ::-1]),
                        Grid(g.shape, g.spacing, g.index_to_physical((0, g.shape[1] - 1, 0)), las))
    a, b = run(oriented, lps), run(oriented, stored_las)
    assert a.info["view"] == {"input": "LPS", "network": "LAS"} and b.info["view"] == {"input": "LAS", "network": "LAS"}
    np.testing.assert_allclose(a.volume.array, b.volume.array[:, ::-1], rtol=0, atol=1e-5 * np.ptp(a.volume.array))
    np.testing.assert_allclose(a.volume.grid.index_to_physical((0, 0, 0)),
                               b.volume.grid.index_to_physical((0, b.volume.grid.shape[1] - 1, 0)), atol=1e-6)
    c, d = run(prior, lps), run(prior, stored_las)
    assert c.info["view"] is None and not np.allclose(c.volume.array, d.volume.array[:, ::-1], atol=1e-3)
