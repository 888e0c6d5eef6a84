"""lopt: learned optimizers built on permutation-equivariant neural functionals."""

from lopt.weightspace import Axis, TensorSpec, WeightSpace, WeightSpaceSpec

__all__ = ["Axis", "TensorSpec", "WeightSpace", "WeightSpaceSpec"]
__version__ = "0.1.0"
