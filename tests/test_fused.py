"""The fused CPU kernel against the torch path and a naive per-entry loop."""

import copy
import math

import pytest
import torch
from helpers import (
    architectures,
    assert_fused_in_place_matches,
    assert_fused_update_equals_torch,
    make_mlp,
    random_state,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import lopt
from lopt import WeightSpaceSpec, functional, fused
from lopt.features import EPS, MOMENTUM_DECAYS
from lopt.nets import NFNNet, PerParamMLP

needs_kernel = pytest.mark.skipif(
    not fused.available(), reason=f"no fused kernel: {fused.unavailable_reason()}"
)


def strong(cls, depth, **kw):
    """A random net whose learned term dominates, so the kernel's outputs matter."""
    return cls(depth=depth, out_scale=1.0, step_mult=1e-2, lr=1e-4, **kw)


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(
    arch=architectures(),
    kind=st.sampled_from(["mlp", "nfn", "nfn-proj", "nfn-magnitude", "nfn-stats"]),
    depth=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_fused_update_equals_the_torch_path(arch, kind, depth, seed):
    module, _ = arch
    torch.manual_seed(seed)
    if kind == "mlp":
        net = strong(PerParamMLP, depth)
    else:
        net = strong(
            NFNNet,
            depth,
            nf_channels=3 if kind == "nfn-proj" else None,
            nf_outputs="magnitude" if kind == "nfn-magnitude" else "both",
            neuron_stats=kind == "nfn-stats",
        )
        if kind == "nfn-stats":
            with torch.no_grad():
                net.stat_weight.normal_(std=0.3)
    spec = WeightSpaceSpec.from_module(module)
    params = [p.detach().clone() for p in module.parameters()]
    out_state, ref_state = assert_fused_update_equals_torch(net, spec, params, seed)
    for a, b in zip(out_state["momenta"], ref_state["momenta"]):
        torch.testing.assert_close(a, b)


@needs_kernel
@pytest.mark.parametrize("cls", [PerParamMLP, NFNNet])
def test_fused_equals_the_torch_path_on_a_tensor_that_never_had_a_gradient(cls):
    # Its second moment is all 0, where the torch path's sqrt has a guarded
    # derivative (for truncated backprop); both must still read rms = 0.
    torch.manual_seed(0)
    module = make_mlp([4, 6, 3])
    net = strong(cls, 1)
    spec = WeightSpaceSpec.from_module(module)
    params = [p.detach().clone() for p in module.parameters()]
    grads = [torch.randn_like(p) for p in params]
    grads[0].zero_()
    state = functional.init(params)
    with torch.no_grad():
        ref, _ = functional.update(net, spec, None, grads, state, params)
        out, _ = functional.update(net, spec, None, grads, state, params, fused=True)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@needs_kernel
@settings(max_examples=15, deadline=None)
@given(arch=architectures(), kind=st.sampled_from(["mlp", "nfn-proj"]), seed=st.integers(0, 999))
def test_fused_in_place_update_equals_the_torch_path(arch, kind, seed):
    # The optimizer classes' call: state updated in place, by the fused state pass.
    module, _ = arch
    torch.manual_seed(seed)
    net = strong(PerParamMLP, 1) if kind == "mlp" else strong(NFNNet, 1, nf_channels=3)
    spec = WeightSpaceSpec.from_module(module)
    params = [p.detach().clone() for p in module.parameters()]
    grads = [torch.randn_like(p) for p in params]
    assert_fused_in_place_matches(net, spec, params, grads, random_state(params, seed))


@needs_kernel
@pytest.mark.parametrize("n", [1, 13, 4096 * 2 + 37])  # tails of 8 and of a summing chunk
@pytest.mark.parametrize("threads", [1, 2])
def test_state_update_matches_torch_ops(n, threads, monkeypatch):
    monkeypatch.setattr(fused, "MIN_ENTRIES_PER_THREAD", 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    g = torch.Generator().manual_seed(n)
    p, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
    m, v = torch.randn(4, n, generator=g), torch.rand(n, generator=g)
    weights = [1 - d for d in MOMENTUM_DECAYS]
    ref_m = torch.stack([torch.lerp(m[k], grad, w) for k, w in enumerate(weights)])
    ref_v = v * 0.999 + 0.001 * grad * grad
    ref_sums = torch.cat(
        [
            torch.stack([p.double().square().sum(), grad.double().square().sum()]),
            ref_m.double().square().sum(1),
            ref_v.double().sum().reshape(1),
        ]
    )
    with torch.no_grad():
        sums = fused.state_update(p, grad, m, v, weights, 0.999)
    torch.testing.assert_close(m, ref_m)
    torch.testing.assert_close(v, ref_v)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-6)


def test_state_update_rejects_a_weight_count_that_is_not_the_momenta():
    m = torch.zeros(4, 3)
    with torch.no_grad(), pytest.raises(ValueError, match="one weight a momentum"):
        fused.state_update(torch.zeros(3), torch.ones(3), m, torch.zeros(3), [0.1], 0.999)
    assert (m == 0).all()


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


def kernel_inputs(n, depth, n_out, seed):
    g = torch.Generator().manual_seed(seed)
    k, width = len(MOMENTUM_DECAYS), 5
    p, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
    m, v = torch.randn(k, n, generator=g), torch.rand(n, generator=g)
    layers = [(torch.randn(width, k + 5, generator=g), torch.randn(width, generator=g))]
    layers += [(torch.randn(width, width, generator=g), torch.randn(width, generator=g))] * (
        depth - 1
    )
    w_out, b_out = torch.randn(n_out, width, generator=g), torch.randn(n_out, generator=g)
    return p, grad, m, v, layers, w_out, b_out


def naive_reference(p, grad, m, v, layers, w_out, b_out):
    return naive_entry_outputs(
        p.tolist(), grad.tolist(), m.tolist(), v.tolist(), 1, 1.7,
        [(w.tolist(), b.tolist()) for w, b in layers], w_out.tolist(), b_out.tolist(), -0.3,
    )  # fmt: skip


@needs_kernel
@pytest.mark.parametrize("n", [1, 13, 37, 64])  # short last blocks of 16, and whole ones
@pytest.mark.parametrize("depth", [1, 3])
def test_kernel_matches_a_naive_per_entry_loop(n, depth):
    inputs = kernel_inputs(n, depth, 3, n + depth)
    p, grad, m, v, layers, w_out, b_out = inputs
    with torch.no_grad():
        out, base, rows, cols = fused.entry_outputs(
            p, grad, m, v, 1, 1.7, EPS, layers, w_out, b_out, -0.3
        )
    assert rows is None and cols is None
    ref_out, ref_base = naive_reference(*inputs)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base, ref_base, rtol=1e-6, atol=1e-7)


@needs_kernel
@pytest.mark.parametrize(
    "shape", [(1, 1), (3, 5), (4, 16), (5, 24), (7, 33), (40, 3)]
)  # rows shorter than, equal to, and straddling blocks of 16
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_pools_rows_and_columns_like_the_naive_loop(shape, threads, monkeypatch):
    monkeypatch.setattr(fused, "MIN_ENTRIES_PER_THREAD", 8)  # split even tiny tensors
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    n = shape[0] * shape[1]
    inputs = kernel_inputs(n, 1, 5, sum(shape))
    p, grad, m, v, layers, w_out, b_out = inputs
    with torch.no_grad():
        out, base, rows, cols = fused.entry_outputs(
            p, grad, m, v, 1, 1.7, EPS, layers, w_out, b_out, -0.3, pool_from=2,
            pool_cols=shape[1],
        )  # fmt: skip
    ref_out, ref_base = naive_reference(*inputs)
    pooled = ref_out[2:].reshape(3, *shape)
    assert out.shape == (2, n)
    torch.testing.assert_close(out, ref_out[:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base, ref_base, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rows, pooled.sum(2), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cols, pooled.sum(1), rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (5, 24), (40, 3)])
@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_sums_the_neuron_statistics_by_row_and_column(shape, pool, threads, monkeypatch):
    monkeypatch.setattr(fused, "MIN_ENTRIES_PER_THREAD", 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    n = shape[0] * shape[1]
    p, grad, m, v, layers, w_out, b_out = kernel_inputs(n, 1, 5, n)
    with torch.no_grad():
        out, _, rows, cols = fused.entry_outputs(
            p, grad, m, v, 1, 1.7, EPS, layers, w_out, b_out, -0.3,
            pool_from=2 if pool else 5, pool_cols=shape[1], stats=True,
        )  # fmt: skip
    assert out.shape == ((2, n) if pool else (5, n))
    assert rows.shape == ((3 if pool else 0) + 3, shape[0])
    adam = m[1] / (v.sqrt() * 1.7 + EPS)
    squares = torch.stack([p, adam, grad]).square().reshape(3, *shape)
    torch.testing.assert_close(rows[-3:], squares.sum(2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cols[-3:], squares.sum(1), rtol=1e-5, atol=1e-5)
    with torch.no_grad(), pytest.raises(ValueError, match="give pool_from and pool_cols"):
        fused.entry_outputs(p, grad, m, v, 1, 1.7, EPS, layers, w_out, b_out, -0.3, stats=True)


@needs_kernel
@pytest.mark.parametrize("name", ["mlp", "conv", "scalar", "attention"])
def test_neuron_statistics_from_the_kernel_sums_equal_the_torch_ones(name):
    # The fused path computes every tensor's statistics at once from the
    # kernel's sums (NFNNet._stat_terms_from_sums); the torch path per
    # tensor (neuron_stats). Weights, biases, 0-d and nested tensors.
    from torch import nn

    from tasks.models import TransformerLM

    torch.manual_seed(0)
    if name == "scalar":
        spec, shapes = WeightSpaceSpec.from_shapes([(), (7,), (5, 7)]), [(), (7,), (5, 7)]
    else:
        model = {
            "mlp": lambda: nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)),
            "conv": lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3)),
            "attention": lambda: TransformerLM(7, 4, 8, 2, 1),
        }[name]()
        spec, shapes = WeightSpaceSpec.from_module(model), None
    net = strong(NFNNet, 1, neuron_stats=True, width_free_stats=True)
    with torch.no_grad():
        net.stat_weight.normal_(std=0.5)
    params = (
        [torch.randn(s) for s in shapes]
        if shapes
        else [p.detach().clone() for p in model.parameters()]
    )
    for p in params:
        if p.dim():
            p[..., 0] = 0.0  # a row under the floor
    assert_fused_update_equals_torch(net, spec, params, 3)


def test_kernel_pooling_rejects_a_shape_that_is_no_matrix():
    inputs = kernel_inputs(10, 1, 4, 0)
    with torch.no_grad(), pytest.raises(ValueError, match="rows of 3"):
        fused.entry_outputs(*inputs[:4], 1, 1.0, EPS, *inputs[4:], 1.0, pool_from=2, pool_cols=3)


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (6, 16), (9, 21)])
@pytest.mark.parametrize("threads", [1, 2])
def test_finish_matches_the_torch_formula(shape, threads, monkeypatch):
    monkeypatch.setattr(fused, "MIN_ENTRIES_PER_THREAD", 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    g = torch.Generator().manual_seed(shape[0])
    n = shape[0] * shape[1]
    o = torch.randn(2, n, generator=g) * 4  # magnitudes past the clamp too
    base = torch.randn(n, generator=g)
    row, col = torch.randn(shape[0], 2, generator=g), torch.randn(2, shape[1], generator=g)
    d = o[0].reshape(shape) + row[:, 0, None] + col[0]
    mag = o[1].reshape(shape) + row[:, 1, None] + col[1]
    ref = (base.reshape(shape) + d * mag.clamp(max=10.0).exp()).reshape(-1)
    with torch.no_grad():
        out, total = fused.finish(o[0], o[1], base.clone(), 10.0, shape[1], row, col)
        plain, _ = fused.finish(o[0], o[1], base.clone(), 10.0)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert math.isclose(total, ref.double().sum().item(), rel_tol=1e-5, abs_tol=1e-4)
    plain_ref = base + o[0] * o[1].clamp(max=10.0).exp()
    torch.testing.assert_close(plain, plain_ref, rtol=1e-6, atol=1e-6)


@needs_kernel
def test_finish_exp_over_its_range_and_non_finite_inputs():
    mag = torch.cat([torch.linspace(-100.0, 10.0, 4001), torch.tensor([float("nan"), 30.0])])
    one = torch.ones_like(mag)
    with torch.no_grad():
        out, total = fused.finish(one, mag, torch.zeros_like(mag), 10.0)
    ref = mag.double().clamp(max=10.0).exp()
    torch.testing.assert_close(
        out[:-2].double(), ref[:-2], rtol=3e-7, atol=2e-38
    )  # flushed to 0 below e^-87.3
    assert torch.isnan(out[-2]) and out[-1] == out[-3]  # NaN stays NaN; 30 is clamped to 10
    assert math.isnan(total)
    inf_dir = torch.tensor([float("inf")] + [0.0] * 8)
    with torch.no_grad():
        assert math.isinf(fused.finish(inf_dir, torch.zeros(9), torch.zeros(9), 10.0)[1])


def test_finish_rejects_bad_shapes_and_leaves_base_alone():
    base = torch.arange(6.0)
    with torch.no_grad():
        with pytest.raises(ValueError, match="rows of 4"):
            fused.finish(torch.ones(6), torch.ones(6), base, 10.0, 4)
        with pytest.raises(ValueError, match=r"row_terms must be \(2, 2\)"):
            fused.finish(torch.ones(6), torch.ones(6), base, 10.0, 3, torch.ones(3, 2))
        with pytest.raises(ValueError, match=r"col_terms must be \(2, 3\)"):
            fused.finish(torch.ones(6), torch.ones(6), base, 10.0, 3, None, torch.ones(3, 2))
    assert torch.equal(base, torch.arange(6.0))


@needs_kernel
def test_kernel_keeps_nan_like_relu():
    p = torch.tensor([float("nan")] + [0.0] * 7)
    zeros = torch.zeros(8)
    layers = [(torch.ones(2, 9), torch.zeros(2))]
    with torch.no_grad():
        out, *_ = fused.entry_outputs(
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
        assert fused.readable(torch.zeros(4, 4).t())  # once copied
        assert not fused.accepts(torch.zeros(4, dtype=torch.bfloat16))
        assert not fused.readable(torch.zeros(4, dtype=torch.bfloat16))
    assert not fused.accepts(torch.zeros(4))  # autograd is on
    assert not fused.readable(torch.zeros(4))


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
    with pytest.warns(RuntimeWarning, match="no-such-compiler-xyz") as w:
        assert not fused.available()
    assert w[0].filename == __file__
    assert "no-such-compiler-xyz" in fused.unavailable_reason()


@pytest.mark.parametrize("use_fused", [False, True])
def test_a_net_and_its_copy_take_the_same_step_to_the_last_bit(use_fused):
    # Cached plans (sets of pooled axes among them) are copied with the net;
    # nothing may depend on the order a copy gives them.
    if use_fused and not fused.available():
        pytest.skip("no fused kernel")
    torch.manual_seed(5)
    from helpers import make_cnn

    module = make_cnn([1, 3, 4], [3, 3], 2, "flatten", 3, True, 6)
    spec = WeightSpaceSpec.from_module(module)
    net = strong(NFNNet, 1, neuron_stats=True)
    params = [p.detach().clone() for p in module.parameters()]
    grads = [torch.randn_like(p) for p in params]
    with torch.no_grad():
        first = functional.update(net, spec, None, grads, random_state(params, 1), params,
                                  fused=use_fused)[0]  # fmt: skip
        again = functional.update(copy.deepcopy(net), spec, None, grads, random_state(params, 1),
                                  params, fused=use_fused)[0]  # fmt: skip
    for a, b in zip(first, again):
        assert torch.equal(a, b)
