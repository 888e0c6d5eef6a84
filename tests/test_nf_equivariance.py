"""Property tests: every NF-layer commutes with neuron permutations (and the
monomial layers with rescaling / sign flips), on random MLPs and CNNs."""

import pytest
import torch
from helpers import architectures, assert_ws_close, make_mlp, random_perms, random_ws, rescale
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lopt import WeightSpaceSpec
from lopt.nn import (
    InvariantPool,
    NFLinear,
    PointwiseLinear,
    PointwiseMLP,
    ScaleNFLinear,
    SignNFLinear,
    WSNorm,
    WSReLU,
    WSTanh,
)

LAYERS = ["nf-role", "nf-none", "pointwise", "mlp", "norm", "stack"]


def build(kind: str, spec, c_in: int, c_out: int) -> nn.Module:
    if kind == "nf-role":
        return NFLinear(spec, c_in, c_out)
    if kind == "nf-none":
        return NFLinear(spec, c_in, c_out, tie="none")
    if kind == "pointwise":
        return PointwiseLinear(c_in, c_out)
    if kind == "mlp":
        return PointwiseMLP(c_in, 8, c_out)
    if kind == "norm":
        return nn.Sequential(WSNorm(c_in, center=True), PointwiseLinear(c_in, c_out))
    return nn.Sequential(
        NFLinear(spec, c_in, 6), WSReLU(), WSNorm(6), NFLinear(spec, 6, c_out), WSTanh()
    )


@settings(max_examples=40, deadline=None)
@given(
    arch=architectures(),
    mode=st.sampled_from(["np", "hnp"]),
    kind=st.sampled_from(LAYERS),
    channels=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    batch=st.sampled_from([(), (2,)]),
    seed=st.integers(0, 2**16),
)
def test_layers_commute_with_permutations(arch, mode, kind, channels, batch, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    spec = WeightSpaceSpec.from_module(arch[0], mode=mode)
    layer = build(kind, spec, *channels)
    ws = random_ws(spec, channels[0], batch, g)
    perms = random_perms(spec, g)  # NP: inputs / outputs too; HNP: hidden only
    assert_ws_close(layer(ws.permute(perms)), layer(ws).permute(perms))


@settings(max_examples=30, deadline=None)
@given(arch=architectures(), mode=st.sampled_from(["np", "hnp"]), seed=st.integers(0, 2**16))
def test_invariant_pool(arch, mode, seed):
    g = torch.Generator().manual_seed(seed)
    spec = WeightSpaceSpec.from_module(arch[0], mode=mode)
    pool = InvariantPool(spec, 3)
    ws = random_ws(spec, 3, (4,), g)
    out = pool(ws)
    assert out.shape == (4, pool.out_features)
    torch.testing.assert_close(pool(ws.permute(random_perms(spec, g))), out)


@settings(max_examples=30, deadline=None)
@given(
    arch=architectures(),
    mode=st.sampled_from(["np", "hnp"]),
    symmetry=st.sampled_from(["scale", "sign"]),
    seed=st.integers(0, 2**16),
)
def test_monomial_layers_commute_with_rescaling_and_permutation(arch, mode, symmetry, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    spec = WeightSpaceSpec.from_module(arch[0], mode=mode)
    if symmetry == "scale":
        layer = nn.Sequential(ScaleNFLinear(spec, 2, 4), WSReLU(), ScaleNFLinear(spec, 4, 2))
        scales = {k: torch.rand(n, generator=g) * 3 + 0.1 for k, n in spec.hidden_groups().items()}
    else:
        layer = nn.Sequential(SignNFLinear(spec, 2, 4), WSTanh(), SignNFLinear(spec, 4, 2))
        scales = {
            k: torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
            for k, n in spec.hidden_groups().items()
        }
    ws = random_ws(spec, 2, (), g)
    assert_ws_close(layer(rescale(ws, scales)), rescale(layer(ws), scales), atol=1e-4)
    perms = random_perms(spec, g)
    assert_ws_close(layer(ws.permute(perms)), layer(ws).permute(perms))


def test_plain_nf_layer_is_not_scale_equivariant():
    """The monomial test above can fail: the general layer breaks it."""
    torch.manual_seed(0)
    spec = WeightSpaceSpec.from_module(make_mlp([3, 4, 4, 2]))
    layer = NFLinear(spec, 2, 2)
    ws = random_ws(spec, 2)
    scales = {k: torch.rand(n) * 3 + 0.1 for k, n in spec.hidden_groups().items()}
    with pytest.raises(AssertionError):
        assert_ws_close(layer(rescale(ws, scales)), rescale(layer(ws), scales))


def test_monomial_layers_keep_fewer_terms():
    spec = WeightSpaceSpec.from_module(make_mlp([3, 4, 5, 2]))
    full = NFLinear(spec, 1, 1)
    scale, sign = ScaleNFLinear(spec, 1, 1), SignNFLinear(spec, 1, 1)
    assert len(scale.weights) < len(sign.weights) < len(full.weights)
    # The sign layer may read the next layer's columns into a bias (s^-1 = s).
    assert any(k == "h<-p,t0" for k in sign.weights)
    assert not any(k == "h<-p,t0" for k in scale.weights)
