"""A weight-space spec read from a model's traced graph (``torch.fx``).

Each value in the graph may carry one *feature axis* that indexes a neuron
group: the last axis after a Linear, LayerNorm or Embedding, axis 1 after a
Conv or BatchNorm. The axis is followed through the operations that keep it:

* Linear and Conv weights read the group of their input's feature axis and
  write a new group (their rows); their biases write it too;
* activations, dropout, pooling over other axes, and a flatten after a conv
  (whose next Linear reads ``(channel, position)`` columns) keep it;
* an addition or product of two values with feature axes makes their groups
  one (union-find), so a residual stream is one group shared by the stem,
  every block that writes it, every layer that reads it and the head;
* BatchNorm, LayerNorm, RMSNorm (and GroupNorm of one group per channel or
  one group in all) keep it, and their scale and shift join it;
* ``transpose`` / ``permute`` / indexing move or keep the feature axis; a
  concatenation along another axis (positions, a learned class token) makes
  one group of its parts;
* an Embedding's rows are an input group, its columns write a group;
* attention (:mod:`lopt.graph_heads`): ``nn.MultiheadAttention``, and the
  same pattern written by hand (a projection reshaped into heads, ``q @
  k.transpose``, softmax, ``@ v``, heads merged back, an output projection),
  makes a head group and, nested in it, the query-key and the value
  dimensions of a head.

A group that reaches an operation not understood here (a concatenation of
features, a reduction over the feature axis) cannot be permuted as a whole: its axes
become local, and a warning names the operation and the parameters it
affects. A module that cannot be traced at
all falls back on the sequential rule (:meth:`WeightSpaceSpec.from_module`'s
``graph=False``), with a warning.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import nn

from lopt.weightspace import GROUP, HIDDEN, INPUT, LOCAL, OUTPUT, Axis, TensorSpec

_KEEP_MODULES = (
    nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus,
    nn.Mish, nn.Hardtanh, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AvgPool1d, nn.AvgPool2d, nn.MaxPool1d, nn.MaxPool2d,
)  # fmt: skip
_KEEP_FUNCTIONS = {
    torch.relu, torch.tanh, torch.sigmoid, torch.sin, torch.nn.functional.relu,
    torch.nn.functional.gelu, torch.nn.functional.silu, torch.nn.functional.dropout,
    torch.nn.functional.tanh, torch.nn.functional.sigmoid,
}  # fmt: skip
_KEEP_METHODS = {"relu", "tanh", "sigmoid", "sin", "contiguous", "clone", "float", "to"}
_JOIN_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
    torch.div,
}  # fmt: skip
_JOIN_METHODS = {"add", "sub", "mul", "div"}
_REDUCE = {"mean", "sum", "amax", "amin"}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_EXPAND = {"expand", "repeat", "expand_as"}
_METADATA = {"shape", "device", "dtype", "ndim"}  # reading them does not use the values


RAW = "raw"  # the network's input: its first layer reads a fresh input group


@dataclass
class Feature:
    """A value's feature axis: its group, where it is (``-1`` last, ``1``
    channels-first) and the value's number of axes when known. ``flat`` is
    the channel count of a conv output flattened into the last axis."""

    group: int
    axis: int
    ndim: int | None
    flat: int | None = None


def on_axis(f: Feature, axis: int) -> bool:
    """Whether ``f``'s feature axis is ``axis`` (1 and -1 are one axis of a
    2-D value)."""
    if f.axis == axis:
        return True
    return f.ndim is not None and f.axis % f.ndim == axis % f.ndim


class _Groups:
    """Union-find over neuron groups, with sizes and what touched them."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.input: list[bool] = []
        self.output: list[bool] = []
        self.opaque: dict[int, list[str]] = {}
        self.nest: dict[int, int] = {}  # a nested group (a head's dimensions) -> its heads
        self.retired: dict[int, tuple[int, ...]] = {}  # split into heads -> (heads, dims...)

    def new(self, size: int, is_input: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.input.append(is_input)
        self.output.append(False)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def new_nested(self, heads: int, dims: int) -> tuple[int, int]:
        """A head group of ``heads`` and a group of ``dims`` nested in it."""
        h = self.new(heads)
        return h, self.new_in(h, dims)

    def new_in(self, heads: int, dims: int) -> int:
        """A group of ``dims`` nested in the head group ``heads``."""
        i = self.new(dims)
        self.nest[i] = heads
        return i

    def nested_in(self, g: int) -> int | None:
        p = self.nest.get(self.find(g))
        return None if p is None else self.find(p)

    def union(self, a: int, b: int, where: str) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        pa, pb = self.nested_in(a), self.nested_in(b)
        if self.size[a] != self.size[b] or (pa is None) != (pb is None):
            # Not one set of neurons after all (or a head's dimensions and
            # a plain group).
            self.make_opaque(a, where)
            self.make_opaque(b, where)
            return a
        if pa is not None:  # the same dimensions of the same heads
            self.nest[a] = self.union(pa, pb, where)
        self.parent[b] = a
        self.input[a] |= self.input[b]
        self.output[a] |= self.output[b]
        if b in self.opaque:
            self.opaque.setdefault(a, []).extend(self.opaque.pop(b))
        return a

    def make_opaque(self, g: int, where: str) -> None:
        self.opaque.setdefault(self.find(g), []).append(where)

    def is_opaque(self, g: int) -> bool:
        g = self.find(g)
        if g in self.opaque:
            return True
        # A head's dimensions cannot be permuted per head if the heads cannot.
        p = self.nested_in(g)
        return p is not None and p in self.opaque

    def why_opaque(self, g: int) -> list[str]:
        g = self.find(g)
        p = self.nested_in(g)
        return self.opaque.get(g, []) + (self.opaque.get(p, []) if p is not None else [])


class GraphError(Exception):
    """The module could not be traced."""


def read_graph(module: nn.Module) -> tuple[dict[str, list], _Groups, dict[str, tuple]]:
    """Trace ``module`` and follow every feature axis. Returns, per parameter
    name, its axes as ``("g", group, exponent)`` or ``("l",)`` entries (None
    for a parameter the graph does not reach), the groups, and the views of
    weights that read a flattened conv output."""
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception as e:  # fx raises many kinds on untraceable code
        raise GraphError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    from lopt import graph_heads

    modules = dict(module.named_modules())
    names = {id(p): n for n, p in module.named_parameters()}
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
    groups = _Groups()
    feat: dict[torch.fx.Node, object] = {}
    ints: dict[torch.fx.Node, object] = {}  # shape arithmetic: sizes known from groups
    axes: dict[str, list] = {}
    views: dict[str, tuple] = {}

    def prefix(target: str) -> str:
        return f"{target}." if target else ""

    def lose(value, where: str) -> None:
        """A value reaches an operation not understood: its groups are opaque."""
        f = feat.get(value) if isinstance(value, torch.fx.Node) else None
        for g in graph_heads.groups_of(f):
            groups.make_opaque(g, where)

    def input_group(f, size: int, axis: int, where: str) -> int:
        """The group a layer reads on its input's ``axis``: a fresh input
        group for the network's input (``RAW``), a fresh opaque one for a
        value whose axes were lost on the way."""
        if f is RAW:
            return groups.new(size, is_input=True)
        if f is not None and not isinstance(f, Feature):  # heads read by a layer
            for g in graph_heads.groups_of(f):
                groups.make_opaque(g, where)
            f = None
        if f is None:
            g = groups.new(size)
            groups.make_opaque(g, where)
            return g
        if not on_axis(f, axis) or groups.size[groups.find(f.group)] != size:
            groups.make_opaque(f.group, where)
            g = groups.new(size)
            groups.make_opaque(g, where)
            return g
        return f.group

    for node in graph.nodes:
        args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        first = feat.get(args[0]) if args else None
        out = None
        handled, heads_out = graph_heads.step(
            node, args, feat, groups, axes, views, shapes, ints, modules
        )
        if handled:
            out = heads_out
        elif node.op == "placeholder":
            out = RAW
        elif node.op == "call_module":
            mod = modules[node.target]
            where = f"{type(mod).__name__} {node.target}"
            own = {p_name: p for p_name, p in mod.named_parameters(recurse=False)}
            pre = prefix(node.target)
            if isinstance(mod, nn.Linear) and isinstance(first, graph_heads.HeadsFlat):
                # An output projection reads (head, dimension) columns.
                g_out = groups.new(mod.out_features)
                views[pre + "weight"] = (mod.out_features, *first.sizes(groups))
                axes[pre + "weight"] = [("g", g_out, 1), ("g", first.head, -1),
                                        ("g", first.dim, -1)]  # fmt: skip
                if "bias" in own:
                    axes[pre + "bias"] = [("g", g_out, 1)]
                out = Feature(g_out, -1, first.ndim)
            elif isinstance(mod, graph_heads.TRANSFORMERS):
                out = graph_heads.transformer(
                    node, mod, pre, feat, groups, axes, views, input_group
                )
            elif isinstance(mod, nn.MultiheadAttention):
                out = graph_heads.multihead_attention(
                    node, mod, pre, feat, groups, axes, views, input_group
                )
            elif isinstance(mod, nn.Linear):
                flat = first.flat if isinstance(first, Feature) else None
                if flat is not None and flat != mod.in_features:
                    c = first.flat
                    if mod.in_features % c:
                        g_in = input_group(None, mod.in_features, -1, where)
                    else:
                        g_in = first.group
                        views[pre + "weight"] = (mod.out_features, c, mod.in_features // c)
                else:
                    g_in = input_group(first, mod.in_features, -1, where)
                g_out = groups.new(mod.out_features)
                axes[pre + "weight"] = [("g", g_out, 1), ("g", g_in, -1)]
                if pre + "weight" in views:
                    axes[pre + "weight"].append(("l",))
                if "bias" in own:
                    axes[pre + "bias"] = [("g", g_out, 1)]
                out = Feature(g_out, -1, first.ndim if isinstance(first, Feature) else None)
            elif isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.groups == 1:
                g_in = input_group(first, mod.in_channels, 1, where)
                g_out = groups.new(mod.out_channels)
                kernel = [("l",)] * (mod.weight.dim() - 2)
                axes[pre + "weight"] = [("g", g_out, 1), ("g", g_in, -1), *kernel]
                if "bias" in own:
                    axes[pre + "bias"] = [("g", g_out, 1)]
                out = Feature(g_out, 1, mod.weight.dim())
            elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.RMSNorm,
                                  nn.GroupNorm)):  # fmt: skip
                axis = 1 if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)) else -1
                shape = getattr(mod, "normalized_shape", None)
                ok = isinstance(first, Feature) and on_axis(first, axis)
                ok = ok and (shape is None or len(shape) == 1)
                if isinstance(mod, nn.GroupNorm):
                    ok = ok and mod.num_groups in (1, mod.num_channels)
                if ok:
                    for p_name in own:
                        axes[pre + p_name] = [("g", first.group, 1)]
                    out = first
                else:
                    lose(args[0] if args else None, where)
            elif isinstance(mod, nn.Embedding):
                g_rows = groups.new(mod.num_embeddings, is_input=True)
                g_out = groups.new(mod.embedding_dim)
                axes[pre + "weight"] = [("g", g_rows, -1), ("g", g_out, 1)]
                out = Feature(g_out, -1, None)
            elif isinstance(mod, _KEEP_MODULES):
                out = first
            elif isinstance(mod, nn.Flatten):
                out = _flatten(first, mod.start_dim, mod.end_dim, groups, where)
            else:
                for a in args:
                    lose(a, where)
        elif node.op == "call_function" and node.target in _KEEP_FUNCTIONS:
            out = first
        elif node.op == "call_method" and node.target in _KEEP_METHODS:
            out = first
        elif (node.op == "call_function" and node.target in _JOIN_FUNCTIONS) or (
            node.op == "call_method" and node.target in _JOIN_METHODS
        ):
            out = _join(node, args, feat, groups, axes, names, modules)
        elif (
            node.op == "call_method"
            and node.target == "flatten"
            or (node.op == "call_function" and node.target is torch.flatten)
        ):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            out = _flatten(first, start, end, groups, f"flatten ({node.name})")
        elif node.op == "call_method" and node.target in _REDUCE and isinstance(first, Feature):
            out = _reduce(node, first, groups)
        elif (node.op == "call_function" and node.target is operator.getitem
              and isinstance(first, Feature)):  # fmt: skip
            out = _index(node, first, groups)
        elif node.op == "call_function" and node.target in _CAT:
            out = _cat(node, feat, groups, axes, names, modules)
        elif (
            node.op == "call_method"
            and node.target in ("transpose", "permute", "swapaxes")
            and (isinstance(first, Feature))
        ):
            out = _move_axes(node, first, groups)
        elif node.op == "output":
            for a in torch.fx.node.map_arg(node.args, lambda n: n) or ():
                for leaf in _leaves(a):
                    f = feat.get(leaf)
                    if isinstance(f, Feature):
                        groups.output[groups.find(f.group)] = True
        elif node.op == "get_attr":
            out = None
        elif (node.op == "call_function" and node.target is getattr
              and node.args[1] in _METADATA) or (
            node.op == "call_method" and node.target in ("size", "dim")
        ):  # fmt: skip
            out = None
        else:
            where = f"{node.op} {getattr(node.target, '__name__', node.target)}"
            for a in args:
                lose(a, where)
        feat[node] = out
    return axes, groups, views


def _leaves(value):
    if isinstance(value, torch.fx.Node):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)


def _flatten(f, start: int, end: int, groups: _Groups, where: str):
    """A flatten keeps a channels-first feature axis when it merges only the
    axes after it, and turns a conv output into ``flat`` columns when it
    merges the channels with the positions after them; the network's input
    stays its input."""
    if f is RAW or f is None:
        return f
    if not isinstance(f, Feature):  # heads: a flatten the attention reading did not take
        for g in _groups_of(f):
            groups.make_opaque(g, where)
        return None
    if f.axis == 1 and start >= 2:
        ndim = None if f.ndim is None or end != -1 else start + 1
        return Feature(f.group, 1, ndim)
    if f.axis == 1 and start == 1 and end == -1:
        return Feature(f.group, -1, 2, flat=groups.size[groups.find(f.group)])
    groups.make_opaque(f.group, where)
    return None


def _reduce(node, f: Feature, groups: _Groups) -> Feature | None:
    """A mean / sum over axes other than the feature axis keeps it."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    if dims is None or f.ndim is None:
        groups.make_opaque(f.group, f"{node.target} ({node.name})")
        return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [d % f.ndim for d in dims if isinstance(d, int)]
    channel = f.axis % f.ndim
    if channel in dims:
        groups.make_opaque(f.group, f"{node.target} over the features ({node.name})")
        return None
    if keep:
        return Feature(f.group, f.axis, f.ndim)
    if f.axis == -1 or all(d > channel for d in dims):
        return Feature(f.group, f.axis, f.ndim - len(dims))
    groups.make_opaque(f.group, f"{node.target} ({node.name})")
    return None


def _move_axes(node, f: Feature, groups: _Groups) -> Feature | None:
    """``transpose`` / ``permute`` moves the feature axis (its new place is
    known when the value's number of axes is)."""
    dims = list(node.args[1:])
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = list(dims[0])
    where = f"{node.target} ({node.name})"
    if f.ndim is None or any(not isinstance(d, int) for d in dims):
        groups.make_opaque(f.group, where)
        return None
    axis = f.axis % f.ndim
    dims = [d % f.ndim for d in dims]
    if node.target == "permute":
        if sorted(dims) != list(range(f.ndim)):
            groups.make_opaque(f.group, where)
            return None
        new = dims.index(axis)
    else:
        a, b = dims
        new = b if axis == a else a if axis == b else axis
    return Feature(f.group, -1 if new == f.ndim - 1 else new, f.ndim)


def _index(node, f: Feature, groups: _Groups) -> Feature | None:
    """``x[:, 0]`` (a class token's position), ``x[..., :n]`` of positions:
    integers and slices on axes other than the features keep them."""
    index = node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    simple = all(isinstance(i, int) or isinstance(i, slice) for i in index)
    if f.ndim is None or not simple or len(index) > f.ndim:
        groups.make_opaque(f.group, f"getitem ({node.name})")
        return None
    axis = f.axis % f.ndim
    if axis < len(index) and index[axis] != slice(None):
        groups.make_opaque(f.group, f"getitem over the features ({node.name})")
        return None
    dropped = sum(isinstance(i, int) for i in index[:axis])
    ndim = f.ndim - sum(isinstance(i, int) for i in index)
    new = axis - dropped
    return Feature(f.group, -1 if new == ndim - 1 else new, ndim)


def _cat(node, feat, groups: _Groups, axes, names, modules) -> Feature | None:
    """Concatenating along an axis other than the features (positions, a
    class token) makes one group of the parts' groups; a learned token
    (a parameter, expanded) joins it on its last axis. Along the features
    it is not followed."""
    parts = node.args[0] if node.args else node.kwargs.get("tensors", ())
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    where = f"cat ({node.name})"
    values = [feat.get(p) if isinstance(p, torch.fx.Node) else None for p in parts]
    known = [v for v in values if isinstance(v, Feature)]
    ndim = next((v.ndim for v in known if v.ndim is not None), None)
    ok = bool(known) and isinstance(dim, int) and ndim is not None
    ok = ok and all(v.ndim in (None, ndim) and v.axis % ndim != dim % ndim for v in known)
    tokens = []
    for p, v in zip(parts, values):
        if isinstance(v, Feature):
            continue
        param = _expanded_param(p, modules, names)
        size = groups.size[groups.find(known[0].group)] if known else None
        if param is None or param.shape[-1] != size:
            ok = False
        else:
            tokens.append(param)
    if not ok:
        for v in values:
            for g in _groups_of(v):
                groups.make_opaque(g, where)
        return None
    g = known[0].group
    for v in known[1:]:
        g = groups.union(g, v.group, where)
    for param in tokens:
        axes[names[id(param)]] = [("l",)] * (param.dim() - 1) + [("g", g, 1)]
    return Feature(g, -1 if known[0].axis % ndim == ndim - 1 else known[0].axis, ndim)


def _expanded_param(node, modules, names):
    """The parameter behind ``p`` or ``p.expand(...)`` (a learned token)."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "call_method" and node.target in _EXPAND and node.args:
        node = node.args[0]
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    p = _attr(modules, node.target)
    return p if isinstance(p, nn.Parameter) and id(p) in names else None


def _join(node, args, feat, groups: _Groups, axes, names, modules) -> Feature | None:
    """``a + b`` (or ``-``, ``*``): two feature axes become one group; a
    parameter added to a feature (a learned position table, a bias) joins it
    on its last axis."""
    where = f"{getattr(node.target, '__name__', node.target)} ({node.name})"
    if any(not isinstance(feat.get(a), Feature) and _groups_of(feat.get(a)) for a in args):
        for a in args:  # heads met a feature axis: nothing here follows both
            for g in _groups_of(feat.get(a)):
                groups.make_opaque(g, where)
        return None
    fs = [f if isinstance(f, Feature) else None for f in (feat.get(a) for a in args)]
    known = [f for f in fs if f is not None]
    if len(known) == 2 and on_axis(known[0], known[1].axis):
        g = groups.union(known[0].group, known[1].group, where)
        ndim = known[0].ndim if known[0].ndim is not None else known[1].ndim
        return Feature(g, known[0].axis, ndim)
    if len(known) == 1 and len(args) == 1:  # a number and a feature
        return known[0]
    if len(known) == 1:
        other = args[0] if fs[0] is None else args[1]
        if other.op == "get_attr":
            p = _attr(modules, other.target)
            f = known[0]
            if (
                isinstance(p, nn.Parameter)
                and id(p) in names
                and on_axis(f, -1)
                and p.dim() >= 1
                and p.shape[-1] == groups.size[groups.find(f.group)]
            ):
                axes[names[id(p)]] = [("l",)] * (p.dim() - 1) + [("g", f.group, 1)]
                return f
    for f in known:
        groups.make_opaque(f.group, where)
    return None


def _groups_of(value) -> list[int]:
    """The neuron groups a value carries (a feature, attention heads)."""
    from lopt import graph_heads

    return graph_heads.groups_of(value)


def _attr(modules, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(modules[owner], name, None)


def spec_tensors(
    module: nn.Module, axes: dict[str, list], groups: _Groups, views: dict[str, tuple]
) -> tuple[list[TensorSpec], dict[str, str], list[str]]:
    """TensorSpecs in ``named_parameters()`` order, the group kinds, and a
    line per operation that left groups opaque, naming the parameters."""
    # A weight that would read and write one group (x + W x with W square)
    # maps the group to itself, which a spec cannot hold.
    retired = {groups.find(g): heads for g, heads in groups.retired.items()}
    for name, entries in axes.items():
        roots = [groups.find(e[1]) for e in entries if e[0] == "g"]
        for r in {r for r in roots if roots.count(r) > 1}:
            groups.make_opaque(r, f"{name} maps its group to itself")
        # A value split into heads and also used whole: neither reading holds.
        for r in roots:
            if r in retired:
                where = f"{name} reads a projection that is also split into heads"
                for g in (r, *retired[r]):
                    groups.make_opaque(g, where)
    params = list(module.named_parameters())
    pieces = [
        (name, *piece)
        for name, p in params
        for piece in _pieces(
            tuple(p.shape), views.get(name, tuple(p.shape)), axes.get(name), groups
        )
    ]
    # Groups named in the order the sequential rule names them (a weight's
    # columns before its rows), so plain stacks get the very same spec.
    order: dict[int, str] = {}
    kinds: dict[str, str] = {}
    for *_, entries in pieces:
        entries = entries or []
        idx = [1, 0, *range(2, len(entries))] if len(entries) >= 2 else range(len(entries))
        for i in idx:
            e = entries[i]
            if e[0] == "g" and not groups.is_opaque(e[1]):
                root = groups.find(e[1])
                if root not in order:
                    order[root] = f"g{len(order)}"
                    out = OUTPUT if groups.output[root] else HIDDEN
                    kinds[order[root]] = INPUT if groups.input[root] else out
    tensors, affected = [], {}
    for name, part, shape, view, entries in pieces:
        if entries is None or len(entries) != len(view):
            built = [Axis(LOCAL, n) for n in view]
        else:
            built = []
            for e, n in zip(entries, view):
                if e[0] == "g" and groups.is_opaque(e[1]):
                    for where in groups.why_opaque(e[1]):
                        affected.setdefault(where, []).append(name)
                if e[0] == "g" and not groups.is_opaque(e[1]):
                    heads = groups.nested_in(e[1])
                    parent = None if heads is None else order[heads]
                    built.append(Axis(GROUP, n, order[groups.find(e[1])], e[2], parent))
                else:
                    built.append(Axis(LOCAL, n))
        has_group = any(a.kind == GROUP for a in built)
        kind = ("weight" if len(shape) >= 2 else "bias") if has_group else "standalone"
        tensors.append(TensorSpec(name, shape, view, tuple(built), kind, part))
    notes = [f"{where}: {', '.join(dict.fromkeys(ps))}" for where, ps in affected.items()]
    return tensors, kinds, notes


def _pieces(shape: tuple, view: tuple, entries: list | None, groups: _Groups) -> list[tuple]:
    """``(part, shape, view, entries)`` per piece of a parameter: one piece,
    the whole of it, unless a packed projection's parts (its first axis; a
    ``("p", groups, exponent)`` entry) read different groups of dimensions,
    then a piece per run of parts with one group (query and key rows, value
    rows), each with a local axis of its parts when it has several."""
    at = [k for k, e in enumerate(entries or []) if e[0] == "p"]
    if not at:
        return [(None, shape, view, entries)]
    (k,) = at
    _, dims, exponent = entries[k]
    where = "a packed projection whose parts cannot be cut apart"
    if k != 2 or view[0] != len(dims) or any(groups.is_opaque(d) for d in dims):
        for d in dims[1:]:
            groups.union(dims[0], d, where)
    roots = [groups.find(d) for d in dims]
    runs: list[list[int]] = []
    for j, r in enumerate(roots):
        if runs and roots[runs[-1][0]] == r:
            runs[-1].append(j)
        else:
            runs.append([j])
    if len(runs) == 1:
        return [(None, shape, view, entries[:k] + [("g", dims[0], exponent)] + entries[k + 1 :])]
    rows = shape[0] // len(dims)
    out = []
    for run in runs:
        n = len(run)
        lead = [("l",)] if n > 1 else []
        piece = lead + entries[1:k] + [("g", dims[run[0]], exponent)] + entries[k + 1 :]
        part = (run[0] * rows, (run[-1] + 1) * rows)
        out.append((part, (n * rows, *shape[1:]), (n,) * (n > 1) + view[1:], piece))
    return out
