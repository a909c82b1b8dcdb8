"""Benchmark outputs: results.json, results.csv, results.md and PNG figures."""

import csv
import json
import os

import numpy as np

from ..volume import atomic_write, atomic_write_text

COLUMNS = ["method", "case", "degradation", "psnr", "psnr_masked", "ssim", "ssim_slices", "seconds",
           "peak_ram_mb", "peak_gpu_mb", "device", "baseline", "delta_psnr_masked_db", "time_ratio", "label", "error"]


def _fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return ("%." + str(nd) + "f") % v
    return str(v)


def _seconds(r) -> str:
    """The run's seconds, with its phases where it had more than one (e.g. adaptation, then sampling)."""
    phases = {k: v for k, v in (r.get("phase_seconds") or {}).items() if v}
    text = _fmt(r["seconds"], 1)
    if len(phases) > 1:
        text += " (%s)" % ", ".join("%s %.0f" % (k, v) for k, v in phases.items())
    return text


def markdown_table(rows, header="") -> str:
    lines = [header] if header else []
    lines += ["| method | case | degradation | PSNR | PSNR (mask) | d vs baseline (dB) | SSIM 3D | SSIM 2D | s | x baseline time "
              "| peak RAM MB | peak GPU MB | device |",
              "|" + "---|" * 13]
    for r in rows:
        if r["error"]:
            lines.append("| %s | %s | %s | skipped: %s |  |  |  |  |  |  |  |  |  |" % (
                r["method"], r["case"], r["degradation"], r["error"].split(". ")[0].replace("|", "/")))
            continue
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r["method"], r["case"], r["degradation"], _fmt(r["psnr"]), _fmt(r["psnr_masked"]),
            _fmt(r["delta_psnr_masked_db"]), _fmt(r["ssim"], 4), _fmt(r["ssim_slices"], 4), _seconds(r),
            _fmt(r["time_ratio"], 1), _fmt(r["peak_ram_mb"], 0), _fmt(r["peak_gpu_mb"], 0), r["device"]))
    return "\n".join(lines) + "\n"


def write_all(out_dir, rows, figures, meta) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    data = [r.to_json() for r in rows]
    paths = {k: os.path.join(out_dir, v) for k, v in
             dict(json="results.json", csv="results.csv", md="results.md", plot="psnr_masked.png").items()}
    _atomic_json(paths["json"], data)

    def write_csv(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            for r in data:
                w.writerow(r)

    atomic_write(paths["csv"], write_csv)
    header = "Benchmark on %s. Command: `%s`.\n" % (meta["machine"], meta["command"])
    atomic_write_text(paths["md"], markdown_table(data, header))
    _atomic_json(os.path.join(out_dir, "meta.json"), meta)
    psnr_plot(paths["plot"], data)
    for case, degs in figures.items():
        for deg, views in degs.items():
            p = os.path.join(out_dir, "%s_%s.png" % (case, deg))
            case_figure(p, views, {r["method"]: r for r in data if r["case"] == case and r["degradation"] == deg})
            paths["figure:%s:%s" % (case, deg)] = p
    return paths


def gate_summary(rows, gate, target_db) -> dict:
    """prior -> the gate's rows for the methods that used it, each with its baseline's figures beside it."""
    data = [r.to_json() if hasattr(r, "to_json") else r for r in rows]
    out = {}
    for r in data:
        if not r.get("prior") or r["method"] not in gate or r["degradation"] not in gate[r["method"]]:
            continue
        base = next((b for b in data if b["method"] == r["baseline"] and b["case"] == r["case"]
                     and b["degradation"] == r["degradation"]), None)
        target = target_db.get(r["degradation"])
        hard = target is not None
        out.setdefault(r["prior"], []).append({
            "method": r["method"], "case": r["case"], "label": r["label"], "degradation": r["degradation"],
            "device": r.get("device"), "psnr_masked": r["psnr_masked"], "ssim": r["ssim"], "seconds": r["seconds"],
            "baseline": r["baseline"], "baseline_psnr_masked": base and base["psnr_masked"],
            "baseline_ssim": base and base["ssim"], "delta_psnr_masked_db": r["delta_psnr_masked_db"],
            "target_db": target,
            "meets_target": (None if not hard or r["delta_psnr_masked_db"] is None
                             else bool(r["delta_psnr_masked_db"] >= target)), "error": r["error"]})
    return out


def prune_runs(gate: dict) -> dict:
    """The gate without runs whose rows were all replaced since: they no longer describe anything in the card.

    Rows keep pointing at their own run (indexes renumbered). Rows from before runs were numbered keep all runs.
    """
    rows, runs = gate.get("rows", []), gate.get("runs", [])
    if not all(isinstance(r.get("run"), int) and 0 <= r["run"] < len(runs) for r in rows):
        return gate
    used = sorted({r["run"] for r in rows})
    new = {old: n for n, old in enumerate(used)}
    return dict(gate, runs=[runs[i] for i in used], rows=[dict(r, run=new[r["run"]]) for r in rows])


def update_cards(rows, meta, gate, target_db):
    """Write the gate into each measured prior's model.json and README.md (weights and checksums untouched)."""
    from ..priors.folder import read_card, write_card
    from ..priors.store import find_prior

    done = []
    for prior, items in gate_summary(rows, gate, target_db).items():
        folder = find_prior(prior)
        card = read_card(folder)
        # Gate runs add up (e.g. one per case, or a CPU and a GPU run): a row replaces the earlier one of the same
        # method, case, degradation and device kind, and each row names the run it came from.
        old = card.get("quality_gate") or {}
        run = {"command": meta["command"], "machine": meta["machine"], "date": meta["date"]}
        runs = [r for r in old.get("runs", []) if r != run] + [run]
        for item in items:
            item["run"] = len(runs) - 1
        def key(i):  # rows written before the device was recorded came from CPU runs
            return i["method"], i["case"], i["degradation"], str(i.get("device") or "cpu").split(":")[0]

        fresh = {key(i) for i in items}
        kept = [i for i in old.get("rows", []) if key(i) not in fresh]
        card["quality_gate"] = prune_runs({"target": "masked PSNR >= baseline + " + ", ".join(
            "%g dB at %s" % (db, deg) for deg, db in target_db.items()), "runs": runs, "rows": kept + items})
        write_card(folder, card, readme=True)
        done.append(folder)
    return done


def psnr_plot(path, data):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in data if not r["error"]]
    degs = sorted({r["degradation"] for r in ok})
    methods = list(dict.fromkeys(r["method"] for r in ok))
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(degs) + 2), 4))
    width = 0.8 / max(1, len(methods))
    for k, m in enumerate(methods):
        vals = [np.mean([r["psnr_masked"] for r in ok if r["method"] == m and r["degradation"] == d] or [np.nan])
                for d in degs]
        ax.bar(np.arange(len(degs)) + k * width, vals, width, label=m)
    ax.set_xticks(np.arange(len(degs)) + 0.4 - width / 2)
    ax.set_xticklabels(degs, fontsize=8)
    ax.set_ylabel("masked PSNR (dB), mean over cases")
    ax.legend(fontsize=7, ncol=2)
    finite = [r["psnr_masked"] for r in ok if np.isfinite(r["psnr_masked"])]
    if finite:
        ax.set_ylim(min(finite) - 3, max(finite) + 2)
    fig.tight_layout()
    _save(fig, path)


def case_figure(path, views, rows):
    """Rows: LR (nearest), truth, each method, then each method's error map; columns: three central views."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [k for k in views if k not in ("truth", "lr")]
    names = ["lr", "truth"] + methods + ["err:" + m for m in methods]
    fig, axes = plt.subplots(len(names), 3, figsize=(7, 2.2 * len(names)), squeeze=False)
    lo, hi = np.percentile(np.concatenate([v.ravel() for v in views["truth"]]), [0.5, 99.5])
    for r, name in enumerate(names):
        for a in range(3):
            ax = axes[r][a]
            if name.startswith("err:"):
                img = np.abs(views[name[4:]][a] - views["truth"][a])
                ax.imshow(np.rot90(img), cmap="magma", vmin=0, vmax=0.25 * (hi - lo))
            else:
                ax.imshow(np.rot90(views[name][a]), cmap="gray", vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
        label = name
        key = name[4:] if name.startswith("err:") else name
        if key in rows and rows[key].get("psnr_masked") is not None and not name.startswith("err:"):
            label += "\n%.2f dB" % rows[key]["psnr_masked"]
        if name.startswith("err:"):
            label = "|error| " + key
        axes[r][0].set_ylabel(label, fontsize=8)
    fig.tight_layout()
    _save(fig, path, dpi=60)


def _save(fig, path, dpi=80):
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi), ".png")
    finally:
        plt.close(fig)


def _atomic_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=1, default=float))
