"""Enumerate the terms of an equivariant linear map between weight spaces.

For an output tensor U and an input tensor T, a linear map that commutes with
every permutation of every neuron group is a sum of terms, one per choice of
which shared axes are *tied* (the output entry reads the input entry with the
same neuron index) and which are *pooled* (the input is averaged over that
axis and the result broadcast). Fixed axes carry meaning, so they are mixed
with a dense matrix over their indices. Each neuron group appears at most once
per tensor, so per group the orbit of an (output index, input index) pair is
"equal" or "not equal": tied or pooled spans exactly that space. Taking every
subset of shared axes for every (U, T) pair therefore gives the full family of
equivariant affine maps (Navon et al. 2023 for HNP; Zhou et al. 2023 for NP).

A nested group (the dimensions within an attention head) is permuted by
each neuron of its parent group (the head) on its own, so the orbits are
finer: a nested axis can be tied only together with its parent's axis (the
same dimension of the same head); pooling it within a head, or pooling both,
is allowed; tying it across heads is not.

A term's *key* names the weights it uses. With ``tie="role"`` the key depends
only on the roles of U and T (which kinds of neuron groups their axes hold)
and on how T's axes relate to U's, never on layer indices, so one set of
weights serves every depth, width and kernel size. Terms of one U that share
a key are averaged. With ``tie="none"`` each (U, T) pair has its own weights.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

from lopt.weightspace import FIXED, GROUP, HIDDEN, LOCAL, TensorSpec, WeightSpaceSpec

_KIND_CODE = {"input": "i", "hidden": "h", "output": "o"}


@dataclass(frozen=True)
class Contribution:
    """One input tensor T feeding one output tensor U through one term."""

    t_index: int
    pool: tuple[int, ...]  # T axes averaged out
    order: tuple[int, ...]  # remaining T axes: tied ones in U-axis order, then fixed ones
    n_fixed: int  # how many of ``order`` are fixed axes (flattened into channels)
    perm: tuple[int, ...] | None = None  # the pooled input's axes into ``order`` (None: as is)


@dataclass(frozen=True)
class KeyedInput:
    key: str
    in_features: int  # channels times the size of T's fixed axes
    contributions: tuple[Contribution, ...]  # averaged


@dataclass(frozen=True)
class TieGroup:
    """All terms of one U whose results have the same broadcast shape."""

    tied: tuple[int, ...]  # U axes kept; the others broadcast
    inputs: tuple[KeyedInput, ...]


@dataclass(frozen=True)
class OutputPlan:
    u_index: int
    fixed: tuple[int, ...]  # U's fixed axes (written with per-index weights)
    fixed_sizes: tuple[int, ...]
    bias_key: str | None
    groups: tuple[TieGroup, ...]


def role(t: TensorSpec, spec: WeightSpaceSpec) -> str:
    """What a tensor is, independent of where it sits: its axes' kinds
    (``a`` for a group others are nested in, attention heads; ``n`` for a
    nested group)."""
    parents = set(spec._nesting.values())
    codes = []
    for ax in t.axes:
        if ax.kind == LOCAL:
            codes.append("l")
        elif ax.kind == FIXED:
            codes.append(f"f{ax.size}")
        elif ax.parent is not None:
            codes.append("n")
        elif ax.group in parents:
            codes.append("a")
        else:
            codes.append(_KIND_CODE[spec.group_kind(ax.group)])
    return "".join(codes) if codes else "s"


def role_order(spec: WeightSpaceSpec) -> list[str]:
    """The distinct tensor roles of a spec, in order of first appearance."""
    return list(dict.fromkeys(role(t, spec) for t in spec.tensors))


def _identity(spec: WeightSpaceSpec, ti: int, a: int):
    ax = spec.tensors[ti].axes[a]
    if ax.kind == GROUP:
        return ("g", ax.group)
    if ax.kind == LOCAL:
        return ("l", ti, a)
    return None  # fixed axes are mixed densely, never tied


def shared_axes(spec: WeightSpaceSpec, ui: int, ti: int) -> list[tuple[int, int]]:
    """(U axis, T axis) pairs that index the same neurons."""
    u_ids = {
        _identity(spec, ui, a): a
        for a in range(len(spec.tensors[ui].axes))
        if _identity(spec, ui, a) is not None
    }
    pairs = []
    for b in range(len(spec.tensors[ti].axes)):
        ident = _identity(spec, ti, b)
        if ident is not None and ident in u_ids:
            pairs.append((u_ids[ident], b))
    return pairs


def _nesting_kept(t: TensorSpec, ties) -> bool:
    """Whether every tied nested axis of ``t`` has its parent's axis tied
    (the same head): a dimension of one head means nothing in another."""
    tied = {b for _, b in ties}
    return all(t.axes[b].parent is None or b - 1 in tied for b in tied)


def term_key(spec: WeightSpaceSpec, ui: int, ti: int, ties, tie: str) -> str:
    u, t = spec.tensors[ui], spec.tensors[ti]
    tied_t = {b: a for a, b in ties}
    desc = []
    for b, ax in enumerate(t.axes):
        if b in tied_t:
            desc.append(f"t{tied_t[b]}")
        elif ax.kind == FIXED:
            desc.append(f"f{ax.size}")
        elif ax.kind == LOCAL:
            desc.append("pl")
        elif tie == "role":
            # Which kind of group is averaged away is left out, so the
            # neighbours of a hidden layer look alike at every depth.
            desc.append("p")
        else:
            desc.append("p" + _KIND_CODE[spec.group_kind(ax.group)])
    key = f"{role(u, spec)}<-{','.join(desc) or 's'}"
    if tie == "none":
        key = f"{u.name}<-{t.name}:{key}"
    return key.replace(".", "/")


def bias_key(spec: WeightSpaceSpec, ui: int, tie: str) -> str:
    u = spec.tensors[ui]
    key = f"bias:{role(u, spec)}"
    if tie == "none":
        key = f"{u.name}:{key}"
    return key.replace(".", "/")


TermFilter = Callable[[WeightSpaceSpec, int, int, tuple[tuple[int, int], ...]], bool]
BiasFilter = Callable[[WeightSpaceSpec, int], bool]


def build_plan(
    spec: WeightSpaceSpec,
    in_channels: int,
    tie: str = "role",
    term_allowed: TermFilter | None = None,
    bias_allowed: BiasFilter | None = None,
    use_bias: bool = True,
) -> tuple[OutputPlan, ...]:
    """Every term of the full equivariant layer on ``spec``, grouped for speed."""
    if tie not in ("role", "none"):
        raise ValueError(f"tie must be 'role' or 'none', got {tie!r}")
    plans = []
    for ui, u in enumerate(spec.tensors):
        per_key: dict[tuple[tuple[int, ...], str], list[Contribution]] = {}
        feats: dict[str, int] = {}
        for ti, t in enumerate(spec.tensors):
            pairs = shared_axes(spec, ui, ti)
            for r in range(len(pairs) + 1):
                for ties in itertools.combinations(pairs, r):
                    if not _nesting_kept(t, ties):
                        continue
                    if term_allowed is not None and not term_allowed(spec, ui, ti, ties):
                        continue
                    tied_t = {b: a for a, b in ties}
                    fixed_t = [b for b, ax in enumerate(t.axes) if ax.kind == FIXED]
                    pool = tuple(
                        b for b in range(len(t.axes)) if b not in tied_t and b not in fixed_t
                    )
                    order = tuple(sorted(tied_t, key=tied_t.get)) + tuple(fixed_t)
                    key = term_key(spec, ui, ti, ties, tie)
                    tied_u = tuple(sorted(tied_t.values()))
                    kept = [b for b in range(len(t.axes)) if b not in pool]
                    perm = tuple(kept.index(b) for b in order)
                    perm = None if perm == tuple(range(len(perm))) else perm
                    per_key.setdefault((tied_u, key), []).append(
                        Contribution(ti, pool, order, len(fixed_t), perm)
                    )
                    feats[key] = in_channels * math.prod(t.axes[b].size for b in fixed_t)
        by_tied: dict[tuple[int, ...], list[KeyedInput]] = {}
        for (tied_u, key), contribs in per_key.items():
            by_tied.setdefault(tied_u, []).append(KeyedInput(key, feats[key], tuple(contribs)))
        # Largest broadcast shape first: the pointwise term starts the sum.
        groups = tuple(
            TieGroup(tied, tuple(inputs))
            for tied, inputs in sorted(by_tied.items(), key=lambda kv: (-len(kv[0]), kv[0]))
        )
        fixed = tuple(a for a, ax in enumerate(u.axes) if ax.kind == FIXED)
        has_bias = use_bias and (bias_allowed is None or bias_allowed(spec, ui))
        plans.append(
            OutputPlan(
                ui,
                fixed,
                tuple(u.axes[a].size for a in fixed),
                bias_key(spec, ui, tie) if has_bias else None,
                groups,
            )
        )
    return tuple(plans)


def hidden_exponents(t: TensorSpec, spec: WeightSpaceSpec) -> dict[str, tuple[int, int]]:
    """Hidden neuron groups of a tensor: group -> (axis, exponent)."""
    return {
        ax.group: (a, ax.exponent)
        for a, ax in enumerate(t.axes)
        if ax.kind == GROUP and spec.group_kind(ax.group) == HIDDEN
    }
