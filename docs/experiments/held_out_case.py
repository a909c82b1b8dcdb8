"""One held-out synthetic head degraded along k as a run would see it: the experiment scripts here share it."""
from dataclasses import replace

import torch

from MRISuperResLib.bench.cases import held_out_draw
from MRISuperResLib.metrics import head_mask
from MRISuperResLib.physics import OperatorSpec, lr_grid
from MRISuperResLib.volume import Volume

DEGRADATIONS = {"sr8": ("slice-removal", 8), "sr4": ("slice-removal", 4), "ts5": ("thick-slice", 5)}


def degraded(name, deg):
    """(hr, spec, op, y, lr, mask, data range): the head (`bench --cases` name), the operator's spec and the bound
    operator, the LR data as a tensor and as a Volume, the head mask and the range PSNR is scored on."""
    kind, factor = DEGRADATIONS[deg]
    hr = held_out_draw(name).load()
    spec = OperatorSpec.make(kind, 2, factor)
    op = replace(spec.bind_hr(hr.grid.shape), hr_spacing=tuple(hr.grid.spacing))
    y = op.forward(torch.as_tensor(hr.array, dtype=torch.float64)).float()
    lr = Volume(y.numpy(), lr_grid(hr.grid, op))
    return hr, spec, op, y, lr, head_mask(hr), float(hr.array.max() - hr.array.min())
