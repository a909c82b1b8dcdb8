"""Super-resolve every volume in a folder, headless.

In 3D Slicer (the module's Logic, the worker in Slicer's Python):

    Slicer --no-main-window --python-script MRISuperResBatch.py \\
        --input-folder /data/lr --output-folder /data/hr --method bspline [--set iterations=50] \\
        [--device auto] [--model NAME] [--pattern "*.nii.gz"] [--install-dependencies]

In plain Python with the slicer-core wheel and MRISuperResLib importable, the same arguments work:

    python MRISuperResBatch.py --input-folder ... --output-folder ...

Each input INPUT.ext becomes OUTPUT_FOLDER/INPUT_SR-METHOD.ext (same format). Inputs are never modified;
a file that fails is reported and the others still run.

Exit codes (EXIT_CODES below; the module's README lists them too):
    0  every volume was super-resolved
    1  some or all volumes failed (each failure is reported on stderr; the others were written)
    2  bad arguments: unknown option, missing or unusable folder, malformed --set, no volume matches
    3  the worker's Python lacks packages (run again with --install-dependencies), or installing them failed
  130  interrupted (Ctrl+C); the running volume's worker is stopped and nothing more is written

`--engine dask [--scheduler ADDRESS] [--workers N]` hands the whole folder to the library's cohort engine
(`python -m MRISuperResLib run --engine dask`, needs `pip install MRISuperResLib[cluster]` in the worker's
Python): one Dask task per file, OUTPUT_FOLDER/INPUT.ext (the input's name), OUTPUT_FOLDER/manifest.jsonl, and a
rerun skips the files already done. Its exit codes are the library's, except that "some files failed" is 1 here.
"""

import argparse
import fnmatch
import os
import sys

MODULE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if MODULE_DIR not in sys.path:
    sys.path.insert(0, MODULE_DIR)

SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr")
EXIT_OK, EXIT_FAILED, EXIT_ARGUMENTS, EXIT_DEPENDENCIES, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = {EXIT_OK: "all volumes done", EXIT_FAILED: "some volumes failed", EXIT_ARGUMENTS: "bad arguments",
              EXIT_DEPENDENCIES: "worker packages missing", EXIT_INTERRUPTED: "interrupted"}


def parseArgs(argv):
    p = argparse.ArgumentParser(description="MRISuperRes batch super-resolution over a folder.")
    p.add_argument("--input-folder", required=True)
    p.add_argument("--output-folder", required=True)
    p.add_argument("--method", default="bspline")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Method setting (repeatable).")
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--pattern", default="*", help="Only files matching this pattern (fnmatch).")
    p.add_argument("--install-dependencies", action="store_true", help="Install missing worker packages first.")
    p.add_argument("--engine", choices=["local", "dask"], default="local",
                   help="local: one file after another through the module's Logic; dask: the library's cohort engine.")
    p.add_argument("--scheduler", default=None, help="With --engine dask: address of an existing Dask scheduler.")
    p.add_argument("--workers", type=int, default=None, help="With --engine dask: local worker processes.")
    return p.parse_args(argv)


def cohortArgs(args) -> list:
    """The library's command line for a cohort run with this script's options (the same names, passed through)."""
    cli = ["run", "--engine", "dask", "--input", args.input_folder, "--output", args.output_folder,
           "--method", args.method, "--device", args.device]
    for item in args.set:
        cli += ["--set", item]
    for flag, value in (("--model", args.model), ("--seed", args.seed), ("--scheduler", args.scheduler),
                        ("--workers", args.workers)):
        if value is not None:
            cli += [flag, str(value)]
    return cli


def runCohort(args) -> int:
    """The folder on Dask through the library's CLI in its own process; its log streams through unchanged."""
    import subprocess

    from MRISuperResModuleLib.logic import MRISuperResLogic, defaultCommandBuilder

    if args.pattern != "*":
        print("error: --pattern does not apply to --engine dask (it runs every volume of the folder).", file=sys.stderr)
        return 2
    if args.install_dependencies:
        MRISuperResLogic().installDependencies(print)
    argv, env = defaultCommandBuilder(cohortArgs(args))
    code = subprocess.call(argv, env=env)
    return 1 if code == 4 else code  # the library's 4 (some files failed) is this script's 1


def splitName(filename):
    low = filename.lower()
    for suffix in SUFFIXES:
        if low.endswith(suffix):
            return filename[:-len(suffix)], filename[-len(suffix):]
    return None, None


def _fail(message, code):
    print("error: %s" % message, file=sys.stderr, flush=True)
    return code


def main(argv=None) -> int:
    try:
        args = parseArgs(argv)
    except SystemExit as exc:  # argparse: --help (0) or a bad option (2); Slicer must get the code, not an exception
        return exc.code if isinstance(exc.code, int) else EXIT_ARGUMENTS
    if not os.path.isdir(args.input_folder):
        return _fail("input folder %s does not exist." % args.input_folder, EXIT_ARGUMENTS)
    bad = [item for item in args.set if "=" not in item]
    if bad:
        return _fail("--set %s is not KEY=VALUE." % bad[0], EXIT_ARGUMENTS)
    if args.engine == "dask":
        return runCohort(args)
    if args.scheduler or args.workers:
        return _fail("--scheduler and --workers apply to --engine dask.", EXIT_ARGUMENTS)
    names = sorted(n for n in os.listdir(args.input_folder)
                   if splitName(n)[0] and fnmatch.fnmatch(n, args.pattern))
    if not names:
        return _fail("no volume (%s) in %s matches %r." % (", ".join(SUFFIXES), args.input_folder, args.pattern),
                     EXIT_ARGUMENTS)
    try:
        os.makedirs(args.output_folder, exist_ok=True)
    except OSError as exc:
        return _fail("cannot create the output folder %s (%s)." % (args.output_folder, exc), EXIT_ARGUMENTS)
    if os.path.samefile(args.input_folder, args.output_folder):
        return _fail("the output folder must differ from the input folder.", EXIT_ARGUMENTS)

    import slicer
    from MRISuperResModuleLib.logic import MRISuperResError, MRISuperResLogic

    if getattr(slicer, "mrmlScene", None) is None:
        slicer.mrmlScene = slicer.vtkMRMLScene()  # plain Python: a bare scene
    logic = MRISuperResLogic()
    try:
        missing = logic.missingDependencies()
        if missing and not args.install_dependencies:
            return _fail("the worker's Python lacks %s; run again with --install-dependencies." % ", ".join(missing),
                         EXIT_DEPENDENCIES)
        if missing:
            logic.installDependencies(print)
    except MRISuperResError as exc:
        return _fail(str(exc), EXIT_DEPENDENCIES)
    try:
        failed = _runAll(args, names, logic, slicer.mrmlScene)
    except KeyboardInterrupt:
        logic.cancel()
        return _fail("interrupted.", EXIT_INTERRUPTED)
    print("done: %d of %d volumes, %d failed." % (len(names) - failed, len(names), failed), flush=True)
    return EXIT_FAILED if failed else EXIT_OK


def _runAll(args, names, logic, scene) -> int:
    from MRISuperResModuleLib.logic import MRISuperResError, RunOptions, readVolumeFile, writeVolumeFile

    settings = dict(item.split("=", 1) for item in args.set)
    failed = 0
    for i, name in enumerate(names):
        stem, suffix = splitName(name)
        target = os.path.join(args.output_folder, "%s_SR-%s%s" % (stem, args.method, suffix))
        print("[%d/%d] %s -> %s" % (i + 1, len(names), name, target), flush=True)
        inputNode = outputNode = None
        try:
            inputNode = scene.AddNode(readVolumeFile(os.path.join(args.input_folder, name), "the input"))
            outputNode = logic.process(inputNode, method=args.method, settings=settings,
                                       options=RunOptions(device=args.device, model=args.model, seed=args.seed))
            writeVolumeFile(outputNode, target, compress=True)
        except MRISuperResError as exc:
            failed += 1
            print("  failed: %s" % exc, file=sys.stderr, flush=True)
        finally:
            for node in (outputNode, inputNode):
                if node is not None and node.GetScene() is not None:
                    scene.RemoveNode(node)
    return failed


if __name__ == "__main__":
    code = main(sys.argv[1:])
    try:
        import slicer

        if getattr(slicer, "app", None) is not None:
            slicer.util.exit(code)
    except ImportError:
        pass
    sys.exit(code)
