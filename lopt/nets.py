"""Optimizer nets: from per-entry features to an update for every parameter.

Every net outputs, per entry, a direction ``d`` and a log-magnitude ``m``;
the update is

    update = -(lr * adam_direction + step_mult * d * exp(mag_mult * m))

where ``adam_direction`` is Adam's bias-corrected m / sqrt(v) and ``lr``,
``step_mult`` are meta-learned scalars (stored as logs). The net learns a
correction on top of Adam (as the UNF paper's net does on top of SGD with
momentum), and its output layer starts near zero, so a fresh net is a sane,
slow optimizer. Every input is loss-scale invariant, so the update is too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lopt.features import NUM_FEATURES, NUM_STEP_FEATURES
from lopt.nn import NFLinear
from lopt.weightspace import WeightSpace, WeightSpaceSpec

MAX_LOG_MAGNITUDE = 10.0  # exp() of more than this is clipped: no overflow to inf


class OptimizerNet(nn.Module):
    """Base class: the update formula; subclasses define :meth:`body`."""

    def __init__(
        self,
        width: int = 16,
        depth: int = 2,
        lr: float = 1e-3,
        step_mult: float = 1e-3,
        mag_mult: float = 0.1,
        out_scale: float = 0.01,
    ) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"width and depth must be positive, got width={width}, depth={depth}")
        if lr <= 0 or step_mult <= 0:
            raise ValueError(f"lr and step_mult must be positive, got {lr}, {step_mult}")
        self._config = dict(
            width=width,
            depth=depth,
            lr=lr,
            step_mult=step_mult,
            mag_mult=mag_mult,
            out_scale=out_scale,
        )
        self.mag_mult = mag_mult
        self.log_lr = nn.Parameter(torch.tensor(math.log(lr)))
        self.log_step_mult = nn.Parameter(torch.tensor(math.log(step_mult)))
        self.inp = nn.Linear(NUM_FEATURES, width)
        self.step_inp = nn.Linear(NUM_STEP_FEATURES, width, bias=False)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.out = nn.Linear(width, 2)
        with torch.no_grad():
            self.out.weight.mul_(out_scale)
            self.out.bias.zero_()

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments: enough to rebuild the net."""
        return dict(self._config)

    def trunk(self, features: WeightSpace, step_features: Tensor) -> WeightSpace:
        """Per-entry layers: the step encoding enters as a bias of the first."""
        bias = self.step_inp(step_features)
        h = features.map(lambda x: torch.relu(self.inp(x) + bias))
        for layer in self.hidden:
            h = h.map(lambda x, layer=layer: torch.relu(layer(x)))
        return h

    def body(self, features: WeightSpace, step_features: Tensor) -> WeightSpace:
        """Two channels per entry: direction and log-magnitude."""
        raise NotImplementedError

    def forward(
        self, features: WeightSpace, step_features: Tensor, base: Sequence[Tensor]
    ) -> list[Tensor]:
        out = self.body(features, step_features)
        lr, step_mult = self.log_lr.exp(), self.log_step_mult.exp()
        updates = []
        for o, b in zip(out.tensors, base):
            d = o[..., 0].reshape(b.shape)
            m = o[..., 1].reshape(b.shape)
            learned = d * torch.exp((self.mag_mult * m).clamp(max=MAX_LOG_MAGNITUDE))
            updates.append(-(lr * b + step_mult * learned))
        return updates


class PerParamMLP(OptimizerNet):
    """Per-parameter MLP (learned_optimization's small_fc_lopt; "Deep Sets" in
    the UNF paper): the same features, no interaction across entries."""

    def body(self, features: WeightSpace, step_features: Tensor) -> WeightSpace:
        return self.trunk(features, step_features).map(self.out)


def template_specs() -> list[WeightSpaceSpec]:
    """The architectures whose roles an NFN net is built with: MLPs (any depth
    from 1, with and without biases), Conv1d / Conv2d nets with pooling and
    flatten heads, and standalone tensors of 1 to 4 axes (norms, embeddings)."""
    mlp = [nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)]
    nets: list[nn.Module] = [
        nn.Sequential(*mlp),
        nn.Sequential(nn.Linear(4, 3)),
        nn.Sequential(nn.Linear(4, 5, bias=False), nn.Linear(5, 5, bias=False)),
    ]
    for conv in (nn.Conv1d, nn.Conv2d):
        for head in ("pool", "flatten"):
            layers = [conv(2, 4, 3), conv(4, 4, 3), conv(4, 4, 3)]
            n_in = 4 if head == "pool" else 8
            nets.append(nn.Sequential(*layers, nn.Linear(n_in, 3)))
    specs = [WeightSpaceSpec.from_module(n) for n in nets]
    shapes = {f"standalone{k}": (3,) * k for k in range(1, 5)}
    axes = {name: (None,) * len(shape) for name, shape in shapes.items()}
    specs.append(WeightSpaceSpec.from_axes(axes, shapes))
    return specs


class NFNNet(OptimizerNet):
    """The NFN optimizer net: per-entry layers, then one permutation-equivariant
    NF-layer (role-tied, so it runs on any depth, width and kernel size) beside
    a per-entry output path. Tensors whose role the NF-layer does not know
    (exotic standalone tensors) are updated by the per-entry path alone.
    """

    def __init__(self, width: int = 16, depth: int = 2, **kwargs: Any) -> None:
        super().__init__(width, depth, **kwargs)
        self.nf = NFLinear(template_specs(), width, 2, strict=False)
        with torch.no_grad():
            for w in list(self.nf.weights.values()) + list(self.nf.biases.values()):
                w.mul_(kwargs.get("out_scale", 0.01))

    def body(self, features: WeightSpace, step_features: Tensor) -> WeightSpace:
        h = self.trunk(features, step_features)
        return h.map(self.out) + self.nf(h)


NETS: dict[str, type[OptimizerNet]] = {"PerParamMLP": PerParamMLP, "NFNNet": NFNNet}
