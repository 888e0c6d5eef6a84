"""Role-tied NF-layers: one set of weights for every depth, width and kernel size."""

import pytest
import torch
from helpers import assert_ws_close, make_cnn, make_mlp, random_perms, random_ws
from torch import nn

from lopt import WeightSpaceSpec
from lopt.nn import InvariantPool, NFLinear, WSReLU


def stack(spec):
    return nn.Sequential(NFLinear(spec, 2, 8), WSReLU(), NFLinear(spec, 8, 1))


def test_layer_trained_on_one_depth_runs_on_others():
    torch.manual_seed(0)
    train_spec = WeightSpaceSpec.from_module(make_mlp([3, 5, 5, 2]))
    net = stack(train_spec)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    # Learn an equivariant target: channel 0 minus the row mean of channel 1.
    for _ in range(50):
        ws = random_ws(train_spec, 2)
        target = [
            x[..., :1] - x[..., 1:].mean(dim=-2, keepdim=True) if x.dim() == 3 else x[..., :1]
            for x in ws.tensors
        ]
        loss = sum(((y - t) ** 2).mean() for y, t in zip(net(ws).tensors, target))
        opt.zero_grad()
        loss.backward()
        opt.step()
    weights_before = {k: v.clone() for k, v in net.state_dict().items()}
    for widths in ([3, 2], [3, 9, 2], [3, 2, 7, 4, 2], [6, 16, 16, 16, 16, 3]):
        spec = WeightSpaceSpec.from_module(make_mlp(widths))
        if len(widths) == 2:  # depth 1 has a role (input -> output) depth 3 lacks
            with pytest.raises(ValueError, match="no weights for these roles"):
                net(random_ws(spec, 2))
            continue
        ws = random_ws(spec, 2)
        out = net(ws)
        assert [x.shape[:-1] for x in out.tensors] == [t.view for t in spec.tensors]
        assert all(torch.isfinite(x).all() for x in out.tensors)
        perms = random_perms(spec)
        assert_ws_close(net(ws.permute(perms)), out.permute(perms))
    for k, v in net.state_dict().items():
        assert torch.equal(v, weights_before[k])


def test_built_from_several_specs_runs_on_all():
    specs = [WeightSpaceSpec.from_module(make_mlp(w)) for w in ([3, 4, 2], [3, 4, 4, 2], [3, 2])]
    net = stack(specs)
    for spec in specs:
        net(random_ws(spec, 2))


def test_conv_layers_serve_any_kernel_size_and_channels():
    spec = WeightSpaceSpec.from_module(make_cnn([1, 4, 4], [3, 3], 2, "pool", 10))
    net = stack(spec)
    pool = InvariantPool(spec, 1)
    other = WeightSpaceSpec.from_module(make_cnn([1, 8, 16], [5, 7], 2, "pool", 10))
    ws = random_ws(other, 2)
    out = net(ws)
    assert out.tensors[0].shape == (8, 1, 5, 5, 1)
    assert pool(out).shape == (pool.out_features,)


def test_bad_inputs_are_named():
    spec = WeightSpaceSpec.from_module(make_mlp([3, 4, 2]))
    with pytest.raises(ValueError, match="expected 2 channels, got 3"):
        NFLinear(spec, 2, 2)(random_ws(spec, 3))
    with pytest.raises(ValueError, match="channels must be positive"):
        NFLinear(spec, 0, 2)
    with pytest.raises(ValueError, match="tie must be"):
        NFLinear(spec, 1, 1, tie="layer")


def test_population_of_layers_under_vmap_matches_a_loop():
    """Meta-training vmaps one layer over a population of weight sets."""
    spec = WeightSpaceSpec.from_module(make_mlp([3, 4, 4, 2]))
    layer = stack(spec)
    population = [stack(spec).state_dict() for _ in range(3)]
    stacked = {k: torch.stack([p[k] for p in population]) for k in population[0]}
    ws = random_ws(spec, 2)

    def run(params, x):
        return torch.func.functional_call(layer, params, (x,))

    batched = torch.func.vmap(run, in_dims=(0, None))(stacked, ws)
    for i, params in enumerate(population):
        single = run(params, ws)
        for a, b in zip(batched.tensors, single.tensors):
            torch.testing.assert_close(a[i], b)
