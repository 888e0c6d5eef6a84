"""Optimizer nets: from per-entry features to an update for every parameter.

Every net outputs, per entry, a direction ``d`` and a log-magnitude ``m``;
the update is

    update = -(lr * adam_direction + step_mult * d * exp(mag_mult * m))

where ``adam_direction`` is Adam's bias-corrected m / sqrt(v) and ``lr``,
``step_mult`` are meta-learned scalars (stored as logs), and the whole update
of a tensor with fan-in ``n`` (the product of all but its first axis, as in
``torch.nn.init``; 1-D tensors are not scaled) is multiplied by
``(FAN_IN_REF / n) ** fan_in_exp``, a meta-learned exponent. That factor is
what lets one step size serve a width-8 and a width-1024 layer (a hidden
layer's output moves with fan-in times the per-entry step). The net's
:class:`~lopt.update_rule.UpdateRule` fixes what is not learned: whether a
layer that reads the network's input gets the width factor (by default it
keeps factor 1, muP's rule: its fan-in is the data's, not a width), and
whether the learned term (the update minus Adam's part) of every weight of
2+ axes loses its component along the weight, row by row (per output neuron
or channel; by default it does), so only Adam's part changes the rows' norms
to first order: short unrolls reward nets that inflate weights (larger
logits lower the loss fast), which later destabilises deep networks. A net
built with ``budget=True`` also reads where the step lies in the run
(``total_steps``, :func:`~lopt.features.budget_features`) beside the step
count, and multiplies the whole update by a learned schedule, ``exp(w .
[step features, budget features] + b)``: a warm-up and a decay, learned,
starting from a short warm-up and a decay over the end of the run
(:func:`schedule_prior`). A net built with ``term_schedule=True`` also
gives the learned term its own factor per tensor, learned from the budget
and the tensor's signal-to-noise ratio
(:meth:`OptimizerNet.term_log_factors`), so the term can shrink relative to
Adam's part late in a run. The net learns a correction on top of Adam (as
the UNF paper's net does on top of SGD with momentum), and its output layer
starts near zero, so a fresh net is a sane, slow optimizer. A net built with
``loss_features=True`` also reads the training loss, as ratios to its own
running averages (:func:`~lopt.features.loss_features`), in the trunk's bias,
the term's factor and, as a brake only, the learned schedule: a loss above its
averages or its best can slow the whole update, never speed it up. With
``loss_anneal=True`` the loss features also time the schedule's anneal (the
part below 0 that reads the budget, multiplied by a learned factor of them,
1 at first), so a run whose loss still falls can anneal later than one on a
plateau. A net built with ``depth_factor=True`` multiplies every update of a network with a
residual stream by ``exp(residual_log_rate) * writers ** -depth_exp``,
``writers`` the most weight matrices that write one neuron group
(:func:`stream_writers`: 1 without residual connections, which keep factor 1;
2L + 2 for an L-layer pre-LN transformer), both learned from 0: the depth
analogue of the width factor, since one step does not suit a residual stream
of any depth. A net built with ``orthogonal=True`` steps every weight
matrix of a hidden layer (not an embedding, not the output layer) along the
nearest semi-orthogonal matrix to its 0.9-momentum (:func:`orthogonalised`,
as Muon does), at unit RMS per entry, times the tensor's rate and a learned
``ortho_weight``, in place of Adam's direction, which keeps a learned share
``ortho_adam_keep`` (0 at first): a direction that no per-entry feature
holds, since it mixes every entry of the matrix. With ``orthogonal_snr=True``
that step is also times the tensor's gradient signal-to-noise ratio to a
learned power (0 at first): a unit-RMS step does not shrink as a run fits its
data, where Adam's direction does. Every input is loss-scale
invariant, so the update is too.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lopt import fused as fused_kernel
from lopt.features import (
    ADAM_CHANNEL,
    ADAM_MOMENTUM,
    BUDGET_SCALES,
    EPS,
    NUM_BUDGET_FEATURES,
    NUM_FEATURES,
    NUM_LOSS_FEATURES,
    NUM_STEP_FEATURES,
    STEP_TIMESCALES,
    bias_corrections,
    budget_features,
    channel_scales,
    channel_scales_all,
    constant,
    entry_channels,
    log_signal_to_noise,
    rms_and_denominator,
    step_features,
)
from lopt.nn import NFLinear, flat_terms
from lopt.transforms import outside_transforms
from lopt.update_rule import UpdateRule
from lopt.weightspace import INPUT, OUTPUT, TensorSpec, WeightSpaceSpec

MAX_LOG_MAGNITUDE = 10.0  # exp() of more than this is clipped: no overflow to inf
MAX_LOG_SCHEDULE = 3.0  # the learned schedule multiplies an update by at most e**3
# The learned term's schedule (term_schedule=True) is stored divided by
# this: the outer loop's Adam moves each parameter by about its meta learning
# rate per step whatever the gradient's size, and a handful of parameters
# that set the term's size late in long runs must move within hundreds of
# outer steps, not thousands.
TERM_SCHEDULE_GAIN = 10.0
# The loss features' weights in the learned schedule are stored divided by
# this, for the same reason: they start at zero and must matter within
# hundreds of outer steps.
LOSS_SCHEDULE_GAIN = 10.0
# A net built with loss_anneal=True multiplies the anneal, the part of its
# log-schedule that reads the budget where that part is below 0, by
# exp(LOSS_SCHEDULE_GAIN * v . loss features), v learned from 0, the log of
# that factor held within +-MAX_LOG_ANNEAL: a run whose loss still falls can
# keep its rate longer, one on a plateau can anneal sooner. It never raises
# the update above the schedule without an anneal, and a rising loss only
# deepens the anneal (OptimizerNet.anneal_power), so it has no loss-driven
# speed-up to run away with.
MAX_LOG_ANNEAL = 2.0
# Where the learned schedule starts. A warm-up: e**-WARMUP_PRIOR times
# e**(WARMUP_PRIOR * tanh(t / WARMUP_PRIOR_STEPS)), about 0.26 at the first
# step and 1 by the tenth (the first steps rest on a few gradients, and a
# step that suits later training kills ReLUs there). With a known budget, a
# decay: 1 through most of the run, then down to e**-DECAY_PRIOR at its end,
# along tanh((1 - f) / DECAY_PRIOR_WIDTH) (f = t / total_steps), as
# practitioners decay a rate. From a flat start, meta-gradients of truncated
# unrolls move the schedule slowly, and a net that does neither spikes in its
# first steps or stalls or diverges late in a run.
WARMUP_PRIOR = 2.0
WARMUP_PRIOR_STEPS = 3
DECAY_PRIOR = 2.5
DECAY_PRIOR_WIDTH = 0.3
MATRIX_POOLS = {(0,), (1,), (0, 1)}  # the pools of a matrix the fused kernel sums
CHUNK = 65536  # entries per slice in the per-entry layers on the CPU (a few MB of activations)
# On a GPU a step is bound by kernel launches, not cache: slices of whole
# tensors up to 4M entries (about 0.5 GB of activations at width 16).
GPU_CHUNK = 1 << 22
FAN_IN_REF = 64.0  # fan-in at which the width factor is 1
# Newton-Schulz steps of the quintic iteration that orthogonalises a
# momentum (orthogonal=True), and the iteration's coefficients: they pull
# every singular value into about [0.7, 1.2] within 5 steps from a matrix of
# spectral norm at most 1, instead of converging to exactly 1 slowly.
ORTHO_STEPS = 5
ORTHO_COEFFS = (3.4445, -4.7750, 2.0315)
# Where ortho_weight starts, in a fresh net and in one warm-started from a
# net without the term (whose Adam direction on hidden matrices it then
# replaces). Meta-training keeps it near there: the shipped nfn-real holds
# 0.341 after 900 PES steps that started it at 0.3 (its card). `python -m
# benchmarks.update_scale --on ortho_weight` weighs a net's value against
# its neighbours on a suite.
ORTHO_INIT = 0.3
# The gain on ortho_snr_exp (orthogonal_snr=True): the meta-optimizer moves a
# scalar by about its rate per outer step, so at 1e-3 a few hundred steps can
# carry the exponent from 0 across the range that matters (0 to 1) only with
# a gain of a few.
ORTHO_SNR_GAIN = 4.0


def schedule_prior(decay_width: float = DECAY_PRIOR_WIDTH) -> tuple[Tensor, Tensor]:
    """The learned schedule's initial weights ``(1, step + budget features)``
    and bias ``(1,)``: ``log factor = WARMUP_PRIOR * (tanh(t / s) - 1)`` (s =
    WARMUP_PRIOR_STEPS), plus ``-DECAY_PRIOR * (1 - tanh((1 - f) / w) /
    tanh(1 / w))`` when the budget is known (0 at the start, -DECAY_PRIOR at
    the end; its features are all zero when it is not). ``w`` is
    ``decay_width`` (one of :data:`~lopt.features.BUDGET_SCALES`, the widths a
    budget feature has): the fraction of the run over which most of the
    decay happens; every net starts from DECAY_PRIOR_WIDTH."""
    if decay_width not in BUDGET_SCALES:
        raise ValueError(
            f"decay width must be one of the budget features' scales "
            f"{', '.join(map(str, BUDGET_SCALES))}, got {decay_width}"
        )
    w = torch.zeros(1, NUM_STEP_FEATURES + NUM_BUDGET_FEATURES)
    w[0, STEP_TIMESCALES.index(WARMUP_PRIOR_STEPS)] = WARMUP_PRIOR
    n = len(BUDGET_SCALES)
    w[0, -1] = -DECAY_PRIOR  # the known-budget flag
    w[0, NUM_STEP_FEATURES + n + BUDGET_SCALES.index(decay_width)] = DECAY_PRIOR / math.tanh(
        1 / decay_width
    )
    return w, torch.tensor([-WARMUP_PRIOR])


@functools.lru_cache(maxsize=64)  # a meta-training run meets many specs: bounded
def _width_ratios(spec: WeightSpaceSpec, on_input_layers: bool, device: torch.device) -> Tensor:
    """:func:`step_width_log_ratio` of every tensor of ``spec``, as a tensor."""
    ratios = [step_width_log_ratio(spec, t, on_input_layers) for t in spec.tensors]
    with outside_transforms():  # cached: not wrapped for a transform it was made in
        return torch.tensor(ratios, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=64)
def _numels(spec: WeightSpaceSpec) -> Tensor:
    return torch.tensor([[max(1, t.numel)] for t in spec.tensors], dtype=torch.float64)


def stream_writers(spec: WeightSpaceSpec) -> int:
    """The most weight tensors (2+ axes) that write one neuron group (its rows):
    1 in a network without residual connections; in a residual network the
    stream's group is written by the stem and every block (an L-layer pre-LN
    transformer: token and position embeddings, and each layer's attention
    and MLP output projections, 2L + 2). Heads' nested groups are not counted."""
    counts: dict[str, int] = {}
    for t in spec.tensors:
        if t.kind != "weight" or len(t.axes) < 2:
            continue
        for a in t.axes:
            if a.exponent == 1 and a.group is not None and a.parent is None:
                counts[a.group] = counts.get(a.group, 0) + 1
    return max(counts.values(), default=1)


@functools.lru_cache(maxsize=64)
def _log_stream_writers(spec: WeightSpaceSpec) -> float:
    return math.log(stream_writers(spec))


def orthogonalised(matrix: Tensor) -> Tensor:
    """About ``U V^T`` of ``matrix = U S V^T`` (``(..., rows, cols)``), by
    :data:`ORTHO_STEPS` quintic Newton-Schulz steps, times
    ``sqrt(max(rows, cols))`` so its entries have an RMS of about 1 at any
    shape. It commutes with permutations of the rows and of the columns, so
    an update built from it is as equivariant as the NF-layers. Batched over
    leading axes; differentiable, and vmappable."""
    a, b, c = ORTHO_COEFFS
    rows, cols = matrix.shape[-2:]
    x = matrix.transpose(-2, -1) if rows > cols else matrix  # the Gram matrix of the short side
    # Divided by its norm (an upper bound of the spectral norm): the result
    # does not depend on the momentum's scale, as no input of the net does.
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp_min(1e-30)
    for _ in range(ORTHO_STEPS):
        gram = x @ x.transpose(-2, -1)
        x = a * x + (b * gram + c * gram @ gram) @ x
    if rows > cols:
        x = x.transpose(-2, -1)
    return x * math.sqrt(max(rows, cols))


@functools.lru_cache(maxsize=64)
def matrix_groups(spec: WeightSpaceSpec) -> dict[tuple[int, int], tuple[int, ...]]:
    """The tensors of ``spec`` that take the orthogonalised step
    (:func:`orthogonal_tensors`), grouped by their shape as a matrix
    ``(first axis, the rest)``: index lists in ``spec``'s order, groups in
    the order of their first tensor."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (t, on) in enumerate(zip(spec.tensors, orthogonal_tensors(spec))):
        if on:
            groups.setdefault((t.shape[0], math.prod(t.shape[1:])), []).append(i)
    return {shape: tuple(idx) for shape, idx in groups.items()}


def orthogonal_entries(spec: WeightSpaceSpec, starts: Sequence[int]) -> Tensor | None:
    """The entries of the tensors that take the orthogonalised step
    (:func:`orthogonal_tensors`) in a flat buffer of all of ``spec``'s
    entries, where tensor ``i`` starts at ``starts[i]`` (None: no tensor
    takes it)."""
    on = orthogonal_tensors(spec)
    spans = [torch.arange(math.prod(t.shape)) + s for t, s, o in zip(spec.tensors, starts, on) if o]
    return torch.cat(spans) if spans else None


@functools.lru_cache(maxsize=64)
def orthogonal_tensors(spec: WeightSpaceSpec) -> tuple[bool, ...]:
    """Per tensor of ``spec``, whether a net with ``orthogonal=True`` steps
    it along its orthogonalised momentum: a weight of 2+ axes whose
    first neuron axis is the one it writes (exponent 1: not an embedding,
    whose rows are the tokens it reads) and whose rows are not the network's
    output neurons (the output layer fits the loss's scale, not a basis)."""
    kinds = dict(spec.group_kinds)
    out = []
    for t in spec.tensors:
        axes = [a for a in t.axes if a.group is not None]
        ok = t.kind == "weight" and len(t.shape) >= 2 and bool(axes)
        out.append(ok and axes[0].exponent == 1 and kinds.get(axes[0].group) != OUTPUT)
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _orthogonal_mask(spec: WeightSpaceSpec, device: torch.device) -> Tensor:
    """:func:`orthogonal_tensors` as a bool tensor."""
    with outside_transforms():  # cached: not wrapped for a transform it was made in
        return torch.tensor(orthogonal_tensors(spec), dtype=torch.bool, device=device)


def slice_entries(device: torch.device) -> int:
    """Entries per slice of the per-entry layers for tensors on ``device``."""
    return CHUNK if device.type == "cpu" else GPU_CHUNK


def width_log_ratio(t: TensorSpec) -> float:
    """``log(FAN_IN_REF / fan_in)``, fan-in being the product of all but the
    first axis; 0 (no width factor) for tensors of fewer than 2 axes."""
    return math.log(FAN_IN_REF / math.prod(t.shape[1:])) if len(t.shape) >= 2 else 0.0


def step_width_log_ratio(spec: WeightSpaceSpec, t: TensorSpec, on_input_layers: bool) -> float:
    """:func:`width_log_ratio`, or 0 for a layer reading the network's input
    unless ``on_input_layers`` (muP's rule: only fan-ins that are widths
    scale the step)."""
    if not on_input_layers and reads_network_input(spec, t):
        return 0.0
    return width_log_ratio(t)


def reads_network_input(spec: WeightSpaceSpec, t: TensorSpec) -> bool:
    """Whether ``t`` is a weight whose fan-in axis is the network's input, so
    that its fan-in is set by the data (16 features, 1 channel x 3 x 3), not
    by a width."""
    if t.kind != "weight" or len(t.axes) < 2 or t.axes[1].group is None:
        return False
    return spec.group_kind(t.axes[1].group) == INPUT


class TensorInputs(NamedTuple):
    """What the per-entry part of a net reads of one tensor in a step."""

    t: TensorSpec
    param: Tensor
    grad: Tensor
    momenta: Tensor  # (K, *shape)
    second_moment: Tensor
    scales: Tensor  # (NUM_FEATURES,): lopt.features.channel_scales
    neg_lr: Tensor  # -lr times the width factor
    out_scale: Tensor  # (2,): what multiplies the output layer's two channels
    # Precomputed for the fused kernel, for all tensors at once (or None):
    first_weight: Tensor | None = None  # the trunk's first weight, scales folded in
    base_scale: float | None = None  # neg_lr times Adam's channel scale
    rsqrt_c2: float | None = None


class TrunkSlice(NamedTuple):
    """One slice of :meth:`OptimizerNet.trunk_outputs`."""

    out: Tensor  # (outputs, entries): the output layer's values
    base: Tensor  # (entries,): Adam's direction times -lr
    rows: int  # rows of the first axis in the slice (0: a 0-d tensor)
    hidden: Tensor | None  # (width, entries): the trunk's activations (torch path)
    row_sums: Tensor | None = None  # (outputs - 2, rows): sums of the pooled outputs
    col_sums: Tensor | None = None  # (outputs - 2, cols)
    # The fused kernel's sums for neuron_stats: (3, rows) and (3, cols) of
    # the tensor seen as its stat_matrix.
    stat_sums: tuple[Tensor, Tensor] | None = None


def matrix_view(t: TensorSpec) -> tuple[int, int]:
    """A tensor's entries as the fused kernel's matrix: ``(first axis, the
    rest)``; 1-D and 0-d tensors are one row."""
    if len(t.view) >= 2:
        return t.view[0], math.prod(t.view[1:])
    return 1, math.prod(t.view)


def matrix_terms(
    t: TensorSpec, terms: Sequence[Tensor]
) -> tuple[int, Tensor | None, Tensor | None, list[Tensor]]:
    """Sort NF-layer terms ``(2, *view)`` (broadcasting) by what they vary
    along, the tensor seen as its :func:`matrix_view` ``(rows, cols)``:
    returns ``cols``, the row terms ``(rows, 2)`` and column terms ``(2,
    cols)`` (summed; None when there are none) and the terms that are
    neither."""
    rows, cols = matrix_view(t)
    row_terms = col_terms = None
    rest = []
    for term in terms:
        pad = term.reshape(2, *[1] * (len(t.view) - term.dim() + 1), *term.shape[1:])
        varies = [a for a, n in enumerate(pad.shape[1:]) if n != 1]
        if not varies:
            one = pad.reshape(1, 2)
            row_terms = one.expand(rows, 2) if row_terms is None else row_terms + one
        elif len(t.view) >= 2 and varies == [0]:
            one = pad.reshape(2, rows).t()
            row_terms = one if row_terms is None else row_terms + one
        elif (len(t.view) >= 2 and varies == list(range(1, len(t.view)))) or len(t.view) == 1:
            one = pad.reshape(2, cols)
            col_terms = one if col_terms is None else col_terms + one
        else:
            rest.append(term)
    return cols, row_terms, col_terms, rest


def tangent_correction(u: Tensor, base: Tensor, param: Tensor) -> Tensor:
    """``u`` with the part of its learned term (``u`` minus Adam's part
    ``base``, both shaped like ``param``) that lies along each row of the
    weight (its first axis) removed."""
    w = param.reshape(param.shape[0], -1)
    learned = (u - base).reshape_as(w)
    along = (learned * w).sum(1, keepdim=True) / ((w * w).sum(1, keepdim=True) + 1e-30)
    return u - (along * w).reshape(u.shape)


class OptimizerNet(nn.Module):
    """Base class: the update formula; subclasses define :meth:`body`."""

    def __init__(
        self,
        width: int = 16,
        depth: int = 1,
        lr: float = 1e-3,
        step_mult: float = 1e-3,
        mag_mult: float = 0.1,
        out_scale: float = 0.01,
        fan_in_exp: float = 0.0,
        rule: UpdateRule | dict[str, Any] | None = None,
        budget: bool = False,
        term_schedule: bool = False,
        loss_features: bool = False,
        depth_factor: bool = False,
        orthogonal: bool = False,
        orthogonal_snr: bool = False,
        loss_anneal: bool = False,
    ) -> None:
        super().__init__()
        if loss_anneal and not loss_features:
            raise ValueError(
                "loss_anneal=True needs loss_features=True (it reads them to time the anneal)"
            )
        if orthogonal_snr and not orthogonal:
            raise ValueError("orthogonal_snr=True needs orthogonal=True (it scales that step)")
        if term_schedule and not budget:
            raise ValueError("term_schedule=True needs budget=True (it reads the budget features)")
        if loss_features and not budget:
            raise ValueError("loss_features=True needs budget=True (they enter its schedule)")
        if width < 1 or depth < 1:
            raise ValueError(f"width and depth must be positive, got width={width}, depth={depth}")
        if lr <= 0 or step_mult <= 0:
            raise ValueError(f"lr and step_mult must be positive, got {lr}, {step_mult}")
        self._rule = UpdateRule.coerce(rule)
        self._config = dict(
            width=width,
            depth=depth,
            lr=lr,
            step_mult=step_mult,
            mag_mult=mag_mult,
            out_scale=out_scale,
            fan_in_exp=fan_in_exp,
            rule=self._rule.to_dict(),
        )
        if budget:  # absent from older configs: those nets never read the budget
            self._config["budget"] = True
        if term_schedule:
            self._config["term_schedule"] = True
        if loss_features:
            self._config["loss_features"] = True
        if loss_anneal:  # absent from older configs: those nets have none
            self._config["loss_anneal"] = True
        if depth_factor:  # absent from older configs: those nets have none
            self._config["depth_factor"] = True
        self.mag_mult = mag_mult
        self.fan_in_exp = nn.Parameter(torch.tensor(float(fan_in_exp)))
        self.log_lr = nn.Parameter(torch.tensor(math.log(lr)))
        self.log_step_mult = nn.Parameter(torch.tensor(math.log(step_mult)))
        if depth_factor:
            # Zero at first: a net warm-started from one without them runs as
            # that net did.
            self.residual_log_rate = nn.Parameter(torch.zeros(()))
            self.depth_exp = nn.Parameter(torch.zeros(()))
        if orthogonal:  # absent from older configs: those nets have none
            self._config["orthogonal"] = True
            self.ortho_weight = nn.Parameter(torch.tensor(ORTHO_INIT))
            self.ortho_adam_keep = nn.Parameter(torch.zeros(()))
        if orthogonal_snr:  # zero at first: warm-started, the net runs as it did
            self._config["orthogonal_snr"] = True
            self.ortho_snr_exp = nn.Parameter(torch.zeros(()))
        self.inp = nn.Linear(NUM_FEATURES, width)
        self.step_inp = nn.Linear(NUM_STEP_FEATURES, width, bias=False)
        if budget:
            # Zero at first: a net warm-started from one without the budget
            # input behaves as that net did until meta-training moves it.
            self.budget_inp = nn.Linear(NUM_BUDGET_FEATURES, width, bias=False)
            # The learned schedule: the log of one factor on the whole update
            # (Adam's part too, which the per-entry output cannot scale), from
            # the step and the budget.
            self.schedule = nn.Linear(NUM_STEP_FEATURES + NUM_BUDGET_FEATURES, 1)
            with torch.no_grad():
                self.budget_inp.weight.zero_()
                weight, bias = schedule_prior()
                self.schedule.weight.copy_(weight)
                self.schedule.bias.copy_(bias)
        if term_schedule:
            # The learned term's own log-factor per tensor, from the budget
            # and the tensor's signal-to-noise ratio; zero at first, so a net
            # warm-started from one without it runs as that net did. Not from
            # the step count: with the budget hidden, a factor of t alone
            # would learn the lengths of the meta-training runs.
            self.term_schedule = nn.Linear(NUM_BUDGET_FEATURES, 1)
            self.term_snr_exp = nn.Parameter(torch.zeros(()))
            with torch.no_grad():
                self.term_schedule.weight.zero_()
                self.term_schedule.bias.zero_()
        if loss_features:
            # The loss features into the trunk, the schedule and the term's
            # factor; zero at first, so a net warm-started from one without
            # them runs as that net did.
            self.loss_inp = nn.Linear(NUM_LOSS_FEATURES, width, bias=False)
            self.loss_schedule = nn.Linear(NUM_LOSS_FEATURES, 1, bias=False)
            modules = [self.loss_inp, self.loss_schedule]
            if term_schedule:
                self.loss_term = nn.Linear(NUM_LOSS_FEATURES, 1, bias=False)
                modules.append(self.loss_term)
            if loss_anneal:
                # The anneal's timing from the loss (schedule_scale); zero at
                # first, so a warm-started net runs as it did.
                self.loss_anneal = nn.Linear(NUM_LOSS_FEATURES, 1, bias=False)
                modules.append(self.loss_anneal)
            with torch.no_grad():
                for m in modules:
                    m.weight.zero_()
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.out = nn.Linear(width, 2)
        with torch.no_grad():
            self.out.weight.mul_(out_scale)
            self.out.bias.zero_()

    @property
    def reads_budget(self) -> bool:
        """Whether the net reads the run's step budget (``total_steps``,
        :func:`~lopt.features.budget_features`) and has a learned schedule
        (one factor on the whole update, from the step and budget features);
        a net without them ignores ``total_steps``."""
        return self._config.get("budget", False)

    @property
    def has_term_schedule(self) -> bool:
        """Whether the learned term (the update minus Adam's part) has a
        learned factor of its own per tensor (:meth:`term_log_factors`)."""
        return self._config.get("term_schedule", False)

    @property
    def reads_loss(self) -> bool:
        """Whether the net reads the training loss
        (:func:`~lopt.features.loss_features`; ``loss_in`` of :meth:`forward`)."""
        return self._config.get("loss_features", False)

    @property
    def has_loss_anneal(self) -> bool:
        """Whether the loss features also scale the part of the learned
        schedule that reads the budget (:meth:`schedule_scale`)."""
        return self._config.get("loss_anneal", False)

    @property
    def reads_depth(self) -> bool:
        """Whether the update of a network with a residual stream is scaled
        by its depth: ``exp(residual_log_rate) * stream_writers(spec) **
        -depth_exp`` (:func:`stream_writers`; 1 without a residual stream)."""
        return self._config.get("depth_factor", False)

    @property
    def has_orthogonal_term(self) -> bool:
        """Whether a hidden layer's weight matrix steps along its
        orthogonalised momentum (:meth:`orthogonal_terms`) in place of a
        share of Adam's direction (:meth:`tensor_factors`)."""
        return self._config.get("orthogonal", False)

    @property
    def reads_ortho_snr(self) -> bool:
        """Whether the orthogonalised step is times the tensor's gradient
        signal-to-noise ratio to a learned power (:meth:`orthogonal_terms`)."""
        return self._config.get("orthogonal_snr", False)

    def orthogonal_terms(
        self,
        spec: WeightSpaceSpec,
        momenta: Sequence[Tensor],
        scales: Tensor | None,
        c1: Tensor,
        c2: Tensor,
        log_factors: Tensor | None = None,
    ) -> list[Tensor | None]:
        """Per tensor of ``spec``: ``-lr * factor * ortho_weight *
        orthogonalised(m)``, ``m`` its 0.9-momentum seen as ``(first axis,
        the rest)`` and ``factor`` its width, role and depth factor (as
        Adam's part has); None for a tensor that takes none
        (:func:`orthogonal_tensors`). Adam's bias correction is a factor on
        ``m``, which the orthogonalisation drops. A net that reads the
        signal-to-noise ratio (:attr:`reads_ortho_snr`) multiplies it by
        ``exp(min(ORTHO_SNR_GAIN * ortho_snr_exp * log_snr,
        MAX_LOG_SCHEDULE))``, ``log_snr`` the tensor's
        :func:`~lopt.features.log_signal_to_noise` from its
        :func:`~lopt.features.channel_scales` ``scales`` ``(T, NUM_FEATURES)``
        (None for a net that does not read it) and Adam's bias corrections
        ``c1``, ``c2``. ``log_factors``: :meth:`tensor_log_factors` of
        ``spec``, when the caller has them already."""
        log_rates = self.tensor_log_factors(spec) if log_factors is None else log_factors
        if self.reads_ortho_snr:
            log_snr = log_signal_to_noise(scales, c1, c2)
            snr_log = ORTHO_SNR_GAIN * self.ortho_snr_exp * log_snr
            log_rates = log_rates + snr_log.clamp(max=MAX_LOG_SCHEDULE)
        rates = (-self.log_lr.exp() * self.ortho_weight * torch.exp(log_rates)).unbind()
        out: list[Tensor | None] = [None] * len(spec.tensors)
        # Matrices of one shape go through the iteration as one batch: a
        # step's matrix products are per shape, not per tensor (many small
        # layers of one width cost one batch).
        for shape, idx in matrix_groups(spec).items():
            stack = torch.stack([momenta[i][ADAM_MOMENTUM].reshape(shape) for i in idx])
            ortho = orthogonalised(stack) * torch.stack([rates[i] for i in idx]).view(-1, 1, 1)
            ortho = ortho.contiguous()  # a transposed result: reshaped below without copies
            for i, o in zip(idx, ortho.unbind()):
                out[i] = o.reshape(spec.tensors[i].shape)
        return out

    @property
    def rule(self) -> UpdateRule:
        """What of the update is not learned (:class:`~lopt.update_rule.UpdateRule`),
        fixed when the net is built: a net runs as it was meta-trained."""
        return self._rule

    def role_log_rates(self, spec: WeightSpaceSpec) -> Tensor | None:
        """Per tensor of ``spec``, a learned log-factor on its whole update
        (None: the net has none; :class:`NFNNet` with ``role_rates``)."""
        return None

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments: enough to rebuild the net."""
        return {k: dict(v) if isinstance(v, dict) else v for k, v in self._config.items()}

    def forward(
        self,
        spec: WeightSpaceSpec,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        momenta: Sequence[Tensor],
        second_moments: Sequence[Tensor],
        step: Tensor,
        fused: bool = False,
        squares: Sequence[Tensor] | None = None,
        total_steps: Tensor | float | None = None,
        multi_tensor: bool = False,
        loss_in: Tensor | None = None,
    ) -> list[Tensor]:
        """The update of every parameter, from the optimizer state after this
        step's gradient (``step`` counts it; ``momenta[i]`` is ``(K, *shape)``).
        ``total_steps`` is the run's step budget (None or <= 0: unknown), read
        by nets built with ``budget=True``. ``loss_in`` is the step's
        :func:`~lopt.features.loss_features` (None: all zeros, the loss not
        read), read by nets built with ``loss_features=True``.
        ``squares``, per tensor, are the sums :func:`~lopt.features.channel_scales`
        would compute, when the caller has them already (the fused state
        update of :func:`lopt.functional.update`).

        Per tensor the work runs on slices of at most ``CHUNK`` entries (on
        a GPU ``GPU_CHUNK``, see :func:`slice_entries`) along the first axis,
        channel-first (``(channels, entries)``), so activations
        stay small and in cache and no tensor-sized feature or activation
        array is stored. ``fused=True`` (no autograd: the optimizer classes)
        runs the per-entry part through the fused CPU kernel wherever it can
        read the tensors (:mod:`lopt.fused`); the numbers are the same up to
        float rounding. ``multi_tensor=True`` runs every tensor at once in a
        fixed number of torch operators instead (:mod:`lopt.multi_tensor`,
        what a GPU runs; not with ``fused``), the same numbers up to float
        rounding."""
        if multi_tensor and not fused:
            from lopt import multi_tensor as multi  # it builds on this module

            plan = multi.plan_for(self, spec, step.device)
            if plan is not None:
                return multi.forward(
                    self, plan, params, grads, momenta, second_moments, step, total_steps, loss_in
                )
        if fused and torch.is_grad_enabled():
            raise RuntimeError("fused=True is for steps without autograd (torch.no_grad())")
        c1, c2, steps_in, budget_in, bias = self.step_inputs(step, total_steps, loss_in)
        if squares is None:
            squares = [None] * len(params)
        vectorised = fused and all(sq is not None for sq in squares)
        if vectorised:
            # Every tensor's sums at hand (the fused state pass): all at once.
            scales_all = channel_scales_all(torch.stack(squares), _numels(spec), c1)
            scales = scales_all.unbind()
        else:
            scales = [
                channel_scales(*state, c1, squares=sq)
                for *state, sq in zip(params, grads, momenta, second_moments, squares)
            ]
        all_scales = None  # every tensor's scales at once, for what reads them so
        if self.has_term_schedule or self.reads_ortho_snr:
            all_scales = scales_all if vectorised else torch.stack(scales)
        term_log = None
        if self.has_term_schedule:
            term_log = self.term_log_factors(all_scales, c1, c2, budget_in, loss_in)
        # Computed once: Adam's part and the orthogonal step share them.
        log_factors = self.tensor_log_factors(spec)
        neg_lrs_all, out_scales_all = self.tensor_factors(spec, term_log, log_factors)
        out_scales, neg_lrs = out_scales_all.unbind(), neg_lrs_all.unbind()
        inputs = [
            TensorInputs(*a)
            for a in zip(
                spec.tensors, params, grads, momenta, second_moments, scales, neg_lrs, out_scales
            )
        ]
        if vectorised:  # what the fused kernel reads of each tensor, for all at once
            first = (self.inp.weight * scales_all[:, None, :]).unbind()
            base = (neg_lrs_all * scales_all[:, ADAM_CHANNEL]).tolist()
            r = float(c2.rsqrt())
            inputs = [x._replace(first_weight=w, base_scale=b, rsqrt_c2=r)
                      for x, w, b in zip(inputs, first, base)]  # fmt: skip
        outs = self.entry_outputs(spec, inputs, bias, c2, fused)
        updates = []
        tangent_rule = self._rule.learned_term_tangent
        for x, chunks in zip(inputs, outs):
            tangent = tangent_rule and x.t.kind == "weight" and x.param.dim() >= 2
            # _finish adds the learned term into Adam's part in place (fused).
            bases = [base.clone() for _, base, _ in chunks] if tangent else []
            ups = [self._finish(x.t, o, base, terms, fused) for o, base, terms in chunks]
            u = (ups[0] if len(ups) == 1 else torch.cat(ups)).reshape(x.param.shape)
            if tangent:
                u = tangent_correction(u, torch.cat(bases).reshape(u.shape), x.param)
            updates.append(u)
        if self.has_orthogonal_term:
            terms = self.orthogonal_terms(spec, momenta, all_scales, c1, c2, log_factors)
            updates = [u if z is None else u.add_(z) if fused else u + z
                       for u, z in zip(updates, terms)]  # fmt: skip
        scale = self.schedule_scale(steps_in, budget_in, loss_in)
        if scale is not None:  # the learned schedule: one scalar, one pass
            scale = scale.to(updates[0].dtype)
            updates = [u.mul_(scale) if fused else u * scale for u in updates]
        return updates

    def step_inputs(
        self, step: Tensor, total_steps: Tensor | float | None, loss_in: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
        """What every tensor's per-entry part reads of the step: Adam's bias
        corrections ``c1``, ``c2``, the step features, the budget features
        (None for a net that does not read the budget) and the trunk's
        first-layer bias with them (and the loss features ``loss_in``, for a
        net that reads them) folded in."""
        c1, c2 = bias_corrections(step)
        steps_in = step_features(step)
        bias = self.inp.bias + self.step_inp(steps_in)
        budget_in = None
        if self.reads_budget:
            budget_in = budget_features(step, total_steps)
            bias = bias + self.budget_inp(budget_in)
        if loss_in is not None and self.reads_loss:
            bias = bias + self.loss_inp(loss_in)
        return c1, c2, steps_in, budget_in, bias

    def depth_log_factor(self, log_writers: Tensor | float) -> Tensor:
        """The log of the depth factor on the update of a network whose
        residual stream has ``exp(log_writers)`` writers (:func:`stream_writers`):
        ``residual_log_rate - depth_exp * log_writers``. Only for a net built
        with ``depth_factor=True`` (:attr:`reads_depth`)."""
        return self.residual_log_rate - self.depth_exp * log_writers

    def tensor_factors(
        self,
        spec: WeightSpaceSpec,
        term_log: Tensor | None = None,
        log_factors: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per tensor of ``spec``: ``-lr`` times its factor (width factor,
        role rate and depth factor) ``(T,)`` (for a hidden matrix of a net
        with ``orthogonal=True``, times ``ortho_adam_keep``: the share of
        Adam's direction it keeps), and what multiplies the output layer's two
        channels ``(T, 2)``: ``-step_mult`` times the factor (and times
        ``exp(term_log)``, the learned term's own factor, when given), and
        ``mag_mult``. Folded into the output layer, so per entry ``update =
        -lr * adam + o[0] * exp(min(o[1], MAX_LOG_MAGNITUDE))``; computed for
        all tensors at once (a step pays per operation). ``log_factors``:
        :meth:`tensor_log_factors` of ``spec``, when the caller has them."""
        if log_factors is None:
            log_factors = self.tensor_log_factors(spec)
        factors = torch.exp(log_factors)
        mag = torch.full_like(factors, self.mag_mult)  # a fill, not a host-to-device copy
        term = factors if term_log is None else factors * term_log.exp()
        out_scales = torch.stack([-self.log_step_mult.exp() * term, mag], -1)
        adam = factors
        if self.has_orthogonal_term:
            mask = _orthogonal_mask(spec, factors.device)
            adam = factors * torch.where(mask, self.ortho_adam_keep, 1.0)
        return -self.log_lr.exp() * adam, out_scales

    def tensor_log_factors(self, spec: WeightSpaceSpec) -> Tensor:
        """Per tensor of ``spec``, the log of its factor on the update
        ``(T,)``: width factor, role rate and depth factor."""
        ratios = _width_ratios(spec, self._rule.width_factor_on_input_layers, self.log_lr.device)
        log_factors = self.fan_in_exp * ratios
        role_rates = self.role_log_rates(spec)
        if role_rates is not None:
            log_factors = log_factors + role_rates
        if self.reads_depth:
            log_writers = _log_stream_writers(spec)
            if log_writers > 0:  # a residual stream: its own rate, and the depth's
                log_factors = log_factors + self.depth_log_factor(log_writers)
        return log_factors

    def term_log_factors(
        self,
        scales: Tensor,
        c1: Tensor,
        c2: Tensor,
        budget_in: Tensor | None,
        loss_in: Tensor | None = None,
    ) -> Tensor | None:
        """The log of the learned term's own factor per tensor ``(T,)``, from
        the tensors' :func:`~lopt.features.channel_scales` ``(T,
        NUM_FEATURES)`` and the budget features: ``TERM_SCHEDULE_GAIN * (w .
        budget features + b + a * log_snr)``, at most
        ``MAX_LOG_SCHEDULE``, where ``log_snr`` is
        :func:`~lopt.features.log_signal_to_noise` (plus ``w' . loss_in``
        for a net that reads the loss). It lets the net shrink its
        correction to Adam late in a run and as a tensor's gradient turns to
        noise, while the normalised features it reads stay the same. None
        for a net without it (``term_schedule=False``)."""
        if not self.has_term_schedule:
            return None
        log_snr = log_signal_to_noise(scales, c1, c2)
        shared = self.term_schedule(budget_in)
        raw = shared + self.term_snr_exp * log_snr
        if loss_in is not None and self.reads_loss:
            raw = raw + self.loss_term(loss_in)
        return (TERM_SCHEDULE_GAIN * raw).clamp(max=MAX_LOG_SCHEDULE)

    def anneal_power(self, loss_in: Tensor) -> Tensor:
        """The power ``g`` on the learned schedule's anneal of a net built
        with ``loss_anneal=True`` (:meth:`schedule_scale`), from the loss
        features ``loss_in``: ``exp(LOSS_SCHEDULE_GAIN * v . loss_in)``, its
        log within ``+-MAX_LOG_ANNEAL`` (a 0-d tensor), ``v``'s weights on
        the loss's ratios held at 0 or above, so ``g`` never falls as the
        loss rises."""
        # Weights of at least 0 on the loss's ratios (all but the last
        # feature, the flag that the loss was read): a loss above its
        # averages may only deepen the anneal. Free weights were
        # meta-trained to lift it there, a feedback that sent a 3,000-step
        # run's loss from 9e-9 back up to 2e-5 over its last quarter. The
        # clamp passes gradients at 0.
        weight = self.loss_anneal.weight[0]
        weight = torch.cat([weight[:-1].clamp(min=0), weight[-1:]])
        log_g = LOSS_SCHEDULE_GAIN * (weight @ loss_in)
        return log_g.clamp(-MAX_LOG_ANNEAL, MAX_LOG_ANNEAL).exp()

    def schedule_scale(
        self, steps_in: Tensor, budget_in: Tensor | None, loss_in: Tensor | None = None
    ) -> Tensor | None:
        """The learned schedule's factor on the whole update (a 0-d
        tensor), or None for a net without one: ``exp(w . [step features,
        budget features] + b + (g - 1) * min(w_b . budget features, 0) -
        LOSS_SCHEDULE_GAIN * max(w', 0) . max(loss_in, 0))``, at most
        ``e**MAX_LOG_SCHEDULE`` (``w_b``: the budget features' part of ``w``;
        ``w'`` for a net that reads the loss; ``g = exp(LOSS_SCHEDULE_GAIN *
        v . loss_in)``, its log within ``+-MAX_LOG_ANNEAL``, for a net built
        with ``loss_anneal=True``, else 1)."""
        if not self.reads_budget:
            return None
        log_scale = self.schedule(torch.cat([steps_in, budget_in]))[0]
        if loss_in is not None and self.reads_loss:
            if self.has_loss_anneal:
                # The anneal (the budget's part of the schedule where it is
                # below 0: the decay) times g: the loss trend moves when and
                # how deep the anneal is, not the rate before it.
                budget_part = self.schedule.weight[0, NUM_STEP_FEATURES:] @ budget_in
                budget_part = budget_part.clamp(max=0)
                power = self.anneal_power(loss_in)
                log_scale = log_scale + (power - 1) * budget_part
            # A brake only: the loss above its averages (or its best) slows
            # the update. Free weights were meta-trained to speed it up when
            # the loss ran above its long average, a feedback that diverged
            # a 3,000-step run. The clamp passes gradients at 0.
            brake = self.loss_schedule.weight[0].clamp(min=0) @ loss_in.clamp(min=0)
            log_scale = log_scale - LOSS_SCHEDULE_GAIN * brake
        return log_scale.clamp(max=MAX_LOG_SCHEDULE).exp()

    @staticmethod
    def _finish(t: TensorSpec, o: Tensor, base: Tensor, terms: list[Tensor], fused: bool) -> Tensor:
        """``base + (o[0] + terms) * exp(min(o[1] + terms, MAX_LOG_MAGNITUDE))``
        of one slice. ``terms`` come only where the fused kernel reads the
        slice (elsewhere entry_outputs has added them); it takes terms that
        vary along the first axis or along all the others, any other term is
        added first."""
        if fused and fused_kernel.accepts(o, base):
            cols, row_terms, col_terms, rest = matrix_terms(t, terms)
            if rest:
                o = o.reshape(2, *t.view)
                for term in rest:
                    o = o.add_(term)
                o = o.reshape(2, -1)
            return fused_kernel.finish(
                o[0], o[1], base, MAX_LOG_MAGNITUDE, cols, row_terms, col_terms
            )[0]
        if fused:  # no autograd: fresh buffers, updated in place
            return base.addcmul_(o[0], o[1].clamp_(max=MAX_LOG_MAGNITUDE).exp_())
        return torch.addcmul(base, o[0], o[1].clamp(max=MAX_LOG_MAGNITUDE).exp())

    def entry_outputs(
        self,
        spec: WeightSpaceSpec,
        inputs: Sequence[TensorInputs],
        bias: Tensor,
        c2: Tensor,
        fused: bool,
    ) -> list[list[tuple[Tensor, Tensor, list[Tensor]]]]:
        """Per tensor, per slice: the net's output ``(2, entries)`` (direction,
        log-magnitude), each channel multiplied by that tensor's
        ``out_scale``; Adam's direction times ``neg_lr`` ``(entries,)``
        for those entries; and terms still to add to the output seen as ``(2,
        *view)`` (broadcasting; only where the fused kernel will read the
        slice, which is then the whole tensor). Nothing else of a slice
        outlives it: held buffers are fresh memory (page faults) at every
        step. ``fused`` is passed on to :meth:`trunk_outputs` (one slice per
        tensor)."""
        raise NotImplementedError

    def trunk_outputs(
        self,
        x: TensorInputs,
        bias: Tensor,
        c2: Tensor,
        w_out: Tensor,
        b_out: Tensor,
        fused: bool = False,
        pool_cols: int = 0,
        stat_cols: int = 0,
    ) -> Iterator[TrunkSlice]:
        """Yield, per slice of the first axis, ``w_out @ trunk(features) +
        b_out`` ``(outputs, entries)``, Adam's direction times ``x.neg_lr``
        ``(entries,)``, the slice's rows and the trunk's activations ``(width,
        entries)``. The features' ``x.scales`` are folded into the first
        layer's weights. ``fused=True`` runs the whole tensor as one slice through the
        fused CPU kernel (:mod:`lopt.fused`) when it can read the tensors; the
        activations never leave the kernel (None). With ``pool_cols`` as well,
        the kernel stores only the first two outputs and returns the row and
        column sums of the others, the entries seen as rows of ``pool_cols``.
        With ``stat_cols`` (``pool_cols`` if that is given) the kernel also
        sums what :func:`neuron_stats` reads, the entries seen as rows of
        ``stat_cols`` (``stat_sums``)."""
        t, p, g, m, v = x.t, x.param, x.grad, x.momenta, x.second_moment
        if fused and fused_kernel.accepts_state(p, g, m, v):
            if x.first_weight is not None:
                weight, base_scale, rsqrt_c2 = x.first_weight, x.base_scale, x.rsqrt_c2
            else:
                weight = self.inp.weight * x.scales
                base_scale = float(x.neg_lr * x.scales[ADAM_CHANNEL])
                rsqrt_c2 = float(c2.rsqrt())
            layers = [(weight, bias)] + [(lay.weight, lay.bias) for lay in self.hidden]
            o, base, row_sums, col_sums = fused_kernel.entry_outputs(
                p,
                g,
                m,
                v,
                ADAM_MOMENTUM,
                rsqrt_c2,
                EPS,
                layers,
                w_out,
                b_out.reshape(-1),
                base_scale,
                pool_from=2 if pool_cols else (w_out.shape[0] if stat_cols else None),
                pool_cols=pool_cols or stat_cols,
                stats=bool(stat_cols),
            )
            stat_sums = None
            if stat_cols:
                stat_sums = (row_sums[-3:], col_sums[-3:])
                row_sums, col_sums = (row_sums[:-3], col_sums[:-3]) if pool_cols else (None, None)
            rows = t.view[0] if t.view else 0
            yield TrunkSlice(o, base, rows, None, row_sums, col_sums, stat_sums)
            return
        weight = self.inp.weight * x.scales
        neg_lr = x.neg_lr * x.scales[ADAM_CHANNEL]
        if t.view:
            # Sliced along the view's first axis (an attention projection's
            # view starts with its heads or its query / key / value part).
            p, g, v = (y.reshape(t.view) for y in (p, g, v))
            m = m.reshape(m.shape[0], *t.view)
            rows = max(1, slice_entries(p.device) // max(1, math.prod(t.view[1:])))
            bounds = [(r0, min(r0 + rows, t.view[0])) for r0 in range(0, t.view[0], rows)]
        else:
            bounds = [None]
        for b in bounds:
            chunk = (
                (p, g, m, v)
                if b is None
                else (p[b[0] : b[1]], g[b[0] : b[1]], m[:, b[0] : b[1]], v[b[0] : b[1]])
            )
            f = entry_channels(*chunk, c2).reshape(NUM_FEATURES, -1)
            h = torch.addmm(bias[:, None], weight, f).relu_()
            for layer in self.hidden:
                h = torch.addmm(layer.bias[:, None], layer.weight, h).relu_()
            yield TrunkSlice(
                torch.addmm(b_out, w_out, h),
                f[ADAM_CHANNEL] * neg_lr,
                (0 if b is None else b[1] - b[0]),
                h,
            )


class PerParamMLP(OptimizerNet):
    """Per-parameter MLP (learned_optimization's small_fc_lopt; "Deep Sets" in
    the UNF paper): the same features, no interaction across entries."""

    def entry_outputs(self, spec, inputs, bias, c2, fused):
        outs = []
        for x in inputs:
            s = x.out_scale
            w, b = self.out.weight * s[:, None], (self.out.bias * s)[:, None]
            slices = self.trunk_outputs(x, bias, c2, w, b, fused)
            outs.append([(sl.out, sl.base, []) for sl in slices])
        return outs


class AttentionTemplate(nn.Module):
    """Attention's tensor roles, for the NF-layer's weights: torch's encoder
    layer (a packed query-key-value projection), a block of separate
    projections with biases, and cross-attention to a memory of another
    width (separate projections without biases)."""

    def __init__(self, d: int = 8, heads: int = 2, memory: int = 6) -> None:
        super().__init__()
        self.heads = heads
        self.inp = nn.Linear(4, d)
        self.layer = nn.TransformerEncoderLayer(d, heads, d, dropout=0.0, batch_first=True)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.cross = nn.MultiheadAttention(
            d, heads, kdim=memory, vdim=memory, bias=False, batch_first=True
        )
        self.head = nn.Linear(d, 3)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        h = self.layer(self.inp(x))
        b, t = h.shape[0], h.shape[1]
        q, k, v = (
            f(h).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        h = h + self.o(y.transpose(1, 2).flatten(2))
        h = h + self.cross(h, memory, memory, need_weights=False)[0]
        return self.head(h)


class EmbeddingTemplate(nn.Module):
    """Embeddings' tensor roles, for the NF-layer's weights: token and
    position tables (rows: an input group, the tokens or positions; columns:
    the hidden group they write) summed into a hidden layer."""

    def __init__(self, vocab: int = 5, length: int = 4, d: int = 6) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(length, d)
        self.fc, self.head = nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[-1], device=x.device))
        return self.head(torch.relu(self.fc(h)))


def template_specs(attention: bool = True, embedding: bool = False) -> list[WeightSpaceSpec]:
    """The architectures whose roles an NFN net is built with: MLPs (any depth
    from 1, with and without biases), Conv1d / Conv2d nets with pooling and
    flatten heads, standalone tensors of 1 to 4 axes (norms), (``attention``)
    the projections of multi-head attention and (``embedding``) token and
    position embeddings read from a model's graph."""
    return list(_template_specs(attention, embedding))


@functools.cache
def _template_specs(attention: bool, embedding: bool) -> tuple[WeightSpaceSpec, ...]:
    # specs are immutable: cached
    mlp = [nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)]
    nets: list[nn.Module] = [
        nn.Sequential(*mlp),
        nn.Sequential(nn.Linear(4, 3)),
        nn.Sequential(nn.Linear(4, 5, bias=False), nn.Linear(5, 5, bias=False)),
    ]
    for conv in (nn.Conv1d, nn.Conv2d):
        for head in ("pool", "flatten"):
            layers = [conv(2, 4, 3), conv(4, 4, 3), conv(4, 4, 3)]
            n_in = 4 if head == "pool" else 8
            nets.append(nn.Sequential(*layers, nn.Linear(n_in, 3)))
    # Shape templates (a Linear straight after a conv reads it flattened), not
    # models to run: the sequential rule reads them.
    specs = [WeightSpaceSpec.from_module(n, graph=False) for n in nets]
    shapes = {f"standalone{k}": (3,) * k for k in range(1, 5)}
    axes = {name: (None,) * len(shape) for name, shape in shapes.items()}
    specs.append(WeightSpaceSpec.from_axes(axes, shapes))
    if attention:
        specs.append(WeightSpaceSpec.from_module(AttentionTemplate()))
    if embedding:
        specs.append(WeightSpaceSpec.from_module(EmbeddingTemplate()))
    return tuple(specs)


def pooled_sums(hv: Tensor, pools: set[tuple[int, ...]]) -> dict[tuple[int, ...], Tensor]:
    """Sums of ``hv`` (channels, *axes) over each axis set in ``pools`` (``()``:
    ``hv`` itself), the pooled axes dropped. Each set is summed from the
    largest subset already summed, so a tensor is read once per pooled axis
    rather than once per set."""
    kept: dict[tuple[int, ...], Tensor] = {(): hv}
    # A fixed order (a set's is not): the sums, to the last bit, do not
    # depend on how the set was built.
    for p in sorted(pools, key=lambda p: (len(p), p)):
        q = max((q for q in kept if set(q) <= set(p)), key=len)
        rest = [1 + a for a in p if a not in q]
        kept[p] = kept[q].sum(dim=rest, keepdim=True) if rest else kept[q]
    return {p: kept[p].squeeze([1 + a for a in p]) if p else hv for p in pools}


NEURON_STATS: tuple[str, ...] = ("log_rms_param", "log_rms_adam_direction", "log_rel_rms_grad")
"""What :func:`neuron_stats` measures over each pool of a tensor's entries:
the log root mean square of the parameter and of Adam's direction (each
floored at ``STAT_FLOOR``: zero-initialised biases stay finite), and the
log of the gradient's root mean square over the pool relative to the whole
tensor's (0 for the whole tensor). All three are loss-scale invariant.
With ``width_free``, a tensor of 2+ axes adds ``0.5 * log(fan_in /
FAN_IN_REF)`` to its parameter's log RMS, which reads it relative to a
width-scaled init: a layer 4x wider than any seen in meta-training then
reads what a narrow one reads at the same point of training."""
STAT_POOLS: tuple[str, ...] = ("row", "column", "tensor", "vector")
"""The pools, each with its own coefficients: the rows (output neurons) and
columns (input neurons) of a tensor of 2+ axes, and the whole of it; the
whole of a tensor of fewer axes (a bias)."""
STAT_FLOOR = 1e-3
# term_in_adam_units' fixed coefficients, flattened: 1 on the log RMS of
# Adam's direction over the whole of a tensor (pools "tensor" and "vector").
ADAM_UNITS: tuple[float, ...] = tuple(
    float(pool in ("tensor", "vector") and stat == "log_rms_adam_direction")
    for pool in STAT_POOLS
    for stat in NEURON_STATS
)


def neuron_stats(
    t: TensorSpec, param: Tensor, grad: Tensor, adam_direction: Tensor, width_free: bool = False
) -> dict[str, Tensor]:
    """:data:`NEURON_STATS` of one tensor over each of its :data:`STAT_POOLS`,
    channels last, each broadcastable to ``(*t.view, len(NEURON_STATS))``:
    the statistics an optimizer needs for per-neuron or per-layer trust
    ratios (LARS, Nero), which the per-entry features, normalised per
    tensor, do not carry. Pooled over a neuron's entries, they are
    permutation-equivariant. A tensor with nested axes (an attention
    projection viewed as heads) is read in its own shape, one neuron per row
    and column, since a pool over heads that kept a within-head index would
    not be; its statistics come back broadcastable to its view."""
    nested = any(ax.parent is not None for ax in t.axes)
    view = (t.shape if nested else t.view) or (1,)
    # The three squared tensors side by side: one reduction per pool reads
    # all of them (a step pays per operation on small tensors).
    sq = torch.stack([x.reshape(view) for x in (param, adam_direction, grad)], -1).square()
    every = tuple(range(len(view)))
    whole = sq.mean(every, keepdim=True)
    g_all = whole[..., 2:]
    f2 = whole.new_full((*whole.shape[:-1], 2), STAT_FLOOR**2)
    floor = torch.cat([f2, STAT_FLOOR**2 * g_all + 1e-30], -1)
    pools = (
        {"row": every[1:], "column": (0, *every[2:]), "tensor": every}
        if len(view) >= 2
        else {"vector": every}
    )
    log_g_all = 0.5 * torch.log(g_all + floor[..., 2:])
    # Every entry of a weight starts at a scale of fan_in ** -0.5, so its
    # log RMS alone reads width as much as training.
    shift = -0.5 * width_log_ratio(t) if width_free else 0.0
    offset = torch.cat([torch.full_like(g_all, shift), torch.zeros_like(g_all), -log_g_all], -1)
    out = {}
    for name, dims in pools.items():
        mean = whole if dims == every else sq.mean(dims, keepdim=True)
        out[name] = 0.5 * torch.log(mean + floor) + offset
    if nested:
        out = {k: v.reshape(*_spread(v.shape[:-1], t.shape, t.view), v.shape[-1])
               for k, v in out.items()}  # fmt: skip
    return out


def stat_matrix(t: TensorSpec) -> tuple[int, int]:
    """``(rows, cols)``: the entries of ``t`` as :func:`neuron_stats` reads
    them, a row per output neuron (its shape for nested axes, else its
    view). A tensor it reads as a vector has its whole-tensor statistic
    alone, which any matrix gives: its :func:`matrix_view`, the one the
    fused kernel pools the NF-layer's channels over."""
    nested = any(ax.parent is not None for ax in t.axes)
    view = (t.shape if nested else t.view) or (1,)
    if len(view) < 2:
        return matrix_view(t)
    return view[0], math.prod(view[1:])


class StatLayout(NamedTuple):
    """Where each tensor's neuron statistics lie when all are computed at
    once from the fused kernel's sums (:meth:`NFNNet._stat_terms_from_sums`)."""

    row_tensor: Tensor  # per matrix row of every tensor: its tensor
    row_count: Tensor  # per row: the entries it sums
    col_slot: Tensor  # per matrix column: its input neuron's slot
    col_slots: int
    col_tensor: Tensor  # per slot: its tensor
    col_count: Tensor  # per slot: the entries it sums
    numel: Tensor  # per tensor
    shift: Tensor  # per tensor: the width-free offset of the parameter's statistic
    whole_pool: Tensor  # per tensor: the pool of its whole-tensor statistic
    all_tensors: Tensor  # arange
    # Per tensor: its rows, its slots, and the broadcast shapes of its row,
    # column and whole terms over its view (the whole one alone for < 2 axes).
    pieces: tuple[tuple[int, int, int, int, tuple[tuple[int, ...], ...]], ...]


@functools.lru_cache(maxsize=64)
def _stat_layout(spec: WeightSpaceSpec, have: tuple[int, ...], width_free: bool) -> StatLayout:
    row_tensor, row_count, col_slot, col_tensor, col_count = [], [], [], [], []
    numel, shift, pool, pieces = [], [], [], []
    r, c = 0, 0
    for j, i in enumerate(have):
        t = spec.tensors[i]
        nested = any(ax.parent is not None for ax in t.axes)
        view = (t.shape if nested else t.view) or (1,)
        rows, cols = stat_matrix(t)
        row_tensor += [j] * rows
        row_count += [cols] * rows
        numel.append(rows * cols)
        shift.append(-0.5 * width_log_ratio(t) if width_free else 0.0)
        ones = (1,) * len(t.view)
        if len(view) >= 2:
            per = cols // view[1]  # columns of one input neuron (its kernel positions)
            col_slot += [c + k // per for k in range(cols)]
            col_tensor += [j] * view[1]
            col_count += [per * rows] * view[1]
            kept = [(view[0], *[1] * (len(view) - 1)), (1, view[1], *[1] * (len(view) - 2))]
            if nested:
                kept = [tuple(_spread(k, t.shape, t.view)) for k in kept]
            pieces.append((r, r + rows, c, c + view[1], (*kept, ones)))
            pool.append(STAT_POOLS.index("tensor"))
            c += view[1]
        else:
            col_slot += [-1] * cols  # summed nowhere: a vector has its whole-tensor pool alone
            pieces.append((r, r + rows, c, c, (ones,)))
            pool.append(STAT_POOLS.index("vector"))
        r += rows
    slots = c + 1  # the last, discarded slot
    col_slot = [slots - 1 if k < 0 else k for k in col_slot]
    long, f32 = torch.long, torch.float32
    return StatLayout(
        torch.tensor(row_tensor, dtype=long),
        torch.tensor(row_count, dtype=f32),
        torch.tensor(col_slot, dtype=long),
        slots,
        torch.tensor(col_tensor + [0], dtype=long),
        torch.tensor(col_count + [1], dtype=f32),
        torch.tensor(numel, dtype=f32),
        torch.tensor(shift, dtype=f32),
        torch.tensor(pool, dtype=long),
        torch.arange(len(have)),
        tuple(pieces),
    )


def _spread(kept: tuple[int, ...], shape: tuple[int, ...], view: tuple[int, ...]) -> list[int]:
    """A keepdim statistic's shape over ``shape`` (each axis full or 1) as a
    shape over ``view``, each axis of ``shape`` spanning whole axes of it."""
    out, j = [], 0
    for k, n in zip(kept, shape):
        span, prod = [], 1
        while prod < n or (n == 1 and j < len(view) and view[j] == 1 and not span):
            span.append(view[j])
            prod *= view[j]
            j += 1
        out.extend(span if k == n else [1] * len(span))
    return out


class NFNNet(OptimizerNet):
    """The NFN optimizer net: per-entry layers, then one permutation-equivariant
    NF-layer (role-tied, so it runs on any depth, width and kernel size) beside
    a per-entry output path. Tensors whose role the NF-layer does not know
    (exotic standalone tensors, embeddings without ``embedding_roles``) are
    updated by the per-entry path alone.

    Args (beyond :class:`OptimizerNet`'s):
        nf_channels: the NF-layer reads a per-entry projection of the trunk to
            this many channels (None: the trunk itself). Fewer channels mean
            fewer meta-parameters, which matters to ES: its gradient noise
            grows with their number.
        nf_scale: a constant multiplying the NF-layer's output. Below 1 it
            slows the layer's weights relative to the per-entry ones under a
            meta-optimizer that normalises step sizes (Adam), so the noise ES
            leaves in them perturbs the updates less.
        nf_outputs: ``"both"``: the NF-layer adds to the direction and the
            log-magnitude; ``"magnitude"``: to the log-magnitude alone, so it
            can rescale the learned term per neuron (and per tensor) but not
            turn it (a row-constant direction term pushes all of a neuron's
            weights one way).
        neuron_stats: the NF part also reads :func:`neuron_stats` (per output
            neuron, input neuron and tensor: log norms of the weights, of
            Adam's direction and of the gradient) and adds a learned linear
            map of them, one per pool (:data:`STAT_POOLS`), to the
            log-magnitude: per-neuron trust ratios, which no per-entry net
            can compute. Its coefficients start at 0 (no change).
        width_free_stats: with ``neuron_stats``, the weights' log RMS is read
            relative to a width-scaled init (``width_free`` of
            :func:`neuron_stats`), so its term does not change with width.
        attention_roles: the NF-layer has weights for the roles of attention's
            tensors (heads and their dimensions); without them those
            tensors get the per-entry path and the neuron statistics only.
        embedding_roles: the NF-layer has weights for the role of a token or
            position embedding read from a model's graph (rows: the tokens or
            positions, an input group; columns: the hidden group they write),
            and with ``role_rates`` a rate of its own; without them an
            embedding gets the per-entry path and the neuron statistics only.
        role_rates: a learned log-rate per output role of the NF-layer
            (a tensor's axis kinds: a hidden matrix, a convolution's kernel,
            an attention projection's query-key rows, ...; ``role_log_rate``),
            added to every tensor's log width
            factor: the whole update of a role's tensors, Adam's part too,
            is scaled by it. The one global rate otherwise serves MLPs and
            attention alike; attention wants a smaller one. Starts at 0 (no
            change).
        term_in_adam_units: with ``neuron_stats``, the learned term of every
            tensor is also multiplied by the RMS of Adam's direction over
            the tensor (floored at ``STAT_FLOOR``), a fixed coefficient of 1
            beside the learned ones: the term is measured in units of Adam's
            step, so it shrinks as Adam's direction does when a run settles
            into a minimum (its momentum averages out). Learned from short
            runs, that coefficient stays small, and the term's fixed size then
            keeps a long run that fits its data bouncing far above Adam's
            loss.
    """

    NF_OUTPUTS = ("both", "magnitude")

    def __init__(
        self,
        width: int = 16,
        depth: int = 1,
        nf_channels: int | None = None,
        nf_scale: float = 1.0,
        nf_outputs: str = "both",
        neuron_stats: bool = False,
        width_free_stats: bool = False,
        attention_roles: bool = True,
        embedding_roles: bool = False,
        role_rates: bool = False,
        term_in_adam_units: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(width, depth, **kwargs)
        if term_in_adam_units and not neuron_stats:
            raise ValueError("term_in_adam_units=True needs neuron_stats=True (it is one of them)")
        if nf_channels is not None and nf_channels < 1:
            raise ValueError(f"nf_channels must be positive, got {nf_channels}")
        if nf_outputs not in self.NF_OUTPUTS:
            raise ValueError(f"nf_outputs must be one of {self.NF_OUTPUTS}, got {nf_outputs!r}")
        if width_free_stats and not neuron_stats:
            raise ValueError("width_free_stats needs neuron_stats=True (it changes what they read)")
        self._config.update(nf_channels=nf_channels, nf_scale=float(nf_scale))
        if nf_outputs != "both":  # older checkpoints' configs stay as they were
            self._config["nf_outputs"] = nf_outputs
        if neuron_stats:
            self._config["neuron_stats"] = True
            self.stat_weight = nn.Parameter(torch.zeros(len(STAT_POOLS), len(NEURON_STATS)))
        if width_free_stats:  # absent from older configs: those read the raw log RMS
            self._config["width_free_stats"] = True
        if term_in_adam_units:
            self._config["term_in_adam_units"] = True
        # Older checkpoints (format version < 4) have no weights for attention's
        # roles: they load with attention_roles=False.
        self._config["attention_roles"] = bool(attention_roles)
        if embedding_roles:  # absent from older configs: those nets have none
            self._config["embedding_roles"] = True
        self.nf_proj = nn.Linear(width, nf_channels, bias=False) if nf_channels else None
        n_out = 2 if nf_outputs == "both" else 1
        self.nf = NFLinear(
            template_specs(attention_roles, embedding_roles),
            nf_channels or width,
            n_out,
            strict=False,
        )
        with torch.no_grad():
            for w in list(self.nf.weights.values()) + list(self.nf.biases.values()):
                w.mul_(kwargs.get("out_scale", 0.01))
        self._role_index: dict[WeightSpaceSpec, Tensor] = {}
        if role_rates:  # absent from older configs: those nets have none
            self._config["role_rates"] = True
            self.role_log_rate = nn.ParameterDict(
                {key.removeprefix("bias:"): nn.Parameter(torch.zeros(())) for key in self.nf.biases}
            )

    def role_log_rates(self, spec: WeightSpaceSpec) -> Tensor | None:
        """Per tensor: its role's log-rate (0 for a tensor whose role the
        NF-layer does not know)."""
        if not self._config.get("role_rates"):
            return None
        if spec not in self._role_index:
            if len(self._role_index) >= 64:  # a meta-training run meets many specs
                self._role_index.clear()
            names = list(self.role_log_rate)
            keys = self.nf.output_roles(spec)
            index = [
                names.index(k.removeprefix("bias:")) if k is not None else len(names) for k in keys
            ]
            with outside_transforms():  # cached: not wrapped for a transform
                self._role_index[spec] = torch.tensor(index, device=self.log_lr.device)
        index = self._role_index[spec].to(self.log_lr.device)
        rates = torch.stack([*self.role_log_rate.values(), self.log_lr.new_zeros(())])
        return rates[index]

    @property
    def nf_scale(self) -> float:
        """The constant on the NF-layer's output; 0 leaves the per-entry path
        alone (an ablation of what the NF-layer adds)."""
        return self._config["nf_scale"]

    @nf_scale.setter
    def nf_scale(self, value: float) -> None:
        self._config["nf_scale"] = float(value)

    @property
    def nf_outputs(self) -> str:
        """Which output channels the NF-layer writes: ``"both"`` or ``"magnitude"``."""
        return self._config.get("nf_outputs", "both")

    @property
    def neuron_stats(self) -> bool:
        """Whether the log-magnitude reads :func:`neuron_stats`."""
        return self._config.get("neuron_stats", False)

    @property
    def width_free_stats(self) -> bool:
        """Whether the weights' statistic is read relative to a width-scaled init."""
        return self._config.get("width_free_stats", False)

    @property
    def term_in_adam_units(self) -> bool:
        """Whether the learned term is scaled by the RMS of Adam's direction
        over each tensor (a fixed coefficient beside :attr:`stat_weight`)."""
        return self._config.get("term_in_adam_units", False)

    def stat_coefficients(self) -> Tensor:
        """The coefficients of :func:`neuron_stats` on the log-magnitude, per
        pool ``(len(STAT_POOLS), len(NEURON_STATS))``: :attr:`stat_weight`,
        plus 1 on the log RMS of Adam's direction over the whole tensor for a
        net built with ``term_in_adam_units``."""
        if not self.term_in_adam_units:
            return self.stat_weight
        # A constant made once (not a fill per step): a tensor built from
        # the meta-parameter would be batched under vmap.
        fixed = constant(ADAM_UNITS, self.stat_weight.device)
        return self.stat_weight + fixed.view(len(STAT_POOLS), len(NEURON_STATS))

    def stat_terms(self, x: TensorInputs, c2: Tensor) -> list[Tensor]:
        """The log-magnitude terms of :func:`neuron_stats`, one per pool,
        channels last, each broadcastable to ``(*x.t.view, 1)`` (the fused
        path computes them for all tensors at once from the kernel's sums:
        :meth:`_stat_terms_from_sums`)."""
        if not self.neuron_stats:
            return []
        _, denom = rms_and_denominator(x.second_moment, c2)
        adam = x.momenta[ADAM_MOMENTUM] / denom * x.scales[ADAM_CHANNEL]
        stats = neuron_stats(x.t, x.param, x.grad, adam, self.width_free_stats)
        terms = []
        coefficients = self.stat_coefficients()
        for name, st in stats.items():
            # In the exponent's units (mag_mult is on every log-magnitude
            # term): a coefficient of 1 on a log RMS makes the learned term
            # proportional to that RMS.
            term = (st @ coefficients[STAT_POOLS.index(name)]).unsqueeze(-1) / self.mag_mult
            terms.append(term if x.t.view else term.reshape(1))
        return terms

    def _stat_terms_from_sums(
        self,
        spec: WeightSpaceSpec,
        inputs: Sequence[TensorInputs],
        sums: Sequence[tuple[Tensor, Tensor] | None],
        scale_nf: Tensor,
    ) -> list[list[Tensor] | None]:
        """:meth:`stat_terms` of every tensor with the fused kernel's ``sums``,
        all at once, as ``(2, *broadcast shape)`` terms (zero direction)
        scaled by ``scale_nf``; None for the others."""
        have = tuple(i for i, s in enumerate(sums) if s is not None)
        out: list[list[Tensor] | None] = [None] * len(inputs)
        if not self.neuron_stats or not have:
            return out
        lay = _stat_layout(spec, have, self.width_free_stats)
        adam_scales = torch.stack([x.scales for x in inputs])[list(have), ADAM_CHANNEL]
        rows = torch.cat([sums[i][0] for i in have], 1).t()  # (rows, 3)
        cols = torch.cat([sums[i][1] for i in have], 1).t()
        per_col = cols.new_zeros(lay.col_slots, 3).index_add_(0, lay.col_slot, cols)
        row, col, whole = self.stat_term_rows(lay, rows, per_col, adam_scales,
                                              scale_nf[list(have), 1])  # fmt: skip
        zeros = torch.zeros_like
        row, col, whole = (torch.stack([zeros(v), v]) for v in (row, col, whole))
        for j, i in enumerate(have):
            r0, r1, c0, c1, shapes = lay.pieces[j]
            terms = [whole[:, j].reshape(2, *shapes[-1])]
            if len(shapes) == 3:
                terms = [row[:, r0:r1].reshape(2, *shapes[0]),
                         col[:, c0:c1].reshape(2, *shapes[1])] + terms  # fmt: skip
            out[i] = terms
        return out

    def stat_term_rows(
        self, lay: StatLayout, rows: Tensor, per_col: Tensor, adam_scales: Tensor, scales: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The statistics' log-magnitude terms from sums of squares of the
        parameter, Adam's direction (before its channel scale) and the
        gradient, ``(., 3)`` each: per row of ``lay`` (``rows``) and per
        input-neuron slot (``per_col``). ``adam_scales`` ``(T,)`` is Adam's
        channel scale per tensor, ``scales`` ``(T,)`` what multiplies each
        tensor's terms. Returns the row ``(rows,)``, slot ``(slots,)`` and
        whole-tensor ``(T,)`` terms."""
        mult = adam_scales.square()
        ones = torch.ones_like(mult)
        mult = torch.stack([ones, mult, ones], 1)  # (T, 3): Adam's squares get 1 / c1**2
        total = rows.new_zeros(len(lay.numel), 3).index_add_(0, lay.row_tensor, rows)
        total = total * mult / lay.numel[:, None]
        g_all = total[:, 2:]
        floor = torch.cat([torch.full_like(total[:, :2], STAT_FLOOR**2),
                           STAT_FLOOR**2 * g_all + 1e-30], 1)  # fmt: skip
        offset = torch.cat([lay.shift[:, None], torch.zeros_like(g_all),
                            -0.5 * torch.log(g_all + floor[:, 2:])], 1)  # fmt: skip

        def stat(mean: Tensor, tensor: Tensor) -> Tensor:
            return 0.5 * torch.log(mean + floor[tensor]) + offset[tensor]

        w = self.stat_coefficients() / self.mag_mult
        row = stat(rows * mult[lay.row_tensor] / lay.row_count[:, None], lay.row_tensor)
        row = (row @ w[STAT_POOLS.index("row")]) * scales[lay.row_tensor]
        col = stat(per_col * mult[lay.col_tensor] / lay.col_count[:, None], lay.col_tensor)
        col = (col @ w[STAT_POOLS.index("column")]) * scales[lay.col_tensor]
        whole = (stat(total, lay.all_tensors) * w[lay.whole_pool]).sum(1) * scales
        return row, col, whole

    def nf_read(self) -> Tensor:
        """``(channels, width)``: the rows that give, from the trunk, the
        channels the NF-layer pools (its projection, or the identity)."""
        if self.nf_proj is not None:
            return self.nf_proj.weight
        width = self.out.weight.shape[1]
        return torch.eye(width, device=self.out.weight.device)

    def output_layer(
        self, pointwise_key: str | None, extra_rows: bool, read: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The output layer ``(outputs, width)`` and its bias ``(outputs,
        1)`` of a tensor whose role has the NF-layer's pointwise weight
        ``pointwise_key`` (None: none): the shared layer plus that term, and
        with ``extra_rows`` the rows of :meth:`nf_read` (``read``) after
        it, with zero biases."""
        proj = None if self.nf_proj is None else self.nf_proj.weight
        w_out, b_out = self.out.weight, self.out.bias[:, None]
        if pointwise_key is not None:
            pw = self.nf.weights[pointwise_key]
            pw = self._as_outputs(pw.t() if proj is None else pw.t() @ proj, 0)
            w_out = w_out + self.nf_scale * pw
        if extra_rows:
            read = self.nf_read() if read is None else read
            w_out = torch.cat([w_out, read])
            b_out = torch.cat([b_out, b_out.new_zeros(read.shape[0], 1)])
        return w_out, b_out

    def _as_outputs(self, x: Tensor, dim: int) -> Tensor:
        """The NF-layer's output channels (along ``dim``) as the net's two,
        direction and log-magnitude: a zero direction when it writes the
        magnitude alone."""
        return x if self.nf_outputs == "both" else torch.cat([torch.zeros_like(x), x], dim)

    def entry_outputs(self, spec, inputs, bias, c2, fused):
        # Pass 1, slice by slice: the per-entry output plus the NF-layer's
        # pointwise term, and the means its broadcast terms need. Pass 2: add
        # the broadcast terms (small). The whole NF-layer, without storing
        # the trunk's activations.
        needed = self.nf.pools_needed(spec)
        proj = None if self.nf_proj is None else self.nf_proj.weight
        pooled: dict[tuple[int, tuple[int, ...]], Tensor] = {}
        outs, row_counts, stat_sums = [], [], []
        # The output layer of a tensor: the shared one plus the NF-layer's
        # pointwise weight of its role, then the rows that read the channels
        # the NF-layer pools (one pass over h; on the torch path the trunk
        # itself is pooled unless projected); each row scaled by the
        # tensor's out_scale (1 for the read rows). Built once per role.
        read = self.nf_read()
        scales2 = torch.stack([x.out_scale for x in inputs]).unsqueeze(-1)
        ones = scales2.new_ones(len(inputs), read.shape[0], 1)
        scales_read = torch.cat([scales2, ones], 1).unbind()
        scales2 = scales2.unbind()
        layers: dict[tuple[str | None, bool], tuple[Tensor, Tensor]] = {}
        for i, x in enumerate(inputs):
            t = x.t
            pools = needed.get(i, set())
            extra_rows = bool(pools) and (proj is not None or fused)
            kernel = fused and fused_kernel.accepts_state(
                x.param, x.grad, x.momenta, x.second_moment
            )
            key = (self.nf.pointwise_key(spec, i), extra_rows)
            if key not in layers:
                layers[key] = self.output_layer(*key, read)
            w_out, b_out = layers[key]
            row_scale = scales_read[i] if extra_rows else scales2[i]
            w_out, b_out = w_out * row_scale, b_out * row_scale
            blocks, rows_list = [], []
            totals: dict[tuple[int, ...], Tensor] = {}  # pools over the sliced axis
            parts: dict[tuple[int, ...], list[Tensor]] = {p: [] for p in pools if 0 not in p}
            # A matrix's pools the fused kernel sums as it goes.
            pool_cols = (
                t.view[1]
                if kernel and len(t.view) == 2 and pools and pools <= MATRIX_POOLS
                else 0
            )  # fmt: skip
            stat_cols = (
                stat_matrix(t)[1]
                if kernel and self.neuron_stats
                else 0
            )  # fmt: skip
            slices = self.trunk_outputs(x, bias, c2, w_out, b_out, fused, pool_cols, stat_cols)
            sums = None
            for sl in slices:
                sums = sl.stat_sums
                o, rows = sl.out, sl.rows
                # Keep two rows, not the pooled ones: a copy costs less than
                # the fresh pages held storage needs at every step. The fused
                # path makes one block per tensor, nothing to save there.
                blocks.append((o[:2].clone() if o.shape[0] > 2 and not fused else o[:2], sl.base))
                rows_list.append(rows)
                if sl.row_sums is not None:
                    totals[(0, 1)] = sl.row_sums.sum(1)
                    totals[(0,)] = sl.col_sums
                    parts[(1,)] = [sl.row_sums]
                    continue
                if not pools:
                    continue
                hp = o[2:] if extra_rows else sl.hidden
                hv = hp.reshape(-1, rows, *t.view[1:]) if t.view else hp.reshape(-1)
                for p, s in pooled_sums(hv, pools).items():
                    if 0 in p:  # summed over the sliced axis: accumulate
                        totals[p] = s if p not in totals else totals[p] + s
                    else:
                        parts[p].append(s)
            for p in sorted(pools):
                if 0 in p:
                    val = totals[p]
                else:
                    val = parts[p][0] if len(parts[p]) == 1 else torch.cat(parts[p], dim=1)
                if p:
                    val = val / math.prod(t.view[a] for a in p)
                pooled[(i, p)] = val.movedim(0, -1)  # channels last, as NF-layers take
            outs.append(blocks)
            row_counts.append(rows_list)
            stat_sums.append(sums)
        # The NF-layer's and the statistics' terms, (2, *broadcast shape),
        # scaled by nf_scale and the tensor's out_scale: the NF-layer's for
        # all tensors at once, the statistics' too on the fused path.
        scale_nf = self.nf_scale * torch.stack([x.out_scale for x in inputs])  # (T, 2)
        flat = self.nf.flat_plan(spec, inputs[0].param.device) if inputs else None
        if flat is not None:
            buf = flat_terms.buffer(flat, pooled, self.nf.weights, self.nf.biases)
            buf = (self._as_outputs(buf, -1) * scale_nf[flat.row_tensor]).t().contiguous()
            nf_terms = [[buf[:, r0:r1].reshape(2, *shape) for r0, r1, shape in mine]
                        for mine in flat.blocks]  # fmt: skip
        else:
            nf_terms = [
                [(self._as_outputs(term, -1) * scale_nf[i]).movedim(-1, 0) for term in terms]
                for i, terms in enumerate(self.nf.broadcast_terms(spec, pooled))
            ]
        fused_stats = self._stat_terms_from_sums(spec, inputs, stat_sums, scale_nf)
        results = []
        for i, (x, blocks, rows_list) in enumerate(zip(inputs, outs, row_counts)):
            t = x.t
            if fused_stats[i] is not None:
                stats = fused_stats[i]
            else:
                stats = [
                    (torch.cat([torch.zeros_like(term), term], -1) * scale_nf[i]).movedim(-1, 0)
                    for term in self.stat_terms(x, c2)
                ]
            terms = nf_terms[i] + stats
            if fused and len(blocks) == 1 and fused_kernel.accepts(*blocks[0]):
                results.append([(*blocks[0], terms)])  # the whole tensor: the kernel adds them
                continue
            r0, done = 0, []
            for (o, base), rows in zip(blocks, rows_list):
                shape = (2, rows, *t.view[1:]) if t.view else (2,)
                o = o.reshape(shape)
                for term in terms:
                    if t.view and term.shape[1] != 1:
                        term = term[:, r0 : r0 + rows]
                    o = o.add_(term) if fused else o + term  # fused: no autograd
                done.append((o.reshape(2, -1), base, []))
                r0 += rows
            results.append(done)
        return results


NETS: dict[str, type[OptimizerNet]] = {"PerParamMLP": PerParamMLP, "NFNNet": NFNNet}
