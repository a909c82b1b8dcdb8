"""`train paired`: the conditional DDPM of paired-ddpm, on LR/HR pairs made by the run's operators.

Per step:
    1. draw `batch_size` training seeds; for each, one operator of `operators` (kind, axes, factors, profile)
    2. render an HR block of patch + 2 * margin voxels at a random corner; with `non_axial_share`, turn that share
       of the blocks so the left-right (sagittal) or front-back (coronal) axis lies at k, the other two in the
       training order, exactly as paired-ddpm's network view shows such scans (orientation.network_view);
       y = A(block) with the operator bound to the block; up = cubic B-spline of y on the block; crop the central
       patch of both
       (the margin keeps the pair's borders like the inside of a whole volume, as at inference)
    3. hr, up -> [-1, 1]; x0 = (hr - up) / residual_scale, residual_scale = the residual's std, measured once
    4. loss = || x0 - UNet([z_t, up, cond], t) ||^2 with the cosine schedule (x0 = "sample" prediction; runs
       made with eps prediction keep it; diffusion/paired_model.py)
"""

import warnings
from typing import Dict

import torch

from ..diffusion import paired_model
from ..diffusion.cosine import DEFAULT_SCHEDULE, cosine_alpha_bar
from ..errors import InputError
from ..orientation import network_view
from ..physics import spec_from_dict
from ..priors.card import fresh_method_defaults
from .autoencoder import draw_train_seeds, synth_from_options

DEFAULT_OPERATORS = [
    {"operator": kind, "axes": [2], "factors": [float(f)], **({"profile": "gaussian"} if kind == "thick-slice" else {})}
    for kind in ("slice-removal", "thick-slice") for f in (2, 3, 4, 5, 6, 8)
]  # through-plane (k; paired-ddpm turns other thick axes to k at inference), factors 2 to 8


class PairedTask:
    name = "paired"

    def __init__(self, options: dict, device):
        from monai.networks.nets import DiffusionModelUNet

        self.options = options
        self.device = torch.device(device)
        self.synth = synth_from_options(options)
        self.specs = [spec_from_dict(o) for o in options["operators"]]
        patch = [int(p) for p in options["patch"]]
        mult = 2 ** (len(options["network"]["channels"]) - 1)
        big = [p + 2 * int(options["margin"]) for p in patch]
        if any(p % mult for p in patch) or any(b > n for b, n in zip(big, self.synth.shape)):
            raise InputError("Patch %s (+ margin %d) must be multiples of %d and fit the grid %s."
                             % (patch, options["margin"], mult, self.synth.shape), "Choose --patch/--margin accordingly.")
        try:
            self.unet = DiffusionModelUNet(**{k: tuple(v) if isinstance(v, list) else v
                                              for k, v in options["network"].items()}).to(self.device)
        except (ValueError, TypeError, AssertionError) as exc:
            raise InputError("The UNet settings are not valid: %s" % exc,
                             "Check --channels/--norm-groups (groups must divide every channel count).") from None
        self.residual_scale = None

    @staticmethod
    def default_options(synth=None, network=None, patch=(32, 32, 32), margin=8, operators=None, batch_size=2,
                        pool=0) -> dict:
        return {"network": dict(network or paired_model.default_unet()), "patch": list(patch), "margin": int(margin),
                "operators": [dict(o) for o in (operators or DEFAULT_OPERATORS)],
                "schedule": dict(DEFAULT_SCHEDULE, prediction="sample"),
                "synth": dict(synth or {"shape": [160, 224, 160], "orientation": "LAS", "downsample": 1, "head": True}),
                "batch_size": int(batch_size), "pool": int(pool)}

    def modules(self) -> Dict[str, torch.nn.Module]:
        return {"unet": self.unet}

    def parameters(self):
        return self.unet.parameters()

    def state(self) -> dict:
        return {} if self.residual_scale is None else {"residual_scale": torch.tensor(self.residual_scale)}

    def load_state(self, state: dict):
        if "residual_scale" in state:
            self.residual_scale = float(state["residual_scale"])

    def pairs(self, seeds, generator: torch.Generator, device=None):
        """(hr, up, cond): (B, 1, *patch) in [-1, 1] and (B, len(CONDITION_NAMES)), on `device` (default: the task's)."""
        patch, m, full = [int(p) for p in self.options["patch"]], int(self.options["margin"]), self.synth.shape
        big = [p + 2 * m for p in patch]
        hrs, ups, conds = [], [], []
        for s in seeds:
            spec = self.specs[int(torch.randint(0, len(self.specs), (1,), generator=generator))]
            turn = self._turn(generator)
            drawn = [big[a] for a in turn]  # turn swaps two axes, so it is its own inverse
            corner = [int(torch.randint(0, n - b + 1, (1,), generator=generator)) for n, b in zip(full, drawn)]
            block = self.synth.sample(s, patch=drawn, corner=corner).image.double().permute(*turn).contiguous()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a factor not dividing the block only shifts its last sample
                op = spec.bind_hr(tuple(big))
            up = op.upsample(op.forward(block), "cubic")
            inner = tuple(slice(m, m + p) for p in patch)
            hrs.append(block[inner])
            ups.append(up[inner])
            conds.append(paired_model.condition_of(op))
        device = self.device if device is None else device
        to = dict(device=device, dtype=torch.float32)
        return ((torch.stack(hrs)[:, None] * 2 - 1).to(**to), (torch.stack(ups)[:, None] * 2 - 1).to(**to),
                torch.stack(conds).to(device))

    def _turn(self, generator: torch.Generator):
        """Axis order of one block: (0, 1, 2) as stored, or i (sagittal) or j (coronal) swapped with k.
        Random numbers are drawn only when a share is set, so earlier runs' draws stay the same."""
        share = float(self.options.get("non_axial_share", 0.0))
        if share <= 0.0 or float(torch.rand((), generator=generator)) >= share:
            return (0, 1, 2)
        thick = int(torch.randint(0, 2, (1,), generator=generator))
        return tuple(network_view(None, None, thick)[0])  # as paired-ddpm turns a scan thick along that axis

    def _scale(self) -> float:
        if self.residual_scale is None:
            # Unit-variance targets, like the LDM's scale factor; fixed brains so a resumed run agrees.
            hr, up, _ = self.pairs(range(4), torch.Generator().manual_seed(0))
            self.residual_scale = float((hr - up).std().clamp_min(1e-3))
        return self.residual_scale

    def model(self) -> paired_model.PairedModel:
        sched = self.options["schedule"]
        return paired_model.PairedModel(self.unet, self.options["patch"], self._scale(),
                                  cosine_alpha_bar(sched["num_train_timesteps"]), sched.get("prediction", "epsilon"))

    def draw(self, generator: torch.Generator):
        o = self.options
        return self.pairs(draw_train_seeds(generator, o["batch_size"], o.get("pool", 0)), generator, "cpu")

    def loss_on(self, batch, generator: torch.Generator):
        hr, up, cond = (t.to(self.device) for t in batch)
        return paired_model.paired_loss(self.model(), hr, up, cond, generator, float(self.options.get("high_t_fraction", 0.0)))

    def loss(self, step: int, generator: torch.Generator):
        return self.loss_on(self.draw(generator), generator)

    @torch.no_grad()
    def evaluate(self, seeds) -> dict:
        """Target MSE on held-out pairs with fixed draws (1.0 = predicting zero, for eps and for the unit-variance x0)."""
        self.unet.eval()
        model, total = self.model(), 0.0
        for s in seeds:
            gen = torch.Generator().manual_seed(int(s))
            hr, up, cond = self.pairs([s] * 2, gen)
            total += float(paired_model.paired_loss(model, hr, up, cond, gen)[0])
        self.unet.train()
        key = "heldout_eps_mse" if model.prediction == "epsilon" else "heldout_x0_mse"
        return {key: total / max(len(seeds), 1), "heldout_count": len(seeds)}

    def networks(self) -> dict:
        return {"unet": ("DiffusionModelUNet", self.unet, self.options["network"])}

    def card(self) -> dict:
        return {"kind": "paired", "schedule": dict(self.options["schedule"]),
                "paired": {"patch": list(self.options["patch"]), "residual_scale": self._scale(),
                           "operators": [dict(o) for o in self.options["operators"]],
                           "condition_names": list(paired_model.CONDITION_NAMES),
                           **({"non_axial_share": float(self.options["non_axial_share"])}
                              if self.options.get("non_axial_share") else {})},
                "method_defaults": fresh_method_defaults("paired")}


# ---- command line (hooked into training/cli.py: `train paired`) ----

def add_arguments(p):
    p.add_argument("--patch", type=int, nargs=3, default=None, help="3D patch (default 32 32 32).")
    p.add_argument("--margin", type=int, default=None, help="Context rendered around each patch (default 8).")
    p.add_argument("--operators", default=None,
                   help='JSON list of degradations to train on, e.g. \'[{"operator": "thick-slice", "axes": [2], '
                        '"factors": [4]}]\' (default: slice removal and Gaussian thick slices along k, factors 2-8).')
    p.add_argument("--channels", type=int, nargs="+", default=None, help="3D UNet channels (default 16 32 64).")
    p.add_argument("--norm-groups", type=int, default=None)
    p.add_argument("--non-axial-share", type=float, default=None, metavar="F",
                   help="Share of the training pairs whose thick axis runs left-right (sagittal slices) or front-back "
                        "(coronal), half each, instead of along the stored k axis (default 0: axial only).")
    p.add_argument("--high-t-fraction", type=float, default=None,
                   help="Share of steps drawn from the last 10%% of timesteps (default 0: uniform), where a short "
                        "sampling chain starts; may be changed on --resume.")


def resume_options(args, options: dict) -> dict:
    """The task options a resumed run may change: the timestep draw and the batch size (not the network or the data)."""
    options = dict(options)
    f = getattr(args, "high_t_fraction", None)
    if f is not None:
        if not 0.0 <= f <= 1.0:
            raise InputError("--high-t-fraction must be between 0 and 1, not %g." % f, "Give e.g. --high-t-fraction 0.5.")
        options["high_t_fraction"] = float(f)
    b = getattr(args, "batch_size", None)
    if b is not None:
        if b < 1:
            raise InputError("--batch-size must be at least 1, not %d." % b, "Give e.g. --batch-size 8.")
        options["batch_size"] = int(b)  # e.g. larger on a GPU than on the CPU the run started on
    return options


def new_options(args, synth: dict) -> dict:
    import json

    ops = DEFAULT_OPERATORS
    if args.operators:
        try:
            ops = json.loads(args.operators)
            for o in ops:
                spec_from_dict(o)
        except (ValueError, TypeError, KeyError, AttributeError):
            raise InputError("--operators is not a JSON list of degradations.",
                             'Example: \'[{"operator": "thick-slice", "axes": [2], "factors": [4]}]\'') from None
    share = getattr(args, "non_axial_share", None)
    if share is not None and not 0.0 <= share <= 1.0:
        raise InputError("--non-axial-share must be between 0 and 1, not %g." % share,
                         "Give e.g. --non-axial-share 0.4.")
    net = paired_model.default_unet(tuple(args.channels or (16, 32, 64)))
    if args.norm_groups is not None:
        net["norm_num_groups"] = args.norm_groups
    opts = PairedTask.default_options(synth=synth, network=net, patch=tuple(args.patch or (32, 32, 32)),
                                      margin=8 if args.margin is None else args.margin, operators=ops,
                                      batch_size=args.batch_size or 2, pool=args.pool or 0)
    if share:
        opts["non_axial_share"] = float(share)
    return resume_options(args, opts)
