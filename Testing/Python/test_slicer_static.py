"""Static checks of the Slicer extension: CMake lists, .ui widgets, metadata and help texts."""

import ast
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULE = os.path.join(REPO, "MRISuperRes")
LIB_LIST = os.path.join(MODULE, "MRISuperResLibFiles.cmake")
SKIP_DIRS = {"__pycache__"}


def _files(root, exclude=()):
    out = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            if not name.endswith(".pyc") and rel not in exclude:
                out.append(rel)
    return out


def _cmakeList(text, variable):
    m = re.search(r"set\(\s*%s\s+(.*?)\)" % re.escape(variable), text, re.S)
    assert m, "set(%s ...) not found" % variable
    return [item for item in m.group(1).split() if not item.startswith("#")]


def expectedLibList() -> str:
    files = ["MRISuperResLib/" + f for f in _files(os.path.join(REPO, "MRISuperResLib"))]
    return ("# Generated from the MRISuperResLib tree; Testing/Python/test_slicer_static.py prints a fresh copy.\n"
            "set(MRISuperResLib_FILES\n%s  )\n" % "".join("  %s\n" % f for f in files))


def test_cmake_lists_every_module_file():
    text = open(os.path.join(MODULE, "CMakeLists.txt")).read()
    listed = [f.replace("${MODULE_NAME}", "MRISuperRes") for f in
              _cmakeList(text, "MODULE_PYTHON_SCRIPTS") + _cmakeList(text, "MODULE_PYTHON_RESOURCES")]
    present = [f for f in _files(MODULE, exclude={"CMakeLists.txt", "MRISuperResLibFiles.cmake", "README.md"})]
    assert sorted(set(present) - set(listed)) == [], "add these to MRISuperRes/CMakeLists.txt"
    assert sorted(set(listed) - set(present)) == [], "listed in MRISuperRes/CMakeLists.txt but missing"
    assert "WITH_GENERIC_TESTS" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_cmake_lists_every_library_file():
    listed = _cmakeList(open(LIB_LIST).read(), "MRISuperResLib_FILES")
    present = ["MRISuperResLib/" + f for f in _files(os.path.join(REPO, "MRISuperResLib"))]
    missing, stale = sorted(set(present) - set(listed)), sorted(set(listed) - set(present))
    assert not missing and not stale, (
        "MRISuperRes/MRISuperResLibFiles.cmake is out of date (missing %s, stale %s). Replace it with:\n\n%s"
        % (missing, stale, expectedLibList()))


def test_extension_metadata():
    text = open(os.path.join(REPO, "CMakeLists.txt")).read()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(r'set\(%s "[^"]+"\)' % key, text), key
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', text)
    assert "add_subdirectory(MRISuperRes)" in text
    index = json.load(open(os.path.join(REPO, "MRISuperRes.json")))
    assert set(index) <= {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision",
                          "scm_type", "scm_url", "tier"}
    assert index["build_dependencies"] == ["PyTorch"] and index["category"] in text
    # No public address exists yet: every entry names a file or folder of this repository, none a made-up URL.
    assert index["scm_type"] == "local" and os.path.isfile(os.path.join(REPO, index["scm_url"], "CMakeLists.txt"))
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        value = re.search(r'set\(%s "([^"]+)"\)' % key, text).group(1)
        assert "://" not in value and os.path.isfile(os.path.join(REPO, value)), (key, value)
    assert "Apache License" in open(os.path.join(REPO, "LICENSE.txt")).read()


def test_help_lists_methods_and_priors_and_acknowledgement_cites_sources():
    sys.path.insert(0, MODULE)
    from MRISuperResModuleLib.about import ACKNOWLEDGEMENT_TEXT, HELP_TEXT

    from MRISuperResLib.methods import available

    for method in available():
        assert "<b>%s</b>" % method.name in HELP_TEXT, method.name
    for prior in sorted(os.listdir(os.path.join(REPO, "Resources", "Models"))):
        assert prior in HELP_TEXT, prior
    assert "not for clinical use" in HELP_TEXT and "Import model" in HELP_TEXT and "not shipped" in HELP_TEXT
    for source in ("InverseSR", "Wang et al.", "MICCAI 2023", "Kingma et al.", "Variational Diffusion Models",
                   "Ho et al.", "Denoising Diffusion Probabilistic Models", "Apache-2.0", "not for clinical use",
                   "brain_image_synthesis_latent_diffusion_model", "MONAI"):
        assert source in ACKNOWLEDGEMENT_TEXT, source
    module = open(os.path.join(MODULE, "MRISuperRes.py")).read()
    assert "helpText = HELP_TEXT" in module and "acknowledgementText = ACKNOWLEDGEMENT_TEXT" in module


def _uiWidgets():
    root = ET.parse(os.path.join(MODULE, "Resources", "UI", "MRISuperRes.ui")).getroot()
    found = {w.get("name"): w.get("class") for w in root.iter("widget")}
    found.update({lay.get("name"): lay.get("class") for lay in root.iter("layout")})
    return root, found


def test_every_widget_the_widget_code_touches_exists_in_the_ui():
    source = open(os.path.join(MODULE, "MRISuperRes.py")).read()
    tree = ast.parse(source)
    declared = next(ast.literal_eval(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                    and any(getattr(t, "id", None) == "UI_WIDGETS" for t in node.targets))
    touched = set(re.findall(r"\bui\.(\w+)", source))
    assert touched - set(declared) == set(), "widgets used but not declared in UI_WIDGETS"
    _, found = _uiWidgets()
    wrong = {name: (cls, found.get(name)) for name, cls in declared.items() if found.get(name) != cls}
    assert wrong == {}, "name: (class the code expects, class in the .ui)"


def test_ui_parameter_names_exist_in_the_parameter_node():
    source = open(os.path.join(MODULE, "MRISuperRes.py")).read()
    tree = ast.parse(source)
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "MRISuperResParameterNode")
    fields = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    root, _ = _uiWidgets()
    names = [p.find("string").text for p in root.iter("property") if p.get("name") == "SlicerParameterName"]
    assert names and set(names) <= fields, set(names) - fields


def test_module_file_imports_no_torch_and_logic_is_qt_free():
    for path in _files(os.path.join(MODULE, "MRISuperResModuleLib")):
        tree = ast.parse(open(os.path.join(MODULE, "MRISuperResModuleLib", path)).read())
        top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        top |= {(n.module or "").split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom)}
        assert not top & {"torch", "qt", "ctk", "MRISuperResLib"}, (path, top)
    source = open(os.path.join(MODULE, "MRISuperRes.py")).read()
    assert not re.search(r"^\s*(import|from)\s+(torch|MRISuperResLib)\b", source, re.M)
