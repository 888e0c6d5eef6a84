"""What a learned optimizer sees: per-entry features as weight-space channels.

Channels, per parameter entry (``FEATURE_NAMES``): the parameter, the
gradient, momenta at each decay in ``MOMENTUM_DECAYS``, the root of the
second-moment estimate, and Adam's normalised gradient and direction (the
gradient and the bias-corrected 0.9-momentum divided by the root of the
bias-corrected second moment). The first seven are divided by their root
mean square over the tensor (:func:`channel_scales`); the last two are
ratios already. So a loss scaled by 1000 (gradients and momenta x1000,
second moment x1e6) gives the same features. The step count enters as
``tanh(t / timescale)`` encodings, a vector shared by every entry (nets add it
as a bias, so it costs nothing per entry). So does the step budget, when the
run's length is known (:func:`budget_features`), and, for nets that read it,
the training loss, as ratios to its own running averages and its best
(:func:`loss_features`), so a scaled loss gives the same features too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lopt.transforms import outside_transforms
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
    "adam_direction",
)
NUM_FEATURES = len(FEATURE_NAMES)
NUM_STEP_FEATURES = len(STEP_TIMESCALES)
BUDGET_SCALES: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
NUM_BUDGET_FEATURES = 2 * len(BUDGET_SCALES) + 1
# The loss's running averages (of its log) that the loss features compare it with.
LOSS_DECAYS: tuple[float, ...] = (0.9, 0.99)
# The loss state: [losses seen, best log loss, one running sum per decay].
NUM_LOSS_STATS = 2 + len(LOSS_DECAYS)
# log(loss / average) per decay, log(loss / best), then the flag that it is read.
NUM_LOSS_FEATURES = len(LOSS_DECAYS) + 2
EPS = 1e-8
ADAM_MOMENTUM = MOMENTUM_DECAYS.index(0.9)
ADAM_CHANNEL = FEATURE_NAMES.index("adam_direction")


def bias_corrections(step: Tensor) -> tuple[Tensor, Tensor]:
    """Adam's ``1 - beta1**t`` and ``1 - beta2**t`` for the 0.9 momentum and
    the second moment."""
    return 1 - MOMENTUM_DECAYS[ADAM_MOMENTUM] ** step, 1 - SECOND_MOMENT_DECAY**step


def channel_scales(
    param: Tensor,
    grad: Tensor,
    momenta: Tensor,
    second_moment: Tensor,
    c1: Tensor,
    squares: Tensor | None = None,
) -> Tensor:
    """What multiplies each of :func:`entry_channels`' channels: 1 / RMS over
    the tensor for the first seven, 1 for the normalised gradient and ``1 /
    c1`` (Adam's bias correction) for Adam's direction. Shape
    ``(NUM_FEATURES,)``; ``momenta`` is ``(K, *param.shape)``. Computed with
    norms, so nothing tensor-sized is allocated; ``squares`` (the sums of
    squares of the parameter, gradient and each momentum, and the sum of the
    second moment, in that order) skips that pass when the caller has them."""
    n = max(1, param.numel())
    if squares is not None:
        squares = squares.to(param.dtype)
    else:
        squares = torch.cat(
            [
                torch.linalg.vector_norm(param).square().reshape(1),
                torch.linalg.vector_norm(grad).square().reshape(1),
                torch.linalg.vector_norm(momenta.reshape(momenta.shape[0], -1), dim=1).square(),
                second_moment.sum().reshape(1),  # the sum of rms**2
            ]
        )
    return channel_scales_all(squares, n, c1)


def channel_scales_all(squares: Tensor, numels: Tensor | float, c1: Tensor) -> Tensor:
    """:func:`channel_scales` from the sums ``squares`` ``(..., K + 3)``
    (:func:`channel_scales`' order) of tensors of ``numels`` entries
    (broadcastable to ``(..., 1)``): ``(..., NUM_FEATURES)``, for many
    tensors at once."""
    scales = torch.rsqrt(squares / numels + 1e-30)
    if scales.dtype != c1.dtype:
        scales = scales.to(c1.dtype)
    lead = scales.shape[:-1]
    return torch.cat([scales, scales.new_ones(*lead, 1), (1 / c1).expand(*lead, 1)], -1)


def log_signal_to_noise(scales: Tensor, c1: Tensor, c2: Tensor) -> Tensor:
    """Per tensor, from its :func:`channel_scales` ``(..., NUM_FEATURES)``:
    the log of the mean square of Adam's bias-corrected 0.9-momentum over the
    mean of its bias-corrected second moment, clamped to ``[-8, 2]``. About 0
    while the gradient keeps its sign from step to step, about ``log(1/19)``
    once it is noise (a 0.9-average of noise keeps 1/19 of its variance), and
    lower still as the gradient shrinks below the size the second moment
    remembers: unlike the normalised features, it falls as a run fits its
    data. Loss-scale invariant; shape ``(...,)``."""
    momentum = 2 + ADAM_MOMENTUM  # after the parameter and the gradient
    rms = FEATURE_NAMES.index("rms")
    # scales are 1 / RMS, so mean(m**2) / mean(v) = (scale_v / scale_m)**2.
    log_ratio = 2 * (torch.log(scales[..., rms]) - torch.log(scales[..., momentum]))
    return (log_ratio + torch.log(c2) - 2 * torch.log(c1)).clamp(-8.0, 2.0)


def rms_and_denominator(second_moment: Tensor, c2: Tensor) -> tuple[Tensor, Tensor]:
    """``sqrt(v)`` and Adam's denominator ``sqrt(v_hat) + eps`` (``v_hat = v /
    c2``), so Adam's direction is ``m / denom / c1``."""
    # sqrt(v), but with a zero derivative where v == 0 (an entry whose
    # gradient has always been exactly 0, e.g. a dead ReLU unit): sqrt's is
    # inf there, and inf * (dv/dg = 0) made truncated backprop's
    # meta-gradient NaN. The inner where keeps inf out of the backward pass.
    zero = second_moment == 0
    rms = torch.where(zero, 0.0, torch.where(zero, 1.0, second_moment).sqrt())
    # In one fused op, as this runs per slice; Adam's 1 / c1 is a per-tensor
    # scalar, left to the callers (the channel scales). eps is a cached 0-d
    # device tensor: a fresh one per step is a host-to-device copy.
    rsqrt_c2 = c2.rsqrt()
    return rms, torch.addcmul(scalar_constant(EPS, c2.device), rms, rsqrt_c2)


def entry_channels(
    param: Tensor, grad: Tensor, momenta: Tensor, second_moment: Tensor, c2: Tensor
) -> Tensor:
    """The channels of (a slice of) one parameter before the per-tensor
    :func:`channel_scales`, channel first: ``(NUM_FEATURES, *shape)``. The
    last is ``m / (sqrt(v_hat) + eps)``, Adam's direction times ``c1``."""
    rms, denom = rms_and_denominator(second_moment, c2)
    return torch.cat(
        [
            param[None],
            grad[None],
            momenta,
            rms[None],
            (grad / denom)[None],
            (momenta[ADAM_MOMENTUM] / denom)[None],
        ]
    )


def entry_features(
    spec: WeightSpaceSpec,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momenta: Sequence[Tensor],
    second_moments: Sequence[Tensor],
    step: Tensor,
) -> WeightSpace:
    """The normalised features of every parameter as one channels-last
    WeightSpace (for inspection and plain-layer reference computations)."""
    c1, c2 = bias_corrections(step)
    out = []
    for t, p, g, m, v in zip(spec.tensors, params, grads, momenta, second_moments):
        x = entry_channels(p, g, m, v, c2)
        x = x * channel_scales(p, g, m, v, c1).reshape(-1, *[1] * p.dim())
        out.append(x.movedim(0, -1).reshape(*t.view, NUM_FEATURES))
    return WeightSpace(spec, out)


_CONSTANTS: dict[tuple[tuple[float, ...], torch.device], Tensor] = {}


def constant(values: tuple[float, ...], device: torch.device) -> Tensor:
    """``values`` as a float32 tensor on ``device``, made once: a fresh one
    per step is a host-to-device copy on a GPU, which a captured CUDA graph
    cannot hold. Do not modify it."""
    key = (values, torch.device(device))
    if key not in _CONSTANTS:
        with outside_transforms():  # kept: not wrapped for a transform it was made in
            _CONSTANTS[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return _CONSTANTS[key]


_SCALARS: dict[tuple[float, torch.device], Tensor] = {}


def scalar_constant(value: float, device: torch.device) -> Tensor:
    """``value`` as a 0-d float32 tensor on ``device``, made once (as
    :func:`constant`, without a view per call: it runs per slice per step)."""
    key = (value, torch.device(device))
    found = _SCALARS.get(key)
    if found is None:
        found = _SCALARS[key] = constant((value,), device)[0]
    return found


def step_features(step: Tensor) -> Tensor:
    """``tanh(t / timescale)`` for each timescale: shape ``(NUM_STEP_FEATURES,)``."""
    scales = constant(STEP_TIMESCALES, step.device)
    return torch.tanh(step.float() / scales)


def budget_features(step: Tensor, total_steps: Tensor | float | None) -> Tensor:
    """Where step ``t`` lies in a run of ``total_steps`` steps, as VeLO reads
    it: with ``f = min(t / total_steps, 1)``, ``tanh(f / s)`` and ``tanh((1 - f)
    / s)`` for each ``s`` in :data:`BUDGET_SCALES` (fine near the start and
    near the end), then 1, the flag that the budget is known. An unknown
    budget (``None``, or a value <= 0, as meta-training passes for runs it
    hides the budget from) gives all zeros. Shape ``(NUM_BUDGET_FEATURES,)``."""
    if total_steps is None:
        return torch.zeros(NUM_BUDGET_FEATURES, dtype=torch.float32, device=step.device)
    if isinstance(total_steps, Tensor):
        total = total_steps.to(dtype=torch.float32, device=step.device)
    else:  # a number: made once per value, not copied to the device each step
        total = scalar_constant(float(total_steps), step.device)
    known = total > 0
    f = (step.float() / torch.where(known, total, 1.0)).clamp(0.0, 1.0)
    scales = constant(BUDGET_SCALES, step.device)
    feats = torch.cat([torch.tanh(f / scales), torch.tanh((1 - f) / scales), f.new_ones(1)])
    return torch.where(known, feats, torch.zeros_like(feats))


def loss_state(device: torch.device | None = None) -> Tensor:
    """The loss state before any loss is seen: ``(NUM_LOSS_STATS,)`` zeros."""
    return torch.zeros(NUM_LOSS_STATS, dtype=torch.float32, device=device)


def loss_features(stats: Tensor, loss: Tensor | float | None) -> tuple[Tensor, Tensor]:
    """What a net that reads the loss sees of this step's ``loss``, and the
    loss state after it.

    ``stats`` (:func:`loss_state`) holds the number of losses seen, the
    lowest log loss and, per decay ``b`` of :data:`LOSS_DECAYS`, the running
    average ``a_b`` of the log loss (kept without bias correction, which is
    applied here). The features: ``tanh(log loss - a_b)`` for each decay
    (below 0 while the loss falls, above it on a spike), ``tanh(log loss -
    best)`` and 1, the flag that the loss was read; differences of logs, so
    a loss scaled by any factor gives the same features. The first loss
    gives zeros but the flag. A loss that is None, not finite or not above 0
    (a log needs it positive) is not read: all zeros, the state unchanged.
    Pure tensor operations, no host read: it runs inside vmap and in a
    captured CUDA graph. Shapes ``(NUM_LOSS_FEATURES,)``, ``(NUM_LOSS_STATS,)``."""
    if loss is None:
        return torch.zeros(NUM_LOSS_FEATURES, dtype=stats.dtype, device=stats.device), stats
    loss = torch.as_tensor(loss, dtype=stats.dtype, device=stats.device)
    if loss.numel() != 1:
        raise ValueError(f"the loss must be one number, got a tensor of shape {tuple(loss.shape)}")
    loss = loss.reshape(())
    usable = torch.isfinite(loss) & (loss > 0)
    log_loss = torch.where(usable, loss, 1.0).log()
    count, best, sums = stats[0], stats[1], stats[2:]
    seen = count > 0
    decays = constant(LOSS_DECAYS, stats.device)
    debias = torch.where(seen, 1 - decays**count, 1.0)
    rel = torch.cat([log_loss - sums / debias, (log_loss - best).reshape(1)])
    rel = torch.where(seen, torch.tanh(rel), 0.0)
    flag = usable.to(stats.dtype).reshape(1)
    features = torch.cat([rel * flag, flag])
    new = torch.cat(
        [
            (count + 1).reshape(1),
            torch.where(seen, torch.minimum(best, log_loss), log_loss).reshape(1),
            torch.lerp(sums, log_loss.expand_as(sums), 1 - decays),
        ]
    )
    return features, torch.where(usable, new, stats)
