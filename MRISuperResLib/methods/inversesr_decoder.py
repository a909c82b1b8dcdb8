"""InverseSR(Decoder) (Wang et al., MICCAI 2023): optimise the latent z_0 through the prior's frozen decoder.

Suited to low sparsity (e.g. 4 mm slices). Notation and steps: see inversesr/solver.py.
1. z_0 <- encoder mean of the interpolated input (init=encode) or N(0, I) (init=random, as in the paper)
2. Adam on z_0 for `iterations` steps: loss = mean |A D(z_0) - y| (+ optional perceptual term)
3. x = D(z_0), optionally with the observed data pasted back
4. with samples = N > 1 (init=random), steps 1-3 from N starts; the output is the mean of the N results
Defaults come from the prior's model card (the published prior: Adam, lr 0.07, 601 iterations).
The pipeline hands it the operator in the prior's space (native.py): registered unless the input lies on its grid.
"""

from .inversesr import solver
from .registry import GridBinding, Setting, register

SETTINGS = solver.common_settings(iterations=200, lr=0.07) + [
    Setting("init", "choice", "random", "Starting latent: 'random' (the paper) or 'encode' (the prior's encoder "
            "applied to the interpolated input; converges in fewer iterations).", choices=("random", "encode")),
]


@register("inversesr-decoder", "InverseSR (decoder)",
          "Fits the latent of a latent-diffusion prior's decoder to the observed slices (InverseSR, low sparsity).",
          settings=SETTINGS, generative=True, needs_prior="ldm",
          grid=GridBinding(paste="paste_observed", spread="paste_spread"), gate=("slice-removal-4mm", "slice-removal-8mm"))
def solve(y, physics, prior, settings, progress, generator):
    return solver.run("inversesr-decoder", y, physics, prior, settings, progress, generator, chain=False)
