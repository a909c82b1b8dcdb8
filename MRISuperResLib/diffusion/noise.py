"""The noise of several samples drawn side by side, independent or in opposite pairs.

Why pairs: a sampler's answer depends on its noise, largely through an odd function of it. The mean of a pair
(z, -z) cancels that part exactly, so a few paired samples average out more of the sampling noise than many
independent ones (docs/benchmarks.md, "Samples in opposite pairs"). Each sample on its own is still a draw of the
sampler, so the samples' spread still measures its uncertainty.
"""

import torch


def sample_noise(shape, generator: torch.Generator, antithetic: bool = False, device="cpu",
                 dtype=torch.float32) -> torch.Tensor:
    """N(0, I) of `shape`, whose first dimension counts the samples. With `antithetic`, sample h + i gets sample
    i's draw negated (h = half the count; an odd count leaves its last sample independent)."""
    noise = torch.randn(shape, generator=generator)
    half = int(shape[0]) // 2
    if antithetic and half:
        noise[half:2 * half] = -noise[:half]
    return noise.to(device, dtype)
