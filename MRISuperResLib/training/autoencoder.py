"""`train autoencoder`: MONAI AutoencoderKL on synthetic brains, L1 + KL (+ optional edge) loss.

Per step:
    1. draw `batch_size` training seeds from the step's generator; render each brain (or a patch)
    2. x_hat, mu, sigma = AE(x)
    3. loss = |x_hat - x|_1 + kl_weight * KL(N(mu, sigma^2) || N(0, 1)) + edge_weight * |grad x_hat - grad x|_1
No adversarial or downloaded perceptual network: the edge term (finite differences) is what keeps
edges sharp at no cost.
"""

from dataclasses import fields
from typing import Dict, Sequence

import torch

from ..errors import InputError
from .synth import HELDOUT_START, BrainSynth, SynthConfig
from .trainer import psnr

DEFAULT_AE = {
    "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": [8, 16, 32, 64], "latent_channels": 3,
    "num_res_blocks": 1, "norm_num_groups": 8, "norm_eps": 1e-6, "attention_levels": [False, False, False, False],
    "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False,
}


LOG_VAR_INIT = -8.0


def build_autoencoder(kwargs: dict):
    from monai.networks.nets import AutoencoderKL

    try:
        return AutoencoderKL(**kwargs)
    except (ValueError, TypeError, AssertionError) as exc:
        raise InputError("The autoencoder settings are not valid: %s." % str(exc).rstrip("."),
                         "Check --channels/--norm-groups (groups must divide every channel count).") from None


def downsampling_factor(kwargs: dict) -> int:
    return 2 ** (len(kwargs["channels"]) - 1)


def kl_divergence(mu, sigma):
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent voxels, mean over the batch."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2).clamp_min(1e-12)) - 1.0)
    return kl.flatten(1).sum(1).mean()


def edge_l1(a, b):
    loss = 0.0
    for d in (2, 3, 4):
        loss = loss + (torch.diff(a, dim=d) - torch.diff(b, dim=d)).abs().mean()
    return loss / 3.0


def synth_from_options(options: dict) -> BrainSynth:
    # every option the run recorded, so a new generator option needs no change here; older runs lack the newer
    # ones and get their defaults
    known = {f.name for f in fields(SynthConfig)}
    return BrainSynth(SynthConfig(**{k: v for k, v in options["synth"].items() if k in known}))


def draw_train_seeds(generator: torch.Generator, count: int, pool: int = 0):
    """Training seeds (below HELDOUT_START); `pool` > 0 restricts them to the first `pool` seeds."""
    top = pool if pool else HELDOUT_START
    return [int(s) for s in torch.randint(0, top, (count,), generator=generator)]


def reconstruction_scores(ae, x, mu, mask):
    """(L1, PSNR, PSNR inside `mask`) of the autoencoder's decoding of the posterior mean `mu` against `x`."""
    recon = ae.decode(mu).clamp(0, 1)
    m = mask.to(x.device)
    return float((recon - x).abs().mean()), psnr(recon, x), psnr(recon[0, 0][m], x[0, 0][m])


class AutoencoderTask:
    name = "autoencoder"

    def __init__(self, options: dict, device):
        self.options = options
        self.device = torch.device(device)
        self.synth = synth_from_options(options)
        f = downsampling_factor(options["network"])
        patch = options.get("patch")
        check = patch if patch else self.synth.shape
        if any(int(n) % f for n in check):
            raise InputError("Patch/grid size %s is not a multiple of the autoencoder's factor %d." % (tuple(check), f),
                             "Use sizes divisible by %d (for example --patch %d %d %d)." % (f, 8 * f, 8 * f, 8 * f))
        self.ae = build_autoencoder(options["network"]).to(self.device)
        self.deterministic = not options.get("sample_posterior", True)
        with torch.no_grad():
            # A fresh encoder's posterior std starts near 1, which drowns its still tiny means and stalls the
            # first thousand steps; start it small (a resumed run loads its own value over this).
            self.ae.quant_conv_log_sigma.conv.bias.fill_(LOG_VAR_INIT)
            if self.deterministic:
                # Adam moves every weight at about the learning rate whatever its gradient's size, so even a 1e-6
                # KL pulls the posterior std to ~0.5 within a few hundred steps and the noise then swamps the
                # means. The methods use the mean latent only: fix the std at ~0 (exp(-15)) and train on mu.
                self.ae.quant_conv_log_sigma.conv.weight.zero_()
                self.ae.quant_conv_log_sigma.conv.bias.fill_(-30.0)
        if self.deterministic:
            for prm in self.ae.quant_conv_log_sigma.parameters():
                prm.requires_grad_(False)

    @staticmethod
    def default_options(network=None, synth=None, patch=(64, 64, 64), batch_size=1, kl_weight=1e-6,
                        edge_weight=0.5, pool=0, sample_posterior=False) -> dict:
        return {"network": dict(network or DEFAULT_AE),
                "synth": dict(synth or {"shape": [160, 224, 160], "orientation": "LAS", "downsample": 1, "head": True}),
                "patch": list(patch) if patch else None, "batch_size": int(batch_size),
                "kl_weight": float(kl_weight), "edge_weight": float(edge_weight), "pool": int(pool),
                "sample_posterior": bool(sample_posterior)}

    def modules(self) -> Dict[str, torch.nn.Module]:
        return {"autoencoder": self.ae}

    def parameters(self):
        return [p for p in self.ae.parameters() if p.requires_grad]

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict):
        pass

    def batch(self, seeds: Sequence[int], generator=None, device=None):
        patch = self.options.get("patch")
        xs = [self.synth.sample(s, patch=patch).image for s in seeds]
        return torch.stack(xs)[:, None].to(self.device if device is None else device)

    def draw(self, generator: torch.Generator) -> torch.Tensor:
        o = self.options
        return self.batch(draw_train_seeds(generator, o["batch_size"], o.get("pool", 0)), device="cpu")

    def loss(self, step: int, generator: torch.Generator):
        return self.loss_on(self.draw(generator), generator)

    def loss_on(self, batch: torch.Tensor, generator: torch.Generator):
        o = self.options
        x = batch.to(self.device)
        if self.deterministic:
            mu, _ = self.ae.encode(x)
            recon = self.ae.decode(mu)
            kl = kl_divergence(mu, torch.ones_like(mu))  # only its mean part: keeps the latents near unit scale
        else:
            recon, mu, sigma = self.ae(x)
            kl = kl_divergence(mu, sigma)
        l1 = (recon - x).abs().mean()
        loss = l1 + o["kl_weight"] * kl
        parts = {"l1": float(l1.detach()), "kl": float(kl.detach())}
        if o.get("edge_weight"):
            edge = edge_l1(recon, x)
            loss = loss + o["edge_weight"] * edge
            parts["edge"] = float(edge.detach())
        return loss, parts

    @torch.no_grad()
    def evaluate(self, seeds) -> dict:
        """Reconstruction of whole held-out brains (posterior mean): L1, PSNR, PSNR inside the brain."""
        self.ae.eval()
        l1s, psnrs, brain = [], [], []
        for s in seeds:
            sample = self.synth.sample(s)
            x = sample.image[None, None].to(self.device)
            l1, whole, inside = reconstruction_scores(self.ae, x, self.ae.encode(x)[0], sample.mask)
            l1s.append(l1)
            psnrs.append(whole)
            brain.append(inside)
        self.ae.train()
        n = max(len(seeds), 1)
        return {"heldout_l1": sum(l1s) / n, "heldout_psnr_db": sum(psnrs) / n, "heldout_psnr_brain_db": sum(brain) / n,
                "heldout_count": len(seeds)}

    def networks(self) -> dict:
        return {"autoencoder": ("AutoencoderKL", self.ae, self.options["network"])}

    def card(self) -> dict:
        shape = self.synth.shape
        f = downsampling_factor(self.options["network"])
        return {"kind": "autoencoder",
                "latent": {"scale_factor": 1.0, "channels": self.options["network"]["latent_channels"],
                           "shape": [self.options["network"]["latent_channels"]] + [n // f for n in shape]}}
