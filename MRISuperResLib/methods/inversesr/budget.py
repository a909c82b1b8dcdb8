"""Memory and time a prior-based inversion needs on a device, estimated before the run.

Formula (documented, measured on the architecture itself, never on real data):
1. Run the decoder segment by segment (generator.decoder_segments), and one UNet step, on the *meta* device
   (no memory, no compute) with autograd's saved-tensor hooks: S_b = bytes every segment b saves for
   backward (parameters excluded), O_b = bytes of the new tensors it outputs. FlopCounterMode counts the
   forward FLOPs F on the same pass.
2. Activation memory of one iteration, with per-segment (and per-DDIM-step) checkpointing:
       decoder = sum_b O_b + max_b S_b + 2 max_b O_b      (kept segment inputs + one recomputed one + grads)
       without checkpointing: sum_b S_b + 2 max_b O_b
       ldm adds max(decoder, S_unet + 2 O_unet) instead of decoder alone (backward visits one at a time), or
       their sum with accelerate=cuda-graphs (the captured step's memory pool stays allocated).
       With nested checkpointing (priors/revolve.py) sum_b O_b becomes the kept unit outputs plus the largest group's
       inner states, and the groups' inner segments are computed once more (their FLOPs added to the time).
   Under bf16 autocast (CUDA) convolutions save bf16 but norms and attention keep fp32: 3 bytes per element;
   the decoder with its low-memory GroupNorms (priors/lowmem_norm.py) saves bf16 only: 2 bytes per element.
3. Time per iteration = (forward + recompute + backward ~ 4 F) / throughput, the throughput measured once per
   device with a small 3D convolution. Full size, the published decoder saves about 36 GB without
   checkpointing (34 GB measured in FACTS.md) and costs 15 TFLOP forward.
"""

import math
import time
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from ... import memory
from ...errors import ResourceError
from ...priors import revolve
from ...priors.folder import build, count_parameters
from ...priors.generator import decoder_segments
from ...priors.revolve import meta_pass as _meta_pass

GB = 1e9
_THROUGHPUT: Dict[str, float] = {}


@dataclass
class Estimate:
    memory_bytes: float
    seconds_per_iteration: float
    iterations: int
    device: str
    parts: Dict[str, float] = field(default_factory=dict)
    model_flops: float = 0.0  # forward + backward of one iteration (3x forward), recomputation not counted

    @property
    def total_seconds(self) -> float:
        return self.seconds_per_iteration * self.iterations

    def describe(self) -> str:
        return "about %.1f GB of memory and %s (%d iterations at %.2f s) on %s" % (
            self.memory_bytes / GB, duration(self.total_seconds), self.iterations, self.seconds_per_iteration,
            self.device)

    def to_json(self) -> dict:
        return {"memory_gb": round(self.memory_bytes / GB, 3), "seconds_per_iteration": round(
            self.seconds_per_iteration, 4), "total_seconds": round(self.total_seconds, 1),
            "iterations": self.iterations, "device": self.device,
            "parts_gb": {k: round(v / GB, 3) for k, v in self.parts.items()},
            "model_tflop_per_iteration": self.model_flops / 1e12}


def duration(s: float) -> str:
    if s < 120:
        return "%.0f s" % s
    if s < 7200:
        return "%.0f min" % (s / 60)
    return "%.1f h" % (s / 3600)


def network_profile(card: dict, with_unet: bool, low_memory_norm: bool = True) -> dict:
    """Bytes and FLOPs of the card's decoder (per block) and, optionally, one UNet step; fp32, batch 1."""
    ae = build(card["networks"]["autoencoder"], device="meta")
    lat = [int(s) for s in card["latent"]["shape"]]
    state = (torch.zeros([1] + lat, device="meta", requires_grad=True),)
    segs = revolve.profile(decoder_segments(ae, low_memory_norm), state, list(ae.parameters()))
    blocks_saved, blocks_out = segs["saved"], segs["out"]  # out: new tensors only
    prof = {"decoder_saved": float(sum(blocks_saved)), "decoder_block_max": float(max(blocks_saved)),
            "decoder_boundaries": float(sum(blocks_out)), "decoder_out_max": float(max(blocks_out)),
            "decoder_flops": float(sum(segs["flops"])), "autoencoder_weights": float(4 * count_parameters(ae)),
            "decoder_segments": segs, "decoder_low_memory_norm": low_memory_norm,
            "unet_saved": 0.0, "unet_out": 0.0, "unet_flops": 0.0, "unet_weights": 0.0}
    if with_unet:
        unet = build(card["networks"]["unet"], device="meta")
        cin = int(card["networks"]["unet"]["kwargs"].get("in_channels", lat[0]))
        cond = card.get("conditioning")
        ctx = torch.zeros(1, 1, len(cond["names"]), device="meta") if cond and cond.get("as_context", True) else None
        x = torch.zeros([1, cin] + lat[1:], device="meta", requires_grad=True)
        t = torch.zeros(1, dtype=torch.long, device="meta")
        s, out, f = _meta_pass(lambda: unet(x, t, context=ctx), list(unet.parameters()))
        prof.update(unet_saved=float(s), unet_out=float(out.numel() * 4), unet_flops=float(f),
                    unet_weights=float(4 * count_parameters(unet)))
    return prof


def throughput(device: torch.device) -> float:
    """FLOP/s of a 3D convolution on `device` (measured once, cached)."""
    key = str(device)
    if key not in _THROUGHPUT:
        x = torch.randn(1, 64, 20, 20, 20, device=device)
        w = torch.randn(64, 64, 3, 3, 3, device=device)
        flop = 2.0 * 64 * 27 * x.numel()
        torch.nn.functional.conv3d(x, w, padding=1)
        _sync(device)
        t0, n = time.perf_counter(), 0
        while n < 2 or time.perf_counter() - t0 < 0.2:
            torch.nn.functional.conv3d(x, w, padding=1)
            n += 1
        _sync(device)
        _THROUGHPUT[key] = flop * n / max(time.perf_counter() - t0, 1e-9)
    return _THROUGHPUT[key]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def estimate(card: dict, device, iterations: int, ddim_steps: int = 0, checkpointing: bool = True,
             weights_resident: bool = True, profile: Optional[dict] = None, nested_checkpointing: bool = False,
             accelerate: str = "off") -> Estimate:
    """Estimate one run (see the module docstring); `weights_resident`: the prior is already on `device`.

    ddim_steps: steps of the DDIM chain the generator runs before its decoder (inversesr-ldm); 0: the decoder alone.
    nested_checkpointing: priors/revolve.py over the decoder; accelerate: the mode acceleration.resolve gives for
    `device` ("cuda-graphs" keeps a captured step's memory beside the decoder's).
    """
    device = torch.device(device)
    uses_unet = ddim_steps > 0
    p = profile or network_profile(card, uses_unet)
    scale = 0.75 if device.type == "cuda" else 1.0  # bf16 autocast: 3 of 4 bytes per saved element
    dec_scale = 0.5 if device.type == "cuda" and p.get("decoder_low_memory_norm") else scale
    recomputed = 0.0
    if checkpointing:
        boundaries = p["decoder_boundaries"]
        if nested_checkpointing and p.get("decoder_segments"):
            units = revolve.plan(p["decoder_segments"])
            boundaries = revolve.boundary_bytes(p["decoder_segments"], units)
            recomputed = revolve.extra_flops(p["decoder_segments"], units)
        dec = (boundaries + p["decoder_block_max"] + 2 * p["decoder_out_max"]) * dec_scale
        unet = (p["unet_saved"] + 2 * p["unet_out"]) * scale
        graphs = uses_unet and accelerate == "cuda-graphs" and device.type == "cuda"
        act = (dec + unet if graphs else max(dec, unet)) if uses_unet else dec
        passes = 4.0
    else:
        dec = (p["decoder_saved"] + 2 * p["decoder_out_max"]) * dec_scale
        unet = ddim_steps * p["unet_saved"] * scale if uses_unet else 0.0
        act = dec + unet
        passes = 3.0
    weights = p["autoencoder_weights"] + (p["unet_weights"] if uses_unet else 0.0)
    need = act + (0.0 if weights_resident else weights)
    forward = p["decoder_flops"] + (ddim_steps * p["unet_flops"] if uses_unet else 0.0)
    per_iter = (passes * forward + recomputed) / throughput(device)
    parts = {"activations": act, "weights": weights, "decoder": dec}
    if uses_unet:
        parts["unet_step"] = unet if checkpointing else unet / max(ddim_steps, 1)
    return Estimate(need, per_iter, int(iterations), str(device), parts, model_flops=3.0 * forward)


def available_memory(device) -> float:
    """Bytes that can still be allocated: free GPU memory on CUDA; on the CPU see memory.host_available (the
    smallest of MemAvailable, the cgroup's room and the process's own limits)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    return memory.host_available()


def check_fits(est: Estimate, what: str, available: Optional[float] = None, margin: float = 0.9) -> None:
    """Raise ResourceError with the numbers when `est` needs more than `margin` of the available memory."""
    avail = available_memory(est.device) if available is None else available
    if est.memory_bytes > margin * avail:
        dev = torch.device(est.device)
        fix = ("Use a GPU with at least %.0f GB free (--device cuda), or a smaller prior (--model, see `models list`)."
               % math.ceil(est.memory_bytes / GB / margin)) if dev.type == "cpu" else (
            "Free GPU memory, use a larger GPU, or run on the CPU (--device cpu) if it has the memory.")
        raise ResourceError("%s needs %s, but only %.1f GB are available there." % (what, est.describe(),
                                                                                   avail / GB), fix)
