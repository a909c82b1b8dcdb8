"""Pixel-space diffusion priors: the VDM of k-space guided sampling and the paired conditional DDPM.

vdm.py           learnable monotone gamma(t), VDM loss, Fourier features, ancestral step
cosine.py        the cosine noise schedule and the paired sampler's DDIM chain on it (the step: priors/ddim.py)
paired_model.py  the paired model: conditioning on the operator, network call, loss
patches.py       sliding window with overlap blending (patch-wise networks on whole volumes)
cards.py         model cards of kinds "vdm" and "paired" (written through priors/folder.py)
The intensity map of both samplers is MRISuperResLib/intensity.py.
"""
