"""The fused CPU kernel against the torch path and a naive per-entry loop."""

import copy
import math

import pytest
import torch
from helpers import architectures, make_mlp
from hypothesis import given, settings
from hypothesis import strategies as st

import lopt
from lopt import WeightSpaceSpec, functional, fused
from lopt.features import EPS, MOMENTUM_DECAYS
from lopt.nets import NFNNet, PerParamMLP

needs_kernel = pytest.mark.skipif(
    not fused.available(), reason=f"no fused kernel: {fused.unavailable_reason()}"
)


def random_state(params, seed):
    """An optimizer state a few steps in: momenta, second moments, step 7."""
    g = torch.Generator().manual_seed(seed)
    state = functional.init(params)
    state["momenta"] = [torch.randn(m.shape, generator=g) * 0.1 for m in state["momenta"]]
    state["second_moment"] = [
        torch.rand(v.shape, generator=g) * 0.01 for v in state["second_moment"]
    ]
    state["step"] = torch.tensor(7.0)
    return state


def strong(cls, depth, **kw):
    """A random net whose learned term dominates, so the kernel's outputs matter."""
    return cls(depth=depth, out_scale=1.0, step_mult=1e-2, lr=1e-4, **kw)


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(
    arch=architectures(),
    kind=st.sampled_from(["mlp", "nfn", "nfn-proj"]),
    depth=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_fused_update_equals_the_torch_path(arch, kind, depth, seed):
    module, _ = arch
    torch.manual_seed(seed)
    if kind == "mlp":
        net = strong(PerParamMLP, depth)
    else:
        net = strong(NFNNet, depth, nf_channels=3 if kind == "nfn-proj" else None)
    spec = WeightSpaceSpec.from_module(module)
    params = [p.detach().clone() for p in module.parameters()]
    grads = [torch.randn_like(p) for p in params]
    state = random_state(params, seed)
    with torch.no_grad():
        ref, ref_state = functional.update(net, spec, None, grads, state, params)
        out, out_state = functional.update(net, spec, None, grads, state, params, fused=True)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        assert a.abs().sum() > 0
    for a, b in zip(out_state["momenta"], ref_state["momenta"]):
        torch.testing.assert_close(a, b)


def naive_entry_outputs(p, g, m, v, adam, rsqrt_c2, layers, w_out, b_out, base_scale):
    """One entry at a time, in Python floats: the formula of entry_outputs.c."""
    outs, bases = [], []
    for i in range(len(p)):
        r = math.sqrt(v[i])
        d = r * rsqrt_c2 + EPS
        x = [p[i], g[i], *[mk[i] for mk in m], r, g[i] / d, m[adam][i] / d]
        h = [float(t) for t in x]
        for w, b in layers:
            h = [max(0.0, b[j] + sum(w[j][f] * h[f] for f in range(len(h)))) for j in range(len(b))]
        outs.append(
            [
                b_out[r_] + sum(w_out[r_][j] * h[j] for j in range(len(h)))
                for r_ in range(len(b_out))
            ]
        )
        bases.append(base_scale * float(x[-1]))
    return torch.tensor(outs).t(), torch.tensor(bases)


@needs_kernel
@pytest.mark.parametrize("n", [1, 13, 64])  # a short last block of 8, and whole ones
@pytest.mark.parametrize("depth", [1, 3])
def test_kernel_matches_a_naive_per_entry_loop(n, depth):
    g = torch.Generator().manual_seed(n + depth)
    k, width, n_out = len(MOMENTUM_DECAYS), 5, 3
    p, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
    m, v = torch.randn(k, n, generator=g), torch.rand(n, generator=g)
    layers = [(torch.randn(width, k + 5, generator=g), torch.randn(width, generator=g))]
    layers += [(torch.randn(width, width, generator=g), torch.randn(width, generator=g))] * (
        depth - 1
    )
    w_out, b_out = torch.randn(n_out, width, generator=g), torch.randn(n_out, generator=g)
    with torch.no_grad():
        out, base = fused.entry_outputs(p, grad, m, v, 1, 1.7, EPS, layers, w_out, b_out, -0.3)
    ref_out, ref_base = naive_entry_outputs(
        p.tolist(), grad.tolist(), m.tolist(), v.tolist(), 1, 1.7,
        [(w.tolist(), b.tolist()) for w, b in layers], w_out.tolist(), b_out.tolist(), -0.3,
    )  # fmt: skip
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base, ref_base, rtol=1e-6, atol=1e-7)


@needs_kernel
def test_kernel_keeps_nan_like_relu():
    p = torch.tensor([float("nan")] + [0.0] * 7)
    zeros = torch.zeros(8)
    layers = [(torch.ones(2, 9), torch.zeros(2))]
    with torch.no_grad():
        out, _ = fused.entry_outputs(
            p,
            zeros,
            torch.zeros(4, 8),
            zeros,
            1,
            1.0,
            EPS,
            layers,
            torch.ones(1, 2),
            torch.zeros(1),
            1.0,
        )
    assert torch.isnan(out[0, 0]) and (out[0, 1:] == 0).all()


@needs_kernel
@pytest.mark.parametrize("cls", [lopt.NFNOptimizer, lopt.MLPOptimizer])
def test_fused_optimizer_trains_like_the_torch_path(cls):
    torch.manual_seed(0)
    model = make_mlp([6, 16, 8, 3])
    twin = copy.deepcopy(model)
    net = strong(cls.net_class, 1)
    a = cls(model.parameters(), net=net, fused=True)
    b = cls(twin.parameters(), net=copy.deepcopy(net), fused=False)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for _ in range(20):
        for m, opt in ((model, a), (twin, b)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_fused_needs_no_autograd():
    net = PerParamMLP()
    spec = WeightSpaceSpec.from_shapes([(3, 2)])
    params = [torch.randn(3, 2)]
    with pytest.raises(RuntimeError, match="without autograd"):
        functional.update(net, spec, None, [torch.randn(3, 2)], functional.init(params), params,
                          fused=True)  # fmt: skip


def test_tensors_the_kernel_cannot_read_fall_back():
    with torch.no_grad():
        assert fused.accepts(torch.zeros(4, 4))
        assert not fused.accepts(torch.zeros(4, 4).t())  # not contiguous
        assert not fused.accepts(torch.zeros(4, dtype=torch.bfloat16))
    assert not fused.accepts(torch.zeros(4))  # autograd is on


def test_disabled_or_unbuildable_kernel_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("LOPT_FUSED", "0")
    assert not fused.available() and fused.unavailable_reason() == "LOPT_FUSED=0"
    model = make_mlp([4, 5, 2])
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="LOPT_FUSED=0"):
        lopt.NFNOptimizer(model.parameters(), fused=True)
    opt = lopt.NFNOptimizer(model.parameters())  # the default falls back to torch ops
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert not opt._fused
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))

    monkeypatch.delenv("LOPT_FUSED")
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    monkeypatch.setenv("LOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fused, "_lib", None)
    monkeypatch.setattr(fused, "_error", None)
    with pytest.warns(RuntimeWarning, match="no-such-compiler-xyz"):
        assert not fused.available()
    assert "no-such-compiler-xyz" in fused.unavailable_reason()
