"""Slicer's Qt layer on PySide6, so the real MRISuperResWidget runs in tests (no Slicer application here).

What it stands in for, and how far:
- `qt` / `ctk`: PySide6 classes seen the PythonQt way (Qt properties as attributes, `w.text = "x"`,
  `connect("clicked(bool)", slot)` with a slot that may take fewer arguments than the signal).
- the .ui's Slicer/CTK classes: `qMRMLWidget`, `qMRMLNodeComboBox` (lists the scene's nodes of its
  `nodeTypes`, follows node additions and removals), `ctkCollapsibleButton`, `ctkCollapsibleGroupBox`,
  `ctkDoubleSpinBox`, loaded by Qt's own `QUiLoader` from the module's real .ui.
- `slicer.ScriptedLoadableModule` and `slicer.parameterNodeWrapper`: the typed parameter node (values
  in a real `vtkMRMLScriptedModuleNode`) and `connectGui` for the widgets that name a `SlicerParameterName`.
- the `slicer.util` calls the module makes: `loadUI`, `childWidgetVariables`, `errorDisplay`,
  `confirmOkCancelDisplay`, `WaitCursor`, `setSliceViewerLayers`, `mainWindow` (dialogs are recorded).
Not Slicer's styling, layouts, views or modules; MRML itself is the real slicer-core scene.
"""

import contextlib
import importlib
import inspect
import os
import sys
import time
import types
import unittest
import xml.etree.ElementTree as ET

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import slicer  # noqa: E402
import vtk  # noqa: E402
from PySide6 import QtCore, QtGui, QtWidgets  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402

APP = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


# ---- PythonQt semantics over PySide6 ----

def unwrap(value):
    return object.__getattribute__(value, "_obj") if isinstance(value, PythonQtObject) else value


def _hasProperty(obj, name):
    if not isinstance(obj, QtCore.QObject):
        return False
    return obj.metaObject().indexOfProperty(name) >= 0 or name.encode() in [bytes(n) for n in obj.dynamicPropertyNames()]


def _adaptSlot(slot):
    """PythonQt drops signal arguments the slot does not take; PySide6 would pass them all."""
    try:
        params = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return slot
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return slot
    needed = len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty])
    return lambda *args: slot(*args[:needed])


def _unwrapping(function):
    def call(*args, **kwargs):
        result = function(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in kwargs.items()})
        return wrap(result) if isinstance(result, QtCore.QObject) else result

    return call


class PythonQtObject:
    """A Qt object as Slicer's Python sees it."""

    def __init__(self, obj):
        object.__setattr__(self, "_obj", obj)

    def __getattr__(self, name):
        obj = object.__getattribute__(self, "_obj")
        if _hasProperty(obj, name):
            value = obj.property(name)
            return wrap(value) if isinstance(value, QtCore.QObject) else value
        attr = getattr(obj, name)
        return _unwrapping(attr) if callable(attr) and not isinstance(attr, type) else attr

    def __setattr__(self, name, value):
        obj = object.__getattribute__(self, "_obj")
        if _hasProperty(obj, name):
            obj.setProperty(name, unwrap(value))
        else:
            setattr(obj, name, value)

    def connect(self, signature, slot):
        signal = getattr(object.__getattribute__(self, "_obj"), signature.split("(")[0])
        signal.connect(_adaptSlot(slot))

    def __eq__(self, other):
        return unwrap(self) is unwrap(other)

    def __hash__(self):
        return id(unwrap(self))

    def __bool__(self):
        return True


def wrap(obj):
    return obj if obj is None or isinstance(obj, PythonQtObject) else PythonQtObject(obj)


class QtClass:
    """`qt.QCheckBox()` makes a wrapped PySide6 object; `qt.QFileDialog.getExistingDirectory` is the static."""

    def __init__(self, cls):
        self.cls = cls

    def __call__(self, *args, **kwargs):
        return wrap(self.cls(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in kwargs.items()}))

    def __getattr__(self, name):
        attr = getattr(self.cls, name)
        return _unwrapping(attr) if callable(attr) and not isinstance(attr, type) else attr


def _qtModule():
    module = types.ModuleType("qt")

    def lookup(name):
        for source in (QtWidgets, QtCore, QtGui):
            if hasattr(source, name):
                return QtClass(getattr(source, name))
        raise AttributeError(name)

    module.__getattr__ = lookup
    return module


# ---- the .ui's Slicer and CTK classes ----

class qMRMLWidget(QtWidgets.QWidget):
    def setMRMLScene(self, scene):
        self._scene = scene
        for child in self.findChildren(QtWidgets.QComboBox):
            if isinstance(child, qMRMLNodeComboBox):
                child.setMRMLScene(scene)


class qMRMLNodeComboBox(QtWidgets.QComboBox):
    currentNodeChanged = QtCore.Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None
        self._ids = []
        self._tags = []
        self.currentIndexChanged.connect(lambda _i: self.currentNodeChanged.emit(self.currentNode()))

    def setMRMLScene(self, scene):
        self.forgetScene()
        self._scene = scene
        if scene is not None:
            self._tags = [scene.AddObserver(e, lambda *_: self._fill())
                          for e in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent)]
        self._fill()

    def forgetScene(self):
        for tag in self._tags:
            self._scene.RemoveObserver(tag)
        self._tags = []

    def _fill(self):
        before = self.currentNode()
        wasBlocked = self.blockSignals(True)
        self.clear()
        self._ids = []
        if self.property("noneEnabled"):
            self.addItem(self.property("noneDisplay") or "None")
            self._ids.append(None)
        types_ = list(self.property("nodeTypes") or [])
        for i in range(self._scene.GetNumberOfNodes() if self._scene else 0):
            node = self._scene.GetNthNode(i)
            exact = node.GetClassName() in types_
            if exact or (self.property("showChildNodeTypes") is not False and any(node.IsA(t) for t in types_)):
                self.addItem(node.GetName())
                self._ids.append(node.GetID())
        index = self._ids.index(before.GetID()) if before is not None and before.GetID() in self._ids else 0
        self.setCurrentIndex(index if self._ids else -1)
        self.blockSignals(wasBlocked)
        if self.currentNode() is not before:
            self.currentNodeChanged.emit(self.currentNode())

    def currentNode(self):
        i = self.currentIndex()
        if self._scene is None or not 0 <= i < len(self._ids) or self._ids[i] is None:
            return None
        return self._scene.GetNodeByID(self._ids[i])

    def setCurrentNode(self, node):
        nodeId = node.GetID() if node is not None else None
        if nodeId in self._ids:
            self.setCurrentIndex(self._ids.index(nodeId))


class ctkCollapsibleButton(QtWidgets.QWidget):
    pass


class ctkCollapsibleGroupBox(QtWidgets.QGroupBox):
    pass


class ctkDoubleSpinBox(QtWidgets.QDoubleSpinBox):
    pass


STAND_INS = (qMRMLWidget, qMRMLNodeComboBox, ctkCollapsibleButton, ctkCollapsibleGroupBox, ctkDoubleSpinBox)
# Properties PySide6's loader cannot set on a Python class: declared by Slicer's C++ classes, kept here.
_DYNAMIC = {"nodeTypes", "showChildNodeTypes", "addEnabled", "removeEnabled", "noneEnabled", "noneDisplay",
            "renameEnabled", "collapsed"}


def loadUI(path):
    root = ET.parse(path).getroot()
    for el in root.findall("connections"):  # mrmlSceneChanged -> setMRMLScene: done by qMRMLWidget above
        root.remove(el)
    pending = []
    for w in root.iter("widget"):
        for prop in list(w.findall("property")):
            if prop.get("name") in _DYNAMIC:
                pending.append((w.get("name"), prop.get("name"), _propertyValue(prop)))
                w.remove(prop)
    loader = QUiLoader()
    for cls in STAND_INS:
        loader.registerCustomWidget(cls)
    buffer = QtCore.QBuffer()
    buffer.setData(QtCore.QByteArray(ET.tostring(root)))
    buffer.open(QtCore.QIODevice.ReadOnly)
    widget = loader.load(buffer)
    assert widget is not None, loader.errorString()
    for name, prop, value in pending:
        widget.findChild(QtCore.QObject, name).setProperty(prop, value)
    return wrap(widget)


def _propertyValue(prop):
    value = prop[0]
    if value.tag == "bool":
        return value.text == "true"
    if value.tag == "stringlist":
        return [s.text for s in value.findall("string")]
    return value.text or ""


def childWidgetVariables(widget):
    ui = types.SimpleNamespace()
    for child in unwrap(widget).findChildren(QtCore.QObject):
        if child.objectName():
            setattr(ui, child.objectName(), wrap(child))
    return ui


# ---- the parameter node wrapper ----

def _isNodeType(typ):
    return isinstance(typ, type) and issubclass(typ, slicer.vtkMRMLNode)


def parameterNodeWrapper(cls):
    """Typed attributes stored in a vtkMRMLScriptedModuleNode; `connectGui` binds widgets both ways."""
    fields = {name: (typ, cls.__dict__.get(name, None if _isNodeType(typ) else typ()))
              for name, typ in cls.__annotations__.items()}

    class Wrapper:
        def __init__(self, node):
            object.__setattr__(self, "parameterNode", node)
            object.__setattr__(self, "_guis", {})
            names = set(node.GetParameterNames())
            for name, (typ, default) in fields.items():
                if not _isNodeType(typ) and name not in names:
                    node.SetParameter(name, _serialize(default))

        def __getattr__(self, name):
            if name not in fields:
                raise AttributeError(name)
            typ, _default = fields[name]
            node = object.__getattribute__(self, "parameterNode")
            if _isNodeType(typ):
                return node.GetNodeReference(name)
            text = node.GetParameter(name)
            return text == "true" if typ is bool else typ(text)

        def __setattr__(self, name, value):
            if name not in fields:
                raise AttributeError("%s has no parameter %r" % (cls.__name__, name))
            node = object.__getattribute__(self, "parameterNode")
            if _isNodeType(fields[name][0]):
                node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            else:
                node.SetParameter(name, _serialize(fields[name][0](value)))

        def AddObserver(self, *args):
            return self.parameterNode.AddObserver(*args)

        def RemoveObserver(self, tag):
            self.parameterNode.RemoveObserver(tag)

        def connectGui(self, gui):
            bindings = []
            for widget in vars(gui).values():
                obj = unwrap(widget)
                name = obj.property("SlicerParameterName") if isinstance(obj, QtCore.QObject) else None
                if name in fields:
                    bindings.append(_bind(self, obj, name))
            update = lambda *_: [b.show() for b in bindings]  # noqa: E731
            update()
            tag = self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, update)
            self._guis[tag] = (bindings, update)
            return tag

        def disconnectGui(self, tag):
            bindings, _update = self._guis.pop(tag, ([], None))
            for b in bindings:
                b.signal.disconnect(b.slot)
            if tag is not None:
                self.parameterNode.RemoveObserver(tag)

    Wrapper.__name__ = cls.__name__
    return Wrapper


def _serialize(value):
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


class _bind:
    def __init__(self, wrapper, obj, name):
        self.wrapper, self.obj, self.name = wrapper, obj, name
        if isinstance(obj, qMRMLNodeComboBox):
            self.signal, self.get, self.set = obj.currentNodeChanged, obj.currentNode, obj.setCurrentNode
        elif isinstance(obj, QtWidgets.QCheckBox):
            self.signal, self.get, self.set = obj.toggled, obj.isChecked, obj.setChecked
        elif isinstance(obj, QtWidgets.QAbstractSpinBox):
            self.signal, self.get, self.set = obj.valueChanged, obj.value, obj.setValue
        else:
            raise TypeError("no connector for %s" % type(obj).__name__)
        self.slot = lambda *_: setattr(self.wrapper, self.name, self.get())
        self.signal.connect(self.slot)

    def show(self):
        wasBlocked = self.obj.blockSignals(True)
        self.set(getattr(self.wrapper, self.name))
        self.obj.blockSignals(wasBlocked)


# ---- ScriptedLoadableModule ----

class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.moduleName = type(self).__name__.replace("Logic", "")

    def getParameterNode(self):
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetName(scene.GenerateUniqueName(self.moduleName))
            node.SetAttribute("ModuleName", self.moduleName)
            node = scene.AddNode(node)
        return node


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.moduleName = type(self).__name__[:-len("Widget")]
        if parent is None:
            parent = qMRMLWidget()
            parent.setLayout(QtWidgets.QVBoxLayout())
            parent.isEntered = True
        self.parent = wrap(parent)
        self.layout = wrap(parent.layout())

    def setup(self):
        pass

    def resourcePath(self, filename):
        return os.path.join(os.path.dirname(sys.modules[type(self).__module__].__file__), "Resources", filename)

    def onReload(self):
        # Slicer: slicer.util.reloadScriptedModule(moduleName) imports the module file again.
        importlib.reload(sys.modules[type(self).__module__])


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=0):
        pass


# ---- installing it ----

class Dialogs:
    """What the module showed the user; `answer` is what the user clicks in confirmations."""

    def __init__(self):
        self.shown = []
        self.answer = True

    def errorDisplay(self, text, windowTitle=None, **kwargs):
        self.shown.append(("error", text, kwargs))

    def confirmOkCancelDisplay(self, text, windowTitle=None, **kwargs):
        self.shown.append(("confirm", text, kwargs))
        return self.answer

    def errors(self):
        return [text for kind, text, _ in self.shown if kind == "error"]


def install(monkeypatch, scene):
    """Put the stand-ins in place for one test (undone by pytest's monkeypatch); returns the dialog recorder."""
    dialogs = Dialogs()
    monkeypatch.setitem(sys.modules, "qt", _qtModule())
    ctk = types.ModuleType("ctk")
    for cls in (ctkDoubleSpinBox, ctkCollapsibleButton, ctkCollapsibleGroupBox):
        setattr(ctk, cls.__name__, QtClass(cls))
    monkeypatch.setitem(sys.modules, "ctk", ctk)
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleWidget,
                ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = parameterNodeWrapper
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", pnw)
    util = slicer.util
    monkeypatch.setattr(util, "loadUI", loadUI)
    monkeypatch.setattr(util, "childWidgetVariables", childWidgetVariables)
    monkeypatch.setattr(util, "errorDisplay", dialogs.errorDisplay)
    monkeypatch.setattr(util, "confirmOkCancelDisplay", dialogs.confirmOkCancelDisplay)
    monkeypatch.setattr(util, "WaitCursor", contextlib.nullcontext)
    monkeypatch.setattr(util, "setSliceViewerLayers", lambda **kwargs: dialogs.shown.append(("layers", "", kwargs)))
    monkeypatch.setattr(util, "mainWindow", lambda: None)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    return dialogs


def processEventsUntil(condition, timeout=30.0, every=None):
    """Run Qt's event loop (timers fire) until `condition()`; `every()` is called after each round."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        APP.processEvents()
        if every is not None:
            every()
        time.sleep(0.01)
    return True
