"""lopt: learned optimizers built on permutation-equivariant neural functionals.

Public API:

* :class:`NFNOptimizer`, :class:`MLPOptimizer`, :class:`LearnedOptimizer`:
  ``torch.optim.Optimizer`` classes driven by an optimizer net.
* :class:`NFNNet`, :class:`PerParamMLP`: the optimizer nets, and
  :class:`UpdateRule`, what of their update is not learned.
* :mod:`lopt.functional`: the pure ``init`` / ``update`` core they share with
  meta-training.
* :mod:`lopt.fused`: the fused CPU kernels the optimizer classes run a
  step's per-entry work through (``fused.available()``).
* :mod:`lopt.multi_tensor`: the step on every tensor at once in torch
  operators, which the optimizer classes run on a GPU.
* :class:`WeightSpaceSpec`, :class:`WeightSpace`: weight spaces, and
  :mod:`lopt.nn` for the NF-layers built on them.
* :func:`save`, :func:`load`, :func:`pretrained_names`: checkpoints.
"""

from lopt import functional, fused, multi_tensor
from lopt.checkpoint import load, pretrained_names, save
from lopt.nets import NFNNet, OptimizerNet, PerParamMLP
from lopt.optim import LearnedOptimizer, MLPOptimizer, NFNOptimizer
from lopt.update_rule import UpdateRule
from lopt.weightspace import Axis, TensorSpec, WeightSpace, WeightSpaceSpec

__all__ = [
    "Axis",
    "LearnedOptimizer",
    "MLPOptimizer",
    "NFNNet",
    "NFNOptimizer",
    "OptimizerNet",
    "PerParamMLP",
    "TensorSpec",
    "UpdateRule",
    "WeightSpace",
    "WeightSpaceSpec",
    "functional",
    "fused",
    "multi_tensor",
    "load",
    "pretrained_names",
    "save",
]
__version__ = "0.1.0"
