"""Paired conditional DDPM: cosine schedule, DDIM step with eta, conditioning on the operator, loss.

Notation (code -> paper symbol):
    ab[t]     -> bar-alpha_t of the cosine schedule (Nichol & Dhariwal 2021, eq. 17, s = 0.008, beta <= 0.999)
    x0        -> the diffused target: the residual (x - up(y)) / residual_scale, x and up(y) in [-1, 1]
    up        -> the cubic B-spline upsampled input, concatenated to z_t (SR3-style conditioning)
    cond      -> the operator: one-hot of (kind, profile) + log factor per axis, as constant channels
    eps       -> eps_theta([z_t, up, cond], t)

Loss (DDPM eq. 14): t ~ U{0..T-1}, z_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, || eps - eps_theta ||^2.
DDIM step t -> t_prev (Song et al. 2021, eq. 12 and 16):
    1. x0_hat = (z_t - sqrt(1 - ab_t) eps) / sqrt(ab_t), clipped to the target's range (eps recomputed from it)
    2. s = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev)
    3. z_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - s^2) eps + s * noise
The last step goes to ab_prev = 1, i.e. returns x0_hat.

Why 3D patches and not 2D slices: the operators degrade one axis (thick slices) or several (k-space), so
the network must see the degraded axis together with the sharp ones; a 3D patch does for every axis and
orientation, and patches (sliding window, patches.py) keep a whole 1 mm brain within CPU memory.
"""

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import InputError
from ..priors.ddim import NoiseSchedule, ddim_timesteps

CONDITION_NAMES = ("slice-removal", "thick-slice-gaussian", "thick-slice-box", "downsample", "kspace",
                   "log_factor_i", "log_factor_j", "log_factor_k")
DEFAULT_SCHEDULE = {"type": "cosine", "num_train_timesteps": 1000, "prediction": "epsilon"}
# "sample" (x0) prediction: with few sampling steps (the CPU budget) the first step's x0 estimate is the network's
# regression of the residual itself, not (z - sqrt(1 - ab) eps) / sqrt(ab), which multiplies eps errors by ~30
# at the chain's start. Epsilon stays readable for priors trained that way.
PREDICTIONS = ("epsilon", "sample")


def cosine_alpha_bar(num_train_timesteps: int = 1000) -> torch.Tensor:
    """bar-alpha_t, t = 0 .. T-1, of the cosine schedule (float64)."""
    return NoiseSchedule(type="cosine", num_train_timesteps=int(num_train_timesteps)).alpha_bar()


X0_CLIP_STD = 4.0
START_ALPHA_BAR = 1e-3  # the chain starts at the last t with bar-alpha above this (see sampling_pairs)


def sampling_pairs(steps: int, alpha_bar: torch.Tensor) -> List[Tuple[int, float, float]]:
    """[(t, ab_t, ab_prev)] of an N-step DDIM chain from near T down to ~0; the last ab_prev is 1.

    The cosine schedule ends at bar-alpha ~ 2e-9, where x0_hat = (z - sqrt(1 - ab) eps) / sqrt(ab) multiplies
    any error of eps by ~20000; starting where bar-alpha >= 1e-3 (t ~ 970 of 1000) costs almost nothing (the
    signal there is 3% of the noise) and keeps the first estimate usable.
    """
    usable = int((alpha_bar >= START_ALPHA_BAR).nonzero().max()) + 1
    ts = ddim_timesteps(int(steps), usable)
    out = []
    for i, t in enumerate(ts):
        ab_prev = float(alpha_bar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        out.append((int(t), float(alpha_bar[t]), ab_prev))
    return out


def ddim_step(z_t, eps, ab_t: float, ab_prev: float, eta: float = 0.0, noise=None, clip=None):
    """One DDIM update with stochasticity eta (module docstring, steps 1-3).

    clip: bound on |x0_hat| (the target's known range). Near t = T, 1/sqrt(ab_t) amplifies any error of eps a
    hundredfold; clipping x0_hat and recomputing eps from it (as diffusers' DDIM does) keeps z in range.
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


def condition_vector(kind: str, profile: str, factors: Sequence[float]) -> torch.Tensor:
    """The operator as CONDITION_NAMES values: one-hot kind(+profile), then log(factor) per axis."""
    key = "thick-slice-%s" % profile if kind == "thick-slice" else kind
    if key not in CONDITION_NAMES[:5]:
        raise InputError("Operator %s is unknown to the paired model." % kind, "Use one of the built-in operators.")
    v = [1.0 if key == n else 0.0 for n in CONDITION_NAMES[:5]]
    v += [math.log(max(float(f), 1.0)) for f in factors]
    return torch.tensor(v, dtype=torch.float32)


def condition_of(physics) -> torch.Tensor:
    return condition_vector(physics.spec.kind, physics.spec.profile, physics.factors)


class PairedModel:
    """A paired conditional DDPM: 3D MONAI UNet on patches of [z_t, up, cond channels]. No run state."""

    def __init__(self, unet: nn.Module, patch: Sequence[int], residual_scale: float = 1.0,
                 alpha_bar: torch.Tensor = None, prediction: str = "epsilon"):
        if prediction not in PREDICTIONS:
            raise InputError("The paired model predicts %r; known: %s." % (prediction, ", ".join(PREDICTIONS)),
                             "Fix 'schedule.prediction' in the model card.")
        self.prediction = prediction
        self.unet = unet
        self.patch = tuple(int(p) for p in patch)
        self.residual_scale = float(residual_scale)
        self.alpha_bar = cosine_alpha_bar() if alpha_bar is None else alpha_bar
        if self.residual_scale <= 0:
            raise InputError("The paired model's residual_scale must be positive.", "Fix the model card.")

    @classmethod
    def from_prior(cls, prior) -> "PairedModel":
        card = prior.card
        if card.get("kind") != "paired":
            raise InputError("Prior '%s' is a %s prior; paired-ddpm needs a paired prior."
                             % (card.get("name"), card.get("kind")),
                             "Choose a paired prior (see `models list`), e.g. one made by `train paired`.")
        extra = card.get("paired") or {}
        unet = prior.networks.get("unet")
        if unet is None or "patch" not in extra:
            raise InputError("Prior '%s' is not a paired model (needs networks.unet and paired.patch)."
                             % card.get("name"), "Choose a paired prior, e.g. one made by `train paired`.")
        sched = dict(DEFAULT_SCHEDULE)
        sched.update(card.get("schedule") or {})
        if sched.get("type") != "cosine" or sched.get("prediction", "epsilon") not in PREDICTIONS:
            raise InputError("Prior '%s' uses schedule %s (prediction %s); paired-ddpm needs a cosine schedule "
                             "predicting %s." % (card.get("name"), sched.get("type"), sched.get("prediction"),
                                                 " or ".join(PREDICTIONS)), "Choose a prior made by `train paired`.")
        return cls(unet, extra["patch"], extra.get("residual_scale", 1.0),
                   cosine_alpha_bar(sched.get("num_train_timesteps", 1000)), sched.get("prediction", "epsilon"))

    @property
    def clip(self) -> float:
        """|x0| bound in the target's own units: x0 has unit variance by construction (residual_scale is its std),
        and residuals beyond 4 std are rare edges. A bound in image units (|x - up| <= 2) would be ~30 std and
        let early, noise-dominated estimates through."""
        return min(X0_CLIP_STD, 2.0 / self.residual_scale)

    def raw(self, z: torch.Tensor, up: torch.Tensor, cond: torch.Tensor, t) -> torch.Tensor:
        """The network's own output (eps or x0, per `prediction`) for z, up (B, 1, *patch), cond (B, n), t."""
        chans = cond.to(z)[:, :, None, None, None].expand(-1, -1, *z.shape[2:])
        t = torch.as_tensor(t, device=z.device).expand(z.shape[0])
        return self.unet(torch.cat([z, up, chans], 1), timesteps=t)

    def eps(self, z: torch.Tensor, up: torch.Tensor, cond: torch.Tensor, t) -> torch.Tensor:
        """eps_theta for z, up (B, 1, *patch) and cond (B, len(CONDITION_NAMES)) at integer timestep(s) t."""
        out = self.raw(z, up, cond, t)
        if self.prediction == "epsilon":
            return out
        ab = self.alpha_bar.to(z.device, z.dtype)[torch.as_tensor(t, device=z.device).long()]
        ab = ab.reshape(-1, *([1] * (z.ndim - 1))) if ab.ndim else ab
        return (z - ab.sqrt() * out) / (1 - ab).sqrt()


HIGH_T_FROM = 0.9  # "high" timesteps: the last 10% of the schedule, where a short DDIM chain starts


def paired_loss(model: PairedModel, hr: torch.Tensor, up: torch.Tensor, cond: torch.Tensor,
                generator: torch.Generator, high_t_fraction: float = 0.0, timesteps: Optional[Sequence[int]] = None):
    """MSE of the network's target (eps, or x0 for sample prediction) for HR patches hr and their upsampled
    inputs up (B, 1, *patch), both in [-1, 1].

    high_t_fraction: share of the draws taken from the last 10% of timesteps instead of all of them. A 1-step
    chain uses only its first x0 estimate, a plain regression of the residual from the upsampled input, which
    uniform draws train in one step out of ten. timesteps: draw t from these only (a known sampling chain's).
    """
    b, dev = hr.shape[0], hr.device
    ab = model.alpha_bar.to(dev, torch.float32)
    n = ab.numel()
    t = torch.randint(0, n, (b,), generator=generator)
    if high_t_fraction > 0:
        high = torch.rand(b, generator=generator) < high_t_fraction
        t = torch.where(high, torch.randint(int(HIGH_T_FROM * n), n, (b,), generator=generator), t)
    if timesteps is not None:
        pool = torch.as_tensor(list(timesteps), dtype=torch.long)
        t = pool[torch.randint(0, pool.numel(), (b,), generator=generator)]
    t = t.to(dev)
    eps = torch.randn(hr.shape, generator=generator).to(dev)
    x0 = (hr - up) / model.residual_scale
    a = ab[t].view(-1, *([1] * (hr.ndim - 1)))
    z = a.sqrt() * x0 + (1 - a).sqrt() * eps
    target = eps if model.prediction == "epsilon" else x0
    mse = torch.mean((model.raw(z, up, cond, t) - target) ** 2)
    return mse, {"%s_mse" % ("eps" if model.prediction == "epsilon" else "x0"): float(mse.detach()),
                 "t_mean": float(t.float().mean())}


def default_unet(channels=(16, 32, 64)) -> dict:
    """Kwargs of a small 3D MONAI DiffusionModelUNet for the paired model."""
    groups = math.gcd(*channels) if len(channels) > 1 else channels[0]
    return {"spatial_dims": 3, "in_channels": 2 + len(CONDITION_NAMES), "out_channels": 1,
            "channels": list(channels), "num_res_blocks": 1, "attention_levels": [False] * len(channels),
            "norm_num_groups": min(16, groups), "norm_eps": 1e-6, "resblock_updown": False, "num_head_channels": 8}
