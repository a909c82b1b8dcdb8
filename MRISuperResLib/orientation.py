"""Orientation codes: which anatomical direction each index axis of a grid points to, and turning arrays between
codes.

A code is three letters, one per index axis i, j, k, each naming where the axis points in ITK's physical (LPS)
space (L or R, P or A, S or I), e.g. "LAS" for the published prior's grid. `direction_of` and `orientation_code`
convert between a code and the axis-aligned ITK direction; `reorientation` gives the permutation and flips that
present an array labelled with one code in another.
"""

from typing import Optional, Tuple

import torch

# ITK physical space is LPS: +x towards Left, +y towards Posterior, +z towards Superior.
_LABELS = (("L", "R"), ("P", "A"), ("S", "I"))


def orientation_code(direction) -> str:
    """Three letters naming where each index axis points (ITK direction, row-major 3x3; column a = axis a)."""
    d = [[float(v) for v in row] for row in _rows(direction)]
    code = ""
    for a in range(3):
        col = [d[r][a] for r in range(3)]
        r = max(range(3), key=lambda i: abs(col[i]))
        code += _LABELS[r][0 if col[r] > 0 else 1]
    return code


def direction_of(code: str) -> Tuple[float, ...]:
    """The axis-aligned ITK direction (row-major 3x3) an orientation code names; inverse of `orientation_code`."""
    d = [[0.0] * 3 for _ in range(3)]
    rows = set()
    for a, letter in enumerate(str(code).upper()[:3]):
        for r, (pos, neg) in enumerate(_LABELS):
            if letter in (pos, neg):
                d[r][a] = 1.0 if letter == pos else -1.0
                rows.add(r)
    if len(str(code)) != 3 or len(rows) != 3:
        raise ValueError("orientation %r does not name three different axes (e.g. LAS, RAS, LPS)" % (code,))
    return tuple(v for row in d for v in row)


def reorientation(source: str, target: str):
    """(perm, flips) with y = flip(x.permute(perm), flips) turning axes labelled `source` into `target`.

    Used to present an input to a prior in the card's orientation (e.g. "LAS"); `undo_reorientation` inverts it.
    """
    pairs = {"L": "R", "R": "L", "P": "A", "A": "P", "S": "I", "I": "S"}
    perm, flips = [], []
    for t in target.upper():
        for a, s in enumerate(source.upper()):
            if s == t or s == pairs[t]:
                perm.append(a)
                if s != t:
                    flips.append(len(perm) - 1)
                break
        else:
            raise ValueError("orientation %s has no axis along %s" % (source, t))
    return tuple(perm), tuple(flips)


def network_view(trained_direction, direction, to_k: Optional[int] = None):
    """(perm, flips, codes) presenting an array on grid `direction` to a network trained on arrays on
    `trained_direction` (apply_reorientation), with the array's index axis `to_k` at k: the training axis that
    runs where `to_k` does trades places with k. codes = {"input": code, "network": code}, or None when a
    direction is unknown or oblique near 45 degrees; then the only change is `to_k` swapped with k.
    """
    if trained_direction is not None and direction is not None:
        source, target = orientation_code(direction), list(orientation_code(trained_direction))
        if to_k is not None:
            along = {letter: r for r, pair in enumerate(_LABELS) for letter in pair}
            v = [along[c] for c in target].index(along[source[int(to_k)]])
            target[v], target[2] = target[2], target[v]
        try:
            perm, flips = reorientation(source, "".join(target))
            return list(perm), list(flips), {"input": source, "network": "".join(target)}
        except ValueError:  # two index axes along one anatomical axis
            pass
    perm = [0, 1, 2]
    if to_k is not None:
        perm[int(to_k)], perm[2] = perm[2], perm[int(to_k)]
    return perm, [], None


def apply_reorientation(x: torch.Tensor, perm, flips) -> torch.Tensor:
    n = x.dim()
    y = x.permute(*range(n - 3), *[n - 3 + p for p in perm])
    return y.flip([n - 3 + f for f in flips]) if flips else y


def undo_reorientation(y: torch.Tensor, perm, flips) -> torch.Tensor:
    n = y.dim()
    x = y.flip([n - 3 + f for f in flips]) if flips else y
    inv = [perm.index(a) for a in range(3)]
    return x.permute(*range(n - 3), *[n - 3 + p for p in inv])


def _rows(direction):
    flat = [float(v) for v in (direction.flatten() if hasattr(direction, "flatten") else _flatten(direction))]
    return [flat[0:3], flat[3:6], flat[6:9]]


def _flatten(seq):
    out = []
    for v in seq:
        out.extend(_flatten(v) if isinstance(v, (list, tuple)) else [v])
    return out
