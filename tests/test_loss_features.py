"""Loss features: the formula, their invariances, the nets and the optimizer
that read them, and meta-training that tells (or hides) the loss."""

import copy
import math

import pytest
import torch
from helpers import STEP_LOSS, make_mlp, random_state, strong

import lopt
from lopt import WeightSpaceSpec, functional
from lopt.features import LOSS_DECAYS, NUM_LOSS_FEATURES, loss_features, loss_state
from lopt.nets import NFNNet, PerParamMLP


def naive_features(losses):
    """Each step's loss features, from the list of losses by the formula."""
    out = []
    for t, loss in enumerate(losses):
        past = [math.log(x) for x in losses[:t]]
        if not past:
            out.append([0.0] * (NUM_LOSS_FEATURES - 1) + [1.0])
            continue
        row = []
        for b in LOSS_DECAYS:
            w = [(1 - b) * b ** (len(past) - 1 - i) for i in range(len(past))]
            average = sum(wi * x for wi, x in zip(w, past)) / (1 - b ** len(past))
            row.append(math.tanh(math.log(loss) - average))
        out.append(row + [math.tanh(math.log(loss) - min(past)), 1.0])
    return torch.tensor(out)


def run_features(losses, scale=1.0):
    stats, rows = loss_state(), []
    for loss in losses:
        features, stats = loss_features(stats, torch.tensor(loss * scale))
        rows.append(features)
    return torch.stack(rows), stats


LOSSES = [2.3, 1.9, 1.2, 1.4, 0.7, 0.9, 5.0, 0.5, 0.45, 0.44, 3e-3, 2e-3]


def test_loss_features_against_the_formula():
    features, stats = run_features(LOSSES)
    torch.testing.assert_close(features, naive_features(LOSSES))
    assert stats[0].item() == len(LOSSES)
    assert stats[1].item() == pytest.approx(math.log(min(LOSSES)))


@pytest.mark.parametrize("scale", [1e-6, 1e3])
def test_loss_features_do_not_see_the_loss_scale(scale):
    torch.testing.assert_close(run_features(LOSSES, scale)[0], run_features(LOSSES)[0])


def test_a_spike_reads_above_zero_and_a_falling_loss_below():
    features, _ = run_features(LOSSES)
    assert (features[6, :2] > 0.5).all()  # 5.0 after 0.9: a spike
    assert (features[4, :2] < 0).all()  # 0.7 after 1.2 and 1.4: falling


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), 0.0, -1.0])
def test_a_loss_that_cannot_be_read_gives_zeros_and_keeps_the_state(bad):
    _, stats = run_features(LOSSES[:4])
    features, new = loss_features(stats, bad)
    assert torch.equal(features, torch.zeros(NUM_LOSS_FEATURES))
    assert torch.equal(new, stats)


def test_loss_features_refuse_a_loss_of_many_entries():
    with pytest.raises(ValueError, match="one number"):
        loss_features(loss_state(), torch.ones(3))


def test_loss_features_vmap_as_a_loop_does():
    _, stats = run_features(LOSSES[:5])
    stats = torch.stack([stats, stats * 0.5, loss_state()])
    losses = torch.tensor([0.3, float("nan"), 2.0])
    f, s = torch.func.vmap(loss_features)(stats, losses)
    for i in range(3):
        fi, si = loss_features(stats[i], losses[i])
        torch.testing.assert_close(f[i], fi)
        torch.testing.assert_close(s[i], si)


def mlp_step(seed=0):
    torch.manual_seed(seed)
    module = make_mlp([6, 9, 4])
    spec = WeightSpaceSpec.from_module(module)
    params = [p.detach().clone() for p in module.parameters()]
    grads = [torch.randn_like(p) for p in params]
    return spec, params, grads, random_state(params, seed)


@pytest.mark.parametrize("cls", [NFNNet, PerParamMLP])
def test_a_fresh_loss_net_steps_as_the_net_without_it(cls):
    spec, params, grads, state = mlp_step()
    torch.manual_seed(1)
    plain = cls(budget=True, out_scale=1.0)
    net = cls(budget=True, loss_features=True, out_scale=1.0)
    missing = net.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["loss_inp.weight", "loss_schedule.weight"]
    with torch.no_grad():
        a, _ = functional.update(plain, spec, None, grads, state, params, loss=STEP_LOSS)
        b, new = functional.update(net, spec, None, grads, state, params, loss=STEP_LOSS)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert new["loss_stats"][0].item() == state["loss_stats"][0].item() + 1


def test_the_loss_moves_the_update_of_a_net_that_reads_it_and_no_other():
    spec, params, grads, state = mlp_step()
    net = strong("nfn-real-like")
    plain = strong("nfn-real-like")
    plain._config.pop("loss_features")  # the same weights, the loss not read
    with torch.no_grad():
        told = functional.update(net, spec, None, grads, state, params, loss=STEP_LOSS)
        spike = functional.update(net, spec, None, grads, state, params, loss=40.0)
        untold = functional.update(net, spec, None, grads, state, params)
        ignored = functional.update(plain, spec, None, grads, state, params, loss=40.0)
        ignored_none = functional.update(plain, spec, None, grads, state, params)
    assert not torch.allclose(told[0][0], spike[0][0])
    assert not torch.allclose(told[0][0], untold[0][0])
    torch.testing.assert_close(ignored[0][0], ignored_none[0][0], rtol=0, atol=0)
    assert torch.equal(ignored[1]["loss_stats"], state["loss_stats"])  # carried as it was
    assert torch.equal(untold[1]["loss_stats"], state["loss_stats"])


def test_the_loss_only_brakes_the_schedule_by_its_formula():
    from lopt.features import budget_features, step_features
    from lopt.nets import LOSS_SCHEDULE_GAIN

    net = NFNNet(budget=True, loss_features=True)
    with torch.no_grad():
        net.loss_schedule.weight.copy_(torch.tensor([[0.05, -0.2, 0.02, 0.01]]))
    step = torch.tensor(30.0)
    steps_in, budget_in = step_features(step), budget_features(step, 100)
    base = net.schedule_scale(steps_in, budget_in)
    for z in ([0.5, 0.8, 0.9, 1.0], [-0.5, 0.8, 0.0, 1.0], [-0.9, -0.9, 0.3, 1.0]):
        z = torch.tensor(z)
        scaled = net.schedule_scale(steps_in, budget_in, z)
        # by hand: positive weights on the positive parts of the features
        brake = sum(w * f for w, f in zip([0.05, 0.0, 0.02, 0.01], z.clamp(min=0).tolist()))
        torch.testing.assert_close(scaled, base * math.exp(-LOSS_SCHEDULE_GAIN * brake))
        assert scaled <= base
    # The brake's weights learn from 0 (a clamp passes its gradient there).
    with torch.no_grad():
        net.loss_schedule.weight.zero_()
    net.schedule_scale(steps_in, budget_in, torch.ones(NUM_LOSS_FEATURES)).backward()
    assert (net.loss_schedule.weight.grad < 0).all()


def anneal_net(v):
    from lopt.nets import schedule_prior

    net = NFNNet(budget=True, loss_features=True, loss_anneal=True)
    with torch.no_grad():
        net.loss_anneal.weight.copy_(torch.tensor([v]))
        # A learned addition that lifts the budget's part above 0 early in
        # a run: the anneal is only the part below 0.
        weight, _ = schedule_prior()
        net.schedule.weight.copy_(weight)
        net.schedule.weight[0, -1] += 0.1
    return net


@pytest.mark.parametrize("f", [0.02, 0.5, 0.8, 0.97])
def test_the_loss_times_the_anneal_by_its_formula(f):
    from lopt.features import NUM_STEP_FEATURES, budget_features, step_features
    from lopt.nets import LOSS_SCHEDULE_GAIN, MAX_LOG_ANNEAL

    v = [0.08, 0.05, -0.03, 0.01]
    net = anneal_net(v)
    step = torch.tensor(round(f * 1000.0))
    steps_in, budget_in = step_features(step), budget_features(step, 1000)
    w, b = net.schedule.weight[0].detach(), net.schedule.bias[0].item()
    rest = (w[:NUM_STEP_FEATURES] @ steps_in).item() + b
    budget_part = (w[NUM_STEP_FEATURES:] @ budget_in).item()
    without = net.schedule_scale(steps_in, budget_in).item()
    assert without == pytest.approx(math.exp(rest + budget_part), rel=1e-5)
    held = [0.08, 0.05, 0.0, 0.01]  # the weights on the loss's ratios at 0 or above
    for z in ([-0.3, -0.5, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], [0.4, 0.9, 0.6, 1.0], [9, 9, -9, 1]):
        log_g = LOSS_SCHEDULE_GAIN * sum(a * c for a, c in zip(held, z))
        g = math.exp(min(max(log_g, -MAX_LOG_ANNEAL), MAX_LOG_ANNEAL))
        by_hand = math.exp(rest + max(budget_part, 0) + g * min(budget_part, 0))
        scaled = net.schedule_scale(steps_in, budget_in, torch.tensor(z, dtype=torch.float32))
        assert scaled.item() == pytest.approx(by_hand, rel=1e-5)
        # Never above the schedule with no anneal at all.
        assert scaled.item() <= math.exp(rest + max(budget_part, 0)) * (1 + 1e-6)
    if budget_part >= 0:  # before the anneal: the loss changes nothing
        assert f == 0.02
    else:  # a falling loss lifts the anneal and a loss at rest deepens it here
        falling = net.schedule_scale(steps_in, budget_in, torch.tensor([-0.3, -0.5, 0.0, 1.0]))
        assert falling.item() > without


def test_a_rising_loss_never_lifts_the_anneal():
    from lopt.features import budget_features, step_features

    torch.manual_seed(0)
    net = anneal_net(torch.randn(NUM_LOSS_FEATURES).mul(0.1).tolist())
    step = torch.tensor(900.0)
    steps_in, budget_in = step_features(step), budget_features(step, 1000)
    for _ in range(20):
        z = torch.cat([torch.rand(NUM_LOSS_FEATURES - 1) * 2 - 1, torch.ones(1)])
        higher = z.clone()
        higher[:-1] += torch.rand(NUM_LOSS_FEATURES - 1)  # every ratio above it
        assert net.anneal_power(higher) >= net.anneal_power(z)
        assert net.schedule_scale(steps_in, budget_in, higher) <= net.schedule_scale(
            steps_in, budget_in, z
        )


def test_the_anneal_power_learns_from_one_and_needs_the_loss_features():
    from lopt.features import budget_features, step_features

    net = anneal_net([0.0, 0.0, 0.0, 0.0])
    step = torch.tensor(900.0)
    steps_in, budget_in = step_features(step), budget_features(step, 1000)
    z = torch.tensor([-0.3, -0.5, 0.0, 1.0])
    assert net.anneal_power(z).item() == 1.0
    torch.testing.assert_close(
        net.schedule_scale(steps_in, budget_in, z), net.schedule_scale(steps_in, budget_in)
    )
    net.schedule_scale(steps_in, budget_in, z).backward()
    # Deeper anneal with a larger power: each weight's gradient has the
    # sign of its feature times the (negative) anneal.
    assert (net.loss_anneal.weight.grad[0, [0, 1]] > 0).all()
    assert net.loss_anneal.weight.grad[0, 3] < 0
    with pytest.raises(ValueError, match="loss_anneal=True needs loss_features=True"):
        NFNNet(budget=True, loss_anneal=True)


@pytest.mark.parametrize("cls", [NFNNet, PerParamMLP])
def test_a_fresh_anneal_net_steps_as_the_net_without_it_and_survives_a_checkpoint(cls, tmp_path):
    spec, params, grads, state = mlp_step()
    torch.manual_seed(1)
    plain = cls(budget=True, loss_features=True, out_scale=1.0)
    with torch.no_grad():
        plain.loss_schedule.weight.normal_(std=0.03)
    net = cls(budget=True, loss_features=True, loss_anneal=True, out_scale=1.0)
    missing = net.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["loss_anneal.weight"]
    told = dict(total_steps=torch.tensor(100.0))
    state = dict(state, step=torch.tensor(90.0))
    with torch.no_grad():
        a, _ = functional.update(plain, spec, None, grads, state, params, loss=STEP_LOSS, **told)
        b, _ = functional.update(net, spec, None, grads, state, params, loss=STEP_LOSS, **told)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        net.loss_anneal.weight.fill_(0.05)
        c, _ = functional.update(net, spec, None, grads, state, params, loss=STEP_LOSS, **told)
    assert not torch.allclose(a[0], c[0])
    lopt.save(net, tmp_path / "net.pt")
    back, _ = lopt.load(tmp_path / "net.pt")
    assert back.has_loss_anneal and not plain.has_loss_anneal
    torch.testing.assert_close(back.loss_anneal.weight, net.loss_anneal.weight)
    from meta_train.ship import model_card

    card = " ".join(model_card("x", {"outer_steps": 3}, back, 1000).split())
    # exp(10 * 0.05 * (2 tanh(log(1 - d)) + 1)) at d = 0, 0.05, 0.2, by hand.
    assert "raised to the power g of the loss features: g = 1.65, 1.57, 1.32 while" in card
    assert "a brake on its schedule and to time its anneal." in card
    plain_card = " ".join(model_card("x", {"outer_steps": 3}, plain, 1000).split())
    assert "power g" not in plain_card and "a brake on its schedule." in plain_card


def test_loss_features_need_the_budget():
    with pytest.raises(ValueError, match="loss_features=True needs budget=True"):
        NFNNet(loss_features=True)


def loss_net_model(seed=0):
    torch.manual_seed(seed)
    model = make_mlp([6, 9, 4])
    net = strong("nfn-real-like")
    return model, net


def train(model, opt, steps, how):
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g)
        y = torch.randint(0, 4, (16,), generator=g)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if how == "closure":
            opt.step(closure)
        else:
            loss = closure()
            opt.step(loss=loss) if how == "loss" else opt.step()


@pytest.mark.parametrize("fused", [False, None])
def test_the_optimizer_reads_the_loss_from_a_closure_or_the_loss_argument(fused):
    model, net = loss_net_model()
    twins = {how: copy.deepcopy(model) for how in ("closure", "loss", "none")}
    opts = {
        how: lopt.NFNOptimizer(
            m.parameters(), net=copy.deepcopy(net), model=m, fused=fused, total_steps=20
        )  # fmt: skip
        for how, m in twins.items()
    }
    for how in twins:
        train(twins[how], opts[how], 6, how)
    for p, q in zip(twins["closure"].parameters(), twins["loss"].parameters()):
        torch.testing.assert_close(p, q)
    first = opts["loss"].state[next(twins["loss"].parameters())]
    assert first["loss_stats"][0].item() == 6
    assert any(
        not torch.allclose(p, q)
        for p, q in zip(twins["loss"].parameters(), twins["none"].parameters())
    )
    untold = opts["none"].state[next(twins["none"].parameters())]
    assert untold["loss_stats"][0].item() == 0


def test_a_state_dict_round_trip_keeps_the_loss_state():
    model, net = loss_net_model()
    opt = lopt.NFNOptimizer(model.parameters(), net=net, model=model, total_steps=20)
    train(model, opt, 3, "loss")
    twin = copy.deepcopy(model)
    again = lopt.NFNOptimizer(twin.parameters(), net=copy.deepcopy(net), model=twin,
                              total_steps=20)  # fmt: skip
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, opt, 2, "loss")
    train(twin, again, 2, "loss")
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_a_state_saved_without_the_loss_state_still_loads_and_steps():
    model, net = loss_net_model()
    opt = lopt.NFNOptimizer(model.parameters(), net=net, model=model, total_steps=20)
    train(model, opt, 2, "loss")
    saved = copy.deepcopy(opt.state_dict())
    for st in saved["state"].values():
        del st["loss_stats"]
    twin = copy.deepcopy(model)
    again = lopt.NFNOptimizer(twin.parameters(), net=copy.deepcopy(net), model=twin,
                              total_steps=20)  # fmt: skip
    again.load_state_dict(saved)
    train(twin, again, 1, "loss")
    assert again.state[next(twin.parameters())]["loss_stats"][0].item() == 1


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (torch.ones(2), ValueError, "one number"),
        ("0.5", TypeError, "a number or a one-element tensor"),
        (True, TypeError, "a number or a one-element tensor"),
        (torch.tensor(1 + 1j), TypeError, "real number"),
    ],
)
def test_a_bad_loss_is_refused_and_changes_nothing(bad, error, message):
    model, net = loss_net_model()
    opt = lopt.NFNOptimizer(model.parameters(), net=net, model=model, total_steps=20)
    train(model, opt, 2, "loss")
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=message):
        opt.step(loss=bad)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    after = opt.state_dict()["state"]
    for k, st in state["state"].items():
        for key, value in st.items():
            assert torch.equal(after[k][key], value)


def test_meta_training_hides_the_loss_in_its_share_of_runs():
    from meta_train.problems import LearnedOptimizerProblem
    from tasks import get_family

    net = strong("nfn-real-like")
    family = get_family("mlp-family-small")

    def problem(hidden, seed=0):
        return LearnedOptimizerProblem(
            copy.deepcopy(net), family, truncation=3, horizon=6, seed=seed,
            loss_hidden=hidden, budget_hidden=0.0,
        )  # fmt: skip

    told = [problem(0.5, s).loss_told(c) for s in range(4) for c in range(25)]
    assert 0.3 < sum(told) / len(told) < 0.7
    assert all(problem(0.0).loss_told(c) for c in range(20))

    # A run whose loss is hidden steps as a net whose loss weights are zero.
    hidden, zeroed = problem(1.0), problem(1.0)
    with torch.no_grad():
        for m in (zeroed.net.loss_inp, zeroed.net.loss_schedule, zeroed.net.loss_term):
            m.weight.zero_()
    thetas = torch.stack([hidden.initial_theta()] * 2)
    zthetas = torch.stack([zeroed.initial_theta()] * 2)
    a = hidden.unroll(thetas, hidden.reset(0, 2), 0)
    b = zeroed.unroll(zthetas, zeroed.reset(0, 2), 0)
    torch.testing.assert_close(a[1], b[1])
    # Told, the loss weights change the run.
    told_problem = problem(0.0)
    c = told_problem.unroll(thetas, told_problem.reset(0, 2), 0)
    assert not torch.allclose(a[1], c[1])
    assert c[2]["loss_stats"][0, 0].item() == 3


def test_the_vmapped_unroll_tells_the_loss_as_the_loop_does():
    from meta_train.problems import LearnedOptimizerProblem
    from tasks import get_family

    net = strong("nfn-real-like")
    family = get_family("mlp-family-small")
    runs = []
    for vectorise in (True, False):
        p = LearnedOptimizerProblem(copy.deepcopy(net), family, truncation=3, horizon=6,
                                    vectorise=vectorise)  # fmt: skip
        theta = p.initial_theta()
        noise = torch.randn(theta.shape, generator=torch.Generator().manual_seed(0))
        thetas = torch.stack([theta, theta + 0.01 * noise])
        runs.append(p.unroll(thetas, p.reset(0, 2), 0))
    torch.testing.assert_close(runs[0][1], runs[1][1])
    torch.testing.assert_close(runs[0][2]["loss_stats"], runs[1][2]["loss_stats"])


def test_a_closure_s_other_return_values_are_left_to_it_when_the_net_ignores_the_loss():
    model = make_mlp([6, 9, 4])
    opt = lopt.NFNOptimizer(model.parameters(), model=model, weights=None)  # no loss input
    assert not opt.net.reads_loss

    def closure():
        opt.zero_grad()
        loss = model(torch.randn(4, 6)).square().mean()
        loss.backward()
        return loss, "extra"

    assert opt.step(closure)[1] == "extra"
