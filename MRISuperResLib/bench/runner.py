"""Run methods x cases x degradations and measure quality, time and peak memory.

Ratios (quality delta in dB, time ratio) are against the baseline of the same case and
degradation in the same run (B-spline; zero-filled sinc for k-space), so a noisy machine
changes both sides alike.
"""

import os
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from ..errors import UserError
from ..methods import available, get_method
from ..metrics import head_mask, psnr, ssim, ssim_slices
from ..physics import OperatorSpec, lr_grid
from ..pipeline import super_resolve
from ..volume import Volume
from .cases import DEGRADATIONS, INFERRED, Case, centre_crop

QUICK_LIMITS = {"iterations": 5, "steps": 4, "samples": 1}


@dataclass
class Row:
    method: str
    case: str
    label: str
    degradation: str
    psnr: Optional[float] = None
    psnr_masked: Optional[float] = None
    ssim: Optional[float] = None
    ssim_slices: Optional[float] = None
    seconds: Optional[float] = None
    peak_ram_mb: Optional[float] = None
    peak_gpu_mb: Optional[float] = None
    device: str = "cpu"
    baseline: str = ""
    delta_psnr_masked_db: Optional[float] = None
    time_ratio: Optional[float] = None
    settings: Dict = field(default_factory=dict)
    phase_seconds: Dict = field(default_factory=dict)  # e.g. {"adaptation": 90.1, "sampling": 300.2}
    prior: Optional[str] = None
    error: Optional[str] = None

    def to_json(self):
        return asdict(self)


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 10 ms)."""

    def __enter__(self):
        self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> float:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024.0
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def baseline_for(kind: str) -> str:
    return "sinc" if kind == "kspace" else "bspline"


def quick_settings(method) -> dict:
    out = {}
    for s in method.settings:
        if s.name in QUICK_LIMITS:
            v = QUICK_LIMITS[s.name]
            out[s.name] = max(v, s.min) if s.min is not None else v
    return out


def _views(arr: np.ndarray):
    return [np.take(arr, arr.shape[a] // 2, axis=a).copy() for a in range(3)]


def run(cases: List[Case], degradations: List[str], methods: Optional[List[str]], device: str = "auto",
        quick: bool = False, log=print, load_prior=None, only: Optional[Dict[str, List[str]]] = None,
        overrides: Optional[Dict[str, str]] = None):
    """Returns (rows, figures) where figures[case][degradation] = {"truth", "lr", <method>: 3 views}.

    only: method -> the degradations it runs on (others: every degradation that suits it); baselines run on all.
    overrides: setting -> value, given to each method that has that setting (over the quick limits).
    """
    names = methods or [m.name for m in available()]
    for n in names:
        get_method(n)
    for b in ("trilinear", "bspline", "sinc"):  # every comparison carries all baselines
        if b not in names:
            names.append(b)
    rows, figures = [], {}
    for case in cases:
        whole = case.load()
        figures[case.name] = {}
        for deg in degradations:
            kind, axis, factor = DEGRADATIONS[deg]
            spec = OperatorSpec.make(kind, axis, factor)
            hr = tiled(whole, kind, axis, factor)
            if hr.grid.shape != whole.grid.shape:
                log("bench: %s cut to %s so that %s tiles it" % (case.name, "x".join(map(str, hr.grid.shape)), deg))
            mask = head_mask(hr)
            dr = float(hr.array.max() - hr.array.min())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                op = spec.bind_hr(hr.grid.shape)
            y = op.forward(torch.as_tensor(hr.array, dtype=torch.float64)).float().numpy()
            lr = Volume(y, lr_grid(hr.grid, op))
            fig = {"truth": _views(hr.array), "lr": _views(_nearest(op, y))}
            figures[case.name][deg] = fig
            for name in names:
                m = get_method(name)
                if kind not in m.operators or (only and name in only and deg not in only[name]):
                    continue
                settings = quick_settings(m) if quick else {}
                settings.update({k: v for k, v in (overrides or {}).items() if k in {s.name for s in m.settings}})
                row = Row(name, case.name, case.label, deg, device=device, settings=settings)
                log("bench: %s / %s / %s" % (case.name, deg, name))
                try:
                    prior = load_prior(m) if (m.needs_prior and load_prior) else None
                    if m.needs_prior and prior is None:
                        raise UserError("no %s prior installed" % m.needs_prior)
                    if torch.cuda.is_available():
                        torch.cuda.reset_peak_memory_stats()
                    with PeakRSS() as mem:
                        t0 = time.perf_counter()
                        out = super_resolve(lr, name, None if deg in INFERRED else spec, settings, prior, device,
                                            seed=0)
                        row.seconds = time.perf_counter() - t0
                    row.peak_ram_mb = round(mem.peak, 1)
                    if torch.cuda.is_available():
                        row.peak_gpu_mb = round(torch.cuda.max_memory_allocated() / 2**20, 1)
                    row.device = out.info.get("device", device)
                    row.prior = out.info.get("prior") or (prior.name if prior is not None else None)
                    row.phase_seconds = dict(out.info.get("phase_seconds") or {})
                    x = out.volume.array
                    row.psnr = psnr(hr.array, x, dr)
                    row.psnr_masked = psnr(hr.array, x, dr, mask)
                    row.ssim = ssim(hr.array, x, dr)
                    row.ssim_slices = ssim_slices(hr.array, x, dr, axis=op.axes[-1])
                    fig[name] = _views(x)
                except UserError as exc:
                    row.error = str(exc)
                    log("bench:   skipped: %s" % exc)
                rows.append(row)
            _ratios([r for r in rows if r.case == case.name and r.degradation == deg], baseline_for(kind))
    return rows, figures


def tiled(vol: Volume, kind: str, axis, factor) -> Volume:
    """`vol` centre-cut along the degraded axes to a multiple of an integer `factor`, on the same physical grid.

    Why: the operators give an HR grid of (LR size x factor) voxels, so a case whose size the factor does not
    divide (the whole-brain case's 181 slices at 8 mm, or its 181 x 217 in-plane voxels at 4x k-space) could not
    be scored against its truth voxel for voxel.
    """
    if float(factor) != int(factor):
        return vol
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if all(vol.grid.shape[a] % int(factor) == 0 for a in axes):
        return vol
    return centre_crop(vol, int(factor), axes=axes)


def _nearest(op, y):
    """The LR volume shown on the HR grid (nearest sample), for figures."""
    out = torch.as_tensor(y)
    for a in op.axes:
        n, m = op.hr_shape[a], op.lr_shape[a]
        idx = np.clip(np.round((np.arange(n) - (op.factors[a] - 1) / 2) / op.factors[a]).astype(int), 0, m - 1)
        out = torch.index_select(out, a, torch.as_tensor(idx))
    return out.numpy()


def _ratios(rows: List[Row], baseline: str):
    base = next((r for r in rows if r.method == baseline and r.error is None), None)
    for r in rows:
        r.baseline = baseline
        if base is None or r.error is not None:
            continue
        r.delta_psnr_masked_db = round(r.psnr_masked - base.psnr_masked, 3)
        r.time_ratio = round(r.seconds / max(base.seconds, 1e-6), 2)


def machine_description(device: str) -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and device != "cpu" else "no GPU"
    return "%s, %d CPU threads (torch), %s" % (cpu, torch.get_num_threads(), gpu) + (
        "" if os.cpu_count() is None else ", %d cores visible" % os.cpu_count())
