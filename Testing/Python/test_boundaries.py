"""Package boundaries and packaging: the library never imports slicer/qt/vtk; a wheel install works."""

import glob
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


def _run(code, env_extra=None, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd or ROOT,
                          timeout=300)


def test_library_never_imports_slicer_qt_or_vtk():
    code = (
        "import sys, pkgutil, importlib, MRISuperResLib\n"
        "for m in pkgutil.walk_packages(MRISuperResLib.__path__, 'MRISuperResLib.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [n for n in sys.modules if n.split('.')[0] in ('slicer', 'qt', 'vtk', 'ctk', 'PythonQt', 'PySide6')]\n"
        "print(bad); assert not bad, bad\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_py39_clean():
    ruff = os.path.join(os.path.dirname(sys.executable), "ruff")
    if not os.path.exists(ruff):
        pytest.skip("ruff not installed")
    r = subprocess.run([ruff, "check", "--target-version", "py39", "MRISuperResLib", "MRISuperRes", "Testing"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:]


def test_non_editable_install_runs_from_elsewhere(tmp_path):
    """`pip install .` (a real wheel build, not editable) gives a working CLI from any folder."""
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                        "--target", str(target), ROOT], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (target / "MRISuperResLib" / "physics" / "operators.py").exists()
    for init in glob.glob(os.path.join(ROOT, "MRISuperResLib", "**", "__init__.py"), recursive=True):
        rel = os.path.relpath(init, ROOT)  # every subpackage is in pyproject's package list
        assert (target / rel).exists(), rel
    assert not (target / "MRISuperResLib.egg-link").exists()
    code = ("import MRISuperResLib, json, subprocess, sys; print(MRISuperResLib.__file__)\n"
            "r = subprocess.run([sys.executable, '-m', 'MRISuperResLib', 'methods', '--json'], capture_output=True, "
            "text=True); assert r.returncode == 0, r.stderr; print(len(json.loads(r.stdout)))")
    r = _run(code, {"PYTHONPATH": str(target)}, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert str(target) in r.stdout.splitlines()[0]
    models = os.path.join(ROOT, "Resources", "Models")
    for name in (os.listdir(models) if os.path.isdir(models) else []):
        if os.path.exists(os.path.join(models, name, "model.json")):
            installed = target / "MRISuperResLib" / "_models" / name
            assert (installed / "model.json").exists(), name
            with open(os.path.join(models, name, "model.json")) as fh:
                card = json.load(fh)
            files = [n["weights"] for n in card["networks"].values()]
            files += list((card.get("reference") or {}).get("sha256", {}))
            for f in files:  # every file the card names ships in the wheel (package-data patterns)
                assert (installed / f).exists(), (name, f)
