"""Weight spaces: which axes of which parameters are permutable neuron groups.

A network's parameters are a list of tensors. Hidden neurons can be relabelled
without changing the function the network computes: permuting hidden neuron
group ``g`` permutes the rows of the weight and bias that write ``g`` and the
columns of every weight that reads ``g``. A :class:`WeightSpaceSpec` records,
for every axis of every parameter, which role it plays:

* ``group``: a neuron group (shared by every tensor that indexes it). Hidden
  groups are always permutable; the input and output groups are permutable
  under NP semantics and become ``fixed`` axes under HNP semantics.
* ``fixed``: an axis whose index carries meaning (input features or output
  classes under HNP). NF-layers mix fixed axes with per-index weights.
* ``local``: an axis private to one tensor (kernel spatial axes, the axes of a
  tensor that fits no group). NF-layers treat its entries as exchangeable, so
  one layer serves every kernel size.

A group may be *nested* in another (its ``parent``): attention heads are a
group, and the query-key (or value) dimensions within a head are a group
nested in it, which every head permutes on its own. A nested axis always
follows its parent's axis in a view (``(heads, head_dim, d_model)``); the
symmetry permutes the heads as blocks and, within each head, its entries by
that head's own permutation.

A spec's tensors are usually the parameters themselves; a *packed*
parameter (one weight for attention's query, key and value) is described by
*pieces*, consecutive row ranges of it (``TensorSpec.part``), each with its
own axes: the query-key rows and the value rows read different groups of
per-head dimensions. :meth:`WeightSpaceSpec.split` and :meth:`~WeightSpaceSpec.join`
go between parameter-shaped tensors and the spec's tensors.

A :class:`WeightSpace` holds one tensor per spec tensor, shaped
``(*batch, *view, channels)``: channels-last, with optional leading batch axes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from lopt.warning_site import caller_stacklevel

GROUP, FIXED, LOCAL = "group", "fixed", "local"
INPUT, HIDDEN, OUTPUT = "input", "hidden", "output"
NP, HNP = "np", "hnp"


@dataclass(frozen=True)
class Axis:
    """One axis of a parameter's view.

    ``kind`` is ``"group"``, ``"fixed"`` or ``"local"``. ``group`` names the
    neuron group (``group`` and ``fixed`` axes). ``exponent`` says how the axis
    transforms when its neurons are rescaled: +1 where the tensor writes the
    neuron (rows of a weight, a bias), -1 where it reads it (columns).
    """

    kind: str
    size: int
    group: str | None = None
    exponent: int = 0
    parent: str | None = None  # the group this one is nested in (attention heads)


@dataclass(frozen=True)
class TensorSpec:
    """One parameter, or one piece of it: its name, its shape, the view
    NF-layers see, its axes. ``part`` is ``(start, stop)``, the rows along the
    parameter's first axis that a piece covers (``None``: the whole
    parameter); ``shape`` is then the piece's."""

    name: str
    shape: tuple[int, ...]
    view: tuple[int, ...]
    axes: tuple[Axis, ...]
    kind: str  # "weight", "bias" or "standalone"
    part: tuple[int, int] | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def label(self) -> str:
        """The name, with a piece's rows: ``attn.in_proj_weight[128:192]``."""
        return self.name if self.part is None else f"{self.name}[{self.part[0]}:{self.part[1]}]"


@dataclass(frozen=True)
class WeightSpaceSpec:
    """The symmetry structure of a list of parameters.

    Build one with :meth:`from_module`, :meth:`from_shapes` or
    :meth:`from_axes`. ``group_kinds`` maps each neuron group to ``"input"``,
    ``"hidden"`` or ``"output"``; ``mode`` is ``"np"`` (input and output
    neurons permutable) or ``"hnp"`` (only hidden neurons permutable).
    """

    tensors: tuple[TensorSpec, ...]
    group_kinds: tuple[tuple[str, str], ...]
    mode: str = NP
    _kinds: dict = field(default=None, compare=False, hash=False, repr=False)
    _nesting: dict = field(default=None, compare=False, hash=False, repr=False)
    _params: tuple = field(default=None, compare=False, hash=False, repr=False)
    _hash: int = field(default=0, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_kinds", dict(self.group_kinds))
        if self.mode not in (NP, HNP):
            raise ValueError(f"mode must be 'np' or 'hnp', got {self.mode!r}")
        sizes: dict[str, tuple[int, str]] = {}
        parents: dict[str, str | None] = {}
        for t in self.tensors:
            if math.prod(t.view) != math.prod(t.shape):
                raise ValueError(
                    f"parameter {t.label!r}: view {t.view} has a different number of "
                    f"entries than its shape {t.shape}"
                )
            if len(t.axes) != len(t.view):
                raise ValueError(f"parameter {t.label!r}: {len(t.axes)} axes for view {t.view}")
            seen = set()
            for a, (ax, n) in enumerate(zip(t.axes, t.view)):
                if ax.size != n:
                    raise ValueError(f"parameter {t.label!r}: axis size {ax.size} != view size {n}")
                if ax.kind == LOCAL:
                    continue
                self._check_nesting(t, a, parents)
                if ax.group in seen:
                    raise ValueError(
                        f"parameter {t.label!r} indexes neuron group {ax.group!r} on two axes; "
                        "weights that map a group to itself are not supported"
                    )
                seen.add(ax.group)
                if ax.group in sizes and sizes[ax.group][0] != n:
                    other_n, other = sizes[ax.group]
                    raise ValueError(
                        f"parameter {t.label!r}: neuron group {ax.group!r} has size {n} here "
                        f"but size {other_n} in parameter {other!r}"
                    )
                sizes.setdefault(ax.group, (n, t.label))
                if ax.kind == GROUP and ax.group not in self._kinds:
                    raise ValueError(
                        f"parameter {t.label!r}: neuron group {ax.group!r} has no kind"
                    )
        object.__setattr__(self, "_nesting", {g: p for g, p in parents.items() if p is not None})
        object.__setattr__(self, "_params", _parameters(self.tensors))
        # Specs key the NF-layers' plans, looked up several times per step:
        # hash the nested tuples once.
        object.__setattr__(self, "_hash", hash((self.tensors, self.group_kinds, self.mode)))

    def __hash__(self) -> int:
        return self._hash

    @staticmethod
    def _check_nesting(t: TensorSpec, a: int, parents: dict[str, str | None]) -> None:
        ax = t.axes[a]
        if ax.group in parents and parents[ax.group] != ax.parent:
            raise ValueError(
                f"parameter {t.label!r}: neuron group {ax.group!r} is nested in "
                f"{ax.parent!r} here but in {parents[ax.group]!r} elsewhere"
            )
        parents[ax.group] = ax.parent
        if ax.parent is None:
            return
        before = t.axes[a - 1] if a > 0 else None
        if before is None or before.kind == LOCAL or before.group != ax.parent:
            raise ValueError(
                f"parameter {t.label!r}: axis {a} (group {ax.group!r}) is nested in group "
                f"{ax.parent!r}, whose axis must come right before it"
            )
        if before.parent is not None:
            raise ValueError(
                f"parameter {t.label!r}: group {ax.parent!r} is itself nested; one level "
                "of nesting is supported"
            )

    # ----------------------------------------------------------------- queries
    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self):
        return iter(self.tensors)

    def __getitem__(self, i: int) -> TensorSpec:
        return self.tensors[i]

    @property
    def names(self) -> list[str]:
        """The parameters' names (one per parameter, pieces or not)."""
        return [name for name, _, _ in self._params]

    @property
    def parameter_shapes(self) -> list[tuple[int, ...]]:
        """The parameters' shapes, in order (a packed parameter's whole shape)."""
        return [shape for _, shape, _ in self._params]

    @property
    def has_pieces(self) -> bool:
        """Whether some parameter is described by pieces (more tensors than parameters)."""
        return len(self._params) != len(self.tensors)

    def by_parameter(self) -> list[tuple[TensorSpec, ...]]:
        """The spec's tensors grouped per parameter: ``(t,)``, or a packed
        parameter's pieces in row order."""
        return [self.tensors[sl] for _, _, sl in self._params]

    def select(self, indices: Sequence[int]) -> WeightSpaceSpec:
        """The spec of the parameters at ``indices`` (in that order)."""
        tensors = tuple(t for i in indices for t in self.tensors[self._params[i][2]])
        return WeightSpaceSpec(tensors, self.group_kinds, self.mode)

    def split(self, tensors: Sequence[Tensor], dim: int = 0) -> list[Tensor]:
        """Parameter-shaped tensors (a leading ``dim`` axes before the
        parameter's, e.g. momenta's) as the spec's tensors: a packed
        parameter's rows cut into its pieces (views, no copy). Without pieces
        the same list."""
        if not self.has_pieces:
            return list(tensors)
        out = []
        for x, (_, _, sl) in zip(tensors, self._params):
            for t in self.tensors[sl]:
                out.append(x if t.part is None else x.narrow(dim, t.part[0], t.part[1] - t.part[0]))
        return out

    def join(self, tensors: Sequence[Tensor], dim: int = 0) -> list[Tensor]:
        """The inverse of :meth:`split`: pieces concatenated back into their
        parameters' rows (a copy for packed parameters only)."""
        if not self.has_pieces:
            return list(tensors)
        out = []
        for _, _, sl in self._params:
            pieces = tensors[sl]
            out.append(pieces[0] if len(pieces) == 1 else torch.cat(list(pieces), dim))
        return out

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    def group_kind(self, group: str) -> str:
        return self._kinds[group]

    def group_sizes(self) -> dict[str, int]:
        """Size of every neuron group (permutable or fixed)."""
        out: dict[str, int] = {}
        for t in self.tensors:
            for ax in t.axes:
                if ax.kind != LOCAL:
                    out.setdefault(ax.group, ax.size)
        return out

    def permutable_groups(self) -> dict[str, int]:
        """The neuron groups whose order carries no meaning, with their sizes."""
        out: dict[str, int] = {}
        for t in self.tensors:
            for ax in t.axes:
                if ax.kind == GROUP:
                    out.setdefault(ax.group, ax.size)
        return out

    def nesting(self) -> dict[str, str]:
        """Each nested neuron group and the group it is nested in (the
        per-head dimensions of attention and their heads)."""
        return dict(self._nesting)

    def hidden_groups(self) -> dict[str, int]:
        return {g: n for g, n in self.permutable_groups().items() if self._kinds[g] == HIDDEN}

    def with_mode(self, mode: str) -> WeightSpaceSpec:
        """The same spec under NP or HNP semantics."""
        if mode not in (NP, HNP):
            raise ValueError(f"mode must be 'np' or 'hnp', got {mode!r}")
        new_kind = GROUP if mode == NP else FIXED
        tensors = []
        for t in self.tensors:
            axes = tuple(
                replace(a, kind=new_kind)
                if a.kind != LOCAL and self._kinds[a.group] != HIDDEN
                else a
                for a in t.axes
            )
            tensors.append(replace(t, axes=axes))
        return WeightSpaceSpec(tuple(tensors), self.group_kinds, mode)

    def check(self, tensors: Sequence[Tensor], what: str = "parameter") -> None:
        """Raise ``ValueError`` naming the first parameter-shaped tensor whose
        shape contradicts the spec."""
        if len(tensors) != len(self._params):
            raise ValueError(
                f"the weight-space spec describes {len(self._params)} parameters "
                f"but {len(tensors)} {what}s were given"
            )
        for (name, shape, sl), x in zip(self._params, tensors):
            if tuple(x.shape) != shape:
                axes = "; ".join(f"{t.label} {describe_axes(t)}" for t in self.tensors[sl])
                raise ValueError(
                    f"{what} {name!r} has shape {tuple(x.shape)} but the weight-space spec "
                    f"says {shape} ({axes})"
                )

    def describe(self) -> str:
        """A human-readable table of every parameter's axes."""
        lines = [f"WeightSpaceSpec(mode={self.mode!r}, {len(self.tensors)} tensors)"]
        width = max([28] + [len(t.label) for t in self.tensors])
        for t in self.tensors:
            lines.append(f"  {t.label:<{width}} {str(t.shape):<18} {t.kind:<10} {describe_axes(t)}")
        return "\n".join(lines)

    # ---------------------------------------------------------- construction
    @classmethod
    def from_axes(
        cls,
        axes: Mapping[str, Sequence[str | None]],
        shapes: Mapping[str, Sequence[int]],
        inputs: Iterable[str] = (),
        outputs: Iterable[str] = (),
        mode: str = NP,
        views: Mapping[str, Sequence[int]] | None = None,
        nested: Mapping[str, str] | None = None,
    ) -> WeightSpaceSpec:
        """An explicit spec: for each parameter, the neuron group of each axis.

        ``axes["fc1.weight"] = ("h1", "in")`` says rows belong to group ``h1``
        and columns to ``in``; ``None`` marks a local axis (kernel position).
        Axes of a weight after the first two, and a 1-D tensor's only axis,
        follow the weight / bias convention (first axis writes the group).
        Groups named in ``inputs`` / ``outputs`` are the network's input
        features and outputs; every other group is hidden. ``nested`` maps a
        group to the group it is nested in (``{"qk": "heads"}``: each head
        permutes its own query-key dimensions); a nested axis must follow its
        parent's axis.
        """
        inputs, outputs = set(inputs), set(outputs)
        nested = dict(nested or {})
        views = dict(views or {})
        tensors, kinds = [], {}
        for name, names in axes.items():
            if name not in shapes:
                raise ValueError(f"parameter {name!r} has axes but no shape")
            shape = tuple(int(s) for s in shapes[name])
            view = tuple(int(s) for s in views.get(name, shape))
            if len(names) != len(view):
                raise ValueError(
                    f"parameter {name!r}: {len(names)} axis names for a view of "
                    f"{len(view)} axes {view}"
                )
            if any(g is not None for g in names):
                kind = "bias" if len(view) == 1 else "weight"
            else:
                kind = "standalone"
            built = []
            for i, (g, n) in enumerate(zip(names, view)):
                if g is None:
                    built.append(Axis(LOCAL, n))
                    continue
                gk = INPUT if g in inputs else OUTPUT if g in outputs else HIDDEN
                kinds[g] = gk
                exponent = 1 if i == 0 else -1 if i == 1 else 0
                built.append(Axis(GROUP, n, g, exponent, nested.get(g)))
            tensors.append(TensorSpec(name, shape, view, tuple(built), kind))
        for name in shapes:
            if name not in axes:
                raise ValueError(f"parameter {name!r} has a shape but no axes")
        spec = cls(tuple(tensors), tuple(sorted(kinds.items())), NP)
        return spec.with_mode(mode) if mode != NP else spec

    @classmethod
    def from_shapes(
        cls,
        shapes: Sequence[Sequence[int]],
        names: Sequence[str] | None = None,
        mode: str = NP,
    ) -> WeightSpaceSpec:
        """Infer the spec from parameter shapes in forward order.

        Rules: a 2-D, 3-D or 4-D tensor is a Linear / Conv1d / Conv2d weight;
        it continues the chain when its input size equals the previous layer's
        output size (or a multiple of it, after a conv: flatten), and starts a
        new chain of its own when it is first. A 1-D tensor the size of the
        previous layer's output, when that layer has no bias yet, is its bias.
        Everything else is a standalone tensor.
        """
        names = list(names) if names is not None else [f"param{i}" for i in range(len(shapes))]
        if len(names) != len(shapes):
            raise ValueError(f"{len(names)} names for {len(shapes)} shapes")
        layers = [(n, tuple(int(s) for s in shp), None) for n, shp in zip(names, shapes)]
        return _infer(layers, mode)

    @classmethod
    def from_module(cls, module: nn.Module, mode: str = NP, graph: bool = True) -> WeightSpaceSpec:
        """Infer the spec of a module's parameters (in ``named_parameters()``
        order).

        With ``graph=True`` (the default) the module's forward is traced with
        ``torch.fx`` and every neuron axis is followed through it
        (:mod:`lopt.graph_spec`): residual additions make one group of the
        stream they add to, normalisation and embedding parameters join the
        groups they act on. What the trace does not understand keeps local
        axes, with a warning naming the operation and the parameters; a
        module that cannot be traced falls back on the sequential rule, with
        a warning. ``graph=False`` is the sequential rule: Linear / Conv
        layers linked in registration order by their sizes (the forward order
        of an ``nn.Sequential``), global pooling or flatten between conv and
        linear parts recognised from the sizes, other parameters standalone.
        """
        # torch.compile's wrapper holds the model (the same parameters).
        module = getattr(module, "_orig_mod", module)
        # A single layer (no submodules) is read exactly by the sequential rule.
        if graph and any(True for _ in module.children()):
            spec = cls._from_graph(module, mode)
            if spec is not None:
                return spec
        owner: dict[int, tuple[str, nn.Module]] = {}
        for mod_name, mod in module.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                owner.setdefault(id(p), (f"{mod_name}.{p_name}" if mod_name else p_name, mod))
        layers = []
        for name, p in module.named_parameters():
            _, mod = owner[id(p)]
            layer_kind = None
            if (
                isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d))
                and getattr(mod, "groups", 1) == 1
            ):
                layer_kind = "bias" if p is getattr(mod, "bias", None) else "weight"
            layers.append((name, tuple(p.shape), layer_kind if layer_kind else "standalone"))
        return _infer(layers, mode)

    @classmethod
    def _from_graph(cls, module: nn.Module, mode: str) -> WeightSpaceSpec | None:
        import warnings

        from lopt import graph_spec

        try:
            axes, groups, views = graph_spec.read_graph(module)
        except graph_spec.GraphError as e:
            warnings.warn(
                f"{type(module).__name__} could not be traced ({e}); its weight space "
                "follows the sequential rule (layers in registration order)",
                stacklevel=caller_stacklevel(),
            )
            return None
        tensors, kinds, notes = graph_spec.spec_tensors(module, axes, groups, views)
        if notes:
            warnings.warn(
                f"{type(module).__name__}: neuron axes through operations the weight-space "
                "inference does not follow keep local axes (not permuted): " + "; ".join(notes),
                stacklevel=caller_stacklevel(),
            )
        spec = cls(tuple(tensors), tuple(sorted(kinds.items())), NP)
        return spec.with_mode(mode) if mode != NP else spec

    def check_against(self, module: nn.Module) -> None:
        """Raise ``ValueError`` naming the first parameter where this spec
        claims a symmetry that ``module``'s traced graph does not have: each
        permutable group must cover exactly the axes of one group of
        :meth:`from_module`'s spec (permuting a part of a group, or two groups
        as one, changes the function). Parameters are matched by name."""
        graph = self.from_module(module, self.mode)
        where = {
            (t.label, a): ax.group
            for t in graph.tensors
            for a, ax in enumerate(t.axes)
            if ax.kind == GROUP
        }
        missing = [t.name for t in self.tensors if t.name not in {g.name for g in graph.tensors}]
        if missing:
            raise ValueError(f"parameter {missing[0]!r} is not a parameter of the module")
        mine: dict[str, list[tuple[str, int]]] = {}
        for t in self.tensors:
            for a, ax in enumerate(t.axes):
                if ax.kind == GROUP:
                    mine.setdefault(ax.group, []).append((t.label, a))
        for group, positions in mine.items():
            theirs = {where.get(p) for p in positions}
            name, axis = positions[0]
            if None in theirs:
                name, axis = next(p for p in positions if where.get(p) is None)
                raise ValueError(
                    f"parameter {name!r}: axis {axis} is in neuron group {group!r} here, but "
                    "the model's graph does not let it be permuted"
                )
            if len(theirs) > 1:
                raise ValueError(
                    f"parameter {name!r}: neuron group {group!r} joins axes the model's graph "
                    f"keeps in separate groups ({len(theirs)} of them)"
                )
            (g,) = theirs
            full = sorted(p for p, h in where.items() if h == g)
            if sorted(positions) != full:
                other = next(p for p in full if p not in positions)
                raise ValueError(
                    f"parameter {other[0]!r}: axis {other[1]} shares neurons with group "
                    f"{group!r} in the model's graph, but this spec does not permute it with them"
                )

    def random_symmetry(self, generator: torch.Generator) -> Callable[[Sequence[Tensor]], list]:
        """One random element of the spec's symmetry group: a permutation of
        every permutable neuron group (``group`` axes; fixed and local axes
        stay), a nested group permuted by each of its parent's neurons on
        its own (each attention head its own dimensions). Returns a function
        that applies it to a list of parameter-shaped tensors in spec order
        (parameters, gradients, updates, ...)."""
        groups = self.permutable_groups()
        nesting = self.nesting()
        perms = {}
        for g, n in groups.items():
            if g in nesting:  # one permutation per neuron of the parent group
                rows = groups[nesting[g]]
                each = [torch.randperm(n, generator=generator) for _ in range(rows)]
                perms[g] = torch.stack(each)
            else:
                perms[g] = torch.randperm(n, generator=generator)

        def apply(tensors: Sequence[Tensor]) -> list[Tensor]:
            return WeightSpace.from_tensors(self, tensors, "tensor").permute(perms).to_tensors()

        return apply


def _parameters(tensors: Sequence[TensorSpec]) -> tuple[tuple[str, tuple[int, ...], slice], ...]:
    """``(name, shape, slice of tensors)`` per parameter: a run of pieces of
    one name that tile its rows from 0 is one parameter."""
    out, i = [], 0
    while i < len(tensors):
        t = tensors[i]
        if t.part is None:
            out.append((t.name, t.shape, slice(i, i + 1)))
            i += 1
            continue
        j, rows = i, 0
        while j < len(tensors) and tensors[j].name == t.name and tensors[j].part is not None:
            p = tensors[j]
            if p.part[0] != rows or p.part[1] - p.part[0] != (p.shape[0] if p.shape else -1):
                raise ValueError(
                    f"parameter {t.name!r}: piece {p.label} does not follow the rows before "
                    f"it (pieces must tile the first axis in order from 0, got rows {rows})"
                )
            if p.shape[1:] != t.shape[1:]:
                raise ValueError(
                    f"parameter {t.name!r}: pieces of shapes {t.shape} and {p.shape} differ "
                    "past the first axis"
                )
            rows = p.part[1]
            j += 1
        out.append((t.name, (rows, *t.shape[1:]), slice(i, j)))
        i = j
    return tuple(out)


def permute_axis(x: Tensor, axis: int, perm: Tensor) -> Tensor:
    """``x`` with axis ``axis`` relabelled by ``perm``: a 1-D permutation, or a
    2-D one (a row per index of axis ``axis - 1``, for a nested group)."""
    if perm.dim() == 1:
        return x.index_select(axis, perm)
    shape = [1] * x.dim()
    shape[axis - 1], shape[axis] = perm.shape
    return x.gather(axis, perm.reshape(shape).expand(x.shape))


def describe_axes(t: TensorSpec) -> str:
    parts = []
    for ax in t.axes:
        if ax.kind == LOCAL:
            parts.append(f"local[{ax.size}]")
        else:
            nest = f" in {ax.parent}" if ax.parent else ""
            parts.append(f"{ax.kind}:{ax.group}[{ax.size}]{nest}")
    return "(" + ", ".join(parts) + ")"


def _infer(layers: list[tuple[str, tuple[int, ...], str | None]], mode: str) -> WeightSpaceSpec:
    """Shared inference: ``layers`` is (name, shape, hint) with hint None (guess
    from shape), ``"weight"``, ``"bias"`` or ``"standalone"``."""
    tensors: list[TensorSpec] = []
    kinds: dict[str, str] = {}
    prev_out: tuple[str, int] | None = None  # (group, size) of the last layer's output
    prev_is_conv = False
    prev_has_bias = True
    n_groups = 0

    def new_group(kind: str) -> str:
        nonlocal n_groups
        name = f"g{n_groups}"
        n_groups += 1
        kinds[name] = kind
        return name

    def standalone(name, shape):
        return TensorSpec(name, shape, shape, tuple(Axis(LOCAL, n) for n in shape), "standalone")

    for name, shape, hint in layers:
        is_weight = hint == "weight" or (hint is None and len(shape) in (2, 3, 4))
        is_bias = hint == "bias" or (hint is None and len(shape) == 1)
        if is_weight and len(shape) in (2, 3, 4) and min(shape) > 0:
            out_n, in_n = shape[0], shape[1]
            view = shape
            if prev_out is None:
                in_group = new_group(INPUT)
            elif in_n == prev_out[1]:
                in_group = prev_out[0]
            elif (
                len(shape) == 2 and prev_is_conv and in_n % prev_out[1] == 0
            ):  # flatten after a conv: columns are (channel, position)
                in_group = prev_out[0]
                view = (out_n, prev_out[1], in_n // prev_out[1])
            elif hint == "weight":  # a layer that does not read the previous one
                in_group = new_group(INPUT)
            else:
                tensors.append(standalone(name, shape))
                continue
            if kinds[in_group] == OUTPUT:  # read by this layer: the group is hidden
                kinds[in_group] = HIDDEN
            out_group = new_group(OUTPUT)
            axes = [Axis(GROUP, out_n, out_group, 1), Axis(GROUP, view[1], in_group, -1)]
            axes += [Axis(LOCAL, n) for n in view[2:]]
            tensors.append(TensorSpec(name, shape, view, tuple(axes), "weight"))
            prev_out = (out_group, out_n)
            prev_is_conv = len(shape) > 2
            prev_has_bias = False
        elif (
            is_bias
            and len(shape) == 1
            and prev_out is not None
            and not prev_has_bias
            and shape[0] == prev_out[1]
        ):
            axes = (Axis(GROUP, shape[0], prev_out[0], 1),)
            tensors.append(TensorSpec(name, shape, shape, axes, "bias"))
            prev_has_bias = True
        else:
            tensors.append(standalone(name, shape))
    spec = WeightSpaceSpec(tuple(tensors), tuple(sorted(kinds.items())), NP)
    return spec.with_mode(mode) if mode != NP else spec


# --------------------------------------------------------------------------
# WeightSpace: the data
# --------------------------------------------------------------------------
class WeightSpace:
    """One channels-last tensor per parameter: ``(*batch, *view, channels)``.

    Registered as a pytree, so ``torch.func.vmap`` maps over its tensors.
    """

    __slots__ = ("spec", "tensors")

    def __init__(self, spec: WeightSpaceSpec, tensors: Sequence[Tensor]):
        if len(tensors) != len(spec.tensors):
            raise ValueError(f"{len(tensors)} tensors for a spec of {len(spec.tensors)}")
        for t, x in zip(spec.tensors, tensors):
            k = len(t.view)
            if x.dim() < k + 1 or tuple(x.shape[x.dim() - k - 1 : -1]) != t.view:
                raise ValueError(
                    f"weight-space tensor for {t.name!r} has shape {tuple(x.shape)}; expected "
                    f"(*batch, *{t.view}, channels)"
                )
        self.spec = spec
        self.tensors = tuple(tensors)

    # ------------------------------------------------------------ conversion
    @classmethod
    def from_tensors(
        cls, spec: WeightSpaceSpec, tensors: Sequence[Tensor], what: str = "parameter"
    ) -> WeightSpace:
        """One channel from a list of parameter-shaped tensors (params, grads, ...)."""
        spec.check(tensors, what)
        pieces = spec.split(tensors)
        return cls(spec, [x.reshape(t.view + (1,)) for t, x in zip(spec.tensors, pieces)])

    @classmethod
    def from_channels(
        cls, spec: WeightSpaceSpec, channels: Sequence[Sequence[Tensor]]
    ) -> WeightSpace:
        """Stack several lists of parameter-shaped tensors as channels."""
        if not channels:
            raise ValueError("from_channels needs at least one channel")
        for c in channels:
            spec.check(c)
        channels = [spec.split(c) for c in channels]
        return cls(
            spec,
            [
                torch.stack([c[i].reshape(t.view) for c in channels], dim=-1)
                for i, t in enumerate(spec.tensors)
            ],
        )

    def to_tensors(self) -> list[Tensor]:
        """Back to parameter shapes: ``(*batch, *shape)`` for one channel,
        ``(*batch, *shape, channels)`` otherwise (a packed parameter's pieces
        joined)."""
        out = []
        for t, x in zip(self.spec.tensors, self.tensors):
            lead = x.shape[: x.dim() - len(t.view) - 1]
            c = x.shape[-1]
            out.append(x.reshape(*lead, *t.shape) if c == 1 else x.reshape(*lead, *t.shape, c))
        return self.spec.join(out, len(self.batch_shape))

    # ------------------------------------------------------------ structure
    @property
    def channels(self) -> int:
        return self.tensors[0].shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        t, x = self.spec.tensors[0], self.tensors[0]
        return x.shape[: x.dim() - len(t.view) - 1]

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self):
        return iter(self.tensors)

    def __getitem__(self, i: int) -> Tensor:
        return self.tensors[i]

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(x.shape)) for x in self.tensors)
        return f"WeightSpace({len(self.tensors)} tensors, channels={self.channels}: {shapes})"

    # ------------------------------------------------------------ arithmetic
    def map(self, fn: Callable[[Tensor], Tensor]) -> WeightSpace:
        return WeightSpace(self.spec, [fn(x) for x in self.tensors])

    def zip_map(self, other: WeightSpace, fn: Callable[[Tensor, Tensor], Tensor]) -> WeightSpace:
        self._check_same(other)
        return WeightSpace(self.spec, [fn(a, b) for a, b in zip(self.tensors, other.tensors)])

    def __add__(self, other: WeightSpace | float) -> WeightSpace:
        if isinstance(other, WeightSpace):
            return self.zip_map(other, torch.add)
        return self.map(lambda x: x + other)

    def __sub__(self, other: WeightSpace | float) -> WeightSpace:
        if isinstance(other, WeightSpace):
            return self.zip_map(other, torch.sub)
        return self.map(lambda x: x - other)

    def __mul__(self, other: WeightSpace | float) -> WeightSpace:
        if isinstance(other, WeightSpace):
            return self.zip_map(other, torch.mul)
        return self.map(lambda x: x * other)

    __rmul__ = __mul__
    __radd__ = __add__

    def to(self, *args, **kwargs) -> WeightSpace:
        return self.map(lambda x: x.to(*args, **kwargs))

    def channel(self, index: int | slice) -> WeightSpace:
        """Select channels, keeping the channel axis."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return self.map(lambda x: x[..., index])

    def permute(self, perms: Mapping[str, Tensor]) -> WeightSpace:
        """Relabel neurons: ``perms[group][i]`` is the old index of new neuron ``i``.

        A nested group's permutation has a row per neuron of its parent group
        (``perms[g][h, i]``: within head ``h``, after the heads are
        relabelled). Groups not in ``perms`` keep their order. For a spec inferred from a
        network, permuting hidden groups of its parameters leaves the function
        it computes unchanged.
        """
        unknown = set(perms) - set(self.spec.group_sizes())
        if unknown:
            raise ValueError(f"unknown neuron groups {sorted(unknown)}")
        nb = len(self.batch_shape)
        out = []
        for t, x in zip(self.spec.tensors, self.tensors):
            for a, ax in enumerate(t.axes):
                if ax.kind != LOCAL and ax.group in perms:
                    p = perms[ax.group]
                    want = (t.view[a - 1], ax.size) if ax.parent else (ax.size,)
                    if tuple(p.shape) != want:
                        raise ValueError(
                            f"permutation of group {ax.group!r} has shape {tuple(p.shape)}, "
                            f"the group needs {want}"
                        )
                    x = permute_axis(x, nb + a, p.to(x.device))
            out.append(x)
        return WeightSpace(self.spec, out)

    @staticmethod
    def cat(spaces: Sequence[WeightSpace]) -> WeightSpace:
        """Concatenate channels of weight spaces that share a spec."""
        first = spaces[0]
        for s in spaces[1:]:
            first._check_same(s)
        return WeightSpace(
            first.spec, [torch.cat(xs, dim=-1) for xs in zip(*(s.tensors for s in spaces))]
        )

    def _check_same(self, other: WeightSpace) -> None:
        if other.spec != self.spec:
            raise ValueError("weight spaces have different specs")


def _flatten(ws: WeightSpace):
    return list(ws.tensors), ws.spec


def _unflatten(values, spec):
    ws = WeightSpace.__new__(WeightSpace)
    ws.spec = spec
    ws.tensors = tuple(values)
    return ws


pytree.register_pytree_node(
    WeightSpace,
    _flatten,
    _unflatten,
    serialized_type_name="lopt.weightspace.WeightSpace",
)
