"""Random architectures and symmetry transforms shared by the tests."""

from __future__ import annotations

import copy
import math

import torch
from hypothesis import strategies as st
from torch import nn

from lopt.nn.terms import hidden_exponents
from lopt.weightspace import LOCAL, WeightSpace, WeightSpaceSpec


def make_mlp(widths, bias=True, act=nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=bias))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def make_cnn(channels, kernels, dims=2, head="pool", n_out=3, bias=True, spatial=4):
    """Convs ('same' padding) -> global average pool or flatten -> Linear."""
    conv = nn.Conv2d if dims == 2 else nn.Conv1d
    layers: list[nn.Module] = []
    for i, k in enumerate(kernels):
        layers += [conv(channels[i], channels[i + 1], k, padding="same", bias=bias), nn.Tanh()]
    if head == "pool":
        layers += [nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool1d(1), nn.Flatten()]
        layers.append(nn.Linear(channels[-1], n_out, bias=bias))
    else:
        layers.append(nn.Flatten())
        layers.append(nn.Linear(channels[-1] * spatial**dims, n_out, bias=bias))
    return nn.Sequential(*layers)


@st.composite
def architectures(draw, cnn=None):
    """(module, input shape) for random MLPs and CNNs, depth 1-5. The
    module's initial weights come from a drawn seed, not torch's global
    generator: hypothesis replays a failing example with the same weights
    (else the replay draws others and reports the failure as flaky)."""
    init_seed = draw(st.integers(0, 2**31 - 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return _architecture(draw, cnn)


def _architecture(draw, cnn):
    is_cnn = draw(st.booleans()) if cnn is None else cnn
    bias = draw(st.booleans())
    if not is_cnn:
        depth = draw(st.integers(1, 5))
        widths = draw(st.lists(st.integers(1, 5), min_size=depth + 1, max_size=depth + 1))
        return make_mlp(widths, bias=bias), (widths[0],)
    n_conv = draw(st.integers(1, 4))
    dims = draw(st.sampled_from([1, 2]))
    chans = draw(st.lists(st.integers(1, 4), min_size=n_conv + 1, max_size=n_conv + 1))
    kernels = draw(st.lists(st.integers(1, 3), min_size=n_conv, max_size=n_conv))
    head = draw(st.sampled_from(["pool", "flatten"]))
    spatial = 3
    model = make_cnn(chans, kernels, dims, head, draw(st.integers(1, 4)), bias, spatial)
    return model, (chans[0],) + (spatial,) * dims


def random_ws(spec: WeightSpaceSpec, channels: int, batch=(), generator=None) -> WeightSpace:
    return WeightSpace(
        spec,
        [torch.randn(*batch, *t.view, channels, generator=generator) for t in spec.tensors],
    )


def random_perms(spec: WeightSpaceSpec, generator=None, hidden_only=False):
    groups = spec.hidden_groups() if hidden_only else spec.permutable_groups()
    return {g: torch.randperm(n, generator=generator) for g, n in groups.items()}


def rescale(ws: WeightSpace, scales: dict) -> WeightSpace:
    """Multiply each entry by prod over its hidden axes of scale[group][i]**exponent."""
    spec = ws.spec
    nb = len(ws.batch_shape)
    out = []
    for t, x in zip(spec.tensors, ws.tensors):
        for g, (a, e) in hidden_exponents(t, spec).items():
            shape = [1] * x.dim()
            shape[nb + a] = -1
            x = x * scales[g].pow(e).reshape(shape)
        out.append(x)
    return WeightSpace(spec, out)


def assert_ws_close(a: WeightSpace, b: WeightSpace, atol=1e-5, rtol=1e-4):
    for t, x, y in zip(a.spec.tensors, a.tensors, b.tensors):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=lambda m, n=t.name: f"{n}: {m}")


def local_axes(spec):
    return [
        (i, a)
        for i, t in enumerate(spec.tensors)
        for a, ax in enumerate(t.axes)
        if ax.kind == LOCAL
    ]


def random_state(params, seed, step=7.0):
    """An optimizer state a few steps in: random momenta and second moments."""
    from lopt import functional

    g = torch.Generator().manual_seed(seed)
    state = functional.init(params)
    state["momenta"] = [torch.randn(m.shape, generator=g) * 0.1 for m in state["momenta"]]
    state["second_moment"] = [
        torch.rand(v.shape, generator=g) * 0.01 for v in state["second_moment"]
    ]
    state["step"] = torch.tensor(step)
    # A few losses seen: count, best log loss, running sums of the log loss.
    n = torch.tensor(5.0)
    state["loss_stats"] = torch.stack(
        [n, torch.tensor(-1.5), (1 - 0.9**n) * -1.0, (1 - 0.99**n) * -0.9]
    )
    return state


STEP_LOSS = 0.4  # a loss the step helpers tell the nets that read it (log 0.4 = -0.92)


def assert_fused_in_place_matches(net, spec, params, grads, state):
    """The optimizer classes' call (state updated in place by the fused
    state pass) gives the torch path's updates and state, in the state's own
    tensors."""
    from lopt import functional

    mine = copy.deepcopy(state)
    with torch.no_grad():
        ref, ref_state = functional.update(net, spec, None, grads, state, params)
        out, out_state = functional.update(
            net, spec, None, grads, mine, params, guard=False, inplace=True, fused=True
        )
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    for key in ("momenta", "second_moment"):
        for a, b, held in zip(out_state[key], ref_state[key], mine[key]):
            torch.testing.assert_close(a, b)
            assert a.data_ptr() == held.data_ptr()  # written in place


def assert_fused_update_equals_torch(net, spec, params, seed):
    """One update of ``params`` (random gradients, then a random state from
    ``seed``) by the torch path and by the fused one: the updates agree and
    none is zero. Returns the fused and the torch path's new states."""
    from lopt import functional

    grads = [torch.randn_like(p) for p in params]
    state = random_state(params, seed)
    with torch.no_grad():
        ref, ref_state = functional.update(net, spec, None, grads, state, params)
        out, out_state = functional.update(net, spec, None, grads, state, params, fused=True)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        assert a.abs().sum() > 0
    return out_state, ref_state


KINDS = ["mlp", "mlp-budget", "nfn", "nfn-proj", "nfn-magnitude", "nfn-stats", "nfn-real-like"]


def strong(kind, depth=1):
    """A random net of ``kind`` whose learned term dominates the update."""
    from lopt.nets import NFNNet, PerParamMLP

    kw = dict(depth=depth, out_scale=1.0, step_mult=1e-2, lr=1e-4)
    if kind == "mlp":
        return PerParamMLP(**kw)
    if kind == "mlp-budget":
        return PerParamMLP(budget=True, **kw)
    net = NFNNet(
        nf_channels={"nfn-proj": 3, "nfn-real-like": 4}.get(kind),  # 4: the unrolled kernel
        nf_outputs="magnitude" if kind in ("nfn-magnitude", "nfn-real-like") else "both",
        neuron_stats=kind in ("nfn-stats", "nfn-real-like"),
        width_free_stats=kind == "nfn-real-like",
        term_in_adam_units=kind == "nfn-real-like",
        budget=kind == "nfn-real-like",
        role_rates=kind == "nfn-real-like",
        embedding_roles=kind == "nfn-real-like",
        term_schedule=kind == "nfn-real-like",
        loss_features=kind == "nfn-real-like",
        loss_anneal=kind == "nfn-real-like",
        **kw,
    )
    with torch.no_grad():
        if net.neuron_stats:
            net.stat_weight.normal_(std=0.3)
        if kind == "nfn-real-like":
            for rate in net.role_log_rate.values():
                rate.normal_(std=0.3)
            # About e**+-1 on the learned term, differing between tensors.
            net.term_schedule.weight.normal_(std=0.03)
            net.term_schedule.bias.normal_(std=0.03)
            net.term_snr_exp.fill_(0.05)
            net.loss_inp.weight.normal_(std=0.3)
            net.loss_schedule.weight.normal_(std=0.03)
            net.loss_term.weight.normal_(std=0.03)
            net.loss_anneal.weight.normal_(std=0.03)
    return net


def assert_same_step_from_the_same_point(model, a, twin, b, loss):
    """Give ``twin`` and its optimizer ``b`` the parameters and state of
    ``model`` and ``a``, take one step with each on ``loss(module)``: the
    two steps agree."""
    with torch.no_grad():
        for p, q in zip(model.parameters(), twin.parameters()):
            q.copy_(p)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    before = [p.detach().clone() for p in model.parameters()]
    for m, opt in ((model, a), (twin, b)):
        opt.zero_grad()
        loss(m).backward()
        opt.step()
    for p, q, p0 in zip(model.parameters(), twin.parameters(), before):
        torch.testing.assert_close(p - p0, q - p0, rtol=1e-4, atol=1e-6)


def optimizer_twins(cls, fused):
    """A small transformer LM and ``cls`` on it (shipped net, ``fused``),
    a copy of both with the torch path (``fused=False``), and a batch of
    tokens: ``(model, opt, twin, twin_opt, tokens)``."""
    import lopt
    from tasks.models import TransformerLM

    torch.manual_seed(0)
    model = TransformerLM(13, 8, 16, 4, 1)
    twin = copy.deepcopy(model)
    net = lopt.load("nfn-real" if cls is lopt.NFNOptimizer else "mlp-real")[0]
    a = cls(model.parameters(), model=model, net=net, fused=fused, total_steps=20)
    b = cls(twin.parameters(), model=twin, net=copy.deepcopy(net), fused=False, total_steps=20)
    return model, a, twin, b, torch.randint(0, 13, (4, 9))


def real_models():
    """A transformer LM (packed attention pieces, embeddings), a BatchNorm
    ResNet (4-axis convolutions) and a wide MLP, seeded."""
    from tasks.models import ResNet, TransformerLM

    torch.manual_seed(0)
    return {
        "transformer": TransformerLM(13, 8, 16, 4, 2),
        "resnet-bn": ResNet((3, 8, 8), 8, 2, 5),
        "wide-mlp": make_mlp([40, 300, 10]),
    }


def path_kwargs(path: str) -> dict:
    """What ``functional.update`` takes to run on a path ("torch", "multi"
    or "fused"), told a budget of 40 steps."""
    kwargs = {"total_steps": 40}
    if path == "fused":
        kwargs.update(fused=True, guard=False, inplace=True)
    elif path == "multi":
        kwargs.update(multi_tensor=True)
    return kwargs


def first_step(net, model, path: str):
    """One step of ``net`` on ``model``'s parameters from a fresh state,
    with seeded random gradients, on a path of ``functional.update``
    (:func:`path_kwargs`): ``(spec, grads, updates)``."""
    from lopt import functional

    spec = WeightSpaceSpec.from_module(model)
    params = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    state = functional.init(params)
    kwargs = path_kwargs(path)
    with torch.no_grad():
        out, _ = functional.update(net, spec, None, grads, state, params, **kwargs)
    return spec, grads, out


def schedule_closed_form(fractions, width=0.3, total_steps=1000) -> list[float]:
    """The schedule every budget net starts from, written out by hand (a
    naive reference for lopt.nets.schedule_prior): warm-up ``exp(2 (tanh(t /
    3) - 1))`` times the decay ``exp(-2.5 (1 - tanh((1 - f) / width) / tanh(1
    / width)))``, at step ``max(1, round(f * total_steps))`` for each f."""
    out = []
    for f in fractions:
        t = max(1, round(f * total_steps))
        decay = 1 - math.tanh((1 - t / total_steps) / width) / math.tanh(1 / width)
        out.append(math.exp(2.0 * (math.tanh(t / 3) - 1) - 2.5 * decay))
    return out
