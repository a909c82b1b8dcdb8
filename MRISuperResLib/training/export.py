"""Writing a trained run as a prior folder (`model.json`, its README.md card, safetensors); reading networks back.

The card follows the agreed schema (schema 1); each weight file's sha256 is recorded in it and
checked on every load.
"""

import hashlib
import json
import os
import tempfile

import numpy as np
import torch

from ..errors import InputError
from ..priors.modelcard import README_FILE, render_model_card
from .trainer import atomic_write_text

CARD = "model.json"
NETWORK_CLASSES = ("AutoencoderKL", "DiffusionModelUNet")


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_weights(module: torch.nn.Module, path) -> str:
    """Atomic safetensors write; returns the sha256."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in module.state_dict().items()}
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(state, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return sha256_of(path)


def build_network(cls_name: str, kwargs: dict):
    from monai.networks import nets

    if cls_name not in NETWORK_CLASSES:
        raise InputError("Network class '%s' is not supported." % cls_name, "Use one of %s." % ", ".join(NETWORK_CLASSES))
    return getattr(nets, cls_name)(**kwargs)


def load_network(folder, entry: dict, device="cpu"):
    """Build a card's network entry and load its verified weights."""
    from safetensors.torch import load_file

    path = os.path.join(folder, entry["weights"])
    if not os.path.exists(path):
        raise InputError("Weight file %s is missing." % path, "Re-export the prior or copy the whole folder.")
    digest = sha256_of(path)
    if digest != entry.get("sha256"):
        raise InputError("Weight file %s does not match its checksum in %s." % (path, CARD),
                         "The file is corrupt or was replaced; re-export or re-download the prior.")
    net = build_network(entry["class"], entry["kwargs"])
    net.load_state_dict(load_file(path, device="cpu"))
    return net.to(device)


def read_card(folder) -> dict:
    path = os.path.join(folder, CARD)
    if not os.path.exists(path):
        raise InputError("%s has no %s." % (folder, CARD), "Give a folder written by `train ... --export`.")
    with open(path) as f:
        card = json.load(f)
    if card.get("schema") != 1:
        raise InputError("%s has schema %r; this version reads schema 1." % (path, card.get("schema")),
                         "Update MRISuperRes or re-export the prior.")
    return card


def export_prior(task, folder, name, title="", description="", training=None, method_defaults=None,
                 extra=None) -> dict:
    """Write the task's networks and its card into `folder`; returns the card."""
    os.makedirs(folder, exist_ok=True)
    networks = {}
    for role, (cls_name, module, kwargs) in task.networks().items():
        fname = role + ".safetensors"
        digest = save_weights(module, os.path.join(folder, fname))
        networks[role] = {"class": cls_name, "kwargs": kwargs, "weights": fname, "sha256": digest}
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
    atomic_write_text(os.path.join(folder, CARD), json.dumps(card, indent=1) + "\n")
    atomic_write_text(os.path.join(folder, README_FILE), render_model_card(card))
    return card


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
        digests[fname] = sha256_of(path)
    return dict(files, sha256=digests, count=count, spacing_mm=float(grid.spacing[0]),
                note="mean of %d held-out synthetic brains (seeds from %d); image scaled to 0..255" % (
                    count, 1_001_000))
