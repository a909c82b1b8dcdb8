"""`train ldm`: MONAI DiffusionModelUNet on the latents of a frozen autoencoder (epsilon prediction).

Notation: z0 latent of a brain (posterior sample, times scale_factor), c its 4 conditioning values,
alpha_bar_t = prod_{s<=t} (1 - beta_s) with the scaled-linear schedule of the published prior
(beta = linspace(sqrt(0.0015), sqrt(0.0205), 1000)^2).

Per step:
    1. draw seeds (from a pool of `pool` training brains whose latents are cached, or fresh ones)
    2. z0 = (mu + sigma * n) * scale_factor; t ~ U{0..999}; eps ~ N(0, I)
    3. z_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) eps           (DDPM eq. 4)
    4. loss = || eps - UNet([z_t, c broadcast], t, context=c) ||^2       (DDPM eq. 14)
Like the published prior, c enters twice: as 4 extra input channels and as cross-attention context.
Our conditioning names are the synthetic brains' own: contrast, scale, CSF volume, brain volume.
"""

import os
from typing import Dict

import torch

from ..errors import InputError
from .autoencoder import (
    DEFAULT_AE,
    build_autoencoder,
    downsampling_factor,
    draw_train_seeds,
    reconstruction_scores,
    synth_from_options,
)
from .synth import CONDITIONING_NAMES

DEFAULT_SCHEDULE = {"type": "scaled_linear_beta", "num_train_timesteps": 1000, "beta_start": 0.0015,
                    "beta_end": 0.0205, "prediction": "epsilon"}


def default_unet(latent_channels=3, conditioning=True, channels=(32, 64, 64)) -> dict:
    n_cond = len(CONDITIONING_NAMES) if conditioning else 0
    heads = [0] + [min(32, c) for c in channels[1:]]
    return {"spatial_dims": 3, "in_channels": latent_channels + n_cond, "out_channels": latent_channels,
            "channels": list(channels), "num_res_blocks": 1,
            "attention_levels": [False] + [True] * (len(channels) - 1), "num_head_channels": heads,
            "norm_num_groups": 16, "norm_eps": 1e-6, "resblock_updown": True, "with_conditioning": bool(conditioning),
            "transformer_num_layers": 1, "cross_attention_dim": n_cond if conditioning else None,
            "upcast_attention": True}


def alphas_cumprod(schedule: dict) -> torch.Tensor:
    n = int(schedule["num_train_timesteps"])
    b0, b1 = float(schedule["beta_start"]), float(schedule["beta_end"])
    kind = schedule["type"]
    if kind == "scaled_linear_beta":
        betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float64) ** 2
    elif kind == "linear_beta":
        betas = torch.linspace(b0, b1, n, dtype=torch.float64)
    else:
        raise InputError("Schedule '%s' is not supported by train ldm." % kind, "Use scaled_linear_beta or linear_beta.")
    return torch.cumprod(1.0 - betas, 0).float()


def load_autoencoder(path, device="cpu"):
    """(module, kwargs, synth options) from an exported prior folder or an autoencoder run folder."""
    from ..priors.folder import CARD_FILE, load_network, read_card
    from .trainer import RUN_FILE, load_checkpoint, read_run

    if os.path.exists(os.path.join(path, CARD_FILE)):
        card = read_card(path, autoencoder=True)
        entry = (card.get("networks") or {}).get("autoencoder")
        if not entry:
            raise InputError("%s has no autoencoder network." % path, "Give an autoencoder or LDM prior folder.")
        g = card["grid"]
        f = int(round(g["spacing"][0]))
        synth = {"shape": [n * f for n in g["shape"]], "orientation": g["orientation"], "downsample": f,
                 "head": card.get("training", {}).get("synth", {}).get("head", True)}
        return load_network(path, card, "autoencoder", device), entry["kwargs"], synth
    if os.path.exists(os.path.join(path, RUN_FILE)):
        run = read_run(path)
        if run.get("task") != "autoencoder":
            raise InputError("%s is a '%s' run, not an autoencoder run." % (path, run.get("task")),
                             "Give the run folder of `train autoencoder`.")
        ckpt = load_checkpoint(path, "cpu")
        if ckpt is None:
            raise InputError("%s has no checkpoint yet." % path, "Train the autoencoder first.")
        kwargs = run["options"]["network"]
        ae = build_autoencoder(kwargs)
        ae.load_state_dict(ckpt["modules"]["autoencoder"])
        return ae.to(device), kwargs, run["options"]["synth"]
    raise InputError("%s is neither a prior folder nor an autoencoder run folder." % path,
                     "Give --autoencoder a folder holding model.json or run.json.")


def autoencoder_provenance(path) -> dict:
    """How the autoencoder at `path` was trained, for the LDM's card: its own networks carry no training record."""
    from ..priors.folder import CARD_FILE, read_card
    from .trainer import command_line_of, load_checkpoint, read_run
    from .warmstart import init_from_record

    if os.path.exists(os.path.join(path, CARD_FILE)):
        card = read_card(path, autoencoder=True)
        t = card.get("training") or {}
        if t.get("autoencoder"):  # an LDM prior: its own command is the UNet's run, the autoencoder's sits beside it
            return dict(t["autoencoder"])
        if card.get("kind") == "autoencoder":
            return {"command": t.get("command", ""), "steps": t.get("steps")}
        return {"source": os.path.abspath(path), "note": "its card does not record how the autoencoder was trained"}
    ckpt = load_checkpoint(path, "cpu")
    run = read_run(path)
    out = {"command": command_line_of(run), "steps": int(ckpt["step"]) if ckpt else 0}
    if run["options"].get("init_from"):  # where its weights started, which its command alone does not say
        out["init_from"] = init_from_record(run["options"])
    return out


class LDMTask:
    name = "ldm"

    def __init__(self, options: dict, device, autoencoder=None):
        self.options = options
        self.device = torch.device(device)
        self.synth = synth_from_options(options)
        self.ae = autoencoder if autoencoder is not None else build_autoencoder(options["autoencoder"])
        self.ae = self.ae.to(self.device).eval()
        for p in self.ae.parameters():
            p.requires_grad_(False)
        from monai.networks.nets import DiffusionModelUNet

        try:
            self.unet = DiffusionModelUNet(**options["network"]).to(self.device)
        except (ValueError, TypeError, AssertionError) as exc:
            raise InputError("The UNet settings are not valid: %s." % str(exc).rstrip("."),
                             "Check --channels/--norm-groups/--heads (groups must divide every channel count).") from None
        f = downsampling_factor(options["autoencoder"])
        if any(n % f for n in self.synth.shape):
            raise InputError("Grid %s is not a multiple of the autoencoder's factor %d." % (self.synth.shape, f),
                             "Use a grid whose sizes are divisible by %d." % f)
        self.abar = alphas_cumprod(options["schedule"]).to(self.device)
        self.scale_factor = None
        self.cache = {}  # seed -> (mu, sigma, cond), fp16-rounded so a resumed run sees the same values

    @staticmethod
    def default_options(ae_kwargs=None, synth=None, network=None, batch_size=1, pool=256, conditioning=True) -> dict:
        ae_kwargs = dict(ae_kwargs or DEFAULT_AE)
        return {"network": dict(network or default_unet(ae_kwargs["latent_channels"], conditioning)),
                "autoencoder": ae_kwargs, "schedule": dict(DEFAULT_SCHEDULE),
                "synth": dict(synth or {"shape": [160, 224, 160], "orientation": "LAS", "downsample": 1, "head": True}),
                "batch_size": int(batch_size), "pool": int(pool), "conditioning": bool(conditioning)}

    def modules(self) -> Dict[str, torch.nn.Module]:
        return {"autoencoder": self.ae, "unet": self.unet}

    def parameters(self):
        return self.unet.parameters()

    def state(self) -> dict:
        out = {}
        if self.scale_factor is not None:
            out["scale_factor"] = torch.tensor(self.scale_factor, dtype=torch.float64)
        if self.cache:
            seeds = sorted(self.cache)
            out["cache_seeds"] = torch.tensor(seeds, dtype=torch.int64)
            for i, key in enumerate(("cache_mu", "cache_sigma", "cache_cond")):
                out[key] = torch.stack([self.cache[s][i].cpu() for s in seeds])
        return out

    def load_state(self, state: dict):
        if "scale_factor" in state:
            self.scale_factor = float(state["scale_factor"])
        if "cache_seeds" in state:
            for n, s in enumerate(state["cache_seeds"].tolist()):
                self.cache[int(s)] = tuple(state[k][n].to(self.device) for k in ("cache_mu", "cache_sigma", "cache_cond"))

    @torch.no_grad()
    def encode(self, seed: int):
        if seed in self.cache:
            return self.cache[seed]
        sample = self.synth.sample(seed)
        mu, sigma = self.ae.encode(sample.image[None, None].to(self.device))
        item = (mu[0].half(), sigma[0].half(), sample.conditioning.to(self.device))
        if self.options.get("pool"):
            self.cache[seed] = item
        return item

    def _scale(self):
        if self.scale_factor is None:
            # Unit-variance latents (Rombach et al. 2022, sec. 4.3.2), measured once on fixed brains.
            mus = torch.stack([self.encode(s)[0].float() for s in range(4)])
            self.scale_factor = float(1.0 / mus.std().clamp_min(1e-6))
        return self.scale_factor

    def _predict(self, zt, t, cond):
        if self.options.get("conditioning", True):
            chans = cond[:, :, None, None, None].expand(-1, -1, *zt.shape[2:])
            return self.unet(torch.cat([zt, chans], 1), timesteps=t, context=cond[:, None, :])
        return self.unet(zt, timesteps=t)

    def loss(self, step: int, generator: torch.Generator):
        o = self.options
        scale = self._scale()
        seeds = draw_train_seeds(generator, o["batch_size"], o.get("pool", 0))
        items = [self.encode(s) for s in seeds]
        mu = torch.stack([i[0].float() for i in items])
        sigma = torch.stack([i[1].float() for i in items])
        cond = torch.stack([i[2] for i in items])
        n = torch.randn(mu.shape, generator=generator).to(self.device)
        z0 = (mu + sigma * n) * scale
        t = torch.randint(0, self.abar.numel(), (len(seeds),), generator=generator).to(self.device)
        eps = torch.randn(z0.shape, generator=generator).to(self.device)
        ab = self.abar[t].view(-1, 1, 1, 1, 1)
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
        mse = torch.mean((self._predict(zt, t, cond) - eps) ** 2)
        return mse, {"eps_mse": float(mse.detach()), "t_mean": float(t.float().mean())}

    @torch.no_grad()
    def evaluate(self, seeds, timesteps=(50, 250, 500, 750, 950)) -> dict:
        """Epsilon MSE on held-out brains at fixed t with fixed noise (1.0 = predicting zero)."""
        self.unet.eval()
        scale = self._scale()
        per_t = {int(t): 0.0 for t in timesteps}
        ae_psnr, ae_brain = [], []  # the decoder bounds what the InverseSR methods can reach: worth a line
        for s in seeds:
            sample = self.synth.sample(s)
            x = sample.image[None, None].to(self.device)
            mu, _ = self.ae.encode(x)
            _, whole, inside = reconstruction_scores(self.ae, x, mu, sample.mask)
            ae_psnr.append(whole)
            ae_brain.append(inside)
            z0 = mu * scale
            cond = sample.conditioning[None].to(self.device)
            gen = torch.Generator().manual_seed(int(s))
            for t in timesteps:
                eps = torch.randn(z0.shape, generator=gen).to(self.device)
                ab = self.abar[t]
                zt = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
                tt = torch.full((1,), int(t), device=self.device, dtype=torch.long)
                per_t[int(t)] += float(torch.mean((self._predict(zt, tt, cond) - eps) ** 2)) / max(len(seeds), 1)
        self.unet.train()
        return {"heldout_eps_mse": sum(per_t.values()) / len(per_t),
                "heldout_eps_mse_by_t": {str(k): v for k, v in per_t.items()}, "heldout_count": len(seeds),
                "autoencoder_heldout_psnr_db": sum(ae_psnr) / max(len(ae_psnr), 1),
                "autoencoder_heldout_psnr_brain_db": sum(ae_brain) / max(len(ae_brain), 1)}

    def networks(self) -> dict:
        return {"autoencoder": ("AutoencoderKL", self.ae, self.options["autoencoder"]),
                "unet": ("DiffusionModelUNet", self.unet, self.options["network"])}

    def card(self) -> dict:
        f = downsampling_factor(self.options["autoencoder"])
        lc = self.options["autoencoder"]["latent_channels"]
        cond = None
        if self.options.get("conditioning", True):
            cond = {"names": list(CONDITIONING_NAMES), "default": [0.5] * len(CONDITIONING_NAMES),
                    "as_channels": True, "as_context": True}
        return {"kind": "ldm", "schedule": dict(self.options["schedule"]), "conditioning": cond,
                "latent": {"scale_factor": self._scale(), "channels": lc,
                           "shape": [lc] + [n // f for n in self.synth.shape]}}
