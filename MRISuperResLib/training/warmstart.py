"""`train TASK --init-from PRIOR`: a new run that starts from an exported prior's weights.

Run folders are scratch and can be lost; the shipped priors live in git. So training continues from a prior:
the new run takes the architecture of the network the task trains and its weights (sha256 checked against the
card, safetensors), and for a VDM the end points of its learnt noise schedule (in continuous time only those
matter; the shape of gamma between them starts afresh). The optimiser and the step count start afresh; the
run records where it started (options["init_from"]) and its export's card carries that record.
"""

import math
import os
import sys

import torch

from ..errors import InputError

# kinds of prior each task can start from, and the card role of the network it trains; an autoencoder run
# exports a prior of kind "autoencoder", so a later run can go on from that as well as from an LDM prior
_SOURCES = {"autoencoder": (("ldm", "autoencoder"), "autoencoder"), "ldm": (("ldm",), "unet"),
            "vdm": (("vdm",), "unet"), "paired": (("paired",), "unet")}


def _note(msg):
    sys.stderr.write("note: " + msg + "\n")


def options_from_prior(task_name: str, options: dict, prior_ref: str) -> dict:
    """`options` of a new run with the trained network replaced by the prior's; differences are noted."""
    from ..priors.folder import read_card
    from ..priors.store import find_prior

    if task_name not in _SOURCES:
        raise InputError("train %s cannot start from a prior." % task_name,
                         "Use --init-from with %s." % ", ".join(sorted(_SOURCES)))
    kinds, role = _SOURCES[task_name]
    folder = find_prior(prior_ref)
    card = read_card(folder, autoencoder=True)
    if card["kind"] not in kinds or role not in card["networks"]:
        article = "an" if str(card["kind"])[:1] in "aeiou" else "a"
        raise InputError("Prior '%s' is %s %s prior without the %s that `train %s` trains."
                         % (card["name"], article, card["kind"], role, task_name),
                         "Give a %s prior to --init-from (see `python -m MRISuperResLib models list`)."
                         % " or ".join("'%s'" % k for k in kinds))
    spec = card["networks"][role]
    if not str(spec.get("weights", "")).endswith(".safetensors") or not spec.get("sha256"):
        raise InputError("The %s of prior '%s' is not a checksummed safetensors file." % (role, card["name"]),
                         "Start from a prior exported by `train ... --export` or `train export`.")
    out = dict(options)
    net = dict(spec["kwargs"])
    if _plain(out.get("network")) != _plain(net):
        _note("the %s architecture comes from prior '%s' (%s), not from the command line"
              % (role, card["name"], _brief(net)))
    out["network"] = net
    if task_name == "vdm":
        out["exponents"] = list(card["vdm"]["fourier_exponents"])
    training = card.get("training") or {}
    if role == "autoencoder" and card["kind"] == "ldm":  # its options are the UNet run's; the autoencoder's sit beside
        training = training.get("autoencoder") or {}
    before = training.get("options") or {}
    for key in sorted(set(before) & set(out)):
        if key not in ("network", "init_from") and _plain(before[key]) != _plain(out[key]):
            _note("%s differs from the prior's training (%s there, %s here)" % (key, before[key], out[key]))
    out["init_from"] = {"prior": card["name"], "folder": folder, "role": role, "weights": spec["weights"],
                        "sha256": spec["sha256"], "steps": training.get("steps"), "command": training.get("command")}
    if training.get("init_from"):  # the prior itself went on from another: keep the whole lineage
        out["init_from"]["earlier"] = training["init_from"]
    return out


def load_into(task, options: dict) -> None:
    """Put the recorded prior's weights into the task's trained network (and a VDM's gamma end points)."""
    from ..priors.folder import file_digest, read_card, read_state_dict

    src = options["init_from"]
    card = read_card(src["folder"], autoencoder=True)
    path = os.path.join(src["folder"], src["weights"])
    if file_digest(path) != src["sha256"] or card["networks"][src["role"]]["sha256"] != src["sha256"]:
        raise InputError("%s changed since this run was set up (sha256 differs from the card's)." % path,
                         "Restore the prior's files, or start the run again.")
    module = task.networks()[src["role"]][1]
    state = read_state_dict(path)
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError("The weights of prior '%s' do not fit the run's %s (%s)."
                         % (src["prior"], src["role"], str(exc).splitlines()[0][:200]),
                         "Start from a prior of the same architecture.") from None
    scale = (card.get("paired") or {}).get("residual_scale")
    if scale is not None and hasattr(task, "residual_scale"):
        # the network learnt x0 in units of its prior's residual scale; measuring it anew on this run's data (other
        # contrasts, say) would rescale every target it was trained on, and the card would disagree with the weights
        task.residual_scale = float(scale)
    table = (card.get("vdm") or {}).get("gamma_table")
    if table and hasattr(task, "gamma"):
        lo, hi = float(table[0]), float(table[-1])
        with torch.no_grad():
            task.gamma.gamma_0.fill_(lo)
            task.gamma.log_span.fill_(math.log(hi - lo))


def init_from_record(options: dict):
    """Where a run's weights started, for its card (None for random weights): the prior and its training,
    without this machine's folder."""
    src = options.get("init_from")
    return {k: v for k, v in src.items() if k != "folder"} if src else None


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _brief(net: dict) -> str:
    return ", ".join("%s=%s" % (k, net[k]) for k in ("channels", "latent_channels", "num_res_blocks") if k in net)
