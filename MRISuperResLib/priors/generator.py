"""A differentiable generator z_T -> DDIM chain -> decoder that fits in memory.

Notation: z_T initial noise latent (1, C, l_i, l_j, l_k); c conditioning values (n_c,) in [0, 1];
z_0 clean latent; x = D(z_0 / scale_factor) the image (1, 1, n_i, n_j, n_k) in the prior's intensity range.

1. for (t, ab_t, ab_prev) in the chain: eps = UNet([z_t, c broadcast as channels], t, context=c);
   z_prev = DDIM step (ddim.py). Each step is checkpointed: only z_t is kept, the step is recomputed
   during backward, so memory is one UNet step, not N of them.
2. x = decoder(z_0): checkpointed per segment, a segment being a decoder block or half a residual block
   (GroupNorm spans the whole volume, so tiling is not exact; recomputation is). Halving the residual blocks
   cuts the published decoder's recompute peak from 16 GB to about 7 GB (methods/inversesr/budget.py measures it).
On CUDA both run under bf16 autocast (fp32 on CPU); gradients and parameters stay fp32.
"""

import contextlib
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .ddim import ddim_pairs, ddim_step


def decoder_segments(ae) -> List[Callable]:
    """The decoder as a chain of functions, each of the previous one's outputs; a residual block
    (x -> shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))) becomes two, joined by the pair (x, h)."""
    segs = [ae.post_quant_conv]
    for block in ae.decoder.blocks:
        if all(hasattr(block, a) for a in ("norm1", "conv1", "norm2", "conv2", "nin_shortcut")):
            def first(x, b=block):
                return x, b.conv1(F.silu(b.norm1(x)))

            def second(x, h, b=block):
                return b.nin_shortcut(x) + b.conv2(F.silu(b.norm2(h)))

            segs += [first, second]
        else:
            segs.append(block)
    return segs


class LatentGenerator:
    """Wraps a loaded LDM prior; holds no optimisation state."""

    def __init__(self, prior, checkpointing: bool = True, autocast: Optional[bool] = None):
        self.prior = prior
        self.ae = prior.autoencoder
        self.unet = prior.unet
        self.checkpointing = checkpointing
        self.autocast = autocast
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
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def _maybe_checkpoint(self, fn, *args):
        if self.checkpointing and torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    # ---- decoder ----
    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """x = D(z_0 / scale_factor), (1, C, l...) -> (1, 1, n...), float32."""
        with self._amp(z0.device):
            state = (z0 / self.scale_factor,)
            for seg in decoder_segments(self.ae):
                state = self._maybe_checkpoint(seg, *state)
                state = state if isinstance(state, tuple) else (state,)
        return state[0].float()

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
        x, context = z_t, None
        if cond is not None:
            c = cond.to(z_t.dtype).reshape(1, -1)
            if self.cond_as_channels:
                x = torch.cat([z_t, c.reshape(1, -1, 1, 1, 1).expand(z_t.shape[0], -1, *z_t.shape[2:])], dim=1)
            if self.cond_as_context:
                context = c.reshape(1, 1, -1).expand(z_t.shape[0], 1, -1)
        ts = torch.full((z_t.shape[0],), int(t), dtype=torch.long, device=z_t.device)
        with self._amp(z_t.device):
            out = self.unet(x, ts, context=context)
        return out.float()

    def ddim(self, z_T: torch.Tensor, cond: Optional[torch.Tensor], timesteps: Sequence[int]) -> torch.Tensor:
        """z_0 from z_T by the deterministic chain `timesteps` (descending)."""
        z = z_T
        for t, ab_t, ab_prev in self.timesteps_pairs(timesteps):
            def step(z_t, c, t=t, ab_t=ab_t, ab_prev=ab_prev):
                return ddim_step(z_t, self.eps(z_t, t, c), ab_t, ab_prev)

            z = self._maybe_checkpoint(step, z, cond)
        return z

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
