"""NF-layers: neural-functional layers that read and write weight spaces.

Every layer takes a :class:`~lopt.weightspace.WeightSpace` and returns one
(:class:`InvariantPool` returns a vector), so ``nn.Sequential`` stacks them.
"""

from lopt.nn.linear import NFLinear
from lopt.nn.monomial import ScaleNFLinear, SignNFLinear
from lopt.nn.pointwise import (
    PointwiseLinear,
    PointwiseMLP,
    WSActivation,
    WSNorm,
    WSReLU,
    WSTanh,
)
from lopt.nn.pooling import InvariantPool

__all__ = [
    "InvariantPool",
    "NFLinear",
    "PointwiseLinear",
    "PointwiseMLP",
    "ScaleNFLinear",
    "SignNFLinear",
    "WSActivation",
    "WSNorm",
    "WSReLU",
    "WSTanh",
]
