"""Variational diffusion model (Kingma et al. 2021): learnable monotone gamma(t), loss, ancestral step.

Notation (code -> paper symbol):
    g, gamma(t)   -> gamma_eta(t), monotone in t in [0, 1]; SNR(t) = exp(-gamma(t))
    alpha2(g)     -> alpha_t^2 = sigmoid(-gamma_t)         (variance preserving: alpha^2 + sigma^2 = 1)
    sigma2(g)     -> sigma_t^2 = sigmoid(gamma_t)
    z             -> z_t = alpha_t x + sigma_t eps
    eps_hat       -> eps_theta(z_t; t), the network's noise prediction

Network input: [z_t, sin(2^n pi z_t), cos(2^n pi z_t) for n in `exponents`] (VDM appendix C: Fourier features
of the input help the fine scale at low noise); time embedding of 1000 * (gamma_t - gamma_0)/(gamma_1 - gamma_0).

Loss per sample (VDM eq. 17 in continuous time, plus the prior and reconstruction terms that train the endpoints):
    1. t ~ U[0, 1] (low-discrepancy over the batch), eps ~ N(0, I), z_t = alpha_t x + sigma_t eps
    2. diffusion = 0.5 * gamma'(t) * ||eps - eps_hat||^2
    3. prior = KL(q(z_1 | x) || N(0, I))
    4. recon = -log P(x | z_0) with a discretised Gaussian of bin `bin_width` around z_0 / alpha_0
Ancestral step s < t (VDM eq. 33/34), c = -expm1(gamma_s - gamma_t):
    z_s = (alpha_s / alpha_t) * (z_t - sigma_t * c * eps_hat) + sigma_s * sqrt(c) * noise
"""

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

GAMMA_MIN, GAMMA_MAX = -13.3, 5.0  # VDM's initial endpoints: SNR from e^13.3 down to e^-5
DEFAULT_EXPONENTS = (5, 6)
TABLE_SIZE = 1001


def alpha2(g):
    return torch.sigmoid(-g) if torch.is_tensor(g) else 1.0 / (1.0 + math.exp(g))


def sigma2(g):
    return torch.sigmoid(g) if torch.is_tensor(g) else 1.0 / (1.0 + math.exp(-g))


class _PositiveLinear(nn.Module):
    """Linear layer with softplus-positive weights: a non-decreasing map of its input."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) * 0.5)
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x):
        return F.linear(x, F.softplus(self.weight), self.bias)


class MonotoneGamma(nn.Module):
    """gamma(t) = g0 + (g1 - g0) * (h(t) - h(0)) / (h(1) - h(0)), h monotone (VDM's NoiseNet), g0 < g1 learnable."""

    def __init__(self, hidden: int = 64, gamma_min: float = GAMMA_MIN, gamma_max: float = GAMMA_MAX):
        super().__init__()
        if not gamma_min < gamma_max:
            raise ValueError("gamma_min must be below gamma_max")
        self.l1 = _PositiveLinear(1, 1)
        self.l2 = _PositiveLinear(1, hidden)
        self.l3 = _PositiveLinear(hidden, 1, bias=False)
        self.gamma_0 = nn.Parameter(torch.tensor(float(gamma_min)))
        self.log_span = nn.Parameter(torch.tensor(math.log(gamma_max - gamma_min)))  # keeps g1 > g0

    def _h(self, t):
        h = self.l1(t[..., None])
        return (h + self.l3(torch.sigmoid(self.l2(h)) - 0.5) / self.l2.weight.shape[0])[..., 0]

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        ends = self._h(torch.tensor([0.0, 1.0], dtype=t.dtype, device=t.device))
        frac = (self._h(t) - ends[0]) / (ends[1] - ends[0])
        return self.gamma_0 + torch.exp(self.log_span) * frac


class TabulatedGamma(nn.Module):
    """gamma(t) as a table on a uniform grid of [0, 1], linearly interpolated (monotone if the table is)."""

    def __init__(self, table: Sequence[float]):
        super().__init__()
        v = torch.as_tensor(list(table), dtype=torch.float64)
        if v.ndim != 1 or v.numel() < 2 or not bool(torch.isfinite(v).all()):
            raise InputError("The VDM gamma table in the model card is malformed.", "Re-export the prior.")
        if not bool((v[1:] >= v[:-1]).all()) or not v[-1] > v[0]:
            raise InputError("The VDM gamma table in the model card is not increasing.", "Re-export the prior.")
        self.register_buffer("table", v)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        n = self.table.numel() - 1
        u = t.to(torch.float64).clamp(0, 1) * n
        lo = u.floor().long().clamp(max=n - 1)
        w = u - lo
        table = self.table.to(t.device)
        return ((1 - w) * table[lo] + w * table[lo + 1]).to(t.dtype)


def tabulate(gamma: nn.Module, n: int = TABLE_SIZE) -> list:
    """gamma on n uniform points of [0, 1] (what a model card stores)."""
    dev = next(iter(list(gamma.parameters()) + list(gamma.buffers())), torch.empty(0)).device
    with torch.no_grad():
        v = gamma(torch.linspace(0, 1, n, device=dev)).double().cpu()
    return [float(a) for a in torch.cummax(v, 0).values]  # float32 noise must not break monotonicity


def fourier_features(z: torch.Tensor, exponents: Sequence[int]) -> torch.Tensor:
    """[z, sin(2^n pi z), cos(2^n pi z), ...] along the channel dim (dim 1)."""
    feats = [z]
    for n in exponents:
        h = z * (math.pi * 2.0 ** n)
        feats += [torch.sin(h), torch.cos(h)]
    return torch.cat(feats, 1)


class VDM:
    """A VDM denoiser: MONAI UNet + gamma + Fourier exponents. Holds no operator and no run state."""

    def __init__(self, unet: nn.Module, gamma: nn.Module, exponents: Sequence[int] = DEFAULT_EXPONENTS):
        self.unet = unet
        self.gamma = gamma
        self.exponents = tuple(int(e) for e in exponents)

    @classmethod
    def from_prior(cls, prior) -> "VDM":
        """From a loaded prior of kind "vdm": networks["unet"], and networks["gamma"] or card["vdm"]["gamma_table"]."""
        card = prior.card
        if card.get("kind") != "vdm":
            raise InputError("Prior '%s' is a %s prior; kspace-vdm needs a vdm prior." % (card.get("name"), card.get("kind")),
                             "Choose a vdm prior (see `models list`), e.g. one made by `train vdm`.")
        extra = card.get("vdm") or {}
        unet = prior.networks.get("unet")
        if unet is None:
            raise InputError("Prior '%s' has no 'unet' network." % card.get("name"), "Choose a VDM prior.")
        gamma = prior.networks.get("gamma")
        if gamma is None:
            if "gamma_table" not in extra:
                raise InputError("Prior '%s' gives no gamma schedule (vdm.gamma_table)." % card.get("name"),
                                 "Re-export the prior with `train vdm`.")
            gamma = TabulatedGamma(extra["gamma_table"])
        return cls(unet, gamma, extra.get("fourier_exponents", DEFAULT_EXPONENTS))

    @property
    def in_channels(self) -> int:
        return 1 + 2 * len(self.exponents)

    def ends(self, device=None):
        """(gamma(0), gamma(1)) as floats."""
        g = self.gamma(torch.tensor([0.0, 1.0], device=device)).detach()
        return float(g[0]), float(g[1])

    def eps(self, z: torch.Tensor, g: torch.Tensor, ends=None) -> torch.Tensor:
        """eps_hat for z (B, 1, ...) at log-noise g (B,) or scalar."""
        g0, g1 = ends if ends is not None else self.ends(z.device)
        g = torch.as_tensor(g, dtype=z.dtype, device=z.device).expand(z.shape[0])
        return self.unet(fourier_features(z, self.exponents), timesteps=1000.0 * (g - g0) / (g1 - g0))


def ancestral_step(z_t, eps_hat, g_t: float, g_s: float, noise: Optional[torch.Tensor]):
    """z_s from z_t (module docstring); noise None gives the mean (the last step)."""
    c = -math.expm1(g_s - g_t)
    a_t, a_s = math.sqrt(alpha2(g_t)), math.sqrt(alpha2(g_s))
    mean = (a_s / a_t) * (z_t - math.sqrt(sigma2(g_t)) * c * eps_hat)
    return mean if noise is None else mean + math.sqrt(sigma2(g_s) * c) * noise


def vdm_loss(model: VDM, x: torch.Tensor, generator: torch.Generator, bin_width: float = 2.0 / 255):
    """The VDM loss of a batch x (B, 1, ...) in [-1, 1]: (mean over the batch, per dimension; {part: float})."""
    b, dev = x.shape[0], x.device
    dims = x[0].numel()
    u0 = torch.rand((), generator=generator)
    t = ((u0 + torch.arange(b) / b) % 1.0).to(dev).requires_grad_(True)
    g = model.gamma(t)
    (dg,) = torch.autograd.grad(g.sum(), t, create_graph=True)
    eps = torch.randn(x.shape, generator=generator).to(dev)
    shape = (-1,) + (1,) * (x.ndim - 1)
    z = alpha2(g).sqrt().view(shape) * x + sigma2(g).sqrt().view(shape) * eps
    g0, g1 = model.ends(dev)
    eps_hat = model.unet(fourier_features(z, model.exponents), timesteps=1000.0 * (g.detach() - g0) / (g1 - g0))
    diffusion = 0.5 * dg * ((eps - eps_hat) ** 2).flatten(1).sum(1) / dims
    ends = model.gamma(torch.tensor([0.0, 1.0], device=dev))
    a1, s1 = alpha2(ends[1]), sigma2(ends[1])
    prior = 0.5 * (s1 + a1 * x ** 2 - torch.log(s1) - 1.0).flatten(1).mean(1)
    e0 = torch.randn(x.shape, generator=generator).to(dev)
    scale = torch.exp(0.5 * ends[0])  # sigma_0 / alpha_0
    mu = x + scale * e0  # z_0 / alpha_0
    hi = torch.special.ndtr((x + bin_width / 2 - mu) / scale)
    lo = torch.special.ndtr((x - bin_width / 2 - mu) / scale)
    recon = -torch.log((hi - lo).clamp_min(1e-12)).flatten(1).mean(1)
    total = (diffusion + prior + recon).mean()
    parts = {"diffusion": diffusion.mean(), "prior": prior.mean(), "recon": recon.mean(), "gamma_0": ends[0],
             "gamma_1": ends[1]}
    return total, {k: float(v.detach()) for k, v in parts.items()}


def default_unet(exponents: Sequence[int] = DEFAULT_EXPONENTS, channels=(32, 64, 64)) -> dict:
    """Kwargs of a small 2D MONAI DiffusionModelUNet for the VDM (epsilon prediction)."""
    groups = math.gcd(*channels) if len(channels) > 1 else channels[0]
    return {"spatial_dims": 2, "in_channels": 1 + 2 * len(exponents), "out_channels": 1, "channels": list(channels),
            "num_res_blocks": 1, "attention_levels": [False] * len(channels), "norm_num_groups": min(16, groups),
            "norm_eps": 1e-6, "resblock_updown": False, "num_head_channels": 8}
