"""A prior's folder, read and written in one place: `model.json` (the card), its weight files and their checksums,
and the networks built from the card.

    NAME/model.json            the card (schema in card.py), written as JSON with indent 1 and a final newline
    NAME/ROLE.safetensors      one file per network role, its sha256 in card["networks"][ROLE]["sha256"]
    NAME/README.md             the card rendered for people (modelcard.py), where the writer asks for it

Reading: the card is checked (card.check_card) before anything relies on it, and every weight file's sha256 is
compared with the card's before it is read. Networks: only MONAI core classes named in `CLASSES` can be built (a
card cannot name arbitrary code); kwargs go to the constructor verbatim, except that attention runs through
torch's fused kernel unless the card says `use_flash_attention: false` (see `_with_fused_attention`). Weights are
safetensors, or `.pt`/`.pth` state dicts read with `torch.load(weights_only=True)` (imports); old
monai-generative key layouts are converted with MONAI's own `load_old_state_dict`.
Writing goes through volume.atomic_write: a killed writer leaves the old file or none, never half of one.
"""

import contextlib
import hashlib
import inspect
import json
import os
import sys
from typing import Dict

import torch

from ..errors import InputError
from ..volume import atomic_write, atomic_write_text
from . import card as cards
from .modelcard import README_FILE, render_model_card

CARD_FILE = cards.CARD_FILE
CLASSES = ("AutoencoderKL", "DiffusionModelUNet")
# "explicit": build attention the way the card's kwargs alone say (to measure the fused kernel, or to step
# around it where a platform's kernel misbehaves)
ATTENTION_ENV = "MRISUPERRES_ATTENTION"
# "contiguous": keep PyTorch's default tensor layout on the CPU (to measure the channels-last one, or to step
# around a platform where oneDNN misbehaves)
LAYOUT_ENV = "MRISUPERRES_LAYOUT"
# an exported autoencoder (`train autoencoder --export`) is a step of training, not a prior a method runs
AUTOENCODER_KIND = "autoencoder"
_CHUNK = 1 << 22


# ---- the card ----

def read_card(folder: str, autoencoder: bool = False) -> dict:
    """The checked card of the prior in `folder`; with `autoencoder`, an exported autoencoder's card is accepted
    too (checked for its schema only: the store's checks know only the kinds methods run)."""
    path = os.path.join(folder, CARD_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            card = json.load(f)
    except FileNotFoundError:
        raise InputError("No %s in %s: this folder is not a prior." % (CARD_FILE, folder),
                         "Give a prior's folder, or import the download with `models import PATH`.") from None
    except (OSError, ValueError) as exc:
        raise InputError("Cannot read the model card %s (%s)." % (path, exc),
                         "Re-import the prior with `models import`.") from None
    if autoencoder and isinstance(card, dict) and card.get("kind") == AUTOENCODER_KIND:
        if card.get("schema") != 1:
            raise InputError("%s has schema %r; this version reads schema 1." % (path, card.get("schema")),
                             "Update MRISuperRes or re-export the prior.")
        return card
    cards.check_card(card, path)
    return card


def write_card(folder: str, card: dict, readme: bool = False) -> dict:
    """Write model.json (and, with `readme`, the README.md rendered from it); returns the card."""
    atomic_write_text(os.path.join(folder, CARD_FILE), json.dumps(card, indent=1) + "\n")
    if readme:
        write_readme(folder, card)
    return card


def write_readme(folder: str, card: dict) -> str:
    return atomic_write_text(os.path.join(folder, README_FILE), render_model_card(card))


# ---- weights and checksums ----

def file_digest(path: str, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def save_weights(net: torch.nn.Module, path: str) -> str:
    """Write the network's weights to `path` as safetensors and return their sha256."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous().clone() if _shares(v) else v.detach().to("cpu").contiguous()
             for k, v in net.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp), ".safetensors")
    return file_digest(path)


def _shares(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def save_network(folder: str, spec: dict, role: str, net: torch.nn.Module) -> dict:
    """Write `net` as ROLE.safetensors in `folder` and record the file and its sha256 in the card entry `spec`."""
    spec["weights"] = "%s.safetensors" % role
    spec["sha256"] = save_weights(net, os.path.join(folder, spec["weights"]))
    return spec


def write_prior(folder: str, card: dict, nets: Dict[str, torch.nn.Module], readme: bool = False) -> dict:
    """A whole prior folder: every network of `nets` ({role: module}, entries in card["networks"]) and the card."""
    os.makedirs(folder, exist_ok=True)
    for role, net in nets.items():
        save_network(folder, card["networks"][role], role, net)
    return write_card(folder, card, readme)


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A plain state dict from safetensors or a torch file (weights_only: no code is run)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise InputError("Cannot read weights %s (%s)." % (path, exc), "Re-download or re-import it.") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused or corrupt file
        raise InputError("Cannot read weights %s as a plain state dict (%s)." % (path, str(exc).splitlines()[0]),
                         "Give a state-dict file (.pt/.pth/.safetensors) saved with torch.save(model.state_dict()).")\
            from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError("%s does not hold a state dict of tensors." % path, "Give the network's weight file.")
    return obj


def load_network(folder: str, card: dict, role: str, device="cpu") -> torch.nn.Module:
    """The card's network `role`, its weight file checked against the card's sha256 first (eval mode, frozen)."""
    spec = card["networks"][role]
    path = os.path.join(folder, spec["weights"])
    if not os.path.isfile(path):
        raise InputError("Weight file %s of prior '%s' is missing." % (path, card["name"]),
                         "Re-import the prior with `models import`.")
    want = spec.get("sha256")
    if not want:
        raise InputError("The card of prior '%s' gives no sha256 for %s." % (card["name"], spec["weights"]),
                         "Re-import the prior with `models import` (it records the checksums).")
    got = file_digest(path)
    if got != want:
        raise InputError("Weight file %s is corrupt or was changed (its sha256 checksum is %s, the card says %s)."
                         % (path, got, want), "Re-import the prior with `models import`.")
    net = build(spec, device="meta")
    return load_weights(net, read_state_dict(path), path).to(device)


# ---- networks ----

def _classes():
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    return {"AutoencoderKL": AutoencoderKL, "DiffusionModelUNet": DiffusionModelUNet}


def build(spec: dict, device="cpu") -> torch.nn.Module:
    """The network a card entry {"class", "kwargs"} describes; device "meta" allocates no memory."""
    name = spec.get("class")
    if name not in CLASSES:
        raise InputError("Network class %r is not supported." % name, "Use one of: %s." % ", ".join(CLASSES))
    kwargs = dict(spec.get("kwargs") or {})
    for k, v in list(kwargs.items()):
        if isinstance(v, list):
            kwargs[k] = tuple(v)
    kwargs = _with_fused_attention(_classes()[name], kwargs)
    try:
        with torch.device(device):
            net = _classes()[name](**kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise InputError("The model card's %s arguments are invalid: %s" % (name, exc),
                         "Fix 'networks.*.kwargs' in model.json (MONAI core constructor arguments).") from None
    return net.eval().requires_grad_(False)


def _with_fused_attention(cls, kwargs: dict) -> dict:
    """kwargs with MONAI's `use_flash_attention` on, where the class has it and the card leaves it out.

    Why: the explicit path builds the whole tokens x tokens matrix. A paired-prior UNet always has attention in
    its middle block, so a 64^3 patch (16^3 = 4096 tokens there) made 1 GB of attention matrix per two patches
    and spent two thirds of its CPU time on it. torch's scaled_dot_product_attention computes the same softmax
    attention in blocks (on the CPU too), with the same parameters, so weights and results do not change.
    `bench --speedups` measures it.
    """
    if os.environ.get(ATTENTION_ENV, "").strip().lower() == "explicit":
        return kwargs
    if "use_flash_attention" not in kwargs and "use_flash_attention" in inspect.signature(cls).parameters:
        kwargs = dict(kwargs, use_flash_attention=True)
    return kwargs


def with_fast_layout(net: torch.nn.Module, device) -> torch.nn.Module:
    """`net` with its convolution weights channels-last on the CPU, where that is the layout oneDNN runs fastest.

    Why: with NCDHW weights, oneDNN reorders every activation before each convolution, and the smallest levels of
    a UNet fall back to PyTorch's own slow convolution; with channels-last weights every convolution takes the
    native path and its output stays channels-last. Measured on this project's 2-core CPU: the paired UNet 33%,
    the VDM's 2D UNet 26%, the autoencoder's decoder (forward and backward) 25% faster; the values are the same
    up to float rounding (`bench --speedups`). On a GPU the layout is left as it is (not measured there).
    """
    if torch.device(device).type != "cpu" or os.environ.get(LAYOUT_ENV, "").strip().lower() == "contiguous":
        return net
    convs = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    if not convs:
        return net
    fmt = torch.channels_last_3d if isinstance(convs[0], torch.nn.Conv3d) else torch.channels_last
    return net.to(memory_format=fmt)


def count_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def load_weights(net: torch.nn.Module, state: Dict[str, torch.Tensor], where: str) -> torch.nn.Module:
    """Load `state` (MONAI core or old monai-generative layout) into `net`, assigning tensors in place.

    `net` may live on the meta device: tensors are assigned, not copied, so converting a 2 GB UNet needs
    one copy of its weights in memory, not two.
    """
    net.load_state_dict = _assigning(net)  # MONAI's converters call self.load_state_dict(...)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # MONAI prints "All keys match" on stdout
            if hasattr(net, "load_old_state_dict") and set(state) != set(net.state_dict()):
                net.load_old_state_dict(dict(state))
            else:
                net.load_state_dict(dict(state))
    except (KeyError, RuntimeError) as exc:
        raise InputError("The weights in %s do not fit the network the model card describes (%s)."
                         % (where, str(exc).splitlines()[0][:300]),
                         "Check that the weight file belongs to this architecture.") from None
    finally:
        del net.load_state_dict
    left = [n for n, t in list(net.named_parameters()) + list(net.named_buffers()) if t.is_meta]
    if left:
        raise InputError("%s leaves %d tensors of the network unset (e.g. %s)." % (where, len(left), left[0]),
                         "Check that the weight file belongs to this architecture.")
    return net.eval().requires_grad_(False)


def _assigning(net):
    bound = type(net).load_state_dict

    def load_state_dict(state_dict, strict=True, assign=True):
        return bound(net, state_dict, strict=True, assign=True)

    return load_state_dict
