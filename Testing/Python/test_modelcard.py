"""Model cards: each prior's README.md is rendered from its model.json, and the writers of model.json keep it in step."""

import glob
import io
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT

from MRISuperResLib.priors.modelcard import README_FILE, render_model_card

SHIPPED = sorted(glob.glob(os.path.join(ROOT, "Resources", "Models", "*", "model.json")))


def _card(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def test_priors_are_shipped():
    assert len(SHIPPED) >= 3


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.basename(os.path.dirname(p)))
def test_card_holds_the_gate_rows_and_checksums(path):
    card = _card(path)
    text = render_model_card(card)
    assert text.startswith("<!--") and text.endswith("\n")
    assert card["title"] in text and card["licence"] in text and card["intended_use"] in text
    for net in card["networks"].values():
        assert net["sha256"] in text and net["weights"] in text
    for digest in ((card.get("reference") or {}).get("sha256") or {}).values():
        assert digest in text
    gate = card["quality_gate"]
    assert gate["target"] in text
    section = text.split("## Quality gate", 1)[1].splitlines()
    table = [line for line in section if line.startswith("| ")][1:]  # the gate table's rows, header dropped
    assert len(table) == len(gate["rows"])  # one table row per gate row
    for row, line in zip(gate["rows"], table):  # in the card's order, with its numbers and verdict
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[4] == "%.2f" % row["psnr_masked"]
        assert cells[6] == "%.2f" % row["baseline_psnr_masked"]
        assert cells[7] == "%+.2f" % row["delta_psnr_masked_db"]
        assert cells[8] == "%.3f" % row["ssim"]
        assert cells[11] == {True: "**met**", False: "not met", None: "not gated"}[row["meets_target"]]
    for run in gate["runs"]:
        assert run["command"] in text
    for method, per_device in card["method_defaults"].items():
        for values in per_device.values():
            for key in values:
                assert "`%s=" % key in text and "`%s`" % method in text


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.basename(os.path.dirname(p)))
def test_shipped_readme_is_the_rendered_card(path):
    readme = os.path.join(os.path.dirname(path), README_FILE)
    with open(readme, encoding="utf-8") as fh:
        shipped = fh.read()
    assert shipped == render_model_card(_card(path)), (
        "%s is out of step with its model.json: run `python -m MRISuperResLib models card --all`." % readme)


def test_minimal_card_renders():
    text = render_model_card({"schema": 1, "name": "x", "kind": "vdm", "networks": {"unet": {
        "class": "DiffusionModelUNet", "kwargs": {}, "weights": "unet.safetensors", "sha256": None}}})
    assert "# x" in text and "Not measured yet" in text and "set at import" in text


def test_gate_update_rewrites_the_readme(tmp_path, monkeypatch):
    from MRISuperResLib.bench.cli import GATE_TARGET_DB, gate_plan
    from MRISuperResLib.bench.report import update_cards
    from MRISuperResLib.priors import synthetic

    monkeypatch.setenv("MRISR_MODELS_DIR", str(tmp_path / "store"))
    folder = synthetic.write_prior(synthetic.random_prior(synthetic.tiny_card(name="card-ldm")),
                                   str(tmp_path / "store" / "card-ldm"))
    row = {"method": "inversesr-decoder", "case": "synthetic-1", "label": "x", "degradation": "slice-removal-8mm",
           "psnr_masked": 23.456, "ssim": 0.8, "seconds": 1.0, "baseline": "bspline", "prior": "card-ldm",
           "error": None, "delta_psnr_masked_db": 1.234, "baseline_psnr_masked": 22.222}
    update_cards([row], {"command": "bench --gate", "machine": "m", "date": "d"}, gate_plan(), GATE_TARGET_DB)
    with open(os.path.join(folder, README_FILE)) as fh:
        text = fh.read()
    assert text == render_model_card(_card(os.path.join(folder, "model.json")))
    assert "| 23.46 |" in text and "| +1.23 |" in text and "**met**" in text

    from MRISuperResLib.priors.cli import handle  # `models card NAME --print` gives the same text

    out = io.StringIO()
    assert handle(SimpleNamespace(models_command="card", names=["card-ldm"], all=False, print=True), out) == 0
    assert out.getvalue() == text + "\n"


def test_export_writes_the_readme(tmp_path):
    from MRISuperResLib.training.export import export_prior

    grid = SimpleNamespace(origin=(0.0, 0.0, 0.0), direction=np.eye(3))
    synth = SimpleNamespace(config=SimpleNamespace(downsample=1, orientation="LAS"), shape=(8, 8, 8),
                            grid=lambda: grid)
    task = SimpleNamespace(synth=synth, card=lambda: {"kind": "paired"},
                           networks=lambda: {"unet": ("DiffusionModelUNet", torch.nn.Linear(2, 2), {})})
    card = export_prior(task, str(tmp_path / "prior"), "card-test", training={"steps": 3, "command": "train a && b"})
    with open(tmp_path / "prior" / README_FILE) as fh:
        text = fh.read()
    assert text == render_model_card(card)
    assert card["networks"]["unet"]["sha256"] in text and "   train a\n   b\n" in text
