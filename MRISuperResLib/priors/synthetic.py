"""Priors with random weights: for profiling the published architecture and for tests on tiny ones.

They are real MONAI networks and real priors in every respect except training.
"""

import copy
from typing import Optional, Sequence

import torch

from . import card as cards
from . import folder as folders
from .store import Prior


def tiny_card(name: str = "tiny-ldm", image: Sequence[int] = (16, 16, 16), channels: Sequence[int] = (8, 8),
              unet_channels: Sequence[int] = (8, 8), conditioning: bool = True, groups: int = 4,
              orientation: str = "LPS") -> dict:
    """A small LDM card of the published prior's topology (no attention in the AE, cross-attention in the UNet).

    Random weights have no anatomy, so the grid defaults to ITK's identity frame (LPS, box centred on the origin):
    plain arrays (Volume.from_array) then lie on the prior's axes, as inputs already in its space do.
    """
    down = 2 ** (len(channels) - 1)
    latent = [3] + [int(s) // down for s in image]
    n_cond = 4 if conditioning else 0
    return {
        "schema": 1, "name": name, "kind": "ldm", "title": "Tiny random LDM", "description": "random weights",
        "networks": {
            "autoencoder": {"class": "AutoencoderKL", "weights": "autoencoder.safetensors", "sha256": None, "kwargs": {
                "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 3,
                "channels": list(channels), "num_res_blocks": 1, "norm_num_groups": groups, "norm_eps": 1e-6,
                "attention_levels": [False] * len(channels), "with_encoder_nonlocal_attn": False,
                "with_decoder_nonlocal_attn": False}},
            "unet": {"class": "DiffusionModelUNet", "weights": "unet.safetensors", "sha256": None, "kwargs": {
                "spatial_dims": 3, "in_channels": 3 + n_cond, "out_channels": 3, "channels": list(unet_channels),
                "num_res_blocks": 1, "attention_levels": [False] + [True] * (len(unet_channels) - 1),
                "num_head_channels": [0] + list(unet_channels[1:]), "norm_num_groups": groups, "norm_eps": 1e-6,
                "resblock_updown": True, "with_conditioning": conditioning, "transformer_num_layers": 1,
                "cross_attention_dim": 4 if conditioning else None, "upcast_attention": True}},
        },
        "schedule": {"type": "scaled_linear_beta", "num_train_timesteps": 1000, "beta_start": 0.0015,
                     "beta_end": 0.0205, "prediction": "epsilon"},
        "latent": {"scale_factor": 1.0, "channels": 3, "shape": latent},
        "grid": {"shape": list(image), "spacing": [1.0, 1.0, 1.0], "orientation": orientation,
                 "space": "MNI-like"},
        "intensity": {"range": [0.0, 1.0], "normalisation": "none"},
        "conditioning": {"names": ["gender", "age", "ventricular_volume", "brain_volume"],
                         "default": [0.5] * 4, "as_channels": True, "as_context": True} if conditioning else None,
        "training": {"data": "none (random weights)", "command": None, "steps": 0, "held_out_metrics": {}},
        "licence": "Apache-2.0", "intended_use": "tests and profiling only", "method_defaults": {},
    }


def random_prior(card: dict, seed: int = 0, device="cpu", image_shape: Optional[Sequence[int]] = None) -> Prior:
    """A Prior with the card's architecture and seeded random weights; `image_shape` resizes its grid."""
    card = copy.deepcopy(card)
    if image_shape is not None:
        down = 2 ** (len(card["networks"]["autoencoder"]["kwargs"]["channels"]) - 1)
        card["grid"]["shape"] = [int(s) for s in image_shape]
        card["latent"]["shape"] = [card["latent"]["shape"][0]] + [int(s) // down for s in image_shape]
    cards.check_card(card, "of the random prior")
    torch.manual_seed(seed)
    if torch.device(device).type == "cuda":
        torch.cuda.manual_seed_all(seed)
    nets = {role: folders.build(spec, device=device) for role, spec in card["networks"].items()}
    for net in nets.values():
        _randomise_zero_init(net)
    return Prior(card, nets, None)


def _randomise_zero_init(net: torch.nn.Module, std: float = 0.05) -> None:
    # MONAI zero-initialises output convolutions (a fresh UNet predicts eps = 0 whatever its input), which would
    # make a random prior ignore its conditioning and hide bugs; give those weights small random values.
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and not bool(p.any()):
                p.normal_(0.0, std)


def write_prior(prior: Prior, folder: str) -> str:
    """Save a prior as a store folder: safetensors weights and model.json with their sha256."""
    folders.write_prior(folder, copy.deepcopy(prior.card), prior.networks)
    return folder
