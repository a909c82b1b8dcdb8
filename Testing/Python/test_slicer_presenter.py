"""The panel's Qt-free presenter and the protocol translation, checked against the library itself."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "MRISuperRes"))
sys.path.insert(0, REPO)

from MRISuperResModuleLib import presenter as P  # noqa: E402
from MRISuperResModuleLib.protocol import Degradation, RunRequest, camelKeys, parseEventLine, toCamel, toSnake  # noqa: E402

METHODS = camelKeys([
    {"name": "bspline", "title": "B-spline (cubic)", "description": "Baseline.", "generative": False,
     "needs_prior": None, "settings": []},
    {"name": "inverse", "title": "InverseSR", "description": "Latent optimisation.", "generative": True,
     "needs_prior": "ldm", "settings": [
         {"name": "iterations", "type": "int", "default": 100, "help": "Adam steps.", "min": 1, "max": 5000,
          "choices": None},
         {"name": "learning_rate", "type": "float", "default": 0.07, "help": "lr", "min": 0.0, "max": None,
          "choices": None},
         {"name": "init", "type": "choice", "default": "encode", "help": "start", "min": None, "max": None,
          "choices": ["encode", "random"]},
         {"name": "seed", "type": "int", "default": 0, "help": "Random seed.", "min": 0, "max": None,
          "choices": None},
         {"name": "lr", "type": "float", "default": 0.07, "help": "Adam step.", "min": 0, "max": None,
          "choices": None}]},
])
LDM = {"name": "brain_ldm", "kind": "ldm", "title": "Brain LDM", "status": "installed", "source": "bundled"}


def _state(**kw):
    base = dict(inputVolume=P.VolumeInfo("vtkMRMLScalarVolumeNode1", "lr", (1.0, 1.0, 4.0), (160, 224, 40)),
                methods=METHODS, method="bspline")
    base.update(kw)
    return P.PanelState(**base)


def test_a_method_below_its_baseline_with_the_default_prior_is_marked_and_explained():
    warning = "On its quality gate, prior 'synth' scored 2.5 dB below bspline."
    methods = METHODS + camelKeys([{"name": "decoder", "title": "InverseSR (Decoder)", "description": "Decoder.",
                                    "generative": True, "needs_prior": "ldm", "settings": [],
                                    "below_baseline_with_default_prior": {"cpu": warning, "cuda": None}}])
    view = P.present(_state(methods=methods, method="decoder", models=[LDM]))
    assert dict(view.methodItems)["decoder"] == "InverseSR (Decoder) (needs the published prior)"
    assert dict(view.methodItems)["inverse"] == "InverseSR"
    assert warning in view.methodDescription and "Import model" in view.methodDescription
    assert view.applyEnabled  # still the user's choice
    # a prior of the user's own, or a GPU whose default prior passed: no warning
    assert warning not in P.present(_state(methods=methods, method="decoder", models=[LDM],
                                           model="brain_ldm")).methodDescription
    on_gpu = P.present(_state(methods=methods, method="decoder", models=[LDM], devices=[{"name": "cuda:0"}]))
    assert warning not in on_gpu.methodDescription


def test_ready_state_enables_apply():
    view = P.present(_state())
    assert view.applyEnabled and view.applyText == "Apply" and view.problems == []
    assert view.detected == Degradation("thick-slice", (2,), (4.0,), "gaussian")
    assert "axis 2 (k), factor 4" in view.degradationText
    assert not view.modelVisible and not view.uncertaintyVisible and not view.overrideEnabled


def test_missing_input_and_output_equal_to_input_block_apply():
    view = P.present(_state(inputVolume=None))
    assert not view.applyEnabled and view.problems == ["Select an input volume."]
    assert view.applyToolTip == "Select an input volume."
    view = P.present(_state(outputVolumeId="vtkMRMLScalarVolumeNode1"))
    assert not view.applyEnabled and "output volume must not be the input" in view.problems[0]
    view = P.present(_state(residualVolumeId="vtkMRMLScalarVolumeNode1"))
    assert "residual volume must not be the input" in view.problems[0]


def test_isotropic_input_needs_override():
    iso = P.VolumeInfo("id", "iso", (1.0, 1.0, 1.2), (10, 10, 10))
    view = P.present(_state(inputVolume=iso))
    assert view.detected is None and not view.applyEnabled and "Override" in view.problems[0]
    view = P.present(_state(inputVolume=iso, overrideDegradation=True, operator="downsample", axis=0, factor=2))
    assert view.applyEnabled and view.overrideEnabled
    assert P.chosenDegradation(_state(overrideDegradation=True, operator="downsample", axis=0, factor=2)) == \
        Degradation("downsample", (0,), (2.0,), "gaussian")
    bad = P.present(_state(overrideDegradation=True, operator="slice-removal", factor=2.5))
    assert bad.problems == ["Slice removal needs a whole-number factor."]
    assert P.present(_state(overrideDegradation=True, factor=1.0)).problems == [
        "The degradation factor must be greater than 1."]


@pytest.mark.parametrize("spacing", [(1, 1, 4), (1, 1, 1.4), (1, 1, 1.6), (3, 1, 1), (0.9, 1.2, 1.1),
                                     (2, 2, 1), (1, 5.5, 1.1), (0.5, 0.5, 0.8)])
def test_detected_degradation_matches_the_library(spacing):
    from MRISuperResLib.errors import InputError
    from MRISuperResLib.pipeline import infer_degradation
    from MRISuperResLib.volume import Grid

    detected, text = P.detectDegradation(spacing)
    try:
        spec = infer_degradation(Grid((8, 8, 8), spacing))
    except InputError:
        assert detected is None and "Set the degradation" in text
        return
    assert detected is not None
    assert list(detected.axes) == list(spec.axes) and detected.factors[0] == pytest.approx(spec.factors[spec.axes[0]])


def test_generative_method_shows_model_settings_and_uncertainty():
    view = P.present(_state(method="inverse", models=[LDM, dict(LDM, name="ddpm", kind="ddpm")]))
    assert view.modelVisible and view.uncertaintyVisible and view.applyEnabled
    assert [v for v, _ in view.modelItems] == ["", "brain_ldm", P.IMPORT_MODEL]  # other kinds filtered out
    specs = {s.name: s for s in view.settingSpecs}
    assert specs["iterations"].kind == "int" and specs["iterations"].value == 100 and specs["iterations"].maximum == 5000
    assert specs["learning_rate"].decimals == 3 and specs["init"].choices == ("encode", "random")
    assert specs["learning_rate"].label == "Learning rate" and specs["lr"].label == "Learning rate"
    assert "seed" not in specs  # the panel's own Seed field covers it


def test_the_form_starts_from_the_run_priors_defaults_for_its_device():
    # As listed by `methods --json` (camelCase keys, setting names included): each prior's defaults per device.
    method = dict(METHODS[1], defaultPrior={"cpu": "brain_ldm", "cuda": "brain_ldm"},
                  priorDefaults=camelKeys({"brain_ldm": {"cpu": {"iterations": 30, "learning_rate": 0.01},
                                                         "cuda": {"iterations": 300}},
                                           "other": {"cpu": {"iterations": 7}}}))
    methods = [METHODS[0], method]
    gpus = [{"name": "cuda:0"}]

    def values(**kw):
        return {sp.name: sp.value for sp in P.present(_state(methods=methods, method="inverse", models=[LDM],
                                                             **kw)).settingSpecs}

    assert values()["iterations"] == 30 and values()["learning_rate"] == 0.01 and values()["init"] == "encode"
    assert values(devices=gpus)["iterations"] == 300 and values(devices=gpus)["learning_rate"] == 0.07
    assert values(devices=gpus, device="cpu")["iterations"] == 30
    assert values(model="other")["iterations"] == 7 and values(model="/data/my_prior")["iterations"] == 100
    assert values(settingValues={"iterations": 12})["iterations"] == 12  # the user's value wins
    sent = P.runSettings(_state(methods=methods, method="inverse", models=[LDM]))
    assert sent["iterations"] == 30 and sent["learning_rate"] == 0.01  # Apply sends what the form shows


def test_prior_method_without_prior_asks_for_import():
    view = P.present(_state(method="inverse", models=[dict(LDM, status="not installed")]))
    assert not view.applyEnabled and "Import model" in view.problems[0]
    assert view.modelItems[0][1] == "Default prior (none installed)"
    assert P.present(_state(method="inverse", model="/data/my_prior")).applyEnabled  # an explicit path is fine


def test_setting_values_are_validated_and_typed():
    state = _state(method="inverse", models=[LDM], settingValues={"iterations": 0, "init": "zeros"})
    problems = P.present(state).problems
    assert "Setting 'Iterations' must be at least 1." in problems
    assert "Setting 'Init' must be one of encode, random." in problems
    state = _state(method="inverse", models=[LDM], settingValues={"iterations": 12.0, "stale_key": 1})
    assert P.runSettings(state) == {"iterations": 12, "learning_rate": 0.07, "init": "encode", "lr": 0.07}


def test_running_turns_apply_into_cancel_with_progress():
    event = {"event": "progress", "fraction": 0.25, "step": 5, "total": 20, "message": "DDIM", "etaS": 75.4}
    view = P.present(_state(running=True, runProgress=P.RunProgress(elapsedS=30, progress=event)))
    assert view.applyText == "Cancel" and view.applyEnabled and not view.inputsEnabled
    assert view.progressVisible and view.progressValue == 25 and not view.progressBusy
    assert view.progressText == "Step 5/20 - DDIM - ETA 1:15 (0:30 elapsed)"
    assert P.formatDuration(3725) == "1:02:05"


def test_every_phase_shows_from_the_first_second():
    """Start-up and prior loading are silent in the worker: the panel still names the phase and counts time."""
    phases = [
        (P.RunProgress(elapsedS=1), (0, True, "Starting the worker... (0:01 elapsed)")),
        (P.RunProgress(elapsedS=40, loadsPrior=True), (0, True, "Starting the worker and loading the prior... (0:40 elapsed)")),
        (P.RunProgress(elapsedS=41, loadsPrior=True, started={"device": "cuda"}),
         (0, True, "Preparing (device: cuda)... (0:41 elapsed)")),
        (P.RunProgress(elapsedS=42, progress={"fraction": 0.0, "step": 0, "total": 1,
                                              "message": "registering the input to the prior's reference (rigid)"}),
         (0, True, "Registering the input to the prior's reference (rigid) (0:42 elapsed)")),
        (P.RunProgress(elapsedS=50, progress={"fraction": 0.5, "step": 10, "total": 20, "message": "sampling",
                                              "etaS": 8}),
         (50, False, "Step 10/20 - Sampling - ETA 0:08 (0:50 elapsed)")),
        (P.RunProgress(elapsedS=59, progress={"fraction": 1.0, "step": 20, "total": 20, "message": "sampling"}),
         (100, False, "Writing the result... (0:59 elapsed)")),
        (P.RunProgress(elapsedS=61, resultReady=True), (100, False, "Loading the result into the scene... (1:01 elapsed)")),
    ]
    for run, expected in phases:
        assert P.progressText(run) == expected


def test_methods_still_loading_or_failed():
    assert "Asking the worker" in P.present(_state(methods=None)).problems[0]
    view = P.present(_state(methods=None, workerError="PyTorch is not installed."))
    assert view.problems == ["PyTorch is not installed."] and not view.applyEnabled


def test_missing_dependencies_turn_apply_into_install():
    view = P.present(_state(methods=None, workerError="No module named torch", missingDependencies=["torch", "monai"]))
    assert view.applyEnabled and view.applyText == "Install dependencies..." and "torch, monai" in view.applyToolTip
    assert not P.present(_state(inputVolume=None, missingDependencies=["torch"])).applyEnabled


def test_device_items_show_free_memory():
    devices = camelKeys([{"name": "cpu", "title": "CPU (2 threads)", "type": "cpu"},
                         {"name": "cuda:0", "title": "NVIDIA H100", "type": "cuda", "free_mb": 40960,
                          "total_mb": 81920}])
    items = P.deviceItems(devices)
    assert items[0][0] == "auto" and items[1] == ("cpu", "CPU (2 threads)")
    assert items[2] == ("cuda:0", "cuda:0: NVIDIA H100, 40.0 of 80.0 GB free")


def test_names_translate_both_ways():
    for snake in ("eta_s", "exit_code", "needs_prior", "fraction", "hr_shape"):
        assert toSnake(toCamel(snake)) == snake
    assert camelKeys({"needs_prior": None, "settings": [{"name": "learning_rate"}]}) == \
        {"needsPrior": None, "settings": [{"name": "learning_rate"}]}


def test_event_parser_agrees_with_the_library():
    from MRISuperResLib.progress import parse_event

    lines = ['{"event": "progress", "fraction": 0.5, "step": 1, "total": 2, "message": "m", "eta_s": 1.0}',
             '{"event": "error", "message": "bad", "exit_code": 2}', "  {bad json", "plain text",
             '{"event": "other"}', "[1, 2]", '{"no_event": 1}', b'{"event": "warning", "message": "w"}', ""]
    for line in lines:
        ours, theirs = parseEventLine(line), parse_event(line)
        assert (ours is None) == (theirs is None)
        if theirs is not None:
            assert ours == {toCamel(k): v for k, v in theirs.items()}


def test_run_request_is_accepted_by_the_library_cli(tmp_path):
    from MRISuperResLib.cli import _spec_from_args, build_parser
    from MRISuperResLib.settings import parse_key_values

    request = RunRequest("/in.nrrd", "/out.nrrd", method="inverse", settings={"learning_rate": 0.07, "iterations": 5,
                                                                               "use_ema": True},
                         degradation=Degradation("slice-removal", (1,), (4,), "box"), model="brain_ldm",
                         device="cpu", seed=3, uncertaintyPath="/u.nrrd", residualPath="/r.nrrd")
    args = build_parser().parse_args(request.args())
    assert (args.method, args.input, args.output, args.model, args.device, args.seed, args.progress) == (
        "inverse", "/in.nrrd", "/out.nrrd", "brain_ldm", "cpu", 3, "jsonl")
    assert parse_key_values(args.set) == {"iterations": "5", "learning_rate": "0.07", "use_ema": "true"}
    assert _spec_from_args(args).describe()["factors"] == [4.0] and _spec_from_args(args).axes == (1,)
    assert (args.uncertainty, args.residual) == ("/u.nrrd", "/r.nrrd")
    plain = build_parser().parse_args(RunRequest("/a.nii", "/b.nii").args())
    assert plain.operator is None and plain.set == [] and plain.method == "bspline"
