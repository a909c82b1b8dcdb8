"""Where priors live and how they are loaded.

Search path, first match wins:
    1. the user store `models_dir()`: $MRISR_MODELS_DIR, else the user cache (~/.cache/mrisuperres/models,
       %LOCALAPPDATA%\\MRISuperRes\\models on Windows, ~/Library/Caches/MRISuperRes/models on macOS);
    2. priors shipped with the package: MRISuperResLib/_models/ (a wheel installs <repo>/Resources/Models there,
       see pyproject's package-dir) and, from a source checkout, <repo>/Resources/Models/.
Each prior is a folder NAME/ with model.json and its weight files. Loading verifies every weight file's
sha256 against the card before reading it (folder.py).
"""

import os
import sys
from typing import Dict, List, Optional

import torch

from ..errors import InputError, UserError
from . import card as cards
from . import folder as folders
from . import ukbb
from .ddim import NoiseSchedule

ENV_VAR = "MRISR_MODELS_DIR"
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def models_dir() -> str:
    """The user-writable store (not created here)."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return os.path.abspath(os.path.expanduser(env))
    if sys.platform.startswith("win"):
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser("~")
        return os.path.join(base, "MRISuperRes", "models")
    if sys.platform == "darwin":
        return os.path.expanduser("~/Library/Caches/MRISuperRes/models")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "mrisuperres", "models")


def bundled_dirs() -> List[str]:
    """Folders of priors shipped with the package (those that exist)."""
    cands = [os.path.join(_PACKAGE, "_models"), os.path.join(os.path.dirname(_PACKAGE), "Resources", "Models")]
    out = []
    for c in cands:
        if os.path.isdir(c) and os.path.realpath(c) not in [os.path.realpath(o) for o in out]:
            out.append(c)
    return out


def _scan(root: str) -> Dict[str, str]:
    found = {}
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            folder = os.path.join(root, name)
            if not name.startswith(".") and os.path.isfile(os.path.join(folder, cards.CARD_FILE)):
                found[name] = folder
    return found


def installed() -> List[dict]:
    """[{name, folder, source}] of every prior on the search path, user store first."""
    out, seen = [], set()
    for source, roots in (("user", [models_dir()]), ("bundled", bundled_dirs())):
        for root in roots:
            for name, folder in _scan(root).items():
                if name not in seen:
                    seen.add(name)
                    out.append({"name": name, "folder": folder, "source": source})
    return out


def list_models() -> List[dict]:
    """What `models list` shows: installed priors (with card summaries) and the published prior if missing."""
    rows = []
    for item in installed():
        try:
            row = cards.card_summary(folders.read_card(item["folder"]), item["folder"])
            row["status"] = "installed"
        except UserError as exc:
            row = {"name": item["name"], "kind": None, "title": item["name"], "path": item["folder"],
                   "status": "broken", "error": str(exc)}
        row["source"] = item["source"]
        rows.append(row)
    if not any(r["name"] == ukbb.NAME for r in rows):
        c = ukbb.card()
        row = cards.card_summary(c, None)
        row.update(status="not installed", source="download", install=ukbb.INSTALL_HINT,
                   files=["models/%s (%s, md5 %s)" % (names[0], size, md5)
                          for names, md5, size in ukbb.WEIGHT_FILES.values()],
                   store=models_dir())
        rows.append(row)
    return rows


def find_prior(name_or_path: str) -> str:
    """The folder of a prior given by name (search path) or by a folder/model.json path."""
    s = str(name_or_path)
    if os.path.isfile(s) and os.path.basename(s) == cards.CARD_FILE:
        return os.path.dirname(os.path.abspath(s))
    if os.path.isdir(s):
        if os.path.isfile(os.path.join(s, cards.CARD_FILE)):
            return os.path.abspath(s)
        raise InputError("%s is a folder without %s, not an imported prior." % (s, cards.CARD_FILE),
                         "Import it first: `python -m MRISuperResLib models import %s`, then use --model NAME." % s)
    if os.path.isfile(s):
        raise InputError("%s is a file, not a prior." % s,
                         "Import downloads with `python -m MRISuperResLib models import %s`." % s)
    for item in installed():
        if item["name"] == s:
            return item["folder"]
    if s == ukbb.NAME:
        raise InputError("The published prior '%s' is not installed." % s, ukbb.INSTALL_HINT)
    names = [i["name"] for i in installed()]
    raise InputError("No prior named '%s'." % s, "Installed priors: %s. See `python -m MRISuperResLib models list`."
                     % (", ".join(names) or "none"))


class Prior:
    """A loaded prior: networks (eval mode, frozen) + noise schedule + model card.

    `networks` maps card roles to modules; `autoencoder` and `unet` are the LDM roles.
    Priors hold no operator and no run state: solvers receive them and the physics separately.
    """

    def __init__(self, card: dict, nets: Dict[str, torch.nn.Module], folder: Optional[str] = None):
        self.card = card
        self.networks = dict(nets)
        self.folder = folder
        self.schedule = NoiseSchedule.from_card(card.get("schedule"))

    name = property(lambda self: self.card["name"])
    kind = property(lambda self: self.card["kind"])
    autoencoder = property(lambda self: self.networks.get("autoencoder"))
    unet = property(lambda self: self.networks.get("unet"))

    @property
    def device(self) -> torch.device:
        for net in self.networks.values():
            for p in net.parameters():
                return p.device
        return torch.device("cpu")

    def to(self, device) -> "Prior":
        for k in self.networks:
            self.networks[k] = folders.with_fast_layout(self.networks[k].to(device), device)
        return self

    def method_defaults(self, method: str, device_type: str) -> dict:
        return cards.method_defaults(self.card, method, device_type)

    def __repr__(self):
        return "Prior(%s, kind=%s, folder=%s)" % (self.name, self.kind, self.folder)


def load_prior(name_or_path, device="cpu", kind: Optional[str] = None) -> Prior:
    """Load a prior by name or folder (or the default prior of `kind` when name_or_path is None)."""
    if name_or_path is None:
        return default_prior(kind or "ldm", device)
    folder = find_prior(name_or_path)
    card = folders.read_card(folder)
    if kind is not None and card["kind"] != kind:
        raise InputError("Prior '%s' is a %s prior; this method needs a %s prior." % (card["name"], card["kind"], kind),
                         "Choose a %s prior (see `models list`)." % kind)
    nets = {role: folders.load_network(folder, card, role) for role in card["networks"]}
    return Prior(card, nets, folder).to(device)


def default_prior_folder(kind: str, device_type: str = "cpu") -> str:
    """The folder of the prior a method of `kind` uses when none is chosen.

    On CPU, priors shipped with the package come first (they are sized for CPU budgets); on a GPU, priors the
    user installed come first (e.g. the published one). Within a source, alphabetical.
    """
    cands = []
    for item in installed():
        try:
            if folders.read_card(item["folder"])["kind"] == kind:
                cands.append(item)
        except UserError:
            continue
    first = "bundled" if device_type == "cpu" else "user"
    cands.sort(key=lambda i: (i["source"] != first, i["name"]))
    if not cands:
        hint = ukbb.INSTALL_HINT if kind == "ldm" else "Train or import a %s prior (see `models list`)." % kind
        raise UserError("No %s prior is installed, and the chosen method needs one." % kind,
                        hint + " Or pass --model PATH to a prior folder.")
    return cands[0]["folder"]


def run_defaults(method: str, kind: str, device_types=("cpu", "cuda")) -> dict:
    """Where a run's settings come from for a method with a prior, for `methods`: the schema's defaults, then the
    chosen prior's card (`method_defaults`, per device type), then --set.

    {"default_prior": {device type: name or None}, "prior_defaults": {prior name: {device type: {setting: value}}},
     "below_baseline_with_default_prior": {device type: the card's gate warning, or None}}
    """
    per_prior = {}
    for item in installed():
        try:
            card = folders.read_card(item["folder"])
        except UserError:
            continue
        if card["kind"] == kind:
            per_prior[card["name"]] = {d: cards.method_defaults(card, method, d) for d in device_types}
    chosen, below = {}, {}
    for d in device_types:
        try:
            card = folders.read_card(default_prior_folder(kind, d))
        except UserError:
            chosen[d], below[d] = None, None
            continue
        # a device type the gate never ran on inherits the CPU's verdict: the same prior, similar settings
        chosen[d] = card["name"]
        below[d] = cards.gate_shortfall(card, method, d) or (cards.gate_shortfall(card, method, "cpu")
                                                             if d != "cpu" else None)
    return {"default_prior": chosen, "prior_defaults": per_prior, "below_baseline_with_default_prior": below}


def default_prior(kind: str, device="cpu") -> Prior:
    dev = torch.device(device)
    return load_prior(default_prior_folder(kind, dev.type), dev, kind=kind)
