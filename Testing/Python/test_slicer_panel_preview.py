"""A layout preview of the module panel, rendered offscreen with PySide6 (a dev tool, not Slicer).

The .ui is loaded by Qt's own loader with Slicer/CTK widgets stood in by plain Qt ones
(ctkCollapsibleButton -> QGroupBox, qMRMLNodeComboBox -> QComboBox, ...), filled through the real
presenter with the library's real method list. It shows the layout and the texts, not Slicer's styling.

    python Testing/Python/test_slicer_panel_preview.py     # writes Resources/Screenshots/panel-preview.png

As a test it checks that the .ui loads in real Qt and that every widget the module touches is there.
"""

import os
import re
import sys
import xml.etree.ElementTree as ET

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULE = os.path.join(REPO, "MRISuperRes")
UI_PATH = os.path.join(MODULE, "Resources", "UI", "MRISuperRes.ui")
PREVIEW = os.path.join(REPO, "Resources", "Screenshots", "panel-preview.png")
STAND_INS = {"ctkCollapsibleButton": "QGroupBox", "ctkCollapsibleGroupBox": "QGroupBox",
             "ctkDoubleSpinBox": "QDoubleSpinBox", "qMRMLNodeComboBox": "QComboBox", "qMRMLWidget": "QWidget"}
SLICER_ONLY_PROPERTIES = {"nodeTypes", "showChildNodeTypes", "addEnabled", "removeEnabled", "noneEnabled",
                          "noneDisplay", "renameEnabled", "collapsed"}


def standInUi() -> bytes:
    root = ET.parse(UI_PATH).getroot()
    for tag in ("customwidgets", "connections"):
        for el in root.findall(tag):
            root.remove(el)
    for w in root.iter("widget"):
        cls = w.get("class")
        if cls in STAND_INS:
            w.set("class", STAND_INS[cls])
        for prop in list(w.findall("property")):
            if prop.get("name") in SLICER_ONLY_PROPERTIES:
                w.remove(prop)
            elif prop.get("name") == "text" and cls == "ctkCollapsibleButton":
                prop.set("name", "title")  # the button's text is a group box title in the stand-in
    return ET.tostring(root)


def _libraryMethods():
    sys.path.insert(0, REPO)
    from MRISuperResLib.methods import available

    return [m.to_json() for m in available()]


def renderPanel(outPath=None, width=420):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QtCore = pytest.importorskip("PySide6.QtCore")
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication, QCheckBox, QComboBox, QDoubleSpinBox, QLabel, QSpinBox

    sys.path.insert(0, MODULE)
    from MRISuperResModuleLib import presenter
    from MRISuperResModuleLib.protocol import camelKeys

    app = QApplication.instance() or QApplication([])
    buffer = QtCore.QBuffer()
    buffer.setData(QtCore.QByteArray(standInUi()))
    buffer.open(QtCore.QIODevice.ReadOnly)
    panel = QUiLoader().load(buffer)
    assert panel is not None, "the .ui did not load"
    ui = {w.objectName(): w for w in panel.findChildren(QtCore.QObject) if w.objectName()}

    methods = camelKeys(_libraryMethods())
    shown = next((m for m in methods if m.get("needsPrior") and m.get("settings")), methods[0])
    # What the panel would list on this machine: the library's own device and model lists, nothing invented.
    from MRISuperResLib.devices import list_devices
    from MRISuperResLib.priors.store import list_models

    devices = camelKeys(list_devices())
    kind = shown.get("needsPrior")
    models = [m for m in camelKeys(list_models()) if m.get("kind") == kind]
    state = presenter.PanelState(
        inputVolume=presenter.VolumeInfo("vtkMRMLScalarVolumeNode1", "T1_thick", (1.0, 1.0, 4.0), (160, 224, 40)),
        methods=methods, method=shown["name"], models=models, devices=devices,
        device=devices[-1]["name"], wantResidual=True)
    view = presenter.present(state)

    def fill(combo, items, current):
        combo.clear()
        for data, label in items:
            combo.addItem(label, data)
        combo.setCurrentIndex(max(0, combo.findData(current)))

    ui["inputVolumeSelector"].addItem("T1_thick")
    ui["outputVolumeSelector"].addItem("Create new volume")
    ui["uncertaintyVolumeSelector"].addItem("Create new volume")
    ui["residualVolumeSelector"].addItem("Create new volume")
    ui["degradationLabel"].setText(view.degradationText)
    fill(ui["operatorComboBox"], [(o, o) for o in presenter.OPERATORS], "thick-slice")
    fill(ui["axisComboBox"], [(a, "%d (%s)" % (a, n)) for a, n in enumerate(presenter.AXIS_NAMES)], 2)
    fill(ui["profileComboBox"], [(p, p) for p in presenter.PROFILES], "gaussian")
    for name in ("operatorComboBox", "axisComboBox", "factorSpinBox", "profileComboBox"):
        ui[name].setEnabled(view.overrideEnabled)
    fill(ui["methodComboBox"], view.methodItems, state.method)
    ui["methodDescriptionLabel"].setText(view.methodDescription)
    fill(ui["modelComboBox"], view.modelItems, state.model)
    ui["modelLabel"].setVisible(view.modelVisible)
    ui["modelComboBox"].setVisible(view.modelVisible)
    fill(ui["deviceComboBox"], view.deviceItems, state.device)
    ui["uncertaintyCheckBox"].setVisible(view.uncertaintyVisible)
    ui["uncertaintyVolumeSelector"].setVisible(view.uncertaintyVisible)
    ui["uncertaintyVolumeSelector"].setEnabled(False)
    ui["residualCheckBox"].setChecked(True)
    form = ui["settingsFormLayout"]
    for spec in view.settingSpecs:
        if spec.kind == "bool":
            w = QCheckBox()
            w.setChecked(bool(spec.value))
        elif spec.kind == "choice":
            w = QComboBox()
            w.addItems(list(spec.choices))
            w.setCurrentText(str(spec.value))
        elif spec.kind == "int":
            w = QSpinBox()
            w.setRange(int(spec.minimum if spec.minimum is not None else 0), 10 ** 6)
            w.setValue(int(spec.value))
        elif spec.kind == "float":
            w = QDoubleSpinBox()
            w.setDecimals(spec.decimals)
            w.setRange(-1e6, 1e6)
            w.setValue(float(spec.value))
        else:
            w = QLabel(str(spec.value))
        w.setToolTip(spec.toolTip)
        form.addRow(spec.label + ":", w)
    ui["settingsCollapsibleGroupBox"].setVisible(bool(view.settingSpecs))
    ui["applyButton"].setText(view.applyText)
    ui["applyButton"].setEnabled(view.applyEnabled)
    ui["progressBar"].setValue(0)
    ui["statusLabel"].setText("Layout preview (PySide6 stand-ins for the Slicer widgets).")
    ui["logTextEdit"].setVisible(False)
    panel.resize(width, panel.sizeHint().height())
    panel.show()
    app.processEvents()
    panel.resize(width, panel.sizeHint().height())
    app.processEvents()
    if outPath:
        os.makedirs(os.path.dirname(outPath), exist_ok=True)
        assert panel.grab().save(outPath)
    return panel, ui, view


def test_ui_loads_in_qt_with_every_widget_the_module_touches(tmp_path):
    pytest.importorskip("PySide6")
    source = open(os.path.join(MODULE, "MRISuperRes.py")).read()
    declared = dict(re.findall(r'"(\w+)": "(\w+)"', source.split("UI_WIDGETS = {", 1)[1].split("}", 1)[0]))
    panel, ui, view = renderPanel(str(tmp_path / "panel.png"))
    from PySide6 import QtWidgets

    for name, cls in declared.items():
        assert name in ui, name
        qtClass = getattr(QtWidgets, STAND_INS.get(cls, cls))
        assert isinstance(ui[name], qtClass), (name, type(ui[name]).__name__)
    # Apply follows the real model store: enabled with a prior installed, else disabled with the reason shown.
    assert ui["applyButton"].isEnabled() == view.applyEnabled
    assert view.applyEnabled or any("prior" in p.lower() or "model" in p.lower() for p in view.problems), view.problems
    assert os.path.getsize(tmp_path / "panel.png") > 5000


if __name__ == "__main__":
    renderPanel(PREVIEW)
    print("wrote %s" % PREVIEW)
