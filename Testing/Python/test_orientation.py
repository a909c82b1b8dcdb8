"""Orientation codes of grids, and turning arrays between them."""

import pytest
import torch

from MRISuperResLib.orientation import apply_reorientation, orientation_code, reorientation, undo_reorientation


def test_orientation_codes_and_reorientation():
    assert orientation_code([1, 0, 0, 0, 1, 0, 0, 0, 1]) == "LPS"  # ITK identity
    assert orientation_code([[-1, 0, 0], [0, -1, 0], [0, 0, 1]]) == "RAS"
    assert orientation_code([[0, 0, -1], [0.1, -0.99, 0], [0.99, 0.1, 0]]) == "SAR"
    perm, flips = reorientation("RAS", "LAS")
    assert perm == (0, 1, 2) and flips == (0,)
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    for src in ("SAR", "LPI", "ASL", "LAS"):
        perm, flips = reorientation(src, "LAS")
        y = apply_reorientation(x, perm, flips)
        assert torch.equal(undo_reorientation(y, perm, flips), x)
    perm, flips = reorientation("SAR", "LAS")  # i points Superior, j Anterior, k Right
    y = apply_reorientation(x[0], perm, flips)
    assert y.shape == (5, 4, 3) and y[0, 0, 0] == x[0, 0, 0, 4]
    with pytest.raises(ValueError):
        reorientation("LLS", "LAS")
