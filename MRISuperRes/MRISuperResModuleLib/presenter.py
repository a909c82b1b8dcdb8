"""The panel's decisions, without Qt: what is enabled, what is shown, which messages block Apply.

The Widget fills a `PanelState` from its widgets and the worker's listings (`methods --json`,
`devices --json`, `models list --json`, all camelCase here), calls `present(state)` and copies the
returned `PanelView` onto the widgets. Nothing here imports qt, slicer or torch, so pytest covers it.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .protocol import OPERATORS, PROFILES, Degradation, toCamel

THICK_RATIO = 1.5  # the library's rule (pipeline.infer_degradation); a test keeps the two in step
AXIS_NAMES = ("i", "j", "k")
IMPORT_MODEL = "__import__"
PANEL_OWNED_SETTINGS = ("seed",)  # the panel's own Seed field sends --seed, which overrides the setting
LABELS = {"lr": "Learning rate"}
DEFAULT_MODEL = ""


@dataclass
class VolumeInfo:
    nodeId: str
    name: str
    spacing: Tuple[float, float, float]
    shape: Tuple[int, int, int]


@dataclass
class PanelState:
    inputVolume: Optional[VolumeInfo] = None
    outputVolumeId: Optional[str] = None  # None: a new node is created
    methods: Optional[List[dict]] = None  # None: still asking the worker
    workerError: str = ""
    method: str = "bspline"
    settingValues: Dict[str, object] = field(default_factory=dict)
    overrideDegradation: bool = False
    operator: str = "thick-slice"
    axis: int = 2
    factor: float = 4.0
    profile: str = "gaussian"
    models: List[dict] = field(default_factory=list)
    model: str = DEFAULT_MODEL
    devices: List[dict] = field(default_factory=list)
    device: str = "auto"
    wantUncertainty: bool = False
    uncertaintyVolumeId: Optional[str] = None
    wantResidual: bool = False
    residualVolumeId: Optional[str] = None
    missingDependencies: List[str] = field(default_factory=list)  # modules the worker's Python lacks
    running: bool = False
    runProgress: Optional["RunProgress"] = None


@dataclass
class RunProgress:
    """What the panel knows about the run in progress, from the worker's events (camelCase)."""

    elapsedS: float = 0.0
    loadsPrior: bool = False  # the worker loads the method's prior before its `start` event
    started: Optional[dict] = None  # the `start` event
    progress: Optional[dict] = None  # the last `progress` event, its message already in panel words
    resultReady: bool = False  # the `result` event arrived: the panel is loading the volumes


@dataclass
class SettingSpec:
    """One per-method setting as a widget: kind is int, float, bool, choice or str."""

    name: str
    label: str
    kind: str
    value: object
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    choices: Sequence[str] = ()
    toolTip: str = ""
    decimals: int = 0


@dataclass
class PanelView:
    degradationText: str = ""
    detected: Optional[Degradation] = None
    overrideEnabled: bool = False
    methodItems: List[Tuple[str, str]] = field(default_factory=list)
    methodDescription: str = ""
    settingSpecs: List[SettingSpec] = field(default_factory=list)
    modelVisible: bool = False
    modelItems: List[Tuple[str, str]] = field(default_factory=list)
    deviceItems: List[Tuple[str, str]] = field(default_factory=list)
    uncertaintyVisible: bool = False
    problems: List[str] = field(default_factory=list)
    applyText: str = "Apply"
    applyEnabled: bool = False
    applyToolTip: str = ""
    inputsEnabled: bool = True
    progressVisible: bool = False
    progressValue: int = 0
    progressBusy: bool = False  # a phase of unknown length: the bar runs back and forth
    progressText: str = ""


def detectDegradation(spacing) -> Tuple[Optional[Degradation], str]:
    """The degradation the worker will infer from the spacing, and a sentence for the panel."""
    sp = [float(s) for s in spacing]
    finest = min(sp)
    thick = [a for a in range(3) if sp[a] > THICK_RATIO * finest]
    spacingText = " x ".join("%g" % s for s in sp)
    if not thick:
        return None, "Nearly isotropic voxels (%s mm): no thick axis found. Set the degradation below." % spacingText
    if len(thick) > 1:
        return None, "Several coarse axes (%s mm). Set the degradation below." % spacingText
    a = thick[0]
    f = sp[a] / finest
    return (Degradation("thick-slice", (a,), (f,), "gaussian"),
            "Detected: thick slices along axis %d (%s), factor %.3g (%s mm)." % (a, AXIS_NAMES[a], f, spacingText))


def methodByName(methods: Optional[List[dict]], name: str) -> Optional[dict]:
    for m in methods or []:
        if m.get("name") == name:
            return m
    return None


NOT_RECOMMENDED_SUFFIX = " (needs the published prior)"


def deviceType(device: str, devices: List[dict]) -> str:
    """"cuda" or "cpu": the kind of device the run would use (auto takes a GPU when the worker lists one)."""
    gpu = device.startswith("cuda") or (device == "auto" and any(d.get("name", "").startswith("cuda")
                                                                for d in devices))
    return "cuda" if gpu else "cpu"


def defaultPriorWarning(method: Optional[dict], model: str, device: str, devices: List[dict]) -> str:
    """The default prior's quality-gate warning for `method` on the device the run would use; "" when none or
    when the user chose a prior of their own."""
    if not method or model != DEFAULT_MODEL:
        return ""
    per_device = method.get("belowBaselineWithDefaultPrior") or {}
    return per_device.get(deviceType(device, devices)) or ""


def priorDefaults(method: Optional[dict], model: str, device: str, devices: List[dict]) -> Dict[str, object]:
    """{setting name: value} the run's prior recommends for its device type (the card's defaults, which a command
    line run applies over the schema's): the form starts from them, so a run from the panel is the run the gate
    measured. {} for a prior the worker does not list (a path) or a method without one."""
    if not method:
        return {}
    kind = deviceType(device, devices)
    prior = model or (method.get("defaultPrior") or {}).get(kind)
    table = method.get("priorDefaults") or {}
    values = ((table.get(prior) or table.get(toCamel(prior or ""))) or {}).get(kind) or {}  # keys camelCased too
    names = {toCamel(s["name"]): s["name"] for s in method.get("settings", [])}  # the listing's keys are camelCase
    return {names.get(k, k): v for k, v in values.items()}


def methodTitle(method: dict) -> str:
    """The method's title in the list; marked when its default prior scored below plain interpolation."""
    title = method.get("title") or method["name"]
    below = method.get("belowBaselineWithDefaultPrior") or {}
    return title + NOT_RECOMMENDED_SUFFIX if below.get("cpu") else title


def settingLabel(name: str) -> str:
    """The panel's label of a library setting name: num_samples -> Num samples."""
    return LABELS.get(name, name.replace("_", " ").capitalize())


def settingSpecs(method: Optional[dict], values: Dict[str, object],
                 defaults: Optional[Dict[str, object]] = None) -> List[SettingSpec]:
    """The form's rows: the user's value, else the prior's default (priorDefaults), else the schema's."""
    specs = []
    for s in (method or {}).get("settings", []):
        if s["name"] in PANEL_OWNED_SETTINGS:
            continue
        kind = s.get("type", "str")
        value = values.get(s["name"], (defaults or {}).get(s["name"], s.get("default")))
        decimals = 0
        if kind == "float":
            default = float(s.get("default") or 0.0)
            decimals = 4 if 0 < abs(default) < 0.01 else 3
        specs.append(SettingSpec(s["name"], settingLabel(s["name"]), kind, value, s.get("min"),
                                 s.get("max"), tuple(s.get("choices") or ()), s.get("help", ""), decimals))
    return specs


def settingProblems(method: Optional[dict], values: Dict[str, object]) -> List[str]:
    """Values the worker would refuse, found before starting it."""
    problems = []
    for spec in settingSpecs(method, values):
        v = spec.value
        if spec.kind in ("int", "float"):
            try:
                v = float(v)
            except (TypeError, ValueError):
                problems.append("Setting '%s' must be a number." % spec.label)
                continue
            if spec.kind == "int" and not v.is_integer():
                problems.append("Setting '%s' must be a whole number." % spec.label)
            if spec.minimum is not None and v < spec.minimum:
                problems.append("Setting '%s' must be at least %g." % (spec.label, spec.minimum))
            if spec.maximum is not None and v > spec.maximum:
                problems.append("Setting '%s' must be at most %g." % (spec.label, spec.maximum))
        elif spec.kind == "choice" and v not in spec.choices:
            problems.append("Setting '%s' must be one of %s." % (spec.label, ", ".join(spec.choices)))
    return problems


def modelItems(models: List[dict], kind: Optional[str]) -> List[Tuple[str, str]]:
    usable = [m for m in models if m.get("status", "installed") == "installed" and (not kind or m.get("kind") == kind)]
    items = [(DEFAULT_MODEL, "Default prior" if usable else "Default prior (none installed)")]
    items += [(m["name"], "%s (%s)" % (m.get("title") or m["name"], m.get("source", "user"))) for m in usable]
    items.append((IMPORT_MODEL, "Import model..."))
    return items


def deviceItems(devices: List[dict]) -> List[Tuple[str, str]]:
    items = [("auto", "Automatic (GPU if available)")]
    for d in devices:
        label = d.get("title") or d["name"]
        if d.get("freeMb") is not None:
            label = "%s: %s, %.1f of %.1f GB free" % (d["name"], label, d["freeMb"] / 1024.0,
                                                      float(d.get("totalMb") or 0) / 1024.0)
        elif d["name"] != "cpu":
            label = "%s: %s" % (d["name"], label)
        items.append((d["name"], label))
    return items


def formatDuration(seconds) -> str:
    s = int(round(float(seconds)))
    return "%d:%02d:%02d" % (s // 3600, s % 3600 // 60, s % 60) if s >= 3600 else "%d:%02d" % (s // 60, s % 60)


def progressText(run: Optional[RunProgress]) -> Tuple[int, bool, str]:
    """(percent, busy, text) for every phase of a run, from its first second: the elapsed time always moves."""
    run = run or RunProgress()
    event = run.progress
    value, busy = 0, True
    if run.resultReady:
        value, busy, text = 100, False, "Loading the result into the scene..."
    elif event is not None and float(event.get("fraction") or 0) >= 1.0:
        value, busy, text = 100, False, "Writing the result..."
    elif event is not None:
        value = int(round(100 * float(event.get("fraction") or 0)))
        total = int(event.get("total") or 0)
        busy = total <= 1  # a one-step phase (registering, interpolating) has no steps to count
        message = str(event.get("message") or "Working")
        parts = ["Step %d/%d" % (int(event.get("step") or 0), total)] if total > 1 else []
        parts.append(message[:1].upper() + message[1:])
        if event.get("etaS") is not None and not busy:
            parts.append("ETA %s" % formatDuration(event["etaS"]))
        text = " - ".join(parts)
    elif run.started is not None:
        device = run.started.get("device")
        text = "Preparing%s..." % (" (device: %s)" % device if device and device != "auto" else "")
    else:
        text = "Starting the worker%s..." % (" and loading the prior" if run.loadsPrior else "")
    return value, busy, "%s (%s elapsed)" % (text, formatDuration(run.elapsedS))


def chosenDegradation(state: PanelState) -> Optional[Degradation]:
    """The override sent to the worker, or None to let it infer the degradation."""
    if not state.overrideDegradation:
        return None
    return Degradation(state.operator, (int(state.axis),), (float(state.factor),), state.profile)


def present(state: PanelState) -> PanelView:
    view = PanelView()
    problems = view.problems
    view.inputsEnabled = not state.running
    if state.inputVolume is None:
        problems.append("Select an input volume.")
        view.degradationText = "No input volume."
    else:
        view.detected, view.degradationText = detectDegradation(state.inputVolume.spacing)
        if view.detected is None and not state.overrideDegradation:
            problems.append("The degradation could not be detected: check 'Override' and set it.")
        for label, nodeId in (("output", state.outputVolumeId), ("uncertainty", state.uncertaintyVolumeId),
                              ("residual", state.residualVolumeId)):
            if nodeId and nodeId == state.inputVolume.nodeId:
                problems.append("The %s volume must not be the input volume; choose another or create a new one."
                                % label)
    view.overrideEnabled = state.overrideDegradation and not state.running
    if state.overrideDegradation:
        if state.operator not in OPERATORS:
            problems.append("Unknown degradation operator '%s'." % state.operator)
        if state.profile not in PROFILES:
            problems.append("Unknown slice profile '%s'." % state.profile)
        if not 0 <= int(state.axis) <= 2:
            problems.append("The degraded axis must be 0, 1 or 2.")
        if not float(state.factor) > 1.0:
            problems.append("The degradation factor must be greater than 1.")
        if state.operator == "slice-removal" and not float(state.factor).is_integer():
            problems.append("Slice removal needs a whole-number factor.")
    if state.methods is None:
        problems.append(state.workerError or "Asking the worker for its methods...")
    else:
        view.methodItems = [(m["name"], methodTitle(m)) for m in state.methods]
    method = methodByName(state.methods, state.method)
    if state.methods is not None and method is None:
        problems.append("Choose a method.")
    if method is not None:
        view.methodDescription = method.get("description", "")
        warning = defaultPriorWarning(method, state.model, state.device, state.devices)
        if warning:
            view.methodDescription += ("\n\nNot recommended with the default prior. %s Import the published prior "
                                       "(Import model...) for this method, or choose another." % warning)
        view.settingSpecs = settingSpecs(method, state.settingValues,
                                         priorDefaults(method, state.model, state.device, state.devices))
        problems.extend(settingProblems(method, state.settingValues))
        kind = method.get("needsPrior")
        view.modelVisible = bool(kind)
        view.uncertaintyVisible = bool(method.get("generative"))
        if kind:
            view.modelItems = modelItems(state.models, kind)
            if state.model == DEFAULT_MODEL and len(view.modelItems) == 2:
                problems.append("Method '%s' needs a %s prior and none is installed: choose 'Import model...'."
                                % (method.get("title") or method["name"], kind))
    view.deviceItems = deviceItems(state.devices)
    if state.running:
        view.applyText, view.applyEnabled, view.applyToolTip = "Cancel", True, "Stop the run; nothing is added."
        view.progressVisible = True
        view.progressValue, view.progressBusy, view.progressText = progressText(state.runProgress)
        return view
    if state.missingDependencies and state.inputVolume is not None:
        # The listings fail until the packages are there: Apply offers the installation (with consent).
        view.applyText = "Install dependencies..."
        view.applyEnabled = True
        view.applyToolTip = "The worker's Python lacks %s. Press to install them." % ", ".join(state.missingDependencies)
        return view
    view.applyEnabled = not problems
    view.applyToolTip = "\n".join(problems) if problems else "Super-resolve the input volume."
    return view


def runSettings(state: PanelState) -> Dict[str, object]:
    """Setting values to send, typed, for the chosen method only (stale keys of other methods dropped)."""
    out = {}
    method = methodByName(state.methods, state.method)
    for spec in settingSpecs(method, state.settingValues,
                             priorDefaults(method, state.model, state.device, state.devices)):
        v = spec.value
        if spec.kind == "int":
            v = int(float(v))
        elif spec.kind == "float":
            v = float(v)
        elif spec.kind == "bool":
            v = bool(v)
        out[spec.name] = v
    return out
