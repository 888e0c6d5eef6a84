"""Monomial NF-layers (Tran et al. 2024): equivariant to permutations *and* to
rescaling (ReLU networks) or sign flips (tanh / sin networks) of hidden neurons.

Rescaling hidden neuron j by d > 0 multiplies the entries that write it (rows
of its weight, its bias) by d and the entries that read it (columns of the
next weight) by 1/d: entry (j, k) carries the character d_j^{+1} d_k^{-1}. A
linear term may only connect entries of equal character, so a term survives
when U and T hold the same hidden groups with the same exponents (equal mod 2
for sign flips) and every one of them is tied; pooling is allowed over input,
output and local axes only. Biases break the symmetry and are kept only for
tensors without hidden axes. The activations that commute with the group are
positively homogeneous ones (ReLU) for scaling and odd ones (tanh) for signs.
"""

from __future__ import annotations

from lopt.nn.linear import NFLinear
from lopt.nn.terms import hidden_exponents
from lopt.weightspace import WeightSpaceSpec

SCALE, SIGN = "scale", "sign"


def _compatible(spec: WeightSpaceSpec, ui: int, ti: int, ties, modulus: int | None) -> bool:
    hu = hidden_exponents(spec.tensors[ui], spec)
    ht = hidden_exponents(spec.tensors[ti], spec)
    if set(hu) != set(ht):
        return False
    tied = set(ties)
    for g, (a, e_u) in hu.items():
        b, e_t = ht[g]
        if (a, b) not in tied:
            return False
        if (e_u - e_t) % modulus if modulus else e_u != e_t:
            return False
    return True


def _no_hidden(spec: WeightSpaceSpec, ui: int) -> bool:
    return not hidden_exponents(spec.tensors[ui], spec)


class ScaleNFLinear(NFLinear):
    """NF-layer equivariant to permutations and positive rescaling of hidden
    neurons (the symmetry of ReLU networks). Pair it with :class:`~lopt.nn.WSReLU`."""

    @staticmethod
    def term_allowed(spec, ui, ti, ties) -> bool:
        return _compatible(spec, ui, ti, ties, None)

    @staticmethod
    def bias_allowed(spec, ui) -> bool:
        return _no_hidden(spec, ui)


class SignNFLinear(NFLinear):
    """NF-layer equivariant to permutations and sign flips of hidden neurons
    (the symmetry of tanh / sin networks). Pair it with an odd activation."""

    @staticmethod
    def term_allowed(spec, ui, ti, ties) -> bool:
        return _compatible(spec, ui, ti, ties, 2)

    @staticmethod
    def bias_allowed(spec, ui) -> bool:
        return _no_hidden(spec, ui)
