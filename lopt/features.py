"""What a learned optimizer sees: per-entry features as weight-space channels.

Channels, per parameter entry (``FEATURE_NAMES``): the parameter, the
gradient, momenta at each decay in ``MOMENTUM_DECAYS``, the root of the
second-moment estimate, the gradient and the 0.9-momentum divided by that
root. Each channel is divided by its root mean square over the tensor, so a
loss scaled by 1000 (gradients, momenta x1000, second moment x1e6) gives the
same features. The step count enters as ``tanh(t / timescale)`` encodings, a
vector shared by every entry (nets add it as a bias, so it costs nothing per
entry).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lopt.weightspace import WeightSpace, WeightSpaceSpec

MOMENTUM_DECAYS: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999)
SECOND_MOMENT_DECAY = 0.999
STEP_TIMESCALES: tuple[float, ...] = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000)
FEATURE_NAMES: tuple[str, ...] = (
    "param",
    "grad",
    *(f"momentum_{d}" for d in MOMENTUM_DECAYS),
    "rms",
    "grad_over_rms",
    "momentum_0.9_over_rms",
)
NUM_FEATURES = len(FEATURE_NAMES)
NUM_STEP_FEATURES = len(STEP_TIMESCALES)
EPS = 1e-8
_BASE_MOMENTUM = MOMENTUM_DECAYS.index(0.9)


def entry_features(
    spec: WeightSpaceSpec,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momenta: Sequence[Tensor],
    second_moments: Sequence[Tensor],
) -> WeightSpace:
    """Stack and normalise the per-entry features of every parameter.

    ``momenta[i]`` has shape ``(*params[i].shape, len(MOMENTUM_DECAYS))``.
    """
    out = []
    for t, p, g, m, v in zip(spec.tensors, params, grads, momenta, second_moments):
        rms = v.sqrt()
        inv = 1.0 / (rms + EPS)
        x = torch.cat(
            [
                p[..., None],
                g[..., None],
                m,
                rms[..., None],
                (g * inv)[..., None],
                (m[..., _BASE_MOMENTUM] * inv)[..., None],
            ],
            dim=-1,
        )
        x = x.reshape(*x.shape[: x.dim() - len(t.shape) - 1], *t.view, NUM_FEATURES)
        dims = tuple(range(-len(t.view) - 1, -1))
        scale = torch.rsqrt(x.square().mean(dim=dims, keepdim=True) + 1e-30)
        out.append(x * scale)
    return WeightSpace(spec, out)


def step_features(step: Tensor) -> Tensor:
    """``tanh(t / timescale)`` for each timescale: shape ``(NUM_STEP_FEATURES,)``."""
    scales = torch.tensor(STEP_TIMESCALES, dtype=torch.float32, device=step.device)
    return torch.tanh(step.float() / scales)
