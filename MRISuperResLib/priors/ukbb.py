"""The published UK Biobank brain LDM (Pinaya et al. 2022), used by InverseSR: its card and how to get it.

Facts (FACTS.md section 1): MONAI model-zoo bundle `brain_image_synthesis_latent_diffusion_model`,
Apache-2.0, research use only. Weights in the old monai-generative key layout; architecture below gives
13,766,248 (autoencoder) and 553,168,899 (UNet) parameters.
"""

import copy

NAME = "ukbb-brain-ldm"
BUNDLE = "brain_image_synthesis_latent_diffusion_model"

AUTOENCODER_KWARGS = {
    "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 3,
    "channels": [64, 128, 128, 128], "num_res_blocks": 2, "norm_num_groups": 32, "norm_eps": 1e-6,
    "attention_levels": [False, False, False, False],
    "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False,
}
UNET_KWARGS = {
    "spatial_dims": 3, "in_channels": 7, "out_channels": 3, "channels": [256, 512, 768], "num_res_blocks": 2,
    "attention_levels": [False, True, True], "num_head_channels": [0, 512, 768], "norm_num_groups": 32,
    "norm_eps": 1e-6, "resblock_updown": True, "with_conditioning": True, "transformer_num_layers": 1,
    "cross_attention_dim": 4, "upcast_attention": True,
}
AUTOENCODER_PARAMETERS = 13766248
UNET_PARAMETERS = 553168899

# role -> ({accepted file names}, md5 of the published file, size in bytes for messages)
WEIGHT_FILES = {
    "autoencoder": (("autoencoder.pt", "autoencoder.pth"), "329e97b3085643ff235f11f049856242", "55.1 MB"),
    "unet": (("model.pt", "diffusion_model.pth"), "21c3047556fb671caf0556f1cce6ef22", "2.21 GB"),
}

_PAPER = {"iterations": 601, "lr": 0.07}

CARD = {
    "schema": 1,
    "name": NAME,
    "kind": "ldm",
    "title": "UK Biobank brain LDM (Pinaya et al. 2022)",
    "description": "Latent diffusion model of T1-weighted adult brains (head, not skull-stripped), conditioned on "
                   "sex, age, ventricular and brain volume. The prior InverseSR was published with.",
    "networks": {
        "autoencoder": {"class": "AutoencoderKL", "kwargs": AUTOENCODER_KWARGS,
                        "weights": "autoencoder.safetensors", "sha256": None},
        "unet": {"class": "DiffusionModelUNet", "kwargs": UNET_KWARGS, "weights": "unet.safetensors",
                 "sha256": None},
    },
    "schedule": {"type": "scaled_linear_beta", "num_train_timesteps": 1000, "beta_start": 0.0015,
                 "beta_end": 0.0205, "prediction": "epsilon"},
    "latent": {"scale_factor": 1.0, "channels": 3, "shape": [3, 20, 28, 20]},
    "grid": {"shape": [160, 224, 160], "spacing": [1.0, 1.0, 1.0], "orientation": "LAS", "space": "MNI-like"},
    "intensity": {"range": [0.0, 1.0], "normalisation": "min-max per volume (robust: percentiles 0 and 99.5)",
                  "percentiles": [0.0, 99.5]},
    "conditioning": {"names": ["gender", "age", "ventricular_volume", "brain_volume"],
                     "default": [0.5, 0.5, 0.5, 0.5], "as_channels": True, "as_context": True},
    "training": {"data": "31,740 UK Biobank T1w scans, rigidly registered to MNI-like space, 1 mm, 160x224x160",
                 "command": "Pinaya et al. 2022, 'Brain imaging generation with latent diffusion models'",
                 "steps": None, "held_out_metrics": {}},
    "licence": "Apache-2.0 (MONAI model zoo bundle %s)" % BUNDLE,
    "intended_use": "Research only, not for clinical use. Inputs must be T1w, rigidly aligned to MNI space.",
    "source": {"bundle": BUNDLE, "files": {role: names[0] for role, (names, _, _) in WEIGHT_FILES.items()},
               "md5": {role: md5 for role, (_, md5, _) in WEIGHT_FILES.items()}},
    "method_defaults": {
        "inversesr-decoder": {"cpu": dict(_PAPER), "cuda": dict(_PAPER)},
        "inversesr-ldm": {"cpu": dict(_PAPER, ddim_steps=46), "cuda": dict(_PAPER, ddim_steps=46)},
    },
}

INSTALL_HINT = (
    "Download the MONAI model-zoo bundle '%s' (e.g. `python -m monai.bundle download %s --bundle_dir DIR` on a "
    "machine with internet, or from the MONAI model zoo web page), then run "
    "`python -m MRISuperResLib models import DIR/%s` (the folder, its zip, or the two files models/autoencoder.pt "
    "and models/model.pt)." % (BUNDLE, BUNDLE, BUNDLE))


def card() -> dict:
    """A fresh copy of the published prior's card (weights' sha256 filled in at import)."""
    return copy.deepcopy(CARD)
