"""`bench` sub-command."""

import sys
import time

from ..errors import InputError, UserError
from .cases import DEGRADATIONS


def add_parser(sub):
    p = sub.add_parser("bench", help="Quality, speed and memory of every method (tables and figures).")
    p.add_argument("--out", required=True, help="Folder for results.json, results.csv, results.md and PNGs.")
    p.add_argument("--quick", action="store_true",
                   help="One small case, reduced settings (iterations/steps), every method: minutes on 2 cores.")
    p.add_argument("--methods", nargs="+", default=None, help="Default: all (baselines are always included).")
    p.add_argument("--cases", nargs="+", default=None,
                   help="mni152, mni152-181 (the template at about the whole-brain size, 181 x 217 x 180, for the time targets), "
                        "synthetic (held-out synthetic brains), contrasts (held-out brains in T2-, FLAIR- and "
                        "PD-like contrasts), stripped (held-out skull-stripped brains, T1- and T2-like), "
                        "heldout:CONTRAST[-stripped]:SEED (one held-out synthetic head, e.g. heldout:t2-stripped:"
                        "1000021; contrasts t1, t2, flair, pd, random) and/or folders of HR volumes.")
    p.add_argument("--slices", type=int, default=None, metavar="N",
                   help="Score every case on its central N slices along k only: faster, for comparing settings "
                        "(the slab's cut faces carry errors a whole head has not, so never against whole heads).")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="Method setting for every measured method that has it (repeatable), e.g. --set "
                        "samples=8 --set adapt=on.")
    p.add_argument("--degradations", nargs="+", default=None, choices=sorted(DEGRADATIONS))
    p.add_argument("--synthetic", type=int, default=2, help="Number of held-out synthetic brains.")
    p.add_argument("--device", default="auto")
    p.add_argument("--profile", action="store_true",
                   help="Instead: seconds/iteration and peak memory of the InverseSR methods at the published "
                        "prior's full size, random weights.")
    p.add_argument("--accelerate", nargs="+", default=None, metavar="MODE",
                   help="With --profile: one inversesr-ldm row per mode (off, cuda-graphs, compile, auto), measured "
                        "in the same run; default: the method's default.")
    p.add_argument("--profile-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="With --profile: method settings for every row, e.g. nested_checkpointing=true.")
    p.add_argument("--speedups", action="store_true",
                   help="Instead: paired-ddpm on an MNI152 crop with each speed-up (fused attention, kept heap) "
                        "off and on, each in its own process: seconds, ratio to all off, peak memory, and that "
                        "the outputs agree.")
    p.add_argument("--gate", action="store_true",
                   help="The default priors' quality gate: InverseSR and paired-ddpm at 4 and 8 mm slice removal "
                        "(paired-ddpm also at 5 mm Gaussian thick slices, inferred from the spacing), kspace-vdm at "
                        "4x k-space, each against its baseline; the result is written into each prior's model card "
                        "(with --update-cards).")
    p.add_argument("--update-cards", action="store_true",
                   help="Write the gate's rows into the model card of each prior it measured.")
    p.set_defaults(handler=handle)


def gate_plan() -> dict:
    """method -> the degradations the quality gate measures it on, as each method declares (register(gate=...))."""
    from ..methods import available

    plan = {m.name: list(m.gate) for m in available() if m.gate}
    unknown = sorted({d for degs in plan.values() for d in degs} - set(DEGRADATIONS))
    if unknown:
        raise ValueError("methods declare gate degradations the benchmark does not know: %s" % ", ".join(unknown))
    return plan


# masked PSNR over the baseline where a target applies: 8 mm (high sparsity), the clinical 5 mm, 4x k-space
GATE_TARGET_DB = {"slice-removal-8mm": 1.0, "thick-slice-5mm": 2.0, "kspace-4x": 1.0}


def handle(args):
    from ..devices import resolve_device
    from . import cases, report, runner

    dev = str(resolve_device(args.device))
    if args.profile:
        return _profile(args, dev)
    if args.speedups:
        return _speedups(args, dev)
    degs = args.degradations or (["slice-removal-4mm", "slice-removal-8mm", "kspace-4x"] if args.quick else
                                 ["slice-removal-4mm", "thick-slice-5mm", "slice-removal-8mm", "kspace-4x"] if args.gate
                                 else sorted(DEGRADATIONS))
    gate = gate_plan() if args.gate else None
    methods = args.methods or (sorted(gate) if args.gate else None)
    cs = cases.resolve_cases(args.cases, quick=args.quick, synthetic=args.synthetic)
    if not cs:
        raise InputError("No benchmark cases.", "Give --cases mni152, synthetic or a folder of HR volumes.")
    if args.update_cards and (args.set or args.slices is not None):
        raise InputError("--update-cards writes the gate of each prior's default settings on whole heads into its "
                         "card, and --set or --slices changes that.",
                         "Drop --set and --slices to update the cards, or drop --update-cards to compare settings.")
    if args.slices is not None:
        cs = [cases.with_slices(c, args.slices) for c in cs]
    overrides = _overrides(args.set, methods)

    def load_prior(method):
        try:
            from ..priors.store import default_prior
        except ImportError:
            return None
        return default_prior(method.needs_prior, resolve_device(dev))

    t0 = time.time()
    rows, figures = runner.run(cs, degs, methods, dev, args.quick,
                               log=lambda m: sys.stderr.write(m + "\n"), load_prior=load_prior,
                               only=gate, overrides=overrides)
    meta = {"machine": runner.machine_description(dev), "device": dev, "quick": args.quick,
            "command": "python -m MRISuperResLib " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"]
            else "python -m MRISuperResLib bench ...", "wall_seconds": round(time.time() - t0, 1),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    paths = report.write_all(args.out, rows, figures, meta)
    if args.update_cards:
        for folder in report.update_cards(rows, meta, gate or gate_plan(), GATE_TARGET_DB):
            sys.stderr.write("quality gate written into %s\n" % folder)
    print(report.markdown_table([r.to_json() for r in rows]))
    print("wrote %s, %s, %s and %d figures in %s (%.0f s)" % (paths["json"], paths["csv"], paths["md"],
                                                             len([k for k in paths if k.startswith("figure")]) + 1,
                                                             args.out, time.time() - t0))
    return 0


def _overrides(items, methods) -> dict:
    """--set KEY=VALUE items as {key: value}; each key must be a setting of a method the run measures."""
    from ..methods import available, get_method
    from ..settings import parse_key_values

    sets = parse_key_values(items)
    measured = [get_method(n) for n in methods] if methods else list(available())
    known = {s.name for m in measured for s in m.settings}
    unknown = sorted(set(sets) - known)
    if unknown:
        raise InputError("--set %s: no measured method has such a setting." % ", ".join(unknown),
                         "Settings of %s: %s." % (", ".join(m.name for m in measured) or "these methods",
                                                   ", ".join(sorted(known)) or "none"))
    return sets


def _speedups(args, dev):
    import json
    import os

    from ..volume import atomic_write_text
    from . import speedups
    from .runner import machine_description

    t0 = time.time()
    rows = speedups.run(args.out, dev, log=lambda m: sys.stderr.write(m + "\n"))
    meta = {"machine": machine_description(dev), "command": "python -m MRISuperResLib " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_seconds": round(time.time() - t0, 1)}
    table = speedups.markdown(rows)
    # written whole or not at all, like the other bench outputs
    atomic_write_text(os.path.join(args.out, "speedups.json"),
                      json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    atomic_write_text(os.path.join(args.out, "speedups.md"), table + "\n\n%s, %s\n" % (meta["machine"], meta["date"]))
    print(table)
    print("wrote %s and %s" % (os.path.join(args.out, "speedups.json"), os.path.join(args.out, "speedups.md")))
    return 0


def _profile(args, dev):
    """Seconds/iteration and peak memory of both InverseSR methods on the published architecture, random weights."""
    import json
    import os

    from ..volume import atomic_write_text
    from . import profile

    common = {}
    for item in args.profile_set:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError("--profile-set takes KEY=VALUE, got %r." % item, "Example: --profile-set channels_last=true")
        common[key.strip()] = value.strip()
    rows = []
    for method in (args.methods or ["inversesr-decoder", "inversesr-ldm"]):
        for mode in (args.accelerate or [None]) if method == "inversesr-ldm" else [None]:
            settings = dict(common, **({"accelerate": mode} if mode else {}))
            sys.stderr.write("profile: %s on %s %s\n" % (method, dev, settings or ""))
            try:
                rows.append(profile.profile(method, dev, settings=settings))
            except UserError as exc:  # e.g. refused by the memory estimate: report it, it is the finding
                rows.append({"method": method, "device": dev, "settings": settings, "error": str(exc)})
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "profile.json"), json.dumps(rows, indent=1, default=str))
    print(profile_table(rows))
    return 0


# issue 25's targets at the published size on one GPU: (seconds per iteration, peak GB)
PROFILE_TARGETS = {"inversesr-ldm": (1.5, 16.0), "inversesr-decoder": (0.2, 12.0)}


def profile_table(rows) -> str:
    """Markdown table of `bench --profile` rows: measured, estimated, against the targets (CUDA rows)."""
    out = ["| method | settings | device | s/iteration | first iteration s | peak GB | model TFLOP/s | estimate "
           "(s/it, GB) | target (s/it, GB) | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        settings = ", ".join("%s=%s" % kv for kv in sorted((r.get("settings") or {}).items())) or "defaults"
        if "error" in r:
            out.append("| %s | %s | %s | - | - | - | - | - | - | %s |" % (r["method"], settings, r["device"],
                                                                       r["error"].split(". ")[0]))
            continue
        est = r.get("estimate") or {}
        target = PROFILE_TARGETS.get(r["method"])
        verdict = "-"
        if target and r["device"].startswith("cuda"):
            met = r["seconds_per_iteration"] <= target[0] and r["peak_memory_gb"] <= target[1]
            verdict = "<= %g, <= %g: %s" % (target[0], target[1], "met" if met else "**not met**")
        note = "; ".join([r.get("peak_memory_kind", "")] + [w.split(";")[0] for w in r.get("warnings", [])])
        out.append("| %s | %s | %s | %.2f | %.1f | %.2f | %.1f | %s, %s | %s | %s |" % (
            r["method"], settings, r["device"], r["seconds_per_iteration"], r.get("first_iteration_seconds", 0.0),
            r["peak_memory_gb"], r["achieved_tflops"], est.get("seconds_per_iteration", "-"),
            est.get("memory_gb", "-"), verdict, note))
    return "\n".join(out)
