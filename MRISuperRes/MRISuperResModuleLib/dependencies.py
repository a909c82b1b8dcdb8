"""Python packages the worker needs, checked and installed from outside the worker.

The check runs in a child process with `importlib.util.find_spec`, so neither this process nor the
check imports torch. Installing is explicit (`MRISuperResLogic().installDependencies()`): the panel
asks once, with consent, on the first Apply; scripts call it themselves.
- torch comes from Slicer's PyTorch extension (it picks the CUDA/CPU build that fits the machine);
- SimpleITK and numpy are Slicer's own and are never reinstalled;
- the rest come from PyPI with pip.
"""

import json
import subprocess
from typing import Callable, List, Optional

# module name -> pip requirement (None: must not be installed by us)
MODULES = {
    "torch": None,
    "numpy": None,
    "SimpleITK": None,
    "scipy": "scipy",
    "monai": "monai>=1.4",
    "safetensors": "safetensors",
}
NEVER_REINSTALL = ("SimpleITK", "numpy")

_CHECK = ("import importlib.util, json, sys; mods = json.loads(sys.argv[1]); "
          "print(json.dumps([m for m in mods if importlib.util.find_spec(m) is None]))")


def _python(commandBuilder):
    """The worker's interpreter (and launcher arguments), taken from the command builder."""
    argv, env = commandBuilder(["--version"])
    if "-m" in argv:
        return argv[:argv.index("-m")], env
    return argv[:1], env


def missingModules(commandBuilder) -> List[str]:
    python, env = _python(commandBuilder)
    proc = subprocess.run(python + ["-c", _CHECK, json.dumps(list(MODULES))], capture_output=True, text=True,
                          env=env, timeout=120)
    if proc.returncode != 0:
        from .runs import MRISuperResError

        raise MRISuperResError("Could not start the worker's Python (%s)." % " ".join(python),
                               (proc.stderr.strip().splitlines() or [""])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def install(commandBuilder, logCallback: Optional[Callable[[str], None]] = None) -> List[str]:
    from .runs import MRISuperResError

    log = logCallback or (lambda line: None)
    missing = missingModules(commandBuilder)
    bad = [m for m in missing if m in NEVER_REINSTALL]
    if bad:
        raise MRISuperResError("The worker's Python lacks %s, which ships with Slicer." % ", ".join(bad),
                               "Reinstall 3D Slicer; these are not installed from PyPI on purpose.")
    installed = []
    if "torch" in missing:
        log("Installing PyTorch through the PyTorch extension...")
        _installTorch()
        installed.append("torch")
    requirements = [MODULES[m] for m in missing if MODULES.get(m)]
    if requirements:
        log("Installing %s..." % ", ".join(requirements))
        _pipInstall(commandBuilder, requirements, log)
        installed += requirements
    still = [m for m in missingModules(commandBuilder) if m in missing]
    if still:
        raise MRISuperResError("Still missing after installation: %s." % ", ".join(still),
                               "See the log; install them by hand into Slicer's Python.")
    return installed


def _installTorch():
    from .runs import MRISuperResError

    try:
        import PyTorchUtils  # the PyTorch extension's module; present only in Slicer with the extension
    except ImportError:
        raise MRISuperResError("PyTorch is not installed.", "Install the PyTorch extension from the Extensions "
                               "Manager (Slicer), or `pip install torch` (plain Python).") from None
    logic = PyTorchUtils.PyTorchUtilsLogic()
    if not logic.installTorch(askConfirmation=False):
        raise MRISuperResError("PyTorch installation did not finish.", "Open the PyTorch Utils module and install it there.")


def _pipInstall(commandBuilder, requirements, log):
    try:
        import slicer

        if getattr(slicer, "app", None) is not None:
            slicer.util.pip_install(requirements)
            return
    except ImportError:
        pass
    python, env = _python(commandBuilder)
    proc = subprocess.run(python + ["-m", "pip", "install"] + list(requirements), capture_output=True, text=True,
                          env=env)
    for line in (proc.stdout + proc.stderr).splitlines():
        log(line)
    if proc.returncode != 0:
        from .runs import MRISuperResError

        raise MRISuperResError("pip could not install %s." % ", ".join(requirements), "See the log above.")
