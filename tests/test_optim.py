"""Learned optimizers as torch.optim optimizers."""

import copy
import math
import warnings

import pytest
import torch
from helpers import make_cnn, make_mlp, random_state
from torch import nn
from torch.nn import functional as F

import lopt
from lopt import WeightSpace, WeightSpaceSpec, features, functional
from lopt.features import EPS
from lopt.nets import NFNNet, PerParamMLP
from lopt.update_rule import UpdateRule

# The update with nothing but the net's outputs: no row projection, the width
# factor on every layer (the naive references below are written for it).
PLAIN = UpdateRule(learned_term_tangent=False, width_factor_on_input_layers=True)


def data(in_shape=(6,), n=64, classes=3, seed=0):
    """Inputs and the labels a random linear teacher gives them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *in_shape, generator=g)
    teacher = torch.randn(x[0].numel(), classes, generator=g)
    return x, (x.flatten(1) @ teacher).argmax(1)


def loss_of(model, x, y, scale=1.0):
    return F.cross_entropy(model(x), y) * scale


def train(model, opt, x, y, steps, scale=1.0):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model, x, y, scale)
        loss.backward()
        opt.step()
        losses.append(loss.item() / scale)
    return losses


def small_model(arch):
    """A 3-layer MLP or a small CNN (hidden groups to permute), and data for it."""
    if arch == "mlp":
        return make_mlp([6, 7, 5, 3]), *data()
    return make_cnn([2, 4, 3], [3, 3], 2, "flatten", 3, True, 4), *data((2, 4, 4))


def assert_trains_equivariantly(model, net, x, y, steps=10):
    """A twin of ``model`` with its hidden neurons permuted trains to the same
    losses under ``net`` (both models are trained)."""
    spec = WeightSpaceSpec.from_module(model)
    perms = {g: torch.randperm(n) for g, n in spec.hidden_groups().items()}
    twin = copy.deepcopy(model)
    params = [p.detach() for p in model.parameters()]
    moved = WeightSpace.from_tensors(spec, params).permute(perms).to_tensors()
    with torch.no_grad():
        for p, q in zip(twin.parameters(), moved):
            p.copy_(q)
    a = train(model, lopt.NFNOptimizer(model.parameters(), net=net, model=model), x, y, steps)
    b = train(twin, lopt.NFNOptimizer(twin.parameters(), net=net, model=twin), x, y, steps)
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-5)
    return a


def strong_net(cls=NFNNet, seed=0, rule=PLAIN):
    """A random net whose learned term dominates the update, so the tests
    exercise it rather than the Adam base."""
    torch.manual_seed(seed)
    return cls(out_scale=1.0, step_mult=1e-2, lr=1e-4, rule=rule)


def test_step_equals_functional_update():
    torch.manual_seed(0)
    model = make_mlp([6, 8, 3])
    twin = copy.deepcopy(model)
    net = strong_net()
    opt = lopt.NFNOptimizer(model.parameters(), net=net)
    x, y = data()
    spec = WeightSpaceSpec.from_module(twin)
    params = [p.detach().clone() for p in twin.parameters()]
    state = functional.init(params)
    for _ in range(5):
        train(model, opt, x, y, 1)
        with torch.enable_grad():
            ps = [p.requires_grad_() for p in params]
            loss = F.cross_entropy(
                torch.func.functional_call(
                    twin, dict(zip([n for n, _ in twin.named_parameters()], ps)), (x,)
                ),
                y,
            )
            grads = torch.autograd.grad(loss, ps)
        with torch.no_grad():
            updates, state = functional.update(net, spec, None, grads, state, params)
            params = functional.apply_updates([p.detach() for p in params], updates)
    for p, q in zip(model.parameters(), params):
        torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("tangent", [False, True])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_training_commutes_with_hidden_permutations(arch, tangent):
    torch.manual_seed(1)
    if arch == "mlp":
        model, x, y = make_mlp([6, 7, 5, 3]), *data()
    else:
        model, x, y = make_cnn([2, 4, 3], [3, 3], 2, "flatten", 3, True, 4), *data((2, 4, 4))
    spec = WeightSpaceSpec.from_module(model)
    perms = {g: torch.randperm(n) for g, n in spec.hidden_groups().items()}
    twin = copy.deepcopy(model)
    permuted = WeightSpace.from_tensors(spec, [p.detach() for p in model.parameters()]).permute(
        perms
    )
    with torch.no_grad():
        for p, q in zip(twin.parameters(), permuted.to_tensors()):
            p.copy_(q)
    net = strong_net(rule=UpdateRule(learned_term_tangent=tangent))
    a = train(model, lopt.NFNOptimizer(model.parameters(), net=net, model=model), x, y, 20)
    b = train(twin, lopt.NFNOptimizer(twin.parameters(), net=net, model=twin), x, y, 20)
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-5)
    final = WeightSpace.from_tensors(spec, [p.detach() for p in model.parameters()]).permute(perms)
    for p, q in zip(twin.parameters(), final.to_tensors()):
        torch.testing.assert_close(p.detach(), q, rtol=1e-3, atol=1e-5)
    # The equivariant layer matters: without it the trajectory differs.
    silent = copy.deepcopy(net)
    with torch.no_grad():
        for w in list(silent.nf.weights.values()) + list(silent.nf.biases.values()):
            w.zero_()
    torch.manual_seed(1)
    fresh = (
        make_mlp([6, 7, 5, 3])
        if arch == "mlp"
        else make_cnn([2, 4, 3], [3, 3], 2, "flatten", 3, True, 4)
    )
    c = train(fresh, lopt.NFNOptimizer(fresh.parameters(), net=silent, model=fresh), x, y, 20)
    assert abs(c[-1] - a[-1]) > 1e-4


@pytest.mark.parametrize("cls", [NFNNet, PerParamMLP])
@pytest.mark.parametrize("rule", [PLAIN, UpdateRule()])
def test_update_is_invariant_to_loss_scale(cls, rule):
    torch.manual_seed(2)
    model = make_mlp([6, 8, 5, 3])
    twin = copy.deepcopy(model)
    net = strong_net(cls, rule=rule)
    x, y = data()
    opt_a = lopt.LearnedOptimizer(model.parameters(), net=net)
    opt_b = lopt.LearnedOptimizer(twin.parameters(), net=net)
    train(model, opt_a, x, y, 10)
    train(twin, opt_b, x, y, 10, scale=1000.0)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [lopt.NFNOptimizer, lopt.MLPOptimizer])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fresh_optimizer_is_sane(cls, seed):
    torch.manual_seed(seed)
    model = make_mlp([6, 16, 3])
    x, y = data(seed=seed)
    losses = train(model, cls(model.parameters()), x, y, 100)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]


def test_state_dict_resume_is_bit_identical():
    torch.manual_seed(3)
    model = make_mlp([6, 8, 3])
    x, y = data()
    net = strong_net()
    opt = lopt.NFNOptimizer(model.parameters(), net=net)
    train(model, opt, x, y, 5)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    train(model, opt, x, y, 5)
    resumed = make_mlp([6, 8, 3])
    resumed.load_state_dict(saved_model)
    opt2 = lopt.NFNOptimizer(resumed.parameters(), net=net)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, x, y, 5)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_round_trip_and_shipped_names(tmp_path, monkeypatch):
    net = strong_net()
    path = tmp_path / "mine.pt"
    lopt.save(net, path, {"note": "test"})
    loaded, meta = lopt.load(path)
    assert isinstance(loaded, NFNNet) and meta == {"note": "test"}
    for (k, a), b in zip(net.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    model = make_mlp([6, 8, 3])
    opt = lopt.NFNOptimizer(model.parameters(), weights=str(path))
    assert opt.metadata == {"note": "test"}
    # A shipped name is a file in lopt/pretrained/.
    monkeypatch.setattr(lopt.checkpoint, "PRETRAINED_DIR", tmp_path)
    assert "mine" in lopt.pretrained_names()
    opt = lopt.NFNOptimizer(model.parameters(), weights="mine")
    assert torch.equal(opt.net.log_lr, net.log_lr)


def test_bad_checkpoints_give_clear_errors(tmp_path):
    net = strong_net()
    good = tmp_path / "good.pt"
    lopt.save(net, good)
    params = make_mlp([6, 8, 3]).parameters
    with pytest.raises(FileNotFoundError, match="not a shipped name"):
        lopt.NFNOptimizer(params(), weights="no-such-optimizer")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable checkpoint: corrupt, truncated"):
        lopt.NFNOptimizer(params(), weights=truncated)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="not an lopt optimizer-net checkpoint"):
        lopt.load(other)
    with pytest.raises(ValueError, match="holds a NFNNet, but a PerParamMLP is needed"):
        lopt.MLPOptimizer(params(), weights=good)
    payload = torch.load(good, weights_only=True)
    payload["config"]["width"] = 8
    wrong = tmp_path / "wrong.pt"
    torch.save(payload, wrong)
    with pytest.raises(ValueError, match="weights do not fit a NFNNet"):
        lopt.load(wrong)
    payload["version"] = 99
    torch.save(payload, wrong)
    with pytest.raises(ValueError, match="newer than this"):
        lopt.load(wrong)


def test_params_without_grad_are_skipped():
    model = make_mlp([6, 8, 3])
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    opt = lopt.NFNOptimizer(model.parameters(), model=model)
    train(model, opt, *data(), 3)
    assert torch.equal(model[0].weight, frozen)
    assert len(opt.state[model[0].weight]) == 0
    assert opt.state[model[2].weight]["step"].item() == 3


@pytest.mark.parametrize("fused", [True, False])
def test_nonfinite_gradient_skips_the_step(fused):
    torch.manual_seed(4)
    model = make_mlp([6, 8, 3])
    opt = lopt.NFNOptimizer(model.parameters(), fused=fused)
    x, y = data()
    train(model, opt, x, y, 3)
    before = [p.detach().clone() for p in model.parameters()]
    state_before = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    loss_of(model, x, y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    model[2].bias.grad[0] = float("inf")
    opt.step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    after = opt.state_dict()["state"]
    for i, st in state_before["state"].items():
        for k in ("momenta", "second_moment", "step"):
            assert torch.equal(after[i][k], st[k])
        assert after[i]["skipped"].item() == 1
    train(model, opt, x, y, 1)  # and it carries on
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.state[model[0].weight]["step"].item() == 4


def test_nonfinite_net_output_is_never_written():
    model = make_mlp([6, 8, 3])
    net = NFNNet()
    with torch.no_grad():
        net.out.bias.fill_(float("nan"))
    opt = lopt.NFNOptimizer(model.parameters(), net=net)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, *data(), 2)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    assert opt.state[model[0].weight]["skipped"].item() == 2


def test_sparse_gradients_raise():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = lopt.NFNOptimizer(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_bad_spec_and_arguments_are_named():
    model = make_mlp([6, 8, 3])
    spec = WeightSpaceSpec.from_module(make_mlp([6, 9, 3]))
    with pytest.raises(ValueError, match="parameter '0.weight' has shape \\(8, 6\\)"):
        lopt.NFNOptimizer(model.parameters(), spec=spec)
    with pytest.raises(ValueError, match="either spec= or model="):
        lopt.NFNOptimizer(model.parameters(), spec=spec, model=model)
    with pytest.raises(TypeError, match="needs a NFNNet"):
        lopt.NFNOptimizer(model.parameters(), net=PerParamMLP())
    with pytest.raises(ValueError, match="width and depth must be positive"):
        lopt.NFNOptimizer(model.parameters(), weights=None, width=0)


def test_modules_that_do_not_fit_the_weight_space_still_train():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(12, 6)
            self.fc = nn.Linear(6, 8)
            self.norm = nn.LayerNorm(8)
            self.scale = nn.Parameter(torch.ones(2, 2, 2, 2))
            self.out = nn.Linear(8, 3)

        def forward(self, idx):
            h = self.norm(torch.relu(self.fc(self.emb(idx))))
            return self.out(h) * self.scale.mean()

    torch.manual_seed(5)
    model = Net()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx, y = torch.randint(0, 12, (64,)), torch.randint(0, 3, (64,))
    losses = train(model, lopt.NFNOptimizer(model.parameters(), model=model), idx, y, 30)
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), n


def test_param_groups_and_bfloat16():
    torch.manual_seed(6)
    model = make_mlp([6, 8, 3]).to(torch.bfloat16)
    opt = lopt.NFNOptimizer([{"params": model[0].parameters()}, {"params": model[2].parameters()}])
    x, y = data()
    losses = train(model, opt, x.to(torch.bfloat16), y, 40)
    assert losses[-1] < losses[0]
    assert opt.state[model[0].weight]["momenta"].dtype == torch.float32
    resumed = lopt.NFNOptimizer(
        [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    )
    resumed.load_state_dict(opt.state_dict())
    assert resumed.state[model[0].weight]["momenta"].dtype == torch.float32


def test_functional_update_vmaps_over_a_population_of_nets():
    torch.manual_seed(7)
    model = make_mlp([6, 8, 3])
    spec = WeightSpaceSpec.from_module(model)
    params = [p.detach() for p in model.parameters()]
    grads = [torch.randn_like(p) for p in params]
    state = functional.init(params)
    net = NFNNet()
    population = [dict(NFNNet(out_scale=1.0).named_parameters()) for _ in range(3)]
    stacked = {k: torch.stack([m[k].detach() for m in population]) for k in population[0]}

    def one(net_params):
        return functional.update(net, spec, net_params, grads, state, params)[0]

    batched = torch.func.vmap(one)(stacked)
    for i, m in enumerate(population):
        single = one({k: v.detach() for k, v in m.items()})
        for a, b in zip(batched, single):
            torch.testing.assert_close(a[i], b)


@pytest.mark.slow
def test_torch_compiled_model():
    """A compiled model's graph is read from the model it wraps. The backend
    does not matter to the optimizer (it sees the wrapper, its parameters and
    their gradients): aot_eager traces as inductor does without its code
    generation, the slow part."""
    torch.manual_seed(8)
    model = make_mlp([6, 8, 3])
    compiled = torch.compile(model, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert WeightSpaceSpec.from_module(compiled) == WeightSpaceSpec.from_module(model)
        opt = lopt.NFNOptimizer(compiled.parameters(), model=compiled)
    losses = train(compiled, opt, *data(), 20)
    assert losses[-1] < losses[0]


def test_slices_are_whole_tensors_off_the_cpu():
    """On the CPU slices keep activations in cache; on a GPU, where a step of
    small tensors is bound by kernel launches, a 1024 x 1024 weight is one
    slice (the numbers do not depend on the slicing: the test below)."""
    from lopt import nets

    assert nets.slice_entries(torch.device("cpu")) == nets.CHUNK < 1024 * 1024
    assert nets.slice_entries(torch.device("cuda")) >= 1024 * 1024
    assert nets.slice_entries(torch.device("meta")) == nets.GPU_CHUNK


@pytest.mark.parametrize(
    "cls,extra",
    [
        (NFNNet, {}),
        (NFNNet, {"nf_channels": 3, "nf_scale": 0.1}),
        (PerParamMLP, {}),
    ],
)
@pytest.mark.parametrize("chunk", [3, 10_000])
def test_sliced_net_equals_the_plain_layers(cls, extra, chunk, monkeypatch):
    """The nets run slice by slice and assemble the NF-layer from pooled
    means; the result is the plain composition of the layers on the whole
    normalised feature weight space."""
    from lopt import features, nets

    monkeypatch.setattr(nets, "CHUNK", chunk)
    torch.manual_seed(9)
    model = make_cnn([2, 4, 3], [3, 3], 2, "flatten", 3, True, 4)
    spec = WeightSpaceSpec.from_module(model)
    params = [p.detach() for p in model.parameters()]
    grads = [torch.randn_like(p) for p in params]
    momenta = [torch.randn(4, *p.shape) for p in params]
    second = [torch.rand_like(p) for p in params]
    step = torch.tensor(7.0)
    torch.manual_seed(0)
    net = cls(out_scale=1.0, step_mult=1e-2, lr=1e-4, rule=PLAIN, **extra)
    got = net(spec, params, grads, momenta, second, step)

    ws = features.entry_features(spec, params, grads, momenta, second, step)
    enc = net.step_inp(features.step_features(step))
    h = ws.map(lambda x: torch.relu(net.inp(x) + enc))
    for layer in net.hidden:
        h = h.map(lambda x, layer=layer: torch.relu(layer(x)))
    out = h.map(net.out)
    if cls is NFNNet:
        hp = h if net.nf_proj is None else h.map(net.nf_proj)
        out = out + net.nf_scale * net.nf(hp)
    c1, c2 = features.bias_corrections(step)
    for t, u, o, m, v in zip(spec.tensors, got, out.tensors, momenta, second):
        adam = m[1] / c1 / ((v / c2).sqrt() + features.EPS)
        base = net.log_lr.exp() * adam
        d, mag = o[..., 0].reshape(t.shape), o[..., 1].reshape(t.shape)
        want = -(base + net.log_step_mult.exp() * d * torch.exp(net.mag_mult * mag))
        torch.testing.assert_close(
            u, want, rtol=1e-4, atol=1e-7, msg=lambda m, n=t.name: f"{n}: {m}"
        )


def width_factor_updates(model, net, exponent):
    """(params, grads, updates at exponent 0, updates at ``exponent``) of
    ``net`` for one step from fresh state."""
    params = [p.detach().clone() for p in model.parameters()]
    grads = [torch.randn_like(p) for p in params]
    spec = WeightSpaceSpec.from_module(model)
    state = functional.init(params)
    base, _ = functional.update(net, spec, None, grads, state, params)
    with torch.no_grad():
        net.fan_in_exp.fill_(exponent)
    scaled, _ = functional.update(net, spec, None, grads, state, params)
    return params, grads, base, scaled


def assert_class_step_takes(model, net, params, grads, want):
    """The optimizer class's (fused) step with ``net`` on ``model`` (at
    ``params``, with ``grads``) moves it by ``want``."""
    opt_cls = lopt.NFNOptimizer if isinstance(net, NFNNet) else lopt.MLPOptimizer
    opt = opt_cls(model.parameters(), net=net, model=model)
    for q, g in zip(model.parameters(), grads):
        q.grad = g.clone()
    opt.step()
    for q, p, u in zip(model.parameters(), params, want):
        torch.testing.assert_close(q.detach() - p, u, rtol=1e-3, atol=1e-7)  # float32 params


def assert_rule_is_kept(model, net, params, grads, want, tmp_path):
    """The optimizer class's (fused) step with ``net`` from ``params`` with
    ``grads`` adds ``want``, and the net's rule survives a checkpoint."""
    assert_class_step_takes(model, net, params, grads, want)
    lopt.save(net, tmp_path / "n.pt")
    assert lopt.load(tmp_path / "n.pt")[0].rule == net.rule


@pytest.mark.parametrize("cls", [NFNNet, PerParamMLP])
def test_width_factor_scales_each_tensor_by_its_fan_in(cls):
    # Naive reference: the update of a net with exponent a is the update of
    # the same net with exponent 0, times (64 / fan_in) ** a per tensor of 2+
    # axes (fan-in: all but the first axis), and unscaled for 1-D tensors.
    torch.manual_seed(0)
    model = make_cnn([2, 4, 8], [3, 5])
    params, _, base, scaled = width_factor_updates(model, strong_net(cls), 0.7)
    for p, u0, u in zip(params, base, scaled):
        fan_in = p[0].numel() if p.dim() >= 2 else 64
        torch.testing.assert_close(u, u0 * (64 / fan_in) ** 0.7, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("cls", [NFNNet, PerParamMLP])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_input_layers_keep_width_factor_one_by_default(cls, arch, tmp_path):
    # Naive reference as above, except that the weight reading the network's
    # input (the first layer's) keeps factor 1; the fused optimizer step agrees.
    torch.manual_seed(1)
    model = make_mlp([16, 8, 4, 3]) if arch == "mlp" else make_cnn([1, 4, 8], [3, 3])
    net = strong_net(cls, rule=UpdateRule(learned_term_tangent=False))
    assert UpdateRule().width_factor_on_input_layers is False
    params, grads, base, scaled = width_factor_updates(model, net, 0.7)
    for i, (p, u0, u) in enumerate(zip(params, base, scaled)):
        fan_in = 64 if p.dim() < 2 or i == 0 else p[0].numel()
        torch.testing.assert_close(u, u0 * (64 / fan_in) ** 0.7, rtol=1e-5, atol=1e-9)
    assert_rule_is_kept(model, net, params, grads, scaled, tmp_path)


@pytest.mark.parametrize("cls", [NFNNet, PerParamMLP])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_learned_term_tangent_removes_the_learned_term_along_each_row(cls, arch, tmp_path):
    # Naive reference, a loop over rows: the update with the rule's tangent
    # projection is the update without it, minus the part of its learned term
    # (update minus -lr * factor * Adam's direction) along that row of the weight.
    torch.manual_seed(2)
    model = make_mlp([5, 7, 4]) if arch == "mlp" else make_cnn([2, 4, 3], [3, 3])
    torch.manual_seed(0)
    net = cls(out_scale=1.0, step_mult=1e-2, lr=1e-2, rule=PLAIN)
    with torch.no_grad():
        net.fan_in_exp.fill_(0.5)
    rule = UpdateRule(learned_term_tangent=True, width_factor_on_input_layers=True)
    tangent = cls(out_scale=1.0, step_mult=1e-2, lr=1e-2, rule=rule)
    tangent.load_state_dict(net.state_dict())
    assert tangent.rule.learned_term_tangent
    params = [p.detach().clone() for p in model.parameters()]
    grads = [torch.randn_like(p) for p in params]
    spec = WeightSpaceSpec.from_module(model)
    state = functional.init(params)
    on, after = functional.update(net, spec, None, grads, state, params)
    off, _ = functional.update(tangent, spec, None, grads, state, params)
    c1, c2 = features.bias_corrections(after["step"])
    for p, u_on, u_off, m, v in zip(params, on, off, after["momenta"], after["second_moment"]):
        if p.dim() < 2:
            torch.testing.assert_close(u_off, u_on, rtol=0, atol=0)
            continue
        factor = (64 / p[0].numel()) ** 0.5
        base = -net.log_lr.exp().item() * factor * m[1] / c1 / ((v / c2).sqrt() + features.EPS)
        for r in range(p.shape[0]):
            w, learned = p[r].flatten(), (u_on[r] - base[r]).detach().flatten()
            want = u_on[r].flatten() - (learned @ w) / (w @ w) * w
            torch.testing.assert_close(u_off[r].flatten(), want, rtol=1e-4, atol=1e-8)
            assert abs(float((u_off[r] - base[r]).detach().flatten() @ w)) < 1e-5 * float(w.norm())
        assert not torch.allclose(u_off, u_on)  # the learned term had a radial part
    assert_rule_is_kept(model, tangent, params, grads, off, tmp_path)


def test_version_1_checkpoints_load_without_a_width_factor(tmp_path):
    torch.manual_seed(0)
    net = NFNNet(out_scale=1.0, step_mult=1e-2, lr=1e-4, attention_roles=False)
    path = tmp_path / "v1.pt"
    lopt.save(net, path)
    payload = torch.load(path, weights_only=True)
    payload["version"] = 1
    del payload["state_dict"]["fan_in_exp"], payload["config"]["fan_in_exp"]
    del payload["config"]["attention_roles"], payload["config"]["rule"]
    torch.save(payload, path)
    loaded, _ = lopt.load(path)
    assert loaded.fan_in_exp.item() == 0.0
    assert loaded.rule == PLAIN  # what nets did before the rule had a choice
    assert torch.equal(loaded.log_lr, net.log_lr)


def _as_version_5(path, **config):
    """Rewrite the checkpoint at ``path`` as format 5 wrote it: the rule as
    two switches (one inverted), plus ``config``."""
    payload = torch.load(path, weights_only=True)
    rule = payload["config"].pop("rule")
    payload["version"] = 5
    payload["config"].update(
        radial_correction=not rule["learned_term_tangent"],
        input_width_factor=rule["width_factor_on_input_layers"],
        **config,
    )
    torch.save(payload, path)


@pytest.mark.parametrize("tangent", [False, True])
def test_version_5_checkpoints_load_their_switches_as_the_update_rule(tangent, tmp_path):
    """Format 5 stored the rule as radial_correction (the inverse of the
    tangent projection) and input_width_factor, and hand-set guards: the
    switches load as the rule, guards at their off value load silently, and
    guards that were on are dropped with a warning that names them."""
    net = strong_net(rule=UpdateRule(learned_term_tangent=tangent))
    path = tmp_path / "v5.pt"
    lopt.save(net, path)
    _as_version_5(path, step_cap=0.0, ortho_lr=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded, _ = lopt.load(path)
    assert loaded.rule == net.rule
    assert "radial_correction" not in loaded.config and "step_cap" not in loaded.config
    for (k, a), b in zip(loaded.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b), k


def test_version_5_checkpoints_drop_their_guards_with_a_warning(tmp_path):
    path = tmp_path / "v5.pt"
    lopt.save(strong_net(), path)
    _as_version_5(path, step_cap=0.02, adam_cap=3.0, decay_after=200.0, decay_power=1.0)
    with pytest.warns(
        UserWarning, match="step_cap=0.02, adam_cap=3, decay_after=200, hand-set"
    ) as w:
        loaded, _ = lopt.load(path)
    assert w[0].filename == __file__
    assert loaded.rule == PLAIN
    assert not {"step_cap", "adam_cap", "decay_after", "decay_power"} & set(loaded.config)


def test_version_5_checkpoints_on_the_orthogonalised_base_are_refused(tmp_path):
    path = tmp_path / "v5.pt"
    lopt.save(PerParamMLP(), path)
    _as_version_5(path, ortho_lr=0.05)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="orthogonalised momentum .ortho_lr., which this version"):
        lopt.load(path)
    assert path.read_bytes() == before


def test_update_rule_refuses_bad_settings_and_is_fixed_once_built():
    with pytest.raises(TypeError, match="learned_term_tangent must be True or False, got 1"):
        UpdateRule(learned_term_tangent=1)
    with pytest.raises(ValueError, match="unknown UpdateRule setting 'radial_correction'"):
        UpdateRule.from_dict({"radial_correction": False})
    with pytest.raises(TypeError, match="rule must be an UpdateRule, a dict or None, got str"):
        NFNNet(rule="tangent")
    net = NFNNet(rule={"learned_term_tangent": False})
    assert net.rule == UpdateRule(learned_term_tangent=False)
    with pytest.raises(AttributeError):
        net.rule.learned_term_tangent = True
    with pytest.raises(AttributeError):
        net.rule = UpdateRule()
    want = {"learned_term_tangent": False, "width_factor_on_input_layers": False}
    assert net.config["rule"] == want


def test_version_3_nfn_checkpoints_load_without_attention_roles(tmp_path):
    """Files older than format 4 have no NF-layer weights for attention's
    roles: they load as nets without them, which update attention tensors by
    the per-entry path; a net saved now keeps them."""
    fresh = strong_net()
    path = tmp_path / "v3.pt"
    lopt.save(NFNNet(attention_roles=False), path)
    payload = torch.load(path, weights_only=True)
    payload["version"] = 3
    del payload["config"]["attention_roles"]
    torch.save(payload, path)
    old, _ = lopt.load(path)
    assert old.config["attention_roles"] is False
    assert fresh.config["attention_roles"] is True
    assert any(k.startswith("lanh") for k in fresh.nf.weights)
    assert not any(k.startswith("lanh") for k in old.nf.weights)
    lopt.save(fresh, tmp_path / "v4.pt")
    back, _ = lopt.load(tmp_path / "v4.pt")
    assert back.state_dict().keys() == fresh.state_dict().keys()


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_magnitude_only_nf_layer_is_a_both_net_with_no_direction_term(arch, tmp_path):
    """nf_outputs="magnitude": the same update as a "both" net whose NF-layer
    writes nothing to the direction, so the learned term only rescales (its
    signs are the per-entry path's); trains equivariantly; saved and loaded
    with its setting; a bad value is named."""
    torch.manual_seed(3)
    model, x, y = small_model(arch)
    spec = WeightSpaceSpec.from_module(model)
    mag = NFNNet(
        out_scale=1.0, step_mult=1e-2, lr=1e-4, nf_channels=3, nf_outputs="magnitude", rule=PLAIN
    )
    with torch.no_grad():
        for w in mag.nf.parameters():
            w.mul_(100)  # as large as the per-entry path's
    both = NFNNet(out_scale=1.0, step_mult=1e-2, lr=1e-4, nf_channels=3, rule=PLAIN)
    state = {k: v for k, v in mag.state_dict().items() if not k.startswith("nf.")}
    both.load_state_dict(state, strict=False)
    with torch.no_grad():
        for (name, w), (_, v) in zip(both.nf.named_parameters(), mag.nf.named_parameters()):
            assert w.shape[:-1] == v.shape[:-1] and (w.shape[-1], v.shape[-1]) == (2, 1), name
            w[..., 0] = 0
            w[..., 1] = v[..., 0]
    off = copy.deepcopy(mag)
    off.nf_scale = 0.0
    params = [p.detach() for p in model.parameters()]
    loss = loss_of(model, x, y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    state0 = functional.init(params)
    with torch.no_grad():
        u_mag, _ = functional.update(mag, spec, None, grads, state0, params)
        u_both, _ = functional.update(both, spec, None, grads, state0, params)
        u_off, _ = functional.update(off, spec, None, grads, state0, params)
        base, _ = functional.update(
            off, spec, {**dict(off.named_parameters()), "log_step_mult": torch.tensor(-1e9)},
            grads, state0, params,
        )  # fmt: skip
    changed = 0.0
    for a, b, c, d in zip(u_mag, u_both, u_off, base):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
        learned, learned_off = a - d, c - d
        # Only rescaled: never the other sign, and never from zero.
        assert (learned * learned_off >= 0).all()
        assert ((learned == 0) == (learned_off == 0)).all()
        changed += (learned - learned_off).abs().sum().item()
    assert changed > 0
    assert_trains_equivariantly(model, mag, x, y)
    # Saved with its setting; a "both" net's config is as before the option.
    lopt.save(mag, tmp_path / "mag.pt")
    back, _ = lopt.load(tmp_path / "mag.pt")
    assert back.nf_outputs == "magnitude" and back.config["nf_outputs"] == "magnitude"
    assert "nf_outputs" not in both.config and both.nf_outputs == "both"
    with pytest.raises(
        ValueError, match=r"nf_outputs must be one of \('both', 'magnitude'\), got 'dir'"
    ):
        NFNNet(nf_outputs="dir")


def naive_stat_log_factor(t, p, g, adam, w, width_free=False):
    """The log-factor neuron statistics put on the learned term, entry by
    entry from explicit loops over rows and columns (the reference for
    lopt.nets.neuron_stats)."""
    from lopt.nets import FAN_IN_REF, STAT_FLOOR, STAT_POOLS

    f2 = STAT_FLOOR**2
    fan_in = math.prod(t.shape[1:])
    shift = 0.5 * math.log(fan_in / FAN_IN_REF) if width_free and len(t.shape) >= 2 else 0.0
    P, G, D = (x.reshape(t.view) for x in (p, g, adam))
    g_all = G.pow(2).mean()
    gf = f2 * g_all + 1e-30

    def stats(sel):
        rel = 0.5 * torch.log(G[sel].pow(2).mean() + gf) - 0.5 * torch.log(g_all + gf)
        return torch.stack(
            [
                0.5 * torch.log(P[sel].pow(2).mean() + f2) + shift,
                0.5 * torch.log(D[sel].pow(2).mean() + f2),
                rel,
            ]
        )

    out = torch.zeros(t.view)
    if len(t.view) == 1:
        return out + stats(slice(None)) @ w[STAT_POOLS.index("vector")]
    whole = stats(slice(None)) @ w[STAT_POOLS.index("tensor")]
    for i in range(t.view[0]):
        for j in range(t.view[1]):
            row = stats((i,)) @ w[STAT_POOLS.index("row")]
            col = stats((slice(None), j)) @ w[STAT_POOLS.index("column")]
            out[i, j] = row + col + whole
    return out


@pytest.mark.parametrize(
    "arch,width_free", [("mlp", False), ("cnn", False), ("mlp", True), ("cnn", True)]
)
def test_neuron_stats_rescale_the_learned_term_by_per_neuron_norms(arch, width_free, tmp_path):
    """neuron_stats=True: the learned term is the same net's without them
    times exp(a linear map of per-row, per-column and per-tensor log norms),
    checked against loops (with width_free_stats, the weights' log norm
    relative to a width-scaled init); zero coefficients change nothing and
    nf_scale=0 removes them; it trains equivariantly and loss-scale
    invariantly, and is saved with its setting."""
    torch.manual_seed(4)
    model, x, y = small_model(arch)
    spec = WeightSpaceSpec.from_module(model)
    on = NFNNet(
        out_scale=1.0, step_mult=1e-2, lr=1e-4, nf_channels=3, neuron_stats=True,
        width_free_stats=width_free, rule=PLAIN,
    )  # fmt: skip
    off = NFNNet(out_scale=1.0, step_mult=1e-2, lr=1e-4, nf_channels=3, rule=PLAIN)
    off.load_state_dict({k: v for k, v in on.state_dict().items() if k != "stat_weight"})
    params = [p.detach() for p in model.parameters()]
    loss = loss_of(model, x, y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    state0 = functional.init(params)

    def step(net, state=state0, **theta):
        with torch.no_grad():
            return functional.update(
                net, spec, {**dict(net.named_parameters()), **theta} if theta else None,
                grads, state, params,
            )  # fmt: skip

    u_off, state1 = step(off)
    for a, b in zip(step(on)[0], u_off):  # zero coefficients: no change
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        on.stat_weight.normal_(std=0.3)
    # A second step, so momenta and second moments are not the gradient's.
    u_on, _ = step(on, state1)
    u_off, _ = step(off, state1)
    base, _ = step(off, state1, log_step_mult=torch.tensor(-1e9))
    c1, c2 = features.bias_corrections(state1["step"] + 1)
    _, s2 = step(off, state1)  # the state this step's features read
    changed = 0.0
    for i, t in enumerate(spec.tensors):
        m, v = s2["momenta"][i][features.ADAM_MOMENTUM], s2["second_moment"][i]
        adam = m / c1 / ((v / c2).sqrt() + features.EPS)
        log_f = naive_stat_log_factor(
            t, params[i], grads[i], adam, on.stat_weight.detach(), width_free
        )
        want = (u_off[i] - base[i]) * log_f.exp().reshape(t.shape)
        torch.testing.assert_close(u_on[i] - base[i], want, rtol=1e-4, atol=1e-9)
        changed += (u_on[i] - u_off[i]).abs().sum().item()
    assert changed > 0
    ablated = copy.deepcopy(on)
    ablated.nf_scale = 0.0
    for a, b in zip(
        step(ablated, state1)[0], step(ablated, state1, stat_weight=torch.zeros(4, 3))[0]
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    start = copy.deepcopy(model)
    assert_trains_equivariantly(model, on, x, y)
    # Loss-scale invariant: every statistic is a ratio of gradients or none.
    scaled = start
    train(scaled, lopt.NFNOptimizer(scaled.parameters(), net=on, model=scaled), x, y, 10, 1000.0)
    for p, q in zip(model.parameters(), scaled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    # Saved with its setting; a net without them has the config it had.
    lopt.save(on, tmp_path / "on.pt")
    back, _ = lopt.load(tmp_path / "on.pt")
    assert back.neuron_stats and back.config["neuron_stats"] is True
    assert back.width_free_stats is width_free
    assert ("width_free_stats" in back.config) is width_free
    assert torch.equal(back.stat_weight, on.stat_weight)
    assert "neuron_stats" not in off.config and not off.neuron_stats


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_term_in_adam_units_scales_each_learned_term_by_adam_s_rms(arch):
    """term_in_adam_units=True: each tensor's learned term is that of the
    same net without it times sqrt(mean(adam^2) + floor^2) over the tensor,
    computed naively, on top of the learned coefficients; it needs the
    neuron statistics."""
    torch.manual_seed(5)
    model, x, y = small_model(arch)
    spec = WeightSpaceSpec.from_module(model)
    kw = dict(out_scale=1.0, step_mult=1e-2, lr=1e-4, nf_channels=3, neuron_stats=True, rule=PLAIN)
    off = NFNNet(**kw)
    with torch.no_grad():
        off.stat_weight.normal_(std=0.3)
    on = NFNNet(**kw, term_in_adam_units=True)
    on.load_state_dict(off.state_dict())
    assert on.config["term_in_adam_units"] is True and "term_in_adam_units" not in off.config
    params = [p.detach() for p in model.parameters()]
    grads = torch.autograd.grad(loss_of(model, x, y), list(model.parameters()))
    state = random_state(params, 5)  # Adam's direction far from unit RMS

    def step(net, **theta):
        with torch.no_grad():
            th = {**dict(net.named_parameters()), **theta}
            return functional.update(net, spec, th, grads, state, params)

    u_on, s2 = step(on)
    u_off, _ = step(off)
    base, _ = step(off, log_step_mult=torch.tensor(-1e9))
    c1, c2 = features.bias_corrections(s2["step"])
    fixed = torch.zeros(4, 3)  # pools row, column, tensor, vector; Adam's direction second
    fixed[2, 1] = fixed[3, 1] = 1.0
    factors = []
    for i, t in enumerate(spec.tensors):
        m, v = s2["momenta"][i][features.ADAM_MOMENTUM], s2["second_moment"][i]
        adam = m / c1 / ((v / c2).sqrt() + features.EPS)
        log_f = naive_stat_log_factor(t, params[i], grads[i], adam, fixed)
        assert log_f.std() < 1e-6  # one factor per tensor
        factors.append(log_f.mean().item())
        want = (u_off[i] - base[i]) * log_f.exp().reshape(t.shape)
        torch.testing.assert_close(u_on[i] - base[i], want, rtol=1e-4, atol=1e-10)
    assert max(map(abs, factors)) > 0.5
    with pytest.raises(ValueError, match="term_in_adam_units=True needs neuron_stats=True"):
        NFNNet(term_in_adam_units=True)


def test_width_free_weight_statistic_reads_the_same_at_init_across_widths():
    """At a default init, a layer 4x wider has weights half the RMS: the raw
    log-RMS statistic falls by log 2 with width, the width-free one does not
    (to within sampling); a width-free net without statistics is refused."""
    from lopt.nets import neuron_stats

    torch.manual_seed(0)
    raw, free = {}, {}
    for fan_in in (64, 256):
        layer = nn.Linear(fan_in, 128)
        t = WeightSpaceSpec.from_module(layer).tensors[0]
        w = layer.weight.detach()
        ones = torch.ones_like(w)
        raw[fan_in] = neuron_stats(t, w, ones, ones)["tensor"][..., 0].item()
        free[fan_in] = neuron_stats(t, w, ones, ones, width_free=True)["tensor"][..., 0].item()
    assert raw[64] - raw[256] == pytest.approx(math.log(2), abs=0.02)
    assert free[64] == pytest.approx(free[256], abs=0.02)
    with pytest.raises(ValueError, match="width_free_stats needs neuron_stats=True"):
        NFNNet(width_free_stats=True)


def test_base_updates_are_adams_step_and_change_nothing():
    """LearnedOptimizer.base_updates: at the first step Adam's part is
    -lr * g / (|g| + eps) per entry (a naive reference); it leaves the
    parameters and the optimizer state as they were, gives None for a
    parameter without a gradient, and the next step() is unchanged by it."""
    torch.manual_seed(7)
    model, x, y = small_model("mlp")
    net = PerParamMLP(out_scale=1.0, step_mult=0.3, lr=1e-2)
    twin = copy.deepcopy(model)
    opt = lopt.MLPOptimizer(model.parameters(), net=net, model=model)
    ref = lopt.MLPOptimizer(twin.parameters(), net=copy.deepcopy(net), model=twin)
    loss_of(model, x, y).backward()
    loss_of(twin, x, y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    bases = opt.base_updates()
    for b, p in zip(bases, model.parameters()):
        g = p.grad
        torch.testing.assert_close(b, -1e-2 * g / (g.abs() + EPS), rtol=1e-5, atol=1e-7)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)
    assert not opt.state
    opt.step()
    ref.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
    first = next(model.parameters())
    first.grad = None
    assert opt.base_updates()[0] is None and opt.base_updates()[1] is not None


def test_the_default_is_the_recommended_shipped_net():
    """No weights= loads the recommended shipped net of the class (its file's
    numbers); weights=None builds a fresh one; net options need weights=None."""
    model = make_mlp([6, 8, 3])
    for cls, name in ((lopt.NFNOptimizer, "nfn-real"), (lopt.MLPOptimizer, "mlp-real")):
        assert lopt.checkpoint.recommended(cls.net_class) == name
        shipped, _ = lopt.load(name)
        opt = cls(model.parameters(), model=model)
        for (k, a), b in zip(opt.net.state_dict().items(), shipped.state_dict().values()):
            assert torch.equal(a, b), k
        assert opt.net.config == shipped.config
        fresh = cls(model.parameters(), weights=None)
        assert not torch.equal(fresh.net.log_lr, shipped.log_lr)
    with pytest.raises(ValueError, match="build a fresh net: pass weights=None"):
        lopt.NFNOptimizer(model.parameters(), width=8)
    with pytest.raises(ValueError, match="either net= or weights="):
        lopt.NFNOptimizer(model.parameters(), net=NFNNet(), weights="nfn-real")


def test_role_rates_scale_each_roles_whole_update(tmp_path):
    """role_rates: a role's log-rate r multiplies the whole update of every
    tensor of that role (Adam's part, the learned term, the row projection)
    by exp(r), and no other tensor's; the fused step agrees;
    the rates survive a checkpoint; a net without them has none."""
    from tasks.models import TransformerLM

    torch.manual_seed(4)
    model = TransformerLM(11, 6, 8, 2, 1)
    spec = WeightSpaceSpec.from_module(model)
    plain = NFNNet(out_scale=1.0, step_mult=1e-2, lr=1e-3, nf_channels=2, role_rates=True)
    rated = NFNNet(out_scale=1.0, step_mult=1e-2, lr=1e-3, nf_channels=2, role_rates=True)
    rated.load_state_dict(plain.state_dict())
    with torch.no_grad():
        rated.role_log_rate["lanh"].fill_(-0.5)  # an attention projection's query-key rows
        rated.role_log_rate["hh"].fill_(0.3)
    params = [p.detach().clone() for p in model.parameters()]
    grads = [torch.randn_like(p) for p in params]
    state = functional.init(params)
    base, _ = functional.update(plain, spec, None, grads, state, params)
    got, _ = functional.update(rated, spec, None, grads, state, params)
    role_of = dict(zip(spec.tensors, plain.nf.output_roles(spec)))
    roles = list(role_of.values())
    seen = set()
    for name, pieces, u0, u in zip(spec.names, spec.by_parameter(), base, got):
        kinds = {role_of[t] for t in pieces}
        factor = 1.0
        if kinds == {"bias:hh"}:
            factor = math.exp(0.3)
            seen.add("hh")
        if factor != 1.0 or not kinds & {"bias:lanh", "bias:hh"}:
            torch.testing.assert_close(u, u0 * factor, rtol=1e-5, atol=1e-9, msg=name)
    assert seen == {"hh"}
    # The packed query-key-value weight: its query-key rows scaled, its value rows not.
    qkv = spec.names.index("blocks.0.attn.qkv.weight")
    rows = [t.part for i, t in enumerate(spec.tensors) if roles[i] == "bias:lanh"][0]
    f = math.exp(-0.5)
    torch.testing.assert_close(got[qkv][rows[0] : rows[1]], base[qkv][rows[0] : rows[1]] * f,
                               rtol=1e-5, atol=1e-9)  # fmt: skip
    torch.testing.assert_close(got[qkv][rows[1] :], base[qkv][rows[1] :], rtol=1e-5, atol=1e-9)
    # The optimizer class's (fused) step takes the same update.
    assert_class_step_takes(model, rated, params, grads, got)
    lopt.save(rated, tmp_path / "r.pt")
    back, _ = lopt.load(tmp_path / "r.pt")
    assert back.config["role_rates"] is True
    assert back.role_log_rate["lanh"].item() == pytest.approx(-0.5)
    assert NFNNet().role_log_rates(spec) is None and "role_rates" not in NFNNet().config


def test_embedding_roles_give_embeddings_nf_weights_and_a_rate(tmp_path):
    """embedding_roles: a transformer's token and position tables get the
    NF-layer's embedding role (a net without it knows no role for them), its
    weights change their update and no other tensor's, and with role_rates
    the role's rate scales their whole update; the fused step agrees; the
    flag survives a checkpoint and a shipped net loads without it."""
    from tasks.models import TransformerLM

    torch.manual_seed(5)
    model = TransformerLM(11, 6, 8, 2, 1)
    spec = WeightSpaceSpec.from_module(model)
    kw = dict(out_scale=1.0, step_mult=1e-2, lr=1e-3, nf_channels=2, role_rates=True)
    embeddings = {"tok.weight", "pos.weight"}
    names = [t.name for t in spec.tensors]  # a packed projection is two tensors
    roles = dict(zip(names, NFNNet(**kw).nf.output_roles(spec)))
    assert roles["tok.weight"] is None and roles["pos.weight"] is None
    plain = NFNNet(embedding_roles=True, **kw)
    roles = dict(zip(names, plain.nf.output_roles(spec)))
    assert roles["tok.weight"] == roles["pos.weight"] == "bias:ih"
    assert roles["head.weight"] == "bias:oh"  # the head reads the stream: not an embedding
    params = [p.detach().clone() for p in model.parameters()]
    grads = [torch.randn_like(p) for p in params]
    state = functional.init(params)
    base, _ = functional.update(plain, spec, None, grads, state, params)

    def update_with(change):
        net = NFNNet(embedding_roles=True, **kw)
        net.load_state_dict(plain.state_dict())
        with torch.no_grad():
            change(net)
        return net, functional.update(net, spec, None, grads, state, params)[0]

    _, moved = update_with(lambda n: n.nf.biases["bias:ih"].add_(1.0))
    rated, scaled = update_with(lambda n: n.role_log_rate["ih"].fill_(0.4))
    for name, u0, u1, u2 in zip(spec.names, base, moved, scaled):
        if name in embeddings:
            assert not torch.allclose(u1, u0), name
            torch.testing.assert_close(u2, u0 * math.exp(0.4), rtol=1e-5, atol=1e-9, msg=name)
        else:
            torch.testing.assert_close(u1, u0, rtol=1e-5, atol=1e-9, msg=name)
            torch.testing.assert_close(u2, u0, rtol=1e-5, atol=1e-9, msg=name)
    assert_class_step_takes(model, rated, params, grads, scaled)
    lopt.save(rated, tmp_path / "e.pt")
    back, _ = lopt.load(tmp_path / "e.pt")
    assert back.config["embedding_roles"] is True
    assert back.role_log_rate["ih"].item() == pytest.approx(0.4)
    shipped, _ = lopt.load("nfn-real")
    assert "embedding_roles" not in shipped.config and "ih<-p" not in shipped.nf.weights
