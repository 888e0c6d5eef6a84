import pytest
import torch
from helpers import architectures, make_cnn, make_mlp, random_perms, random_ws
from hypothesis import given, settings
from torch import nn

from lopt import WeightSpace, WeightSpaceSpec
from lopt.weightspace import FIXED, GROUP, HIDDEN, INPUT, LOCAL, OUTPUT


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_mlp_groups_are_linked():
    spec = WeightSpaceSpec.from_module(make_mlp([4, 5, 6, 3]))
    w1, b1, w2, b2, w3, b3 = spec.tensors
    assert [t.kind for t in spec] == ["weight", "bias"] * 3
    assert w1.axes[0].group == b1.axes[0].group == w2.axes[1].group
    assert w2.axes[0].group == b2.axes[0].group == w3.axes[1].group
    kinds = [spec.group_kind(g) for g in (w1.axes[1].group, w1.axes[0].group, w2.axes[0].group)]
    assert kinds == [INPUT, HIDDEN, HIDDEN]
    assert spec.group_kind(w3.axes[0].group) == OUTPUT
    assert (w1.axes[0].exponent, w1.axes[1].exponent, b1.axes[0].exponent) == (1, -1, 1)
    assert spec.numel == sum(p.numel() for p in make_mlp([4, 5, 6, 3]).parameters())


def test_cnn_flatten_view_and_global_pool():
    flat = WeightSpaceSpec.from_module(make_cnn([2, 3, 4], [3, 5], 2, "flatten", 5, True, 4))
    head = flat.tensors[4]
    assert head.shape == (5, 64) and head.view == (5, 4, 16)
    assert head.axes[1].group == flat.tensors[2].axes[0].group
    assert head.axes[2].kind == LOCAL
    assert [ax.kind for ax in flat.tensors[0].axes] == [GROUP, GROUP, LOCAL, LOCAL]
    pooled = WeightSpaceSpec.from_module(make_cnn([2, 3, 4], [3, 5], 1, "pool", 5))
    assert pooled.tensors[4].view == (5, 4)
    assert pooled.tensors[4].axes[1].group == pooled.tensors[2].axes[0].group


def test_from_shapes_matches_from_module():
    for model in (make_mlp([3, 7, 2]), make_cnn([1, 4, 6], [3, 3], 2, "flatten", 10, True, 3)):
        shapes = [p.shape for p in model.parameters()]
        names = [n for n, _ in model.named_parameters()]
        assert WeightSpaceSpec.from_shapes(shapes, names) == WeightSpaceSpec.from_module(model)


def test_unknown_parameters_become_standalone():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.fc = nn.Linear(4, 8)
            self.norm = nn.LayerNorm(8)
            self.odd = nn.Parameter(torch.zeros(2, 3, 4))
            self.out = nn.Linear(8, 3)

    spec = WeightSpaceSpec.from_module(Net())
    kinds = {t.name: t.kind for t in spec}
    assert kinds == {
        "emb.weight": "standalone",
        "fc.weight": "weight",
        "fc.bias": "bias",
        "norm.weight": "standalone",
        "norm.bias": "standalone",
        "odd": "standalone",
        "out.weight": "weight",
        "out.bias": "bias",
    }
    assert all(ax.kind == LOCAL for t in spec if t.kind == "standalone" for ax in t.axes)
    # The LayerNorm does not break the chain: out reads fc's neurons.
    by_name = {t.name: t for t in spec}
    assert by_name["out.weight"].axes[1].group == by_name["fc.weight"].axes[0].group
    # Nothing is dropped.
    assert len(spec) == len(list(Net().parameters()))


def test_hnp_fixes_inputs_and_outputs_only():
    spec = WeightSpaceSpec.from_module(make_mlp([4, 5, 3]), mode="hnp")
    w1, _, w2, b2 = spec.tensors
    assert (w1.axes[0].kind, w1.axes[1].kind) == (GROUP, FIXED)
    assert (w2.axes[0].kind, b2.axes[0].kind) == (FIXED, FIXED)
    assert set(spec.permutable_groups()) == {w1.axes[0].group}


@settings(max_examples=25, deadline=None)
@given(architectures())
def test_inferred_hidden_permutations_preserve_the_function(arch):
    model, in_shape = arch
    spec = WeightSpaceSpec.from_module(model)
    x = torch.randn(5, *in_shape)
    y = model(x)
    ws = WeightSpace.from_tensors(spec, params(model))
    permuted = ws.permute(random_perms(spec, hidden_only=True)).to_tensors()
    with torch.no_grad():
        for p, q in zip(model.parameters(), permuted):
            p.copy_(q)
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-4)


def test_explicit_spec_and_contradictions_name_the_parameter():
    axes = {"fc1.weight": ("h", "in"), "fc1.bias": ("h",), "fc2.weight": ("out", "h")}
    shapes = {"fc1.weight": (5, 3), "fc1.bias": (5,), "fc2.weight": (2, 5)}
    spec = WeightSpaceSpec.from_axes(axes, shapes, inputs=["in"], outputs=["out"])
    assert spec.group_kind("h") == HIDDEN and spec.group_kind("in") == INPUT
    with pytest.raises(ValueError, match=r"'fc2.weight'.*group 'h' has size 4"):
        WeightSpaceSpec.from_axes(axes, {**shapes, "fc2.weight": (2, 4)})
    with pytest.raises(ValueError, match="'fc1.bias' has shape \\(4,\\)"):
        spec.check([torch.zeros(5, 3), torch.zeros(4), torch.zeros(2, 5)])
    with pytest.raises(ValueError, match="2 parameters were given"):
        spec.check([torch.zeros(5, 3), torch.zeros(5)])
    with pytest.raises(ValueError, match="'rec' indexes neuron group 'h' on two axes"):
        WeightSpaceSpec.from_axes({"rec": ("h", "h")}, {"rec": (3, 3)})
    with pytest.raises(ValueError, match="'b' has axes but no shape"):
        WeightSpaceSpec.from_axes({"b": ("h",)}, {})
    with pytest.raises(ValueError, match="'fc1.weight': 1 axis names"):
        WeightSpaceSpec.from_axes({"fc1.weight": ("h",)}, {"fc1.weight": (5, 3)})
    with pytest.raises(ValueError, match="mode must be"):
        spec.with_mode("xyz")


def test_weightspace_conversions_round_trip():
    model = make_cnn([2, 3], [3], 2, "flatten", 4, True, 4)
    spec = WeightSpaceSpec.from_module(model)
    ps = params(model)
    ws = WeightSpace.from_tensors(spec, ps)
    assert ws.channels == 1 and ws.batch_shape == ()
    for p, q in zip(ps, ws.to_tensors()):
        assert torch.equal(p, q)
    grads = [torch.randn_like(p) for p in ps]
    two = WeightSpace.from_channels(spec, [ps, grads])
    assert two.channels == 2
    assert torch.equal(two.channel(1).to_tensors()[0], grads[0])
    cat = WeightSpace.cat([ws, WeightSpace.from_tensors(spec, grads)])
    for a, b in zip(cat.tensors, two.tensors):
        assert torch.equal(a, b)
    doubled = ws + ws
    assert torch.equal((2 * ws).tensors[2], doubled.tensors[2])
    assert torch.equal((doubled - ws).tensors[0], ws.tensors[0])
    with pytest.raises(ValueError, match="'0.weight' has shape"):
        WeightSpace.from_tensors(spec, [torch.zeros(1)] + ps[1:])
    with pytest.raises(ValueError, match="expected"):
        WeightSpace(spec, [torch.zeros(3)] * len(spec))


def test_weightspace_is_a_pytree_for_vmap():
    spec = WeightSpaceSpec.from_module(make_mlp([3, 4, 2]))
    ws = random_ws(spec, 2, batch=(5,))
    assert ws.batch_shape == (5,)
    out = torch.func.vmap(lambda w: w.map(lambda x: x.sum(-1, keepdim=True)) * 2.0)(ws)
    assert isinstance(out, WeightSpace) and out.batch_shape == (5,) and out.channels == 1
    torch.testing.assert_close(out.tensors[0], 2 * ws.tensors[0].sum(-1, keepdim=True))


def test_permute_rejects_bad_permutations():
    spec = WeightSpaceSpec.from_module(make_mlp([3, 4, 2]))
    ws = random_ws(spec, 1)
    with pytest.raises(ValueError, match="unknown neuron groups"):
        ws.permute({"nope": torch.arange(3)})
    g = next(iter(spec.hidden_groups()))
    with pytest.raises(ValueError, match=r"has shape \(3,\), the group needs \(4,\)"):
        ws.permute({g: torch.arange(3)})


def attention_spec():
    """Separate query / key / value projections of 3 heads of width 2, values
    of width 4, reading and writing 5 features (fixed: HNP), by hand."""
    axes = {
        "q": ("heads", "qk", "s"), "k": ("heads", "qk", "s"), "v": ("heads", "vd", "s"),
        "o": ("s", "heads", "vd"),
    }  # fmt: skip
    shapes = {"q": (6, 5), "k": (6, 5), "v": (12, 5), "o": (5, 12)}
    views = {"q": (3, 2, 5), "k": (3, 2, 5), "v": (3, 4, 5), "o": (5, 3, 4)}
    nested = {"qk": "heads", "vd": "heads"}
    return WeightSpaceSpec.from_axes(axes, shapes, ["s"], mode="hnp", views=views, nested=nested)


def attend(q, k, v, o, x):
    """Three heads of attention over the rows of ``x`` (the spec above)."""
    qx = torch.einsum("hds,ts->htd", q.view(3, 2, 5), x)
    kx = torch.einsum("hds,ts->htd", k.view(3, 2, 5), x)
    vx = torch.einsum("hds,ts->htd", v.view(3, 4, 5), x)
    heads = (qx @ kx.transpose(1, 2)).softmax(-1) @ vx  # (heads, rows, value dims)
    return heads.transpose(0, 1).reshape(x.shape[0], 12) @ o.T


def test_nested_groups_are_permuted_per_neuron_of_their_parent():
    spec = attention_spec()
    assert spec.nesting() == {"qk": "heads", "vd": "heads"}
    q, k, v, o = (torch.randn(t.shape) for t in spec.tensors)
    x = torch.randn(7, 5)
    out = attend(q, k, v, o, x)
    for seed in range(4):
        moved = spec.random_symmetry(torch.Generator().manual_seed(seed))([q, k, v, o])
        assert all(not torch.equal(a, b) for a, b in zip(moved, [q, k, v, o]))
        torch.testing.assert_close(attend(*moved, x), out, rtol=1e-5, atol=1e-5)
    # Each head draws its own permutation of its dimensions (4! = 24 each):
    # over a few draws, two heads differ.
    ws = WeightSpace.from_tensors(spec, [q, k, v, o])
    perms = torch.stack([torch.randperm(4) for _ in range(3)])
    moved = ws.permute({"vd": perms}).tensors[2][..., 0]
    for h in range(3):
        torch.testing.assert_close(moved[h], v.view(3, 4, 5)[h][perms[h]])
    with pytest.raises(ValueError, match=r"group 'vd' has shape \(4,\), the group needs \(3, 4\)"):
        ws.permute({"vd": torch.arange(4)})


def test_nesting_that_the_axes_do_not_allow_is_refused():
    spec = attention_spec()
    axes = {t.name: tuple(a.group for a in t.axes) for t in spec.tensors}
    shapes = {t.name: t.shape for t in spec.tensors}
    views = {t.name: t.view for t in spec.tensors}
    with pytest.raises(ValueError, match=r"'q': axis 0 \(group 'heads'\) is nested in group 'vd'"):
        WeightSpaceSpec.from_axes(axes, shapes, views=views, nested={"heads": "vd"})
    swapped = {**axes, "q": ("qk", "heads", "s")}
    with pytest.raises(ValueError, match="'q': axis 0 .* whose axis must come right before it"):
        WeightSpaceSpec.from_axes(swapped, shapes, views={**views, "q": (2, 3, 5)},
                                  nested={"qk": "heads", "vd": "heads"})  # fmt: skip
