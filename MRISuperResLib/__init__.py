"""MRISuperRes library: super-resolution of thick-slice / truncated k-space brain MRI.

Pure Python (torch, MONAI, SimpleITK, numpy); never imports slicer, qt or vtk.
Axes are ITK index axes i, j, k = 0, 1, 2 everywhere.
"""

__version__ = "0.1.0"
