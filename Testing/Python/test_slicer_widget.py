"""The real MRISuperResWidget, driven through its real .ui on PySide6 (see slicer_qt_shim.py).

The scene is slicer-core's real MRML; every worker is a real process. The listings (methods, devices,
models) come from the library's real CLI once per module and are replayed by a small script, so each
panel starts in a second; runs go through the library's real CLI (after a warm-up of progress events
where a test needs time to act).
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
pytest.importorskip("PySide6.QtUiTools")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "MRISuperRes"))

import slicer_qt_shim as shim  # noqa: E402
from MRISuperResModuleLib import presenter  # noqa: E402
from MRISuperResModuleLib.logic import MRISuperResLogic  # noqa: E402
from PySide6 import QtWidgets  # noqa: E402
from slicer_test_support import addVolume, alive, scriptWorker, volumeNames  # noqa: E402

WORKER = """
    import json, os, sys, time
    args = sys.argv[1:]
    listings = json.load(open(os.environ["LISTINGS"]))
    if " ".join(args) in listings:
        sys.stdout.write(listings[" ".join(args)])
        sys.exit(0)
    with open(os.environ["PIDFILE"], "w") as f:
        f.write(str(os.getpid()))
    steps = int(os.environ["STEPS"])
    for step in range(1, steps + 1):
        print(json.dumps({"event": "progress", "fraction": step / (2 * steps), "step": step, "total": 2 * steps,
                          "message": "warming up", "eta_s": 1.0}), flush=True)
        time.sleep(0.05)
    from MRISuperResLib.cli import main
    sys.exit(main(args))
"""
LISTINGS = ("methods --json", "devices --json", "models list --json")


@pytest.fixture(scope="module")
def listings(tmp_path_factory):
    out = {}
    env = dict(os.environ, PYTHONPATH=REPO)
    for command in LISTINGS:
        proc = subprocess.run([sys.executable, "-m", "MRISuperResLib"] + command.split(), capture_output=True,
                              text=True, env=env, timeout=300, check=True)
        out[command] = proc.stdout
    path = tmp_path_factory.mktemp("listings") / "listings.json"
    path.write_text(json.dumps(out))
    return str(path)


class Panel:
    def __init__(self, widget, dialogs, scene, env, inputNode):
        self.widget, self.dialogs, self.scene, self.env, self.inputNode = widget, dialogs, scene, env, inputNode
        self.ui = widget.ui
        self.p = widget._parameterNode
        self.root = shim.unwrap(widget.parent)

    def q(self, name):
        return shim.unwrap(getattr(self.ui, name))

    def choose(self, comboName, data):
        combo = self.q(comboName)
        index = combo.findData(data)
        assert index >= 0, (comboName, data)
        combo.setCurrentIndex(index)

    def formRows(self):
        form = self.q("settingsFormLayout")
        rows = {}
        for row in range(form.rowCount()):
            label = form.itemAt(row, QtWidgets.QFormLayout.LabelRole).widget().text()
            rows[label.rstrip(":")] = form.itemAt(row, QtWidgets.QFormLayout.FieldRole).widget()
        return rows

    def status(self):
        bar = self.q("progressBar")
        return bar.value(), bar.maximum(), self.q("statusLabel").text()


@pytest.fixture
def panel(monkeypatch, tmp_path, listings):
    scene = slicer.vtkMRMLScene()
    dialogs = shim.install(monkeypatch, scene)
    sys.modules.pop("MRISuperRes", None)
    import MRISuperRes

    inputNode = addVolume(scene, np.random.default_rng(0).random((8, 7, 3)).astype(np.float32) * 100,
                          spacing=(1.0, 1.0, 4.0), angle=0.0, name="T1_thick")
    env = {"LISTINGS": listings, "STEPS": "0", "PIDFILE": str(tmp_path / "pid")}
    widget = MRISuperRes.MRISuperResWidget()
    widget.logic = MRISuperResLogic(scriptWorker(tmp_path, WORKER, env), tempRoot=str(tmp_path / "temp"))
    widget.setup()
    assert shim.processEventsUntil(lambda: widget.methods is not None and not widget.queries, timeout=30)
    yield Panel(widget, dialogs, scene, env, inputNode)
    widget.cleanup()
    for combo in shim.unwrap(widget.parent).findChildren(shim.qMRMLNodeComboBox):
        combo.forgetScene()
    sys.modules.pop("MRISuperRes", None)
    scene.Clear(1)


def _methodJson(panel, name):
    return presenter.methodByName(panel.widget.methods, name)


def test_panel_starts_with_the_scene_and_the_workers_listings(panel):
    assert panel.p.inputVolume is panel.inputNode and panel.q("inputVolumeSelector").currentNode() is panel.inputNode
    assert "thick slices along axis 2 (k), factor 4" in panel.q("degradationLabel").text().replace("Detected: ", "")
    names = [panel.q("methodComboBox").itemData(i) for i in range(panel.q("methodComboBox").count())]
    assert names == [m["name"] for m in panel.widget.methods] and "paired-ddpm" in names
    assert panel.q("applyButton").text() == "Apply" and panel.q("applyButton").isEnabled()


def test_settings_form_is_built_from_the_schema_and_always_shows_the_parameter_node(panel):
    panel.choose("methodComboBox", "paired-ddpm")
    assert panel.p.method == "paired-ddpm"
    schema = [s for s in _methodJson(panel, "paired-ddpm")["settings"] if s["name"] != "seed"]
    rows = panel.formRows()
    assert list(rows) == [presenter.settingLabel(s["name"]) for s in schema]
    kinds = {"int": QtWidgets.QSpinBox, "float": QtWidgets.QDoubleSpinBox, "bool": QtWidgets.QCheckBox,
             "choice": QtWidgets.QComboBox}
    for s in schema:
        widget = rows[presenter.settingLabel(s["name"])]
        assert isinstance(widget, kinds.get(s["type"], QtWidgets.QLineEdit)), s
        assert widget.toolTip() == s.get("help", "")
    # The form starts from the default prior's settings for this machine's device (the card's, as on the command
    # line), not the schema's: a run from the panel is the run the gate measured.
    method = _methodJson(panel, "paired-ddpm")
    card = method["priorDefaults"][method["defaultPrior"]["cpu"]]["cpu"]
    schemaDefault = next(s["default"] for s in schema if s["name"] == "steps")
    steps = rows["Steps"]
    default = card["steps"]
    assert steps.value() == default != schemaDefault
    assert rows["Adapt"].currentText() == card["adapt"] == "auto" != next(s["default"] for s in schema
                                                                        if s["name"] == "adapt")
    assert presenter.runSettings(panel.widget.panelState())["adapt"] == "auto"

    steps.setValue(default + 5)  # the user
    assert json.loads(panel.p.methodSettings)["paired-ddpm"]["steps"] == default + 5
    # A loaded scene or the Python console changes the parameter node; the form must follow (it kept showing the
    # user's value while Apply sent the new one).
    panel.p.methodSettings = json.dumps({"paired-ddpm": {"steps": default + 9}})
    assert panel.formRows()["Steps"].value() == default + 9
    assert presenter.runSettings(panel.widget.panelState())["steps"] == default + 9  # what Apply would send

    panel.choose("methodComboBox", "bspline")
    assert panel.formRows() == {} and not panel.q("settingsCollapsibleGroupBox").isVisibleTo(panel.root)
    panel.choose("methodComboBox", "paired-ddpm")
    assert panel.formRows()["Steps"].value() == default + 9


def test_a_run_that_learns_from_the_scan_shows_that_phase(panel):
    panel.choose("methodComboBox", "paired-ddpm")
    rows = panel.formRows()
    rows["Adapt"].setCurrentText("on")  # the input's 4 mm thick slices: auto would not learn
    rows["Adapt steps"].setValue(40)
    rows["Samples"].setValue(1)
    seen = []
    panel.q("applyButton").click()
    assert shim.processEventsUntil(lambda: panel.widget.run is None, timeout=300,
                                   every=lambda: seen.append(panel.status()))
    learning = [(v, t) for v, _m, t in seen if "Learning from this scan" in t]
    assert learning and all(re.fullmatch(r"Step \d+/\d+ - Learning from this scan, step \d+ of \d+ - ETA \d+:\d\d "
                                         r"\(\d+:\d\d elapsed\)", t) for _v, t in learning), learning[:3]
    assert max(v for v, _t in learning) <= 50  # the first half of the bar; sampling takes the rest
    assert panel.dialogs.errors() == [] and volumeNames(panel.scene) == ["T1_thick", "T1_thick_SR-paired-ddpm"]


def test_apply_turns_into_cancel_and_back(panel):
    panel.env["STEPS"] = "400"
    panel.choose("methodComboBox", "trilinear")
    apply = panel.q("applyButton")
    apply.click()
    assert apply.text() == "Cancel" and apply.isEnabled() and not panel.q("inputsCollapsibleButton").isEnabled()
    value, maximum, text = panel.status()
    assert maximum == 0 and text.startswith("Starting the worker... (0:0")  # busy from the first moment
    assert shim.processEventsUntil(lambda: "Step 3/800" in panel.status()[2] or "Step 4/800" in panel.status()[2])
    apply.click()
    assert panel.widget.run is None and apply.text() == "Apply" and panel.q("inputsCollapsibleButton").isEnabled()
    assert panel.q("statusLabel").text() == "Cancelled; nothing was added to the scene."
    assert not alive(int(open(panel.env["PIDFILE"]).read()))
    assert volumeNames(panel.scene) == ["T1_thick"] and panel.dialogs.errors() == []


def test_progress_events_reach_the_bar_and_its_text(panel):
    panel.env["STEPS"] = "10"
    panel.choose("methodComboBox", "trilinear")
    seen = []
    panel.q("applyButton").click()
    seen.append(panel.status())
    assert shim.processEventsUntil(lambda: panel.widget.run is None, timeout=60, every=lambda: seen.append(panel.status()))
    texts = [t for _v, _m, t in seen]
    assert texts[0].startswith("Starting the worker...") and seen[0][1] == 0
    warm = [(v, t) for v, _m, t in seen if "Warming up" in t]
    assert warm and all(re.fullmatch(r"Step \d+/20 - Warming up - ETA 0:01 \(\d+:\d\d elapsed\)", t) for _v, t in warm)
    assert any(v == round(100 * int(t.split("/")[0][5:]) / 20) and v > 0 for v, t in warm)
    name = "T1_thick_SR-trilinear"
    assert panel.q("statusLabel").text().startswith("Done in ") and panel.q("statusLabel").text().endswith(
        "Created %s." % name)
    assert not panel.q("progressBar").isVisibleTo(panel.root)
    assert volumeNames(panel.scene) == ["T1_thick", name]
    log = panel.q("logTextEdit").toPlainText()
    assert "Started trilinear on device auto." in log
    assert ("warning: 'T1_thick': degradation inferred from the voxel spacing: thick slices along axis 2 (k), "
            "factor 4, gaussian profile (to change it: Input > Override).") in log
    assert "--" not in log and "input.nrrd" not in log and panel.dialogs.errors() == []
    assert [kw["background"].GetName() for kind, _t, kw in panel.dialogs.shown if kind == "layers"] == [name]


def test_error_dialog_in_the_panels_words(panel):
    panel.choose("methodComboBox", "kspace-vdm")  # a k-space method on a thick-slice input: the worker refuses
    panel.q("applyButton").click()
    assert shim.processEventsUntil(lambda: panel.widget.run is None, timeout=60)
    [text] = panel.dialogs.errors()
    assert text == ("Super-resolution failed.\n\nMethod kspace-vdm is not built for thick-slice degradations. It "
                    "handles: kspace. Choose another method or operator.\n\nHow to fix: Change the input or the "
                    "setting named above, and run again.")
    details = [kw["detailedText"] for kind, _t, kw in panel.dialogs.shown if kind == "error"][0]
    assert "error: Method kspace-vdm is not built" in details and "'T1_thick': degradation inferred" in details
    assert "--" not in details and ".nrrd" not in details  # the worker's log, in the panel's words too
    assert volumeNames(panel.scene) == ["T1_thick"] and panel.q("applyButton").text() == "Apply"


def test_closing_the_scene_mid_run_resets_the_panel(panel):
    panel.env["STEPS"] = "400"
    panel.choose("methodComboBox", "trilinear")
    panel.q("applyButton").click()
    assert shim.processEventsUntil(lambda: "Step 2/800" in panel.status()[2] or "Step 3/800" in panel.status()[2])
    panel.scene.Clear(0)
    assert panel.widget.run is None
    assert panel.q("statusLabel").text() == "Cancelled: the scene was closed. Nothing was added to any scene."
    assert not alive(int(open(panel.env["PIDFILE"]).read()))
    shim.processEventsUntil(lambda: False, timeout=0.5)  # a late timer tick must add nothing
    assert volumeNames(panel.scene) == [] and panel.q("applyButton").text() == "Apply"
    assert panel.widget._parameterNode is not None and panel.widget._parameterNode.inputVolume is None


def test_reload_reloads_the_helper_package(panel):
    saved = {n: m for n, m in sys.modules.items() if n.startswith("MRISuperResModuleLib")}
    try:
        panel.widget.onReload()
        assert sys.modules["MRISuperResModuleLib.presenter"] is not saved["MRISuperResModuleLib.presenter"]
        assert sys.modules["MRISuperRes"].presenter is sys.modules["MRISuperResModuleLib.presenter"]
    finally:
        for name in [n for n in sys.modules if n.startswith("MRISuperResModuleLib")]:
            del sys.modules[name]
        sys.modules.update(saved)
