"""Pixel-space diffusion priors: the VDM of k-space guided sampling and the paired conditional DDPM.

vdm.py        learnable monotone gamma(t), VDM loss, Fourier features, ancestral step
cosine.py     cosine schedule, DDIM step with eta, the paired model's loss and conditioning
patches.py    sliding window with overlap blending (patch-wise networks on whole volumes)
intensity.py  robust [0, 1] normalisation of a measurement and back
cards.py      model cards of kinds "vdm" and "paired", writing a prior folder
"""
