"""Python packages the worker needs: checked by version, installed without replacing Slicer's own.

1. Ask the worker's Python which versions it has (`importlib.metadata` in a child process: neither
   this process nor the check imports torch).
2. numpy and SimpleITK ship with Slicer: never installed or replaced; too old or missing is an error.
3. torch belongs to the PyTorch extension: installed only through `PyTorchUtils` with the library's
   requirement (`TORCH_REQUIREMENT`), which picks the CUDA/CPU build that fits the machine.
4. Everything else comes from PyPI with pip and a constraints file that pins the installed torch, numpy
   and SimpleITK (`==version`), so pip picks a MONAI that fits the installed torch instead of replacing
   torch. Where a pinned package has no version metadata, pip runs with `--no-deps` on the explicit list.
5. Check the versions again: every requirement met, torch, numpy and SimpleITK unchanged.

The pip runner is injectable (`install(..., pipRunner=...)`): tests record the commands it would run.
"""

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

# distribution -> (import name, minimum version). The minimums are the library's (pyproject.toml); a test
# keeps the two in step.
REQUIREMENTS: Dict[str, Tuple[str, str]] = {
    "torch": ("torch", "2.1"),
    "numpy": ("numpy", "1.22"),
    "SimpleITK": ("SimpleITK", "2.2"),
    "scipy": ("scipy", "1.8"),
    "monai": ("monai", "1.4"),
    "safetensors": ("safetensors", "0.4"),
}
TORCH = "torch"
TORCH_REQUIREMENT = ">=" + REQUIREMENTS[TORCH][1]
SLICER_OWNED = ("numpy", "SimpleITK")  # ship with Slicer
PINNED = (TORCH,) + SLICER_OWNED  # never left for pip to choose
UNKNOWN = ""  # importable, but without version metadata

_CHECK = """
import importlib.metadata, importlib.util, json, sys
out = {}
for dist, module in json.loads(sys.argv[1]).items():
    if importlib.util.find_spec(module) is None:
        out[dist] = None
        continue
    try:
        out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        out[dist] = ""
print(json.dumps(out))
"""


def _error(problem, fix=""):
    from .runs import MRISuperResError

    return MRISuperResError(problem, fix)


def versionTuple(version: str) -> Tuple[int, ...]:
    """The release numbers of a version string: '2.13.0+cpu' -> (2, 13, 0)."""
    m = re.match(r"\d+(\.\d+)*", version or "")
    return tuple(int(p) for p in m.group(0).split(".")) if m else ()


def satisfied(version: Optional[str], minimum: str) -> bool:
    if version is None:
        return False
    if version == UNKNOWN:
        return True  # importable; nothing to compare (Slicer builds some packages without metadata)
    have, need = versionTuple(version), versionTuple(minimum)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def _python(commandBuilder):
    """The worker's interpreter (and launcher arguments), taken from the command builder."""
    argv, env = commandBuilder(["--version"])
    if "-m" in argv:
        return argv[:argv.index("-m")], env
    return argv[:1], env


def installedVersions(commandBuilder) -> Dict[str, Optional[str]]:
    """{distribution: version, "" when importable without metadata, None when missing} in the worker's Python."""
    python, env = _python(commandBuilder)
    modules = {dist: module for dist, (module, _minimum) in REQUIREMENTS.items()}
    proc = subprocess.run(python + ["-c", _CHECK, json.dumps(modules)], capture_output=True, text=True, env=env,
                          timeout=120)
    if proc.returncode != 0:
        raise _error("Could not start the worker's Python (%s)." % " ".join(python),
                     (proc.stderr.strip().splitlines() or [""])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def unmet(versions: Dict[str, Optional[str]]) -> List[str]:
    """What is missing or too old, for people: ['monai', 'torch 2.0.1 (needs 2.1 or newer)']."""
    out = []
    for dist, (_module, minimum) in REQUIREMENTS.items():
        version = versions.get(dist)
        if version is None:
            out.append(dist)
        elif not satisfied(version, minimum):
            out.append("%s %s (needs %s or newer)" % (dist, version, minimum))
    return out


def missingModules(commandBuilder) -> List[str]:
    return unmet(installedVersions(commandBuilder))


@dataclass
class InstallPlan:
    torch: Optional[str] = None  # a requirement for PyTorchUtils, or None: torch is fine
    requirements: List[str] = field(default_factory=list)  # for pip, e.g. "monai>=1.4"
    errors: List[str] = field(default_factory=list)


def planInstall(versions: Dict[str, Optional[str]]) -> InstallPlan:
    plan = InstallPlan()
    for dist, (_module, minimum) in REQUIREMENTS.items():
        version = versions.get(dist)
        if satisfied(version, minimum):
            continue
        if dist in SLICER_OWNED:
            plan.errors.append("%s %s" % (dist, "is missing" if version is None else
                                          "%s is older than %s" % (version, minimum)))
        elif dist == TORCH:
            plan.torch = TORCH_REQUIREMENT
        else:
            plan.requirements.append("%s>=%s" % (dist, minimum))
    return plan


def pipArguments(requirements: List[str], versions: Dict[str, Optional[str]], constraintsPath: str) -> List[str]:
    """`pip` arguments that install `requirements` and may not touch torch, numpy or SimpleITK.

    Writes the constraints file (`torch==2.13.0` ...). A pinned package without version metadata cannot be
    pinned, so then no dependency is resolved at all (`--no-deps`): the explicit list is all that is installed.
    """
    pins = ["%s==%s" % (dist, versions[dist]) for dist in PINNED if versions.get(dist)]
    with open(constraintsPath, "w") as f:
        f.write("\n".join(pins) + "\n")
    args = ["install", "--constraint", constraintsPath]
    if len(pins) < len(PINNED):
        args.append("--no-deps")
    return args + list(requirements)


def defaultPipRunner(commandBuilder):
    """Runs `pip <args>` in the worker's Python: Slicer's own pip_install in the app, a child process otherwise."""

    def run(args: List[str], log: Callable[[str], None]):
        try:
            import slicer

            if getattr(slicer, "app", None) is not None and args[:1] == ["install"]:
                slicer.util.pip_install(args[1:])
                return
        except ImportError:
            pass
        python, env = _python(commandBuilder)
        proc = subprocess.run(python + ["-m", "pip"] + list(args), capture_output=True, text=True, env=env)
        for line in (proc.stdout + proc.stderr).splitlines():
            log(line)
        if proc.returncode != 0:
            raise _error("pip could not install the packages (exit code %d)." % proc.returncode, "See the log above.")

    return run


def installTorchWithExtension(requirement: str):
    try:
        import PyTorchUtils  # the PyTorch extension's module; present only in Slicer with the extension
    except ImportError:
        raise _error("PyTorch %s is needed and not installed." % requirement,
                     "Install the PyTorch extension from the Extensions Manager and restart Slicer "
                     "(plain Python: pip install \"torch%s\")." % requirement) from None
    # PyTorchUtils chooses the CUDA or CPU build for this machine; it imports torch in Slicer's process once.
    if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=requirement) is None:
        raise _error("PyTorch installation did not finish.", "Open the PyTorch Utils module and install it there.")


def install(commandBuilder, logCallback: Optional[Callable[[str], None]] = None,
            pipRunner: Optional[Callable] = None, torchInstaller: Optional[Callable[[str], None]] = None) -> List[str]:
    """Install what the worker lacks; returns the requirements installed. Raises MRISuperResError."""
    log = logCallback or (lambda line: None)
    pipRunner = pipRunner or defaultPipRunner(commandBuilder)
    torchInstaller = torchInstaller or installTorchWithExtension
    versions = installedVersions(commandBuilder)
    plan = planInstall(versions)
    if plan.errors:
        raise _error("The worker's Python has unsuitable packages that ship with Slicer: %s." % "; ".join(plan.errors),
                     "Install a current 3D Slicer; these packages are never installed from PyPI on purpose.")
    installed = []
    if plan.torch:
        log("Installing PyTorch %s through the PyTorch extension..." % plan.torch)
        torchInstaller(plan.torch)
        installed.append("torch" + plan.torch)
        versions = installedVersions(commandBuilder)
        if not satisfied(versions.get(TORCH), REQUIREMENTS[TORCH][1]):
            raise _error("PyTorch %s is still not installed (found %s)." % (plan.torch, versions.get(TORCH)),
                         "Open the PyTorch Utils module and install a newer PyTorch there.")
    if plan.requirements:
        log("Installing %s (keeping torch %s, numpy %s, SimpleITK %s)..." % (
            ", ".join(plan.requirements), versions.get("torch"), versions.get("numpy"), versions.get("SimpleITK")))
        folder = tempfile.mkdtemp(prefix="MRISuperRes-pip-")
        try:
            pipRunner(pipArguments(plan.requirements, versions, os.path.join(folder, "constraints.txt")), log)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        installed += plan.requirements
    after = installedVersions(commandBuilder)
    changed = ["%s %s -> %s" % (d, versions.get(d), after.get(d)) for d in PINNED if after.get(d) != versions.get(d)]
    if changed:
        raise _error("Installing changed packages that Slicer or the PyTorch extension provide: %s." % ", ".join(changed),
                     "Reinstall the PyTorch extension's torch in the PyTorch Utils module, and report this.")
    still = unmet(after)
    if still:
        raise _error("Still missing after installation: %s." % ", ".join(still),
                     "See the log; install them by hand into Slicer's Python.")
    return installed
