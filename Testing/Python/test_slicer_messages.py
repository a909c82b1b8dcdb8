"""The panel shows the worker's messages in its own words: no command-line flags, no temp file names."""

import ast
import os
import re
import sys
import types

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "MRISuperRes"))

from MRISuperResModuleLib import messages as M  # noqa: E402
from MRISuperResModuleLib.runs import FIXES, MRISuperResError  # noqa: E402

FLAG = re.compile(r"(?<![\w-])--[a-z]")
TEMP = "/tmp/MRISuperRes/MRISuperRes-run-x1y2"
CONTEXT = M.MessageContext({TEMP + "/input.nrrd": "'T1_thick'", TEMP + "/output.nrrd": "the output volume"}, TEMP)


def test_the_reported_messages():
    inferred = ('input.nrrd: degradation inferred from the voxel spacing: {"operator": "thick-slice", "axes": [2], '
                '"factors": [4.0], "profile": "gaussian"} (override with --operator/--axis/--factor).')
    assert M.forPanel(inferred, CONTEXT) == (
        "'T1_thick': degradation inferred from the voxel spacing: thick slices along axis 2 (k), factor 4, "
        "gaussian profile (to change it: Input > Override).")
    assert M.forPanel("--set 'steps' is not key=value. Example: --set steps=20") == (
        "Method settings 'steps' is not key=value. Example: Method settings > Steps = 20")
    assert M.forPanel("Lower the learning rate, e.g. --set lr=0.007.") == (
        "Lower the learning rate, e.g. Method settings > Learning rate = 0.007.")
    assert M.forPanel("fewer iterations or samples (--set iterations=N, --set samples=N) or a GPU") == (
        "fewer iterations or samples (Method settings > Iterations, Method settings > Samples) or a GPU")
    assert M.forPanel("Use --device cpu (or auto), or install a CUDA build of PyTorch.") == (
        "Use Method > Device: cpu (or auto), or install a CUDA build of PyTorch.")
    assert M.forPanel("Could not write %s/output.nrrd (disk full)." % TEMP, CONTEXT) == (
        "Could not write the output volume (disk full).")
    assert M.forPanel("Import it first: `python -m MRISuperResLib models import X.zip`, then use --model NAME.") == (
        "Import it first: Method > Model > Import model..., then use Method > Model.")
    assert M.forPanel("Output paths must differ from each other. Give distinct --output/--uncertainty/--residual.") == (
        "Output paths must differ from each other. Give distinct output volumes (Outputs section).")
    assert M.forPanel("Pass --model NAME or PATH (see `python -m MRISuperResLib models list`).") == (
        "Pass Method > Model (see the Model list (Method section)).")


def _messageLiterals():
    """Every message the library gives a user: strings passed to errors and warnings, or held as a fix/hint."""
    skip = ("training", "bench", "demo.py")
    found = []
    for folder, dirs, names in os.walk(os.path.join(REPO, "MRISuperResLib")):
        dirs[:] = [d for d in dirs if d not in skip and d != "__pycache__"]
        for name in names:
            if not name.endswith(".py") or name in skip:
                continue
            path = os.path.join(folder, name)
            tree = ast.parse(open(path).read())
            for node in ast.walk(tree):
                texts = []
                if isinstance(node, ast.Call):
                    func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                    if func.endswith("Error") or func == "warning":
                        texts = node.args
                elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") in ("fix", "hint", "message")
                                                          for t in node.targets):
                    texts = [node.value]
                for arg in texts:
                    for sub in ast.walk(arg):
                        if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and "--" in sub.value:
                            found.append((os.path.relpath(path, REPO), sub.value))
    return found


def test_no_flag_of_the_librarys_messages_reaches_the_panel():
    literals = _messageLiterals()
    assert len(literals) >= 10  # the scan finds the messages (e.g. "--set lr=%g", "--device cpu")
    left = [(where, M.forPanel(re.sub(r"%[-.0-9]*[srdgf]", "x", text))) for where, text in literals]
    assert [x for x in left if FLAG.search(x[1])] == []


def test_the_fix_line_is_never_empty():
    for code in (1, 2, 3, 7, None):
        text = M.errorText(MRISuperResError("Something is wrong.", "", exitCode=code))
        problem, fix = text.split("\n\nHow to fix: ")
        assert problem == "Something is wrong." and len(fix) > 10
    assert FIXES[2]  # the Logic's own errors (console, batch) carry the same line
    run = types.SimpleNamespace(request=types.SimpleNamespace(inputPath=TEMP + "/input.nrrd",
                                                              outputPath=TEMP + "/output.nrrd",
                                                              uncertaintyPath=None, residualPath=None),
                                inputNode=None, tempDir=TEMP)
    error = MRISuperResError("Could not read %s/output.nrrd." % TEMP, "Check %s." % TEMP, exitCode=1)
    assert M.errorText(error, M.contextForRun(run)) == (
        "Could not read the output volume.\n\nHow to fix: Check the run's temporary folder.")
