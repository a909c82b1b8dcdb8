"""`bench --speedups`: each CPU/GPU speed-up of the library switched off and on, measured in the same run.

Every configuration runs in its own process (the heap setting holds for a whole process, and a fresh process
has a fresh peak-memory counter): paired-ddpm with the shipped prior on a 96 x 112 x 96 crop of the MNI152
template at 8 mm slice removal, same seed, without learning from the scan. Reported: the method's seconds, its
ratio to the run with every speed-up off, the process's peak resident memory, and the largest difference of its
output from that run's (the speed-ups must not change the result beyond float rounding).
"""

import json
import os
import resource
import subprocess
import sys
import time
from typing import Dict, List, Optional

from ..allocator import OPT_OUT
from ..priors.folder import ATTENTION_ENV, LAYOUT_ENV

CONFIGS = [  # (name, fused attention, freed heap kept, channels-last layout on the CPU)
    ("plain", False, False, False),
    ("fused attention", True, False, False),
    ("kept heap", False, True, False),
    ("channels last", False, False, True),
    ("all but channels last", True, True, False),  # what channels-last adds on top of the others
    ("all (default)", True, True, True),
]

_CHILD = "from MRISuperResLib.bench.speedups import child; child(%r)"


def child(spec_json: str) -> None:
    """One configuration, in its own process: prints one JSON line and saves the output array."""
    spec = json.loads(spec_json)
    if spec["kept"]:
        from ..allocator import keep_freed_memory

        keep_freed_memory()
    import numpy as np
    import torch

    from ..physics import OperatorSpec, lr_grid
    from ..pipeline import super_resolve
    from ..priors.store import load_prior
    from ..volume import Volume
    from .cases import centre_crop, mni152_case

    hr = centre_crop(mni152_case(quick=True).load(), 8, tuple(spec["shape"]))
    op_spec = OperatorSpec.make("slice-removal", 2, 8)
    op = op_spec.bind_hr(hr.grid.shape)
    y = op.forward(torch.as_tensor(hr.array, dtype=torch.float64)).float().numpy()
    lr = Volume(y, lr_grid(hr.grid, op))
    prior = load_prior("synth-brain-paired", kind="paired")
    # adapt off: the speed-ups are the diffusion network's, and the learning from the scan stops at a time budget,
    # so on a busy machine two runs could learn different networks and differ by more than rounding
    settings = dict(prior.method_defaults("paired-ddpm", spec["device"].split(":")[0]), samples=spec["samples"],
                    adapt="off")
    t0 = time.perf_counter()
    out = super_resolve(lr, "paired-ddpm", op_spec, settings, prior, spec["device"], seed=0)
    seconds = time.perf_counter() - t0
    np.save(spec["array"], out.volume.array)
    peak_gpu = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None
    print(json.dumps({"seconds": seconds, "peak_ram_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "peak_gpu_mb": peak_gpu, "settings": settings}))


def run(out_dir: str, device: str = "cpu", samples: int = 2, shape=(96, 112, 96),
        configs: Optional[List[tuple]] = None, log=None) -> List[Dict]:
    """Rows, one per configuration, the first being the baseline every ratio and difference refers to."""
    import numpy as np

    os.makedirs(out_dir, exist_ok=True)
    rows, first = [], None
    for config in configs or CONFIGS:
        name, fused, kept = config[:3]
        channels_last = bool(config[3]) if len(config) > 3 else False
        if log:
            log("speedups: %s" % name)
        array = os.path.join(out_dir, "speedups-%d.npy" % len(rows))
        env = dict(os.environ)
        env[ATTENTION_ENV] = "fused" if fused else "explicit"
        env[OPT_OUT] = "1" if kept else "0"
        env[LAYOUT_ENV] = "channels-last" if channels_last else "contiguous"
        spec = {"kept": kept, "device": device, "samples": samples, "shape": list(shape), "array": array}
        done = subprocess.run([sys.executable, "-c", _CHILD % json.dumps(spec)], env=env, capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise RuntimeError("speedups: the %r run failed:\n%s" % (name, done.stderr[-3000:]))
        row = dict(json.loads(done.stdout.strip().splitlines()[-1]), config=name, fused_attention=fused,
                   kept_heap=kept, channels_last=channels_last, device=device)
        out = np.load(array)
        os.remove(array)
        if first is None:
            first = (row["seconds"], out)
        row["x_plain_time"] = row["seconds"] / first[0]
        row["max_abs_diff_vs_plain"] = float(np.abs(out - first[1]).max())
        row["output_range"] = float(first[1].max() - first[1].min())
        rows.append(row)
    return rows


def markdown(rows: List[Dict]) -> str:
    lines = ["| configuration | fused attention | kept heap | channels last | seconds | x plain time | peak RAM MB "
             "| peak GPU MB | max abs diff vs plain (of range) |", "|---|---|---|---|---|---|---|---|---|"]

    def yes(flag):
        return "yes" if flag else "no"

    for r in rows:
        lines.append("| %s | %s | %s | %s | %.1f | %.2f | %.0f | %s | %.2g (%.3g) |" % (
            r["config"], yes(r["fused_attention"]), yes(r["kept_heap"]), yes(r.get("channels_last")), r["seconds"],
            r["x_plain_time"], r["peak_ram_mb"], "-" if r["peak_gpu_mb"] is None else "%.0f" % r["peak_gpu_mb"],
            r["max_abs_diff_vs_plain"], r["output_range"]))
    return "\n".join(lines)
