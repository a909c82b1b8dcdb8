"""Forward operators (HR -> LR) with adjoints, and the grids they imply."""

from .grids import hr_grid, lr_grid
from .operators import KINDS, PROFILES, Operator, OperatorSpec, PartialBlockWarning, make_operator, spec_from_dict

__all__ = ["KINDS", "PROFILES", "Operator", "OperatorSpec", "PartialBlockWarning", "make_operator", "spec_from_dict",
           "hr_grid", "lr_grid"]
