"""The cosine noise schedule of the pixel-space diffusion priors (Nichol & Dhariwal 2021), and the DDIM chain the
paired sampler runs on it (the DDIM step itself is priors/ddim.py, shared by every sampler).

Notation: ab[t] -> bar-alpha_t of the cosine schedule (eq. 17, s = 0.008, beta <= 0.999), t = 0 .. T-1.
"""

from typing import List, Tuple

import torch

from ..priors.ddim import NoiseSchedule, ddim_pairs, ddim_timesteps

DEFAULT_SCHEDULE = {"type": "cosine", "num_train_timesteps": 1000, "prediction": "epsilon"}


def cosine_alpha_bar(num_train_timesteps: int = 1000) -> torch.Tensor:
    """bar-alpha_t, t = 0 .. T-1, of the cosine schedule (float64)."""
    return NoiseSchedule(type="cosine", num_train_timesteps=int(num_train_timesteps)).alpha_bar()


START_ALPHA_BAR = 1e-3  # the chain starts at the last t with bar-alpha above this (see sampling_pairs)


def sampling_pairs(steps: int, alpha_bar: torch.Tensor) -> List[Tuple[int, float, float]]:
    """[(t, ab_t, ab_prev)] of an N-step DDIM chain from near T down to ~0; the last ab_prev is 1.

    The cosine schedule ends at bar-alpha ~ 2e-9, where x0_hat = (z - sqrt(1 - ab) eps) / sqrt(ab) multiplies
    any error of eps by ~20000; starting where bar-alpha >= 1e-3 (t ~ 970 of 1000) costs almost nothing (the
    signal there is 3% of the noise) and keeps the first estimate usable.
    """
    usable = int((alpha_bar >= START_ALPHA_BAR).nonzero().max()) + 1
    # the last step goes to bar-alpha 1, i.e. returns x0_hat itself: the residual, with no noise left in it
    return ddim_pairs(ddim_timesteps(int(steps), usable), alpha_bar, final_alpha_bar=1.0)
