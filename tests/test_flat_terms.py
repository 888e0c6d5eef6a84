"""The NF-layer's broadcast terms in a fixed number of operations, against
the per-term path."""

import pytest
import torch
from helpers import architectures
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lopt import WeightSpaceSpec
from lopt.nets import template_specs
from lopt.nn import NFLinear
from tasks.models import ResNet, TransformerLM


def summed(terms, view, channels):
    """The terms broadcast to the whole tensor and added."""
    total = torch.zeros(*view, channels)
    for t in terms:
        total = total + t
    return total


def random_pooled(layer, spec, channels, seed):
    g = torch.Generator().manual_seed(seed)
    pooled = {}
    for i, pools in layer.pools_needed(spec).items():
        view = spec.tensors[i].view
        for p in pools:
            shape = [n for a, n in enumerate(view) if a not in p]
            pooled[(i, p)] = torch.randn(*shape, channels, generator=g)
    return pooled


def check(spec, layer, seed=0, flat_expected=True):
    pooled = random_pooled(layer, spec, layer.in_channels, seed)
    plain = layer.broadcast_terms(spec, pooled)
    flat = layer.broadcast_terms(spec, pooled, flat=True)
    assert (layer.flat_plan(spec) is not None) == flat_expected
    c = layer.out_channels
    for a, b, t in zip(plain, flat, spec.tensors):
        torch.testing.assert_close(summed(b, t.view, c), summed(a, t.view, c), atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(arch=architectures(), channels=st.integers(1, 3), seed=st.integers(0, 999))
def test_flat_terms_equal_the_per_term_path_on_random_networks(arch, channels, seed):
    module, _ = arch
    spec = WeightSpaceSpec.from_module(module)
    torch.manual_seed(seed)
    check(spec, NFLinear(spec, channels, 2), seed)


@pytest.mark.parametrize("name", ["resnet", "transformer", "torch-encoder"])
def test_flat_terms_equal_the_per_term_path_on_role_tied_layers(name):
    torch.manual_seed(0)
    model = {
        "resnet": lambda: ResNet((1, 8, 8), 4, 2, 3),
        "transformer": lambda: TransformerLM(7, 4, 8, 2, 2),
        "torch-encoder": lambda: nn.Sequential(
            nn.Linear(3, 8), nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), nn.Linear(8, 2)
        ),
    }[name]()
    spec = WeightSpaceSpec.from_module(model)
    # The NFN nets' layer: role-tied, built on the templates, pointwise terms left out.
    layer = NFLinear(template_specs(True), 3, 1, strict=False)
    with torch.no_grad():
        for w in list(layer.weights.values()) + list(layer.biases.values()):
            w.normal_()
    check(spec, layer)


def test_fixed_axes_keep_the_per_term_path():
    module = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    spec = WeightSpaceSpec.from_module(module, mode="hnp")
    check(spec, NFLinear(spec, 2, 2), flat_expected=False)
