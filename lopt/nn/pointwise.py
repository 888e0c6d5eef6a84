"""Per-entry NF-layers: channel maps, activations and normalisation.

Each acts on the channel axis of every entry alone (or with statistics pooled
over a whole tensor), so it commutes with every permutation of neurons.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lopt.weightspace import WeightSpace


class PointwiseLinear(nn.Module):
    """The same ``nn.Linear`` over channels for every entry of every tensor."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, out_channels, bias=bias)

    def forward(self, ws: WeightSpace) -> WeightSpace:
        return ws.map(self.linear)


class PointwiseMLP(nn.Module):
    """A per-entry MLP over channels: Linear, activation, ..., Linear."""

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        out_channels: int,
        depth: int = 2,
        activation: Callable[[], nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        dims = [in_channels] + [hidden] * (depth - 1) + [out_channels]
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < depth - 1:
                layers.append(activation())
        self.net = nn.Sequential(*layers)

    def forward(self, ws: WeightSpace) -> WeightSpace:
        return ws.map(self.net)


class WSActivation(nn.Module):
    """An elementwise activation applied to every entry."""

    def __init__(self, fn: Callable[[Tensor], Tensor] | nn.Module = torch.relu) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, ws: WeightSpace) -> WeightSpace:
        return ws.map(self.fn)


class WSReLU(WSActivation):
    """ReLU on every entry (commutes with positive rescaling too)."""

    def __init__(self) -> None:
        super().__init__(torch.relu)


class WSTanh(WSActivation):
    """tanh on every entry (odd: commutes with sign flips too)."""

    def __init__(self) -> None:
        super().__init__(torch.tanh)


class WSNorm(nn.Module):
    """Equivariant normalisation: each tensor's channels are divided by their
    root mean square over that tensor's entries (a permutation-invariant
    statistic), then scaled per channel. ``center=True`` subtracts the mean too.
    """

    def __init__(self, channels: int, center: bool = False, eps: float = 1e-5) -> None:
        super().__init__()
        self.center, self.eps = center, eps
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))

    def forward(self, ws: WeightSpace) -> WeightSpace:
        def norm(x: Tensor, k: int) -> Tensor:
            dims = list(range(x.dim() - 1 - k, x.dim() - 1))
            if self.center:
                x = x - x.mean(dim=dims, keepdim=True)
            rms = x.pow(2).mean(dim=dims, keepdim=True).add(self.eps).sqrt()
            return x / rms * self.scale + self.shift

        return WeightSpace(ws.spec, [norm(x, len(t.view)) for t, x in zip(ws.spec, ws.tensors)])
