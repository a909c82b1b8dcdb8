"""Model cards of the pixel-space priors ("vdm" and "paired", schema 1) and writing a prior folder.

Kind "vdm": networks {"unet": 2D DiffusionModelUNet}; "vdm": {"gamma_table": gamma on a uniform grid of [0, 1],
"fourier_exponents": [...]}. The learned gamma is stored as a table because the prior store builds only MONAI
classes; a monotone table, linearly interpolated, is the same schedule.
Kind "paired": networks {"unet": 3D DiffusionModelUNet}; "schedule": cosine; "paired": {"patch", "residual_scale",
"operators": [operator descriptions it was trained on], "condition_names"}.
"""

import json
import os
from typing import Dict, Optional, Sequence, Tuple

import torch

from .cosine import CONDITION_NAMES, DEFAULT_SCHEDULE

LICENCE = "Apache-2.0"
INTENDED_USE = "Research only; not for clinical use. Outputs are AI-generated."


def vdm_card(name: str, gamma_table: Sequence[float], exponents: Sequence[int], grid_shape: Sequence[int],
             **fields) -> dict:
    card = _base(name, "vdm", grid_shape, fields)
    card["vdm"] = {"gamma_table": [float(v) for v in gamma_table], "fourier_exponents": [int(e) for e in exponents]}
    card.setdefault("method_defaults", {"kspace-vdm": {"cpu": {"steps": 25}, "cuda": {"steps": 250}}})
    return card


def paired_card(name: str, patch: Sequence[int], residual_scale: float, operators: Sequence[dict],
                grid_shape: Sequence[int], **fields) -> dict:
    card = _base(name, "paired", grid_shape, fields)
    card["schedule"] = dict(DEFAULT_SCHEDULE)
    card["paired"] = {"patch": [int(p) for p in patch], "residual_scale": float(residual_scale),
                      "operators": [dict(o) for o in operators], "condition_names": list(CONDITION_NAMES)}
    card.setdefault("method_defaults", {"paired-ddpm": {"cpu": {"steps": 10}, "cuda": {"steps": 50}}})
    return card


def _base(name, kind, grid_shape, fields) -> dict:
    card = {"schema": 1, "name": name, "kind": kind, "title": fields.pop("title", name),
            "description": fields.pop("description", ""), "networks": {}, "schedule": None,
            "grid": {"shape": [int(n) for n in grid_shape], "spacing": [1, 1, 1]},
            "intensity": {"range": [0, 1], "normalisation": "robust min-max (percentiles 0 and 99.5)"},
            "conditioning": None, "training": fields.pop("training", {}), "licence": fields.pop("licence", LICENCE),
            "intended_use": fields.pop("intended_use", INTENDED_USE)}
    card.update(fields)
    return card


def write_prior(folder: str, card: dict, networks: Dict[str, Tuple[torch.nn.Module, dict]],
                classes: Optional[Dict[str, str]] = None) -> dict:
    """Write `networks` {role: (module, kwargs)} as safetensors with checksums, and the card; returns the card."""
    from ..priors.networks import save_safetensors
    from ..training.trainer import atomic_write_text

    os.makedirs(folder, exist_ok=True)
    card = dict(card)
    card["networks"] = {}
    for role, (module, kwargs) in networks.items():
        fname = role + ".safetensors"
        digest = save_safetensors(module, os.path.join(folder, fname))
        card["networks"][role] = {"class": (classes or {}).get(role, "DiffusionModelUNet"), "kwargs": dict(kwargs),
                                  "weights": fname, "sha256": digest}
    atomic_write_text(os.path.join(folder, "model.json"), json.dumps(card, indent=1) + "\n")
    return card
