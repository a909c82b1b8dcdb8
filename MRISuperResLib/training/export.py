"""Writing a trained run as a prior folder (`model.json`, its README.md card, safetensors), through priors/folder.py.

The card follows the agreed schema (schema 1); each weight file's sha256 is recorded in it and
checked on every load.
"""

import os

import numpy as np
import torch

from ..priors.folder import file_digest, write_prior


def export_prior(task, folder, name, title="", description="", training=None, method_defaults=None,
                 extra=None) -> dict:
    """Write the task's networks and its card into `folder`; returns the card."""
    os.makedirs(folder, exist_ok=True)
    networks = {role: {"class": cls_name, "kwargs": kwargs} for role, (cls_name, _, kwargs) in task.networks().items()}
    synth = task.synth
    f = synth.config.downsample
    card = {
        "schema": 1, "name": name, "kind": None, "title": title or name, "description": description,
        "networks": networks, "schedule": None, "latent": None,
        "grid": {"shape": list(synth.shape), "spacing": [float(f)] * 3, "orientation": synth.config.orientation,
                 "origin": [float(v) for v in synth.grid().origin],
                 "direction": [float(v) for v in np.asarray(synth.grid().direction).ravel()],
                 "space": "MNI-like (MNI152 2009a box; LPS direction %s)" % list(synth.grid().direction)},
        "intensity": {"range": [0, 1], "normalisation": "min-max per volume (robust: percentiles 0 and 99.5)"},
        "conditioning": None,
        "training": training or {},
        "licence": "Apache-2.0 (weights trained here on synthetic brains from the MNI152 2009a template, "
                   "which nilearn distributes under its own permissive terms)",
        "intended_use": "Research only; not for clinical use. Outputs are AI-generated.",
        "method_defaults": method_defaults or {},
    }
    card.update(task.card())
    if method_defaults:  # the command line's settings win over the task's built-in ones, method by method
        card["method_defaults"] = dict(card.get("method_defaults") or {}, **method_defaults)
    if card.get("kind") == "ldm":
        card["reference"] = write_reference(synth.config, folder)
    if extra:
        card.update(extra)
    return write_prior(folder, card, {role: module for role, (_, module, _) in task.networks().items()}, readme=True)


REFERENCE_COUNT = 8
REFERENCE_DOWNSAMPLE = 2


def write_reference(config, folder, count: int = REFERENCE_COUNT) -> dict:
    """The prior's mean brain (and its brain mask) on a 2 mm copy of its grid, for registering native inputs.

    The mean of a few held-out synthetic brains, not the template itself: it carries the shell and the blur of
    the variability the prior has seen, so a native head matches it the way it matches the prior's outputs.
    Stored as uint8 so the file stays a few hundred kB.
    """
    from dataclasses import replace

    from ..volume import Volume, write_volume
    from .synth import BrainSynth, split_seeds

    synth = BrainSynth(replace(config, downsample=REFERENCE_DOWNSAMPLE * max(int(config.downsample), 1)))
    img = torch.zeros(synth.shape)
    brain = torch.zeros(synth.shape)
    for seed in split_seeds("heldout", count, start=1000):
        s = synth.sample(seed)
        img += s.image / count
        brain += s.mask.float() / count
    grid = synth.grid()
    files = {"image": "reference.nii.gz", "mask": "reference_mask.nii.gz"}
    arrays = {"image": (img.clamp(0, 1) * 255).round(), "mask": (brain >= 0.5).float()}
    digests = {}
    for key, fname in files.items():
        path = os.path.join(folder, fname)
        write_volume(Volume(np.ascontiguousarray(arrays[key].numpy().astype(np.float32)), grid), path,
                     description="MRISuperRes prior reference (%s)" % key, pixel_type="uint8")
        digests[fname] = file_digest(path)
    return dict(files, sha256=digests, count=count, spacing_mm=float(grid.spacing[0]),
                note="mean of %d held-out synthetic brains (seeds from %d); image scaled to 0..255" % (
                    count, 1_001_000))
