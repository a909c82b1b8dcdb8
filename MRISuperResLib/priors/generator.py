"""A differentiable generator z_T -> DDIM chain -> decoder that fits in memory.

Notation: z_T initial noise latent (1, C, l_i, l_j, l_k); c conditioning values (n_c,) in [0, 1];
z_0 clean latent; x = D(z_0 / scale_factor) the image (1, 1, n_i, n_j, n_k) in the prior's intensity range.

1. for (t, ab_t, ab_prev) in the chain: eps = UNet([z_t, c broadcast as channels], t, context=c);
   z_prev = DDIM step (ddim.py). Each step is checkpointed: only z_t is kept, the step is recomputed
   during backward, so memory is one UNet step, not N of them.
2. x = decoder(z_0): checkpointed per segment, a segment being a decoder block or half a residual block
   (GroupNorm spans the whole volume, so tiling is not exact; recomputation is). Halving the residual blocks
   cuts the published decoder's recompute peak from 16 GB to about 7 GB (methods/inversesr/budget.py
   measures it). Its GroupNorms keep only their input for backward (lowmem_norm.py); with nested checkpointing,
   groups of segments are checkpointed again (revolve.py).
On CUDA both run under bf16 autocast (fp32 on CPU); gradients and parameters stay fp32. The UNet steps may be
captured as CUDA graphs or compiled (acceleration.py).
"""

import contextlib
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import acceleration, revolve
from .ddim import ddim_pairs, ddim_step
from .folder import build
from .lowmem_norm import group_norm_silu


def decoder_segments(ae, low_memory_norm: bool = True) -> List[Callable]:
    """The decoder as a chain of functions, each of the previous one's outputs; a residual block
    (x -> shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))) becomes two, joined by the pair (x, h).
    low_memory_norm: GroupNorm(+SiLU) before a convolution saves only its input (lowmem_norm.py, same values)."""
    def norm_act(norm, x):
        return group_norm_silu(x, norm) if low_memory_norm else F.silu(norm(x))

    segs = [ae.post_quant_conv]
    blocks = list(ae.decoder.blocks)
    for i, block in enumerate(blocks):
        if all(hasattr(block, a) for a in ("norm1", "conv1", "norm2", "conv2", "nin_shortcut")):
            def first(x, b=block):
                return x, b.conv1(norm_act(b.norm1, x))

            def second(x, h, b=block):
                return b.nin_shortcut(x) + b.conv2(norm_act(b.norm2, h))

            segs += [first, second]
        elif low_memory_norm and isinstance(block, torch.nn.GroupNorm) and _is_conv(blocks[i + 1:i + 2]):
            def norm(x, b=block):
                return group_norm_silu(x, b, silu=False)

            segs.append(norm)
        else:
            segs.append(block)
    return segs


def _is_conv(following) -> bool:
    m = following[0] if following else None
    m = getattr(m, "conv", m)  # MONAI's Convolution wraps the torch layer
    return isinstance(m, torch.nn.modules.conv._ConvNd)


class LatentGenerator:
    """Wraps a loaded LDM prior; holds no optimisation state (a captured or compiled UNet step is a cache).

    accelerate: acceleration.MODES; nested_checkpointing: revolve.py over the decoder; channels_last: the networks'
    convolutions in NDHWC layout (converts the prior's modules in place; same values); warn: where fallbacks are
    reported (progress.warning).
    """

    low_memory_norm = True  # lowmem_norm.py in the decoder (False: eager GroupNorm, for comparisons)

    def __init__(self, prior, checkpointing: bool = True, autocast: Optional[bool] = None, accelerate: str = "off",
                 nested_checkpointing: bool = False, channels_last: bool = False, warn=None):
        self.prior = prior
        self.ae = prior.autoencoder
        self.unet = prior.unet
        self.checkpointing = checkpointing
        self.autocast = autocast
        self.accelerate, self.nested_checkpointing, self.warn = accelerate, nested_checkpointing, warn
        self.memory_format = torch.channels_last_3d if channels_last else None
        if channels_last:
            for net in (self.ae, self.unet):
                if net is not None:
                    net.to(memory_format=torch.channels_last_3d)
        self._modes, self._steps, self._plans = {}, {}, {}  # caches: resolved modes, step runners, decoder plans
        latent = prior.card.get("latent") or {}
        self.scale_factor = float(latent.get("scale_factor", 1.0))
        self.latent_shape = tuple(int(s) for s in latent["shape"])
        cond = prior.card.get("conditioning")
        self.cond_default = None if not cond else torch.tensor(cond["default"], dtype=torch.float32)
        self.cond_as_channels = bool(cond and cond.get("as_channels", True))
        self.cond_as_context = bool(cond and cond.get("as_context", True))
        self.alpha_bar = prior.schedule.alpha_bar()

    # ---- mixed precision ----
    def _amp(self, device: torch.device):
        use = self.autocast if self.autocast is not None else device.type == "cuda"
        if not use:
            return contextlib.nullcontext()
        # no cast cache: the parameters are frozen, so it would hold nothing, and CUDA graph capture forbids it
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)

    def _maybe_checkpoint(self, fn, *args):
        if self.checkpointing and torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    # ---- decoder ----
    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """x = D(z_0 / scale_factor), (1, C, l...) -> (1, 1, n...), float32."""
        segments = decoder_segments(self.ae, self.low_memory_norm)
        if self.checkpointing and self.nested_checkpointing:
            segments = revolve.units(segments, self.decoder_plan(tuple(z0.shape)),
                                     lambda fn, *a: checkpoint(fn, *a, use_reentrant=False))
        with self._amp(z0.device):
            state = (self._layout(z0 / self.scale_factor),)
            for seg in segments:
                state = self._maybe_checkpoint(seg, *state)
                state = state if isinstance(state, tuple) else (state,)
        return state[0].float()

    def decoder_plan(self, z_shape):
        """The nested-checkpointing units of the decoder for latents of `z_shape` (revolve.plan, meta device)."""
        if z_shape not in self._plans:
            ae = build(self.prior.card["networks"]["autoencoder"], device="meta")
            z = torch.zeros(z_shape, device="meta", requires_grad=True)
            prof = revolve.profile(decoder_segments(ae, self.low_memory_norm), (z,), list(ae.parameters()))
            self._plans[z_shape] = revolve.plan(prof)
        return self._plans[z_shape]

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.memory_format is None else x.contiguous(memory_format=self.memory_format)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior mean latent of an image (1, 1, n...), times scale_factor (no gradient needed)."""
        with self._amp(x.device):
            mu, _ = self.ae.encode(x)
        return mu.float() * self.scale_factor

    # ---- diffusion ----
    def timesteps_pairs(self, timesteps: Sequence[int]):
        # the chain's last step stays on the schedule (to alpha_bar[0]), as InverseSR's does
        return ddim_pairs(list(timesteps), self.alpha_bar, final_alpha_bar=float(self.alpha_bar[0]))

    def eps(self, z_t: torch.Tensor, t: int, cond: Optional[torch.Tensor]) -> torch.Tensor:
        """The UNet's noise prediction; c goes in as channels and as cross-attention context, per the card."""
        return self._unet(*self._unet_inputs(z_t, t, cond))

    def _unet_inputs(self, z_t: torch.Tensor, t: int, cond: Optional[torch.Tensor]):
        x, context = z_t, None
        if cond is not None:
            c = cond.to(z_t.dtype).reshape(1, -1)
            if self.cond_as_channels:
                x = torch.cat([z_t, c.reshape(1, -1, 1, 1, 1).expand(z_t.shape[0], -1, *z_t.shape[2:])], dim=1)
            if self.cond_as_context:
                context = c.reshape(1, 1, -1).expand(z_t.shape[0], 1, -1)
        ts = torch.full((z_t.shape[0],), int(t), dtype=torch.long, device=z_t.device)
        return self._layout(x), ts, context

    def _unet(self, x: torch.Tensor, ts: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        with self._amp(x.device):
            out = self.unet(x, ts, context=context)
        return out.float()

    def ddim(self, z_T: torch.Tensor, cond: Optional[torch.Tensor], timesteps: Sequence[int]) -> torch.Tensor:
        """z_0 from z_T by the deterministic chain `timesteps` (descending)."""
        z = z_T
        pairs = self.timesteps_pairs(timesteps)
        runner = self._step_runner(z_T, cond, pairs)
        for t, ab_t, ab_prev in pairs:
            if runner is not None and runner.replays_itself:  # recomputes itself in backward: no checkpoint
                z = ddim_step(z, runner(*self._unet_inputs(z, t, cond)), ab_t, ab_prev)
                continue

            def step(z_t, c, t=t, ab_t=ab_t, ab_prev=ab_prev):
                inputs = self._unet_inputs(z_t, t, c)
                return ddim_step(z_t, runner(*inputs) if runner is not None else self._unet(*inputs), ab_t, ab_prev)

            z = self._maybe_checkpoint(step, z, cond)
        return z

    def _step_runner(self, z_T, cond, pairs):
        """The accelerated UNet call for this chain (acceleration.build, once per input signature), or None."""
        grad = torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in (z_T, cond))
        if not grad or self.accelerate == "off":
            return None
        if z_T.device not in self._modes:  # resolved (and any fallback warned about) once per device
            self._modes[z_T.device] = acceleration.resolve(self.accelerate, z_T.device, self.warn)
        mode = self._modes[z_T.device]
        if mode == "off":
            return None
        x, ts, context = self._unet_inputs(z_T, pairs[0][0], cond)
        key = (mode, acceleration.signature(x, ts, context))
        if key not in self._steps:
            amp = self.autocast if self.autocast is not None else z_T.device.type == "cuda"
            _, t_check, _ = self._unet_inputs(z_T, pairs[-1][0] if len(pairs) > 1 else pairs[0][0] // 2, cond)
            with torch.no_grad():
                self._steps[key] = acceleration.build(mode, self._unet, x, ts, context, t_check, amp, self.warn)
        return self._steps[key]

    @torch.no_grad()
    def invert(self, z_0: torch.Tensor, cond: Optional[torch.Tensor], timesteps: Sequence[int]) -> torch.Tensor:
        """z_T whose chain `timesteps` comes back to about z_0: the DDIM update run upwards (deterministic DDIM
        inversion, Song et al. 2021 sec. 4.3), with eps evaluated at the current, less noisy point."""
        z = z_0
        for t, ab_t, ab_prev in reversed(self.timesteps_pairs(timesteps)):
            z = ddim_step(z, self.eps(z, t, cond), ab_prev, ab_t)
        return z

    def __call__(self, z_T: torch.Tensor, cond: Optional[torch.Tensor], timesteps: Sequence[int]) -> torch.Tensor:
        return self.decode(self.ddim(z_T, cond, timesteps))
