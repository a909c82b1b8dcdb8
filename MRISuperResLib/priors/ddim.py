"""Noise schedules and the DDIM step (Song et al. 2021), owned here: every DDIM sampler steps with `ddim_step`
over the (t, ab_t, ab_prev) pairs of `ddim_pairs`.

Notation (code -> paper symbol):
    alpha_bar[t]  -> bar-alpha_t, the cumulative product of (1 - beta_s) for s <= t (t = 0 .. T-1)
    z_t           -> x_t, the noisy latent (or image) at timestep t
    eps           -> epsilon_theta(x_t, t), the network's noise prediction
    x0_hat        -> f_theta(x_t) = (x_t - sqrt(1 - bar-alpha_t) eps) / sqrt(bar-alpha_t)   (DDIM eq. 9)

One step t -> t_prev (DDIM eq. 12 and 16):
    1. x0_hat = (z_t - sqrt(1 - ab_t) eps) / sqrt(ab_t); with a clip, clipped to [-clip, clip] and eps recomputed
       from it
    2. s = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev)   (0 for the deterministic chain)
    3. z_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - s^2) eps + s * noise
The last step's ab_prev is an explicit choice of the sampler (`ddim_pairs(final_alpha_bar=...)`): alpha_bar[0] for
the InverseSR chain (as InverseSR and MONAI's `set_alpha_to_one=False`), 1 for the paired sampler (which returns
x0_hat itself).

We keep the (t, t_prev) pairs explicit because MONAI 1.6's `DDIMScheduler.set_timesteps` builds a linspace
grid while its `step` assumes a fixed stride, so its chains differ from the ones the published work used.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from ..errors import InputError

SCHEDULES = ("scaled_linear_beta", "linear_beta", "cosine")
# the LDM chain needs epsilon (methods/inversesr/solver.check_prior); the paired model may predict x0
PREDICTIONS = ("epsilon", "sample")


@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule of a prior (model card "schedule")."""

    type: str = "scaled_linear_beta"
    num_train_timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0205
    prediction: str = "epsilon"

    def __post_init__(self):
        if self.type not in SCHEDULES:
            raise InputError("Unknown noise schedule '%s' in the model card." % self.type,
                             "Use one of: %s." % ", ".join(SCHEDULES))
        if self.prediction not in PREDICTIONS:
            raise InputError("Prediction type '%s' is not supported." % self.prediction,
                             "Use one of: %s." % ", ".join(PREDICTIONS))
        if int(self.num_train_timesteps) < 2:
            raise InputError("num_train_timesteps must be at least 2.", "Fix the model card's schedule.")

    @classmethod
    def from_card(cls, d: Optional[dict]) -> "NoiseSchedule":
        d = dict(d or {})
        known = {"type", "num_train_timesteps", "beta_start", "beta_end", "prediction"}
        return cls(**{k: v for k, v in d.items() if k in known})

    def alpha_bar(self) -> torch.Tensor:
        """bar-alpha_t for t = 0 .. T-1, float64 (same formulas as MONAI's NoiseSchedules)."""
        n = int(self.num_train_timesteps)
        if self.type == "linear_beta":
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float64)
        elif self.type == "scaled_linear_beta":
            betas = torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=torch.float64) ** 2
        else:  # cosine, Nichol & Dhariwal 2021, s = 0.008, betas clipped at 0.999
            s = 8e-3
            x = torch.linspace(0, n, n + 1, dtype=torch.float64)
            ab = torch.cos((x / n + s) / (1 + s) * math.pi * 0.5) ** 2
            ab = ab / ab[0]
            betas = torch.clip(1.0 - ab[1:] / ab[:-1], 0.0, 0.999)
        return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000, stride: Optional[int] = None,
                   offset: Optional[int] = None, strength: float = 1.0) -> List[int]:
    """Descending timesteps of an N-step chain: offset + stride * (N-1), ..., offset.

    Default stride spreads the chain from `offset` up to just below strength * T; with N = 46, T = 1000 and
    strength 1 this is InverseSR's chain 991, 969, ..., 23, 1 (stride 22, offset 1). A strength below 1 starts
    the chain from a partly noised latent (as diffusers' img2img does): few steps then still invert and
    regenerate a latent closely, where a few long strides across the whole schedule do not.
    """
    n, big_t = int(steps), int(num_train_timesteps)
    if not 0.0 < float(strength) <= 1.0:
        raise InputError("The chain's strength must be in (0, 1], got %g." % strength,
                         "Use e.g. --set strength=0.3, or 1 for the whole chain.")
    top = max(1, min(big_t - 1, int(round(float(strength) * (big_t - 1)))))
    if not 1 <= n <= top + 1:
        raise InputError("DDIM steps must be between 1 and %d, got %d." % (top + 1, n),
                         "Use e.g. --set ddim_steps=%d." % min(46, top + 1))
    if n == 1:
        return [top]
    if offset is None:
        offset = 1 if n <= top else 0
    if stride is None:
        stride = max(1, (top - offset) // (n - 1))
    ts = [offset + stride * i for i in range(n)]
    if ts[-1] >= big_t or ts[0] < 0:
        raise InputError("DDIM chain %d..%d falls outside 0..%d." % (ts[0], ts[-1], big_t - 1), "")
    return ts[::-1]


def inversesr_timesteps() -> List[int]:
    """The published InverseSR chain: t = 991, 969, ..., 23, 1."""
    return ddim_timesteps(46, 1000, stride=22, offset=1)


def ddim_pairs(timesteps: Sequence[int], alpha_bar: torch.Tensor,
               final_alpha_bar: float) -> List[Tuple[int, float, float]]:
    """[(t, ab_t, ab_prev)] for a descending chain; `final_alpha_bar` is the last step's ab_prev (module docstring):
    alpha_bar[0] stays on the schedule, 1.0 ends on the clean estimate."""
    out = []
    for i, t in enumerate(timesteps):
        ab_prev = alpha_bar[timesteps[i + 1]] if i + 1 < len(timesteps) else final_alpha_bar
        out.append((int(t), float(alpha_bar[t]), float(ab_prev)))
    return out


def ddim_step(z_t: torch.Tensor, eps: torch.Tensor, ab_t: float, ab_prev: float, eta: float = 0.0, noise=None,
              clip: Optional[float] = None) -> torch.Tensor:
    """One DDIM update (steps 1-3 of the module docstring); deterministic with eta = 0, and differentiable.

    noise: the fresh draw an eta > 0 step needs. clip: bound on |x0_hat| (the target's known range); near t = T,
    1/sqrt(ab_t) amplifies any error of eps a hundredfold, and clipping x0_hat and recomputing eps from it (as
    diffusers' DDIM does) keeps z in range. Run upwards (ab_t and ab_prev swapped), the same update is DDIM
    inversion.
    """
    x0_hat = (z_t - math.sqrt(1.0 - ab_t) * eps) / math.sqrt(ab_t)
    if clip is not None:
        x0_hat = x0_hat.clamp(-clip, clip)
        eps = (z_t - math.sqrt(ab_t) * x0_hat) / math.sqrt(1.0 - ab_t)
    s = 0.0
    if eta > 0 and ab_prev < 1.0:
        s = eta * math.sqrt((1.0 - ab_prev) / (1.0 - ab_t)) * math.sqrt(max(0.0, 1.0 - ab_t / ab_prev))
    z = math.sqrt(ab_prev) * x0_hat + math.sqrt(max(0.0, 1.0 - ab_prev - s * s)) * eps
    if s > 0:
        if noise is None:
            raise ValueError("eta > 0 needs noise")
        z = z + s * noise
    return z
