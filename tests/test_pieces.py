"""Packed parameters read in pieces: a packed attention projection's
query-key rows and value rows, each with its own axes."""

import warnings

import pytest
import torch
from helpers import assert_fused_in_place_matches, random_state
from torch import nn

import lopt
from lopt import WeightSpaceSpec, functional, fused
from lopt.checkpoint import save
from lopt.nets import NFNNet
from lopt.weightspace import LOCAL, Axis, TensorSpec
from tasks.models import TransformerLM


def packed_models():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    return {
        "hand-written": TransformerLM(11, 6, 8, 2, 1),
        "torch-encoder": nn.Sequential(nn.Linear(3, 8), layer, nn.Linear(8, 4)),
    }


def local(name, shape, part=None):
    return TensorSpec(name, shape, shape, tuple(Axis(LOCAL, n) for n in shape), "standalone", part)


def test_pieces_must_tile_their_parameters_rows():
    ok = WeightSpaceSpec((local("w", (4, 3), (0, 4)), local("w", (2, 3), (4, 6))), ())
    assert ok.names == ["w"] and ok.parameter_shapes == [(6, 3)] and ok.has_pieces
    with pytest.raises(ValueError, match=r"'w'.*w\[5:7\] does not follow"):
        WeightSpaceSpec((local("w", (4, 3), (0, 4)), local("w", (2, 3), (5, 7))), ())
    with pytest.raises(ValueError, match="'w'.*differ past the first axis"):
        WeightSpaceSpec((local("w", (4, 3), (0, 4)), local("w", (2, 2), (4, 6))), ())


def test_split_gives_views_and_join_undoes_it():
    spec = WeightSpaceSpec.from_module(packed_models()["hand-written"])
    params = [p.detach() for p in packed_models()["hand-written"].parameters()]
    pieces = spec.split(params)
    assert len(pieces) == len(spec.tensors) > len(params)
    for t, x in zip(spec.tensors, pieces):
        assert tuple(x.shape) == t.shape
    qkv = spec.names.index("blocks.0.attn.qkv.weight")
    assert pieces[qkv].data_ptr() == params[qkv].data_ptr()  # a view, no copy
    for a, b in zip(spec.join(pieces), params):
        assert torch.equal(a, b)
    momenta = [torch.randn(4, *p.shape) for p in params]
    for a, b in zip(spec.join(spec.split(momenta, dim=1), dim=1), momenta):
        assert torch.equal(a, b)


def test_a_wrong_shape_names_the_packed_parameter_and_nothing_changes():
    spec = WeightSpaceSpec.from_module(packed_models()["torch-encoder"])
    params = [torch.zeros(s) for s in spec.parameter_shapes]
    i = spec.names.index("1.self_attn.in_proj_weight")
    bad = list(params)
    bad[i] = torch.zeros(23, 8)
    with pytest.raises(ValueError, match=r"'1.self_attn.in_proj_weight' has shape \(23, 8\).*"
                       r"says \(24, 8\).*in_proj_weight\[0:16\]"):  # fmt: skip
        lopt.WeightSpace.from_tensors(spec, bad)
    assert params[i].shape == (24, 8) and not params[i].any()


def test_separate_weights_with_a_packed_bias_cut_only_the_bias():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, kdim=5, vdim=6, batch_first=True)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.mem, self.attn = nn.Linear(3, 8), nn.Linear(3, 5), mha
            self.val, self.head = nn.Linear(3, 6), nn.Linear(8, 2)

        def forward(self, x, m):
            return self.head(self.attn(self.inp(x), self.mem(m), self.val(m))[0])

    model = Cross()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = WeightSpaceSpec.from_module(model, mode="hnp")
    by_label = {t.label: t for t in spec.tensors}
    qk, v = by_label["attn.in_proj_bias[0:16]"], by_label["attn.in_proj_bias[16:24]"]
    assert qk.view == (2, 2, 4) and v.view == (2, 4)
    assert by_label["attn.q_proj_weight"].axes[1] == qk.axes[2]
    assert by_label["attn.v_proj_weight"].axes[1] == v.axes[1] != qk.axes[2]
    assert by_label["attn.out_proj.weight"].axes[2].group == v.axes[1].group
    x, m = torch.randn(2, 4, 3), torch.randn(2, 5, 3)
    params = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        before = model(x, m)
        for p, q in zip(model.parameters(), spec.random_symmetry(torch.Generator())(params)):
            p.copy_(q)
        torch.testing.assert_close(model(x, m), before, rtol=1e-5, atol=1e-6)


def apart(spec: WeightSpaceSpec) -> WeightSpaceSpec:
    """The same tensors as parameters of their own (a naive reference)."""
    tensors = tuple(
        TensorSpec(t.label, t.shape, t.view, t.axes, t.kind) for t in spec.tensors
    )  # fmt: skip
    return WeightSpaceSpec(tensors, spec.group_kinds, spec.mode)


def strong_net(attention_roles=True):
    torch.manual_seed(3)
    net = NFNNet(depth=1, out_scale=1.0, step_mult=1e-2, lr=1e-4, neuron_stats=True,
                 attention_roles=attention_roles)  # fmt: skip
    with torch.no_grad():
        net.stat_weight.normal_(std=0.3)
    return net


@pytest.mark.parametrize("name", ["hand-written", "torch-encoder"])
def test_a_packed_parameter_updates_as_its_pieces_would_apart(name):
    model = packed_models()[name]
    spec = WeightSpaceSpec.from_module(model)
    assert spec.has_pieces
    net = strong_net()
    params = [p.detach().clone() for p in model.parameters()]
    grads = [torch.randn_like(p) for p in params]
    state = random_state(params, 1, step=5.0)
    ref_state = {
        **state,
        "momenta": spec.split(state["momenta"], dim=1),
        "second_moment": spec.split(state["second_moment"]),
    }
    with torch.no_grad():
        out, new = functional.update(net, spec, None, grads, state, params)
        ref, ref_new = functional.update(
            net, apart(spec), None, spec.split(grads), ref_state, spec.split(params)
        )
    for a, b, p in zip(out, spec.join(ref), params):
        assert a.shape == p.shape
        torch.testing.assert_close(a, b)
    for a, b in zip(new["momenta"], spec.join(ref_new["momenta"], dim=1)):
        torch.testing.assert_close(a, b)
    for a, b in zip(new["second_moment"], spec.join(ref_new["second_moment"])):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not fused.available(), reason="no fused kernel")
@pytest.mark.parametrize("name", ["hand-written", "torch-encoder"])
@pytest.mark.parametrize("attention_roles", [True, False])
def test_the_fused_in_place_step_equals_the_torch_path_on_pieces(name, attention_roles):
    model = packed_models()[name]
    spec = WeightSpaceSpec.from_module(model)
    net = strong_net(attention_roles)
    params = [p.detach().clone() for p in model.parameters()]
    grads = [torch.randn_like(p) for p in params]
    assert_fused_in_place_matches(net, spec, params, grads, random_state(params, 2, step=5.0))


def test_a_version_4_attention_net_loads_with_zeros_for_the_new_roles(tmp_path):
    net = NFNNet(width=4, neuron_stats=True)
    path = tmp_path / "v4.pt"
    save(net, path)
    payload = torch.load(path, weights_only=True)
    state = payload["state_dict"]
    new_roles = [k for k in state if k.startswith("nf.weights.")][:3]
    for k in new_roles:
        del state[k]
    state["nf.weights.old<-role"] = torch.ones(4, 2)
    payload["version"] = 4
    torch.save(payload, path)
    loaded, _ = lopt.checkpoint.load(path)
    ours = loaded.state_dict()
    assert "nf.weights.old<-role" not in ours
    for k in new_roles:
        assert not ours[k].any()
    for k, v in state.items():
        if k in ours:
            assert torch.equal(ours[k], v)
    payload["version"] = 5  # from this version on, a missing role is an error
    torch.save(payload, path)
    with pytest.raises(ValueError, match="weights do not fit"):
        lopt.checkpoint.load(path)


def test_scalar_constants_are_made_once_and_zero_dimensional():
    from lopt.features import scalar_constant

    a = scalar_constant(1e-8, torch.device("cpu"))
    assert a.dim() == 0 and a.dtype == torch.float32 and a.item() == pytest.approx(1e-8)
    assert scalar_constant(1e-8, "cpu") is a  # no new tensor, and no new view, per call
    assert scalar_constant(2.0, "cpu") is not a
