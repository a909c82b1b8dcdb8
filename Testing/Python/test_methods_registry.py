"""What methods declare at register(): the pipeline and the benchmark ask it instead of testing names."""

import os
import pkgutil

import pytest

from MRISuperResLib import methods
from MRISuperResLib.bench.cli import gate_plan
from MRISuperResLib.methods import GridBinding, Setting, available, register
from MRISuperResLib.methods import registry as reg


def test_every_module_of_the_package_is_a_registered_method():
    modules = {m.name for m in pkgutil.iter_modules(methods.__path__) if not m.ispkg and m.name != "registry"}
    registered = {m.solve.__module__.rsplit(".", 1)[-1] for m in available()}
    assert modules == registered


def test_grid_bound_methods_are_the_inversesr_ones_and_name_their_paste_settings():
    bound = {m.name: m for m in available() if m.grid is not None}
    assert sorted(bound) == ["inversesr-decoder", "inversesr-ldm"]
    for m in bound.values():
        assert m.needs_prior == "ldm"
        assert m.setting(m.grid.paste).type == "bool" and m.setting(m.grid.spread).type == "choice"
        assert m.grid.paste_from({m.grid.paste: True, m.grid.spread: "linear"}) == (True, "linear")
        assert m.grid.paste_from({}) == (False, "none")


def test_a_grid_binding_must_name_settings_the_method_has():
    with pytest.raises(ValueError, match="not a bool setting"):
        register("test-bad-binding", "t", "t", settings=[Setting("paste_spread", "choice", "none", "", choices=("none",))],
                 needs_prior="ldm", grid=GridBinding(paste="paste_observed", spread="paste_spread"))(lambda *a: None)
    with pytest.raises(ValueError, match="only a method with a prior"):
        register("test-no-prior", "t", "t", grid=GridBinding(paste="p", spread="s"))(lambda *a: None)
    assert "test-bad-binding" not in reg._REGISTRY and "test-no-prior" not in reg._REGISTRY


def test_the_quality_gate_is_what_the_methods_declare():
    plan = gate_plan()
    assert plan == {"inversesr-decoder": ["slice-removal-4mm", "slice-removal-8mm"],
                    "inversesr-ldm": ["slice-removal-4mm", "slice-removal-8mm"],
                    "kspace-vdm": ["kspace-4x"],
                    "paired-ddpm": ["slice-removal-4mm", "thick-slice-5mm", "slice-removal-8mm"]}


def test_the_pipeline_and_the_inversesr_fit_do_not_test_method_names():
    lib = os.path.dirname(os.path.dirname(methods.__file__))
    names = ('"inversesr-decoder"', '"inversesr-ldm"', '"paired-ddpm"', '"kspace-vdm"')
    for rel, banned in ((("pipeline.py",), names + ('"ldm"',)), (("native.py",), names + ('"ldm"',)),
                        (("methods", "inversesr", "solver.py"), ('== "inversesr', '!= "inversesr')),
                        (("methods", "inversesr", "budget.py"), names)):
        code = open(os.path.join(lib, *rel)).read()
        for word in banned:
            assert word not in code, (rel, word)
