"""Priors: networks + noise schedule + weights + model card, a model store, and the InverseSR generator.

Light to import: heavy modules (MONAI networks) load only when a prior is built.
"""

from .store import Prior, default_prior, default_prior_folder, find_prior, list_models, load_prior, models_dir

__all__ = ["Prior", "default_prior", "default_prior_folder", "find_prior", "list_models", "load_prior",
           "models_dir"]
