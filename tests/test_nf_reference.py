"""The equivariant linear layer against slow, obviously correct references, and
a check that it spans the full space of equivariant linear maps."""

import itertools
import math

import numpy as np
import pytest
import torch
from helpers import make_cnn, make_mlp, random_ws
from torch import nn

from lopt import WeightSpace, WeightSpaceSpec
from lopt.nn import NFLinear, ScaleNFLinear
from lopt.weightspace import FIXED, GROUP, LOCAL


def naive_terms(spec, ui):
    """Every (T, ties) pair of the full layer for output tensor ui, by brute force."""
    u = spec.tensors[ui]
    out = []
    for ti, t in enumerate(spec.tensors):
        shared = []
        for a, ax in enumerate(u.axes):
            for b, bx in enumerate(t.axes):
                same_group = ax.kind == bx.kind == GROUP and ax.group == bx.group
                same_local = ax.kind == bx.kind == LOCAL and ui == ti and a == b
                if same_group or same_local:
                    shared.append((a, b))
        for r in range(len(shared) + 1):
            out.extend((ti, ties) for ties in itertools.combinations(shared, r))
    return out


def fixed_flat(view, axes, idx):
    """Row-major index of idx restricted to the fixed axes."""
    dims = [(idx[a], view[a]) for a, ax in enumerate(axes) if ax.kind == FIXED]
    flat = 0
    for i, n in dims:
        flat = flat * n + i
    return flat


def naive_forward(layer: NFLinear, ws: WeightSpace):
    """Loops over every output entry and every input entry."""
    spec = ws.spec
    c_in, c_out = layer.in_channels, layer.out_channels
    xs = [x.detach().numpy().astype(np.float64) for x in ws.tensors]
    outs = []
    for ui, u in enumerate(spec.tensors):
        terms = []
        for ti, ties in naive_terms(spec, ui):
            allowed = type(layer).term_allowed
            if allowed is not None and not allowed(spec, ui, ti, ties):
                continue
            w = layer.weight_for(spec, ui, ti, ties)
            if w is not None:
                terms.append((ti, ties, w))
        # Role-tied terms of one output that share weights are averaged.
        n_same = {}
        for _, _, w in terms:
            n_same[id(w)] = n_same.get(id(w), 0) + 1
        terms = [
            (ti, ties, w.detach().numpy().astype(np.float64), n_same[id(w)])
            for ti, ties, w in terms
        ]
        bias = layer.bias_for(spec, ui)
        y = np.zeros(u.view + (c_out,))
        for uidx in np.ndindex(*u.view):
            uf = fixed_flat(u.view, u.axes, uidx)
            acc = np.zeros(c_out)
            for ti, ties, w, shared in terms:
                t = spec.tensors[ti]
                n_fixed = math.prod(ax.size for ax in t.axes if ax.kind == FIXED)
                matches = [
                    tidx for tidx in np.ndindex(*t.view) if all(tidx[b] == uidx[a] for a, b in ties)
                ]
                n_pool = len(matches) // n_fixed
                for tidx in matches:
                    tf = fixed_flat(t.view, t.axes, tidx)
                    block = w[tf * c_in : (tf + 1) * c_in, uf * c_out : (uf + 1) * c_out]
                    acc += xs[ti][tidx] @ block / n_pool / shared
            if bias is not None:
                acc += bias.detach().numpy()[uf * c_out : (uf + 1) * c_out]
            y[uidx] = acc
        outs.append(y)
    return outs


CASES = {
    "mlp-np": (make_mlp([2, 3, 2, 2]), "np"),
    "mlp-hnp": (make_mlp([3, 2, 3]), "hnp"),
    "mlp-nobias": (make_mlp([2, 3, 2], bias=False), "np"),
    "cnn-flatten": (make_cnn([1, 2, 2], [2, 1], 1, "flatten", 2, True, 2), "np"),
    "cnn-pool-hnp": (make_cnn([2, 2], [2], 2, "pool", 2, True), "hnp"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("tie", ["role", "none"])
def test_nf_linear_matches_naive_loops(case, tie):
    torch.manual_seed(0)
    model, mode = CASES[case]
    spec = WeightSpaceSpec.from_module(model, mode=mode)
    layer = NFLinear(spec, 2, 3, tie=tie)
    ws = random_ws(spec, 2)
    got = layer(ws)
    for t, x, ref in zip(spec.tensors, got.tensors, naive_forward(layer, ws)):
        np.testing.assert_allclose(x.detach().numpy(), ref, rtol=1e-4, atol=1e-5, err_msg=t.name)


def test_monomial_layer_matches_naive_loops():
    torch.manual_seed(1)
    spec = WeightSpaceSpec.from_module(make_mlp([2, 3, 2, 2]))
    layer = ScaleNFLinear(spec, 2, 2)
    ws = random_ws(spec, 2)
    for x, ref in zip(layer(ws).tensors, naive_forward(layer, ws)):
        np.testing.assert_allclose(x.detach().numpy(), ref, rtol=1e-4, atol=1e-5)


def test_single_layer_by_hand():
    """One 2x3 weight and its bias, NP, one channel: the formula written out."""
    spec = WeightSpaceSpec.from_module(nn.Linear(3, 2))
    layer = NFLinear(spec, 1, 1, tie="none")
    w, b = torch.randn(2, 3), torch.randn(2)
    out_w, out_b = layer(WeightSpace.from_tensors(spec, [w, b])).to_tensors()

    def c(u, t, ties):
        return layer.weight_for(spec, u, t, ties).item()

    row, col = w.mean(1, keepdim=True), w.mean(0, keepdim=True)
    expect_w = (
        c(0, 0, [(0, 0), (1, 1)]) * w
        + c(0, 0, [(0, 0)]) * row
        + c(0, 0, [(1, 1)]) * col
        + c(0, 0, []) * w.mean()
        + c(0, 1, [(0, 0)]) * b[:, None]
        + c(0, 1, []) * b.mean()
        + layer.bias_for(spec, 0).item()
    )
    expect_b = (
        c(1, 1, [(0, 0)]) * b
        + c(1, 1, []) * b.mean()
        + c(1, 0, [(0, 0)]) * row[:, 0]
        + c(1, 0, []) * w.mean()
        + layer.bias_for(spec, 1).item()
    )
    torch.testing.assert_close(out_w, expect_w.detach())
    torch.testing.assert_close(out_b, expect_b.detach())


# ---------------------------------------------------------------- full family
def _entries(spec):
    return [(ti, idx) for ti, t in enumerate(spec.tensors) for idx in np.ndindex(*t.view)]


def _generators(spec):
    """Adjacent transpositions of every permutable group and every local axis;
    of a nested group, within one neuron of its parent at a time."""
    gens = []
    groups, nesting = spec.permutable_groups(), spec.nesting()
    for g, n in groups.items():
        heads = range(groups[nesting[g]]) if g in nesting else [None]
        for h in heads:
            for i in range(n - 1):
                gens.append(("g", g, i, h))
    for ti, t in enumerate(spec.tensors):
        for a, ax in enumerate(t.axes):
            if ax.kind == LOCAL:
                gens.extend(("l", (ti, a), i, None) for i in range(ax.size - 1))
    return gens


def _act(spec, gen, entry):
    kind, name, i, head = gen
    ti, idx = entry
    idx = list(idx)
    for a, ax in enumerate(spec.tensors[ti].axes):
        hit = (kind == "g" and ax.kind == GROUP and ax.group == name) or (
            kind == "l" and name == (ti, a)
        )
        hit = hit and (head is None or idx[a - 1] == head)
        if hit and idx[a] in (i, i + 1):
            idx[a] = 2 * i + 1 - idx[a]
    return ti, tuple(idx)


def _count_orbits(items, step):
    parent = {x: x for x in items}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x in items:
        for y in step(x):
            parent[find(x)] = find(y)
    return len({find(x) for x in items})


def attention_spec():
    """Query, key and value projections into 2 heads of 2 dimensions (query
    and key sharing theirs), an output projection, a stream of 2."""
    axes = {"q": ("a", "qk", "s"), "k": ("a", "qk", "s"), "v": ("a", "vd", "s"),
            "o": ("s", "a", "vd"), "ob": ("s",)}  # fmt: skip
    shapes = {"q": (4, 2), "k": (4, 2), "v": (4, 2), "o": (2, 4), "ob": (2,)}
    views = {"q": (2, 2, 2), "k": (2, 2, 2), "v": (2, 2, 2), "o": (2, 2, 2)}
    return WeightSpaceSpec.from_axes(axes, shapes, views=views,
                                     nested={"qk": "a", "vd": "a"})  # fmt: skip


@pytest.mark.parametrize(
    "model,mode",
    [
        (make_mlp([2, 3, 2, 2]), "np"),
        (make_mlp([2, 3, 2, 2]), "hnp"),
        (make_mlp([3, 2, 2], bias=False), "hnp"),
        (make_cnn([2, 2], [2], 1, "pool", 2, True), "np"),
        ("attention", "np"),
    ],
)
def test_untied_layer_spans_every_equivariant_linear_map(model, mode):
    """dim(equivariant maps) = #orbits of the symmetry group on (out, in) entry
    pairs; the untied layer's linear weights must be that many and independent.
    With nested groups (attention heads) the group is finer than a product of
    permutations, and so are its orbits."""
    if model == "attention":
        spec = attention_spec()
    else:
        spec = WeightSpaceSpec.from_module(model, mode=mode)
    entries = _entries(spec)
    gens = _generators(spec)
    pairs = [(u, t) for u in entries for t in entries]
    n_orbits = _count_orbits(
        pairs, lambda p: [(_act(spec, g, p[0]), _act(spec, g, p[1])) for g in gens]
    )
    n_bias_orbits = _count_orbits(entries, lambda e: [_act(spec, g, e) for g in gens])

    layer = NFLinear(spec, 1, 1, tie="none")
    n_weights = sum(w.numel() for w in layer.weights.values())
    assert n_weights == n_orbits
    assert sum(b.numel() for b in layer.biases.values()) == n_bias_orbits

    # Independence: the maps obtained from each unit weight have full rank.
    flat_in = torch.zeros(spec.numel)

    def apply(flat):
        xs, i = [], 0
        for t in spec.tensors:
            xs.append(flat[i : i + t.numel].reshape(*t.view, 1))
            i += t.numel
        return torch.cat([y.reshape(-1) for y in layer(WeightSpace(spec, xs)).tensors])

    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
    maps = []
    for w in layer.weights.values():
        for j in range(w.numel()):
            with torch.no_grad():
                w.view(-1)[j] = 1.0
            maps.append(torch.autograd.functional.jacobian(apply, flat_in).reshape(-1))
            with torch.no_grad():
                w.view(-1)[j] = 0.0
    assert torch.linalg.matrix_rank(torch.stack(maps)).item() == n_weights
