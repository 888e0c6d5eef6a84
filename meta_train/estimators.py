"""Meta-gradient estimators: antithetic truncated ES, PES, truncated backprop.

All three share one interface, so the trainer does not care which it runs.
An estimator sees the optimizer net's parameters as a flat vector ``theta``
and an ``unroll`` function::

    unroll(thetas (P, D), inner) -> (meta_losses (P,), losses (P, K), new_inner)

that runs one truncation for P trajectories whose inner state persists across
truncations. ES and PES keep 2N trajectories (N antithetic pairs: members
``i`` and ``N + i`` carry ``theta + eps_i`` and ``theta - eps_i``); backprop
keeps N trajectories that all carry ``theta``.

``estimate`` works on a slice of the pairs (the share of one process under
``torch.distributed``): it returns the *sum* of per-pair gradient estimates
over the slice and the number of pairs, so ranks all-reduce sums and divide.

References: Salimans et al. 2017 (antithetic ES); Vicol, Metz, Sohl-Dickstein
2021, "Unbiased Gradient Estimation in Unrolled Computation Graphs with
Persistent Evolution Strategies" (PES).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from meta_train.unroll import detach_inner

Unroll = Callable[[Tensor, object], tuple[Tensor, Tensor, object]]


@dataclass
class Estimate:
    """One truncation's result on a slice of the population."""

    grad_sum: Tensor  # sum over the slice's pairs (or trajectories) of gradient estimates
    grad_sq_sum: Tensor  # sum over them of squared norms (for the estimator variance)
    loss_sum: Tensor  # sum of meta-losses over the slice's trajectories
    count: int  # pairs (ES, PES) or trajectories (backprop) in the slice
    trajectories: int  # trajectories unrolled
    losses: Tensor  # (trajectories, K) per-step losses, for logging
    # ES, PES: sum over the slice's pairs of the squared loss difference
    # ((L+ - L-) / 2 sigma)**2, the size of the task's meta-gradient
    # (NaN for backprop, which has no pairs).
    diff_sq_sum: Tensor


class Estimator:
    """Interface: ``trajectories(n)``, ``init_state``, ``reset``, ``estimate``."""

    name = "estimator"
    needs_noise = True

    def trajectories(self, pairs: int) -> int:
        """How many inner trajectories ``pairs`` units of population need."""
        return 2 * pairs

    def init_state(self, pairs: int, dim: int, like: Tensor) -> dict[str, Tensor]:
        """Per-slice estimator state (reset when the inner runs reset)."""
        return {}

    def estimate(
        self, theta: Tensor, noise: Tensor, state: dict, inner, unroll: Unroll
    ) -> tuple[Estimate, object, dict]:
        """``noise``: ``(pairs, D)`` standard normal draws for this slice.
        Returns the estimate, the new inner state and the new estimator state."""
        raise NotImplementedError


class TruncatedES(Estimator):
    """Antithetic ES on each truncation alone: ``g = (L+ - L-) / (2 sigma) eps``
    with ``eps ~ N(0, I)``. Biased for the full-horizon objective when
    truncations are short: it ignores how earlier truncations' parameters
    shaped the state a truncation starts from."""

    name = "es"

    def __init__(self, sigma: float = 0.01) -> None:
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.sigma = sigma

    def _weights(self, eps: Tensor, state: dict) -> tuple[Tensor, dict]:
        return eps, state

    def estimate(self, theta, noise, state, inner, unroll):
        eps = noise * self.sigma
        n = eps.shape[0]
        thetas = torch.cat([theta + eps, theta - eps])
        with torch.no_grad():
            metas, losses, new_inner = unroll(thetas, inner)
        direction, state = self._weights(noise, state)
        diff = (metas[:n] - metas[n:]) / (2 * self.sigma)  # (pairs,)
        per_pair = diff[:, None] * direction
        return (
            Estimate(
                grad_sum=per_pair.sum(0),
                grad_sq_sum=per_pair.square().sum(),
                loss_sum=metas.sum(),
                count=n,
                trajectories=2 * n,
                losses=losses,
                diff_sq_sum=diff.square().sum(),
            ),
            new_inner,
            state,
        )


class PES(TruncatedES):
    """Persistent ES: each pair accumulates its perturbations over the
    truncations of an inner run, ``xi += eps``, and the estimate uses
    ``(L+ - L-) / (2 sigma) xi``: unbiased for the objective summed over the
    whole horizon (Vicol et al. 2021)."""

    name = "pes"

    def init_state(self, pairs: int, dim: int, like: Tensor) -> dict[str, Tensor]:
        return {"accumulated": like.new_zeros(pairs, dim)}

    def _weights(self, eps: Tensor, state: dict) -> tuple[Tensor, dict]:
        acc = state["accumulated"] + eps
        return acc, {"accumulated": acc}


class TruncatedBackprop(Estimator):
    """The exact gradient of the truncation's meta-loss, by differentiating
    through the K inner steps (``torch.func.grad``); the inner state is
    detached between truncations (truncated backprop through time)."""

    name = "backprop"
    needs_noise = False

    def trajectories(self, pairs: int) -> int:
        return pairs

    def estimate(self, theta, noise, state, inner, unroll):
        n = inner_size(inner)

        def objective(th: Tensor):
            metas, losses, new_inner = unroll(th.unsqueeze(0).expand(n, -1), inner)
            return metas.sum(), (metas, losses, new_inner)

        grad_sum, (metas, losses, new_inner) = torch.func.grad(objective, has_aux=True)(theta)
        # Per-trajectory gradients are not separated; the variance is not tracked.
        new_inner = detach_inner(new_inner)
        return (
            Estimate(
                grad_sum=grad_sum.detach(),
                grad_sq_sum=grad_sum.new_tensor(float("nan")),
                loss_sum=metas.detach().sum(),
                count=n,
                trajectories=n,
                losses=losses.detach(),
                diff_sq_sum=grad_sum.new_tensor(float("nan")),
            ),
            new_inner,
            state,
        )


def inner_size(inner) -> int:
    leaves = torch.utils._pytree.tree_leaves(inner)
    return leaves[0].shape[0]


ESTIMATORS: dict[str, type[Estimator]] = {
    "es": TruncatedES,
    "pes": PES,
    "backprop": TruncatedBackprop,
}


def make_estimator(name: str, sigma: float = 0.01) -> Estimator:
    if name not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {name!r}")
    return TruncatedBackprop() if name == "backprop" else ESTIMATORS[name](sigma)
