"""Progress protocol and quality metrics."""

import io
import json

import numpy as np
import pytest
from conftest import phantom

from MRISuperResLib.errors import Cancelled, InputError
from MRISuperResLib.metrics import compare, head_mask, psnr, ssim, ssim_slices
from MRISuperResLib.progress import JsonLinesSink, Progress, parse_event
from MRISuperResLib.volume import Volume


def test_jsonl_events_and_tolerant_reader():
    buf = io.StringIO()
    t = iter([0.0, 10.0, 20.0])
    p = Progress(JsonLinesSink(buf), clock=lambda: next(t))
    p(1, 4, "step one", loss=0.5)
    p.warning("careful")
    p(2, 4, "step two")
    lines = buf.getvalue().splitlines() + ["Some library printed this", "{not json", '{"event": "other"}', "[1, 2]"]
    events = [e for e in map(parse_event, lines) if e]
    assert [e["event"] for e in events] == ["progress", "warning", "progress"]
    assert events[0]["fraction"] == 0.25 and events[0]["loss"] == 0.5
    assert events[0]["eta_s"] == pytest.approx(30.0)  # 10 s for 1/4 -> 30 s left
    assert events[2]["eta_s"] == pytest.approx(20.0)
    assert all(json.loads(line) for line in buf.getvalue().splitlines())


def test_cancel_is_raised_at_the_next_report():
    flag = {"stop": False}
    p = Progress(should_cancel=lambda: flag["stop"])
    p(1, 10)
    flag["stop"] = True
    with pytest.raises(Cancelled):
        p(2, 10)


def test_sub_progress_maps_into_span():
    events = []
    p = Progress(events.append).sub(0.5, 1.0)
    p(1, 2)
    assert events[-1]["fraction"] == pytest.approx(0.75)


def test_psnr_and_ssim_properties():
    rng = np.random.default_rng(0)
    ref = phantom((24, 24, 24))
    assert ssim(ref, ref, 1.0) == pytest.approx(1.0)
    assert psnr(ref, ref, 1.0) == float("inf")
    small = ref + 0.01 * rng.standard_normal(ref.shape)
    big = ref + 0.1 * rng.standard_normal(ref.shape)
    assert psnr(ref, small, 1.0) == pytest.approx(40.0, abs=0.2)
    assert ssim(ref, small, 1.0) > ssim(ref, big, 1.0)
    assert ssim_slices(ref, small, 1.0) > ssim_slices(ref, big, 1.0)
    # data range is explicit: doubling it adds 20 log10(2) dB
    assert psnr(ref, small, 2.0) - psnr(ref, small, 1.0) == pytest.approx(20 * np.log10(2), abs=1e-9)


def test_head_mask_and_masked_scores():
    ref = Volume.from_array(phantom((30, 30, 30)))
    mask = head_mask(ref)
    assert 0.2 < mask.mean() < 0.7
    assert mask[15, 15, 15] and not mask[0, 0, 0]
    noisy = ref.with_array(ref.array + 0.05 * (ref.array > 0) * np.random.default_rng(1).standard_normal(ref.grid.shape))
    s = compare(ref, noisy)
    assert s["psnr_masked"] < s["psnr"]  # errors sit inside the head; background inflates whole-volume PSNR
    with pytest.raises(InputError, match="different grids"):
        compare(ref, Volume.from_array(ref.array, spacing=(2, 1, 1)))
