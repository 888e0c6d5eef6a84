"""The equivariant linear NF-layer, generated from a WeightSpaceSpec."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lopt.nn import flat_terms
from lopt.nn.terms import (
    BiasFilter,
    OutputPlan,
    TermFilter,
    TieGroup,
    bias_key,
    build_plan,
    term_key,
)
from lopt.transforms import outside_transforms
from lopt.weightspace import TensorSpec, WeightSpace, WeightSpaceSpec

FLAT_PLANS = 16  # flat plans kept (the most recently used specs and devices)


class NFLinear(nn.Module):
    """Permutation-equivariant linear map from weight space to weight space.

    For every output tensor it sums the pointwise term and every pooled and
    broadcast term from every tensor that shares a neuron group with it, plus
    global means of all tensors (see :mod:`lopt.nn.terms`). With a spec in NP
    mode this is the NP layer of Zhou et al. (2023); in HNP mode it is the
    full affine equivariant family of Navon et al. (2023).

    Args:
        spec: the weight space the layer is built for, or a list of them (the
            weights of all their roles are created). With ``tie="role"`` the
            layer runs on any spec whose roles it has weights for: other
            widths and kernel sizes, and (NP) any depth from 2 up when built
            on a network of depth 3 or more.
        in_channels, out_channels: channel widths.
        tie: ``"role"`` (weights shared by role) or ``"none"`` (per tensor pair).
        bias: add a learned bias per output role and channel.
        strict: on a weight space with roles the layer has no weights for,
            raise (True) or leave those terms out (False; a tensor with no
            known term gets zeros, so pair the layer with a per-entry path).
    """

    def __init__(
        self,
        spec: WeightSpaceSpec | Sequence[WeightSpaceSpec],
        in_channels: int,
        out_channels: int,
        tie: str = "role",
        bias: bool = True,
        strict: bool = True,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"channels must be positive, got {in_channels} -> {out_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.tie, self.use_bias, self.strict = tie, bias, strict
        self._plans: dict[WeightSpaceSpec, tuple[OutputPlan, ...]] = {}
        self._flat: OrderedDict[tuple, flat_terms.FlatPlan | None] = OrderedDict()
        self._pointwise: dict[WeightSpaceSpec, list[str | None]] = {}
        self._pools: dict[WeightSpaceSpec, dict[int, set[tuple[int, ...]]]] = {}
        self.weights = nn.ParameterDict()
        self.biases = nn.ParameterDict()
        specs = [spec] if isinstance(spec, WeightSpaceSpec) else list(spec)
        for out in (o for sp in specs for o in self._plan(sp, create=True)):
            f_out = out_channels * math.prod(out.fixed_sizes)
            fan_in = sum(k.in_features for g in out.groups for k in g.inputs)
            bound = 1.0 / math.sqrt(max(fan_in, 1))
            for g in out.groups:
                for k in g.inputs:
                    if k.key not in self.weights:
                        w = torch.empty(k.in_features, f_out).uniform_(-bound, bound)
                        self.weights[k.key] = nn.Parameter(w)
            if out.bias_key is not None and out.bias_key not in self.biases:
                self.biases[out.bias_key] = nn.Parameter(torch.empty(f_out).uniform_(-bound, bound))

    # Subclasses (monomial layers) restrict the terms with static methods.
    term_allowed: TermFilter | None = None
    bias_allowed: BiasFilter | None = None

    def _plan(self, spec: WeightSpaceSpec, create: bool = False) -> tuple[OutputPlan, ...]:
        plan = self._plans.get(spec)
        if plan is None:
            plan = build_plan(
                spec,
                self.in_channels,
                self.tie,
                type(self).term_allowed,
                type(self).bias_allowed,
                self.use_bias,
            )
            if not create:
                missing = sorted(
                    {k.key for o in plan for g in o.groups for k in g.inputs} - set(self.weights)
                    | ({o.bias_key for o in plan if o.bias_key} - set(self.biases))
                )
                if missing and not self.strict:
                    plan = self._known_terms(plan)
                elif missing:
                    raise ValueError(
                        f"{type(self).__name__} has no weights for these roles of the given "
                        f"weight space: {missing[:6]}{' ...' if len(missing) > 6 else ''}. "
                        "Build the layer from a spec that contains them (e.g. a deeper network)."
                    )
            self._plans[spec] = plan
        return plan

    def _known_terms(self, plan: tuple[OutputPlan, ...]) -> tuple[OutputPlan, ...]:
        out = []
        for o in plan:
            groups = []
            for g in o.groups:
                inputs = tuple(k for k in g.inputs if k.key in self.weights)
                if inputs:
                    groups.append(TieGroup(g.tied, inputs))
            bias = o.bias_key if o.bias_key in self.biases else None
            out.append(OutputPlan(o.u_index, o.fixed, o.fixed_sizes, bias, tuple(groups)))
        return tuple(out)

    def forward(self, ws: WeightSpace) -> WeightSpace:
        if ws.channels != self.in_channels:
            raise ValueError(f"expected {self.in_channels} channels, got {ws.channels}")
        spec = ws.spec
        plan = self._plan(spec)
        xs = ws.tensors
        nb = xs[0].dim() - len(spec.tensors[0].view) - 1
        pooled = PoolCache(xs, nb)
        outs = []
        for out in plan:
            u = spec.tensors[out.u_index]
            batch = xs[out.u_index].shape[:nb]
            partial = [
                (g.tied, self._group_term(spec, out, g, pooled, nb, batch)) for g in out.groups
            ]
            if out.bias_key is not None:
                partial.append(((), self._bias_term(u, out)))
            shape = (*batch, *u.view, self.out_channels)
            if not partial:  # a role this layer knows nothing about (strict=False)
                outs.append(xs[out.u_index].new_zeros(shape))
                continue
            outs.append(_sum_broadcast(partial, shape))
        return WeightSpace(spec, outs)

    # ------------------------------------------------ pieces for chunked use
    def pointwise_weight(self, spec: WeightSpaceSpec, u_index: int) -> Tensor | None:
        """The weight of the term that reads U's own entry (``x_U @ w``); the
        rest of the layer is :meth:`broadcast_terms`."""
        key = self.pointwise_key(spec, u_index)
        return None if key is None else self.weights[key]

    def pointwise_key(self, spec: WeightSpaceSpec, u_index: int) -> str | None:
        """The key of :meth:`pointwise_weight` (None: no such term)."""
        if spec not in self._pointwise:
            self._pointwise[spec] = [self._pointwise_key(spec, o) for o in self._plan(spec)]
        return self._pointwise[spec][u_index]

    def output_roles(self, spec: WeightSpaceSpec) -> list[str | None]:
        """Per tensor of ``spec``: the key of its output role's bias (its
        axis kinds, e.g. ``"bias:hh"`` for a hidden matrix), or None where
        the layer has no bias for it."""
        return [o.bias_key for o in self._plan(spec)]

    def pools_needed(self, spec: WeightSpaceSpec) -> dict[int, set[tuple[int, ...]]]:
        """For each tensor, the axis sets :meth:`broadcast_terms` averages it
        over (``()``: the tensor itself). Built once per spec: do not modify."""
        if spec not in self._pools:
            self._pools[spec] = self._pools_needed(spec)
        return self._pools[spec]

    def _pools_needed(self, spec: WeightSpaceSpec) -> dict[int, set[tuple[int, ...]]]:
        need: dict[int, set[tuple[int, ...]]] = {}
        for out in self._plan(spec):
            skip = self._pointwise_key(spec, out)
            for g in out.groups:
                for k in g.inputs:
                    if k.key != skip:
                        for c in k.contributions:
                            need.setdefault(c.t_index, set()).add(c.pool)
        return need

    def broadcast_terms(
        self,
        spec: WeightSpaceSpec,
        pooled: Mapping[tuple[int, tuple[int, ...]], Tensor],
        flat: bool = False,
    ) -> list[list[Tensor]]:
        """Every term but the pointwise one, per output tensor, as a few small
        broadcastable tensors (terms that broadcast into one another are
        summed; a row term and a column term are kept apart, so nothing
        output-sized is made), from the means ``pooled[(t_index, axes)]`` of
        unbatched inputs. With :meth:`pointwise_weight` this is the whole layer.
        ``flat=True`` computes them in a fixed number of operations
        (:mod:`lopt.nn.flat_terms`), one term per broadcast shape, where the
        spec has no fixed axes."""
        device = next(iter(pooled.values())).device if pooled else torch.device("cpu")
        plan = self.flat_plan(spec, device) if flat else None
        if plan is not None:
            return flat_terms.terms(plan, pooled, self.weights, self.biases)
        out_terms = []
        for out in self._plan(spec):
            u = spec.tensors[out.u_index]
            skip = self._pointwise_key(spec, out)
            partial = []
            for g in out.groups:
                inputs = tuple(k for k in g.inputs if k.key != skip)
                if inputs:
                    sub = TieGroup(g.tied, inputs)
                    partial.append((g.tied, self._group_term(spec, out, sub, pooled, 0, ())))
            if out.bias_key is not None:
                partial.append(((), self._bias_term(u, out)))
            out_terms.append(_merge_small([t for _, t in partial]))
        return out_terms

    def flat_plan(
        self, spec: WeightSpaceSpec, device: torch.device | None = None
    ) -> flat_terms.FlatPlan | None:
        """The index tensors of :mod:`lopt.nn.flat_terms` for ``spec`` on
        ``device`` (None where it has fixed axes), built once."""
        key = (spec, torch.device(device or "cpu"))
        if key in self._flat:
            self._flat.move_to_end(key)
            return self._flat[key]
        with outside_transforms():  # cached: not wrapped for a transform it was made in
            if key[1].type == "cpu":
                skip = [self.pointwise_key(spec, i) for i in range(len(spec.tensors))]
                plan = flat_terms.build(spec, self._plan(spec), skip)
            else:
                cpu = self.flat_plan(spec)
                plan = None if cpu is None else flat_terms.to(cpu, key[1])
        self._flat[key] = plan
        if len(self._flat) > FLAT_PLANS:  # meta-training meets many specs
            self._flat.popitem(last=False)
        return plan

    def _pointwise_key(self, spec: WeightSpaceSpec, out: OutputPlan) -> str | None:
        if out.fixed:
            return None
        full = tuple(range(len(spec.tensors[out.u_index].axes)))
        for g in out.groups:
            if g.tied == full:
                for k in g.inputs:
                    c = k.contributions
                    if len(c) == 1 and c[0].t_index == out.u_index and not c[0].pool:
                        return k.key
        return None

    def _bias_term(self, u: TensorSpec, out: OutputPlan) -> Tensor:
        shape = [u.view[a] if a in out.fixed else 1 for a in range(len(u.view))]
        return self.biases[out.bias_key].reshape(*shape, self.out_channels)

    def _group_term(self, spec, out: OutputPlan, group: TieGroup, pooled, nb: int, batch) -> Tensor:
        """All terms of one tie group: average, arrange, concatenate, one matmul."""
        u = spec.tensors[out.u_index]
        k_u = len(u.view)
        arranged_shape = [u.view[a] if a in group.tied else 1 for a in range(k_u)]
        feats = []
        lead = tuple(range(nb))
        for k in group.inputs:
            acc = None
            for c in k.contributions:
                x = pooled[(c.t_index, c.pool)]
                if c.perm is not None:  # precomputed with the plan
                    x = x.permute(*lead, *(nb + p for p in c.perm), x.dim() - 1)
                x = x.reshape(*batch, *arranged_shape, -1)
                acc = x if acc is None else acc + x
            if len(k.contributions) > 1:
                acc = acc / len(k.contributions)
            feats.append(acc)
        x = feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)
        w = (
            self.weights[group.inputs[0].key]
            if len(group.inputs) == 1
            else torch.cat([self.weights[k.key] for k in group.inputs], dim=0)
        )
        return self._place_fixed(x @ w, out, nb, k_u)

    def _place_fixed(self, y: Tensor, out: OutputPlan, nb: int, k_u: int) -> Tensor:
        """Move U's fixed-axis indices from the channel axis to their own axes."""
        if not out.fixed:
            return y
        c = self.out_channels
        shape = list(y.shape[:-1])
        kept = [shape[nb + a] for a in range(k_u) if a not in out.fixed]
        y = y.reshape(*shape[:nb], *kept, *out.fixed_sizes, c)
        n_f = len(out.fixed)
        src = list(range(y.dim() - 1 - n_f, y.dim() - 1))
        return torch.movedim(y, src, [nb + a for a in out.fixed])

    def weight_for(self, spec: WeightSpaceSpec, u_index: int, t_index: int, ties) -> Tensor | None:
        """The weight matrix of one term (for reference implementations and tests)."""
        key = term_key(spec, u_index, t_index, tuple(ties), self.tie)
        return self.weights[key] if key in self.weights else None

    def bias_for(self, spec: WeightSpaceSpec, u_index: int) -> Tensor | None:
        """The bias of one output tensor, or None."""
        key = bias_key(spec, u_index, self.tie)
        return self.biases[key] if key in self.biases else None

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, tie={self.tie!r}, "
            f"terms={len(self.weights)}, bias={self.use_bias}"
        )


def _sum_broadcast(parts: list[tuple[tuple[int, ...], Tensor]], shape) -> Tensor:
    """Sum broadcastable terms into the largest one.

    The small (pooled) terms are folded together first; the full-size term is
    a fresh matmul output, so they are added into it in place: on CPU a new
    full-size buffer costs more than the arithmetic (page faults)."""
    parts = sorted(parts, key=lambda p: -p[1].numel())
    total = parts[0][1]
    merged = _merge_small([t for _, t in parts[1:]])
    if tuple(total.shape) != tuple(shape):
        total = total.expand(*shape).clone()
    for t in merged:
        try:
            total = total.add_(t)
        except RuntimeError:  # under vmap, t may be batched where total is not
            total = total + t
    return total


def _merge_small(parts: list[Tensor]) -> list[Tensor]:
    """Sum each tensor into an earlier, larger one it broadcasts into."""
    merged: list[Tensor] = []
    for t in sorted(parts, key=lambda t: -t.numel()):
        for i, m in enumerate(merged):
            if _fits_in(t.shape, m.shape):
                merged[i] = m + t
                break
        else:
            merged.append(t)
    return merged


class PoolCache(dict):
    """Means of input tensors over axis sets, computed once per forward."""

    def __init__(self, xs: Sequence[Tensor], nb: int) -> None:
        super().__init__()
        self.xs, self.nb = xs, nb

    def __missing__(self, key: tuple[int, tuple[int, ...]]) -> Tensor:
        ti, pool = key
        x = self.xs[ti]
        value = x.mean(dim=[self.nb + b for b in pool]) if pool else x
        self[key] = value
        return value


def _fits_in(small, big) -> bool:
    """Whether ``small`` broadcasts to ``big`` without growing it."""
    if len(small) > len(big):
        return False
    return all(s == 1 or s == b for s, b in zip(reversed(small), reversed(big)))
