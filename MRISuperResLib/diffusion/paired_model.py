"""The paired conditional DDPM of paired-ddpm: conditioning on the operator, the model, its loss.

Notation (code -> paper symbol):
    ab[t]     -> bar-alpha_t of the cosine schedule (cosine.py)
    x0        -> the diffused target: the residual (x - up(y)) / residual_scale, x and up(y) in [-1, 1]
    up        -> the cubic B-spline upsampled input, concatenated to z_t (SR3-style conditioning)
    cond      -> the operator: one-hot of (kind, profile) + log factor per axis, as constant channels
    eps       -> eps_theta([z_t, up, cond], t)

Loss (DDPM eq. 14): t ~ U{0..T-1}, z_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, || eps - eps_theta ||^2.
Sampling: the DDIM chain of cosine.sampling_pairs, stepped by priors/ddim.ddim_step with eta and x0_hat clipped to
`PairedModel.clip` (methods/paired_ddpm.py).

Why 3D patches and not 2D slices: the operators degrade one axis (thick slices) or several (k-space), so
the network must see the degraded axis together with the sharp ones; a 3D patch does for every axis and
orientation, and patches (sliding window, patches.py) keep a whole 1 mm brain within CPU memory.
"""

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import InputError
from .cosine import DEFAULT_SCHEDULE, cosine_alpha_bar

CONDITION_NAMES = ("slice-removal", "thick-slice-gaussian", "thick-slice-box", "downsample", "kspace",
                   "log_factor_i", "log_factor_j", "log_factor_k")
# "sample" (x0) prediction: with few sampling steps (the CPU budget) the first step's x0 estimate is the network's
# regression of the residual itself, not (z - sqrt(1 - ab) eps) / sqrt(ab), which multiplies eps errors by ~30
# at the chain's start. Epsilon stays readable for priors trained that way.
PREDICTIONS = ("epsilon", "sample")
X0_CLIP_STD = 4.0


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
