"""Invariant pooling: a weight space to one vector per batch element."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lopt.nn.terms import role, role_order
from lopt.weightspace import FIXED, WeightSpace, WeightSpaceSpec


class InvariantPool(nn.Module):
    """Mean over every permutable and local axis of each tensor, averaged over
    tensors of the same role, concatenated in the role order of ``spec``.

    The output ``(*batch, out_features)`` is invariant to every permutation of
    neurons, and has the same size for any depth or width with the same roles.
    Fixed axes (HNP inputs / outputs) are kept, flattened into the features.
    """

    def __init__(self, spec: WeightSpaceSpec, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.roles = role_order(spec)
        self.sizes = {}
        for t in spec.tensors:
            fixed = [ax.size for ax in t.axes if ax.kind == FIXED]
            self.sizes[role(t, spec)] = channels * math.prod(fixed)
        self.out_features = sum(self.sizes[r] for r in self.roles)

    def forward(self, ws: WeightSpace) -> Tensor:
        spec = ws.spec
        nb = len(ws.batch_shape)
        sums: dict[str, list[Tensor]] = {}
        for t, x in zip(spec.tensors, ws.tensors):
            pool = [nb + a for a, ax in enumerate(t.axes) if ax.kind != FIXED]
            x = x.mean(dim=pool) if pool else x
            sums.setdefault(role(t, spec), []).append(x.reshape(*x.shape[:nb], -1))
        unknown = set(sums) - set(self.roles)
        if unknown:
            raise ValueError(f"InvariantPool was built without the roles {sorted(unknown)}")
        feats = []
        for r in self.roles:
            if r in sums:
                feats.append(torch.stack(sums[r]).mean(0))
            else:  # a role this network lacks contributes zeros
                feats.append(ws.tensors[0].new_zeros(*ws.batch_shape, self.sizes[r]))
        return torch.cat(feats, dim=-1)
