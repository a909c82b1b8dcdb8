"""The module's help and acknowledgement texts (Slicer shows them atop the panel, as HTML).

A test checks that the help names every method the library lists, and that the acknowledgement cites the
methods' papers and the published prior's licence.
"""

HELP_TEXT = """
<p>Super-resolves thick-slice, slice-removed, downsampled or truncated k-space brain MRI onto a finer grid
(same outer bounds, a new volume; the input is never modified). Results are AI-generated: research use only,
<b>not for clinical use</b>.</p>
<p><b>Methods</b> (the worker lists them; the settings form follows each method's own schema):</p>
<ul>
<li><b>trilinear</b>, <b>bspline</b>, <b>sinc</b>: interpolation baselines, seconds, any degradation.</li>
<li><b>inversesr-decoder</b>, <b>inversesr-ldm</b> (InverseSR): fit a latent diffusion prior to the measured
slices. Bound to the prior's 1 mm MNI-like grid (160 x 224 x 160): the input is registered to it and the result
brought back. Minutes on a GPU, much longer on the CPU (the panel warns with an estimate).</li>
<li><b>kspace-vdm</b>: variational diffusion prior with the measured central k-space kept at every step; k-space
truncation only.</li>
<li><b>paired-ddpm</b>: conditional diffusion model trained on low/high-resolution pairs, sampled over 3D
patches; slice removal and Gaussian thick slices along one axis, factors 2-8.</li>
</ul>
<p><b>Default priors</b>: small priors trained by the MRISuperRes developers on synthetic T1-like heads made
from the MNI152 template ship with the extension (synth-brain-ldm, synth-brain-vdm, synth-brain-paired). They
are research baselines, not validated on patient data; their cards (model.json) give the measured quality.
The published UK Biobank brain LDM is not shipped: download it yourself and choose Model > Import model....</p>
<p><b>Limits</b>: T1-weighted adult heads; one degraded axis (set it by hand with Input > Override when it is not
found from the spacing); uncertainty maps only for generative methods with several samples. Closing the scene
or removing the input volume cancels a run.</p>
"""

ACKNOWLEDGEMENT_TEXT = """
<p>Methods: InverseSR, Wang et al., "InverseSR: 3D Brain MRI Super-Resolution Using a Latent Diffusion Model",
MICCAI 2023; variational diffusion models, Kingma et al., "Variational Diffusion Models", NeurIPS 2021; DDPM,
Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS 2020.</p>
<p>Published prior: the brain latent diffusion model of Pinaya et al. 2022 (UK Biobank), distributed as the MONAI
model zoo bundle brain_image_synthesis_latent_diffusion_model under the Apache-2.0 licence, research use only,
not for clinical use. It is imported by the user, never bundled.</p>
<p>Built on PyTorch (through the PyTorch extension) and MONAI.</p>
"""
