"""Model cards (`model.json`): checking them, what they say, and the names priors may have (folder.py reads and
writes them).

Schema 1 (agreed with the default-prior trainers; see priors/README section in the module docs):
{"schema": 1, "name", "kind": "ldm"|"vdm"|"paired", "title", "description",
 "networks": {role: {"class", "kwargs", "weights", "sha256"}}, "schedule": {...}, "latent": {...},
 "grid": {"shape", "spacing", "orientation", "space"}, "intensity": {"range", "normalisation"},
 "conditioning": null | {"names", "default", "as_channels", "as_context"}, "training", "licence",
 "intended_use", "method_defaults": {method: {device_type: {setting: value}}}}
"""

import copy
import os
import re
from typing import Optional

from ..errors import InputError

CARD_FILE = "model.json"
KINDS = ("ldm", "vdm", "paired")
_NAME_BAD = re.compile(r"[^a-z0-9._-]+")


def sanitise_name(name: str) -> str:
    """A safe folder name: lower case, [a-z0-9._-], no leading dot or dash, at most 64 characters."""
    raw = str(name or "")
    s = _NAME_BAD.sub("-", raw.strip().lower())
    s = re.sub(r"-{2,}", "-", s).strip(".-")[:64].strip(".-")
    if not s:
        raise InputError("'%s' cannot be used as a model name." % raw,
                         "Use letters, digits, '.', '_' or '-', e.g. --name my-prior.")
    return s


def check_name(name: str) -> str:
    """A name the user chose, refused (not quietly changed) unless it is already a safe folder name."""
    if sanitise_name(name) != str(name):
        raise InputError("'%s' cannot be used as a model name." % name,
                         "Use lower-case letters, digits, '.', '_' or '-' (not first or last), at most 64 characters, "
                         "e.g. --name my-prior.")
    return str(name)


def check_card(card: dict, where: str = CARD_FILE) -> None:
    """Raise InputError naming the first problem of a card; the fields the code relies on must be there."""

    def bad(problem, fix="Fix or regenerate the model card."):
        raise InputError("Model card %s: %s" % (where, problem), fix)

    if not isinstance(card, dict):
        bad("it is not a JSON object.")
    if card.get("schema") != 1:
        bad("schema %r is not supported (this version reads schema 1)." % card.get("schema"),
            "Update MRISuperRes, or re-export the prior.")
    if card.get("kind") not in KINDS:
        bad("kind %r is not one of %s." % (card.get("kind"), ", ".join(KINDS)))
    if not isinstance(card.get("name"), str) or sanitise_name(card["name"]) != card["name"]:
        bad("name %r is not a valid model name." % card.get("name"))
    nets = card.get("networks")
    if not isinstance(nets, dict) or not nets:
        bad("'networks' is missing or empty.")
    for role, net in nets.items():
        if not isinstance(net, dict) or not all(k in net for k in ("class", "kwargs", "weights")):
            bad("network '%s' needs 'class', 'kwargs' and 'weights'." % role)
        w = str(net["weights"])
        if os.path.basename(w.replace("\\", "/")) != w or w in ("", ".", ".."):
            bad("network '%s' weight file %r must be a plain file name inside the prior's folder." % (role, w))
    if card["kind"] == "ldm":
        for role in ("autoencoder", "unet"):
            if role not in nets:
                bad("a latent diffusion prior needs networks 'autoencoder' and 'unet'.")
        lat = card.get("latent") or {}
        if len(lat.get("shape") or []) != 4:
            bad("'latent.shape' must be [channels, i, j, k].")
    grid = card.get("grid") or {}
    if len(grid.get("shape") or []) != 3:
        bad("'grid.shape' must list 3 sizes.")
    cond = card.get("conditioning")
    if cond is not None:
        if len(cond.get("names") or []) != len(cond.get("default") or []) or not cond.get("names"):
            bad("'conditioning' needs as many 'default' values as 'names'.")
    md = card.get("method_defaults", {})
    if not isinstance(md, dict):
        bad("'method_defaults' must map method -> device type -> settings.")


# What a newly trained prior's card recommends to the method that uses its kind, per device type: the one place
# `train` and the card builders take them from (bench measurements may replace them in a prior's card later).
FRESH_METHOD_DEFAULTS = {
    "vdm": {"kspace-vdm": {"cpu": {"steps": 25}, "cuda": {"steps": 250}}},
    "paired": {"paired-ddpm": {"cpu": {"steps": 10}, "cuda": {"steps": 50}}},
}


def fresh_method_defaults(kind: str) -> dict:
    return copy.deepcopy(FRESH_METHOD_DEFAULTS.get(kind, {}))


def method_defaults(card: dict, method: str, device_type: str) -> dict:
    """Settings the card recommends for `method` on `device_type` ("cpu", "cuda", ...); {} when none."""
    per_method = (card.get("method_defaults") or {}).get(method) or {}
    out = dict(per_method.get("any") or {})
    out.update(per_method.get(device_type) or {})
    return out


def gate_shortfall(card: dict, method: str, device_type: str) -> Optional[str]:
    """A warning when the card's quality gate has `method` below its baseline on `device_type`, else None.

    The gate (bench --gate --update-cards) measured the prior at its default settings on test heads; a user about
    to run a method that lost to plain interpolation there should hear it before trusting the output.
    """
    rows = [r for r in ((card.get("quality_gate") or {}).get("rows") or [])
            if r.get("method") == method and not r.get("error") and r.get("delta_psnr_masked_db") is not None
            and str(r.get("device") or "cpu").split(":")[0] == device_type]
    if not rows:
        return None
    worst = min(rows, key=lambda r: r["delta_psnr_masked_db"])
    if worst["delta_psnr_masked_db"] >= 0:
        return None
    return ("On its quality gate (model.json), prior '%s' with %s at its default %s settings scored %.1f dB masked "
            "PSNR below %s (%s, %s). Its output here is likely worse than %s's; compare the two before relying on it."
            % (card.get("name"), method, device_type,
               -worst["delta_psnr_masked_db"], worst.get("baseline"), worst.get("degradation"),
               worst.get("label") or worst.get("case"), worst.get("baseline")))


def card_summary(card: dict, path: Optional[str] = None) -> dict:
    """The fields `models list` shows."""
    return {"name": card["name"], "kind": card["kind"], "title": card.get("title", card["name"]),
            "description": card.get("description", ""), "grid": card.get("grid", {}),
            "licence": card.get("licence", ""), "intended_use": card.get("intended_use", ""), "path": path}
