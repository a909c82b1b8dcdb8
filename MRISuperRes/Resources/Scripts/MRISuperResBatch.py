"""Super-resolve every volume in a folder, headless.

In 3D Slicer (the module's Logic, the worker in Slicer's Python):

    Slicer --no-main-window --python-script MRISuperResBatch.py \\
        --input-folder /data/lr --output-folder /data/hr --method bspline [--set iterations=50] \\
        [--device auto] [--model NAME] [--pattern "*.nii.gz"] [--install-dependencies]

In plain Python with the slicer-core wheel and MRISuperResLib importable, the same arguments work:

    python MRISuperResBatch.py --input-folder ... --output-folder ...

Each input INPUT.ext becomes OUTPUT_FOLDER/INPUT_SR-METHOD.ext (same format). Inputs are never modified;
a file that fails is reported and the others still run. Exit code: 0 all done, 1 some failed, 2 bad arguments.
"""

import argparse
import fnmatch
import os
import sys

MODULE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if MODULE_DIR not in sys.path:
    sys.path.insert(0, MODULE_DIR)

SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr")


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
    return p.parse_args(argv)


def splitName(filename):
    low = filename.lower()
    for suffix in SUFFIXES:
        if low.endswith(suffix):
            return filename[:-len(suffix)], filename[-len(suffix):]
    return None, None


def main(argv=None) -> int:
    import slicer
    from MRISuperResModuleLib.logic import MRISuperResError, MRISuperResLogic, RunOptions, readVolumeFile, writeVolumeFile

    args = parseArgs(argv)
    if not os.path.isdir(args.input_folder):
        print("error: input folder %s does not exist." % args.input_folder, file=sys.stderr)
        return 2
    os.makedirs(args.output_folder, exist_ok=True)
    if os.path.samefile(args.input_folder, args.output_folder):
        print("error: the output folder must differ from the input folder.", file=sys.stderr)
        return 2
    settings = dict(item.split("=", 1) for item in args.set if "=" in item)
    if getattr(slicer, "mrmlScene", None) is None:
        slicer.mrmlScene = slicer.vtkMRMLScene()  # plain Python: a bare scene
    scene = slicer.mrmlScene
    logic = MRISuperResLogic()
    if args.install_dependencies:
        logic.installDependencies(print)
    names = sorted(n for n in os.listdir(args.input_folder)
                   if splitName(n)[0] and fnmatch.fnmatch(n, args.pattern))
    failed = 0
    for i, name in enumerate(names):
        stem, suffix = splitName(name)
        target = os.path.join(args.output_folder, "%s_SR-%s%s" % (stem, args.method, suffix))
        print("[%d/%d] %s -> %s" % (i + 1, len(names), name, target), flush=True)
        inputNode = outputNode = None
        try:
            inputNode = scene.AddNode(readVolumeFile(os.path.join(args.input_folder, name)))
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
    print("done: %d of %d volumes, %d failed." % (len(names) - failed, len(names), failed), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    try:
        import slicer

        if getattr(slicer, "app", None) is not None:
            slicer.util.exit(code)
    except ImportError:
        pass
    sys.exit(code)
