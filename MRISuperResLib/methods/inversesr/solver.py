"""Shared loop of the InverseSR methods (Wang et al., MICCAI 2023): fit a latent so that the degraded output
matches the measurement.

Notation: y LR measurement (input units); A the bound operator; P centre crop/pad between the HR grid and
the prior's grid; N intensity map to the prior's range; G the generator (decoder, or DDIM chain + decoder);
w latent variables (z_0, or z_T and conditioning c); f = A^cubic-upsampled N(y), the fill outside the
prior's field of view.

1. y_n = N(y); check memory/time for the device (refuse with numbers if it cannot fit).
2. w_0: z_0 = encoder mean of P(f) ("encode") or Gaussian noise ("random"); z_T Gaussian ("random"), the DDIM
   inversion of the encoded P(f) ("invert"), or the encoded P(f) noised to the chain's first timestep t_0,
   sqrt(ab_t0) E(P(f)) + sqrt(1 - ab_t0) n with n Gaussian ("noise", as SDEdit starts); c = card default.
3. repeat `iterations` times (Adam, learning rate `lr`):
       x = P^-1(G(w), f);  loss = data_weight * mean|A x - y_n| + perceptual_weight * mean|E(U A x) - E(U y_n)|
   with E the first blocks of the prior's own encoder (no downloaded network) and U linear upsampling.
4. x = P^-1(G(w_last), f); optionally x <- x + A^+(y_n - A x) ("paste_observed"), or with paste_spread=linear
   x <- x + U (A U)^+ (y_n - A x), U linear interpolation (physics/operators.py).
5. Steps 2-4 run `samples` times from independently drawn starts; return N^-1 of their mean, and the std of the
   N^-1(x) as the uncertainty. The fit is far from unique between the observed slices, so one fit is one guess;
   the squared error of their mean is at most the guesses' average squared error, less by their variance.
"""

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch

from ...errors import InputError, ResourceError, UserError
from ...intensity import card_map
from ...priors import acceleration
from ...priors.ddim import ddim_timesteps
from ...priors.generator import LatentGenerator
from ...settings import SEED, Setting, SolveResult
from . import budget

PERCEPTUAL_BLOCKS = 2
LONG_RUN_S = 3600.0


# ---- P: the HR grid <-> the prior's grid ----
#
# The input is assumed to be in the prior's space already (MNI-aligned, same voxel size), with any size and field of
# view (native.py brings it there otherwise). Per axis the two grids are centre-aligned: with d = n_hr - n_prior,
#     d >= 0 (crop): prior[0:n_prior]          <-> hr[d//2 : d//2 + n_prior]
#     d <  0 (pad):  prior[-d//2 : -d//2 + n_hr] <-> hr[0:n_hr]
# HR voxels outside the prior's field of view keep a fill (the interpolated input).


@dataclass(frozen=True)
class CropPad:
    hr_shape: Tuple[int, int, int]
    prior_shape: Tuple[int, int, int]

    def _slices(self):
        hr, pr = [], []
        for n, p in zip(self.hr_shape, self.prior_shape):
            d = int(n) - int(p)
            if d >= 0:
                hr.append(slice(d // 2, d // 2 + p))
                pr.append(slice(0, p))
            else:
                hr.append(slice(0, n))
                pr.append(slice((-d) // 2, (-d) // 2 + n))
        return tuple(hr), tuple(pr)

    @property
    def identity(self) -> bool:
        return tuple(self.hr_shape) == tuple(self.prior_shape)

    def covered_fraction(self) -> float:
        """Share of HR voxels inside the prior's field of view."""
        hr, _ = self._slices()
        inside = 1
        for s in hr:
            inside *= s.stop - s.start
        total = 1
        for n in self.hr_shape:
            total *= n
        return inside / total

    def to_prior(self, x: torch.Tensor, background: float = 0.0) -> torch.Tensor:
        """(..., n_hr) -> (..., n_prior): crop, pad with `background`."""
        if self.identity:
            return x
        hr, pr = self._slices()
        out = x.new_full(tuple(x.shape[:-3]) + tuple(self.prior_shape), float(background))
        out[(Ellipsis,) + pr] = x[(Ellipsis,) + hr]
        return out

    def to_hr(self, x: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """(..., n_prior) -> (..., n_hr): the prior's voxels where it covers the HR grid, `fill` elsewhere."""
        if self.identity:
            return x
        hr, pr = self._slices()
        out = fill.to(x.dtype).expand(tuple(x.shape[:-3]) + tuple(self.hr_shape)).clone()
        out[(Ellipsis,) + hr] = x[(Ellipsis,) + pr]
        return out


def shape_of(seq: Sequence[int]) -> Tuple[int, int, int]:
    return tuple(int(s) for s in seq)


# ---- the fit ----


def check_prior(prior, method: str, chain: bool):
    if prior is None:
        raise UserError("Method %s needs a latent diffusion prior, and none was given." % method,
                        "Pass --model NAME or PATH (see `python -m MRISuperResLib models list`).")
    if getattr(prior, "kind", None) != "ldm" or prior.autoencoder is None:
        raise InputError("Method %s needs a latent diffusion ('ldm') prior; '%s' is a %s prior."
                         % (method, getattr(prior, "name", prior), getattr(prior, "kind", "unknown")),
                         "Choose an ldm prior (see `models list`).")
    if chain and prior.schedule.prediction != "epsilon":
        raise InputError("Prior '%s' predicts '%s'; the InverseSR DDIM chain needs a noise ('epsilon') predictor."
                         % (prior.name, prior.schedule.prediction), "Use an ldm prior trained with epsilon prediction.")
    if chain and prior.unet is None:
        raise InputError("Prior '%s' has no diffusion UNet, which %s needs." % (prior.name, method),
                         "Use inversesr-decoder, or an ldm prior with a UNet.")


def run(method: str, y, physics, prior, settings, progress, generator, chain: bool) -> SolveResult:
    """The fit of `method` (its name is for messages). chain: the generator runs the DDIM chain before the decoder
    (InverseSR(LDM): the variables are z_T and c), else it is the decoder alone (InverseSR(Decoder): z_0).
    Falls back to the CPU when the GPU runs out of memory."""
    check_prior(prior, method, chain)
    try:
        return _run(method, chain, y, physics, prior, settings, progress, generator)
    except torch.cuda.OutOfMemoryError:
        if y.device.type != "cuda":
            raise
        torch.cuda.empty_cache()
        progress.warning("The GPU ran out of memory (%s); continuing on the CPU, which is much slower."
                         % torch.cuda.get_device_name(y.device))
        prior.to("cpu")
        torch.cuda.empty_cache()
        result = _run(method, chain, y.to("cpu"), physics, prior, settings, progress, generator)
        result.info["device_fallback"] = "cpu"
        return result


def _estimate(method, prior, settings, device):
    """(estimate, nested): nested_checkpointing=auto turns it on only when the run would not fit without it."""
    def estimate(nested):
        return budget.estimate(prior.card, device, settings["iterations"] * settings.get("samples", 1),
                               settings.get("ddim_steps", 0), settings.get("checkpointing", True),
                               weights_resident=prior.device == device, nested_checkpointing=nested,
                               accelerate=acceleration.resolve(settings.get("accelerate", "off"), device))

    what, choice = "%s with prior '%s'" % (method, prior.name), settings.get("nested_checkpointing", "off")
    nested = choice == "on"
    est = estimate(nested)
    if choice == "auto" and settings.get("checkpointing", True):
        try:
            budget.check_fits(est, what)
        except ResourceError:
            nested, est = True, estimate(True)
    budget.check_fits(est, what)
    return est, nested


def _check_starts(settings) -> int:
    n, init = int(settings.get("samples", 1)), settings.get("init", "random")
    if n > 1 and init in ("encode", "invert"):
        raise InputError("init=%s starts every sample from the same latent, so samples=%d would repeat one fit."
                         % (init, n), "Use --set init=%s to average %d fits from different starts, or --set samples=1."
                         % ("noise" if init == "invert" else "random", n))
    return n


def _run(method, chain, y, physics, prior, settings, progress, generator) -> SolveResult:
    n_samples = _check_starts(settings)
    dev = y.device
    est, nested = _estimate(method, prior, settings, dev)
    progress(0, settings["iterations"] * n_samples, "estimated %s%s" % (
        est.describe(), ", with nested checkpointing of the decoder" if nested else ""))
    if est.total_seconds > LONG_RUN_S:
        progress.warning("This run is estimated to take %s on %s; fewer iterations or samples (--set iterations=N, "
                         "--set samples=N) or a GPU shorten it." % (budget.duration(est.total_seconds), dev))
    prior.to(dev)
    gen = LatentGenerator(prior, checkpointing=settings.get("checkpointing", True),
                          accelerate=settings.get("accelerate", "off"),
                          nested_checkpointing=nested, channels_last=settings.get("channels_last", False), warn=progress.warning)
    card = prior.card
    crop = CropPad(shape_of(physics.hr_shape), shape_of(card["grid"]["shape"]))
    if crop.covered_fraction() < 0.5:
        progress.warning("Only %.0f%% of the output grid lies inside the prior's %s field of view; the input "
                         "should be in the prior's space (%s, %s mm)." % (
                             100 * crop.covered_fraction(), "x".join(map(str, crop.prior_shape)),
                             card["grid"].get("space", "its space"), card["grid"].get("spacing", "?")))
    imap = card_map(y, card.get("intensity") or {})
    y_n = imap.to_prior(y.float())
    fill = physics.upsample(y_n, "cubic")
    background = float(imap.r0)
    timesteps = None
    if chain:
        timesteps = ddim_timesteps(settings["ddim_steps"], prior.schedule.num_train_timesteps,
                                   strength=settings.get("strength", 1.0))
        if settings.get("strength", 1.0) < 1.0 and settings.get("init", "random") == "random":
            progress.warning("strength %g starts the chain part-way down the schedule, where the latent is mostly "
                             "signal, but init=random starts it from pure noise; use --set init=invert (or "
                             "init=noise to average several samples)." % settings["strength"])
    encoded = None
    if settings.get("init", "random") in ("encode", "invert", "noise"):
        with torch.no_grad():
            encoded = gen.encode(crop.to_prior(fill, background)[None, None])
        if tuple(encoded.shape[1:]) != gen.latent_shape:
            raise InputError("The prior's encoder gives latents of shape %s, its card says %s."
                             % (tuple(encoded.shape), (1,) + gen.latent_shape), "Fix 'latent.shape' in the model card.")

    def to_hr(x_p):
        return crop.to_hr(x_p[0, 0], fill)

    encoder_feats = _perceptual(gen, crop, background) if settings.get("perceptual_weight", 0.0) > 0 else None
    target_feats = None
    if encoder_feats is not None:
        with torch.no_grad():
            target_feats = encoder_feats(physics.upsample(y_n, "linear"))

    mean = m2 = None
    loss_value, conds = float("nan"), []
    for s in range(n_samples):
        z, cond, synth = _start(chain, gen, settings, encoded, timesteps, generator, dev)
        loss_value = _fit(z, cond, synth, to_hr, physics, y_n, settings, encoder_feats, target_feats, progress,
                          s, n_samples)
        with torch.no_grad():
            x_hr = to_hr(synth())
            if settings.get("paste_observed", False):
                x_hr = physics.data_consistency(x_hr, y_n, settings.get("paste_spread", "none"))
            x = imap.to_input(x_hr).float()
        # Welford's running mean and sum of squared deviations: two volumes, whatever the sample count
        if mean is None:
            mean, m2 = x, torch.zeros_like(x)
        else:
            delta = x - mean
            mean = mean + delta / (s + 1)
            m2 = m2 + delta * (x - mean)
        if cond is not None:
            conds.append(cond.detach())
    extras = {"uncertainty": (m2 / (n_samples - 1)).sqrt()} if n_samples > 1 else {}
    info = {"prior": prior.name, "final_loss": loss_value, "estimate": est.to_json(), "samples": n_samples,
            "fov_coverage": round(crop.covered_fraction(), 4), "nested_checkpointing": nested,
            "intensity_map": {"lo": imap.lo, "hi": imap.hi, "range": [imap.r0, imap.r1]}}
    if conds:
        c = torch.stack(conds).mean(0)
        info["conditioning"] = dict(zip(card["conditioning"]["names"], [round(float(v), 4) for v in c]))
    return SolveResult(mean, extras, info)


def _start(chain, gen, settings, encoded, timesteps, generator, dev):
    """Step 2: the variables of one sample and the function that makes its image."""
    shape = (1,) + gen.latent_shape
    init = settings.get("init", "random")
    if not chain:
        z = encoded.clone() if init == "encode" else torch.randn(shape, generator=generator).to(dev)
        z.requires_grad_(True)
        return z, None, lambda: gen.decode(z)
    cond = None if gen.cond_default is None else gen.cond_default.to(dev).clone()
    if init == "invert":
        with torch.no_grad():
            z = gen.invert(encoded, cond, timesteps)
    elif init == "noise":
        ab = float(gen.alpha_bar[timesteps[0]])
        z = ab ** 0.5 * encoded + (1.0 - ab) ** 0.5 * torch.randn(shape, generator=generator).to(dev)
    else:
        z = torch.randn(shape, generator=generator).to(dev)
    z = z.detach().requires_grad_(True)
    if cond is not None and settings.get("optimise_conditioning", True):
        cond.requires_grad_(True)
    return z, cond, lambda: gen(z, cond, timesteps)


def _fit(z, cond, synth, to_hr, physics, y_n, settings, encoder_feats, target_feats, progress, sample, n_samples):
    """Step 3 for one sample; returns its last loss."""
    variables = [z] + ([cond] if cond is not None and cond.requires_grad else [])
    opt = torch.optim.Adam(variables, lr=settings["lr"])
    iters = settings["iterations"]
    loss_value = float("nan")
    for it in range(iters):
        opt.zero_grad(set_to_none=True)
        x_hr = to_hr(synth())
        ax = physics.forward(x_hr)
        data = (ax - y_n).abs().mean()
        loss = settings.get("data_weight", 1.0) * data
        extra = {"data": float(data.detach())}
        if encoder_feats is not None:
            perc = (encoder_feats(physics.upsample(ax, "linear")) - target_feats).abs().mean()
            loss = loss + settings["perceptual_weight"] * perc
            extra["perceptual"] = float(perc.detach())
        if not torch.isfinite(loss):
            raise UserError("The fit diverged at iteration %d (loss %s)." % (it + 1, float(loss)),
                            "Lower the learning rate, e.g. --set lr=%g." % (settings["lr"] / 10))
        loss.backward()
        opt.step()
        if cond is not None and cond.requires_grad:
            with torch.no_grad():
                cond.clamp_(0.0, 1.0)
        loss_value = float(loss.detach())
        label = "iteration %d/%d" % (it + 1, iters)
        if n_samples > 1:
            label = "sample %d/%d, %s" % (sample + 1, n_samples, label)
        progress(sample * iters + it + 1, iters * n_samples, label, loss=round(loss_value, 6), **extra)
    return loss_value


def _perceptual(gen: LatentGenerator, crop: CropPad, background: float):
    """Features of the prior's own encoder (first PERCEPTUAL_BLOCKS blocks) of an HR volume."""
    blocks = list(gen.ae.encoder.blocks)[:PERCEPTUAL_BLOCKS]

    def feats(x_hr: torch.Tensor) -> torch.Tensor:
        h = crop.to_prior(x_hr, background)[None, None]
        with gen._amp(h.device):
            for b in blocks:
                h = gen._maybe_checkpoint(b, h)
        return h.float()

    return feats


def common_settings(iterations: int, lr: float) -> list:
    return [
        Setting("iterations", "int", iterations, "Optimisation steps (the paper: 601).", min=1, max=100000),
        Setting("lr", "float", lr, "Adam learning rate (the paper: 0.07).", min=1e-6, max=10.0),
        Setting("data_weight", "float", 1.0, "Weight of the L1 data term over the observed voxels.", min=0.0),
        Setting("perceptual_weight", "float", 0.0, "Weight of a perceptual term on features of the prior's own "
                "encoder (no downloaded network); 0 turns it off.", min=0.0),
        Setting("paste_observed", "bool", False, "Put the observed data back into the result (x + A^+(y - Ax))."),
        Setting("paste_spread", "choice", "none", "How pasting treats the voxels between observed samples: 'none' "
                "leaves them (only the samples change); 'linear' spreads the correction between samples, which "
                "removes the generator's smooth errors and the stripes pasting alone leaves.",
                choices=("none", "linear")),
        Setting("samples", "int", 1, "Fits from independently drawn starts (init=noise or random); the output is "
                "their mean, their std the uncertainty.", min=1, max=1000),
        Setting("checkpointing", "bool", True, "Recompute activations in the backward pass to save memory."),
        Setting("nested_checkpointing", "choice", "auto", "Checkpoint groups of decoder blocks again (revolve): "
                "same gradients, less memory (published prior: about 3 GB less on a GPU, 6 GB on the CPU), about "
                "20% more decoder compute. 'auto' turns it on only when the run would not fit in memory without it.",
                choices=("auto", "on", "off")),
        Setting("channels_last", "bool", False, "Run the networks' 3D convolutions and their inputs in channels-last "
                "(NDHWC) layout, which GPU convolution kernels may prefer (on the CPU the weights already are); same "
                "values."),
        SEED,
    ]
