"""The pure core of every learned optimizer: ``init`` and ``update``.

Both are plain functions of tensors (no in-place ops, no Python state), so
meta-training can ``torch.func.vmap`` them over a population of optimizer
nets or a batch of tasks, and differentiate through them. The
``torch.optim`` classes in :mod:`lopt.optim` call exactly these functions.

State, per parameter: momenta at every decay of ``MOMENTUM_DECAYS`` (one
tensor of shape ``(*param.shape, 4)``) and a second-moment estimate, plus two
scalars: the step count and the number of skipped (non-finite) steps. That is
5 parameter-sized float32 copies, against Adam's 2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lopt.features import (
    EPS,
    MOMENTUM_DECAYS,
    SECOND_MOMENT_DECAY,
    entry_features,
    step_features,
)
from lopt.nets import OptimizerNet
from lopt.weightspace import WeightSpaceSpec

State = dict[str, object]
_ADAM_MOMENTUM = MOMENTUM_DECAYS.index(0.9)


def init(params: Sequence[Tensor]) -> State:
    """Zero momenta and second moments (float32), step 0."""
    device = params[0].device if params else None
    return {
        "momenta": [
            torch.zeros(*p.shape, len(MOMENTUM_DECAYS), dtype=torch.float32, device=p.device)
            for p in params
        ],
        "second_moment": [
            torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params
        ],
        "step": torch.zeros((), dtype=torch.float32, device=device),
        "skipped": torch.zeros((), dtype=torch.float32, device=device),
    }


def update(
    net: OptimizerNet,
    spec: WeightSpaceSpec,
    net_params: Mapping[str, Tensor] | None,
    grads: Sequence[Tensor],
    state: State,
    params: Sequence[Tensor],
) -> tuple[list[Tensor], State]:
    """One step: the updates to add to ``params`` and the next state.

    ``net_params`` replaces the net's own parameters (``None`` uses them), so
    a population of perturbed nets can be vmapped through the same module.
    A step whose gradients or updates are not all finite returns zero updates
    and the old state with ``skipped`` incremented.
    """
    grads = [g.float() for g in grads]
    params32 = [p.float() for p in params]
    decays = torch.tensor(MOMENTUM_DECAYS, dtype=torch.float32, device=grads[0].device)
    step = state["step"] + 1
    momenta = [m * decays + (1 - decays) * g[..., None] for m, g in zip(state["momenta"], grads)]
    b2 = SECOND_MOMENT_DECAY
    second = [b2 * v + (1 - b2) * g.square() for v, g in zip(state["second_moment"], grads)]

    # Adam's bias-corrected direction: the base the net corrects.
    c1 = 1 - MOMENTUM_DECAYS[_ADAM_MOMENTUM] ** step
    c2 = 1 - b2**step
    base = [
        (m[..., _ADAM_MOMENTUM] / c1) / ((v / c2).sqrt() + EPS) for m, v in zip(momenta, second)
    ]
    feats = entry_features(spec, params32, grads, momenta, second)
    enc = step_features(step)
    if net_params is None:
        updates = net(feats, enc, base)
    else:
        updates = torch.func.functional_call(net, dict(net_params), (feats, enc, base))

    ok = torch.stack(
        [torch.isfinite(g).all() for g in grads] + [torch.isfinite(u).all() for u in updates]
    ).all()
    updates = [torch.where(ok, u, torch.zeros_like(u)).to(p.dtype) for u, p in zip(updates, params)]
    new_state = {
        "momenta": [torch.where(ok, m, old) for m, old in zip(momenta, state["momenta"])],
        "second_moment": [
            torch.where(ok, v, old) for v, old in zip(second, state["second_moment"])
        ],
        "step": torch.where(ok, step, state["step"]),
        "skipped": state["skipped"] + (~ok).float(),
    }
    return updates, new_state


def apply_updates(params: Sequence[Tensor], updates: Sequence[Tensor]) -> list[Tensor]:
    """``params + updates``, out of place (for unrolls)."""
    return [p + u for p, u in zip(params, updates)]
