"""k-space guided variational diffusion (ISMRM 2023, abstract 0163): VDM ancestral sampling with the measured
central k-space mixed in at every step.

Notation: y the LR measurement (central k-space block, in image space), A the core's k-space operator,
A^+ its pseudo-inverse, P = A^+ A (the orthogonal projector onto the measured subspace), g_t = gamma(t),
alpha_t^2 = sigmoid(-g_t), sigma_t^2 = sigmoid(g_t), lambda the mixing weight.

1. scale y to [-1, 1] (robust percentiles); pick the slicing axis so every 2D slice holds all truncated axes
2. z_1 ~ N(0, I) on the HR grid, `samples` chains side by side
3. for i = N .. 1 with t = i/N, s = (i-1)/N:
   a. y_t = alpha_t y + sigma_t A eps'                    (measurement brought to the noise level, eps' fresh)
   b. z_t <- z_t + lambda A^+ (y_t - A z_t)               (mix on the measured part, keep the rest)
   c. eps_hat = UNet(z_t, g_t) over the slices, batched
   d. z_s = ancestral VDM step (diffusion/vdm.py)
4. mix y_0 once more; x = z_0 / alpha_0; with `project`, x <- x + A^+ (y - A x) (then A x = y exactly)
5. back to input units; the mean over samples is the output, their std the uncertainty.

Equivalence with the k-space formulation. Along a truncated axis with odd m, the operator's matrix is
A = (m/n) F_m^-1 Phi C F_n: F the DFT, C keeps the m central frequencies, Phi a linear phase (the LR samples sit
at HR index j f + (f-1)/2). So A A^T = (m/n) I, A^+ = (n/m) A^T, and P = F_n^-1 C^T C F_n keeps the central band.
Its prior is 2D, not bound to a grid: it runs on the input's own HR grid, with no registration (native.py).
Step 3b is then, in k-space: on the measured band K(z) <- lambda K_t + (1 - lambda) K(z), where K_t is the
LR spectrum of y_t times n/m with the phase undone (this scaling makes DC, hence the mean, equal on both
grids), and outside the band K(z) is unchanged. lambda = 1 is hard data consistency. For even m the
Nyquist bin is split between +-m/2 (a real operator); A^+ is still exact and P still an orthogonal projector.

Why fresh noise eps' in 3a: P is an orthogonal projector, so for eps ~ N(0, I) the parts P eps and (I - P) eps
are independent. Replacing P z_t by alpha_t A^+ y + sigma_t P eps' therefore gives the measured part exactly the
forward marginal q(P z_t | A x = y), independent of the unmeasured part as under q. Reusing the network's
eps_hat instead would tie the injected noise to the network's error. A z_t = y_t holds in closed form when
z_t = alpha_t x + sigma_t eps' with A x = y (tested).
"""

import math

import torch

from ..diffusion.noise import sample_noise
from ..diffusion.vdm import VDM, alpha2, ancestral_step, sigma2
from ..errors import InputError
from ..intensity import robust_scale
from ..orientation import apply_reorientation, network_view, undo_reorientation
from ..priors.reference import card_direction
from .registry import SEED, Setting, SolveResult, register

SETTINGS = [
    Setting("steps", "int", 50, "Ancestral sampling steps (more: slower, closer to the prior).", min=1, max=5000),
    Setting("lambda", "float", 1.0, "Weight of the measured k-space mixed in at every step (1: hard consistency).",
            min=0.0, max=1.0),
    Setting("project", "bool", True, "Finish with a hard projection onto the measurement (output reproduces the "
            "input exactly)."),
    Setting("samples", "int", 1, "Samples; the output is their mean, their std the uncertainty map.",
            min=1, max=64),
    # Measured on a held-out tuning head at 4x (T1-like, 16 slices): 2 samples in pairs +1.43 dB over sinc, 2
    # independent +0.97, 4 independent +1.21 (docs/benchmarks.md).
    Setting("antithetic", "bool", True, "Draw every noise of the samples in opposite pairs (z, -z), which "
            "cancels much of the sampling noise in their mean; each sample is still a valid draw, so their spread "
            "is still the uncertainty map. Off: independent samples."),
    Setting("batch", "int", 16, "Slices per network call (lower it if memory runs out).", min=1, max=4096),
    SEED,
]


def measurement_at_level(y, physics, g: float, eps):
    """y_t = alpha_t y + sigma_t A eps (step 3a)."""
    return math.sqrt(alpha2(g)) * y + math.sqrt(sigma2(g)) * physics.forward(eps)


def mix(z, y_t, physics, lam: float):
    """z + lambda A^+ (y_t - A z) (step 3b): lambda y_t + (1 - lambda) A z on the measured part."""
    return z + lam * physics.dagger(y_t - physics.forward(z))


def slice_axis(physics) -> int:
    """The axis to slice along: every 2D slice must contain every truncated axis."""
    axes = tuple(physics.axes)
    if len(axes) == 3:
        raise InputError("k-space truncation along all three axes cannot be handled by a 2D prior over slices.",
                         "Truncate one or two axes (--axis 0 1), or use the paired-ddpm method.")
    return max(a for a in range(3) if a not in axes)


def predict_eps(model: VDM, z, g: float, ends, axis: int, batch: int):
    """eps_hat for z (S, n_i, n_j, n_k): the 2D network over slices perpendicular to `axis`, `batch` at a time."""
    net_dev = next(model.unet.parameters()).device
    zz = torch.movedim(z, axis + 1, 1)
    shape = zz.shape
    flat = zz.reshape(-1, 1, shape[2], shape[3])
    mult = 2 ** (len(getattr(model.unet, "block_out_channels", (0, 0, 0, 0))) - 1)
    ph, pw = (-shape[2]) % mult, (-shape[3]) % mult
    out = []
    for i in range(0, flat.shape[0], batch):
        chunk = flat[i:i + batch].to(net_dev)
        if ph or pw:
            chunk = torch.nn.functional.pad(chunk, (0, pw, 0, ph), mode="replicate")
        e = model.eps(chunk, g, ends)[..., :shape[2], :shape[3]]
        out.append(e.to(z.device, z.dtype))
    return torch.movedim(torch.cat(out, 0).reshape(shape), 1, axis + 1)


@register("kspace-vdm", "k-space guided VDM",
          "Variational diffusion prior over slices, sampled with the measured central k-space mixed in at every "
          "step (k-space truncation).", settings=SETTINGS, generative=True, needs_prior="vdm",
          operators=("kspace",), gate=("kspace-4x",))
def solve(y, physics, prior, settings, progress, generator):
    if prior is None:
        raise InputError("kspace-vdm needs a VDM prior.", "Give --model NAME|PATH of a prior made by `train vdm`.")
    if physics.spec.kind != "kspace":
        raise InputError("kspace-vdm works on k-space truncation, not %s." % physics.spec.kind,
                         "Use --operator kspace, or a method built for this degradation (e.g. paired-ddpm).")
    model = VDM.from_prior(prior)
    axis = slice_axis(physics)
    # The network sees the slices as its training heads were stored (measured: a head stored posterior-first lost
    # 0.04 dB at 4x, docs/benchmarks.md); exact flips and axis swaps, undone on its answer
    perm, flips, codes = network_view(card_direction(prior.card), getattr(physics, "hr_direction", None))
    steps, lam, n_samples = int(settings["steps"]), float(settings["lambda"]), int(settings["samples"])
    scale = robust_scale(y)
    dev, dtype = y.device, torch.float32

    def randn(shape):
        # drawn in the network's view, so the same scan stored another way gets the same noise, hence answer
        view = shape[:1] + tuple(shape[1 + a] for a in perm)
        return undo_reorientation(sample_noise(view, generator, bool(settings.get("antithetic")), dev, dtype),
                                  perm, flips)

    hr = (n_samples,) + tuple(physics.hr_shape)
    with torch.no_grad():  # sampling only: nothing here is differentiated
        yn = scale.to_prior(y.to(dtype))
        net_dev = next(model.unet.parameters()).device
        ends = model.ends(net_dev)
        gammas = model.gamma(torch.linspace(0, 1, steps + 1, device=net_dev)).double().tolist()
        z = randn(hr)
        for i in range(steps, 0, -1):
            g_t, g_s = gammas[i], gammas[i - 1]
            if lam > 0:
                z = mix(z, measurement_at_level(yn, physics, g_t, randn(hr)), physics, lam)
            eps_hat = undo_reorientation(predict_eps(model, apply_reorientation(z, perm, flips), g_t, ends,
                                                     perm.index(axis), int(settings["batch"])), perm, flips)
            z = ancestral_step(z, eps_hat, g_t, g_s, randn(hr))
            progress(steps - i + 1, steps, "VDM sampling, step %d of %d" % (steps - i + 1, steps))
        if lam > 0:
            z = mix(z, measurement_at_level(yn, physics, gammas[0], randn(hr)), physics, lam)
        x = z / math.sqrt(alpha2(gammas[0]))
        if settings["project"]:
            x = physics.data_consistency(x, yn)
        out = scale.to_input(x)
        extras = {}
        if n_samples > 1:
            extras["uncertainty"] = out.std(0)
    info = {"slice_axis": axis, "view": codes,
            "samples": n_samples, "intensity_scale": [scale.lo, scale.hi],
            "gamma_range": list(ends)}
    return SolveResult(out.mean(0), extras, info)
