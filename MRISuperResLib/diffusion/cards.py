"""Model cards of the pixel-space priors ("vdm" and "paired", schema 1) and writing a prior folder.

Kind "vdm": networks {"unet": 2D DiffusionModelUNet}; "vdm": {"gamma_table": gamma on a uniform grid of [0, 1],
"fourier_exponents": [...]}. The learned gamma is stored as a table because the prior store builds only MONAI
classes; a monotone table, linearly interpolated, is the same schedule.
Kind "paired": networks {"unet": 3D DiffusionModelUNet}; "schedule": cosine; "paired": {"patch", "residual_scale",
"operators": [operator descriptions it was trained on], "condition_names"}.
"""

from typing import Dict, Optional, Sequence, Tuple

import torch

from ..priors.card import fresh_method_defaults
from ..priors.folder import write_prior as write_networks_and_card
from .cosine import DEFAULT_SCHEDULE
from .paired_model import CONDITION_NAMES

LICENCE = "Apache-2.0"
INTENDED_USE = "Research only; not for clinical use. Outputs are AI-generated."


def vdm_card(name: str, gamma_table: Sequence[float], exponents: Sequence[int], grid_shape: Sequence[int],
             **fields) -> dict:
    card = _base(name, "vdm", grid_shape, fields)
    card["vdm"] = {"gamma_table": [float(v) for v in gamma_table], "fourier_exponents": [int(e) for e in exponents]}
    card.setdefault("method_defaults", fresh_method_defaults("vdm"))
    return card


def paired_card(name: str, patch: Sequence[int], residual_scale: float, operators: Sequence[dict],
                grid_shape: Sequence[int], **fields) -> dict:
    card = _base(name, "paired", grid_shape, fields)
    card["schedule"] = dict(DEFAULT_SCHEDULE)
    card["paired"] = {"patch": [int(p) for p in patch], "residual_scale": float(residual_scale),
                      "operators": [dict(o) for o in operators], "condition_names": list(CONDITION_NAMES)}
    card.setdefault("method_defaults", fresh_method_defaults("paired"))
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
    card = dict(card)
    card["networks"] = {role: {"class": (classes or {}).get(role, "DiffusionModelUNet"), "kwargs": dict(kwargs)}
                        for role, (_, kwargs) in networks.items()}
    return write_networks_and_card(folder, card, {role: module for role, (module, _) in networks.items()})
