"""InverseSR(LDM) (Wang et al., MICCAI 2023): optimise the initial noise z_T and the conditioning c through
the deterministic DDIM chain and the decoder.

Suited to high sparsity (e.g. 8 mm slices). Notation and steps: see inversesr/solver.py and priors/ddim.py.
1. z_T ~ N(0, I) (or, with init=invert, the DDIM inversion of the encoded interpolated input; with init=noise,
   that encoding noised to the chain's first timestep); c = the card's default conditioning (0.5 each for the
   published prior)
2. Adam on (z_T, c) for `iterations` steps: loss = mean |A D(DDIM(z_T, c)) - y| (+ optional perceptual term);
   c is clamped to [0, 1] after each step; every DDIM step and decoder block is checkpointed
3. x = D(DDIM(z_T, c)), optionally with the observed data pasted back
4. with samples = N > 1 (init=noise or random), steps 1-3 from N starts; the output is the mean of the N results
With ddim_steps = 46 the chain is the paper's t = 991, 969, ..., 1.
The pipeline hands it the operator in the prior's space (native.py): registered unless the input lies on its grid.
"""

from ..priors.acceleration import MODES
from .inversesr import solver
from .registry import GridBinding, Setting, register

SETTINGS = solver.common_settings(iterations=200, lr=0.07) + [
    Setting("ddim_steps", "int", 46, "Steps of the deterministic DDIM chain (46: the paper's 991, 969, ..., 1).",
            min=1, max=1000),
    Setting("strength", "float", 1.0, "How far up the noise schedule the chain starts: 1 the whole chain from "
            "pure noise (the paper); lower values start from a partly noised latent, which few DDIM steps invert "
            "and regenerate faithfully (with init=invert).", min=0.01, max=1.0),
    Setting("accelerate", "choice", "auto", "How the DDIM chain's UNet steps run: 'off' eagerly; 'cuda-graphs' "
            "captured once and replayed (CUDA only); 'compile' through torch.compile (slow to start); 'auto' "
            "cuda-graphs on a GPU, off on the CPU. A mode that cannot run warns and falls back to off.",
            choices=MODES),
    Setting("optimise_conditioning", "bool", True, "Also fit the prior's conditioning values (e.g. age, sex)."),
    Setting("init", "choice", "random", "Starting noise: 'random' (the paper), 'invert' (encode the interpolated "
            "input and run the DDIM chain backwards: starts near the input, so far fewer iterations are needed) or "
            "'noise' (the encoded input noised to the chain's start, differently for each of several samples).",
            choices=("random", "invert", "noise")),
]


@register("inversesr-ldm", "InverseSR (LDM)",
          "Fits the initial noise and conditioning of a latent diffusion prior through its DDIM chain "
          "(InverseSR, high sparsity).", settings=SETTINGS, generative=True, needs_prior="ldm",
          grid=GridBinding(paste="paste_observed", spread="paste_spread"), gate=("slice-removal-4mm", "slice-removal-8mm"))
def solve(y, physics, prior, settings, progress, generator):
    return solver.run("inversesr-ldm", y, physics, prior, settings, progress, generator, chain=True)
