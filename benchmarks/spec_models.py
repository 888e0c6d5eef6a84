"""Models for the weight-space reading benchmark that no task family and no
test builds: a GPT-style LM (RMSNorm, separate query / key / value
projections, ``scaled_dot_product_attention``, tied embeddings) and a
bottleneck ResNet (BatchNorm, 1x1 projection shortcuts), so that what
``WeightSpaceSpec.from_module`` finds is checked on code it was not written
against. Each entry builds ``(model, inputs, targets)``; targets are class
indices (cross-entropy over the last axis)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.query = nn.Linear(d, d, bias=False)
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 3 * d, bias=False)
        self.down = nn.Linear(3 * d, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t = x.shape[0], x.shape[1]
        h = self.norm1(x)
        q = self.query(h).view(b, t, self.heads, -1).transpose(1, 2)
        k = self.key(h).view(b, t, self.heads, -1).transpose(1, 2)
        v = self.value(h).view(b, t, self.heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(b, t, -1))
        return x + self.down(F.silu(self.up(self.norm2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int = 50, context: int = 16, d: int = 32, heads: int = 4,
                 layers: int = 3) -> None:  # fmt: skip
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(context, d) * 0.02)
        self.blocks = nn.ModuleList(GPTBlock(d, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.tok.weight

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, c_mid: int, c_out: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_mid, 1, bias=False), nn.BatchNorm2d(c_mid)
        self.conv2 = nn.Conv2d(c_mid, c_mid, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_mid)
        self.conv3, self.bn3 = nn.Conv2d(c_mid, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.project = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        skip = x if self.project is None else self.project(x)
        return F.relu(h + skip)


class BottleneckResNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.blocks = nn.Sequential(
            Bottleneck(16, 8, 32), Bottleneck(32, 8, 32), Bottleneck(32, 16, 48)
        )
        self.fc = nn.Linear(48, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(h.mean((2, 3)))


def gpt() -> tuple[nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50, (8, 16), generator=g)
    return GPT(), idx, torch.randint(0, 50, (8, 16), generator=g)


def bottleneck_resnet() -> tuple[nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 12, 12, generator=g)
    return BottleneckResNet().train(), x, torch.randint(0, 10, (8,), generator=g)


MODELS: dict[str, Callable[[], tuple[nn.Module, Tensor, Tensor]]] = {
    "gpt-rmsnorm-tied": gpt,
    "resnet-bottleneck-bn": bottleneck_resnet,
}
