"""Attention heads in a traced graph: the part of :mod:`lopt.graph_spec` that
follows a projection split into heads to the projection that merges them.

In multi-head attention the heads can be permuted as blocks, and within a
head the query and key dimensions share one permutation (``q . k`` is kept)
and the value dimensions another, which the output projection reads. Each
head has its own, so these dimensions are a group *nested* in the head group.

Values on the way carry one label per axis (:class:`Heads`): ``("head",
g)``, ``("dim", g)``, ``("part", n)`` (the query / key / value index of a
packed projection, whose ``"dim"`` label then holds one group per part) or
``None`` (batch, positions). The operations followed
are the ones attention is written with: ``reshape`` / ``view`` of a
projection into ``(..., heads, dim)`` or ``(..., 3, heads, dim)``,
``permute`` / ``transpose``, indexing a part, ``@`` (``q @ k^T`` joins the
query and key dimensions, ``scores @ v`` keeps the value's),
``scaled_dot_product_attention``, softmax over positions, masks, scalar
scaling, dropout, and the ``reshape`` / ``flatten`` that merges heads back
(:class:`HeadsFlat`, read by the output projection as ``(out, heads, dim)``
columns). Sizes in ``reshape`` calls are read from the groups they come from
(``x.shape[-1] // heads``), or solved when one is unknown.

A packed projection (one weight for query, key and value) gets a group of
dimensions per part, and the parts that end up in different groups (the
query-key rows and the value rows) become pieces of the parameter
(:attr:`~lopt.weightspace.TensorSpec.part`): its axes are written
``("p", (group per part), exponent)`` until :func:`lopt.graph_spec.spec_tensors`
cuts it.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import nn

from lopt import graph_spec
from lopt.graph_spec import Feature, on_axis


@dataclass
class Heads:
    """A value with attention-head axes: one label per axis."""

    labels: tuple

    @property
    def ndim(self) -> int:
        return len(self.labels)


@dataclass
class HeadsFlat:
    """Heads merged back into the last axis: ``(head, dim)`` features."""

    head: int
    dim: int
    ndim: int | None

    def sizes(self, groups) -> tuple[int, int]:
        return groups.size[groups.find(self.head)], groups.size[groups.find(self.dim)]


@dataclass
class Pair:
    """A module's tuple output (``nn.MultiheadAttention``: output, weights)."""

    items: tuple


def groups_of(value) -> list[int]:
    """The neuron groups a value carries (empty for anything unstructured)."""
    if isinstance(value, Feature):
        return [value.group]
    if isinstance(value, HeadsFlat):
        return [value.head, value.dim]
    if isinstance(value, Heads):
        return [g for lab in value.labels if lab is not None and lab[0] != "part"
                for g in _each(lab[1])]  # fmt: skip
    if isinstance(value, Pair):
        return [g for v in value.items for g in groups_of(v)]
    return []


_SOFTMAX = {torch.softmax, torch.nn.functional.softmax, torch.log_softmax,
            torch.nn.functional.log_softmax}  # fmt: skip
_SCALE_FUNCTIONS = {operator.mul, operator.truediv, torch.mul, torch.div}
_ADD_FUNCTIONS = {operator.add, operator.sub, torch.add, torch.sub}
# Kept on heads beside read_graph's own (graph_spec._KEEP_METHODS).
_HEADS_KEEP_METHODS = {"masked_fill", "masked_fill_", "type_as", "half", "bfloat16"}
_NEW_METHODS = {"new_ones", "new_zeros", "new_full", "new_empty", "new_tensor"}
_INT_OPS = {
    operator.floordiv: operator.floordiv, operator.mul: operator.mul, operator.add: operator.add,
    operator.sub: operator.sub, operator.pow: operator.pow, operator.truediv: operator.truediv,
}  # fmt: skip  # fmt: skip


def _each(g) -> tuple:
    """A label's groups: one, or one per part of a packed projection."""
    return g if isinstance(g, tuple) else (g,)


def _collapse(h: Heads, groups, where: str) -> Heads:
    """``h`` with a packed projection's groups of dimensions made one (an
    operation on the packed value uses them alike)."""
    labels = []
    for lab in h.labels:
        if lab is not None and isinstance(lab[1], tuple):
            g = lab[1][0]
            for other in lab[1][1:]:
                g = groups.union(g, other, where)
            lab = (lab[0], g)
        labels.append(lab)
    return Heads(tuple(labels))


def _size(value, axis: int, groups):
    """The size of ``value``'s ``axis`` when a group says it, else None."""
    if isinstance(value, Feature) and on_axis(value, axis):
        return groups.size[groups.find(value.group)]
    if isinstance(value, Heads) and -value.ndim <= axis < value.ndim:
        lab = value.labels[axis]
        if lab is not None:
            return lab[1] if lab[0] == "part" else groups.size[groups.find(_each(lab[1])[0])]
    return None


def _int(x, ints):
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, torch.fx.Node):
        v = ints.get(x)
        return v if isinstance(v, int) else None
    return None


def _shape_args(node) -> list:
    rest = list(node.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = list(rest[0])
    return rest


def _dim_arg(node, position: int, name: str, default=None):
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def step(node, args, feat, groups, axes, views, shapes, ints, modules) -> tuple[bool, object]:
    """Follow ``node`` if it is shape arithmetic or an operation on heads;
    ``(False, None)`` leaves it to :func:`lopt.graph_spec.read_graph`."""
    where = f"{getattr(node.target, '__name__', node.target)} ({node.name})"
    vals = [feat.get(a) for a in args]
    first = vals[0] if vals else None
    op, target = node.op, node.target

    # Shape arithmetic: x.shape, x.shape[i], x.size(i), d // heads.
    if op == "call_function" and target is getattr and node.args[1] == "shape":
        ints[node] = ("shape", args[0])
        return True, None
    if op == "call_method" and target == "size":
        i = _dim_arg(node, 1, "dim")
        ints[node] = ("shape", args[0]) if i is None else _size(first, i, groups)
        return True, None
    if op == "call_function" and target is operator.getitem and args and args[0] in ints:
        shape = ints[args[0]]
        i = node.args[1]
        if isinstance(shape, tuple) and isinstance(i, int):
            ints[node] = _size(feat.get(shape[1]), i, groups)
            return True, None
    carried = [v for v in vals if isinstance(v, (Feature, Heads, HeadsFlat, Pair))]
    if (
        op == "call_function"
        and target in _INT_OPS
        and not carried
        and any(a in ints for a in args)
    ):
        a, b = (_int(x, ints) for x in node.args[:2])
        # A size, or a scalar computed from sizes (a head's width ** -0.5).
        ints[node] = _INT_OPS[target](a, b) if a is not None and b is not None else None
        return True, None

    if op == "call_method" and target in _NEW_METHODS:  # reads dtype and device only
        return True, None
    if isinstance(first, Pair) and target is operator.getitem and isinstance(node.args[1], int):
        items = first.items
        return True, items[node.args[1]] if node.args[1] < len(items) else None

    # Splitting a projection into heads.
    if (
        op == "call_method"
        and target in ("reshape", "view")
        and isinstance(first, Feature)
        and first.flat is None
        and on_axis(first, -1)
        and not groups.is_opaque(first.group)
    ):
        split = _split(first, _shape_args(node), groups, ints)
        if split is None:
            return False, None
        lead, part, n_heads, n_dims = split
        h, i = groups.new_nested(n_heads, n_dims)
        # A packed projection: a group of dimensions per part, until the
        # attention shows which parts share one (q . k).
        dims = (i, *(groups.new_in(h, n_dims) for _ in range(part - 1))) if part else i
        _retire(first.group, part, h, dims, groups, axes, views, shapes)
        labels = (None,) * lead + ((("part", part),) if part else ()) + (("head", h), ("dim", dims))
        return True, Heads(labels)

    structured = [v for v in vals if isinstance(v, (Heads, HeadsFlat, Pair))]
    if not structured or op == "call_module":  # modules: read_graph's rules
        return False, None
    h = first if isinstance(first, Heads) else None

    def lose() -> tuple[bool, None]:
        for v in vals:
            for g in groups_of(v):
                groups.make_opaque(g, where)
        return True, None

    if h is None:
        return (True, first) if _keeps(node) else lose()
    if op == "call_method" and target in ("permute", "transpose", "swapaxes"):
        dims = _shape_args(node)
        if any(not isinstance(d, int) for d in dims):
            return lose()
        if target == "permute":
            if sorted(d % h.ndim for d in dims) != list(range(h.ndim)):
                return lose()
            return True, Heads(tuple(h.labels[d] for d in dims))
        if len(dims) != 2:
            return lose()
        labels = list(h.labels)
        a, b = dims
        labels[a], labels[b] = labels[b], labels[a]
        return True, Heads(tuple(labels))
    if op == "call_function" and target is operator.getitem:
        return _index(h, node.args[1]) or lose()
    # Anything else reads a packed value's parts alike.
    h = _collapse(h, groups, where)
    vals = [_collapse(v, groups, where) if isinstance(v, Heads) else v for v in vals]
    if (op == "call_function" and target in (operator.matmul, torch.matmul)) or (
        op == "call_method" and target == "matmul"
    ):
        other = vals[1] if len(vals) > 1 else None
        return _matmul(h, other, groups, where) or lose()
    if op == "call_function" and target is torch.nn.functional.scaled_dot_product_attention:
        return _sdpa(vals, groups, where) or lose()
    if op == "call_method" and target in ("reshape", "view"):
        return _merge(h, _shape_args(node), groups, ints) or lose()
    if (op == "call_method" and target == "flatten") or (
        op == "call_function" and target is torch.flatten
    ):
        start = _dim_arg(node, 1, "start_dim", 0)
        end = _dim_arg(node, 2, "end_dim", -1)
        if isinstance(start, int) and start % h.ndim == h.ndim - 2 and end in (-1, h.ndim - 1):
            return _merge(h, [None] * (h.ndim - 2) + [-1], groups, ints) or lose()
        return lose()
    if (op == "call_method" and target in ("softmax", "log_softmax")) or (
        op == "call_function" and target in _SOFTMAX
    ):
        dim = _dim_arg(node, 1, "dim")
        ok = isinstance(dim, int) and -h.ndim <= dim < h.ndim and h.labels[dim] is None
        return (True, h) if ok else lose()
    if _keeps(node) or (op == "call_method" and target in _HEADS_KEEP_METHODS):
        return (True, h) if len(structured) == 1 else lose()
    scale = op == "call_function" and target in _SCALE_FUNCTIONS
    scale = scale or (op == "call_method" and target in ("mul", "div"))
    add = (op == "call_function" and target in _ADD_FUNCTIONS) or (
        op == "call_method" and target in ("add", "sub")
    )
    if scale or add:
        # A number; heads of the same labels; on the scores (no head
        # dimension), a mask or bias that does not index the heads.
        for a in args[1:]:
            v = feat.get(a)
            if isinstance(v, Heads):
                if not _same(h, v, groups, where):
                    return lose()
            elif v is not None or not (a in ints or _shared_by_heads(a, h, modules)):
                return lose()
        return True, h
    return lose()


def _shared_by_heads(node, h: Heads, modules) -> bool:
    """Whether a tensor combined with ``h`` entry by entry keeps its
    symmetry: never with a head's dimensions (a rotary embedding, a
    per-dimension scale); with the scores, a registered buffer of size 1 on
    the head axis, or a tensor computed in the forward pass (a causal mask),
    which is taken to be the same for every head. A parameter may differ per
    head."""
    if any(lab is not None and lab[0] == "dim" for lab in h.labels):
        return False
    if node.op != "get_attr":
        return True
    value = graph_spec._attr(modules, node.target)
    if isinstance(value, nn.Parameter) or not isinstance(value, torch.Tensor):
        return False
    shape = (1,) * (h.ndim - value.dim()) + tuple(value.shape)
    return len(shape) == h.ndim and all(
        n == 1 for n, lab in zip(shape, h.labels) if lab is not None
    )


def _keeps(node) -> bool:
    if node.op == "call_function":
        return node.target in graph_spec._KEEP_FUNCTIONS
    if node.op == "call_method":
        return node.target in graph_spec._KEEP_METHODS
    return False


def _split(f: Feature, dims: list, groups, ints):
    """``(leading axes, parts, heads, dims)`` when a reshape of ``f``'s last
    axis splits it into ``(heads, dims)`` or ``(parts, heads, dims)``."""
    size = groups.size[groups.find(f.group)]
    values = [-1 if d == -1 else _int(d, ints) for d in dims]
    for k in (3, 2):  # (parts, heads, dims) first
        if len(values) < k + 1:  # a batch axis at least stays
            continue
        tail = values[-k:]
        unknown = [j for j, v in enumerate(tail) if v is None or v == -1]
        if len(unknown) > 1:
            continue
        known = math.prod(v for v in tail if v is not None and v != -1)
        if known <= 0 or size % known:
            continue
        if unknown:
            solved = size // known
            if solved == 1:  # an unknown batch axis, not a split
                continue
            tail = list(tail)
            tail[unknown[0]] = solved
        if math.prod(tail) != size:
            continue
        if f.ndim is not None and len(values) - k != f.ndim - 1:
            continue
        if k == 3 and tail[0] not in (2, 3):
            continue
        if tail[-2] >= 1 and tail[-1] >= 1:
            return len(values) - k, tail[0] if k == 3 else None, tail[-2], tail[-1]
    return None


def _retire(g: int, part, h: int, i, groups, axes, views, shapes) -> None:
    """Rewrite the axes of every parameter that indexes group ``g`` (the
    projection's rows and bias) as ``(part,) heads, dims`` (``i``: a group of
    dimensions per part when packed)."""
    root = groups.find(g)
    part_axis, part_size = ([("l",)], [part]) if part else ([], [])
    sizes = part_size + [groups.size[h], groups.size[_each(i)[0]]]
    for name, entries in axes.items():
        for k, e in enumerate(entries):
            if e[0] == "g" and groups.find(e[1]) == root:
                view = list(views.get(name, shapes[name]))
                views[name] = tuple(view[:k] + sizes + view[k + 1 :])
                dims = ("p", i, e[2]) if part else ("g", i, e[2])
                axes[name] = entries[:k] + part_axis + [("g", h, e[2]), dims] + entries[k + 1 :]
                break
    groups.retired[root] = (h, *_each(i))


def _index(h: Heads, index):
    """``x[p]`` or ``x[:, p]``: one part of a packed projection."""
    if isinstance(index, int):
        index = (index,)
    if not isinstance(index, tuple) or len(index) > h.ndim:
        return None
    ints_at = [j for j, x in enumerate(index) if isinstance(x, int)]
    full = all(isinstance(x, int) or x == slice(None) for x in index)
    if not full or len(ints_at) != 1 or h.labels[ints_at[0]] is None:
        return None
    at = ints_at[0]
    if h.labels[at][0] != "part":
        return None
    n, p = h.labels[at][1], index[at]
    if not -n <= p < n:
        return None
    # The part's own group of dimensions.
    labels = [
        (lab[0], lab[1][p]) if lab is not None and isinstance(lab[1], tuple) else lab
        for lab in h.labels[:at] + h.labels[at + 1 :]
    ]
    return True, Heads(tuple(labels))


def _same(a: Heads, b: Heads, groups, where: str) -> bool:
    if a.ndim != b.ndim:
        return False
    for x, y in zip(a.labels, b.labels):
        if (x is None) != (y is None) or (x is not None and x[0] != y[0]):
            return False
    for x, y in zip(a.labels, b.labels):
        if x is not None and x[0] != "part":
            groups.union(x[1], y[1], where)
    return True


def _matmul(a: Heads, b, groups, where: str):
    """``a @ b`` over the last two axes, batch axes (heads) broadcast."""
    if not isinstance(b, Heads) or a.ndim != b.ndim or a.ndim < 3:
        return None
    batch = []
    for x, y in zip(a.labels[:-2], b.labels[:-2]):
        if (x is None) != (y is None):
            return None
        if x is not None:
            if x[0] != "head" or y[0] != "head":
                return None
            groups.union(x[1], y[1], where)
        batch.append(x)
    x, y = a.labels[-1], b.labels[-2]
    if (x is None) != (y is None):
        return None
    if x is not None:
        if x[0] != "dim" or y[0] != "dim":
            return None
        groups.union(x[1], y[1], where)  # q . k: one permutation for both
    return True, Heads((*batch, a.labels[-2], b.labels[-1]))


def _sdpa(vals, groups, where: str):
    if len(vals) < 3 or not all(isinstance(v, Heads) for v in vals[:3]):
        return None
    q, k, v = vals[:3]
    if not (q.ndim == k.ndim == v.ndim) or q.labels[-2] or k.labels[-2] or v.labels[-2]:
        return None
    for x, y, z in zip(q.labels[:-2], k.labels[:-2], v.labels[:-2]):
        if not ((x is None) == (y is None) == (z is None)):
            return None
        if x is not None:
            if not (x[0] == y[0] == z[0] == "head"):
                return None
            groups.union(groups.union(x[1], y[1], where), z[1], where)
    if not (q.labels[-1] and k.labels[-1] and v.labels[-1]):
        return None
    if not (q.labels[-1][0] == k.labels[-1][0] == v.labels[-1][0] == "dim"):
        return None
    groups.union(q.labels[-1][1], k.labels[-1][1], where)
    return True, Heads((*q.labels[:-1], v.labels[-1]))


def _merge(h: Heads, dims: list, groups, ints):
    """A reshape of ``(..., heads, dim)`` into ``(..., heads * dim)``."""
    if h.ndim < 3 or len(dims) != h.ndim - 1:
        return None
    *rest, x, y = h.labels
    if any(lab is not None for lab in rest) or not x or not y:
        return None
    if x[0] != "head" or y[0] != "dim":
        return None
    last = dims[-1] if dims else None
    want = groups.size[groups.find(x[1])] * groups.size[groups.find(y[1])]
    value = -1 if last == -1 else _int(last, ints)
    if value not in (None, -1, want):
        return None
    return True, HeadsFlat(x[1], y[1], h.ndim - 1)


def multihead_attention(node, mod: nn.MultiheadAttention, pre: str, feat, groups, axes, views,
                        input_group) -> Pair:  # fmt: skip
    """``nn.MultiheadAttention``'s parameters: projections into heads (packed
    or separate), the output projection reading ``(heads, dim)`` columns."""
    where = f"MultiheadAttention {node.target}"
    fq, fk, fv = (_arg(node, feat, i, name) for i, name in enumerate(("query", "key", "value")))
    g_out = groups.new(mod.embed_dim)
    out = Pair((Feature(g_out, -1, fq.ndim if isinstance(fq, Feature) else None), None))
    g_q = input_group(fq, mod.embed_dim, -1, where)
    g_k = input_group(fk, mod.kdim, -1, where)
    g_v = input_group(fv, mod.vdim, -1, where)
    attention_axes(mod, pre, g_q, g_k, g_v, g_out, groups, axes, views, where)
    return out


def _arg(node, feat, i: int, name: str):
    a = node.args[i] if len(node.args) > i else node.kwargs.get(name)
    return feat.get(a) if isinstance(a, torch.fx.Node) else None


def attention_axes(mod: nn.MultiheadAttention, pre: str, g_q: int, g_k: int, g_v: int,
                   g_out: int, groups, axes, views, where: str) -> None:  # fmt: skip
    """The axes of a ``nn.MultiheadAttention``'s parameters, its query, key
    and value reading ``g_q``, ``g_k``, ``g_v`` and its output writing
    ``g_out``."""
    n_heads, dim, e = mod.num_heads, mod.head_dim, mod.embed_dim
    if mod.bias_k is not None:
        for g in (g_q, g_k, g_v, g_out):
            groups.make_opaque(g, where + " (add_bias_kv)")
        return
    h, i_qk = groups.new_nested(n_heads, dim)
    i_v = groups.new_in(h, dim)
    packed = ("p", (i_qk, i_qk, i_v), 1)  # query and key rows, then value rows
    if mod._qkv_same_embed_dim:
        g_in = groups.union(groups.union(g_q, g_k, where), g_v, where)  # one column axis
        views[pre + "in_proj_weight"] = (3, n_heads, dim, e)
        axes[pre + "in_proj_weight"] = [("l",), ("g", h, 1), packed, ("g", g_in, -1)]
    else:
        for name, g_col, i, cols in (("q", g_q, i_qk, e), ("k", g_k, i_qk, mod.kdim),
                                     ("v", g_v, i_v, mod.vdim)):  # fmt: skip
            views[f"{pre}{name}_proj_weight"] = (n_heads, dim, cols)
            axes[f"{pre}{name}_proj_weight"] = [("g", h, 1), ("g", i, 1), ("g", g_col, -1)]
    if mod.in_proj_bias is not None:
        views[pre + "in_proj_bias"] = (3, n_heads, dim)
        axes[pre + "in_proj_bias"] = [("l",), ("g", h, 1), packed]
    views[pre + "out_proj.weight"] = (e, n_heads, dim)
    axes[pre + "out_proj.weight"] = [("g", g_out, 1), ("g", h, -1), ("g", i_v, -1)]
    if mod.out_proj.bias is not None:
        axes[pre + "out_proj.bias"] = [("g", g_out, 1)]


TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
TRANSFORMER_STACKS = (nn.TransformerEncoder, nn.TransformerDecoder)
TRANSFORMERS = TRANSFORMER_LAYERS + TRANSFORMER_STACKS


def transformer(node, mod: nn.Module, pre: str, feat, groups, axes, views, input_group):
    """torch's transformer layers and stacks (pre- or post-LN): one residual
    stream through self-attention, cross-attention to the memory (decoders)
    and the feed-forward layers, their norms in it."""
    where = f"{type(mod).__name__} {node.target}"
    first = _arg(node, feat, 0, "src" if "Encoder" in type(mod).__name__ else "tgt")
    layers = list(mod.layers) if isinstance(mod, TRANSFORMER_STACKS) else [mod]
    d = layers[0].linear1.in_features
    g = input_group(first, d, -1, where)
    g_mem = None
    if isinstance(layers[0], nn.TransformerDecoderLayer):
        g_mem = input_group(_arg(node, feat, 1, "memory"), d, -1, where)
    stack = isinstance(mod, TRANSFORMER_STACKS)
    prefixes = [f"{pre}layers.{k}." for k in range(len(layers))] if stack else [pre]
    for layer, p in zip(layers, prefixes):
        attention_axes(layer.self_attn, p + "self_attn.", g, g, g, g, groups, axes, views, where)
        if g_mem is not None:
            attention_axes(layer.multihead_attn, p + "multihead_attn.", g, g_mem, g_mem, g,
                           groups, axes, views, where)  # fmt: skip
        hidden = groups.new(layer.linear1.out_features)
        _linear(layer.linear1, p + "linear1.", hidden, g, axes)
        _linear(layer.linear2, p + "linear2.", g, hidden, axes)
        for k in (1, 2, 3):
            _norm(getattr(layer, f"norm{k}", None), f"{p}norm{k}.", g, axes)
    _norm(getattr(mod, "norm", None), pre + "norm.", g, axes)
    return Feature(g, -1, first.ndim if isinstance(first, Feature) else None)


def _linear(mod: nn.Linear, pre: str, rows: int, cols: int, axes) -> None:
    axes[pre + "weight"] = [("g", rows, 1), ("g", cols, -1)]
    if mod.bias is not None:
        axes[pre + "bias"] = [("g", rows, 1)]


def _norm(mod, pre: str, g: int, axes) -> None:
    if mod is None:
        return
    for name, _ in mod.named_parameters(recurse=False):
        axes[pre + name] = [("g", g, 1)]
