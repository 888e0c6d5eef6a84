"""An NF-layer's broadcast terms in a fixed number of operations.

:meth:`NFLinear.broadcast_terms <lopt.nn.linear.NFLinear.broadcast_terms>`
builds each output tensor's terms from the pooled means, a few operations per
term: on a network of many small tensors a step pays for those operations,
not for the arithmetic. Every broadcast term is linear in the pooled means,
so the whole layer is one gather and one matmul per entry of its output:

1. all pooled means, flattened, are the rows of one matrix ``P``;
2. each entry of each term's output (a *bag*) averages the rows of ``P`` its
   contributions read (``embedding_bag``, mode ``mean``);
3. each bag is multiplied by its key's weight (one batched matmul) and added
   into its row of one output buffer (``index_add_``), biases likewise.

The rows of the buffer are, per output tensor, a block per broadcast shape;
the terms come back as views of it. The index tensors are built once per
spec (:func:`build`). Layers with fixed axes (HNP) keep the per-term path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812

from lopt.nn.terms import OutputPlan
from lopt.weightspace import WeightSpaceSpec


@dataclass(frozen=True)
class FlatPlan:
    """Index tensors of one spec's broadcast terms (see the module docstring)."""

    pools: tuple[tuple[int, tuple[int, ...]], ...]  # the pooled means, in P's row order
    members: Tensor  # rows of P, bag after bag
    offsets: Tensor  # where each bag starts in ``members``
    bag_key: Tensor  # the weight each bag is multiplied by (an index into ``keys``)
    bag_row: Tensor  # the output row each bag is added into
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
                lengths.append(torch.full((n,), len(idx)))
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
    lengths_t = torch.cat(lengths) if lengths else torch.zeros(0, dtype=torch.long)
    offsets = torch.cumsum(lengths_t, 0) - lengths_t
    empty = torch.zeros(0, dtype=torch.long)
    return FlatPlan(
        pools=tuple(pools),
        members=torch.cat(members) if members else empty,
        offsets=offsets,
        bag_key=torch.cat(bag_key) if bag_key else empty,
        bag_row=torch.cat(bag_row) if bag_row else empty,
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
    first = next(iter(weights.values()))
    c_out = first.shape[1]
    out = first.new_zeros(flat.rows, c_out)
    if flat.members.numel():
        p = torch.cat([pooled[k].reshape(-1, pooled[k].shape[-1]) for k in flat.pools])
        x = F.embedding_bag(flat.members, p, flat.offsets, mode="mean")
        w = torch.stack([weights[k] for k in flat.keys])[flat.bag_key]
        out.index_add_(0, flat.bag_row, torch.bmm(x.unsqueeze(1), w).squeeze(1))
    if flat.bias_keys:
        b = torch.stack([biases[k] for k in flat.bias_keys])[flat.bias_index]
        out.index_add_(0, flat.bias_row, b)
    return out
