"""Weight-space specs read from the traced graph: residual streams,
normalisation, embeddings, attention heads; the spec's random symmetry."""

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


class MHAEncoder(nn.Module):
    """Encoder blocks around ``nn.MultiheadAttention`` (packed projection),
    pre-LN or post-LN, optionally causal."""

    def __init__(self, d=8, heads=2, layers=2, post_ln=False, causal=False):
        super().__init__()
        self.post_ln, self.causal = post_ln, causal
        self.inp = nn.Linear(5, d)
        self.attn = nn.ModuleList(
            nn.MultiheadAttention(d, heads, batch_first=True) for _ in range(layers)
        )
        self.ln = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.fc = nn.ModuleList(nn.Linear(d, 2 * d) for _ in range(layers))
        self.out = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(layers))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        t = x.shape[1]
        mask = h.new_ones((t, t), dtype=torch.bool).triu(1) if self.causal else None
        for attn, ln, fc, out in zip(self.attn, self.ln, self.fc, self.out):
            if self.post_ln:
                h = ln(h + attn(h, h, h, attn_mask=mask, need_weights=False)[0])
            else:
                y = ln(h)
                h = h + attn(y, y, y, attn_mask=mask, need_weights=False)[0]
            h = h + out(F.gelu(fc(h)))
        return self.head(h)


class Decoder(nn.Module):
    """A causal decoder written by hand: separate query / key / value
    projections (values twice as wide as keys), scaled_dot_product_attention,
    then cross-attention to a memory of another width (MultiheadAttention
    with kdim / vdim, so separate projections there too)."""

    def __init__(self, d=8, heads=2, memory=6):
        super().__init__()
        self.heads = heads
        self.inp = nn.Linear(5, d)
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d, bias=False)  # no key bias: see below
        self.v = nn.Linear(d, 2 * d, bias=False)
        self.o = nn.Linear(2 * d, d)
        self.ln = nn.LayerNorm(d)
        self.cross = nn.MultiheadAttention(d, heads, kdim=memory, vdim=memory, bias=False,
                                           batch_first=True)  # fmt: skip
        self.head = nn.Linear(d, 3)

    def forward(self, x, memory):
        h = self.inp(x)
        b, t = x.shape[0], x.shape[1]
        q = self.q(h).view(b, t, self.heads, -1).transpose(1, 2)
        k = self.k(h).view(b, t, self.heads, -1).transpose(1, 2)
        v = self.v(h).view(b, t, self.heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.o(y.transpose(1, 2).flatten(2))
        h = h + self.cross(self.ln(h), memory, memory, need_weights=False)[0]
        return self.head(h)


class TorchEncoder(nn.Module):
    """torch's own ``nn.TransformerEncoder`` (pre- or post-LN) between an
    input layer and a head."""

    def __init__(self, d=8, norm_first=False):
        super().__init__()
        self.inp = nn.Linear(5, d)
        layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True,
                                           norm_first=norm_first)  # fmt: skip
        norm = nn.LayerNorm(d) if norm_first else None
        self.enc = nn.TransformerEncoder(layer, 2, norm=norm, enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.enc(self.inp(x)))


class TorchDecoder(nn.Module):
    """torch's ``nn.TransformerDecoderLayer``, causal, reading a memory."""

    def __init__(self, d=8):
        super().__init__()
        self.inp, self.mem = nn.Linear(5, d), nn.Linear(4, d)
        self.dec = nn.TransformerDecoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x, memory):
        return self.head(self.dec(self.inp(x), self.mem(memory), tgt_is_causal=False))


class ViT(nn.Module):
    """A vision transformer: conv patches moved to the last axis, a learned
    class token concatenated before them, learned positions, torch's pre-LN
    encoder, the class token's output read by index."""

    def __init__(self, d=8):
        super().__init__()
        self.patch = nn.Conv2d(1, d, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.zeros(1, 10, d))
        layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)  # fmt: skip
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 3)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.enc(x))[:, 0])


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
        "mha-pre-ln": (MHAEncoder(), torch.randn(3, 6, 5)),
        "mha-post-ln-causal": (MHAEncoder(post_ln=True, causal=True), torch.randn(3, 6, 5)),
        "decoder-cross": (Decoder(), (torch.randn(3, 6, 5), torch.randn(3, 4, 6))),
        "torch-encoder-post-ln": (TorchEncoder(), torch.randn(3, 6, 5)),
        "torch-encoder-pre-ln": (TorchEncoder(norm_first=True), torch.randn(3, 6, 5)),
        "torch-decoder": (TorchDecoder(), (torch.randn(3, 6, 5), torch.randn(3, 4, 4))),
        "vit": (ViT(), torch.randn(3, 1, 12, 12)),
    }
    with torch.no_grad():
        for model, _ in built.values():
            for p in model.parameters():
                p.normal_(0, 0.5)
    return built


def run(model, x):
    return model(*x) if isinstance(x, tuple) else model(x)


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
        torch.testing.assert_close(run(load(model, moved), x), run(model, x), rtol=1e-5,
                                   atol=1e-5)  # fmt: skip
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


def test_a_transformers_stream_embeddings_norms_and_heads():
    model, _ = models()["transformer-causal"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything is read: nothing to warn about
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
    # The packed projection, in pieces: the query and key rows (part, heads,
    # head dim, stream) and the value rows (heads, head dim, stream), with
    # their own head dims; the output projection reads the value's.
    by_label = {t.label: t for t in spec.tensors}
    for b in range(2):
        pre = f"blocks.{b}.attn."
        qk, v = by_label[pre + "qkv.weight[0:16]"], by_label[pre + "qkv.weight[16:24]"]
        proj = by_name[pre + "proj.weight"]
        assert qk.view == (2, 2, 4, 8) and v.view == (2, 4, 8) and proj.view == (8, 2, 4)
        part, heads, dims, _ = qk.axes
        assert part.kind == "local" and heads.kind == "group" and dims.parent == heads.group
        assert v.axes[0] == heads and v.axes[1].parent == heads.group
        assert v.axes[1].group != dims.group
        assert [a.group for a in proj.axes[1:]] == [heads.group, v.axes[1].group]
        assert by_label[pre + "qkv.bias[0:16]"].axes[1:] == (heads, dims)
        assert by_label[pre + "qkv.bias[16:24]"].axes == v.axes[:2]
    assert len(set(spec.nesting().values())) == 2  # one head group per block


def test_separate_projections_give_query_key_and_value_their_own_nested_groups():
    model, _ = models()["decoder-cross"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = WeightSpaceSpec.from_module(model, mode="hnp")
    by_name = {t.name: t for t in spec.tensors}
    q, k, v, o = (by_name[f"{n}.weight"] for n in "qkvo")
    assert q.view == (2, 4, 8) and v.view == (2, 8, 8) and o.view == (8, 2, 8)
    heads = q.axes[0].group
    assert {t.axes[0].group for t in (q, k, v)} == {heads} and o.axes[1].group == heads
    assert q.axes[1].group == k.axes[1].group != v.axes[1].group == o.axes[2].group
    assert spec.nesting()[q.axes[1].group] == spec.nesting()[v.axes[1].group] == heads
    # Cross-attention: keys and values read the memory (fixed: the input).
    cq, ck, cv = (by_name[f"cross.{n}_proj_weight"] for n in "qkv")
    assert ck.axes[2].kind == cv.axes[2].kind == "fixed"
    assert cq.axes[1].group == ck.axes[1].group != cv.axes[1].group
    assert by_name["cross.out_proj.weight"].axes[2].group == cv.axes[1].group


@pytest.mark.parametrize("name", ["torch-encoder-post-ln", "torch-encoder-pre-ln",
                                  "torch-decoder"])  # fmt: skip
def test_torchs_transformer_layers_read_as_one_stream_with_heads(name):
    model, _ = models()[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = WeightSpaceSpec.from_module(model)
    by_name = {t.name: t for t in spec.tensors}
    stream = by_name["inp.weight"].axes[0].group
    members = stream_members(spec, stream)
    reads_or_writes = [n for n in by_name if n.startswith(("enc.", "dec."))
                       and not n.endswith(("in_proj_bias", "linear1.bias"))]  # fmt: skip
    assert set(reads_or_writes) <= members | {n for n in reads_or_writes if "linear1" in n}
    assert "head.weight" in members
    for t in spec.tensors:
        if t.name.endswith("in_proj_weight"):  # query-key rows, value rows
            assert t.view == ((2, 2, 4, 8) if t.part == (0, 16) else (2, 4, 8))
            assert t.axes[-2].parent == t.axes[-3].group
    if name == "torch-decoder":  # cross-attention's packed columns read the memory
        assert "mem.weight" in members


class PerHeadScale(nn.Module):
    """Attention whose scores are scaled by a learned per-head parameter, or
    whose queries and keys are multiplied by a per-dimension factor made in
    the forward pass (as a rotary embedding is): the heads, or a head's
    dimensions, are not interchangeable the way the spec would need."""

    def __init__(self, d=8, heads=2, rotary=False):
        super().__init__()
        self.heads, self.rotary = heads, rotary
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.scale = nn.Parameter(torch.ones(heads, 1, 1))

    def forward(self, x):
        b, t, d = x.shape[0], x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.rotary:
            angle = torch.arange(d // self.heads).float() / t
            q, k = q * angle.cos(), k * angle.cos()
            scores = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        else:
            scores = (q @ k.transpose(-2, -1)) * self.scale
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        return self.o(y)


def test_a_class_token_joins_the_stream_and_a_concatenation_of_features_warns():
    model, _ = models()["vit"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = WeightSpaceSpec.from_module(model)
    by_name = {t.name: t for t in spec.tensors}
    stream = by_name["patch.weight"].axes[0].group
    assert {"cls", "pos", "norm.weight", "head.weight"} <= stream_members(spec, stream)

    class Widen(nn.Module):  # features of two layers side by side
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(4, 2), nn.Linear(5, 2)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], dim=-1))

    with pytest.warns(UserWarning, match=r"cat \(cat\): a.weight, a.bias, b.weight, b.bias"):
        spec = WeightSpaceSpec.from_module(Widen())
    assert spec.tensors[0].axes[0].kind == "local"


@pytest.mark.parametrize("rotary", [False, True])
def test_heads_meeting_an_operation_not_followed_stay_local_with_a_warning(rotary):
    model = PerHeadScale(rotary=rotary)
    with pytest.warns(UserWarning, match="does not follow") as caught:
        spec = WeightSpaceSpec.from_module(model)
    message = str(caught[0].message)
    assert caught[0].filename == __file__
    assert "qkv.weight" in message and "o.weight" in message
    by_name = {t.name: t for t in spec.tensors}
    assert all(a.kind == "local" for a in by_name["qkv.weight"].axes[:-1])
    assert not spec.nesting()


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
    with pytest.warns(UserWarning, match="Branchy could not be traced .* sequential rule") as w:
        spec = WeightSpaceSpec.from_module(model)
    assert w[0].filename == __file__  # the caller's line, not lopt's
    assert spec == WeightSpaceSpec.from_module(model, graph=False)
    with pytest.warns(UserWarning, match="Branchy could not be traced") as w:
        lopt.NFNOptimizer(model.parameters(), model=model, total_steps=5)
    assert w[0].filename == __file__


ATTENTION = ["transformer-causal", "mha-pre-ln", "mha-post-ln-causal", "decoder-cross",
             "torch-encoder-pre-ln", "torch-decoder", "vit"]  # fmt: skip


@pytest.mark.parametrize("name", ["resnet-bn-2d", *ATTENTION])
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
        pieces = [torch.zeros(s.shape) for s in spec.tensors]
        pieces[i] = channels_last[..., c].reshape(t.shape)
        out.append(spec.split(sym(spec.join(pieces)))[i].reshape(t.view))
    return torch.stack(out, -1)


EMBEDDING = [
    pytest.param(name, "embedding-roles", id=f"{name}-embedding-roles")
    for name in ("transformer-causal", "tied-embeddings")
]


@pytest.mark.parametrize(
    "name, weights",
    [(n, w) for w in (None, "default") for n in ("resnet-bn-2d", *ATTENTION)] + EMBEDDING,
)
def test_the_optimizers_steps_commute_with_the_symmetry(name, weights):
    """NFNOptimizer(params, model=model) reads the graph's spec; training the
    moved model moves the trajectory the same way. The model is in float64
    (the optimizer net's float32 sets the tolerance): a key projection's
    bias has a zero gradient up to rounding (softmax ignores a shift of the
    scores), which Adam's g / |g| turns into whole steps in no particular
    direction; in float64 that rounding stays below Adam's epsilon. (The
    hand-written decoder has no key bias, as many models do not.)"""
    model, x = models()[name]
    model = model.double()
    x = tuple(a.double() for a in x) if isinstance(x, tuple) else x
    x = x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
    spec = WeightSpaceSpec.from_module(model, mode="hnp")
    sym = spec.random_symmetry(torch.Generator().manual_seed(2))
    twin = load(model, sym([p.detach() for p in model.parameters()]))
    torch.manual_seed(3)
    net = None
    if weights is None:
        net = lopt.NFNNet(out_scale=1.0, step_mult=1e-2)
    elif weights == "embedding-roles":  # the embeddings' NF weights and rate at work
        net = lopt.NFNNet(out_scale=1.0, step_mult=1e-2, embedding_roles=True, role_rates=True)
        with torch.no_grad():
            net.nf.biases["bias:ih"].normal_()
            net.role_log_rate["ih"].fill_(0.3)
    target = torch.randn_like(run(model, x))
    for m in (model, twin):
        if net is None:
            opt = lopt.NFNOptimizer(m.parameters(), model=m, total_steps=3)
        else:
            opt = lopt.NFNOptimizer(m.parameters(), net=net, model=m)
        for _ in range(3):
            opt.zero_grad()
            F.mse_loss(run(m, x), target).backward()
            opt.step()
    moved = sym([p.detach() for p in model.parameters()])
    for a, b in zip(moved, twin.parameters()):
        torch.testing.assert_close(b.detach(), a, rtol=1e-5, atol=1e-6)


def test_spec_inference_benchmark_reports_each_model(tmp_path):
    from benchmarks.spec_inference import main

    page = tmp_path / "spec.md"
    (row,) = main(["--tasks", "lm-docs-d32h2l2", "--repeats", "1", "--out", str(page)])
    assert row["tensors"] == row["with_groups"] == 30 and row["heads"] == 2
    assert row["stream"] == 25 and row["moved"] >= 0.9 and row["graph_ms"] > 0
    assert row["output_change"] < 1e-4 and row["step_change"] < 1e-5
    assert "python -m benchmarks.spec_inference --tasks lm-docs-d32h2l2" in page.read_text()
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


def test_attention_with_learned_key_value_rows_is_not_followed():
    """add_bias_kv appends learned rows to the keys and values: not followed,
    so the stream it reads stays local, with the warning naming it."""

    class KV(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.head = nn.Linear(3, 8), nn.Linear(8, 2)
            self.attn = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)

        def forward(self, x):
            h = self.inp(x)
            return self.head(h + self.attn(h, h, h)[0])

    with pytest.warns(UserWarning, match=r"MultiheadAttention attn \(add_bias_kv\): inp.weight"):
        spec = WeightSpaceSpec.from_module(KV())
    assert not spec.nesting() and spec.tensors[0].axes[0].kind == "local"
