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


def _norm(kind: str, channels: int, dims: int) -> nn.Module:
    """BatchNorm over the batch's statistics only (no running buffers), so a
    task's loss stays a pure function of its parameters and batch."""
    if kind == "batch":
        cls = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        return cls(channels, track_running_stats=False)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch' or 'none', got {kind!r}")


class ResidualBlock(nn.Module):
    """``act(x + norm(conv(act(norm(conv(x))))))``: the basic ResNet block at
    one width (the skip is the identity)."""

    def __init__(self, width: int, kernel: int, dims: int, norm: str, activation: str) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.conv1 = conv(width, width, kernel, padding=kernel // 2, bias=False)
        self.norm1 = _norm(norm, width, dims)
        self.conv2 = conv(width, width, kernel, padding=kernel // 2, bias=False)
        self.norm2 = _norm(norm, width, dims)
        self.act = _activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.norm1(self.conv1(x)))
        return self.act(x + self.norm2(self.conv2(h)))


class ResNet(nn.Module):
    """A residual CNN: a conv stem with its norm, ``blocks`` residual blocks
    at the stem's width (one residual stream), global average pooling and a
    Linear head. Conv1d for ``in_shape = (C, L)``, Conv2d for ``(C, H, W)``."""

    def __init__(
        self,
        in_shape: Sequence[int],
        width: int,
        blocks: int,
        out_features: int,
        kernel: int = 3,
        norm: str = "batch",
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if len(in_shape) not in (2, 3):
            raise ValueError(f"in_shape must be (C, L) or (C, H, W), got {tuple(in_shape)}")
        _positive("width / blocks / kernel", [width, blocks, kernel])
        dims = len(in_shape) - 1
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.stem = conv(in_shape[0], width, kernel, padding=kernel // 2, bias=False)
        self.stem_norm = _norm(norm, width, dims)
        self.act = _activation(activation)
        self.blocks = nn.Sequential(
            *(ResidualBlock(width, kernel, dims, norm, activation) for _ in range(blocks))
        )
        self.head = nn.Linear(width, out_features)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.act(self.stem_norm(self.stem(x))))
        return self.head(h.flatten(2).mean(-1))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a packed query-key-value
    projection (as GPT-2 writes it)."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        # Shapes read by index, not unpacked, so torch.fx can trace it.
        b, t, d = x.shape[0], x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (batch, heads, positions, head width)
        # Written out rather than scaled_dot_product_attention, whose CPU
        # kernels have no vmap batching rule (a population runs as a loop).
        scores = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        future = scores.new_ones((t, t), dtype=torch.bool).triu(1)
        y = scores.masked_fill(future, float("-inf")).softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    """A pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x +
    mlp(ln(x))`` with a GELU MLP of 4x the width."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.act = nn.GELU()
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(self.act(self.fc(self.ln2(x))))


class TransformerLM(nn.Module):
    """A small causal transformer language model: token and learned position
    embeddings, pre-LN blocks, a final LayerNorm and an (untied) Linear head
    over the vocabulary. Reads ``(batch, context)`` token ids, returns
    ``(batch, context, vocab)`` logits."""

    def __init__(self, vocab: int, context: int, d_model: int, heads: int, layers: int) -> None:
        super().__init__()
        _positive("vocab / context / d_model / heads / layers", [vocab, context, d_model, heads])
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.Sequential(*(TransformerBlock(d_model, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        positions = torch.arange(idx.shape[-1], device=idx.device)
        h = self.blocks(self.tok(idx) + self.pos(positions))
        return self.head(self.ln(h))


def autoencoder(in_features: int, widths: Sequence[int], activation: str = "relu") -> nn.Sequential:
    """An MLP autoencoder: Flatten, Linear layers through the hidden ``widths``
    (the middle one is the bottleneck), and a Linear layer back to
    ``in_features`` (trained with mean squared error on its own input)."""
    if not widths:
        raise ValueError("widths must name at least the bottleneck")
    return mlp(in_features, widths, in_features, activation)
