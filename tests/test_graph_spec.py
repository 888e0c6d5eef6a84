"""Weight-space specs read from the traced graph: residual streams,
normalisation, embeddings; the spec's random symmetry."""

import copy
import warnings

import pytest
import torch
from helpers import architectures
from hypothesis import given, settings
from torch import nn
from torch.nn import functional as F

import lopt
from lopt import WeightSpace, WeightSpaceSpec
from lopt.nn import NFLinear
from lopt.weightspace import GROUP
from tasks.models import ResNet, TransformerLM


class PostLN(nn.Module):
    """A post-LayerNorm encoder block stack (not causal), written by hand."""

    def __init__(self, d=8, layers=2):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"fc": nn.Linear(d, 2 * d), "out": nn.Linear(2 * d, d),
                           "ln": nn.LayerNorm(d)})
            for _ in range(layers)
        )  # fmt: skip
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b["ln"](h + b["out"](F.gelu(b["fc"](h))))
        return self.head(h)


class TiedLM(nn.Module):
    """A small LM whose output layer is its token embedding (tied weights)."""

    def __init__(self, vocab=9, d=6):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, 2 * d)
        self.out = nn.Linear(2 * d, d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx):
        h = self.tok(idx)
        h = h + self.out(F.gelu(self.fc(h)))
        return self.head(self.ln(h))


def models():
    """Models with every parameter drawn at random (norm scales of 1 and
    shifts of 0 would hide a permutation)."""
    torch.manual_seed(0)
    built = {
        "resnet-bn-2d": (ResNet((2, 6, 6), 8, 2, 4), torch.randn(5, 2, 6, 6)),
        "resnet-bn-1d": (ResNet((1, 12), 6, 3, 3, activation="gelu"), torch.randn(4, 1, 12)),
        "transformer-causal": (TransformerLM(11, 7, 8, 2, 2), torch.randint(0, 11, (3, 7))),
        "post-ln": (PostLN(), torch.randn(4, 6, 5)),
        "tied-embeddings": (TiedLM(), torch.randint(0, 9, (3, 5))),
    }
    with torch.no_grad():
        for model, _ in built.values():
            for p in model.parameters():
                p.normal_(0, 0.5)
    return built


def load(model, tensors):
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p, x in zip(twin.parameters(), tensors):
            p.copy_(x)
    return twin


@settings(max_examples=40, deadline=None)
@given(architectures())
def test_plain_stacks_get_the_sequential_rules_spec(arch):
    model, _ = arch
    assert WeightSpaceSpec.from_module(model) == WeightSpaceSpec.from_module(model, graph=False)


@pytest.mark.parametrize("name", list(models()))
def test_a_random_symmetry_leaves_the_output_unchanged_and_moves_nearly_every_tensor(name):
    model, x = models()[name]
    spec = WeightSpaceSpec.from_module(model, mode="hnp")
    params = [p.detach() for p in model.parameters()]
    for seed in range(3):
        moved = spec.random_symmetry(torch.Generator().manual_seed(seed))(params)
        torch.testing.assert_close(load(model, moved)(x), model(x), rtol=1e-5, atol=1e-5)
        changed = sum(not torch.equal(a, b) for a, b in zip(moved, params))
        assert changed >= 0.9 * len(params), (changed, len(params))


def stream_members(spec, group):
    return {t.name for t in spec.tensors for ax in t.axes if ax.kind == GROUP and ax.group == group}


def test_a_resnets_stream_is_one_group_with_its_norms():
    model, _ = models()["resnet-bn-2d"]
    spec = WeightSpaceSpec.from_module(model)
    stream = spec.tensors[0].axes[0].group  # the stem writes the stream
    members = stream_members(spec, stream)
    want = {"stem.weight", "stem_norm.weight", "stem_norm.bias", "head.weight"}
    for b in range(2):
        want |= {f"blocks.{b}.conv1.weight", f"blocks.{b}.conv2.weight"}
        want |= {f"blocks.{b}.norm2.weight", f"blocks.{b}.norm2.bias"}
    assert members == want
    inner = spec.tensors[[t.name for t in spec.tensors].index("blocks.0.norm1.weight")]
    assert inner.axes[0].group != stream and inner.kind == "bias"


def test_a_transformers_stream_embeddings_and_norms():
    model, _ = models()["transformer-causal"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = WeightSpaceSpec.from_module(model)
    by_name = {t.name: t for t in spec.tensors}
    stream = by_name["tok.weight"].axes[1].group
    members = stream_members(spec, stream)
    touching = ["ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.proj.weight"]
    touching += ["attn.proj.bias", "ln2.weight", "fc.weight", "out.weight", "out.bias"]
    for b in range(2):
        for p in touching:
            assert f"blocks.{b}.{p}" in members, p
    assert {"tok.weight", "pos.weight", "ln.weight", "ln.bias", "head.weight"} <= members
    assert spec.group_kind(by_name["tok.weight"].axes[0].group) == "input"
    # Attention's heads are not read yet: the query-key-value rows and the
    # output projection's columns stay local, and the warning says so.
    assert by_name["blocks.0.attn.qkv.weight"].axes[0].kind == "local"
    assert by_name["blocks.0.attn.proj.weight"].axes[1].kind == "local"
    (w,) = [c for c in caught if "does not follow" in str(c.message)]
    assert "reshape" in str(w.message) and "blocks.0.attn.qkv.weight" in str(w.message)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: torch.fx cannot trace it
            x = -x
        return self.b(self.a(x))


def test_an_untraceable_module_falls_back_with_a_warning():
    model = Branchy()
    with pytest.warns(UserWarning, match="Branchy could not be traced .* sequential rule"):
        spec = WeightSpaceSpec.from_module(model)
    assert spec == WeightSpaceSpec.from_module(model, graph=False)


@pytest.mark.parametrize("name", ["resnet-bn-2d", "transformer-causal"])
def test_nf_layer_is_equivariant_to_the_symmetry(name):
    model, _ = models()[name]
    spec = WeightSpaceSpec.from_module(model)
    torch.manual_seed(1)
    layer = NFLinear(spec, 2, 3)
    params = [p.detach() for p in model.parameters()]
    noise = [torch.randn_like(p) for p in params]
    sym = spec.random_symmetry(torch.Generator().manual_seed(4))
    out = layer(WeightSpace.from_channels(spec, [params, noise])).tensors
    moved = layer(WeightSpace.from_channels(spec, [sym(params), sym(noise)])).tensors
    for t, a, b in zip(spec.tensors, out, moved):
        want = sym_one(spec, sym, t, a)
        torch.testing.assert_close(b, want, rtol=1e-4, atol=1e-5)


def sym_one(spec, sym, t, channels_last):
    """The symmetry applied to one tensor's channels, channel by channel."""
    i = spec.tensors.index(t)
    out = []
    for c in range(channels_last.shape[-1]):
        xs = [torch.zeros(s.shape) for s in spec.tensors]
        xs[i] = channels_last[..., c].reshape(t.shape)
        out.append(sym(xs)[i].reshape(t.view))
    return torch.stack(out, -1)


@pytest.mark.parametrize("name", ["resnet-bn-2d", "transformer-causal"])
def test_the_optimizers_steps_commute_with_the_symmetry(name):
    """NFNOptimizer(params, model=model) reads the graph's spec; training the
    moved model moves the trajectory the same way."""
    model, x = models()[name]
    spec = WeightSpaceSpec.from_module(model, mode="hnp")
    sym = spec.random_symmetry(torch.Generator().manual_seed(2))
    twin = load(model, sym([p.detach() for p in model.parameters()]))
    torch.manual_seed(3)
    net = lopt.NFNNet(out_scale=1.0, step_mult=1e-2)
    target = torch.randn_like(model(x))
    for m in (model, twin):
        opt = lopt.NFNOptimizer(m.parameters(), net=net, model=m)
        for _ in range(3):
            opt.zero_grad()
            F.mse_loss(m(x), target).backward()
            opt.step()
    moved = sym([p.detach() for p in model.parameters()])
    for (n, _), a, b in zip(model.named_parameters(), moved, twin.parameters()):
        if n.endswith("qkv.bias"):
            # The key bias's gradient is zero up to rounding (softmax ignores
            # a shift of the scores), and Adam's g / |g| magnifies rounding.
            d = a.shape[0] // 3
            a, b = torch.cat([a[:d], a[2 * d :]]), torch.cat([b[:d], b[2 * d :]])
        torch.testing.assert_close(b.detach(), a, rtol=1e-4, atol=1e-5)


def test_spec_inference_benchmark_reports_each_model():
    from benchmarks.spec_inference import main

    (row,) = main(["--tasks", "lm-docs-d32h2l2", "--repeats", "1"])
    assert row["tensors"] == 30 and row["with_groups"] >= 27 and row["graph_ms"] > 0
    with pytest.raises(SystemExit, match="unknown task 'nope'"):
        main(["--tasks", "nope"])


def test_a_hand_written_spec_that_contradicts_the_graph_is_named():
    model, _ = models()["resnet-bn-2d"]
    spec = WeightSpaceSpec.from_module(model)
    spec.check_against(model)  # the graph's own spec agrees
    # The sequential rule splits the residual stream: a block's conv2 rows
    # in their own group, apart from the stream the next block reads.
    sequential = WeightSpaceSpec.from_module(model, graph=False)
    with pytest.raises(ValueError, match="parameter '.*': .*"):
        sequential.check_against(model)
    shapes = {t.name: t.shape for t in spec.tensors}
    axes = {t.name: tuple(a.group if a.kind == GROUP else None for a in t.axes)
            for t in spec.tensors}  # fmt: skip
    axes["blocks.0.norm2.weight"] = ("own",)  # one norm apart from its stream
    bad = WeightSpaceSpec.from_axes(axes, shapes)
    with pytest.raises(ValueError, match="'blocks.0.norm2.weight': axis 0 shares neurons"):
        bad.check_against(model)
