"""The multi-tensor fused step: every tensor of a parameter group at once.

The per-tensor fused path (:meth:`lopt.nets.OptimizerNet.forward` with
``fused=True``) pays Python work and dozens of torch operators per tensor;
on a network of many small tensors (a transformer, a ResNet) that, not the
arithmetic, is the step's cost. :func:`lopt.functional.update` with
``inplace=True`` and ``fused=True`` (what the ``torch.optim`` classes run on
CPU) takes this path instead whenever every tensor is float32 on the CPU
(a parameter or gradient that is not contiguous, a channels_last
convolution's, is copied to a contiguous buffer of the plan at each step).

A :class:`FusedPlan` is built once per net structure, weight space and
memory of the parameters and state: tables that describe every tensor
(where its parameter, gradient and state lie, its view, the NF-layer's
pools of it and the terms it adds) and the buffers the kernels write. A step
is then five kernel calls (:func:`lopt.fused.state_update_many`,
:func:`~lopt.fused.entry_outputs_many` with every pooled sum,
:func:`~lopt.fused.flat_terms` and :func:`~lopt.fused.stat_terms` for the
NF-layer's and the neuron statistics' terms, :func:`~lopt.fused.finish_many`
with every term, the tangent rule and the learned schedule) around a fixed
number of torch operators for what is per tensor (channel scales, output
layers, the learned schedule): neither grows with the number of tensors.
A net's orthogonal step adds its matrix products (one batch per shape of
matrix) and one in-place add per matrix, into the updates' views.
The formula is :meth:`~lopt.nets.OptimizerNet.forward`'s, and the tests
hold the two paths to each other.

The updates it returns are views of one buffer the plan owns, which the
next step overwrites: the optimizer classes add them at once.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lopt import fused as fused_kernel
from lopt.features import (
    ADAM_CHANNEL,
    ADAM_MOMENTUM,
    EPS,
    MOMENTUM_DECAYS,
    SECOND_MOMENT_DECAY,
    channel_scales_all,
)
from lopt.nets import (
    MAX_LOG_MAGNITUDE,
    STAT_FLOOR,
    STAT_POOLS,
    NFNNet,
    OptimizerNet,
    StatLayout,
    _stat_layout,
    orthogonal_entries,
)
from lopt.nn import flat_terms
from lopt.weightspace import WeightSpaceSpec

_version = operator.attrgetter("_version")
KERNEL_BLOCK = 16  # entries per block of the per-entry kernel (csrc: BLOCK)
AXES = 4  # the kernels see every view as 4 axes (leading ones added)
PLANS_PER_NET = 16  # plans kept per net: one per parameter group, and a few models

_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class FusedPlan:
    """The tables and buffers of one weight space's multi-tensor step."""

    spec: WeightSpaceSpec
    parts: list[tuple[int, int]]  # per tensor: its parameter, its first entry in it
    entry_table: Tensor  # (T, ENTRY_FIELDS), the gradients' addresses set per step
    pool_table: Tensor  # (pools, POOL_FIELDS)
    pool_scales: Tensor  # (pools,)
    finish_table: Tensor  # (T, FINISH_FIELDS)
    term_table: Tensor  # (terms, TERM_FIELDS)
    op_table: Tensor  # (ops, OP_FIELDS): dense term sums
    dense_buffers: list[Tensor]  # where those ops sum
    numels: Tensor  # (T, 1) float64
    layer_keys: list[tuple[str | None, bool]]  # the distinct output layers
    layer_index: Tensor  # (T,): each tensor's
    n_out_max: int
    sums: Tensor  # (T, K + 3) float64: the state pass's sums
    tensor_sums: Tensor  # (T,) float64: the finish pass's sums
    out: Tensor  # (2, N): every tensor's two outputs
    scratch: Tensor  # every tensor's pool sums (those on one thread)
    base: Tensor  # (N,): the updates
    updates: list[Tensor]  # views of base, one per parameter
    ortho_entries: Tensor | None  # base's entries of the tensors that take the orthogonal step
    means: Tensor | None  # (rows, channels): the NF-layer's pooled means
    flat: flat_terms.FlatPlan | None
    flat_bags: Tensor | None  # (bags, 4): output row, key, members, first member; by row
    flat_members: Tensor | None  # every bag's members, bag after bag
    stats: tuple[Tensor, Tensor, Tensor] | None  # row, slot and whole-tensor sums, (., 3)
    layout: StatLayout | None
    terms: Tensor  # (2, rows): every term the finish pass adds
    constants: tuple | None = None  # the last step's NetConstants, with its key
    net_params: list[Tensor] | None = None  # the net's parameters, whose versions key them
    # Parameters laid out otherwise than contiguous (channels_last, a
    # transposed view): (index, contiguous copy of the parameter, of its
    # gradient), refreshed at each step; the kernels read the copies.
    staged: list[tuple[int, Tensor, Tensor]] = field(default_factory=list)


def _kept_strides(kept: Sequence[int]) -> list[int]:
    """Row-major strides, over the 4 axes, of a result that keeps the axes
    of ``kept`` (sizes over a view; 1 where summed) that are not 1."""
    k = [1] * (AXES - len(kept)) + list(kept)
    strides, acc = [0] * AXES, 1
    for a in reversed(range(AXES)):
        if k[a] != 1:
            strides[a] = acc
            acc *= k[a]
    return strides


def _dims(view: Sequence[int]) -> list[int]:
    return [1] * (AXES - len(view)) + list(view)


def _stat_kept(view: Sequence[int], shapes: tuple) -> tuple[list[int], list[int] | None]:
    """The kept shapes (over the view) of a tensor's neuron-statistics row
    pool and input-neuron pool (None for a tensor read as a vector), from
    its :class:`~lopt.nets.StatLayout` piece's shapes."""
    if len(shapes) == 3:
        return list(shapes[0]), list(shapes[1])
    if len(view) >= 2:  # its matrix view's rows: the first axis
        return [view[0]] + [1] * (len(view) - 1), None
    return [1] * len(view), None


def _dense_pools(
    view: Sequence[int],
    c0: int,
    nc: int,
    requests: Sequence[tuple[tuple[int, ...], int, float]],
    mine: list[list[int]],
    dests: list[int],
    scales: list[float],
) -> None:
    """Append to ``mine`` (and ``dests``, ``scales``) the pools of channels
    ``[c0, c0 + nc)`` that give each request ``(summed view axes, dst
    address, scale)``: the channels of every entry, summed whole, then one
    axis at a time, each intermediate sum once."""
    dims = _dims(view)
    lead = AXES - len(view)
    nodes: dict[tuple[int, ...], int] = {}

    def node(summed: tuple[int, ...]) -> int:
        if summed in nodes:
            return nodes[summed]
        kept = [1 if a in summed else dims[a] for a in range(AXES)]
        if not summed:
            fields = [-1, c0, nc, math.prod(dims), *_kept_strides(dims), *[1] * AXES,
                      fused_kernel.POOL_ENTRIES, -1]  # fmt: skip
        else:
            parent = node(summed[:-1])
            sd = [1 if a in summed[:-1] else dims[a] for a in range(AXES)]
            fields = [parent, c0, nc, math.prod(kept), *_kept_strides(kept), *sd,
                      fused_kernel.POOL_AXIS, summed[-1]]  # fmt: skip
        mine.append(fields)
        dests.append(0)
        scales.append(1.0)
        nodes[summed] = len(mine) - 1
        return nodes[summed]

    for summed_view, dst, scale in requests:
        summed = tuple(sorted(a + lead for a in summed_view if view[a] > 1))
        q = node(summed)
        if dests[q]:  # the same sums to a second place: a copy
            kept = [1 if a in summed else dims[a] for a in range(AXES)]
            mine.append([q, c0, nc, mine[q][3], *_kept_strides(kept), *kept,
                         fused_kernel.POOL_GENERIC, -1])  # fmt: skip
            dests.append(0)
            scales.append(1.0)
            q = len(mine) - 1
        dests[q], scales[q] = dst, scale


def _dense_terms(
    view: Sequence[int],
    mine_terms: Sequence[tuple[int, list[int]]],
    term_buf: Tensor,
    ops: list[list[int]],
    buffers: list[Tensor],
) -> Tensor:
    """Append to ``ops`` what sums a tensor's terms ``(column of term_buf,
    kept shape over the view)`` into one dense ``(2, entries)`` buffer,
    which it returns (kept in ``buffers``): terms broadcast over the same
    axes are added into one node, and each node is broadcast into its
    parent (the same axes but the last) one axis at a time, in contiguous
    loops, down to the dense root."""
    dims = _dims(view)
    lead = AXES - len(view)
    by_set: dict[tuple[int, ...], list[int]] = {}
    for start, kept in mine_terms:
        k = [1] * lead + kept
        summed = tuple(a for a in range(AXES) if k[a] == 1 and dims[a] > 1)
        by_set.setdefault(summed, []).append(start)
    nodes = set()
    for summed in by_set:
        for j in range(len(summed) + 1):
            nodes.add(summed[:j])
    order = sorted(nodes, key=lambda x: (-len(x), x))  # children before parents
    rows = {x: math.prod(1 if a in x else dims[a] for a in range(AXES)) for x in order}
    at, total = {}, 0
    for x in order:
        at[x] = total
        total += 2 * rows[x]
    buf = torch.zeros(total)
    buffers.append(buf)
    base = buf.data_ptr()
    col = term_buf.data_ptr()
    col_stride = 4 * term_buf.stride(0)
    for x in order:
        dst = base + 4 * at[x]
        ops.append([fused_kernel.OP_ZERO, dst, 0, 0, 2 * rows[x], 0, 0, 0, 0, 0])
        for start in by_set.get(x, []):
            ops.append([fused_kernel.OP_ADD, dst, col + 4 * start, col + 4 * start + col_stride,
                        rows[x], 0, 0, 0, rows[x], 0])  # fmt: skip
        for a in range(max(x, default=-1) + 1, AXES):
            child = (*x, a)
            if child not in nodes:
                continue
            sd = [1 if b in x else dims[b] for b in range(AXES)]
            outer, inner = math.prod(sd[:a]), math.prod(sd[a + 1 :])
            ops.append([fused_kernel.OP_EXPAND, dst, base + 4 * at[child], 0, 0, outer, sd[a],
                        inner, rows[x], rows[child]])  # fmt: skip
    return buf[at[()] : at[()] + 2 * rows[()]]


def plan_for(
    net: OptimizerNet,
    spec: WeightSpaceSpec,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: dict,
) -> FusedPlan | None:
    """The plan of this step (built on first use), or None when the
    multi-tensor step cannot run it (the per-tensor path then does).
    Parameters and gradients that are float32 on the CPU but not contiguous
    (a channels_last convolution) are read through contiguous copies."""
    if not params or not fused_kernel.accepts(*state["momenta"], *state["second_moment"]):
        return None
    if not fused_kernel.readable(*params, *grads) or not fused_kernel.available():
        return None
    # Per parameter: whether the kernels read it and its gradient where they lie.
    layout = tuple(p.is_contiguous() and g.is_contiguous() for p, g in zip(params, grads))
    key = (
        spec,
        tuple(map(Tensor.data_ptr, params)),
        layout,
        tuple(map(Tensor.data_ptr, state["momenta"])),
        tuple(map(Tensor.data_ptr, state["second_moment"])),
    )
    plans = _plans.setdefault(net, OrderedDict())
    if key in plans:
        plans.move_to_end(key)
        return plans[key]
    staged = [(j, torch.empty(p.shape), torch.empty(p.shape))
              for j, p in enumerate(params) if not layout[j]]  # fmt: skip
    read = list(params)
    for j, p_copy, _ in staged:
        read[j] = p_copy
    plan = build(net, spec, read, state["momenta"], state["second_moment"])
    if plan is not None:
        plan.staged = staged
    plans[key] = plan
    if len(plans) > PLANS_PER_NET:
        plans.popitem(last=False)
    return plan


def build(
    net: OptimizerNet,
    spec: WeightSpaceSpec,
    params: Sequence[Tensor],
    momenta: Sequence[Tensor],
    second_moments: Sequence[Tensor],
) -> FusedPlan | None:
    """The plan of ``net`` on ``spec``'s tensors in this memory, or None when
    a tensor's view has more than 4 axes or the NF-layer's terms are not
    flat (fixed axes)."""
    tensors = spec.tensors
    if any(len(t.view) > AXES for t in tensors):
        return None
    nfn = isinstance(net, NFNNet)
    needed = net.nf.pools_needed(spec) if nfn else {}
    flat = net.nf.flat_plan(spec) if nfn else None
    if needed and flat is None:
        return None
    channels = net.nf_read().shape[0] if nfn else 0
    stats = nfn and net.neuron_stats
    width = net.out.weight.shape[1]
    n_out_max = 2 + (channels if needed else 0)
    if n_out_max + 3 * stats > 64 or width > 256:
        return None

    # Each tensor's parameter, and where its entries start there.
    parts = []
    for j, group in enumerate(spec.by_parameter()):
        for t in group:
            row = math.prod(t.shape[1:]) if t.shape else 1
            parts.append((j, 0 if t.part is None else t.part[0] * row))
    numel = [math.prod(t.shape) for t in tensors]
    offsets = [0]
    for n in numel:
        offsets.append(offsets[-1] + n)
    total = offsets[-1]

    # The NF-layer's pooled means, in the flat plan's row order.
    mean_rows: dict[tuple[int, tuple[int, ...]], int] = {}
    rows = 0
    for i, pool in flat.pools if flat is not None else ():
        mean_rows[(i, pool)] = rows
        rows += math.prod(n for a, n in enumerate(tensors[i].view) if a not in pool)
    means = torch.zeros(rows, channels) if flat is not None else None
    layout = _stat_layout(spec, tuple(range(len(tensors))), net.width_free_stats) if stats else None
    if layout is not None:
        stat_bufs = (
            torch.zeros(len(layout.row_tensor), 3),
            torch.zeros(layout.col_slots, 3),
            torch.zeros(len(tensors), 3),
        )
    else:
        stat_bufs = None
    nf_rows = flat.rows if flat is not None else 0
    stat_rows = [0, 0, 0] if layout is None else [b.shape[0] for b in stat_bufs]
    term_buf = torch.zeros(2, nf_rows + sum(stat_rows))
    term_starts = [nf_rows, nf_rows + stat_rows[0], nf_rows + stat_rows[0] + stat_rows[1]]

    def term(start: int, kept: Sequence[int]) -> list[int]:
        base = term_buf.data_ptr() + 4 * start
        return [base, base + 4 * term_buf.stride(0), *_kept_strides(kept)]

    layer_keys: list[tuple[str | None, bool]] = []
    layer_index, pools, pool_scales, entry, finish, terms = [], [], [], [], [], []
    scratch_total = 0
    ops: list[list[int]] = []  # the dense term sums of tensors with a short last axis
    dense_buffers: list[Tensor] = []
    for i, t in enumerate(tensors):
        view = list(t.view)
        dims = _dims(view)
        mine: list[list[int]] = []  # this tensor's pools, fields but dst and soff
        scales: list[float] = []
        dests: list[int] = []
        tensor_pools = needed.get(i, set())
        n_out = 2 + channels if tensor_pools else 2
        # A tensor one thread takes whole (its pools' scratch is not copied
        # per thread) with a short last axis pools and sums its terms densely.
        one_thread = numel[i] < 2 * fused_kernel.MIN_ENTRIES_PER_THREAD
        dense = one_thread and dims[-1] % KERNEL_BLOCK != 0
        # The NF-layer's pools of this tensor: (pooled axes, where its means
        # go, 1 / entries pooled), smallest first.
        nf_pools = [(pool, means.data_ptr() + 4 * channels * mean_rows[(i, pool)],
                     1.0 / math.prod(view[a] for a in pool))
                    for pool in sorted(tensor_pools, key=lambda p: (len(p), p))]  # fmt: skip
        if layout is not None:
            r0, r1, c0, c1, shapes = layout.pieces[i]
            row_kept, col_kept = _stat_kept(view, shapes)
            stat_dests = [stat_bufs[0].data_ptr() + 12 * r0, stat_bufs[1].data_ptr() + 12 * c0,
                          stat_bufs[2].data_ptr() + 12 * i]  # fmt: skip
        if dense:
            # Short last axes: the pooled channels are summed whole, then
            # reduced one axis at a time in contiguous loops.
            if nf_pools:
                _dense_pools(view, 2, channels, nf_pools, mine, dests, scales)
            if layout is not None:
                requests = [(tuple(a for a, k in enumerate(row_kept) if k == 1), stat_dests[0])]
                if col_kept is not None:
                    requests.append((tuple(a for a, k in enumerate(col_kept) if k == 1),
                                     stat_dests[1]))  # fmt: skip
                requests.append((tuple(range(len(view))), stat_dests[2]))
                _dense_pools(view, n_out, 3, [(*r, 1.0) for r in requests], mine, dests, scales)
        else:
            done: dict[tuple[int, ...], int] = {}
            generic = [fused_kernel.POOL_GENERIC, -1]
            # Each pool from the largest one summed already (as pooled_sums).
            for pool, dst, scale in nf_pools:
                kept = [1 if a in pool else n for a, n in enumerate(view)]
                src = max((q for q in done if q and set(q) <= set(pool)), key=len, default=None)
                sd = [1] * AXES
                if src is not None:
                    sd = _dims([1 if a in src else n for a, n in enumerate(view)])
                mine.append([-1 if src is None else done[src], 2, channels, math.prod(kept),
                             *_kept_strides(kept), *sd, *generic])  # fmt: skip
                scales.append(scale)
                dests.append(dst)
                done[pool] = len(mine) - 1
            if layout is not None:
                row_pool = len(mine)
                mine.append([-1, n_out, 3, r1 - r0, *_kept_strides(row_kept), *[1] * AXES,
                             *generic])  # fmt: skip
                if col_kept is not None:
                    mine.append([-1, n_out, 3, c1 - c0, *_kept_strides(col_kept), *[1] * AXES,
                                 *generic])  # fmt: skip
                mine.append([row_pool, n_out, 3, 1, *[0] * AXES, *_dims(row_kept), *generic])
                dests += [stat_dests[0]] + ([stat_dests[1]] if col_kept is not None else [])
                dests.append(stat_dests[2])
                scales += [1.0] * (len(mine) - len(scales))
        soff, scratch = [], 0
        for fields in mine:
            soff.append(scratch)
            scratch += fields[2] * fields[3]
        first_pool = len(pools)
        for fields, dst, so in zip(mine, dests, soff):
            pools.append([*fields[:4], dst, so, *fields[4:]])
        pool_scales += scales
        key = (net.nf.pointwise_key(spec, i) if nfn else None, bool(tensor_pools))
        if key not in layer_keys:
            layer_keys.append(key)
        layer_index.append(layer_keys.index(key))
        j, start = parts[i]
        p_addr = params[j].data_ptr() + 4 * start
        m = momenta[j]
        m_addr, m_stride = m.data_ptr() + 4 * start, m.stride(0) if m.shape[0] > 1 else numel[i]
        v_addr = second_moments[j].data_ptr() + 4 * start
        entry.append([numel[i], p_addr, 0, m_addr, m_stride, v_addr, offsets[i], n_out,
                      int(layout is not None), *dims, first_pool, len(pools), scratch,
                      scratch_total])  # fmt: skip
        scratch_total += scratch
        # The terms, in the per-tensor path's order: the NF-layer's, then
        # the statistics' (row, input neuron, whole tensor).
        mine_terms = [(b0, shape) for b0, _, shape in flat.blocks[i]] if flat is not None else []
        if layout is not None:
            if col_kept is not None:
                mine_terms.append((term_starts[0] + r0, row_kept))
                mine_terms.append((term_starts[1] + c0, col_kept))
            mine_terms.append((term_starts[2] + i, [1] * len(view)))
        first_term, first_op, finish_dims = len(terms), len(ops), dims
        if dense and mine_terms:
            # Summed densely first: the finish then reads one term, all entries one run.
            root = _dense_terms(view, [(start, list(kept)) for start, kept in mine_terms],
                                term_buf, ops, dense_buffers)  # fmt: skip
            terms.append([root.data_ptr(), root.data_ptr() + 4 * numel[i], 0, 0, 0, 1])
            finish_dims = [1, 1, 1, numel[i]]
        else:
            terms += [term(start, kept) for start, kept in mine_terms]
        if len(terms) - first_term > fused_kernel.MAX_TERMS:
            return None
        tangent = net.rule.learned_term_tangent and t.kind == "weight" and len(t.shape) >= 2
        finish.append([numel[i], offsets[i], *finish_dims, first_term, len(terms),
                       t.shape[0] if tangent else 0, p_addr, first_op, len(ops)])  # fmt: skip

    long = torch.int64
    members = None
    if flat is not None:
        members = torch.cat([m.reshape(-1) for m in flat.members] or [torch.zeros(0, dtype=long)])
    out = torch.empty(2, total)
    base = torch.empty(total)
    firsts = {}
    for i, (j, _) in enumerate(parts):
        firsts.setdefault(j, offsets[i])
    updates = [base[firsts[j] : firsts[j] + p.numel()].view(p.shape) for j, p in enumerate(params)]
    ortho_entries = orthogonal_entries(spec, offsets) if net.has_orthogonal_term else None
    return FusedPlan(
        spec=spec,
        parts=parts,
        entry_table=torch.tensor(entry, dtype=long),
        pool_table=torch.tensor(pools, dtype=long).reshape(-1, len(fused_kernel.POOL_FIELDS)),
        pool_scales=torch.tensor(pool_scales, dtype=torch.float32),
        finish_table=torch.tensor(finish, dtype=long),
        term_table=torch.tensor(terms, dtype=long).reshape(-1, len(fused_kernel.TERM_FIELDS)),
        op_table=torch.tensor(ops, dtype=long).reshape(-1, len(fused_kernel.OP_FIELDS)),
        dense_buffers=dense_buffers,
        numels=torch.tensor([[max(1, n)] for n in numel], dtype=torch.float64),
        layer_keys=layer_keys,
        layer_index=torch.tensor(layer_index, dtype=long),
        n_out_max=n_out_max,
        sums=torch.zeros(len(tensors), len(MOMENTUM_DECAYS) + 3, dtype=torch.float64),
        tensor_sums=torch.zeros(len(tensors), dtype=torch.float64),
        out=out,
        base=base,
        scratch=torch.zeros(scratch_total),
        updates=updates,
        ortho_entries=ortho_entries,
        means=means,
        flat=flat,
        flat_bags=None if flat is None else _bags_by_row(flat),
        flat_members=members,
        stats=stat_bufs,
        layout=layout,
        terms=term_buf,
    )


@dataclass
class NetConstants:
    """What a step reads of the net that only changes with its parameters."""

    w_out: Tensor  # (T, n_out_max, width): every tensor's output layer, its two rows scaled
    b_out: Tensor  # (T, n_out_max)
    hidden: tuple[Tensor, Tensor] | None  # the hidden layers' weights and biases, stacked
    key_weights: Tensor | None  # the NF-layer's weights in the flat plan's key order
    key_biases: Tensor | None
    neg_lrs: Tensor  # (T,): OptimizerNet.tensor_factors
    log_factors: Tensor  # (T,): OptimizerNet.tensor_log_factors, which the orthogonal step reads
    nf_scales: Tensor | None  # (T, 2): what multiplies each tensor's NF-layer terms
    stat_weights: Tensor | None  # (pools, 3): the statistics' coefficients over mag_mult
    stat_scales: Tensor | None  # (T,): what multiplies each tensor's statistics' terms


def _net_constants(net: OptimizerNet, plan: FusedPlan) -> NetConstants:
    """The net's constants for ``plan``, rebuilt only when a parameter of
    the net (its version counter, or the tensor itself) or ``nf_scale``
    changed since the last step: an optimizer's net rarely changes."""
    if plan.net_params is None:  # listing a net's parameters costs more than reading them
        plan.net_params = list(net.parameters())
    key = (tuple(map(_version, plan.net_params)), getattr(net, "nf_scale", None))
    if plan.constants is not None and plan.constants[0] == key:
        return plan.constants[1]
    if isinstance(net, NFNNet):
        read = net.nf_read()
        built = [net.output_layer(k, extra, read) for k, extra in plan.layer_keys]
    else:
        built = [(net.out.weight, net.out.bias[:, None])]
    log_factors = net.tensor_log_factors(plan.spec)
    neg_lrs, out_scales = net.tensor_factors(plan.spec, log_factors=log_factors)
    # Each tensor's layer, padded to n_out_max rows, its two rows scaled.
    pad = plan.n_out_max
    pad_rows = torch.nn.functional.pad
    layers = torch.stack([pad_rows(w, (0, 0, 0, pad - w.shape[0])) for w, _ in built])
    biases = torch.stack([pad_rows(b[:, 0], (0, pad - b.shape[0])) for _, b in built])
    row_scales = torch.cat([out_scales, out_scales.new_ones(len(out_scales), pad - 2)], 1)
    w_out = (layers[plan.layer_index] * row_scales[:, :, None]).contiguous()
    b_out = (biases[plan.layer_index] * row_scales).contiguous()
    hidden = None
    if len(net.hidden):
        hidden = (
            torch.stack([lay.weight for lay in net.hidden]).contiguous(),
            torch.stack([lay.bias for lay in net.hidden]).contiguous(),
        )
    key_weights = key_biases = None
    if plan.flat is not None:
        c_out = 2 if net.nf_outputs == "both" else 1
        keys, bias_keys = plan.flat.keys, plan.flat.bias_keys
        key_weights = torch.zeros(0, 1, c_out)
        key_biases = torch.zeros(0, c_out)
        if keys:
            key_weights = torch.stack([net.nf.weights[k] for k in keys])
        if bias_keys:
            key_biases = torch.stack([net.nf.biases[k] for k in bias_keys])
    nf_scales = stat_weights = stat_scales = None
    if isinstance(net, NFNNet):
        nf_scales = (net.nf_scale * out_scales).contiguous()
        if net.neuron_stats:
            stat_weights = (net.stat_coefficients() / net.mag_mult).contiguous()
            stat_scales = nf_scales[:, 1].contiguous()
    constants = NetConstants(
        w_out, b_out, hidden, key_weights, key_biases, neg_lrs, log_factors, nf_scales,
        stat_weights, stat_scales,
    )  # fmt: skip
    plan.constants = (key, constants)
    return constants


def _with_term_factor(
    constants: NetConstants, factor: Tensor
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The output layers and NF-layer scales of ``constants`` with each
    tensor's direction channel (row 0: the learned term) times its
    ``factor`` ``(T,)``, as :meth:`OptimizerNet.tensor_factors` folds it."""
    w_out = constants.w_out.clone()
    w_out[:, 0].mul_(factor[:, None])
    b_out = constants.b_out.clone()
    b_out[:, 0].mul_(factor)
    nf_scales = None
    if constants.nf_scales is not None:
        nf_scales = constants.nf_scales.clone()
        nf_scales[:, 0].mul_(factor)
    return w_out, b_out, nf_scales


def _bags_by_row(flat: flat_terms.FlatPlan) -> Tensor:
    """The flat plan's bags as rows (output row, key, members, first
    member), sorted by output row (stable)."""
    sizes = [torch.full((m.shape[0],), m.shape[1], dtype=torch.int64) for m in flat.members]
    size = torch.cat(sizes) if sizes else torch.zeros(0, dtype=torch.int64)
    first = torch.cumsum(size, 0) - size
    bags = torch.stack([flat.bag_row, flat.bag_key, size, first], 1)
    order = torch.sort(flat.bag_row, stable=True).indices
    return bags[order].contiguous()


def step(
    net: OptimizerNet,
    plan: FusedPlan,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: dict,
    total_steps: Tensor | float | None,
    loss_in: Tensor | None = None,
) -> tuple[list[Tensor], dict]:
    """One in-place step of every tensor of ``plan``: the updates (views of
    the plan's buffer) and the state (its momenta and second moments
    updated in place), as :func:`lopt.functional.update` with
    ``guard=False`` returns them. A gradient that is not all finite leaves
    the state as it was (the step count too) and gives zero updates, with
    ``skipped`` incremented."""
    if plan.staged:
        grads = list(grads)
        for j, p_copy, g_copy in plan.staged:
            p_copy.copy_(params[j])
            grads[j] = g_copy.copy_(grads[j])
    addresses = list(map(Tensor.data_ptr, grads))
    g_addr = torch.tensor([addresses[j] + 4 * start for j, start in plan.parts], dtype=torch.int64)
    plan.entry_table[:, 2] = g_addr  # the state pass reads the same table
    step_t = state["step"] + 1
    weights = [1 - d for d in MOMENTUM_DECAYS]
    sums = fused_kernel.state_update_many(plan.entry_table, weights, SECOND_MOMENT_DECAY, plan.sums)
    if sums is None:  # a gradient is not finite: the state is as it was, the updates zero
        plan.base.zero_()
        return plan.updates, {**state, "skipped": state["skipped"] + 1.0}
    c1, c2, steps_in, budget_in, bias = net.step_inputs(step_t, total_steps, loss_in)
    scales = channel_scales_all(sums, plan.numels, c1)
    constants = _net_constants(net, plan)
    w_out, b_out, nf_scales = constants.w_out, constants.b_out, constants.nf_scales
    term_log = net.term_log_factors(scales, c1, c2, budget_in, loss_in)
    if term_log is not None:  # the learned term's own factor: new every step, not cached
        w_out, b_out, nf_scales = _with_term_factor(constants, term_log.exp())
    w_in = (net.inp.weight * scales[:, None, :]).contiguous()
    adam_scales = scales[:, ADAM_CHANNEL]
    base_scales = (constants.neg_lrs * adam_scales).contiguous()
    fused_kernel.entry_outputs_many(
        plan.entry_table, base_scales, plan.pool_table, plan.pool_scales, ADAM_MOMENTUM,
        len(MOMENTUM_DECAYS), float(c2.rsqrt()), EPS, w_in, bias.contiguous(),
        constants.hidden, w_out, b_out, plan.out, plan.base, plan.scratch,
    )  # fmt: skip
    if isinstance(net, NFNNet):
        flat = plan.flat
        if flat is not None and flat.rows:
            fused_kernel.flat_terms(
                plan.flat_bags, plan.flat_members, flat.bias_row, flat.bias_index, plan.means,
                constants.key_weights, constants.key_biases, flat.row_tensor,
                nf_scales, plan.terms[:, : flat.rows],
            )  # fmt: skip
        if plan.layout is not None:
            lay = plan.layout
            fused_kernel.stat_terms(
                plan.stats, lay.row_tensor, lay.row_count, lay.col_tensor, lay.col_count,
                lay.numel, lay.shift, lay.whole_pool, adam_scales.contiguous(),
                constants.stat_scales, constants.stat_weights,
                STAT_POOLS.index("row"),
                STAT_POOLS.index("column"), STAT_FLOOR,
                plan.terms[:, flat.rows if flat is not None else 0 :],
            )  # fmt: skip
    schedule = net.schedule_scale(steps_in, budget_in, loss_in)
    total = fused_kernel.finish_many(
        plan.finish_table, plan.term_table, plan.out, plan.base, MAX_LOG_MAGNITUDE,
        1.0 if schedule is None else float(schedule), plan.tensor_sums, plan.op_table,
    )  # fmt: skip
    if plan.ortho_entries is not None:  # matrix products beside the kernels, one add for all
        spec = plan.spec
        momenta = spec.split(state["momenta"], dim=1)
        terms = net.orthogonal_terms(spec, momenta, scales, c1, c2, constants.log_factors)
        flat = torch.cat([z.reshape(-1) for z in terms if z is not None])
        alpha = 1.0 if schedule is None else float(schedule)
        plan.base.index_add_(0, plan.ortho_entries, flat, alpha=alpha)
    # Finite updates: the state pass already refused a gradient whose square
    # is not finite, so the sums of squares are too.
    ok = math.isfinite(total)
    skipped = state["skipped"] + (0.0 if ok else 1.0)
    new_state = {
        "momenta": state["momenta"],
        "second_moment": state["second_moment"],
        "step": step_t,
        "skipped": skipped,
    }
    return plan.updates, new_state
