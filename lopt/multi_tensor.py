"""The net's forward over every tensor of a weight space at once, in torch
operators: the step a GPU runs.

:meth:`lopt.nets.OptimizerNet.forward` runs a fixed list of operators per
tensor (its features, trunk, pools, terms and finish): about a hundred, so a
transformer's step launches thousands of small kernels, which on a GPU cost
more than the arithmetic. Here every tensor's entries lie side by side on
one flat axis of ``N`` entries (the spec's tensors in order, each in its
view's row-major order), cut into chunks of at most :data:`CHUNK_ENTRIES`
(so that activations stay bounded; a tensor may span chunks), and each stage
is one operator per chunk over all the tensors in it:

1. the per-tensor sums that normalise the features: ``torch._foreach_norm``;
2. the features, trunk and output layer: one matrix product per layer over
   ``(channels, entries)``, each tensor's scales and its role's pointwise NF
   weight read by gathering per entry;
3. the NF-layer's pooled means and the neuron statistics' sums: segment
   sums (``index_add``) over index tensors built once per spec
   (:class:`Plan`), one per pool an entry belongs to;
4. the NF-layer's broadcast terms (:mod:`lopt.nn.flat_terms`) and the
   statistics' terms: gathered back per entry and added;
5. the finish, the tangent rule (per-row segment sums) and the learned
   schedule, elementwise; a net with the orthogonal step adds its terms
   (:meth:`~lopt.nets.OptimizerNet.orthogonal_terms`: one batch of matrix
   products per shape of matrix) with one ``index_add``.

So the number of operators does not grow with the number of tensors (only
with ``N / CHUNK_ENTRIES`` and the number of matrix shapes), no operator
reads a value back to the host, and every operator is out of place with a
``vmap`` batching rule and a derivative. The formula is
:meth:`~lopt.nets.OptimizerNet.forward`'s; the tests hold the two to each
other up to float rounding (sums in another order). The index tensors cost 4
bytes per entry on a GPU (8 on the CPU) for each pool, term and statistic an
entry has: a few dozen bytes per parameter.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lopt.features import (
    ADAM_CHANNEL,
    MOMENTUM_DECAYS,
    channel_scales_all,
    entry_channels,
)
from lopt.nets import (
    MAX_LOG_MAGNITUDE,
    NFNNet,
    OptimizerNet,
    StatLayout,
    _stat_layout,
    orthogonal_entries,
    stat_matrix,
)
from lopt.nn import flat_terms
from lopt.transforms import outside_transforms
from lopt.weightspace import WeightSpaceSpec

CHUNK_ENTRIES = 1 << 22  # entries per chunk: ~50 floats of activations each
PLANS_PER_NET = 16  # plans kept per net: a few models and devices


def index_dtype(device: torch.device) -> torch.dtype:
    """The per-entry indices' dtype: 32 bits on a GPU (half the memory;
    the rows they address stay below 2**31), 64 on the CPU, whose
    ``index_add`` is ten times slower with 32-bit indices."""
    return torch.int64 if torch.device(device).type == "cpu" else torch.int32


_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class Plan:
    """Index tensors of one weight space's multi-tensor forward, on one device."""

    spec: WeightSpaceSpec
    numels: list[int]  # per tensor
    # Per chunk: its entries [a, b) and its pieces (tensor, first entry, end entry).
    chunks: list[tuple[int, int, list[tuple[int, int, int]]]]
    tensor: Tensor  # (N,): each entry's tensor
    numel: Tensor  # (T, 1) float: entries per tensor
    pointwise: list[str]  # the pointwise keys of the NF-layer, in role order
    role: Tensor | None  # (N,): each entry's row of the pointwise table (the last: none)
    flat: flat_terms.FlatPlan | None
    pools: Tensor | None  # (slots, N): each entry's row of the pooled sums per slot
    pool_sizes: Tensor | None  # (rows + 1, 1): entries pooled per row (1 for the last, a dump)
    layout: StatLayout | None  # the neuron statistics' rows and slots
    stat_rows: Tensor | None  # (N,): each entry's row of the statistics
    stat_slots: Tensor | None  # (N,): its input-neuron slot
    terms: Tensor | None  # (term slots, N): each entry's rows of the term buffer
    tangent_rows: Tensor | None  # (N,): each entry's weight row (the last: none)
    tangent_mask: Tensor | None  # (rows + 1,): 1 for the rows the tangent rule projects
    ortho_entries: Tensor | None  # the entries of the tensors that take the orthogonal step


def _broadcast_index(kept: Sequence[int], view: Sequence[int], start: int) -> Tensor:
    """Per entry of ``view`` (row-major), its row in a block of shape
    ``kept`` (each axis the view's or 1) that starts at ``start``."""
    kept = list(kept) + [1] * (len(view) - len(kept))
    idx = torch.arange(math.prod(kept)).reshape(kept)
    return (idx.expand(*view) if view else idx).reshape(-1) + start


def _chunks(numels: Sequence[int], size: int) -> list[tuple[int, int, list]]:
    """The flat axis cut into chunks of ``size`` entries, as pieces of tensors."""
    chunks, pieces, a, filled = [], [], 0, 0
    for t, n in enumerate(numels):
        e = 0
        while e < n:
            take = min(n - e, size - filled)
            pieces.append((t, e, e + take))
            e += take
            filled += take
            if filled == size:
                chunks.append((a, a + filled, pieces))
                a, pieces, filled = a + filled, [], 0
    if pieces or not chunks:
        chunks.append((a, a + filled, pieces))
    return chunks


def plan_for(net: OptimizerNet, spec: WeightSpaceSpec, device: torch.device) -> Plan | None:
    """The plan of ``net`` on ``spec`` on ``device`` (built on first use),
    or None when the NF-layer's terms are not flat (fixed axes)."""
    plans = _plans.setdefault(net, OrderedDict())
    key = (spec, torch.device(device), CHUNK_ENTRIES)
    if key in plans:
        plans.move_to_end(key)
        return plans[key]
    with outside_transforms():  # kept: not wrapped for a transform it was made in
        plan = build(net, spec, device)
    plans[key] = plan
    if len(plans) > PLANS_PER_NET:
        plans.popitem(last=False)
    return plan


def build(net: OptimizerNet, spec: WeightSpaceSpec, device: torch.device) -> Plan | None:
    """The index tensors of ``net``'s forward on ``spec`` (see the module
    docstring), on ``device``."""
    tensors = spec.tensors
    numels = [t.numel for t in tensors]
    total = sum(numels)
    starts = [sum(numels[:i]) for i in range(len(tensors))]
    tensor = torch.repeat_interleave(torch.arange(len(tensors)), torch.tensor(numels))
    nfn = isinstance(net, NFNNet)
    flat = net.nf.flat_plan(spec) if nfn else None
    if nfn and flat is None:
        return None

    def span(i: int) -> slice:
        return slice(starts[i], starts[i] + numels[i])

    pointwise, role, pools, pool_sizes, terms = [], None, None, None, None
    if nfn:
        needed = net.nf.pools_needed(spec)
        keys = [net.nf.pointwise_key(spec, i) for i in range(len(tensors))]
        pointwise = sorted({k for k in keys if k is not None})
        role_of = [pointwise.index(k) if k is not None else len(pointwise) for k in keys]
        role = torch.tensor(role_of)[tensor]
        # Each entry's row of the pooled sums, per slot (one slot per pool
        # of its tensor; where it has fewer, the last row, a dump).
        rows_at, rows, sizes = {}, 0, []
        for i, pool in flat.pools:
            view = tensors[i].view
            rows_at[(i, pool)] = rows
            n = math.prod(v for a, v in enumerate(view) if a not in pool)
            sizes += [float(math.prod(view[a] for a in pool))] * n
            rows += n
        slots = max((len(needed.get(i, ())) for i in range(len(tensors))), default=0)
        pools = torch.full((slots, total), rows)
        for i, t in enumerate(tensors):
            for s, pool in enumerate(sorted(needed.get(i, ()))):
                kept = [1 if a in pool else v for a, v in enumerate(t.view)]
                pools[s, span(i)] = _broadcast_index(kept, t.view, rows_at[(i, pool)])
        pool_sizes = torch.tensor(sizes + [1.0]).reshape(-1, 1)
    layout = stat_rows = stat_slots = None
    if nfn and net.neuron_stats:
        layout = _stat_layout(spec, tuple(range(len(tensors))), net.width_free_stats)
        stat_rows = torch.empty(total, dtype=torch.long)
        stat_slots = torch.empty(total, dtype=torch.long)
        col_start = 0  # lay.col_slot lists every tensor's matrix columns, side by side
        for i, t in enumerate(tensors):
            cols = stat_matrix(t)[1]
            e = torch.arange(numels[i])
            stat_rows[span(i)] = layout.pieces[i][0] + e // cols
            stat_slots[span(i)] = layout.col_slot[col_start + e % cols]
            col_start += cols
    if nfn:
        # The term buffer: the NF-layer's rows, the statistics' row, slot
        # and whole-tensor terms, then a zero row.
        stat_sizes = [0, 0, 0]
        if layout is not None:
            stat_sizes = [len(layout.row_tensor), layout.col_slots, len(tensors)]
        firsts = [flat.rows + sum(stat_sizes[:j]) for j in range(3)]
        per_tensor = []
        for i in range(len(tensors)):
            mine = [(r0, shape) for r0, _, shape in flat.blocks[i]]
            if layout is not None:
                r0, _, c0, _, shapes = layout.pieces[i]
                if len(shapes) == 3:
                    mine += [(firsts[0] + r0, shapes[0]), (firsts[1] + c0, shapes[1])]
                mine.append((firsts[2] + i, shapes[-1]))
            per_tensor.append(mine)
        terms = torch.full((max(map(len, per_tensor), default=0), total), firsts[2] + stat_sizes[2])
        for i, (t, mine) in enumerate(zip(tensors, per_tensor)):
            for s, (start, shape) in enumerate(mine):
                terms[s, span(i)] = _broadcast_index(shape, t.view, start)
    tangent_rows = tangent_mask = None
    if net.rule.learned_term_tangent:
        tangent_rows = torch.empty(total, dtype=torch.long)
        mask, row = [], 0
        for i, t in enumerate(tensors):
            n_rows = t.shape[0] if len(t.shape) >= 2 else 1
            tangent_rows[span(i)] = row + torch.arange(numels[i]) // max(1, numels[i] // n_rows)
            mask += [1.0 if t.kind == "weight" and len(t.shape) >= 2 else 0.0] * n_rows
            row += n_rows
        tangent_mask = torch.tensor(mask + [0.0])

    ortho_entries = orthogonal_entries(spec, starts) if net.has_orthogonal_term else None

    def index(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.to(device=device, dtype=index_dtype(device))

    def to(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.to(device)

    if layout is not None:
        layout = StatLayout(*(to(f) if isinstance(f, Tensor) else f for f in layout))
    return Plan(
        spec=spec,
        numels=numels,
        chunks=_chunks(numels, CHUNK_ENTRIES),
        tensor=index(tensor),
        numel=torch.tensor([[float(max(1, n))] for n in numels], device=device),
        pointwise=pointwise,
        role=index(role),
        flat=None if flat is None else flat_terms.to(flat, torch.device(device)),
        pools=index(pools),
        pool_sizes=to(pool_sizes),
        layout=layout,
        stat_rows=index(stat_rows),
        stat_slots=index(stat_slots),
        terms=index(terms),
        tangent_rows=index(tangent_rows),
        tangent_mask=to(tangent_mask),
        ortho_entries=index(ortho_entries),
    )


def _piece(xs: Sequence[Tensor], pieces: list[tuple[int, int, int]]) -> Tensor:
    """A chunk's entries of per-tensor ``xs`` (each ``(..., entries)``): a
    view when it lies in one tensor, else a copy."""
    parts = [xs[t][..., e0:e1] for t, e0, e1 in pieces]
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


def forward(
    net: OptimizerNet,
    plan: Plan,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momenta: Sequence[Tensor],
    second_moments: Sequence[Tensor],
    step: Tensor,
    total_steps: Tensor | float | None = None,
    loss_in: Tensor | None = None,
) -> list[Tensor]:
    """:meth:`OptimizerNet.forward <lopt.nets.OptimizerNet.forward>` (its
    arguments, per tensor of the plan's spec) in a number of operators that
    does not grow with the number of tensors: the updates, views of one
    flat tensor."""
    k = len(MOMENTUM_DECAYS)
    c1, c2, steps_in, budget_in, bias = net.step_inputs(step, total_steps, loss_in)
    flat_p = [x.reshape(-1) for x in params]
    flat_g = [x.reshape(-1) for x in grads]
    flat_m = [x.reshape(k, -1) for x in momenta]
    flat_v = [x.reshape(-1) for x in second_moments]
    # The sums of squares channel_scales reads, of every tensor at once.
    n_t = len(params)
    sq = _norms([*flat_p, *flat_g, *(m[j] for m in flat_m for j in range(k))], 2).square()
    squares = torch.cat([sq[:n_t, None], sq[n_t : 2 * n_t, None], sq[2 * n_t :].reshape(n_t, k),
                         _norms(flat_v, 1)[:, None]], 1)  # fmt: skip
    scales = channel_scales_all(squares, plan.numel, c1)  # (T, features)
    term_log = net.term_log_factors(scales, c1, c2, budget_in, loss_in)
    log_factors = net.tensor_log_factors(plan.spec)  # shared with the orthogonal step
    neg_lrs, out_scales = net.tensor_factors(plan.spec, term_log, log_factors)
    scales_t, out_t = scales.t(), out_scales.t()
    base_scales = neg_lrs * scales[:, ADAM_CHANNEL]
    nfn = isinstance(net, NFNNet)
    if nfn:
        channels = net.nf_read().shape[0]
        # Each role's pointwise NF weight on the pooled channels, (roles + 1, 2 * channels).
        roles = [net._as_outputs(net.nf.weights[key].t(), 0) for key in plan.pointwise]
        pw_table = torch.stack(roles + [out_t.new_zeros(2, channels)]).reshape(-1, 2 * channels)
        pool_sums = out_t.new_zeros(plan.pool_sizes.shape[0], channels)
        if plan.layout is not None:
            stat_row_sums = out_t.new_zeros(plan.layout.row_tensor.shape[0], 3)
            stat_slot_sums = out_t.new_zeros(plan.layout.col_slots, 3)
    outs, bases, ps = [], [], []
    for a, b, pieces in plan.chunks:
        p, g = _piece(flat_p, pieces), _piece(flat_g, pieces)
        f = entry_channels(p, g, _piece(flat_m, pieces), _piece(flat_v, pieces), c2)
        tensor = plan.tensor[a:b]
        h = torch.relu(torch.addmm(bias[:, None], net.inp.weight,
                                   f * scales_t.index_select(1, tensor)))  # fmt: skip
        for layer in net.hidden:
            h = torch.relu(torch.addmm(layer.bias[:, None], layer.weight, h))
        base = f[ADAM_CHANNEL] * base_scales.index_select(0, tensor)
        o = torch.addmm(net.out.bias[:, None], net.out.weight, h)  # (2, entries)
        if nfn:
            q = h if net.nf_proj is None else net.nf_proj.weight @ h  # the channels pooled
            qt = q.t()
            coef = pw_table.index_select(0, plan.role[a:b]).view(-1, 2, channels)
            o = o + net.nf_scale * (coef * qt[:, None, :]).sum(-1).t()
            for idx in plan.pools:
                pool_sums = pool_sums.index_add(0, idx[a:b], qt)
            if plan.layout is not None:
                stat_sq = torch.stack([p * p, f[ADAM_CHANNEL].square(), g * g], 1)
                stat_row_sums = stat_row_sums.index_add(0, plan.stat_rows[a:b], stat_sq)
                stat_slot_sums = stat_slot_sums.index_add(0, plan.stat_slots[a:b], stat_sq)
        outs.append(o * out_t.index_select(1, tensor))
        bases.append(base)
        ps.append(p)
    if nfn:
        stat_sums = (stat_row_sums, stat_slot_sums) if plan.layout is not None else None
        buf = _term_buffer(net, plan, pool_sums, stat_sums, scales, out_scales)
    n_rows = 0 if plan.tangent_rows is None else plan.tangent_mask.shape[0]
    dots = out_t.new_zeros(2, n_rows)
    us = []
    for (a, b, _), o, base, p in zip(plan.chunks, outs, bases, ps):
        if nfn:
            for idx in plan.terms:
                o = o + buf.index_select(0, idx[a:b]).t()
        u = base + o[0] * o[1].clamp(max=MAX_LOG_MAGNITUDE).exp()
        if n_rows:
            rows = torch.stack([(u - base) * p, p * p])
            dots = dots.index_add(1, plan.tangent_rows[a:b], rows)
        us.append(u)
    if n_rows:  # the learned term, tangent to each weight row
        along = dots[0] / (dots[1] + 1e-30) * plan.tangent_mask
        us = [u - along.index_select(0, plan.tangent_rows[a:b]) * p
              for (a, b, _), u, p in zip(plan.chunks, us, ps)]  # fmt: skip
    u = us[0] if len(us) == 1 else torch.cat(us)
    if net.has_orthogonal_term:  # matrix products per shape of matrix, not per tensor
        terms = net.orthogonal_terms(plan.spec, momenta, scales, c1, c2, log_factors)
        on = [z.reshape(-1) for z in terms if z is not None]
        if on:
            u = u.index_add(0, plan.ortho_entries, torch.cat(on))
    scale = net.schedule_scale(steps_in, budget_in, loss_in)
    if scale is not None:
        u = u * scale.to(u.dtype)
    return [y.view(x.shape) for y, x in zip(u.split(plan.numels), params)]


def _norms(tensors: Sequence[Tensor], order: int) -> Tensor:
    """Each tensor's ``order``-norm, stacked: one multi-tensor operator,
    except under ``vmap`` (no batching rule), where it is one per tensor."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if any(wrapped(x) for x in tensors):
        return torch.stack([torch.linalg.vector_norm(x, order) for x in tensors])
    return torch.stack(torch._foreach_norm(list(tensors), order))


def _term_buffer(
    net: NFNNet,
    plan: Plan,
    pool_sums: Tensor,
    stat_sums: tuple[Tensor, Tensor] | None,
    scales: Tensor,
    out_scales: Tensor,
) -> Tensor:
    """Every term an entry reads, ``(rows, 2)`` (its rows: ``plan.terms``):
    the NF-layer's broadcast terms, the statistics' terms and a zero row."""
    flat = plan.flat
    scale_nf = net.nf_scale * out_scales  # (T, 2)
    parts = []
    if flat.rows:
        means = (pool_sums / plan.pool_sizes)[:-1]
        buf = flat_terms.buffer_from_means(flat, means, net.nf.weights, net.nf.biases)
        parts.append(net._as_outputs(buf, -1) * scale_nf[flat.row_tensor])
    if stat_sums is not None:
        row, col, whole = net.stat_term_rows(
            plan.layout, *stat_sums, scales[:, ADAM_CHANNEL], scale_nf[:, 1]
        )
        mag = torch.cat([row, col, whole])
        parts.append(torch.stack([torch.zeros_like(mag), mag], 1))
    parts.append(scale_nf.new_zeros(1, 2))
    return torch.cat(parts)
