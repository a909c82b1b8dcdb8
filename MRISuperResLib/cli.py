"""Command line: `python -m MRISuperResLib` (also installed as `mrisr`).

Only this module prints progress events (JSON lines on stdout with `--progress jsonl`); logs and
human-readable progress go to stderr. Exit codes: 0 ok, 1 internal error, 2 bad input or request (or an output
that could not be written), 3 does not fit the device, 4 a folder run in which some files failed, 130 cancelled
(Ctrl-C), 143 terminated (SIGTERM).
"""

import argparse
import json
import math
import os
import signal
import sys
import time
import traceback
import warnings

from . import __version__
from .errors import EXIT_CANCELLED, EXIT_INTERNAL, EXIT_SOME_FAILED, EXIT_USER, Cancelled, InputError, Terminated, UserError
from .physics import KINDS, PROFILES, OperatorSpec
from .progress import JsonLinesSink, Progress, TextSink
from .settings import parse_key_values
from .volume import (
    SUPPORTED_SUFFIXES,
    OutputSet,
    check_output_path,
    check_volume_file,
    list_volumes,
    read_volume,
    remove_own_partials,
    write_volume,
)

_EXTENSIONS = {}  # name -> (add_parser, ) for sub-commands contributed by sub-packages


def _log(msg):
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def _add_operator_args(p, required):
    p.add_argument("--operator", choices=KINDS, required=required,
                   help="Degradation: slice-removal (keep 1 of k slices), thick-slice (slice profile average), "
                        "downsample (box average), kspace (central k-space block).")
    p.add_argument("--axis", type=int, nargs="+", default=None,
                   help="ITK index axis (i, j, k = 0, 1, 2); several for downsample/kspace. Default 2.")
    p.add_argument("--factor", type=float, nargs="+", default=None,
                   help="LR/HR spacing ratio, > 1; one, or one per axis. Default 4.")
    p.add_argument("--profile", choices=PROFILES, default="gaussian",
                   help="Slice profile of thick-slice (Gaussian with FWHM = LR spacing, or box).")


def _spec_from_args(args):
    if args.operator is None:
        if args.axis is not None or args.factor is not None:
            raise InputError("--axis/--factor were given without --operator.",
                             "Add --operator (slice-removal, thick-slice, downsample or kspace).")
        return None
    axes = args.axis if args.axis is not None else [2]
    factors = args.factor if args.factor is not None else [4.0]
    if len(factors) == 1:
        factors = factors * len(axes)
    return OperatorSpec.make(args.operator, axes if len(axes) > 1 else axes[0],
                             factors if len(factors) > 1 else factors[0], args.profile)


class _ArgumentError(Exception):
    """argparse's complaint, raised instead of exiting so that main() can report it as an `error` event."""

    def __init__(self, parser, message):
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    # Sub-parsers are made with the parent's class, so every sub-command reports through main() too.
    def error(self, message):
        raise _ArgumentError(self, message)


def build_parser():
    p = _Parser(prog="mrisr", description="Super-resolution of brain MRI with diffusion priors.")
    p.add_argument("--version", action="version", version="MRISuperResLib " + __version__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("methods", help="List methods and their settings.")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("devices", help="List compute devices.")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("degrade", help="Simulate a low-resolution acquisition from a high-resolution volume.")
    s.add_argument("--input", required=True)
    s.add_argument("--output", required=True)
    _add_operator_args(s, required=True)

    s = sub.add_parser("run", help="Super-resolve a volume (or every volume of a folder).")
    s.add_argument("--method", default="bspline")
    s.add_argument("--input", required=True, help="LR volume, or a folder of them (batch).")
    s.add_argument("--output", required=True, help="Output volume, or a folder when --input is a folder.")
    _add_operator_args(s, required=False)
    s.add_argument("--model", default=None, help="Prior name (see `models list`) or folder with model.json.")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Method setting (repeatable).")
    s.add_argument("--progress", choices=["text", "jsonl"], default="text")
    s.add_argument("--uncertainty", default=None, help="Also write the per-voxel std over samples here.")
    s.add_argument("--residual", default=None, help="Also write |A(x) - y| on the input grid here.")
    s.add_argument("--registration", choices=["auto", "rigid", "affine", "none"], default="auto",
                   help="How the input reaches the prior's space (inversesr methods only): auto registers rigidly "
                        "unless the input already lies on the prior's grid; none takes it as already aligned.")
    s.add_argument("--engine", choices=["local", "dask"], default=None,
                   help="For a folder: local (default) runs the files one by one here; dask runs each file as a task "
                        "on a Dask cluster, resumable through OUTPUT/manifest.jsonl (pip install MRISuperResLib[cluster]).")
    s.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="With --engine dask: use the cluster at this scheduler (tcp://HOST:8786) instead of a local one.")
    s.add_argument("--workers", type=int, default=None, metavar="N",
                   help="With --engine dask: local worker processes (default: one per GPU, else one per 4 cores).")

    s = sub.add_parser("metrics", help="PSNR and SSIM of a volume against a reference.")
    s.add_argument("--reference", required=True)
    s.add_argument("--test", required=True)
    s.add_argument("--mask", default="auto", help="auto (head mask of the reference), none, or a mask file.")
    s.add_argument("--data-range", type=float, default=None, help="Default: reference max - min.")
    s.add_argument("--slice-axis", type=int, default=2, choices=[0, 1, 2])
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("demo", help="Degrade the bundled MNI152 example, super-resolve it, score it, draw it.")
    s.add_argument("--out", default="out")
    s.add_argument("--method", default=None, help="Default: the best method whose prior is installed.")
    s.add_argument("--operator", choices=KINDS, default="thick-slice")
    s.add_argument("--axis", type=int, default=2)
    s.add_argument("--factor", type=float, default=4.0)
    s.add_argument("--device", default="auto")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    for _name, add in _extensions():
        add(sub)
    return p


def _extensions():
    """Sub-commands contributed by sub-packages (models, train, bench), when present."""
    import importlib
    import importlib.util

    found = []
    for modname in ("MRISuperResLib.priors.cli", "MRISuperResLib.training.cli", "MRISuperResLib.bench.cli"):
        if importlib.util.find_spec(modname.rsplit(".", 1)[0]) and importlib.util.find_spec(modname):
            found.append((modname, importlib.import_module(modname).add_parser))
    return found


# ---- commands ----

def cmd_methods(args):
    from .methods import available

    items = []
    for m in available():
        item = m.to_json()
        if m.needs_prior:  # a schema default is not what a run uses when the prior's card says otherwise
            item["defaults_from"] = ("'default' is the schema's; a run starts from it, takes the prior's "
                                     "'prior_defaults' for its device type over it, then --set.")
            item.update(_run_defaults(m))
        items.append(item)
    if args.json:
        print(json.dumps(items, indent=1))
        return 0
    for m in items:
        print("%-20s %s" % (m["name"], m["title"]))
        for s in m["settings"]:
            print("    %-18s %-6s default %-8s %s" % (s["name"], s["type"], s["default"], s["help"]))
        for prior, per_device in sorted(m.get("prior_defaults", {}).items()):
            for device, values in sorted(per_device.items()):
                if values:
                    print("    with prior %s on %s%s: %s" % (
                        prior, device, " (its default prior)" if m["default_prior"].get(device) == prior else "",
                        ", ".join("%s=%s" % kv for kv in sorted(values.items()))))
    return 0


def _run_defaults(method) -> dict:
    try:
        from .priors.store import run_defaults
    except ImportError:
        return {}
    return run_defaults(method.name, method.needs_prior)


def cmd_devices(args):
    from .devices import list_devices

    items = list_devices()
    if args.json:
        print(json.dumps(items, indent=1))
    else:
        for d in items:
            print("%-8s %s%s" % (d["name"], d["title"], "  (%d MB free)" % d["free_mb"] if "free_mb" in d else ""))
    return 0


def cmd_degrade(args):
    from .physics import lr_grid
    from .volume import Volume

    check_output_path(args.output, [args.input])
    hr = read_volume(args.input)
    spec = _spec_from_args(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        op = spec.bind_hr(hr.grid.shape)
    for w in caught:
        _log("warning: %s" % w.message)
    import torch

    y = op.forward(torch.as_tensor(hr.array, dtype=torch.float64)).to(torch.float32).numpy()
    write_volume(Volume(y, lr_grid(hr.grid, op), description="MRISuperRes degrade %s" % json.dumps(spec.describe())),
                 args.output)
    _log("wrote %s: %s -> %s voxels (%s)" % (args.output, "x".join(map(str, op.hr_shape)),
                                            "x".join(map(str, op.lr_shape)), json.dumps(op.describe())))
    return 0


def _load_prior_for(method, args, progress):
    if not method.needs_prior:
        if args.model:
            progress.warning("Method %s uses no prior; --model is ignored." % method.name)
        return None
    try:
        from .priors.store import default_prior, load_prior
    except ImportError:
        raise UserError("Method %s needs a %s prior, but the priors package is not available." % (
            method.name, method.needs_prior), "Reinstall MRISuperResLib.") from None
    from .devices import resolve_device

    dev = resolve_device(args.device)
    return load_prior(args.model, dev) if args.model else default_prior(method.needs_prior, dev)


def cmd_run(args):
    from .methods import get_method

    sink = JsonLinesSink() if args.progress == "jsonl" else TextSink()
    progress = Progress(sink)
    method = get_method(args.method)
    overrides = parse_key_values(args.set)
    method.resolve_settings(overrides)  # validate names and values before any work
    if args.seed is not None:
        from .settings import SEED

        args.seed = SEED.parse(args.seed, method.name)
    spec = _spec_from_args(args)
    if args.engine == "dask":
        return _run_cohort(args, method, overrides, spec, sink, progress)
    if args.scheduler or args.workers:
        raise InputError("--scheduler and --workers apply to --engine dask.", "Add --engine dask, or drop them.")
    if os.path.isdir(args.input):
        return _run_batch(args, method, overrides, spec, sink, progress)
    outputs = [p for p in (args.output, args.uncertainty, args.residual) if p]
    if len(set(os.path.abspath(p) for p in outputs)) != len(outputs):
        raise InputError("Output paths must differ from each other.", "Give distinct --output/--uncertainty/--residual.")
    for path in outputs:
        check_output_path(path, [args.input])
    lr = read_volume(args.input)
    prior = _load_prior_for(method, args, progress)
    _run_one(args, method, overrides, spec, lr, args.input, args.output, args.uncertainty, args.residual,
             prior, sink, progress)
    return 0


def _run_one(args, method, overrides, spec, lr, input_path, output, uncertainty, residual, prior, sink, progress):
    from .pipeline import infer_degradation, super_resolve

    if spec is None:
        spec = infer_degradation(lr.grid)
        progress.warning("%s: degradation inferred from the voxel spacing: %s (override with --operator/--axis/--factor)."
                         % (os.path.basename(input_path), json.dumps(spec.describe())))
    sink({"event": "start", "method": method.name, "input": input_path, "output": output,
          "device": args.device, "degradation": spec.describe(), "registration": args.registration,
          "version": __version__})
    t0 = time.monotonic()
    result = super_resolve(lr, method.name, spec, overrides, prior, args.device, args.seed, progress,
                           registration=args.registration)
    if uncertainty and "uncertainty" not in result.extras:
        progress.warning("Method %s produced no uncertainty map (it needs several samples); %s not written."
                         % (method.name, uncertainty))
    with OutputSet() as outs:  # all or nothing: no file is replaced until every one is written and checked
        outs.add(result.volume, output)
        if uncertainty and "uncertainty" in result.extras:
            outs.add(result.extras["uncertainty"], uncertainty)
        if residual:
            outs.add(result.residual, residual)
        written = outs.commit()
    sink({"event": "result", "input": input_path, "output": os.path.abspath(output),
          "seconds": round(time.monotonic() - t0, 3),
          "grid": {"shape": list(result.volume.grid.shape), "spacing": list(result.volume.grid.spacing)},
          "uncertainty": os.path.abspath(uncertainty) if uncertainty in written else None,
          "residual": os.path.abspath(residual) if residual in written else None,
          "info": result.info})


def _run_cohort(args, method, overrides, spec, sink, progress):
    """A folder on a Dask cluster, one task per file, with a manifest (cohort.py)."""
    from .cohort import CohortJob, run_cohort

    if not os.path.isdir(args.input):
        raise InputError("--engine dask runs a folder; %s is not one." % args.input,
                         "Give a folder of volumes as --input, or drop --engine dask for one file.")
    if args.uncertainty or args.residual:
        raise InputError("--uncertainty and --residual are not written with --engine dask.",
                         "Drop them, or use the local engine for those maps.")
    if args.workers is not None and args.workers < 1:
        raise InputError("--workers must be at least 1.", "Give the number of worker processes, e.g. --workers 2.")
    job = CohortJob(method.name, overrides, spec, args.model, args.device, args.seed, args.registration)
    return run_cohort(job, args.input, args.output, sink, progress, args.workers, args.scheduler, _log)


def _run_batch(args, method, overrides, spec, sink, progress):
    """Every volume of a folder, one progress stream; bad files reported and skipped; good existing outputs skipped.

    Ends with a `summary` event; exit 0 when no file failed, 4 (EXIT_SOME_FAILED) when some did, 2 when all did.
    """
    inputs = list_volumes(args.input)
    if not inputs:
        raise InputError("No volumes in folder %s." % args.input, "Put .nii.gz, .nii, .nrrd or .mha files there.")
    folders = {"output": args.output, "uncertainty": args.uncertainty, "residual": args.residual}
    for key, folder in folders.items():
        if folder is None:
            continue
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise InputError("With a folder as --input, --%s must be a folder too (%s is a file)." % (key, folder),
                             "Give a folder for the results.")
        if not os.path.isdir(folder) and folder.lower().endswith(SUPPORTED_SUFFIXES):
            raise InputError("With a folder as --input, --%s must be a folder, but %s is named like an image file."
                             % (key, folder), "Give a folder for the results, e.g. --%s results/." % key)
        if os.path.abspath(folder) == os.path.abspath(args.input):
            raise InputError("--%s is the input folder." % key, "Write results to another folder; inputs are never touched.")
        os.makedirs(folder, exist_ok=True)
    prior = _load_prior_for(method, args, progress)
    done, skipped, failed = [], [], []
    for n, path in enumerate(inputs):
        name = os.path.basename(path)
        targets = {k: (os.path.join(f, name) if f else None) for k, f in folders.items()}
        if os.path.exists(targets["output"]):
            try:
                check_volume_file(targets["output"])
                skipped.append({"input": path, "reason": "output exists"})
                progress.warning("%s: output exists, skipped (delete it to redo)." % name)
                continue
            except UserError as exc:  # cut short by a full disk or a kill: redo it
                progress.warning("%s: the existing output is damaged (%s); redoing it." % (name, exc.problem))
        sub = progress.sub(n / len(inputs), (n + 1) / len(inputs))
        try:
            lr = read_volume(path)
            _run_one(args, method, overrides, spec, lr, path, targets["output"], targets["uncertainty"],
                     targets["residual"], prior, sink, sub)
            done.append(path)
        except UserError as exc:
            failed.append({"input": path, "reason": str(exc), "exit_code": exc.exit_code})
            sink({"event": "warning", "message": "%s: skipped: %s" % (name, exc), "input": path})
            _log("warning: %s: skipped: %s" % (name, exc))
    code = 0 if not failed else (EXIT_SOME_FAILED if done or skipped else EXIT_USER)
    # the same keys as a cohort's summary (cohort.py): counts, then what failed and why
    sink({"event": "summary", "total": len(inputs), "done": len(done), "skipped": len(skipped), "failed": len(failed),
          "failures": failed, "exit_code": code})
    _log("batch: %d done, %d skipped (existing), %d failed%s" % (
        len(done), len(skipped), len(failed),
        (": " + ", ".join(os.path.basename(f["input"]) for f in failed)) if failed else ""))
    if failed:
        names = ", ".join(os.path.basename(f["input"]) for f in failed)
        if done or skipped:
            _log("error: %d of %d files failed (%s); see the warnings above." % (len(failed), len(inputs), names))
            return EXIT_SOME_FAILED
        _log("error: every file in the batch failed (%d): %s; see the warnings above." % (len(failed), names))
        return EXIT_USER
    return 0


def cmd_metrics(args):
    from .metrics import compare

    ref = read_volume(args.reference)
    test = read_volume(args.test)
    mask = args.mask
    if mask not in ("auto", "none"):
        mask = read_volume(mask)
    scores = compare(ref, test, mask=mask, data_range=args.data_range, slice_axis=args.slice_axis)
    if args.json:  # strict JSON: PSNR of identical volumes is infinite, written as null
        print(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in scores.items()},
                         indent=1, allow_nan=False))
    else:
        for k in ("psnr", "psnr_masked", "ssim", "ssim_masked", "ssim_slices", "ssim_slices_masked"):
            if k in scores:
                print("%-20s %.4f" % (k, scores[k]))
        print("%-20s %.4g" % ("data_range", scores["data_range"]))
    return 0


def cmd_demo(args):
    from .demo import run_demo

    report = run_demo(args.out, args.method, args.operator, args.axis, args.factor, args.device, parse_key_values(args.set),
                      progress=Progress(TextSink()), log=_log)
    print("%-12s %10s %12s %8s %10s %8s" % ("method", "PSNR dB", "PSNR(mask)", "SSIM", "SSIM(mask)", "seconds"))
    for name, s in report["scores"].items():
        print("%-12s %10.2f %12.2f %8.4f %10.4f %8.1f" % (name, s["psnr"], s["psnr_masked"], s["ssim"],
                                                         s["ssim_masked"], s["seconds"]))
    paths = report["paths"]
    print("output: %s\npicture: %s\nmetrics: %s" % (paths["sr"], paths["png"], paths["metrics"]))
    return 0


COMMANDS = {"methods": cmd_methods, "devices": cmd_devices, "degrade": cmd_degrade, "run": cmd_run,
            "metrics": cmd_metrics, "demo": cmd_demo}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    jsonl = _wants_jsonl(argv)
    try:
        args = build_parser().parse_args(argv)
    except _ArgumentError as exc:
        exc.parser.print_usage(sys.stderr)
        sys.stderr.write("%s: error: %s\n" % (exc.parser.prog, exc))
        if jsonl:
            JsonLinesSink()({"event": "error", "message": "%s: %s" % (exc.parser.prog, exc), "exit_code": EXIT_USER})
        return EXIT_USER
    handler = COMMANDS.get(args.command) or getattr(args, "handler", None)
    previous = _on_sigterm()
    try:
        return int(handler(args) or 0)
    except UserError as exc:
        return _fail(str(exc), exc.exit_code, jsonl)
    except Terminated:
        return _fail("Terminated (SIGTERM); temporary files were removed.", Terminated.exit_code, jsonl)
    except (Cancelled, KeyboardInterrupt):
        return _fail("Cancelled.", EXIT_CANCELLED, jsonl)
    except Exception as exc:  # a bug: keep the traceback for the report, one line for the user
        traceback.print_exc(file=sys.stderr)
        return _fail("Internal error (%s: %s). Please report it with the log above." % (type(exc).__name__, exc),
                     EXIT_INTERNAL, jsonl)
    finally:
        remove_own_partials()  # a signal can land between creating a temporary file and the try that guards it
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _wants_jsonl(argv) -> bool:
    """`--progress jsonl` among raw arguments (argparse may fail before it parses them; it accepts prefixes)."""
    for i, a in enumerate(argv):
        key, eq, value = a.partition("=")
        if len(key) >= 4 and "--progress".startswith(key) and (value if eq else
                                                               (argv[i + 1] if i + 1 < len(argv) else "")) == "jsonl":
            return True
    return False


def _on_sigterm():
    """Turn SIGTERM into an exception, so the `finally` blocks that remove temporary files run; the old handler."""
    def raise_terminated(signum, frame):
        raise Terminated("terminated by signal %d" % signum)

    try:
        return signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread (an embedding application): leave signals alone
        return None


def _fail(message, code, jsonl):
    if jsonl:
        JsonLinesSink()({"event": "error", "message": message, "exit_code": code})
    _log("error: " + message)
    return code
