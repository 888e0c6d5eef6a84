"""An NF-layer's broadcast terms in a fixed number of operations.

:meth:`NFLinear.broadcast_terms <lopt.nn.linear.NFLinear.broadcast_terms>`
builds each output tensor's terms from the pooled means, a few operations per
term: on a network of many small tensors a step pays for those operations,
not for the arithmetic. Every broadcast term is linear in the pooled means,
so the whole layer is one gather and one matmul per entry of its output:

1. all pooled means, flattened, are the rows of one matrix ``P``;
2. each entry of each term's output (a *bag*) averages the rows of ``P`` its
   contributions read: bags of one size at a time, a gather and a mean;
3. each bag is multiplied by its key's weight (one batched matmul) and added
   into its row of one output buffer (``index_add``), biases likewise.

The rows of the buffer are, per output tensor, a block per broadcast shape;
the terms come back as views of it. The index tensors are built once per
spec (:func:`build`). Every operation has a ``vmap`` batching rule and a
derivative, so meta-training runs it too. Layers with fixed axes (HNP) keep
the per-term path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lopt.nn.terms import OutputPlan
from lopt.weightspace import WeightSpaceSpec


@dataclass(frozen=True)
class FlatPlan:
    """Index tensors of one spec's broadcast terms (see the module docstring)."""

    pools: tuple[tuple[int, tuple[int, ...]], ...]  # the pooled means, in P's row order
    # Per bag size m: the rows of P of its bags, (bags, m), bags ordered by size.
    members: tuple[Tensor, ...]
    bag_key: Tensor  # per bag, in that order: its weight (an index into ``keys``)
    bag_row: Tensor  # the output row it is added into
    keys: tuple[str, ...]
    bias_keys: tuple[str, ...]
    bias_row: Tensor  # the output row of each output tensor's bias
    bias_index: Tensor  # its index into ``bias_keys``
    rows: int
    # Per output tensor, per term: (first row, end row, broadcast shape).
    blocks: tuple[tuple[tuple[int, int, tuple[int, ...]], ...], ...]
    row_tensor: Tensor  # the output tensor each row belongs to


def build(
    spec: WeightSpaceSpec, plan: tuple[OutputPlan, ...], pointwise: list[str | None]
) -> FlatPlan | None:
    """The flat plan of a layer's ``plan`` on ``spec`` (``pointwise[i]``: the
    key of tensor i's pointwise term, left to the caller), or None when a
    tensor has fixed axes."""
    if any(out.fixed for out in plan) or any(
        c.n_fixed for out in plan for g in out.groups for k in g.inputs for c in k.contributions
    ):
        return None
    pools: dict[tuple[int, tuple[int, ...]], int] = {}  # -> first row in P
    sizes: dict[tuple[int, tuple[int, ...]], tuple[int, ...]] = {}

    def rows_of(t_index: int, pool: tuple[int, ...]) -> Tensor:
        key = (t_index, pool)
        if key not in pools:
            view = spec.tensors[t_index].view
            sizes[key] = tuple(n for a, n in enumerate(view) if a not in pool)
            pools[key] = sum(math.prod(s) for s in sizes.values()) - math.prod(sizes[key])
        return torch.arange(math.prod(sizes[key])).reshape(sizes[key]) + pools[key]

    members, lengths, bag_key, bag_row = [], [], [], []
    keys: dict[str, int] = {}
    bias_keys: dict[str, int] = {}
    bias_row, bias_index, blocks = [], [], []
    row = 0
    for out, skip in zip(plan, pointwise):
        u = spec.tensors[out.u_index]
        mine = []
        for g in out.groups:
            inputs = [k for k in g.inputs if k.key != skip]
            if not inputs:
                continue
            shape = tuple(u.view[a] if a in g.tied else 1 for a in range(len(u.view)))
            n = math.prod(shape)
            for k in inputs:
                # Each contribution's rows of P, arranged on U's tied axes.
                idx = []
                for c in k.contributions:
                    x = rows_of(c.t_index, c.pool)
                    if c.perm is not None:
                        x = x.permute(*c.perm)
                    idx.append(x.reshape(n))
                members.append(torch.stack(idx, 1).reshape(-1))
                lengths.append((len(idx), n))
                bag_key.append(torch.full((n,), keys.setdefault(k.key, len(keys))))
                bag_row.append(torch.arange(row, row + n))
            mine.append((row, row + n, shape))
            row += n
        if out.bias_key is not None:
            bias_row.append(row)
            bias_index.append(bias_keys.setdefault(out.bias_key, len(bias_keys)))
            mine.append((row, row + 1, (1,) * len(u.view)))
            row += 1
        blocks.append(tuple(mine))
    empty = torch.zeros(0, dtype=torch.long)
    # Bags of one size together, so that each size is one gather and one mean.
    by_size: dict[int, list[int]] = {}
    for j, (m, _) in enumerate(lengths):
        by_size.setdefault(m, []).append(j)
    order = [j for m in sorted(by_size) for j in by_size[m]]
    groups = tuple(
        torch.cat([members[j].reshape(lengths[j][1], m) for j in by_size[m]])
        for m in sorted(by_size)
    )
    return FlatPlan(
        pools=tuple(pools),
        members=groups,
        bag_key=torch.cat([bag_key[j] for j in order]) if order else empty,
        bag_row=torch.cat([bag_row[j] for j in order]) if order else empty,
        keys=tuple(keys),
        bias_keys=tuple(bias_keys),
        bias_row=torch.tensor(bias_row, dtype=torch.long),
        bias_index=torch.tensor(bias_index, dtype=torch.long),
        rows=row,
        blocks=tuple(blocks),
        row_tensor=torch.cat(
            [torch.full((r1 - r0,), i) for i, mine in enumerate(blocks) for r0, r1, _ in mine]
            or [empty]
        ),
    )


def terms(
    flat: FlatPlan,
    pooled: Mapping[tuple[int, tuple[int, ...]], Tensor],
    weights: Mapping[str, Tensor],
    biases: Mapping[str, Tensor],
) -> list[list[Tensor]]:
    """Every broadcast term, per output tensor, as views ``(*shape,
    channels)`` of one buffer, from the pooled means ``pooled[(t_index,
    axes)]`` (unbatched, channels last) and the layer's weights."""
    out = buffer(flat, pooled, weights, biases)
    c_out = out.shape[1]
    return [[out[r0:r1].reshape(*shape, c_out) for r0, r1, shape in mine] for mine in flat.blocks]


def buffer(
    flat: FlatPlan,
    pooled: Mapping[tuple[int, tuple[int, ...]], Tensor],
    weights: Mapping[str, Tensor],
    biases: Mapping[str, Tensor],
) -> Tensor:
    """The terms' buffer ``(rows, channels)``: :attr:`FlatPlan.blocks` says
    which rows hold which term."""
    p = None
    if flat.members:
        p = torch.cat([pooled[k].reshape(-1, pooled[k].shape[-1]) for k in flat.pools])
    return buffer_from_means(flat, p, weights, biases)


def buffer_from_means(
    flat: FlatPlan,
    p: Tensor | None,
    weights: Mapping[str, Tensor],
    biases: Mapping[str, Tensor],
) -> Tensor:
    """:func:`buffer` from the pooled means already stacked as ``P``
    ``(rows, channels)``, in :attr:`FlatPlan.pools`' order."""
    first = next(iter(weights.values()))
    c_out = first.shape[1]
    out = first.new_zeros(flat.rows, c_out)
    if flat.members:
        x = torch.cat(
            [p.index_select(0, m.reshape(-1)).reshape(*m.shape, -1).mean(1) for m in flat.members]
        )
        w = torch.stack([weights[k] for k in flat.keys])[flat.bag_key]
        out = out.index_add(0, flat.bag_row, torch.bmm(x.unsqueeze(1), w).squeeze(1))
    if flat.bias_keys:
        b = torch.stack([biases[k] for k in flat.bias_keys])[flat.bias_index]
        out = out.index_add(0, flat.bias_row, b)
    return out


def to(flat: FlatPlan, device: torch.device) -> FlatPlan:
    """The plan with its index tensors on ``device``."""
    move = {
        name: getattr(flat, name).to(device)
        for name in ("bag_key", "bag_row", "bias_row", "bias_index", "row_tensor")
    }
    return replace(flat, members=tuple(m.to(device) for m in flat.members), **move)
