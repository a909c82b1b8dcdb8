"""`train vdm`: the 2D variational diffusion prior of kspace-vdm, on slices of synthetic brains.

Per step:
    1. draw `batch_size` training seeds; for each, a random plane orientation (any of the three index axes,
       so one prior serves in-plane and through-plane truncation) and a random `crop` x `crop` window
    2. x = 2 * slice - 1 (the priors' [0, 1] range, centred)
    3. loss = VDM loss (diffusion + prior + reconstruction terms; diffusion/vdm.py), which trains the UNet and
       the monotone gamma(t) with its endpoints
Export: the UNet as safetensors; gamma tabulated on 1001 points in the card ("vdm.gamma_table").
"""

from typing import Dict

import torch

from ..diffusion import vdm
from ..errors import InputError
from ..priors.card import fresh_method_defaults
from .autoencoder import draw_train_seeds, synth_from_options


def _kwargs(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


class VDMTask:
    name = "vdm"

    def __init__(self, options: dict, device):
        from monai.networks.nets import DiffusionModelUNet

        self.options = options
        self.device = torch.device(device)
        self.synth = synth_from_options(options)
        crop = int(options["crop"])
        mult = 2 ** (len(options["network"]["channels"]) - 1)
        if crop % mult or crop > min(self.synth.shape):
            raise InputError("Crop %d must be a multiple of %d and fit the grid %s." % (crop, mult, self.synth.shape),
                             "Choose --crop accordingly (e.g. 64).")
        try:
            self.unet = DiffusionModelUNet(**_kwargs(options["network"])).to(self.device)
        except (ValueError, TypeError, AssertionError) as exc:
            raise InputError("The UNet settings are not valid: %s" % exc,
                             "Check --channels/--norm-groups (groups must divide every channel count).") from None
        g = options["gamma"]
        self.gamma = vdm.MonotoneGamma(g["hidden"], g["gamma_min"], g["gamma_max"]).to(self.device)
        self.model = vdm.VDM(self.unet, self.gamma, options["exponents"])

    @staticmethod
    def default_options(synth=None, network=None, exponents=vdm.DEFAULT_EXPONENTS, crop=64, batch_size=8,
                        pool=0) -> dict:
        return {"network": dict(network or vdm.default_unet(exponents)), "exponents": list(exponents),
                "gamma": {"hidden": 64, "gamma_min": vdm.GAMMA_MIN, "gamma_max": vdm.GAMMA_MAX},
                "synth": dict(synth or {"shape": [160, 224, 160], "orientation": "LAS", "downsample": 1, "head": True}),
                "crop": int(crop), "batch_size": int(batch_size), "pool": int(pool)}

    def modules(self) -> Dict[str, torch.nn.Module]:
        return {"unet": self.unet, "gamma": self.gamma}

    def parameters(self):
        return list(self.unet.parameters()) + list(self.gamma.parameters())

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict):
        pass

    def slices(self, seeds, generator: torch.Generator, device=None) -> torch.Tensor:
        """(B, 1, crop, crop) in [-1, 1]: one random plane window per seed."""
        crop, full = int(self.options["crop"]), self.synth.shape
        out = []
        for s in seeds:
            axis = int(torch.randint(0, 3, (1,), generator=generator))
            patch = [1 if a == axis else crop for a in range(3)]
            corner = [int(torch.randint(0, full[a] - patch[a] + 1, (1,), generator=generator)) for a in range(3)]
            img = self.synth.sample(s, patch=patch, corner=corner).image
            out.append(img.squeeze(axis))
        return (torch.stack(out)[:, None] * 2.0 - 1.0).to(self.device if device is None else device)

    def draw(self, generator: torch.Generator) -> torch.Tensor:
        o = self.options
        return self.slices(draw_train_seeds(generator, o["batch_size"], o.get("pool", 0)), generator, "cpu")

    def loss_on(self, batch: torch.Tensor, generator: torch.Generator):
        return vdm.vdm_loss(self.model, batch.to(self.device), generator)

    def loss(self, step: int, generator: torch.Generator):
        return self.loss_on(self.draw(generator), generator)

    def evaluate(self, seeds) -> dict:
        """The VDM loss (per dimension) on held-out slices with fixed draws: lower is better."""
        self.unet.eval()
        total, n = 0.0, 0
        for s in seeds:
            gen = torch.Generator().manual_seed(int(s))
            x = self.slices([s] * 4, gen)
            loss, _ = vdm.vdm_loss(self.model, x, gen)
            total += float(loss.detach())
            n += 1
        self.unet.train()
        g0, g1 = self.model.ends(self.device)
        return {"heldout_vdm_loss": total / max(n, 1), "gamma_0": g0, "gamma_1": g1, "heldout_count": len(seeds)}

    def networks(self) -> dict:
        return {"unet": ("DiffusionModelUNet", self.unet, self.options["network"])}

    def card(self) -> dict:
        return {"kind": "vdm", "schedule": None,
                "vdm": {"gamma_table": vdm.tabulate(self.gamma), "fourier_exponents": list(self.model.exponents),
                        "planes": "all three orientations", "crop": int(self.options["crop"])},
                "method_defaults": fresh_method_defaults("vdm")}


# ---- command line (hooked into training/cli.py: `train vdm`) ----

def add_arguments(p):
    p.add_argument("--crop", type=int, default=None, help="Square window of each training slice (default 64).")
    p.add_argument("--channels", type=int, nargs="+", default=None, help="2D UNet channels (default 32 64 64).")
    p.add_argument("--exponents", type=int, nargs="*", default=None, help="Fourier feature exponents (default 5 6).")
    p.add_argument("--norm-groups", type=int, default=None)


def new_options(args, synth: dict) -> dict:
    exps = tuple(vdm.DEFAULT_EXPONENTS if args.exponents is None else args.exponents)
    net = vdm.default_unet(exps, tuple(args.channels or (32, 64, 64)))
    if args.norm_groups is not None:
        net["norm_num_groups"] = args.norm_groups
    return VDMTask.default_options(synth=synth, network=net, exponents=exps, crop=args.crop or 64,
                                   batch_size=args.batch_size or 8, pool=args.pool or 0)
