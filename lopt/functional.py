"""The pure core of every learned optimizer: ``init`` and ``update``.

Both are plain functions of tensors (no in-place ops, no Python state), so
meta-training can ``torch.func.vmap`` them over a population of optimizer
nets or a batch of tasks, and differentiate through them. The
``torch.optim`` classes in :mod:`lopt.optim` call exactly these functions.

State, per parameter: momenta at every decay of ``MOMENTUM_DECAYS`` (one
tensor of shape ``(4, *param.shape)``) and a second-moment estimate, plus two
scalars: the step count and the number of skipped (non-finite) steps, and the
loss state (:func:`lopt.features.loss_state`, a few numbers, read by nets that
read the loss). That is 5 parameter-sized float32 copies, against Adam's 2.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lopt import fused as fused_kernel
from lopt import fused_plan
from lopt.features import (
    MOMENTUM_DECAYS,
    SECOND_MOMENT_DECAY,
    constant,
    loss_features,
    loss_state,
)
from lopt.nets import OptimizerNet
from lopt.weightspace import WeightSpaceSpec

State = dict[str, object]


def init(params: Sequence[Tensor]) -> State:
    """Zero momenta and second moments (float32), step 0, no loss seen."""
    device = params[0].device if params else None
    return {
        "momenta": [
            torch.zeros(len(MOMENTUM_DECAYS), *p.shape, dtype=torch.float32, device=p.device)
            for p in params
        ],
        "second_moment": [
            torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params
        ],
        "step": torch.zeros((), dtype=torch.float32, device=device),
        "skipped": torch.zeros((), dtype=torch.float32, device=device),
        "loss_stats": loss_state(device),
    }


def update(
    net: OptimizerNet,
    spec: WeightSpaceSpec,
    net_params: Mapping[str, Tensor] | None,
    grads: Sequence[Tensor],
    state: State,
    params: Sequence[Tensor],
    guard: bool = True,
    inplace: bool = False,
    fused: bool = False,
    total_steps: Tensor | float | None = None,
    multi_tensor: bool | None = None,
    loss: Tensor | float | None = None,
) -> tuple[list[Tensor], State]:
    """One step: the updates to add to ``params`` and the next state.

    ``net_params`` replaces the net's own parameters (``None`` uses them), so
    a population of perturbed nets can be vmapped through the same module.
    A step whose gradients or updates are not all finite (their sum is not)
    returns zero updates and the old state with ``skipped`` incremented.
    ``guard=False`` leaves that selection to the caller (the optimizer classes
    skip the write instead): it returns the unguarded updates and state, with
    ``skipped`` still incremented on a bad step. ``inplace=True`` (with
    ``guard=False``) writes the new momenta and second moments into the state
    tensors instead of new ones: the same numbers, without allocating
    optimizer-state-sized memory each step (the optimizer classes use it); a
    step whose gradients are not all finite then leaves the state as it was
    (the step count too) and returns zero updates, with ``skipped``
    incremented. ``fused=True`` (no autograd, no vmap)
    runs the net's per-entry part through the fused CPU kernel where it can
    (:mod:`lopt.fused`): the same formula, in one pass over memory. With
    both (and ``net_params=None``), a group of float32 CPU tensors runs as
    one multi-tensor step (:mod:`lopt.fused_plan`; a parameter or gradient
    that is not contiguous is read through a contiguous copy), whose updates
    are views of a buffer the next such step overwrites.
    ``total_steps`` is the run's step budget (None, or a value <= 0: not
    known), which nets built with ``budget=True`` read.
    ``loss`` is the training loss at ``params`` (the one ``grads`` are the
    gradients of; None: not known), which nets built with
    ``loss_features=True`` read (:func:`lopt.features.loss_features`): they
    keep its running averages in the state's ``loss_stats``, updated on every
    step with a loss they can read (positive and finite), a skipped one too.
    Other nets leave ``loss_stats`` as it was.
    ``multi_tensor`` runs the net on every tensor at once in a fixed number
    of torch operators (:mod:`lopt.multi_tensor`): what a GPU needs, where a
    step pays per kernel launch. ``None`` (the default) takes it where
    :func:`multi_tensor_default` says. With ``inplace`` (and
    ``net_params=None``) the whole step is then a fixed number of operators
    that never read a value back to the host: the state update is
    ``torch._foreach`` operators, and the guard runs on the device (a step
    whose gradients are not finite leaves the state as it was, and the
    updates of a skipped step come back as zeros), so the step can be
    captured in a CUDA graph.

    Lists are per parameter. A spec with pieces (packed attention
    projections) is run on its pieces (views of the parameters and of the
    state), and the updates and a new state come back per parameter.
    """
    if inplace and guard:
        raise ValueError("inplace=True needs guard=False: an in-place state cannot be rolled back")
    loss_in, stats = None, state.get("loss_stats")
    if net.reads_loss:  # a few scalar operations: the same on every path
        if stats is None:  # a state from before the loss state existed
            stats = loss_state(state["step"].device)
        loss_in, stats = loss_features(stats, loss)
    updates, new = _update_paths(net, spec, net_params, grads, state, params, guard, inplace,
                                 fused, total_steps, multi_tensor, loss_in)  # fmt: skip
    if stats is not None:  # a net that does not read the loss carries it as it was
        new = {**new, "loss_stats": stats}
    return updates, new


def _update_paths(net, spec, net_params, grads, state, params, guard, inplace, fused,
                  total_steps, multi_tensor, loss_in) -> tuple[list[Tensor], State]:  # fmt: skip
    """:func:`update` with the loss features ``loss_in`` computed: the one
    place a path is chosen."""
    if inplace and fused and net_params is None:  # the fast path, chosen here alone
        plan = fused_plan.plan_for(net, spec, params, grads, state)
        if plan is not None:
            return fused_plan.step(net, plan, params, grads, state, total_steps, loss_in)
    if multi_tensor is None:
        multi_tensor = multi_tensor_default(params, fused)
    if inplace and multi_tensor and net_params is None:
        return _step_on_device(net, spec, grads, state, params, total_steps, loss_in)
    if inplace and not all_finite(grads):  # before any write: the state cannot be rolled back
        zeros = [torch.zeros_like(p) for p in params]
        return zeros, {**state, "skipped": state["skipped"] + 1}
    if not spec.has_pieces:
        return _update(net, spec, net_params, grads, state, params, guard, inplace, fused,
                       total_steps, multi_tensor, loss_in)  # fmt: skip
    cut = {
        **state,
        "momenta": spec.split(state["momenta"], dim=1),
        "second_moment": spec.split(state["second_moment"]),
    }
    updates, new = _update(net, spec, net_params, spec.split(grads), cut, spec.split(params),
                           guard, inplace, fused, total_steps, multi_tensor, loss_in)  # fmt: skip
    if inplace:  # the pieces are views: the state's own tensors hold the new values
        momenta, second = state["momenta"], state["second_moment"]
    else:
        momenta = spec.join(new["momenta"], dim=1)
        second = spec.join(new["second_moment"])
    return spec.join(updates), {**new, "momenta": momenta, "second_moment": second}


def multi_tensor_default(params: Sequence[Tensor], fused: bool) -> bool:
    """Whether :func:`update` runs the multi-tensor path by default: where
    the parameters are not on the CPU (a GPU pays per kernel launch) and the
    fused CPU kernels are not asked for. On the CPU the per-tensor path,
    which works slice by slice in cache, costs less. ``LOPT_MULTI_TENSOR=0``
    in the environment turns it off everywhere."""
    return multi_tensor_allowed() and not fused and bool(params) and params[0].device.type != "cpu"


def multi_tensor_allowed() -> bool:
    """False when ``LOPT_MULTI_TENSOR=0`` is set in the environment."""
    return os.environ.get("LOPT_MULTI_TENSOR", "1") != "0"


def _step_on_device(
    net, spec, grads, state, params, total_steps, loss_in
) -> tuple[list[Tensor], State]:
    """:func:`update`'s in-place multi-tensor step: a fixed number of
    operators, none reading a value back to the host (the guard is a
    selection on the device)."""
    grads, params32 = spec.split(grads), spec.split(params)
    params32 = [p if p.dtype == torch.float32 else p.float() for p in params32]
    momenta, second = spec.split(state["momenta"], dim=1), spec.split(state["second_moment"])
    numels = [g.numel() for g in grads]
    ok_grads = all_finite(grads)
    # The gradients, zero where they are not all finite: the state then
    # stays as it was (its change is multiplied by 0, which a NaN defeats).
    flat = torch.cat([g.reshape(-1) for g in grads]).float()
    flat = torch.where(ok_grads, flat, 0.0)
    grads = [x.view(g.shape) for x, g in zip(flat.split(numels), grads)]
    gate = ok_grads.float()
    for k, d in enumerate(MOMENTUM_DECAYS):
        _foreach_lerp_([m[k] for m in momenta], grads, gate * (1 - d))
    _foreach_lerp_(second, torch._foreach_mul(grads, grads), gate * (1 - SECOND_MOMENT_DECAY))
    step = state["step"] + gate
    updates = net(spec, params32, grads, momenta, second, step, total_steps=total_steps,
                  multi_tensor=True, loss_in=loss_in)  # fmt: skip
    flat = torch.cat([u.reshape(-1) for u in updates])
    ok = ok_grads & all_finite([flat])
    flat = torch.where(ok, flat, 0.0)
    updates = [x.view(u.shape) for x, u in zip(flat.split(numels), updates)]
    updates = [u.to(p.dtype) for u, p in zip(spec.join(updates), params)]
    new_state = {
        "momenta": state["momenta"],
        "second_moment": state["second_moment"],
        "step": step,
        "skipped": state["skipped"] + (1 - ok.float()),
    }
    return updates, new_state


def _foreach_lerp_(xs: list[Tensor], ys: list[Tensor], weight: Tensor) -> None:
    """``x += weight * (y - x)`` for each pair, in place, with a 0-d tensor
    ``weight`` (``torch._foreach_lerp_`` takes a number only)."""
    change = torch._foreach_sub(ys, xs)
    torch._foreach_mul_(change, weight)
    torch._foreach_add_(xs, change)


def _update(net, spec, net_params, grads, state, params, guard, inplace, fused,
            total_steps, multi_tensor, loss_in) -> tuple[list[Tensor], State]:  # fmt: skip
    """:func:`update` on the spec's tensors (a packed parameter's pieces apart)."""
    grads = [g if g.dtype == torch.float32 else g.float() for g in grads]
    params32 = [p if p.dtype == torch.float32 else p.float() for p in params]
    step = state["step"] + 1
    b2 = SECOND_MOMENT_DECAY

    def weights(g: Tensor) -> Tensor:  # the momenta's lerp weights, shaped for g
        return (1 - constant(MOMENTUM_DECAYS, g.device)).reshape(-1, *[1] * g.dim())

    squares = None
    if inplace and fused:
        # One pass per tensor, which also sums what the channel scales need;
        # a tensor the kernel cannot read (a piece's strided momenta) takes
        # the torch ops.
        w = [1 - d for d in MOMENTUM_DECAYS]
        squares = []
        # One buffer for every tensor's sums: the channel scales read them at once.
        sums = torch.empty(len(grads), len(w) + 3, dtype=torch.float64).unbind()
        for p, g, m, v, out in zip(params32, grads, state["momenta"], state["second_moment"], sums):
            if fused_kernel.accepts_state(p, g, m, v):
                squares.append(fused_kernel.state_update(p, g, m, v, w, b2, out))
            else:
                m.lerp_(g[None], weights(g))
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                squares.append(None)
        momenta, second = state["momenta"], state["second_moment"]
    elif inplace:
        momenta = [m.lerp_(g[None], weights(g)) for m, g in zip(state["momenta"], grads)]
        second = [
            v.mul_(b2).addcmul_(g, g, value=1 - b2) for v, g in zip(state["second_moment"], grads)
        ]
    else:
        momenta = [torch.lerp(m, g[None], weights(g)) for m, g in zip(state["momenta"], grads)]
        second = [torch.lerp(v, g * g, 1 - b2) for v, g in zip(state["second_moment"], grads)]
    args = (spec, params32, grads, momenta, second, step)
    kwargs = {"fused": fused, "squares": squares, "total_steps": total_steps,
              "multi_tensor": multi_tensor, "loss_in": loss_in}  # fmt: skip
    if net_params is None:
        updates = net(*args, **kwargs)
    else:
        updates = torch.func.functional_call(net, dict(net_params), args, kwargs)

    ok = all_finite(grads + updates)
    skipped = state["skipped"] + (~ok).float()
    if not guard:
        new_state = {"momenta": momenta, "second_moment": second, "step": step, "skipped": skipped}
        return [u.to(p.dtype) for u, p in zip(updates, params)], new_state
    updates = [torch.where(ok, u, torch.zeros_like(u)).to(p.dtype) for u, p in zip(updates, params)]
    new_state = {
        "momenta": [torch.where(ok, m, old) for m, old in zip(momenta, state["momenta"])],
        "second_moment": [
            torch.where(ok, v, old) for v, old in zip(second, state["second_moment"])
        ],
        "step": torch.where(ok, step, state["step"]),
        "skipped": skipped,
    }
    return updates, new_state


def all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """Whether every entry of every tensor is finite, as a 0-d bool tensor
    (no host synchronisation). Outside autograd and vmap, a few operations
    for any number of tensors: their norms, so an entry whose square
    overflows (above about 1e19 in float32) also reads as not finite, as a
    sum that overflows did."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if torch.is_grad_enabled() or any(wrapped(x) for x in tensors):
        total = torch.stack([x.sum() for x in tensors]).sum()
    else:  # inf or nan if an entry is
        total = torch.stack(torch._foreach_norm(list(tensors))).sum()
    return torch.isfinite(total)


def apply_updates(params: Sequence[Tensor], updates: Sequence[Tensor]) -> list[Tensor]:
    """``params + updates``, out of place (for unrolls)."""
    return [p + u for p, u in zip(params, updates)]
