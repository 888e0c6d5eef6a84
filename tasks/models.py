"""MLP and CNN definitions for tasks: plain ``nn.Sequential`` stacks, so the
optimizers infer their weight spaces from the layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Sin(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(x)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sin": Sin,
}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


def _positive(arg: str, values: Sequence[int]) -> None:
    for v in values:
        if int(v) < 1:
            raise ValueError(f"{arg} must all be >= 1, got {list(values)}")


def mlp(
    in_features: int,
    widths: Sequence[int],
    out_features: int,
    activation: str = "relu",
    bias: bool = True,
) -> nn.Sequential:
    """Flatten, then Linear layers of the hidden ``widths`` (may be empty), then
    a Linear head of ``out_features``."""
    _positive("widths", widths)
    _positive("in_features / out_features", [in_features, out_features])
    dims = [in_features, *widths, out_features]
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(dims) - 2:
            layers.append(_activation(activation))
    return nn.Sequential(*layers)


def cnn(
    in_shape: Sequence[int],
    channels: Sequence[int],
    kernels: Sequence[int],
    out_features: int,
    strides: Sequence[int] | None = None,
    activation: str = "relu",
    bias: bool = True,
) -> nn.Sequential:
    """Conv1d (``in_shape = (C, L)``) or Conv2d (``(C, H, W)``) layers with
    'same'-style padding, global average pooling, then a Linear head."""
    if len(in_shape) not in (2, 3):
        raise ValueError(f"in_shape must be (C, L) or (C, H, W), got {tuple(in_shape)}")
    if not channels:
        raise ValueError("channels must name at least one conv layer")
    if len(kernels) != len(channels):
        raise ValueError(f"kernels has {len(kernels)} entries for {len(channels)} channels")
    strides = list(strides) if strides is not None else [1] * len(channels)
    if len(strides) != len(channels):
        raise ValueError(f"strides has {len(strides)} entries for {len(channels)} channels")
    _positive("channels", channels)
    _positive("kernels", kernels)
    _positive("strides", strides)
    conv = nn.Conv1d if len(in_shape) == 2 else nn.Conv2d
    pool = nn.AdaptiveAvgPool1d(1) if len(in_shape) == 2 else nn.AdaptiveAvgPool2d(1)
    layers: list[nn.Module] = []
    c_in = in_shape[0]
    for c, k, s in zip(channels, kernels, strides):
        layers += [conv(c_in, c, k, stride=s, padding=k // 2, bias=bias), _activation(activation)]
        c_in = c
    layers += [pool, nn.Flatten(), nn.Linear(c_in, out_features, bias=bias)]
    return nn.Sequential(*layers)
