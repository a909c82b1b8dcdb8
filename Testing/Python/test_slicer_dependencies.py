"""The dependency installer never replaces what Slicer or the PyTorch extension provide.

The worker's Python is real: this venv's, or a bare one (`python -S`) that sees only chosen packages of
this venv (linked into a folder on PYTHONPATH). The only stand-in is the injected pip runner: it records
each pip command with its constraints file, then makes the requested packages appear (links them too).
"""

import importlib.metadata
import os
import re
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "MRISuperRes"))

from MRISuperResModuleLib import dependencies as D  # noqa: E402
from MRISuperResModuleLib.logic import MRISuperResError, MRISuperResLogic, defaultCommandBuilder  # noqa: E402

GUARDED = {"torch", "numpy", "simpleitk"}


def _linkDistribution(dist, folder):
    """Make `dist` (as installed in this venv) importable from `folder`."""
    d = importlib.metadata.distribution(dist)
    site = str(d.locate_file(""))
    for top in sorted({str(f).split("/")[0] for f in d.files or []} - {".."}):
        src, dst = os.path.join(site, top), os.path.join(folder, top)
        if os.path.exists(src) and not os.path.exists(dst):
            os.symlink(src, dst)


def _sandbox(tmp_path, dists):
    """A command builder for a Python that sees only `dists` (plus the standard library)."""
    folder = tmp_path / "site"
    folder.mkdir()
    for dist in dists:
        _linkDistribution(dist, str(folder))

    def build(cliArgs):
        _argv, env = defaultCommandBuilder(cliArgs)
        env["PYTHONPATH"] = os.pathsep.join([str(folder), REPO])
        return [sys.executable, "-S", "-m", "MRISuperResLib"] + list(cliArgs), env

    return build, str(folder)


def _recordingPip(folder, commands):
    def run(args, log):
        constraints = args[args.index("--constraint") + 1]
        commands.append((list(args), open(constraints).read()))
        for arg in args[1:]:
            if not arg.startswith("-") and arg != constraints:
                _linkDistribution(re.match(r"[A-Za-z0-9_.\-]+", arg).group(0), folder)

    return run


def _assertGuardedPinned(commands, versions):
    """torch, numpy and SimpleITK appear in no pip command unpinned, and the constraints pin them exactly."""
    for args, constraints in commands:
        for arg in args:
            name = re.match(r"[A-Za-z0-9_.\-]*", arg).group(0).lower()
            if name in GUARDED:
                assert "==" in arg, args
        pins = dict(line.split("==") for line in constraints.split())
        if "--no-deps" not in args:
            assert {k.lower() for k in pins} == GUARDED, constraints
        for dist, version in pins.items():
            assert version == versions[dist], (dist, version)


def _pyprojectMinimums():
    text = open(os.path.join(REPO, "pyproject.toml")).read()
    block = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    return dict(re.findall(r'"([A-Za-z0-9_.\-]+)>=([0-9.]+)"', block))


def test_requirements_are_the_librarys():
    minimums = _pyprojectMinimums()
    assert {dist: minimum for dist, (_m, minimum) in D.REQUIREMENTS.items()} == {d: minimums[d] for d in D.REQUIREMENTS}
    assert D.TORCH_REQUIREMENT == ">=" + minimums["torch"]


def test_versions_come_from_the_worker_python_without_importing():
    versions = D.installedVersions(defaultCommandBuilder)
    assert versions == {d: importlib.metadata.version(d) for d in D.REQUIREMENTS}
    assert D.unmet(versions) == [] and MRISuperResLogic().missingDependencies() == []


def test_plan_checks_versions_not_imports(tmp_path):
    versions = {"torch": "2.0.1", "numpy": "1.26.4", "SimpleITK": "2.3.1", "scipy": None, "monai": "1.3.2",
                "safetensors": "0.4.5"}
    plan = D.planInstall(versions)
    assert plan.torch == ">=2.1" and plan.errors == []
    assert plan.requirements == ["scipy>=1.8", "monai>=1.4"]  # monai is importable, but too old
    assert D.unmet(versions) == ["torch 2.0.1 (needs 2.1 or newer)", "scipy", "monai 1.3.2 (needs 1.4 or newer)"]
    old = D.planInstall(dict(versions, numpy="1.21.6", SimpleITK=None))
    assert old.errors == ["numpy 1.21.6 is older than 1.22", "SimpleITK is missing"]
    assert D.satisfied("2.13.0+cpu", "2.1") and not D.satisfied("2.1rc1", "2.10") and D.satisfied("", "9")


def test_a_package_without_metadata_cannot_be_pinned_so_nothing_else_is_resolved(tmp_path):
    versions = {"torch": "2.4.0", "numpy": "1.26.4", "SimpleITK": D.UNKNOWN}
    args = D.pipArguments(["monai>=1.4"], versions, str(tmp_path / "c.txt"))
    assert args[:3] == ["install", "--constraint", str(tmp_path / "c.txt")] and "--no-deps" in args
    assert (tmp_path / "c.txt").read_text().split() == ["torch==2.4.0", "numpy==1.26.4"]
    _assertGuardedPinned([(args, (tmp_path / "c.txt").read_text())], versions)


def test_install_pins_torch_numpy_simpleitk(tmp_path):
    build, folder = _sandbox(tmp_path, ["torch", "numpy", "SimpleITK"])
    logic = MRISuperResLogic(build, tempRoot=str(tmp_path / "temp"))
    assert logic.missingDependencies() == ["scipy", "monai", "safetensors"]
    commands, logs = [], []
    installed = logic.installDependencies(logs.append, pipRunner=_recordingPip(folder, commands))
    assert installed == ["scipy>=1.8", "monai>=1.4", "safetensors>=0.4"]
    assert len(commands) == 1 and commands[0][0][-3:] == installed and "--no-deps" not in commands[0][0]
    _assertGuardedPinned(commands, {d: importlib.metadata.version(d) for d in D.REQUIREMENTS})
    assert logic.missingDependencies() == []
    assert any("keeping torch %s" % importlib.metadata.version("torch") in line for line in logs)


def test_torch_comes_only_from_the_pytorch_extension(tmp_path):
    build, folder = _sandbox(tmp_path, ["numpy", "SimpleITK"])
    commands = []
    with pytest.raises(MRISuperResError, match="PyTorch extension") as info:
        MRISuperResLogic(build).installDependencies(pipRunner=_recordingPip(folder, commands))
    assert ">=2.1" in info.value.problem and commands == []  # never pip, torch first


def test_slicer_packages_are_never_installed(tmp_path):
    build, folder = _sandbox(tmp_path, [])
    logic = MRISuperResLogic(build)
    assert {"torch", "monai", "SimpleITK", "numpy"} <= set(logic.missingDependencies())
    commands, logs = [], []
    with pytest.raises(MRISuperResError, match="ship with Slicer") as info:
        logic.installDependencies(logs.append, pipRunner=_recordingPip(folder, commands))
    assert "numpy is missing" in info.value.problem and "SimpleITK is missing" in info.value.problem
    assert commands == [] and logs == []
