"""Tensors kept across calls, made inside ``torch.func`` transforms.

Meta-training calls the optimizer net under ``vmap`` and ``grad``, and the
net keeps index tensors and constants in caches on first use. A tensor made
from data under ``grad`` (``torch.tensor``) is wrapped for that transform
and dies with it; kept in a cache, it breaks every later call outside.
:func:`outside_transforms` runs the code that makes such tensors as if no
transform were active.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def outside_transforms() -> Iterator[None]:
    """Within the block, no ``torch.func`` transform is active: the tensors
    it makes are plain. The transforms are back afterwards."""
    functorch = torch._C._functorch
    layers = []
    try:
        while functorch.peek_interpreter_stack() is not None:
            layers.append(functorch.pop_dynamic_layer_stack())
        yield
    finally:
        for layer in reversed(layers):
            functorch.push_dynamic_layer_stack(layer)
