"""The step budget: what a net reads of total_steps, and where it is passed."""

import copy
import math
import warnings

import pytest
import torch
from helpers import make_mlp
from torch.nn import functional as F

import lopt
from lopt import WeightSpaceSpec, functional
from lopt.features import BUDGET_SCALES, NUM_BUDGET_FEATURES, budget_features
from lopt.nets import NFNNet, PerParamMLP


def naive_budget(t: float, n: float | None) -> list[float]:
    if n is None or n <= 0:
        return [0.0] * NUM_BUDGET_FEATURES
    f = min(max(t / n, 0.0), 1.0)
    return (
        [math.tanh(f / s) for s in BUDGET_SCALES]
        + [math.tanh((1 - f) / s) for s in BUDGET_SCALES]
        + [1.0]
    )


@pytest.mark.parametrize(
    "t,n", [(1, 100), (50, 100), (100, 100), (250, 100), (7, 10_000), (3, None), (3, -1), (3, 0)]
)
def test_budget_features_against_the_formula(t, n):
    got = budget_features(torch.tensor(float(t)), n)
    torch.testing.assert_close(got, torch.tensor(naive_budget(t, n)), rtol=1e-6, atol=1e-7)


def test_budget_features_vmap_over_known_and_unknown_budgets():
    steps = torch.tensor([5.0, 5.0, 40.0])
    totals = torch.tensor([10.0, -1.0, 20.0])
    got = torch.func.vmap(budget_features)(steps, totals)
    want = torch.tensor([naive_budget(5, 10), naive_budget(5, None), naive_budget(40, 20)])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def setup(cls=NFNNet, seed=0):
    torch.manual_seed(seed)
    model = make_mlp([6, 7, 5, 3])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 6, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    net = cls(out_scale=1.0, step_mult=1e-2, lr=1e-3, budget=True)
    return model, x, y, net


def one_update(net, model, x, y, step, total):
    spec = WeightSpaceSpec.from_module(model)
    params = [p.detach() for p in model.parameters()]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    state = functional.init(params)
    state["step"] = torch.tensor(float(step - 1))
    with torch.no_grad():
        return functional.update(net, spec, None, grads, state, params, total_steps=total)[0]


def prior_factor(t: float, total: int | None) -> float:
    """The schedule's starting factor, by its formula: a warm-up, and a
    decay over the end of a known budget."""
    nets = lopt.nets
    warm = math.exp(nets.WARMUP_PRIOR * (math.tanh(t / nets.WARMUP_PRIOR_STEPS) - 1))
    if total is None:
        return warm
    f = min(t / total, 1.0)
    w, big = nets.DECAY_PRIOR_WIDTH, nets.DECAY_PRIOR
    return warm * math.exp(-big * (1 - math.tanh((1 - f) / w) / math.tanh(1 / w)))


@pytest.mark.parametrize("cls", [NFNNet, PerParamMLP])
def test_a_fresh_budget_net_is_the_net_without_it_times_the_prior(cls):
    """budget_inp starts at zero and the schedule at its prior: the updates of
    the net without them times the prior's factor (a warm-up over the first
    steps; with a budget, a decay to e**-DECAY_PRIOR at its end); once
    budget_inp is not zero, the budget moves the update, and an unknown
    budget is the same as a zero budget input."""
    model, x, y, net = setup(cls)
    plain = cls(**{k: v for k, v in net.config.items() if k != "budget"})
    own = ("budget_inp.", "schedule.")
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith(own)})
    want = one_update(plain, model, x, y, 5, None)
    for total in (None, 5, 8, 10, 1000):
        factor = prior_factor(5, total)
        for u, v in zip(one_update(net, model, x, y, 5, total), want):
            torch.testing.assert_close(u, factor * v, rtol=1e-5, atol=1e-9)
    assert prior_factor(1, None) < 0.3 and prior_factor(20, None) > 0.99
    assert prior_factor(500, 1000) > 0.8
    assert prior_factor(40, 40) == pytest.approx(math.exp(-2.5), rel=1e-3)
    with torch.no_grad():
        net.budget_inp.weight.normal_()
    near_end = one_update(net, model, x, y, 9, 10)
    early = one_update(net, model, x, y, 9, 1000)
    unknown = one_update(net, model, x, y, 9, None)
    assert any(not torch.allclose(a, b) for a, b in zip(near_end, early))
    for u, v in zip(unknown, one_update(plain, model, x, y, 9, None)):
        torch.testing.assert_close(u, prior_factor(9, None) * v, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("cls", [lopt.NFNOptimizer, lopt.MLPOptimizer])
def test_optimizer_passes_each_groups_total_steps(cls, tmp_path):
    """The optimizer class (fused path) takes the functional core's steps
    with the group's total_steps; it is a param-group entry that a group may
    override and that state_dict round trips; the net's budget flag is saved."""
    model, x, y, net = setup(cls.net_class, seed=1)
    with torch.no_grad():
        net.budget_inp.weight.normal_()
    twin = copy.deepcopy(model)
    opt = cls(twin.parameters(), net=net, model=twin, total_steps=8)
    assert opt.param_groups[0]["total_steps"] == 8
    spec = WeightSpaceSpec.from_module(model)
    ref = [p.detach().clone() for p in model.parameters()]
    state = functional.init(ref)
    for _ in range(4):
        with torch.enable_grad():
            ps = [r.clone().requires_grad_() for r in ref]
            names = [n for n, _ in model.named_parameters()]
            out = torch.func.functional_call(model, dict(zip(names, ps)), (x,))
            g = torch.autograd.grad(F.cross_entropy(out, y), ps)
        with torch.no_grad():
            u, state = functional.update(net, spec, None, list(g), state, ref, total_steps=8)
        ref = [r + ui for r, ui in zip(ref, u)]
        opt.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        opt.step()
    for p, r in zip(twin.parameters(), ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-4, atol=1e-5)
    saved = opt.state_dict()
    again = cls(copy.deepcopy(twin).parameters(), net=net)
    again.load_state_dict(saved)
    assert again.param_groups[0]["total_steps"] == 8
    groups = cls(
        [
            {"params": list(model.parameters())[:2], "total_steps": 50},
            {"params": list(model.parameters())[2:]},
        ],
        net=net,
        total_steps=20,
    )
    assert [g["total_steps"] for g in groups.param_groups] == [50, 20]
    lopt.save(net, tmp_path / "b.pt")
    back, _ = lopt.load(tmp_path / "b.pt")
    assert back.reads_budget and back.config["budget"] is True
    assert "budget" not in cls.net_class().config and not cls.net_class().reads_budget


@pytest.mark.parametrize("cls", [lopt.NFNOptimizer, lopt.MLPOptimizer])
def test_a_budget_net_not_told_total_steps_warns_once(cls):
    """A group without total_steps, stepped by a net that reads the budget,
    warns once, naming the group, at the line that called step(); told
    groups and nets without the budget input do not warn."""
    model, x, y, net = setup(cls.net_class, seed=3)

    def steps(opt, n=3):
        for _ in range(n):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    params = list(model.parameters())
    opt = cls([{"params": params[:2], "total_steps": 10}, {"params": params[2:]}], net=net)
    with pytest.warns(UserWarning, match="parameter group 1 has no total_steps") as caught:
        steps(opt)
    (warned,) = [w for w in caught if "total_steps" in str(w.message)]
    assert warned.filename == __file__  # the caller's line, past torch's step wrappers
    for told in (cls(params, net=net, total_steps=10), cls(params, net=cls.net_class())):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            steps(told, 1)


@pytest.mark.parametrize("bad", [0, -5, 2.5, float("nan"), float("inf"), "100", True])
def test_bad_total_steps_are_refused_by_name(bad):
    model = make_mlp([4, 3])
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="total_steps must be a whole number >= 1 or None"):
        lopt.NFNOptimizer(model.parameters(), total_steps=bad)
    with pytest.raises(ValueError, match="parameter group 0: total_steps"):
        lopt.NFNOptimizer([{"params": list(model.parameters()), "total_steps": bad}])
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)


def test_a_net_without_the_budget_input_ignores_total_steps():
    model, x, y, _ = setup()
    net = NFNNet(out_scale=1.0, step_mult=1e-2)
    for u, v in zip(one_update(net, model, x, y, 3, 10), one_update(net, model, x, y, 3, None)):
        assert torch.equal(u, v)


@pytest.mark.parametrize("cls", [NFNNet, PerParamMLP])
def test_learned_schedule_scales_the_whole_update(cls):
    """The schedule's factor multiplies Adam's part and the learned term
    alike: exp(bias) with zero weights, and exp(w . features + b) against the
    naive formula once its weights read the step and budget."""
    model, x, y, net = setup(cls, seed=2)
    with torch.no_grad():
        net.schedule.weight.zero_()  # a flat schedule: the reference
        net.schedule.bias.zero_()
    ref = one_update(net, model, x, y, 6, 30)
    with torch.no_grad():
        net.schedule.bias.fill_(math.log(0.5))
    for u, v in zip(one_update(net, model, x, y, 6, 30), ref):
        torch.testing.assert_close(u, 0.5 * v, rtol=1e-6, atol=0)
    with torch.no_grad():
        net.schedule.weight.normal_(0, 0.3)
    feats = torch.cat(
        [lopt.features.step_features(torch.tensor(6.0)), budget_features(torch.tensor(6.0), 30)]
    )
    factor = torch.exp(net.schedule.weight[0] @ feats + net.schedule.bias[0]).item()
    for u, v in zip(one_update(net, model, x, y, 6, 30), ref):
        torch.testing.assert_close(u, factor * v, rtol=1e-5, atol=1e-9)


def term_setup(cls, seed):
    """A budget net with the learned term's schedule, an MLP, its gradients
    and a random state a few steps in."""
    from helpers import random_state

    model, x, y, _ = setup(cls, seed)
    net = cls(out_scale=1.0, step_mult=1e-2, lr=1e-3, budget=True, term_schedule=True)
    spec = WeightSpaceSpec.from_module(model)
    params = [p.detach() for p in model.parameters()]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    return net, spec, params, grads, random_state(params, seed, step=5.0)


def term_update(net, spec, params, grads, state, total=30):
    with torch.no_grad():
        return functional.update(net, spec, None, grads, state, params, total_steps=total)


def naive_term_factor(net, new_state, total):
    """Per tensor, the term's factor by its formula, from the new state."""
    t = new_state["step"]
    c1, c2 = 1 - 0.9**t, 1 - 0.999**t
    shared = net.term_schedule.weight[0] @ budget_features(t, total) + net.term_schedule.bias[0]
    out = []
    for m, v in zip(new_state["momenta"], new_state["second_moment"]):
        snr = (m[1].square().mean() / c1**2) / (v.mean() / c2)  # momentum 0.9 is index 1
        raw = shared + net.term_snr_exp * snr.log().clamp(-8, 2)
        out.append(torch.exp((lopt.nets.TERM_SCHEDULE_GAIN * raw).clamp(max=3)).item())
    return out


@pytest.mark.parametrize("cls", [NFNNet, PerParamMLP])
def test_the_term_schedule_scales_each_tensor_s_learned_term_by_its_formula(cls):
    """Fresh, the term's schedule changes nothing (the net without it, same
    weights); with weights, each tensor's update minus Adam's part is that of
    the fresh net times exp(10 * (w . budget + b + a * log snr)), snr the
    tensor's mean squared corrected momentum over its mean corrected second
    moment, computed naively."""
    net, spec, params, grads, state = term_setup(cls, seed=4)
    plain = cls(**{k: v for k, v in net.config.items() if k != "term_schedule"})
    own = ("term_schedule.", "term_snr_exp")
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith(own)})
    ref, new_state = term_update(net, spec, params, grads, state)
    for u, v in zip(ref, term_update(plain, spec, params, grads, state)[0]):
        assert torch.equal(u, v)
    adam_only = copy.deepcopy(net)
    with torch.no_grad():
        adam_only.log_step_mult.fill_(-200.0)  # exp: 0, no learned term
        net.term_schedule.weight.normal_(0, 0.03)
        net.term_schedule.bias.fill_(-0.05)
        net.term_snr_exp.fill_(0.1)
    adam = term_update(adam_only, spec, params, grads, state)[0]
    factors = naive_term_factor(net, new_state, 30)
    assert max(factors) / min(factors) > 1.05  # the tensors' factors differ
    for u, v, a, k in zip(term_update(net, spec, params, grads, state)[0], ref, adam, factors):
        assert (v - a).abs().sum() > 0
        torch.testing.assert_close(u - a, k * (v - a), rtol=1e-4, atol=1e-9)


def test_the_term_schedule_needs_the_budget():
    with pytest.raises(ValueError, match="term_schedule=True needs budget=True"):
        NFNNet(term_schedule=True)


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 6),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (k + 1)),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(
            o, max_lr=1.0, total_steps=6, cycle_momentum=False
        ),
    ],
    ids=["StepLR", "CosineAnnealingLR", "LambdaLR", "OneCycleLR"],
)
def test_lr_schedulers_scale_the_whole_update(make_scheduler):
    """Each group's lr multiplies the update the net computes: under a torch
    scheduler every step equals the lr-1 optimizer's step times the lr the
    scheduler set; state_dict round trips with the scheduler attached."""
    model, x, y, net = setup(seed=3)
    twin = copy.deepcopy(model)
    opt = lopt.NFNOptimizer(model.parameters(), net=net, model=model)
    ref = lopt.NFNOptimizer(twin.parameters(), net=net, model=twin)
    sched = make_scheduler(opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(sched.get_last_lr()[0])
    for k in range(6):
        lr = opt.param_groups[0]["lr"]
        before = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            for p, q in zip(twin.parameters(), model.parameters()):
                p.copy_(q)
        for o, m in ((opt, model), (ref, twin)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        for p, q, b in zip(model.parameters(), twin.parameters(), before):
            torch.testing.assert_close(p - b, (q - b) * lr, rtol=1e-4, atol=1e-7)
        sched.step()
        if k == 2:
            saved, saved_sched = opt.state_dict(), sched.state_dict()
            opt2 = lopt.NFNOptimizer(model.parameters(), net=net, model=model)
            sched2 = make_scheduler(opt2)
            opt2.load_state_dict(saved)
            sched2.load_state_dict(saved_sched)
            assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        lopt.NFNOptimizer(model.parameters(), lr=-1.0)
