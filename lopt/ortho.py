"""Orthogonalised momentum: a second hand-designed base direction for the
weights between hidden neuron groups.

A hidden-to-hidden weight (a matrix, or a conv kernel seen as ``(out, in *
kernel)``) gets the Nesterov form of its 0.9-momentum with its singular values
pushed toward 1 by a few Newton-Schulz iterations (the direction Muon steps
along). The map ``M -> p(M M^T) M`` commutes with permuting rows and columns,
so the term is as equivariant as everything else the nets output. Weights
that read the network's input or write its output keep Adam's direction
alone: there the rows or columns are data features or classes, not
exchangeable neurons, and orthogonalising them was slower in our tests.
"""

from __future__ import annotations

import math

from torch import Tensor

from lopt.weightspace import HIDDEN, LOCAL, TensorSpec, WeightSpaceSpec

# The quintic iteration X <- a X + (b A + c A^2) X, A = X X^T: it takes
# singular values in (0, 1] to roughly [0.7, 1.2] in five steps (it trades
# exactness for speed: the exact polar factor is not needed for a step).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NESTEROV = 0.1  # the gradient's share in the Nesterov form of the 0.9-momentum


def applies(spec: WeightSpaceSpec, t: TensorSpec) -> bool:
    """Whether ``t`` is a weight that writes and reads hidden neuron groups."""
    if t.kind != "weight" or len(t.shape) < 2 or len(t.axes) < 2:
        return False
    rows, cols = t.axes[0], t.axes[1]
    return all(
        a.kind != LOCAL and a.group is not None and spec.group_kind(a.group) == HIDDEN
        for a in (rows, cols)
    )


def newton_schulz(matrix: Tensor, steps: int = NS_STEPS) -> Tensor:
    """``matrix`` (2-D) with its singular values moved toward 1, its singular
    vectors kept; a zero matrix stays zero."""
    a, b, c = NS_COEFFICIENTS
    x = matrix / (matrix.norm() + 1e-7)
    wide = x.shape[0] <= x.shape[1]
    if not wide:  # iterate on the smaller Gram matrix
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.mT


def direction(grad: Tensor, momentum: Tensor) -> Tensor:
    """The orthogonalised Nesterov momentum of one weight, in its shape,
    scaled by ``sqrt(max(1, rows / cols))`` so that a tall matrix moves its
    outputs as much as a square one (Muon's convention)."""
    rows = grad.shape[0]
    cols = math.prod(grad.shape[1:])
    nesterov = momentum.lerp(grad, NESTEROV)
    o = newton_schulz(nesterov.reshape(rows, cols))
    return (o * math.sqrt(max(1.0, rows / cols))).reshape(grad.shape)
