"""A prior's human-readable model card (`README.md`), rendered from its `model.json`.

The README is generated, never edited by hand: `bench --update-cards` and `train export` rewrite it whenever they
write the card, and `python -m MRISuperResLib models card NAME|--all` regenerates it. A test keeps the shipped
READMEs equal to what `render_model_card` gives for their cards.

Pure: reads nothing and writes nothing, so any writer (with its own atomic write) can use it.
"""

from typing import List

README_FILE = "README.md"
_NOTICE = ("<!-- Generated from model.json by MRISuperResLib.priors.modelcard; do not edit. "
           "Regenerate: python -m MRISuperResLib models card NAME -->")


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: List[str], rows: List[list]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return out


def _num(value, fmt="%.4g") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    return fmt % value


def _size(values) -> str:
    return " x ".join(_num(v, "%g") for v in values or [])


def _flat(metrics: dict, prefix="") -> List[list]:
    rows = []
    for key, value in (metrics or {}).items():
        name = "%s[%s]" % (prefix, key) if prefix else str(key)
        rows += _flat(value, name) if isinstance(value, dict) else [["`%s`" % name, _num(value)]]
    return rows


def _settings(values: dict) -> str:
    return ", ".join("`%s=%s`" % (k, str(v).lower() if isinstance(v, bool) else v) for k, v in values.items())


def _lineage(record: dict) -> List[dict]:
    """The training runs behind a network, oldest first: the record, then its `init_from` and their `earlier`."""
    chain, item = [record], record.get("init_from")
    while isinstance(item, dict):
        chain.append(item)
        item = item.get("earlier")
    return [r for r in reversed(chain) if r.get("command") or r.get("steps")]


def _runs(role: str, record: dict) -> List[str]:
    out = ["", "#### %s" % role, ""]
    for n, run in enumerate(_lineage(record), 1):
        if run is record:
            end = ", the weights in this folder"
        else:  # an init_from record: what this run exported, and the next run started from
            end = ", exported as `%s` (sha256 `%s`); the next run started from it" % (run.get("prior"), run.get("sha256"))
        out.append("%d. %s steps%s:" % (n, _num(run.get("steps"), "%d"), end))
        command = str(run.get("command") or "not recorded")
        out += ["", "   ```bash"] + ["   " + c.strip() for c in command.split(" && ")] + ["   ```", ""]
    return out[:-1]


def _overview(card: dict) -> List[str]:
    grid, latent, cond = card.get("grid") or {}, card.get("latent"), card.get("conditioning")
    methods = ", ".join("`%s`" % m for m in (card.get("method_defaults") or {})) or "-"
    lines = ["- **Name:** `%s`, kind `%s`; used by %s." % (card.get("name"), card.get("kind"), methods),
             "- **Intended use:** %s" % (card.get("intended_use") or "not stated"),
             "- **Licence:** %s" % (card.get("licence") or "not stated")]
    if grid:
        lines.append("- **Grid:** %s voxels of %s mm, orientation %s%s." % (
            _size(grid.get("shape")), _size(grid.get("spacing")), grid.get("orientation", "-"),
            "; %s" % grid["space"] if grid.get("space") else ""))
    intensity = card.get("intensity") or {}
    if intensity:
        lines.append("- **Intensity:** range %s, %s." % (intensity.get("range"), intensity.get("normalisation", "-")))
    schedule = card.get("schedule")
    if schedule:
        lines.append("- **Noise schedule:** %s." % _settings(schedule))
    if latent:
        lines.append("- **Latent:** %s (scale factor %s)." % (_size(latent.get("shape")), _num(latent.get("scale_factor"))))
    if cond:
        lines.append("- **Conditioning:** %s (defaults %s)." % (", ".join(cond.get("names") or []), cond.get("default")))
    source = card.get("source")
    if source:
        lines.append("- **Source:** %s." % _settings(source))
    return lines


def _networks(card: dict) -> List[str]:
    params = (card.get("training") or {}).get("parameters") or {}
    rows = []
    for role, net in (card.get("networks") or {}).items():
        kw = net.get("kwargs") or {}
        channels = "-".join(str(c) for c in kw.get("channels") or []) or "-"
        rows.append([role, net.get("class"), channels, _num(params.get(role), "%d"),
                     "`%s`" % net.get("weights"), "`%s`" % (net.get("sha256") or "set at import")])
    out = ["", "## Networks", ""] + _table(["role", "class", "channels", "parameters", "weights", "sha256"], rows)
    ref = card.get("reference")
    if ref:
        out += ["", "Registration reference (%s):" % ref.get("note", ""), ""]
        out += _table(["file", "sha256"], [["`%s`" % f, "`%s`" % d] for f, d in (ref.get("sha256") or {}).items()])
    return out


def _training(card: dict) -> List[str]:
    t = card.get("training") or {}
    out = ["", "## Training", ""]
    for key, label in (("data", "Data"), ("steps", "Steps of the last run"), ("weights", "Weights held")):
        if t.get(key) is not None:
            out.append("- **%s:** %s" % (label, t[key]))
    if t.get("train"):
        out.append("- **Optimiser settings (last run):** %s" % _settings(t["train"]))
    metrics = _flat(t.get("held_out_metrics") or {})
    if metrics:
        out += ["", "Held-out metrics at export:", ""] + _table(["metric", "value"], metrics)
    nets = list(card.get("networks") or {})
    main = "unet" if "unet" in nets else (nets[0] if nets else "network")
    if t.get("command") or t.get("init_from"):
        out += ["", "### Commands, oldest first"] + _runs(main, t)
        for role in nets:
            if role != main and isinstance(t.get(role), dict):
                out += _runs(role, t[role])
    return out


def _defaults(card: dict) -> List[str]:
    rows = [[("`%s`" % m), device, _settings(values)]
            for m, per_device in (card.get("method_defaults") or {}).items() for device, values in per_device.items()]
    if not rows:
        return []
    return ["", "## Method defaults", "", "Settings a method takes from this prior on each device type "
            "(`--set key=value` overrides them).", ""] + _table(["method", "device", "settings"], rows)


def _below_baseline(card: dict) -> List[str]:
    """Methods this prior should not be used with: its own gate had them below their baseline."""
    from .card import gate_shortfall

    notes = []
    for m in sorted({r.get("method") for r in ((card.get("quality_gate") or {}).get("rows") or [])} - {None}):
        for device in ("cpu", "cuda"):
            text = gate_shortfall(card, m, device)
            if text:
                notes.append("- `%s` on %s: %s" % (m, device, text))
    if not notes:
        return []
    return ["", "## Not recommended", "", "Offered with this prior, but not as a default: the panel marks these "
            "methods and `run` warns.", ""] + notes


def _met(row: dict) -> str:
    if row.get("error"):
        return "error: %s" % row["error"]
    if row.get("meets_target") is None:
        return "not gated"
    return "**met**" if row["meets_target"] else "not met"


def _gate(card: dict) -> List[str]:
    gate = card.get("quality_gate") or {}
    if not gate.get("rows"):
        return ["", "## Quality gate", "", "Not measured yet (`python -m MRISuperResLib bench --gate --update-cards`)."]
    rows = []
    for r in gate["rows"]:
        run = r["run"] + 1 if isinstance(r.get("run"), int) else None  # runs are numbered from 1 below
        rows.append([r.get("method"), "%s (%s)" % (r.get("case"), r["label"]) if r.get("label") else r.get("case"),
                     r.get("degradation"), r.get("device") or "cpu", _num(r.get("psnr_masked"), "%.2f"),
                     r.get("baseline"), _num(r.get("baseline_psnr_masked"), "%.2f"),
                     _num(r.get("delta_psnr_masked_db"), "%+.2f"), _num(r.get("ssim"), "%.3f"),
                     _num(r.get("baseline_ssim"), "%.3f"), _num(r.get("seconds"), "%.0f"), _met(r), _num(run, "%d")])
    out = ["", "## Quality gate", "", "Target: %s. Measured with the default settings above; PSNR in dB inside the "
           "head mask." % gate.get("target", "-"), ""]
    out += _table(["method", "case", "degradation", "device", "PSNR (mask)", "baseline", "baseline PSNR (mask)",
                   "delta (dB)", "SSIM", "baseline SSIM", "seconds", "target", "run"], rows)
    out += ["", "Runs:", ""]
    for n, run in enumerate(gate.get("runs") or [], 1):
        out.append("%d. %s, %s: `%s`" % (n, run.get("date"), run.get("machine"), run.get("command")))
    return out


def render_model_card(card: dict) -> str:
    """The README.md text of a prior's card (schema 1). Deterministic: the same card gives the same text."""
    lines = [_NOTICE, "", "# %s" % (card.get("title") or card.get("name")), ""]
    if card.get("description"):
        lines += [card["description"], ""]
    lines += _overview(card) + _networks(card) + _training(card) + _defaults(card) + _below_baseline(card) + _gate(card)
    return "\n".join(lines).rstrip() + "\n"
