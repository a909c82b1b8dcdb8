"""`models import`: bring a downloaded prior into the user store, converted to safetensors with checksums.

Accepted:
    1. a prior folder in our format (model.json + weights), or its zip;
    2. the published MONAI bundle `brain_image_synthesis_latent_diffusion_model` as a folder or zip;
    3. the published prior's two weight files (autoencoder.pt and model.pt, or autoencoder.pth and
       diffusion_model.pth).
Steps: 1. check every zip entry stays inside the target folder (else refuse the whole zip); 2. copy out only
weight files and model.json (bundle configs and scripts are never read, let alone run); 3. verify the
published files' md5; 4. read weights with weights_only=True, convert the old monai-generative layout;
5. write NAME/ (model.json with sha256 of each safetensors file) to a staging folder and rename it into place.
"""

import copy
import os
import shutil
import stat
import tempfile
import zipfile
from typing import Dict, Optional, Sequence

from ..errors import InputError
from . import card as cards
from . import folder as folders
from . import ukbb
from .store import models_dir

WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")


def import_model(paths: Sequence[str], name: Optional[str] = None, allow_unverified: bool = False,
                 published_card: Optional[dict] = None, published_md5: Optional[Dict[str, str]] = None) -> dict:
    """Import and return the new prior's card. `published_*` replace the published prior's card/md5 (tests)."""
    paths = [os.path.abspath(os.path.expanduser(p)) for p in ([paths] if isinstance(paths, str) else paths)]
    if name is not None:
        cards.check_name(name)
    for p in paths:
        if not os.path.exists(p):
            raise InputError("%s does not exist." % p, "Give the downloaded folder, zip or weight files.")
    os.makedirs(models_dir(), exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".import-", dir=models_dir())
    try:
        kind, found = _locate(paths, scratch)
        if kind == "card":
            card = folders.read_card(found)
            card["name"] = cards.sanitise_name(name or card["name"])
            _check_free(card["name"])
            out = _stage(scratch, card["name"])
            card = _convert(card, found, out)
        else:
            card = copy.deepcopy(published_card) if published_card else ukbb.card()
            card["name"] = cards.sanitise_name(name or card["name"])
            _check_free(card["name"])
            _verify_md5(found, published_md5 or {r: v[1] for r, v in ukbb.WEIGHT_FILES.items()}, allow_unverified)
            out = _stage(scratch, card["name"])
            card = _convert(card, found, out)
        target = os.path.join(models_dir(), card["name"])
        _check_free(card["name"])
        os.replace(out, target)
        return card
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def remove_model(name: str) -> str:
    """Delete a prior from the user store; shipped priors cannot be removed."""
    safe = cards.sanitise_name(name)
    folder = os.path.join(models_dir(), safe)
    if safe != name or not os.path.isfile(os.path.join(folder, cards.CARD_FILE)):
        from .store import installed

        if any(i["name"] == name and i["source"] == "bundled" for i in installed()):
            raise InputError("Prior '%s' ships with MRISuperRes and cannot be removed." % name, "")
        raise InputError("No prior named '%s' in %s." % (name, models_dir()),
                         "See `python -m MRISuperResLib models list`.")
    shutil.rmtree(folder)
    return folder


def _check_free(name):
    if os.path.exists(os.path.join(models_dir(), name)):
        raise InputError("A prior named '%s' is already installed in %s." % (name, models_dir()),
                         "Remove it first (`models remove %s`) or choose another --name." % name)


def _stage(scratch, name):
    out = os.path.join(scratch, "out", name)
    os.makedirs(out)
    return out


# ---- finding what was given ----

def _locate(paths, scratch):
    """("card", folder) or ("published", {"autoencoder": path, "unet": path})."""
    if len(paths) == 2:
        return "published", _assign_roles(paths)
    if len(paths) != 1:
        raise InputError("Give one folder or zip, or the two weight files.", "")
    p = paths[0]
    if os.path.isdir(p):
        if os.path.isfile(os.path.join(p, cards.CARD_FILE)):
            return "card", p
        return "published", _find_bundle_files(p)
    if os.path.basename(p) == cards.CARD_FILE:
        return "card", os.path.dirname(p)
    if zipfile.is_zipfile(p):
        return _from_zip(p, os.path.join(scratch, "zip"))
    raise InputError("%s is neither a folder, a zip, nor model.json." % p,
                     "Give the bundle folder or zip, a prior folder, or both published weight files.")


def _role_of(path):
    base = os.path.basename(path)
    for role, (names, _, _) in ukbb.WEIGHT_FILES.items():
        if base in names:
            return role
    return None


def _assign_roles(paths):
    roles = {}
    for p in paths:
        role = _role_of(p)
        if role is None or role in roles:
            raise InputError("Cannot tell which network %s belongs to." % p,
                             "Give the files with their published names: autoencoder.pt and model.pt "
                             "(or autoencoder.pth and diffusion_model.pth).")
        roles[role] = p
    return roles


def _find_bundle_files(folder):
    hits = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if root.count(os.sep) - folder.count(os.sep) < 3 \
            else []
        for f in sorted(files):
            role = _role_of(f)
            if role and (role not in hits or os.path.basename(root) == "models"):
                hits[role] = os.path.join(root, f)
    if len(hits) != 2:
        raise InputError("%s holds neither model.json nor the published weights (models/autoencoder.pt and "
                         "models/model.pt)." % folder, ukbb.INSTALL_HINT)
    return hits


def _safe_entries(zf: zipfile.ZipFile, dest: str):
    """Every entry, after checking none could land outside `dest` (absolute, '..', drive, link)."""
    root = os.path.realpath(dest)
    for info in zf.infolist():
        n = info.filename
        mode = info.external_attr >> 16
        target = os.path.realpath(os.path.join(root, n))
        if (n.startswith(("/", "\\")) or "\\" in n or ":" in n.split("/")[0] or ".." in n.split("/")
                or stat.S_ISLNK(mode) or not (target + os.sep).startswith(root + os.sep)):
            raise InputError("The zip has an entry that would be written outside its folder: %r. Nothing was "
                             "imported." % n, "Only import archives from sources you trust; re-download it.")
    return zf.infolist()


def _extract(zf, info, dest):
    target = os.path.join(dest, info.filename)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with zf.open(info) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    return target


def _from_zip(path, dest):
    os.makedirs(dest)
    with zipfile.ZipFile(path) as zf:
        entries = [i for i in _safe_entries(zf, dest) if not i.is_dir()]
        cards_in = sorted((i for i in entries if os.path.basename(i.filename) == cards.CARD_FILE),
                          key=lambda i: i.filename.count("/"))
        if cards_in:
            prefix = os.path.dirname(cards_in[0].filename)
            for i in entries:
                if os.path.dirname(i.filename) == prefix and (i.filename.endswith(WEIGHT_SUFFIXES)
                                                              or i is cards_in[0]):
                    _extract(zf, i, dest)
            return "card", os.path.join(dest, prefix)
        for i in entries:
            if _role_of(i.filename):
                _extract(zf, i, dest)
    return "published", _find_bundle_files(dest)


# ---- checking and converting ----

def _verify_md5(files, md5, allow_unverified):
    for role, path in files.items():
        got = folders.file_digest(path, "md5")
        if got != md5[role]:
            if allow_unverified:
                continue
            raise InputError("%s has md5 %s, but the published %s file has md5 %s: the download is incomplete or "
                             "a different file." % (path, got, role, md5[role]),
                             "Download it again; use --allow-unverified only for a copy you know is good.")


def _convert(card, src, out):
    """Write each network as safetensors into `out`, record sha256; `src` is a folder or {role: path}."""
    for role, spec in card["networks"].items():
        path = src[role] if isinstance(src, dict) else os.path.join(src, spec["weights"])
        if not os.path.isfile(path):
            raise InputError("Weight file %s for network '%s' is missing." % (path, role), "")
        if isinstance(src, str) and path.endswith(".safetensors") and spec.get("sha256"):
            got = folders.file_digest(path)
            if got != spec["sha256"]:
                raise InputError("%s has sha256 %s, the card says %s." % (path, got, spec["sha256"]),
                                 "Re-download or re-export the prior.")
        net = folders.build(spec, device="meta")
        net = folders.load_weights(net, folders.read_state_dict(path), path)
        folders.save_network(out, spec, role, net)
        del net  # one network in memory at a time: the published UNet alone is 2 GB
    cards.check_card(card, "of the imported prior")
    return folders.write_card(out, card)

