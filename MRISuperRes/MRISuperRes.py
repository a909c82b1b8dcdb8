"""MRISuperRes: super-resolution of thick-slice / truncated k-space brain MRI in 3D Slicer.

Module / parameter node / Widget / Test. The Logic (`MRISuperResModuleLib.logic.MRISuperResLogic`) is
Qt-free and re-exported here for the Python console:

    logic = MRISuperResLogic()
    outputNode = logic.process(inputVolumeNode, method="bspline")

All torch work happens in a worker process (`python -m MRISuperResLib`); this process never imports torch.
The panel's decisions live in `MRISuperResModuleLib.presenter`; the Widget only binds them to Qt.
"""

import json
import sys
import time

import ctk
import qt
import slicer
import vtk
from MRISuperResModuleLib import messages, presenter
from MRISuperResModuleLib.about import ACKNOWLEDGEMENT_TEXT, HELP_TEXT
from MRISuperResModuleLib.logic import MRISuperResError, MRISuperResLogic, RunOptions
from MRISuperResModuleLib.protocol import OPERATORS, PROFILES
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

__all__ = ["MRISuperRes", "MRISuperResWidget", "MRISuperResLogic", "MRISuperResTest", "MRISuperResParameterNode"]

# Every widget this file touches, with its class in the .ui (a static test holds the two together).
UI_WIDGETS = {
    "inputsCollapsibleButton": "ctkCollapsibleButton", "inputVolumeSelector": "qMRMLNodeComboBox",
    "degradationLabel": "QLabel", "overrideDegradationCheckBox": "QCheckBox", "operatorComboBox": "QComboBox",
    "axisComboBox": "QComboBox", "factorSpinBox": "ctkDoubleSpinBox", "profileComboBox": "QComboBox",
    "methodCollapsibleButton": "ctkCollapsibleButton", "methodComboBox": "QComboBox",
    "methodDescriptionLabel": "QLabel", "modelLabel": "QLabel", "modelComboBox": "QComboBox",
    "deviceComboBox": "QComboBox", "seedSpinBox": "QSpinBox", "settingsCollapsibleGroupBox": "ctkCollapsibleGroupBox",
    "settingsFrame": "QWidget", "settingsFormLayout": "QFormLayout",
    "outputsCollapsibleButton": "ctkCollapsibleButton", "outputVolumeSelector": "qMRMLNodeComboBox",
    "uncertaintyCheckBox": "QCheckBox", "uncertaintyVolumeSelector": "qMRMLNodeComboBox",
    "residualCheckBox": "QCheckBox", "residualVolumeSelector": "qMRMLNodeComboBox", "applyButton": "QPushButton",
    "progressBar": "QProgressBar", "statusLabel": "QLabel", "logCollapsibleButton": "ctkCollapsibleButton",
    "logTextEdit": "QPlainTextEdit",
}


class MRISuperRes(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MRI Super-Resolution"
        self.parent.categories = ["Filtering"]
        self.parent.dependencies = []
        self.parent.contributors = ["MRISuperRes developers"]
        self.parent.helpText = HELP_TEXT
        self.parent.acknowledgementText = ACKNOWLEDGEMENT_TEXT


@parameterNodeWrapper
class MRISuperResParameterNode:
    """Everything the panel sets, saved with the scene. Method settings: JSON {method: {setting: value}}."""

    inputVolume: vtkMRMLScalarVolumeNode
    outputVolume: vtkMRMLScalarVolumeNode
    overrideDegradation: bool = False
    operator: str = "thick-slice"
    axis: int = 2
    factor: float = 4.0
    profile: str = "gaussian"
    method: str = "bspline"
    methodSettings: str = "{}"
    model: str = ""
    device: str = "auto"
    seed: int = 0
    wantUncertainty: bool = False
    uncertaintyVolume: vtkMRMLScalarVolumeNode
    wantResidual: bool = False
    residualVolume: vtkMRMLScalarVolumeNode


def _volumeInfo(node):
    if node is None or node.GetImageData() is None:
        return None
    return presenter.VolumeInfo(node.GetID(), node.GetName(), tuple(node.GetSpacing()),
                                tuple(node.GetImageData().GetDimensions()))


def _setItems(combo, items, current):
    """Fill a combo box with (data, label) items without emitting signals; select `current`."""
    wasBlocked = combo.blockSignals(True)
    if [(combo.itemData(i), combo.itemText(i)) for i in range(combo.count)] != list(items):
        combo.clear()
        for data, label in items:
            combo.addItem(label, data)
    index = combo.findData(current)
    combo.setCurrentIndex(index if index >= 0 else 0)
    combo.blockSignals(wasBlocked)


class MRISuperResWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.run = None
        self.runProgress = None  # presenter.RunProgress of the run in progress
        self.runStartTime = 0.0
        self.words = messages.MessageContext()  # the run's temp files, named for people
        self.queries = {}
        self.methods = None
        self.models = []
        self.devices = []
        self.workerError = ""
        self.missing = []
        self._settingsBuiltFor = None
        self._settingWidgets = {}

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MRISuperRes.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = self.logic or MRISuperResLogic()  # set before setup() to choose the worker (tests)
        self.timer = qt.QTimer()
        self.timer.setInterval(100)
        self.timer.connect("timeout()", self.onTimer)

        _setItems(self.ui.operatorComboBox, [(o, o) for o in OPERATORS], "thick-slice")
        _setItems(self.ui.axisComboBox, [(a, "%d (%s)" % (a, n)) for a, n in enumerate(presenter.AXIS_NAMES)], 2)
        _setItems(self.ui.profileComboBox, [(p, p) for p in PROFILES], "gaussian")
        for combo, name in ((self.ui.operatorComboBox, "operator"), (self.ui.axisComboBox, "axis"),
                            (self.ui.profileComboBox, "profile"), (self.ui.methodComboBox, "method"),
                            (self.ui.deviceComboBox, "device"), (self.ui.modelComboBox, "model")):
            combo.connect("currentIndexChanged(int)", lambda _i, c=combo, n=name: self.onComboChanged(c, n))
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.startListings()

    def cleanup(self):
        if self.run is not None:
            self.run.cancel("the module was closed")
        for worker in self.queries.values():
            worker.kill()
        self.timer.stop()
        self.removeObservers()

    def onReload(self):
        # Slicer reloads MRISuperRes.py only; without this, edits to the helper package would not be seen.
        for name in [n for n in sys.modules if n == "MRISuperResModuleLib" or n.startswith("MRISuperResModuleLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        if self.run is not None:  # the run also watches its scene; stopping it here keeps the order obvious
            self.run.cancel("the scene was closed")
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ---- parameter node ----

    def getParameterNode(self):
        # Slicer's base logic creates the scene's singleton parameter node the standard way.
        baseLogic = ScriptedLoadableModuleLogic()
        baseLogic.moduleName = "MRISuperRes"
        return MRISuperResParameterNode(baseLogic.getParameterNode())

    def initializeParameterNode(self):
        self.setParameterNode(self.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.refresh()

    def onParameterNodeModified(self, caller=None, event=None):
        self.refresh()

    def onComboChanged(self, combo, name):
        value = combo.currentData
        if self._parameterNode is None or value is None:
            return
        if name == "model" and value == presenter.IMPORT_MODEL:
            self.importModel()
            return
        setattr(self._parameterNode, name, value)

    def _methodSettings(self) -> dict:
        try:
            return json.loads(self._parameterNode.methodSettings or "{}")
        except ValueError:
            return {}

    def onSettingChanged(self, name, value):
        allSettings = self._methodSettings()
        allSettings.setdefault(self._parameterNode.method, {})[name] = value
        self._parameterNode.methodSettings = json.dumps(allSettings)

    # ---- presenter binding ----

    def panelState(self):
        p = self._parameterNode
        if self.runProgress is not None:
            self.runProgress.elapsedS = time.monotonic() - self.runStartTime
        return presenter.PanelState(
            inputVolume=_volumeInfo(p.inputVolume), outputVolumeId=p.outputVolume.GetID() if p.outputVolume else None,
            methods=self.methods, workerError=self.workerError, method=p.method,
            settingValues=self._methodSettings().get(p.method, {}), overrideDegradation=p.overrideDegradation,
            operator=p.operator, axis=p.axis, factor=p.factor, profile=p.profile, models=self.models, model=p.model,
            devices=self.devices, device=p.device, wantUncertainty=p.wantUncertainty,
            uncertaintyVolumeId=p.uncertaintyVolume.GetID() if p.wantUncertainty and p.uncertaintyVolume else None,
            wantResidual=p.wantResidual,
            residualVolumeId=p.residualVolume.GetID() if p.wantResidual and p.residualVolume else None,
            missingDependencies=self.missing, running=self.run is not None, runProgress=self.runProgress)

    def refresh(self):
        if self._parameterNode is None:
            return
        p = self._parameterNode
        view = presenter.present(self.panelState())
        ui = self.ui
        ui.degradationLabel.text = view.degradationText
        for w in (ui.operatorComboBox, ui.axisComboBox, ui.factorSpinBox, ui.profileComboBox):
            w.enabled = view.overrideEnabled
        _setItems(ui.operatorComboBox, [(o, o) for o in OPERATORS], p.operator)
        _setItems(ui.axisComboBox, [(a, "%d (%s)" % (a, n)) for a, n in enumerate(presenter.AXIS_NAMES)], p.axis)
        _setItems(ui.profileComboBox, [(x, x) for x in PROFILES], p.profile)
        _setItems(ui.methodComboBox, view.methodItems, p.method)
        ui.methodDescriptionLabel.text = view.methodDescription
        ui.modelLabel.visible = ui.modelComboBox.visible = view.modelVisible
        _setItems(ui.modelComboBox, view.modelItems, p.model)
        _setItems(ui.deviceComboBox, view.deviceItems, p.device)
        ui.uncertaintyCheckBox.visible = ui.uncertaintyVolumeSelector.visible = view.uncertaintyVisible
        ui.uncertaintyVolumeSelector.enabled = p.wantUncertainty
        ui.residualVolumeSelector.enabled = p.wantResidual
        self.buildSettings(view.settingSpecs)
        for w in (ui.inputsCollapsibleButton, ui.methodCollapsibleButton, ui.outputsCollapsibleButton):
            w.enabled = view.inputsEnabled
        ui.applyButton.text = view.applyText
        ui.applyButton.enabled = view.applyEnabled
        ui.applyButton.toolTip = view.applyToolTip
        self.showProgress(view)

    def showProgress(self, view):
        ui = self.ui
        ui.progressBar.visible = view.progressVisible
        if view.progressVisible:
            ui.progressBar.maximum = 0 if view.progressBusy else 100  # 0: Qt's busy indicator
            ui.progressBar.value = view.progressValue
            ui.statusLabel.text = view.progressText

    def buildSettings(self, specs):
        """The settings form always shows the parameter node's values; rows are rebuilt only for new names."""
        key = (self._parameterNode.method, json.dumps([s.name for s in specs]))
        if key == self._settingsBuiltFor:
            # Same rows: only the values may have changed (a loaded scene, the Python console, another method).
            for spec in specs:
                _showSettingValue(self._settingWidgets[spec.name], spec)
            return
        self._settingsBuiltFor = key
        form = self.ui.settingsFormLayout
        while form.rowCount():
            form.removeRow(0)  # deletes the row's label and widget
        self._settingWidgets = {}
        for spec in specs:
            self._settingWidgets[spec.name] = widget = self._settingWidget(spec)
            form.addRow(spec.label + ":", widget)
        self.ui.settingsCollapsibleGroupBox.visible = bool(specs)

    def _settingWidget(self, spec):
        name = spec.name
        if spec.kind == "bool":
            w = qt.QCheckBox()
            w.connect("toggled(bool)", lambda v: self.onSettingChanged(name, bool(v)))
        elif spec.kind == "choice":
            w = qt.QComboBox()
            w.addItems(list(spec.choices))
            w.connect("currentTextChanged(QString)", lambda v: self.onSettingChanged(name, v))
        elif spec.kind == "int":
            w = qt.QSpinBox()
            w.setRange(int(spec.minimum) if spec.minimum is not None else -2**31 + 1,
                       int(spec.maximum) if spec.maximum is not None else 2**31 - 1)
            w.connect("valueChanged(int)", lambda v: self.onSettingChanged(name, int(v)))
        elif spec.kind == "float":
            w = ctk.ctkDoubleSpinBox()
            w.decimals = spec.decimals
            w.setRange(spec.minimum if spec.minimum is not None else -1e9,
                       spec.maximum if spec.maximum is not None else 1e9)
            w.connect("valueChanged(double)", lambda v: self.onSettingChanged(name, float(v)))
        else:
            w = qt.QLineEdit()
            w.connect("textChanged(QString)", lambda v: self.onSettingChanged(name, v))
        w.toolTip = spec.toolTip
        _showSettingValue(w, spec)
        return w

    # ---- worker listings (asynchronous, polled by the timer) ----

    def startListings(self):
        try:
            self.missing = self.logic.missingDependencies()
        except MRISuperResError as exc:
            self.workerError = messages.forPanel(exc)
            self.refresh()
            return
        for key, args in (("methods", ["methods", "--json"]), ("devices", ["devices", "--json"]),
                          ("models", ["models", "list", "--json"])):
            self.queries[key] = self.logic.startWorker(args)
        self.timer.start()

    def onTimer(self):
        for key, worker in list(self.queries.items()):
            if not worker.finished:
                continue
            del self.queries[key]
            if key == "import":  # plain text output: show it, then list the models again
                for _stream, line in worker.readLines():
                    self.log(line)
                if worker.returncode != 0:
                    slicer.util.errorDisplay("The model could not be imported; see the Log section.")
                self.queries["models"] = self.logic.startWorker(["models", "list", "--json"])
                continue
            try:
                result = self.logic.parseQuery(worker, [key])
            except MRISuperResError as exc:
                if key == "methods":
                    self.workerError = "The worker could not list its methods: %s" % messages.forPanel(exc.problem)
                self.log(str(exc))
                continue
            if key == "methods":
                self.methods, self.workerError = result, ""
            elif key == "devices":
                self.devices = result
            elif key == "models":
                self.models = result.get("models", []) if isinstance(result, dict) else result
            self.refresh()
        if self.run is not None:
            self.run.poll()
        if self.run is not None and self._parameterNode is not None:
            self.showProgress(presenter.present(self.panelState()))  # the elapsed time moves every tick
        if not self.queries and self.run is None:
            self.timer.stop()

    def importModel(self):
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Folder of the downloaded model")
        if folder:
            self.log("Importing %s ..." % folder)
            self.queries["import"] = self.logic.startWorker(["models", "import", folder])
            self.timer.start()
        self.refresh()

    # ---- run ----

    def log(self, line):
        self.ui.logTextEdit.appendPlainText(line)

    def onApplyButton(self):
        if self.run is not None:
            self.run.cancel()
            return
        if self.missing and not self.installDependencies():
            return
        state = self.panelState()
        if not presenter.present(state).applyEnabled:
            return
        p = self._parameterNode
        options = RunOptions(degradation=presenter.chosenDegradation(state), model=p.model or None, device=p.device,
                             seed=p.seed,
                             uncertainty=(p.uncertaintyVolume or True) if p.wantUncertainty else None,
                             residual=(p.residualVolume or True) if p.wantResidual else None)
        self.ui.logTextEdit.clear()
        method = presenter.methodByName(self.methods, p.method) or {}
        self.runProgress = presenter.RunProgress(loadsPrior=bool(method.get("needsPrior")))
        self.runStartTime = time.monotonic()
        try:
            self.run = self.logic.process(p.inputVolume, p.outputVolume, p.method, presenter.runSettings(state),
                                          blocking=False, progressCallback=self.onRunEvent, options=options)
        except MRISuperResError as exc:
            self.runProgress = None
            slicer.util.errorDisplay(messages.errorText(exc), windowTitle="MRISuperRes")
            return
        self.words = messages.contextForRun(self.run)
        self.timer.start()
        self.refresh()

    def installDependencies(self) -> bool:
        text = ("MRISuperRes runs in a separate Python process that needs: %s.\n"
                "PyTorch comes from the PyTorch extension, the others from PyPI (Slicer's own numpy and SimpleITK, "
                "and the installed PyTorch, are kept as they are). Install them now?" % ", ".join(self.missing))
        if not slicer.util.confirmOkCancelDisplay(text, "MRISuperRes dependencies"):
            return False
        try:
            with slicer.util.WaitCursor():
                self.logic.installDependencies(self.log)
        except MRISuperResError as exc:
            slicer.util.errorDisplay(messages.errorText(exc), windowTitle="MRISuperRes")
            return False
        self.missing = []
        self.startListings()
        return False  # the listings reload; the user presses Apply again when the panel is ready

    def onRunEvent(self, event):
        kind = event["event"]
        message = messages.forPanel(event.get("message", ""), self.words)
        progress = self.runProgress
        if kind == "start" and progress is not None:
            progress.started = event
            self.log("Started %s on device %s." % (event.get("method", ""), event.get("device", "auto")))
        elif kind == "progress" and progress is not None:
            progress.progress = dict(event, message=message)
        elif kind == "result" and progress is not None:
            progress.resultReady = True
        elif kind in ("warning", "error"):
            self.log("%s: %s" % (kind, message))
        elif kind == "log":
            self.log(message)  # the worker's own output lines, with temp files and flags named as in the panel
        elif kind == "finished":
            self.onRunFinished(event)
            return
        if self._parameterNode is not None and progress is not None:
            self.showProgress(presenter.present(self.panelState()))

    def onRunFinished(self, event):
        run, self.run = self.run, None
        self.runProgress = None
        text = messages.forPanel(event["message"], self.words)
        self.log(text)
        self.ui.statusLabel.text = text
        if event["state"] == "succeeded" and run is not None and run.outputNode is not None:
            self.ui.statusLabel.text = "%s Created %s." % (text, run.outputNode.GetName())
            slicer.util.setSliceViewerLayers(background=run.outputNode, fit=True)
        elif event["state"] == "failed" and run is not None:
            slicer.util.errorDisplay("Super-resolution failed.\n\n" + messages.errorText(run.error, self.words),
                                     windowTitle="MRISuperRes",
                                     detailedText="\n".join(messages.forPanel(line, self.words) for line in run.log))
        self.refresh()


def _showSettingValue(widget, spec):
    """Put the parameter node's value into a setting widget without echoing it back as a change."""
    wasBlocked = widget.blockSignals(True)
    if spec.kind == "bool":
        widget.checked = bool(spec.value)
    elif spec.kind == "choice":
        widget.currentText = str(spec.value)
    elif spec.kind == "int":
        widget.value = int(float(spec.value))
    elif spec.kind == "float":
        widget.value = float(spec.value)
    elif widget.text != str(spec.value):  # rewriting the same text would move the cursor while typing
        widget.text = str(spec.value)
    widget.blockSignals(wasBlocked)


class MRISuperResTest(ScriptedLoadableModuleTest):
    """The Logic's node -> worker -> node round trip, inside Slicer."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_RoundTrip()

    def test_RoundTrip(self):
        import numpy as np

        self.delayDisplay("Super-resolving a small thick-slice volume with B-spline")
        lr = np.random.default_rng(0).random((5, 12, 10)).astype(np.float32)  # numpy order k, j, i
        inputNode = slicer.util.addVolumeFromArray(lr, ijkToRAS=np.diag([1.0, 1.0, 4.0, 1.0]), name="lr")
        outputNode = MRISuperResLogic().process(inputNode, method="bspline")
        matrix = vtk.vtkMatrix4x4()
        outputNode.GetIJKToRASMatrix(matrix)
        got = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        expected = np.diag([1.0, 1.0, 1.0, 1.0])
        expected[2, 3] = -1.5  # same outer bounds: first HR centre half an HR voxel inside the LR voxel edge
        np.testing.assert_allclose(got, expected, atol=1e-6)
        self.assertEqual(slicer.util.arrayFromVolume(outputNode).shape, (20, 12, 10))
        self.assertEqual(outputNode.GetName(), "lr_SR-bspline")
        self.assertIsNone(inputNode.GetStorageNodeID())  # the input was written through a storage node of our own
        self.delayDisplay("Test passed")
