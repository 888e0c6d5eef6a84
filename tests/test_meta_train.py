"""Meta-training: estimators on a problem with a known answer, unrolls,
resume, atomic checkpoints, distributed equivalence and the command line."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lopt
from lopt.nets import PerParamMLP
from meta_train import LearnedOptimizerProblem, MetaTrainer, TaskUnroll, make_estimator
from meta_train.problems import TruncatedProblem
from tasks import get_family, get_task

A = torch.tensor([1.0, 0.5], dtype=torch.float64)
X0 = torch.tensor([1.0, -2.0], dtype=torch.float64)


class Quadratic(TruncatedProblem):
    """SGD with learning rate theta[0] on f(x) = 1/2 sum a_i x_i^2; the
    meta-loss of a truncation is the mean loss over its steps."""

    def __init__(self, truncation, horizon, lr=0.3):
        self.truncation, self.horizon, self.lr = truncation, horizon, lr

    def initial_theta(self):
        return torch.tensor([self.lr], dtype=torch.float64)

    def reset(self, counter, trajectories, slot=0):
        return {"x": X0.expand(trajectories, 2).clone()}

    def rates(self, thetas):
        """Each trajectory's learning rate, from its meta-parameters."""
        return thetas[:, :1]

    def unroll(self, thetas, inner, counter, slot=0):
        x, losses = inner["x"], []
        for _ in range(self.truncation):
            x = x - self.rates(thetas) * A * x
            losses.append(0.5 * (A * x * x).sum(-1))
        losses = torch.stack(losses, 1)
        return losses.mean(1), losses, {"x": x}


def true_gradient(lr, truncation, horizon):
    """d/d lr of the objective summed over the horizon's truncations."""
    eta = torch.tensor(lr, dtype=torch.float64, requires_grad=True)
    t = torch.arange(1, horizon + 1, dtype=torch.float64)[:, None]
    total = (0.5 * A * X0**2 * (1 - eta * A) ** (2 * t)).sum() / truncation
    (g,) = torch.autograd.grad(total, eta)
    return g.item()


def horizon_estimate(name, problem, pairs, seed, sigma=0.01):
    """One whole inner run: the per-truncation estimates summed."""
    est = make_estimator(name, sigma)
    theta = problem.initial_theta()
    inner = problem.reset(0, est.trajectories(pairs))
    state = est.init_state(pairs, 1, theta)
    g = torch.Generator().manual_seed(seed)
    total, sq = torch.zeros(1, dtype=torch.float64), 0.0
    for j in range(problem.horizon // problem.truncation):
        noise = torch.randn(pairs, 1, generator=g, dtype=torch.float64)
        e, inner, state = est.estimate(
            theta, noise, state, inner, lambda th, i, j=j: problem.unroll(th, i, j)
        )
        total += e.grad_sum
        sq = e
    return total / e.count, sq


@pytest.mark.parametrize("name", ["es", "pes", "backprop"])
def test_estimators_match_the_true_gradient_on_one_truncation(name):
    problem = Quadratic(truncation=5, horizon=5)
    est = make_estimator(name, 0.01)
    pairs = 4000 if name != "backprop" else 3
    theta = problem.initial_theta()
    inner = problem.reset(0, est.trajectories(pairs))
    noise = torch.randn(pairs, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    e, _, _ = est.estimate(
        theta, noise, est.init_state(pairs, 1, theta), inner, lambda th, i: problem.unroll(th, i, 0)
    )
    mean = (e.grad_sum / e.count).item()
    truth = true_gradient(0.3, 5, 5)
    if name == "backprop":
        assert mean == pytest.approx(truth, rel=1e-9)
        return
    se = math.sqrt((e.grad_sq_sum / e.count - mean**2).item() / e.count)
    assert abs(mean - truth) < 4 * se, (mean, truth, se)
    assert se < 0.1 * abs(truth)  # the check has teeth


def test_pes_is_unbiased_and_truncated_es_is_not_over_a_long_horizon():
    problem = Quadratic(truncation=1, horizon=12)
    truth = true_gradient(0.3, 1, 12)
    means = {}
    for name in ("pes", "es"):
        totals = torch.stack(
            [horizon_estimate(name, problem, 2000, seed)[0] for seed in range(12)]
        ).squeeze(1)
        mean, se = totals.mean().item(), (totals.std() / math.sqrt(len(totals))).item()
        means[name] = (mean, se)
    pes_mean, pes_se = means["pes"]
    es_mean, es_se = means["es"]
    assert abs(pes_mean - truth) < 4 * pes_se, (pes_mean, truth, pes_se)
    assert abs(es_mean - truth) > 10 * es_se, (es_mean, truth, es_se)


class ScaledQuadratic(Quadratic):
    """Quadratic with every loss times ``scale``: the same task, its
    meta-loss differences ``scale`` times as large."""

    def __init__(self, scale, truncation=4, horizon=8):
        super().__init__(truncation, horizon)
        self.scale = scale

    def unroll(self, thetas, inner, counter, slot=0):
        metas, losses, new = super().unroll(thetas, inner, counter)
        return metas * self.scale, losses * self.scale, new


@pytest.mark.parametrize("name", ["es", "pes"])
def test_per_task_divides_the_estimate_by_the_rms_of_its_loss_differences(name):
    """per_task: the meta-gradient is the plain one over the RMS of the pairs'
    ((L+ - L-) / 2 sigma), computed here by hand, so a task whose loss is
    100x larger moves the net as much, not 100x more."""
    from meta_train.problems import rng

    sigma, pairs, steps = 0.05, 6, 2
    grads = {}
    for per_task in (False, True):
        for scale in (1.0, 100.0):
            t = MetaTrainer(ScaledQuadratic(scale), make_estimator(name, sigma), pairs=pairs,
                            clip=1e12, per_task=per_task)  # fmt: skip
            t.theta.data = t.theta.data.double()
            grads[per_task, scale] = []
            for _ in range(steps):
                t.outer_step()
                grads[per_task, scale].append(t.theta.grad.clone())
    for plain, scaled in zip(grads[False, 1.0], grads[True, 1.0]):
        assert torch.isfinite(scaled).all() and not torch.equal(plain, scaled)
    # By hand, the first step: the same noise and inner start as the trainer's.
    problem = ScaledQuadratic(1.0)
    noise = torch.randn(pairs, 1, generator=rng(0, "noise", 0)).double()
    thetas = torch.cat([problem.initial_theta() + sigma * noise,
                        problem.initial_theta() - sigma * noise])  # fmt: skip
    metas, _, _ = problem.unroll(thetas, problem.reset(0, 2 * pairs), 0)
    diff = (metas[:pairs] - metas[pairs:]) / (2 * sigma)
    plain = (diff[:, None] * noise).mean(0)
    torch.testing.assert_close(grads[False, 1.0][0], plain)
    torch.testing.assert_close(grads[True, 1.0][0], plain / diff.square().mean().sqrt())
    for step in range(steps):
        torch.testing.assert_close(grads[True, 100.0][step], grads[True, 1.0][step])
        torch.testing.assert_close(grads[False, 100.0][step], 100 * grads[False, 1.0][step])


def test_per_task_needs_pairs():
    problem = ScaledQuadratic(1.0)
    with pytest.raises(ValueError, match="per_task scales the pairs of ES or PES; backprop"):
        MetaTrainer(problem, make_estimator("backprop"), pairs=2, per_task=True)
    assert problem.scale == 1.0  # nothing built, nothing changed


def test_short_meta_training_finds_the_best_learning_rate():
    problem = Quadratic(truncation=2, horizon=10, lr=0.1)
    grid = torch.linspace(0.05, 1.9, 400)

    def horizon_loss(lr):  # the objective over a whole horizon
        inner, total = problem.reset(0, 1), 0.0
        for j in range(5):
            m, _, inner = problem.unroll(torch.tensor([[lr]], dtype=torch.float64), inner, j)
            total += m.item()
        return total

    best = min((float(lr) for lr in grid), key=horizon_loss)
    trainer = MetaTrainer(problem, make_estimator("pes", 0.01), pairs=64, meta_lr=0.03, clip=1.0)
    trainer.train(200, progress=False)
    assert abs(trainer.theta.item() - best) < 0.1, (trainer.theta.item(), best)


def tiny_problem(seed=0, vectorise=True, family="mlp-gmm"):
    torch.manual_seed(seed)
    net = PerParamMLP(width=4, depth=1, out_scale=1.0, step_mult=1e-2)
    return LearnedOptimizerProblem(
        net, get_family(family), truncation=3, horizon=6, seed=seed, vectorise=vectorise
    )


def test_vmapped_population_equals_a_loop():
    torch.manual_seed(1)
    net = lopt.NFNNet(width=4, depth=1, out_scale=1.0, step_mult=1e-2)
    unroll = TaskUnroll(net, get_task("cnn-digits"))
    inner = unroll.init_inner(3, torch.Generator().manual_seed(0))
    theta = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    thetas = theta + 0.05 * torch.randn(3, theta.numel())
    batches = unroll.sample_batches(3, torch.Generator().manual_seed(1))
    a = unroll.unroll(thetas, inner, batches)
    b = unroll.unroll_loop(thetas, inner, batches)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    for k in a[2]["params"]:
        torch.testing.assert_close(a[2]["params"][k], b[2]["params"][k])
    assert not torch.allclose(a[1][0], a[1][1])  # members really differ


def tiny_trainer(out, estimator="pes", **kwargs):
    """A 2-member trainer on the tiny problem that checkpoints every 4 steps."""
    return MetaTrainer(
        tiny_problem(),
        make_estimator(estimator, 0.05),
        pairs=2,
        meta_lr=1e-2,
        out_dir=out,
        checkpoint_every=4,
        **kwargs,
    )


@pytest.mark.parametrize(
    "estimator,decay,tasks", [("pes", 0, 1), ("backprop", 0, 1), ("pes", 5, 1), ("pes", 0, 2)]
)
def test_resume_continues_exactly(tmp_path, estimator, decay, tasks):
    def trainer(out):
        return tiny_trainer(out, estimator, meta_lr_decay_steps=decay, meta_lr_final=0.2,
                            tasks_per_step=tasks)  # fmt: skip

    full = trainer(tmp_path / "full")
    history = full.train(7, progress=False)
    part = trainer(tmp_path / "part")
    part.train(4, progress=False)
    resumed = trainer(tmp_path / "part")
    resumed.resume()
    assert resumed.step == 4 and resumed.resets == part.resets
    rest = resumed.train(7, progress=False)
    assert [h["meta_loss"] for h in rest] == [h["meta_loss"] for h in history[4:]]
    assert [h["meta_lr"] for h in rest] == [h["meta_lr"] for h in history[4:]]
    assert torch.equal(resumed.theta, full.theta)


class Recording(Quadratic):
    """Quadratic whose c-th inner run is 4, 6 or 8 steps long (c mod 3),
    recording each reset's and each unroll's (counter, slot)."""

    def __init__(self):
        super().__init__(truncation=2, horizon=4)
        self.resets, self.unrolls = [], []

    def horizon_of(self, counter):
        return 4 + 2 * (counter % 3)

    def reset(self, counter, trajectories, slot=0):
        self.resets.append((counter, slot))
        return super().reset(counter, trajectories, slot)

    def unroll(self, thetas, inner, counter, slot=0):
        self.unrolls.append((counter, slot))
        return super().unroll(thetas, inner, counter, slot)


def test_task_slots_take_counters_in_order_and_stagger_their_first_runs():
    """Three slots, truncation 2, runs of 4, 6, 8, 4, ... steps, worked out by
    hand: slot j's first run stops at (3 - j) / 3 of its length (slot 1:
    c1's 6 steps -> 4, slot 2: c2's 8 -> 2); each later run is whole, and a
    slot that ends takes the next counter, lowest slot first."""
    problem = Recording()
    t = MetaTrainer(problem, make_estimator("pes", 0.01), pairs=3, tasks_per_step=3)
    for _ in range(8):
        t.outer_step()
    # step 0: c0-c2; 1: slot 2 (2 steps done); 2: slots 0, 1 (4 steps each);
    # 3: slot 2 (c3's 4); 5: slot 0 (c4's 6), slot 2 (c6's 4); 6: slot 1 (c5's 8).
    assert problem.resets == [(0, 0), (1, 1), (2, 2), (3, 2), (4, 0), (5, 1), (6, 2), (7, 0),
                              (8, 2), (9, 1)]  # fmt: skip
    assert problem.unrolls == [(3 * step + j, j) for step in range(8) for j in range(3)]
    assert t.resets == 10 and [s.counter for s in t.slots] == [7, 9, 8]


@pytest.mark.parametrize("per_task", [False, True])
def test_a_step_over_task_slots_is_the_mean_of_its_tasks(per_task):
    """Two slots of two pairs: the meta-gradient is the mean of the two
    tasks' PES estimates (each over its RMS loss difference with
    per_task), computed here one task at a time."""
    from meta_train.problems import rng

    sigma, pairs = 0.05, 4
    family = "mlp-family-small"
    t = MetaTrainer(tiny_problem(family=family), make_estimator("pes", sigma), pairs=pairs,
                    clip=1e12, per_task=per_task, tasks_per_step=2)  # fmt: skip
    t.outer_step()
    ref = tiny_problem(family=family)
    theta = ref.initial_theta()
    noise = torch.randn(pairs, theta.numel(), generator=rng(0, "noise", 0))
    per_slot = []
    for j, (a, b) in enumerate([(0, 2), (2, 4)]):
        eps = sigma * noise[a:b]
        inner = ref.reset(j, 2 * (b - a), slot=j)
        metas, _, _ = ref.unroll(torch.cat([theta + eps, theta - eps]), inner, j, slot=j)
        diff = (metas[: b - a] - metas[b - a :]) / (2 * sigma)
        g = (diff[:, None] * noise[a:b]).mean(0)
        per_slot.append(g / diff.square().mean().sqrt() if per_task else g)
    torch.testing.assert_close(t.theta.grad, torch.stack(per_slot).mean(0))
    names = [ref.task_of(c).name for c in range(2)]
    assert t.tasks_drawn() == names and names[0] != names[1]


def test_a_version_1_checkpoint_resumes_as_one_task_slot(tmp_path):
    """A checkpoint written before task slots (one inner run at its top
    level) resumes as slot 0 and continues exactly; one with another number
    of tasks per step is refused before anything is loaded."""
    full = tiny_trainer(tmp_path / "full")
    full.train(7, progress=False)
    part = tiny_trainer(tmp_path / "part")
    part.train(4, progress=False)
    path = tmp_path / "part" / "checkpoint.pt"
    sd = torch.load(path, weights_only=False)
    (slot,) = sd.pop("slots")
    del sd["tasks_per_step"]
    sd.update(version=1, inner=slot["inner"], est_state=slot["est_state"],
              inner_t=slot["inner_t"])  # fmt: skip
    torch.save(sd, path)
    other = tiny_trainer(tmp_path / "part", tasks_per_step=2)
    before = other.theta.detach().clone()
    with pytest.raises(ValueError, match="checkpoint has tasks_per_step=1, this run 2"):
        other.resume()
    assert other.step == 0 and torch.equal(other.theta, before)
    resumed = tiny_trainer(tmp_path / "part")
    resumed.resume()
    resumed.train(7, progress=False)
    assert torch.equal(resumed.theta, full.theta)


def test_tasks_per_step_needs_a_pair_per_task():
    problem = tiny_problem()
    before = problem.initial_theta()
    for bad in (0, 3):
        with pytest.raises(ValueError, match=r"tasks_per_step must be in \[1, population \(2\)\]"):
            MetaTrainer(problem, make_estimator("pes"), pairs=2, tasks_per_step=bad)
    assert problem.unrollers == {} and torch.equal(problem.initial_theta(), before)


def test_meta_lr_decay_follows_the_cosine(tmp_path):
    full = tiny_trainer(tmp_path / "full", meta_lr_decay_steps=5, meta_lr_final=0.2)
    history = full.train(7, progress=False)
    naive = [1e-2 * (0.2 + 0.8 * (1 + math.cos(math.pi * min(s, 5) / 5)) / 2) for s in range(7)]
    assert [h["meta_lr"] for h in history] == pytest.approx(naive, rel=1e-12)
    assert history[-1]["meta_lr"] == pytest.approx(2e-3)
    assert full.meta_opt.param_groups[0]["lr"] == pytest.approx(2e-3)
    constant = tiny_trainer(tmp_path / "constant")
    assert {h["meta_lr"] for h in constant.train(7, progress=False)} == {1e-2}
    assert not torch.equal(constant.theta, full.theta)  # the decay moved the net less late
    with pytest.raises(ValueError, match="meta_lr_final in"):
        MetaTrainer(tiny_problem(), make_estimator("pes", 0.05), meta_lr_final=1.5)


@pytest.mark.parametrize("layout_from", ["checkpoint", "optimizer.pt"])
def test_a_resumed_run_carries_its_net_over_to_new_nf_roles(tmp_path, layout_from):
    """A newer net (here: with attention's NF roles) resumes an older run's
    checkpoint: shared meta-parameters by name, new ones at 0, in theta and
    in the meta-optimizer's moments."""

    def trainer(attention):
        torch.manual_seed(0)
        net = lopt.NFNNet(width=4, depth=1, attention_roles=attention)
        problem = LearnedOptimizerProblem(net, get_family("mlp-gmm"), truncation=3, horizon=6)
        est = make_estimator("pes", 0.05)
        return MetaTrainer(
            problem, est, pairs=2, meta_lr=1e-2, out_dir=tmp_path, checkpoint_every=2
        )

    old = trainer(False)
    old.train(2, progress=False)
    if layout_from == "optimizer.pt":  # a checkpoint from before layouts were stored
        sd = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
        del sd["theta_layout"]
        torch.save(sd, tmp_path / "checkpoint.pt")
        lopt.save(old.problem.net, tmp_path / "optimizer.pt")
    new = trainer(True)
    assert new.theta.numel() > old.theta.numel()
    with pytest.warns(UserWarning, match=r"carried over, \d+ new at 0 \(nf\.weights\."):
        new.resume()
    assert new.step == 2
    before = dict(old.problem.net.named_parameters())
    moments = new.meta_opt.state[new.theta]["exp_avg"]
    at = 0
    for name, p in new.problem.net.named_parameters():
        part = moments[at : at + p.numel()]
        if name in before:
            assert torch.equal(p, before[name])
        else:
            assert not p.any() and not part.any()
        at += p.numel()
    new.train(3, progress=False)
    assert torch.isfinite(new.theta).all()


class SampledQuadratic(Quadratic):
    """The quadratic with each inner run's horizon drawn from [2, 12]."""

    def __init__(self):
        super().__init__(truncation=2, horizon=2)
        self.horizon_max, self.seed = 12, 3


def test_sampled_horizons_are_log_uniform_multiples_of_the_truncation():
    problem = tiny_problem()
    assert {problem.horizon_of(c) for c in range(20)} == {6}  # fixed without horizon_max
    problem = LearnedOptimizerProblem(
        problem.net, problem.family, truncation=20, horizon=200, horizon_max=1000
    )
    draws = [problem.horizon_of(c) for c in range(2000)]
    assert draws == [problem.horizon_of(c) for c in range(2000)]  # a function of the counter
    assert all(d % 20 == 0 and 200 <= d <= 1000 for d in draws)
    assert min(draws) == 200 and max(draws) == 1000
    # Log-uniform: the median is near the geometric mean (447), far from the mean (500+).
    assert 400 <= sorted(draws)[1000] <= 480
    with pytest.raises(ValueError, match="horizon_max >= horizon"):
        LearnedOptimizerProblem(problem.net, problem.family, horizon=200, horizon_max=100)


def test_horizons_weighted_by_steps_give_each_octave_the_same_share_of_inner_steps():
    tiny = tiny_problem()
    net, family = tiny.net, tiny.family

    def shares(weighting):
        problem = LearnedOptimizerProblem(
            net, family, truncation=25, horizon=200, horizon_max=6400, horizon_weighting=weighting
        )
        draws = [problem.horizon_of(c) for c in range(8000)]
        assert all(d % 25 == 0 and 200 <= d <= 6400 for d in draws)
        total = sum(draws)
        return [sum(d for d in draws if a <= d < 2 * a) / total for a in (200, 400, 800, 1600)]

    # Log-uniform runs: each octave takes twice the inner steps of the one below.
    runs = shares("runs")
    assert all(1.7 < hi / lo < 2.3 for lo, hi in zip(runs, runs[1:]))
    # Density 1 / L**2: the same share, a fifth for each of the five octaves.
    assert all(0.17 < share < 0.23 for share in shares("steps"))
    with pytest.raises(ValueError, match="horizon_weighting must be one of"):
        LearnedOptimizerProblem(net, family, horizon=200, horizon_max=400, horizon_weighting="x")


def test_trainer_restarts_inner_runs_at_their_drawn_horizon(tmp_path):
    def trainer(out=None):
        return MetaTrainer(
            SampledQuadratic(),
            make_estimator("pes", 0.05),
            pairs=2,
            out_dir=out,
            checkpoint_every=5,
        )

    full = trainer(tmp_path / "full")
    history = full.train(40, progress=False)
    lengths, t = [], None
    for h in history:
        if h["inner_t"] == 0 and t is not None:
            lengths.append(t)
        t = h["inner_t"] + 2
    problem = SampledQuadratic()
    assert lengths == [problem.horizon_of(c) for c in range(len(lengths))]
    assert len(set(lengths)) > 2
    # A resumed run draws the same horizons, so it continues exactly.
    trainer(tmp_path / "part").train(13, progress=False)
    resumed = trainer(tmp_path / "part")
    resumed.resume()
    rest = resumed.train(40, progress=False)
    assert [h["inner_t"] for h in rest] == [h["inner_t"] for h in history[13:]]
    assert torch.equal(resumed.theta, full.theta)


def test_killed_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    t = MetaTrainer(
        tiny_problem(), make_estimator("pes", 0.05), pairs=2, out_dir=tmp_path, checkpoint_every=0
    )
    t.train(2, progress=False)
    good = torch.load(tmp_path / "checkpoint.pt", weights_only=False)

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("killed mid-write")

    monkeypatch.setattr(lopt.checkpoint.torch, "save", dying_save)
    t.outer_step()
    with pytest.raises(OSError, match="killed mid-write"):
        t.save_checkpoint()
    monkeypatch.undo()
    again = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert again["step"] == good["step"] == 2
    assert torch.equal(again["theta"], good["theta"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "tb"]


class Exploding(Quadratic):
    def unroll(self, thetas, inner, counter, slot=0):
        metas, losses, inner = super().unroll(thetas, inner, counter)
        if counter == 1:
            metas = metas * float("nan")
        if counter == 3:
            raise KeyboardInterrupt
        return metas, losses, inner


def test_nonfinite_meta_gradient_is_skipped_and_ctrl_c_checkpoints(tmp_path):
    t = MetaTrainer(
        Exploding(2, 10), make_estimator("es", 0.01), pairs=4, out_dir=tmp_path, checkpoint_every=0
    )
    t.outer_step()
    before = t.theta.detach().clone()
    m = t.outer_step()
    assert m["skipped"] and t.skipped == 1 and torch.equal(t.theta, before)
    with pytest.raises(KeyboardInterrupt):
        t.train(10, progress=False)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 3 and saved["skipped"] == 1


def _distributed_worker(rank, store, out, per_task=False, pairs=4, tasks=1):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    t = MetaTrainer(
        tiny_problem(family=GLOO_FAMILY),
        make_estimator("pes", 0.05),
        pairs=pairs,
        meta_lr=1e-2,
        out_dir=out,
        checkpoint_every=0,
        per_task=per_task,
        tasks_per_step=tasks,
    )
    t.train(3, progress=False)
    if rank == 0:
        torch.save(t.theta.detach(), os.path.join(out, "theta.pt"))
    dist.barrier()  # as meta_train's main: no rank tears gloo down while another works
    dist.destroy_process_group()


def _stopped_at_once_worker(rank, store, out):
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))  # fmt: skip
    problem = tiny_problem()
    if rank == 0:  # a second signal: KeyboardInterrupt in the middle of outer step 2
        unroll = problem.unroll

        def interrupted(thetas, inner, counter, slot=0):
            if counter == 2:
                raise KeyboardInterrupt("SIGTERM")
            return unroll(thetas, inner, counter, slot)

        problem.unroll = interrupted
    t = MetaTrainer(problem, make_estimator("pes", 0.05), pairs=4, meta_lr=1e-2, out_dir=out,
                    checkpoint_every=1)  # fmt: skip
    try:
        t.train(5, progress=False)
    except KeyboardInterrupt as e:
        Path(out, f"rank{rank}").write_text(type(e).__name__)
    except RuntimeError:  # its peer left in the middle of a collective
        Path(out, f"rank{rank}").write_text("RuntimeError")
    # Each rank's outcome is written. Leave without gloo's teardown: after a
    # peer left in the middle of a collective, its destructors can abort the
    # process ("terminate called without an active exception", in either
    # rank), which is gloo's, not what this test checks.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.slow
def test_a_stop_at_once_over_two_processes_leaves_the_last_checkpoint(tmp_path):
    """Stopped at once (torchrun's second SIGTERM) while its peer is in a
    collective, a rank must not start a checkpoint's gather (it would wait
    for a peer that never joins) but raise at once, so that the command line
    writes optimizer.pt; the last periodic checkpoint stays whole."""
    out = tmp_path / "run"
    out.mkdir()
    torch.multiprocessing.spawn(
        _stopped_at_once_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2
    )
    assert (out / "rank0").read_text() == "KeyboardInterrupt"
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 2


def _cli_worker(rank, port, argv):
    import time

    import meta_train.__main__ as cli

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    if rank == 1:  # checks late: rank 0 has written the new run's files by then, unless it waits
        check = cli.check_new_out
        cli.check_new_out = lambda *a: (time.sleep(2), check(*a))[1]
    assert cli.main(argv) == 0


@pytest.mark.slow
def test_a_new_run_starts_under_two_processes(tmp_path):
    """torchrun's ranks all check that --out is new before rank 0 writes
    into it: no rank finds the run its peer just started."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    argv = [*TINY_MAGNITUDE_NFN.split(), "--no-progress", "--out", str(out)]
    torch.multiprocessing.spawn(_cli_worker, args=(port, argv), nprocs=2)
    _, meta = lopt.load(out / "optimizer.pt")
    assert meta["outer_steps"] == 2


GLOO_FAMILY = "mlp-family-small"


@pytest.mark.slow
@pytest.mark.parametrize(
    "per_task,pairs,tasks",
    # 6 pairs in 3 slots over 2 ranks: the middle slot's pairs are split between them.
    [(False, 4, 1), (True, 4, 1), (True, 6, 3)],
)
def test_two_gloo_processes_equal_one(tmp_path, per_task, pairs, tasks):
    one = MetaTrainer(
        tiny_problem(family=GLOO_FAMILY),
        make_estimator("pes", 0.05),
        pairs=pairs,
        meta_lr=1e-2,
        out_dir=tmp_path / "one",
        checkpoint_every=0,
        per_task=per_task,
        tasks_per_step=tasks,
    )
    one.train(3, progress=False)
    out = tmp_path / "two"
    out.mkdir()
    torch.multiprocessing.spawn(
        _distributed_worker,
        args=(str(tmp_path / "store"), str(out), per_task, pairs, tasks),
        nprocs=2,
    )
    two = torch.load(out / "theta.pt")
    torch.testing.assert_close(two, one.theta.detach(), rtol=1e-5, atol=1e-7)
    # The checkpoint gathered every rank's inner state: it resumes in one process.
    resumed = MetaTrainer(tiny_problem(family=GLOO_FAMILY), make_estimator("pes", 0.05),
                          pairs=pairs, meta_lr=1e-2, out_dir=out, tasks_per_step=tasks)  # fmt: skip
    resumed.resume()
    one_sd, two_sd = one.state_dict(), resumed.state_dict()
    for a, b in zip(
        torch.utils._pytree.tree_leaves(one_sd["slots"]),
        torch.utils._pytree.tree_leaves(two_sd["slots"]),
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cli_smoke_writes_events_and_a_loadable_optimizer(tmp_path):
    from meta_train.__main__ import main

    out = tmp_path / "run"
    args = [
        "--net",
        "nfn",
        "--width",
        "4",
        "--depth",
        "1",
        "--family",
        "mlp-gmm",
        "--estimator",
        "pes",
        "--outer-steps",
        "3",
        "--truncation",
        "2",
        "--horizon",
        "4",
        "--population",
        "2",
        "--eval-every",
        "3",
        "--eval-steps",
        "10",
        "--meta-loss",
        "log",
        "--meta-loss-ramp",
        "4",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    assert list((out / "tb").glob("events.out.tfevents.*"))
    net, meta = lopt.load(out / "optimizer.pt")
    assert isinstance(net, lopt.NFNNet) and meta["outer_steps"] == 3
    assert meta["config"]["meta_loss_ramp"] == 4
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    lopt.NFNOptimizer(model.parameters(), weights=out / "optimizer.pt")
    assert main(["--resume", str(out), "--outer-steps", "4", "--no-progress"]) == 0
    meta = lopt.load(out / "optimizer.pt")[1]
    assert meta["outer_steps"] == 4 and meta["train_seconds_total"] > 0
    # Every session is in the history, and shipping puts it in the model card.
    assert [h["outer_steps"] for h in meta["history"]] == [3, 4]
    assert meta["history"][1]["command"].startswith("python -m meta_train --resume")


def test_the_periodic_evaluation_tunes_adam_at_its_first_run_only(monkeypatch):
    """Building the evaluation tunes nothing (a trainer built to check a
    recipe or resume a run stays cheap); the first evaluation tunes Adam,
    later ones reuse it, and tuning draws nothing from the global generator
    (a resumed run evaluates first at another step than the run it resumes)."""
    from types import SimpleNamespace

    from meta_train.__main__ import make_eval
    from tasks import runs

    calls = []
    real_tune = runs.tune
    monkeypatch.setattr(runs, "tune", lambda *a, **k: calls.append(a[2]) or real_tune(*a, **k))
    evaluate = make_eval({"eval_task": "mlp-gmm", "eval_steps": 5}, torch.device("cpu"))
    assert calls == []
    trainer = SimpleNamespace(problem=SimpleNamespace(net=PerParamMLP(width=4)))
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        results = evaluate(trainer)
        states.append(torch.get_rng_state())
        assert calls == [5]
    assert torch.equal(*states)  # the first call (it tuned) drew as the second did
    assert all(math.isfinite(v) and v > 0 for v in results.values())
    ratio = results["learned_final_loss"] / results["adam_final_loss"]
    assert results["learned_over_adam"] == ratio


def test_cli_snapshots_keep_the_net_of_each_step(tmp_path):
    from meta_train.__main__ import main, snapshot_path

    out = tmp_path / "run"
    args = "--net nfn --width 4 --family mlp-gmm --truncation 2 --horizon 4 --population 1"
    run = [*args.split(), "--meta-lr", "0.1", "--out", str(out), "--no-progress"]
    assert main([*run, "--outer-steps", "4", "--snapshot-every", "2"]) == 0
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == [
        "optimizer-000002.pt",
        "optimizer-000004.pt",
    ]
    final, final_meta = lopt.load(out / "optimizer.pt")
    last, last_meta = lopt.load(snapshot_path(out, 4))
    first, first_meta = lopt.load(snapshot_path(out, 2))
    assert (first_meta["outer_steps"], last_meta["outer_steps"]) == (2, 4)
    for k, v in final.state_dict().items():
        torch.testing.assert_close(last.state_dict()[k], v)
    moved = [k for k, v in final.state_dict().items() if not torch.equal(first.state_dict()[k], v)]
    assert moved  # the step-2 snapshot is not the final net
    # Snapshots leave the run's history (the model card's recipe) alone.
    assert len((out / "history.jsonl").read_text().splitlines()) == 1
    assert main(["--resume", str(out), "--outer-steps", "6", "--no-progress"]) == 0
    assert snapshot_path(out, 6).exists()  # the resumed run keeps the saved option
    assert lopt.load(snapshot_path(out, 6))[1]["history"][-1]["outer_steps"] == 6


def test_ship_copies_a_run_into_the_registry_with_its_card(tmp_path, monkeypatch, capsys):
    from meta_train.__main__ import main
    from meta_train.ship import main as ship

    out = tmp_path / "run"
    args = "--net mlp --width 4 --family mlp-gmm --outer-steps 2 --truncation 2 --horizon 4"
    assert main([*args.split(), "--population", "1", "--out", str(out), "--no-progress"]) == 0
    dest = tmp_path / "pretrained"
    assert ship([str(out), "my-mlp", "--dest", str(dest)]) == 0
    card = capsys.readouterr().out
    assert "**`my-mlp`** (PerParamMLP" in card and "--outer-steps 2" in card
    assert "kept by --snapshot-every" not in card
    snap = tmp_path / "snap"
    run = [*args.split(), "--population", "1", "--snapshot-every", "1", "--out", str(snap)]
    assert main([*run, "--no-progress"]) == 0
    first = snap / "snapshots" / "optimizer-000001.pt"
    assert ship([str(first), "my-snap", "--dest", str(dest)]) == 0
    assert "Outer steps: 1 (the net at outer step 1 of the recipe's 2" in capsys.readouterr().out
    assert "input layers keep width factor 1" in card
    assert "learned term tangent to weight rows" in card
    other = tmp_path / "other-rule"
    flags = ["--width-factor-on-input-layers", "--no-learned-term-tangent"]
    assert main([*args.split(), *flags, "--out", str(other), "--no-progress"]) == 0
    assert ship([str(other), "my-mlp-other", "--dest", str(dest)]) == 0
    other_card = capsys.readouterr().out
    assert "input layers get the width factor" in other_card
    assert "learned term free to change weight rows' norms" in other_card
    assert "Neuron statistics" not in card
    stats = tmp_path / "stats"
    nfn = args.replace("--net mlp", "--net nfn --nf-channels 2 --neuron-stats")
    assert main([*nfn.split(), "--out", str(stats), "--no-progress"]) == 0
    assert ship([str(stats), "my-nfn-stats", "--dest", str(dest)]) == 0
    w = lopt.load(stats / "optimizer.pt")[0].stat_weight[0].tolist()
    want = f"log_rel_rms_grad): row ({w[0]:+.3f}, {w[1]:+.3f}, {w[2]:+.3f}); column ("
    stats_card = capsys.readouterr().out
    assert want in stats_card and "relative to a width-scaled init" not in stats_card
    free = tmp_path / "free"
    assert main([*nfn.split(), "--width-free-stats", "--out", str(free), "--no-progress"]) == 0
    assert ship([str(free), "my-nfn-free", "--dest", str(dest)]) == 0
    free_card = capsys.readouterr().out
    assert "the weights' log RMS read relative to a width-scaled init." in free_card
    assert "units of Adam's step" not in free_card + stats_card
    units = tmp_path / "units"
    argv = [*nfn.split(), "--term-in-adam-units", "--out", str(units), "--no-progress"]
    assert main(argv) == 0 and lopt.load(units / "optimizer.pt")[0].term_in_adam_units
    assert ship([str(units), "my-nfn-units", "--dest", str(dest)]) == 0
    assert "a fixed 1 on Adam's direction over the whole tensor" in capsys.readouterr().out
    ramp = tmp_path / "ramp"
    assert main([*args.split(), "--meta-loss-ramp", "4", "--out", str(ramp), "--no-progress"]) == 0
    assert ship([str(ramp), "my-mlp-ramp", "--dest", str(dest)]) == 0
    assert "`mean` meta-loss weighted by min(1, t / 4) over inner step t" in capsys.readouterr().out
    frac = tmp_path / "frac"
    run = [*args.split(), "--meta-loss-ramp-fraction", "0.5", "--out", str(frac), "--no-progress"]
    assert main(run) == 0
    assert lopt.load(frac / "optimizer.pt")[1]["config"]["meta_loss_ramp_fraction"] == 0.5
    assert ship([str(frac), "my-mlp-frac", "--dest", str(dest)]) == 0
    card = capsys.readouterr().out
    assert "weighted by min(1, t / (0.5 N)) over inner step t of a run of N steps" in card
    end = tmp_path / "end"
    flags = "--meta-loss-ramp-fraction 0.5 --meta-loss-end-weight 0.4 --meta-loss-stay"
    assert main([*args.split(), *flags.split(), "--out", str(end), "--no-progress"]) == 0
    config = lopt.load(end / "optimizer.pt")[1]["config"]
    assert config["meta_loss_end_weight"] == 0.4 and config["meta_loss_stay"] is True
    assert ship([str(end), "my-mlp-end", "--dest", str(dest)]) == 0
    card = capsys.readouterr().out
    assert (
        "by min(1, t / (0.5 N)) (1 - 0.6 t / N) over inner step t of a run of N steps, "
        "each step's loss counted as the highest from it to its truncation's end" in card
    )
    monkeypatch.setattr(lopt.checkpoint, "PRETRAINED_DIR", dest)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = lopt.MLPOptimizer(model.parameters(), weights="my-mlp")
    assert opt.metadata["history"][0]["outer_steps"] == 2
    with pytest.raises(SystemExit, match="over --max-mb"):
        ship([str(out), "too-big", "--dest", str(dest), "--max-mb", "0.0001"])
    assert not (dest / "too-big.pt").exists()
    with pytest.raises(SystemExit, match="no such file"):
        ship([str(tmp_path / "nothing"), "x", "--dest", str(dest)])


@pytest.mark.slow
class Signalling(Quadratic):
    """Sends its own process ``sig`` in the middle of the unroll of outer step
    ``at`` (0-based), as a signal comes in the middle of a step."""

    def __init__(self, *args, sig=signal.SIGTERM, at=2, **kw):
        super().__init__(*args, **kw)
        self.sig, self.at, self.sent = sig, at, 0

    def unroll(self, thetas, inner, counter, slot=0):
        metas, losses, inner = super().unroll(thetas, inner, counter)
        if counter == self.at:
            self.sent += 1
            os.kill(os.getpid(), self.sig)
        return metas, losses, inner


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_training_after_the_step_it_came_in(tmp_path, sig):
    # The step finishes (nothing is cut mid-way: torch.func and TensorBoard's
    # writer are left whole), then a checkpoint, then KeyboardInterrupt.
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    t = MetaTrainer(
        Signalling(2, 10, sig=sig), make_estimator("es", 0.01), pairs=2, out_dir=tmp_path,
        checkpoint_every=0,
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt, match=signal.Signals(sig).name):
        t.train(10, progress=False)
    t.close()
    ref = MetaTrainer(Quadratic(2, 10), make_estimator("es", 0.01), pairs=2)
    ref.train(3, progress=False)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert t.step == saved["step"] == 3 and t.problem.sent == 1
    assert torch.equal(t.theta, ref.theta)
    assert {s: signal.getsignal(s) for s in before} == before  # handlers put back
    # A run resumes from there as if never stopped.
    back = MetaTrainer(Quadratic(2, 10), make_estimator("es", 0.01), pairs=2, out_dir=tmp_path)
    back.resume()
    back.train(5, progress=False)
    ref.train(5, progress=False)
    assert torch.equal(back.theta, ref.theta)


def test_a_machine_is_named_with_each_word_once():
    from meta_train.ship import machine_label

    assert machine_label("vm", "x86_64", "x86_64") == "vm x86_64"
    assert machine_label("vm x86_64 x86_64") == "vm x86_64"  # a label recorded before
    assert machine_label("host", "aarch64", "") == "host aarch64"
    assert machine_label("?") == "?"


def test_stop_requests_record_one_signal_and_raise_on_a_second():
    from meta_train.stopping import REPEAT_WINDOW_S, StopRequests

    before = signal.getsignal(signal.SIGTERM)
    with StopRequests() as stops:
        assert stops.signum is None and stops.name is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stops.name == "SIGTERM"  # recorded, nothing raised
        with pytest.raises(KeyboardInterrupt, match="SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs before this ends
    assert signal.getsignal(signal.SIGTERM) == before
    # The same signal again at once is the same request (torchrun forwards the
    # SIGTERM it got; `pkill -f` reached the worker too); later it is a second.
    with StopRequests() as stops:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stops.name == "SIGTERM"
        stops._first_at -= REPEAT_WINDOW_S + 0.1  # the first came longer ago
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    # Off the main thread no handler can be set: it changes nothing.
    import threading

    seen = []
    worker = threading.Thread(target=lambda: seen.append(StopRequests().__enter__()._replaced))
    worker.start()
    worker.join()
    assert seen == [{}] and signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_cli_stops_on_a_signal_with_a_checkpoint_and_optimizer(tmp_path, sig):
    # As a background job started by a shell: SIGINT ignored until main() takes it.
    out = tmp_path / "run"
    args = "--net mlp --width 4 --family mlp-gmm --truncation 2 --horizon 4 --population 1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "meta_train", *args.split(), "--outer-steps", "100000",
         "--checkpoint-every", "5", "--eval-every", "0", "--out", str(out), "--no-progress"],
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(getattr(signal, sig))
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, log
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    _, meta = lopt.checkpoint.load(out / "optimizer.pt")
    assert 5 <= saved["step"] < 100000 and meta["outer_steps"] == saved["step"]


def test_cli_bad_input(tmp_path):
    from meta_train.__main__ import main

    gmm = ["--family", "mlp-gmm"]
    refused = [  # (arguments, --out folder or None, the message)
        (gmm, None, "--out DIR is required"),
        (["--family", "mlp-gm"], "", "did you mean mlp-gmm"),
        ([*gmm, "--truncation", "10", "--horizon", "5"], "x",
         "--horizon \\(5\\) must be at least --truncation"),
        ([*gmm, "--horizon-max", "100"], "y", "--horizon-max \\(100\\) must be at least --horizon"),
        ([*gmm, "--meta-loss-ramp", "-5"], "z", "--meta-loss-ramp must be a whole number >= 0"),
        ([*gmm, "--meta-loss-ramp-fraction", "2"], "f",
         "ramp-fraction must be a number in \\[0, 1\\], got 2"),
        ([*gmm, "--meta-loss-ramp", "5", "--meta-loss-ramp-fraction", "0.5"], "g",
         "--meta-loss-ramp or --meta-loss-ramp-fraction, not both"),
        ([*gmm, "--meta-loss-offset", "1e-4"], "o", "--meta-loss-offset is for --meta-loss log"),
        ([*gmm, "--meta-loss", "log", "--meta-loss-offset", "1"], "p",
         "--meta-loss-offset must be below 1, got 1.0"),
        ([*gmm, "--meta-loss-end-weight", "0"], "e",
         "end-weight must be a number in \\(0, 1\\], got 0"),
        ([*gmm, "--meta-loss", "final", "--meta-loss-stay"], "s",
         "--meta-loss-stay is for a loss over steps, not --meta-loss final"),
        ([*gmm, "--estimator", "backprop", "--per-task"], "h",
         "--per-task scales the antithetic pairs of es or pes"),
    ]  # fmt: skip
    for args, out, message in refused:
        where = [] if out is None else ["--out", str(tmp_path / out)]
        with pytest.raises(SystemExit, match=message):
            main([*args, *where])
    with pytest.raises(SystemExit, match="no config.json"):
        main(["--resume", str(tmp_path / "nothing")])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("width_free", [False, True])
def test_neuron_stats_flag_trains_the_statistics_coefficients(width_free, tmp_path):
    """--neuron-stats builds an NFN whose log-magnitude reads neuron
    statistics (--width-free-stats: the weights' relative to a width-scaled
    init), trains their coefficients from 0, keeps the setting on --resume;
    with --net mlp, or width-free without the statistics, it is refused
    before anything is written."""
    from meta_train.__main__ import main

    out = tmp_path / "run"
    flags = "--neuron-stats --width-free-stats" if width_free else "--neuron-stats"
    args = f"{TINY_MAGNITUDE_NFN} {flags} --no-progress --out {out}"
    assert main(args.split()) == 0
    net, meta = lopt.load(out / "optimizer.pt")
    assert net.neuron_stats and meta["config"]["neuron_stats"] is True
    assert net.width_free_stats is width_free
    assert meta["config"]["width_free_stats"] is width_free
    assert (net.stat_weight.abs() > 0.01).any()
    assert main(["--resume", str(out), "--outer-steps", "3", "--no-progress"]) == 0
    assert lopt.load(out / "optimizer.pt")[0].width_free_stats is width_free
    bad = tmp_path / "bad"
    with pytest.raises(SystemExit, match="--neuron-stats is for --net nfn"):
        main(["--net", "mlp", "--neuron-stats", "--family", "mlp-gmm", "--out", str(bad)])
    with pytest.raises(SystemExit, match="--width-free-stats changes what --neuron-stats read"):
        main(["--net", "nfn", "--width-free-stats", "--family", "mlp-gmm", "--out", str(bad)])
    assert not bad.exists()


def test_distribution_slices_cover_the_population():
    from meta_train.trainer import pair_slice

    assert [pair_slice(5, r, 2) for r in range(2)] == [(0, 2), (2, 5)]
    with pytest.raises(ValueError, match="cannot be split"):
        pair_slice(1, 0, 2)


def test_init_from_warm_starts_the_shared_tensors(tmp_path):
    from meta_train.__main__ import main, warm_start

    torch.manual_seed(0)
    source = PerParamMLP(width=4, lr=0.02)
    lopt.save(source, tmp_path / "mlp.pt")
    nfn = lopt.NFNNet(width=4, nf_channels=2)
    fresh_nf = {k: v.clone() for k, v in nfn.state_dict().items() if k.startswith("nf")}
    copied = warm_start(nfn, str(tmp_path / "mlp.pt"))
    assert set(copied) == set(source.state_dict())
    from meta_train.__main__ import name_groups

    grouped = name_groups(["log_lr", "nf.a", "inp.weight", "nf.b"])
    assert grouped == "log_lr, nf.* (2 tensors), inp.weight"
    for k, v in source.state_dict().items():
        assert torch.equal(nfn.state_dict()[k], v)
    for k, v in fresh_nf.items():  # the NF-layer starts fresh
        assert torch.equal(nfn.state_dict()[k], v)
    with pytest.raises(SystemExit, match="shapes differ.*inp.weight"):
        warm_start(lopt.NFNNet(width=8), str(tmp_path / "mlp.pt"))
    # A run started with --init-from begins from those weights.
    out = tmp_path / "run"
    args = "--net nfn --width 4 --nf-channels 2 --family mlp-gmm --outer-steps 1"
    args += f" --truncation 2 --horizon 4 --population 1 --init-from {tmp_path / 'mlp.pt'}"
    assert main([*args.split(), "--meta-lr", "1e-9", "--out", str(out), "--no-progress"]) == 0
    trained, meta = lopt.load(out / "optimizer.pt")
    assert meta["config"]["init_from"] == str(tmp_path / "mlp.pt")
    torch.testing.assert_close(trained.log_lr, source.log_lr, atol=1e-6, rtol=0)


# A magnitude-only NFN run small enough for a unit test (2 outer steps).
TINY_MAGNITUDE_NFN = (
    "--net nfn --width 4 --nf-channels 2 --nf-outputs magnitude --family mlp-gmm"
    " --outer-steps 2 --truncation 2 --horizon 4 --population 2 --meta-lr 0.05"
)


def test_nf_outputs_magnitude_trains_a_magnitude_only_nf_layer(tmp_path):
    """--nf-outputs magnitude builds, trains, saves and resumes an NFN whose
    NF-layer writes the log-magnitude alone; the per-entry net warm-starts
    from an MLP as with the default."""
    from meta_train.__main__ import main

    torch.manual_seed(0)
    lopt.save(PerParamMLP(width=4, lr=0.02), tmp_path / "mlp.pt")
    out = tmp_path / "run"
    args = f"{TINY_MAGNITUDE_NFN} --init-from {tmp_path / 'mlp.pt'} --no-progress --out {out}"
    assert main(args.split()) == 0
    net, meta = lopt.load(out / "optimizer.pt")
    assert net.nf_outputs == "magnitude" and meta["config"]["nf_outputs"] == "magnitude"
    assert {w.shape[-1] for w in net.nf.parameters()} == {1}
    fresh = lopt.NFNNet(width=4, nf_channels=2, nf_outputs="magnitude", out_scale=0.01)
    assert any(  # the NF-layer was trained (from a fresh layer at init scale)
        w.abs().max() > 2 * v.abs().max()
        for w, v in zip(net.nf.parameters(), fresh.nf.parameters())
    )
    assert main(["--resume", str(out), "--outer-steps", "3", "--no-progress"]) == 0
    assert lopt.load(out / "optimizer.pt")[0].nf_outputs == "magnitude"
    with pytest.raises(SystemExit):
        main([*args.split()[:-1], str(tmp_path / "bad"), "--nf-outputs", "direction"])
    assert not (tmp_path / "bad").exists()


def test_card_gives_the_learned_schedule_and_the_one_it_started_from():
    """learned_schedule: a fresh budget net's schedule is the prior's closed
    form (warm-up times the decay over the budget's end); a net whose
    schedule moved reads as moved, the prior does not; the card says both,
    and a net without a budget says neither."""
    from helpers import schedule_closed_form

    from meta_train.ship import SCHEDULE_FRACTIONS, learned_schedule, model_card

    net = PerParamMLP(width=4, budget=True)
    expected = schedule_closed_form(SCHEDULE_FRACTIONS)
    assert learned_schedule(net) == pytest.approx(expected, rel=1e-5)
    assert learned_schedule(net, prior=True) == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        net.schedule.bias.add_(math.log(0.5))
    assert learned_schedule(net) == pytest.approx([0.5 * e for e in expected], rel=1e-5)
    assert learned_schedule(net, prior=True) == pytest.approx(expected, rel=1e-5)
    card = model_card("x", {"config": {}, "outer_steps": 1}, net, 1)
    moved = ", ".join(f"{0.5 * e:.3g}" for e in expected)
    assert (
        f"in a run told 1,000 steps, at t / N = 0.01, 0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 1: {moved};"
        in card
    )
    assert "the schedule it started from: " + ", ".join(f"{e:.3g}" for e in expected) in card
    plain = model_card("x", {"config": {}, "outer_steps": 1}, PerParamMLP(width=4), 1)
    assert "Learned schedule" not in plain


class TwoRates(Quadratic):
    """Quadratic with a learning rate per coordinate, theta = (lr_0, lr_1)."""

    def initial_theta(self):
        return torch.tensor([0.3, 0.2], dtype=torch.float64)

    def rates(self, thetas):
        return thetas


class Reparameterised(TwoRates):
    """TwoRates whose meta-parameters are the rates divided by ``gains``:
    the naive form of training with gains."""

    def __init__(self, gains, *args):
        super().__init__(*args)
        self.gains = gains

    def initial_theta(self):
        return super().initial_theta() / self.gains

    def unroll(self, thetas, inner, counter, slot=0):
        return super().unroll(thetas * self.gains, inner, counter, slot)


@pytest.mark.parametrize("name", ["es", "pes", "backprop"])
def test_gains_train_the_meta_parameters_divided_by_them(name):
    """A trainer with gains G follows, step by step, a plain trainer of the
    problem rewritten in theta / G (the same noise, clipping and Adam), so
    a gained rate is perturbed and moved G times as far."""
    gains = torch.tensor([10.0, 1.0], dtype=torch.float64)
    kw = dict(pairs=4, meta_lr=1e-2, clip=0.05, seed=3, tasks_per_step=2)
    ours = MetaTrainer(TwoRates(2, 6), make_estimator(name, 0.01), gains=gains, **kw)
    naive = MetaTrainer(Reparameterised(gains, 2, 6), make_estimator(name, 0.01), **kw)
    start = ours.theta.detach().clone()
    for _ in range(5):
        m_ours, m_naive = ours.outer_step(), naive.outer_step()
        assert m_ours["grad_norm"] == pytest.approx(m_naive["grad_norm"], rel=1e-6)
        torch.testing.assert_close(ours.theta.detach(), naive.theta.detach() * gains)
    moved = (ours.theta.detach() - start).abs()
    assert moved[0] > 3 * moved[1]  # the gained rate moves further (Adam's steps are alike)
    for bad in (torch.tensor([1.0, 0.0]), torch.tensor([1.0, float("nan")]), torch.ones(3)):
        with pytest.raises(ValueError, match="gains"):
            MetaTrainer(TwoRates(2, 6), make_estimator(name, 0.01), gains=bad, **kw)


def test_gain_flag_moves_the_named_meta_parameters_further(tmp_path):
    """--gain NAME=G: the named meta-parameters move further than under the
    same run without it, the rest alike in size; a resumed run keeps the
    gains; a bad item is refused before anything is written."""
    from meta_train.__main__ import main

    common = ["--net", "mlp", "--width", "4", "--family", "mlp-gmm", "--truncation", "2"]
    common += ["--horizon", "4", "--population", "2", "--meta-lr", "0.01", "--no-progress"]
    common += ["--outer-steps", "3", "--budget"]
    plain, gained = tmp_path / "plain", tmp_path / "gained"
    assert main(common + ["--out", str(plain)]) == 0
    assert main(common + ["--gain", "schedule.*=20", "--out", str(gained)]) == 0
    start = PerParamMLP(width=4, budget=True)
    a, _ = lopt.load(plain / "optimizer.pt")
    b, meta = lopt.load(gained / "optimizer.pt")
    assert meta["config"]["gain"] == ["schedule.*=20"]

    def moved(net, name):
        return (net.get_parameter(name) - start.get_parameter(name)).abs().max().item()

    assert moved(b, "schedule.weight") > 5 * moved(a, "schedule.weight")
    assert moved(b, "schedule.bias") > 5 * moved(a, "schedule.bias")
    assert moved(b, "log_lr") < 3 * moved(a, "log_lr")
    assert main(["--resume", str(gained), "--outer-steps", "4", "--no-progress"]) == 0
    assert lopt.load(gained / "optimizer.pt")[1]["config"]["gain"] == ["schedule.*=20"]
    for bad, message in (
        ("schedule.weight", "give NAME=G with G a number > 0"),
        ("schedule.weight=0", "give NAME=G with G a number > 0"),
        ("schedule.weight=inf", "give NAME=G with G a number > 0"),
        ("nope=2", "--gain: no parameter 'nope'"),
        ("nope.*=2", "--gain: 'nope.\\*' matches no parameter"),
    ):
        with pytest.raises(SystemExit, match=message):
            main(common + ["--gain", bad, "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()  # nothing written for bad options


def test_freeze_holds_meta_parameters_at_their_value(tmp_path):
    from meta_train.__main__ import main

    out = tmp_path / "run"
    common = ["--net", "mlp", "--width", "4", "--family", "mlp-gmm", "--truncation", "2"]
    common += ["--horizon", "4", "--population", "2", "--meta-lr", "0.05", "--no-progress"]
    args = common + ["--outer-steps", "3", "--freeze", "fan_in_exp=0.7", "log_lr", "--out"]
    assert main(args + [str(out)]) == 0
    before = PerParamMLP(width=4)
    net, _ = lopt.load(out / "optimizer.pt")
    assert net.fan_in_exp.item() == torch.tensor(0.7).item()
    assert torch.equal(net.log_lr, before.log_lr)
    assert not torch.equal(net.out.weight, before.out.weight)  # the rest is trained
    assert main(["--resume", str(out), "--outer-steps", "5", "--no-progress"]) == 0
    net, _ = lopt.load(out / "optimizer.pt")
    assert net.fan_in_exp.item() == torch.tensor(0.7).item()
    assert torch.equal(net.log_lr, before.log_lr)
    for bad, message in (
        ("nope", "no parameter 'nope' \\(its scalars: .*log_lr"),
        ("log_l", "did you mean log_lr"),
        ("log_lr=x", "must be a number"),
    ):
        with pytest.raises(SystemExit, match=message):
            main(common + ["--outer-steps", "1", "--freeze", bad, "--out", str(tmp_path / "b")])
    assert not (tmp_path / "b").exists()  # nothing written for bad options
    assert net.rule == lopt.UpdateRule()
    args = common + ["--outer-steps", "1", "--width-factor-on-input-layers", "--out"]
    assert main(args + [str(out) + "2"]) == 0
    assert lopt.load(str(out) + "2/optimizer.pt")[0].rule.width_factor_on_input_layers is True
    args = common + ["--outer-steps", "1", "--no-learned-term-tangent", "--out", str(out) + "3"]
    assert main(args) == 0
    assert lopt.load(str(out) + "3/optimizer.pt")[0].rule.learned_term_tangent is False


def test_freeze_glob_holds_a_group_and_trains_the_rest(tmp_path):
    """--freeze 'nf.*=0' holds every NF-layer tensor at zero while the neuron
    statistics train (the statistics-alone recipe); a glob that matches
    nothing is refused before anything is written."""
    from meta_train.__main__ import main

    out = tmp_path / "run"
    args = f"{TINY_MAGNITUDE_NFN} --neuron-stats --no-progress --out {out} --freeze nf.*=0 log_lr"
    assert main(args.split()) == 0
    net, _ = lopt.load(out / "optimizer.pt")
    nf = dict(net.nf.named_parameters())
    assert len(nf) > 10 and all((w == 0).all() for w in nf.values())
    assert torch.equal(net.log_lr, lopt.NFNNet(width=4, nf_channels=2).log_lr)
    assert (net.stat_weight.abs() > 0.01).any()  # what is not frozen still trains
    assert main(["--resume", str(out), "--outer-steps", "3", "--no-progress"]) == 0
    assert all((w == 0).all() for w in lopt.load(out / "optimizer.pt")[0].nf.parameters())
    bad = tmp_path / "bad"
    with pytest.raises(SystemExit, match="'nope.\\*' matches no parameter"):
        main(f"{TINY_MAGNITUDE_NFN} --no-progress --out {bad} --freeze nope.*".split())
    assert not bad.exists()


@pytest.mark.parametrize("net_cls", [PerParamMLP, lopt.NFNNet])
def test_backprop_meta_gradient_is_finite_through_a_dead_relu_unit(net_cls):
    # A unit whose pre-activation is always negative gets gradient exactly 0,
    # so its entries' second moment stays 0: sqrt'(0) = inf used to make the
    # whole meta-gradient NaN (every such truncation was skipped).
    torch.manual_seed(0)
    net = net_cls(width=4, depth=1, out_scale=1.0, step_mult=1e-2)
    unroll = TaskUnroll(net, get_task("mlp-gmm"))
    inner = unroll.init_inner(2, torch.Generator().manual_seed(0))
    inner["params"]["1.weight"][:, 0] = 0.0
    inner["params"]["1.bias"][:, 0] = -1.0
    batches = unroll.sample_batches(3, torch.Generator().manual_seed(1))
    theta = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    thetas = theta.expand(2, -1).clone()

    grad = torch.func.grad(lambda t: unroll.unroll(t, inner, batches)[0].sum())(thetas)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # The forward value is untouched: sqrt(0) is still exactly 0.
    f = lopt.features
    momenta = torch.zeros(len(f.MOMENTUM_DECAYS), 3)
    zeros = torch.zeros(3)
    channels = f.entry_channels(torch.ones(3), zeros, momenta, zeros, torch.tensor(0.5))
    assert (channels[f.FEATURE_NAMES.index("rms")] == 0).all()
    # The case above really arose: the dead unit's second moment is still 0.
    second_moment = unroll.unroll(thetas, inner, batches)[2]["second_moment"]
    assert (second_moment[unroll.names.index("1.weight")][:, 0] == 0).all()


def test_ship_records_every_earlier_phase_of_a_multi_phase_recipe(tmp_path, capsys):
    from meta_train.__main__ import main
    from meta_train.ship import main as ship

    args = "--width 16 --family mlp-gmm --outer-steps 1 --truncation 2 --horizon 4 --population 1"
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    # a starts from a shipped net, b from a, c (an NFN) from b's per-entry trunk.
    assert main([*args.split(), "--net", "mlp", "--init-from", "mlp-real", "--out", str(a),
                 "--no-progress"]) == 0  # fmt: skip
    assert main([*args.split(), "--net", "mlp", "--init-from", str(a / "optimizer.pt"),
                 "--outer-steps", "2", "--out", str(b), "--no-progress"]) == 0  # fmt: skip
    assert main([*args.split(), "--net", "nfn", "--init-from", str(b / "optimizer.pt"),
                 "--out", str(c), "--no-progress"]) == 0  # fmt: skip
    dest = tmp_path / "pretrained"
    assert ship([str(c), "my-nfn", "--dest", str(dest)]) == 0
    card = capsys.readouterr().out
    phases = lopt.load(dest / "my-nfn.pt")[1]["phases"]
    # Its recipe, beside it: every phase a stage, each from the one before.
    stages = json.loads((dest / "my-nfn.json").read_text())["stages"]
    assert [st["name"] for st in stages[-3:]] == ["a", "b", "my-nfn"]
    assert stages[-1]["options"]["init_from"] == "stage:b"
    assert (
        stages[-2]["options"]["outer_steps"] == 2 and stages[0]["options"].get("init_from") is None
    )
    # The shipped net's file carries its own phases: they come first, whole.
    shipped = lopt.load("mlp-real")[1]
    n = len(shipped["phases"])
    assert phases[:n] == shipped["phases"] and "shipped" not in str(phases)
    assert phases[n]["from"] == "mlp-real" and phases[n]["outer_steps"] == shipped["outer_steps"]
    later = [str(a / "optimizer.pt"), str(b / "optimizer.pt")]
    assert [p["from"] for p in phases[n + 1 :]] == later
    assert [p["outer_steps"] for p in phases[n + 1 :]] == [1, 2]
    assert f"Phases 1-{n + 3}" in card and f"Phase {n + 4}, this net's run" in card
    assert f"--out {b}" in card and f"--out {c}" in card
    # Shipping a shipped-style net again keeps its phases instead of walking files.
    assert ship([str(dest / "my-nfn.pt"), "again", "--dest", str(dest)]) == 0
    assert lopt.load(dest / "again.pt")[1]["phases"] == phases
    # Files of older versions point at a shipped net's card: shipping expands it.
    net, meta = lopt.load(b / "optimizer.pt")
    lopt.save(net, tmp_path / "old.pt", {**meta, "phases": [{"shipped": "mlp-real"}]})
    assert ship([str(tmp_path / "old.pt"), "old", "--dest", str(dest)]) == 0
    assert lopt.load(dest / "old.pt")[1]["phases"] == phases[: n + 1]
    # A phase whose net is gone: the recipe would be incomplete, so nothing ships.
    (a / "optimizer.pt").unlink()
    with pytest.raises(SystemExit, match="no such file, so the recipe's earlier phases"):
        ship([str(c), "broken", "--dest", str(dest)])
    assert not (dest / "broken.pt").exists()
    # ... unless a net of the same run, shipped before, gives them.
    assert (
        ship([str(c), "later", "--phases-from", str(dest / "my-nfn.pt"), "--dest", str(dest)]) == 0
    )
    assert lopt.load(dest / "later.pt")[1]["phases"] == phases
    with pytest.raises(SystemExit, match="its run started from"):
        ship([str(c), "wrong", "--phases-from", str(b / "optimizer.pt"), "--dest", str(dest)])
    assert not (dest / "wrong.pt").exists()


def _naive_meta_loss(kind, losses, initial, start, weight, offset=0.0, stay=False) -> list[float]:
    """MetaLoss's reference, one member and one step at a time: each loss
    capped at 3x the initial (NaN counts as the cap), its log for ``log``
    (plus ``offset`` times the initial), with ``stay`` the highest such value
    from that step to the last, times ``weight(t)`` at inner step t."""
    out = []
    for i in range(losses.shape[0]):
        plain = []
        for k in range(losses.shape[1]):
            x, cap = losses[i, k].item(), 3.0 * initial[i, 0].item()
            x = min(x, cap) if math.isfinite(x) else cap
            plain.append(math.log(x + offset * initial[i, 0].item()) if kind == "log" else x)
        vals = []
        for k, x in enumerate(plain):
            x = max(plain[k:]) if stay else x
            vals.append(x * weight(start[i].item() + k + 1))
        out.append(vals[-1] if kind == "final" else sum(vals) / len(vals))
    return out


def test_ramped_meta_loss_weighs_each_step_by_its_place_in_the_run():
    from meta_train import MetaLoss

    losses = torch.tensor([[2.0, 1.0, float("nan"), 0.5], [0.9, 0.8, 0.7, 0.6]])
    initial = torch.tensor([[2.0], [1.0]])
    start = torch.tensor([0.0, 10.0])
    for kind in ("mean", "log", "final"):
        got = MetaLoss(kind, cap=3.0, ramp=8)(losses, initial, start)
        want = _naive_meta_loss(kind, losses, initial, start, lambda t: min(1.0, t / 8))
        assert got.tolist() == pytest.approx(want, rel=1e-6)
        # a run past the ramp weighs every step alike: the unramped loss
        torch.testing.assert_close(got[1], MetaLoss(kind, cap=3.0)(losses, initial)[1])
    with pytest.raises(ValueError, match="ramp must be a whole number"):
        MetaLoss("log", ramp=-1)
    with pytest.raises(ValueError, match="needs the truncation's start step"):
        MetaLoss("log", ramp=8)(losses, initial)


def test_log_meta_loss_offset_adds_a_share_of_the_initial_loss():
    from meta_train import MetaLoss

    losses = torch.tensor([[2.0, 1e-6, float("nan"), 0.5], [0.9, 0.8, 1e-9, 0.6]])
    initial = torch.tensor([[2.0], [1.0]])
    start = torch.tensor([0.0, 10.0])
    got = MetaLoss("log", cap=3.0, ramp=8, offset=1e-3)(losses, initial, start)
    ramp = lambda t: min(1.0, t / 8)  # noqa: E731
    assert got.tolist() == pytest.approx(
        _naive_meta_loss("log", losses, initial, start, ramp, offset=1e-3), rel=1e-6
    )
    # the offset bounds what a loss near 0 is worth: 1e-9 counts about as 1e-6 does
    plain = MetaLoss("log")(torch.tensor([[1e-9], [1e-6]]), torch.ones(2, 1))
    offset = MetaLoss("log", offset=1e-3)(torch.tensor([[1e-9], [1e-6]]), torch.ones(2, 1))
    assert (plain[1] - plain[0]).item() > 6.0 and (offset[1] - offset[0]).item() < 1e-2
    torch.testing.assert_close(
        MetaLoss("log", offset=0.0)(losses, initial), MetaLoss("log")(losses, initial)
    )
    with pytest.raises(ValueError, match="offset must be in \\[0, 1\\), got -0.5"):
        MetaLoss("log", offset=-0.5)
    with pytest.raises(ValueError, match="offset must be in \\[0, 1\\), got 1.0"):
        MetaLoss("log", offset=1.0)
    with pytest.raises(ValueError, match="for the log meta-loss, not 'mean'"):
        MetaLoss("mean", offset=1e-3)


def test_meta_loss_end_weight_falls_linearly_over_the_run():
    from meta_train import MetaLoss

    losses = torch.tensor([[2.0, 1.0, float("nan"), 0.5], [0.9, 0.8, 0.7, 0.6]])
    initial = torch.tensor([[2.0], [1.0]])
    start = torch.tensor([0.0, 10.0])
    for kind in ("mean", "log", "final"):
        got = MetaLoss(kind, ramp_fraction=0.5, end_weight=0.25)(losses, initial, start, 12)
        weight = lambda t: min(1.0, t / 6) * (1 - 0.75 * min(1.0, t / 12))  # noqa: E731
        want = _naive_meta_loss(kind, losses, initial, start, weight)
        assert got.tolist() == pytest.approx(want, rel=1e-6)
    # 1 is the unweighted loss, and the weight never needs a ramp
    torch.testing.assert_close(
        MetaLoss("log", end_weight=1.0)(losses, initial), MetaLoss("log")(losses, initial)
    )
    alone = MetaLoss("mean", end_weight=0.5)(losses[:1, :1], initial[:1], start[:1], 4)
    assert alone.item() == pytest.approx(2.0 * (1 - 0.5 * 0.25))
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="end weight must be in \\(0, 1\\]"):
            MetaLoss("log", end_weight=bad)
    with pytest.raises(ValueError, match="needs the run's horizon"):
        MetaLoss("log", end_weight=0.5)(losses, initial, start)
    with pytest.raises(ValueError, match="needs the truncation's start step"):
        MetaLoss("log", end_weight=0.5)(losses, initial, horizon=12)


def test_meta_loss_that_stays_below_counts_each_step_as_the_worst_after_it():
    from meta_train import MetaLoss

    losses = torch.tensor([[2.0, 0.5, float("nan"), 0.4], [0.9, 0.3, 0.7, 0.6]])
    initial = torch.tensor([[2.0], [1.0]])
    start = torch.tensor([0.0, 10.0])
    ramp = lambda t: min(1.0, t / 8)  # noqa: E731
    for kind in ("mean", "log", "heldout"):
        got = MetaLoss(kind, ramp=8, stay=True)(losses, initial, start)
        want = _naive_meta_loss(kind, losses, initial, start, ramp, stay=True)
        assert got.tolist() == pytest.approx(want, rel=1e-6)
    # the dip to 0.3 is worth nothing: it counts as the 0.7 after it
    dip = MetaLoss("mean", stay=True)(losses[1:], initial[1:])
    assert dip.item() == pytest.approx((0.9 + 0.7 + 0.7 + 0.6) / 4)
    # a loss that only falls is its own running maximum
    falling = torch.tensor([[2.0, 1.0, 0.5, 0.25]])
    torch.testing.assert_close(
        MetaLoss("log", stay=True)(falling, initial[:1]), MetaLoss("log")(falling, initial[:1])
    )
    with pytest.raises(ValueError, match="loss over steps, not 'final'"):
        MetaLoss("final", stay=True)


def test_meta_loss_ramped_by_run_fraction_is_the_step_ramp_of_that_length():
    from meta_train import MetaLoss

    losses = torch.tensor([[2.0, 1.0, float("nan"), 0.5], [0.9, 0.8, 0.7, 0.6]])
    initial = torch.tensor([[2.0], [1.0]])
    start = torch.tensor([0.0, 10.0])
    for kind in ("mean", "log", "final"):
        for fraction, horizon, steps in ((0.5, 16, 8), (1.0, 12, 12), (0.25, 40, 10)):
            got = MetaLoss(kind, ramp_fraction=fraction)(losses, initial, start, horizon)
            want = MetaLoss(kind, ramp=steps)(losses, initial, start)
            torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="ramp fraction must be in \\[0, 1\\], got 1.5"):
        MetaLoss("log", ramp_fraction=1.5)
    with pytest.raises(ValueError, match="ramp fraction must be in \\[0, 1\\], got -0.1"):
        MetaLoss("log", ramp_fraction=-0.1)
    with pytest.raises(ValueError, match="in steps or as a run fraction, not both"):
        MetaLoss("log", ramp=8, ramp_fraction=0.5)
    with pytest.raises(ValueError, match="needs the run's horizon"):
        MetaLoss("log", ramp_fraction=0.5)(losses, initial, start)
    with pytest.raises(ValueError, match="needs the truncation's start step"):
        MetaLoss("log", ramp_fraction=0.5)(losses, initial, horizon=16)


def test_each_inner_run_ramps_its_meta_loss_by_its_own_horizon():
    """Runs of different drawn lengths get the ramp of their own length, and a
    resumed problem (``reset`` of the same counter) rebuilds the same one."""
    from meta_train import MetaLoss

    torch.manual_seed(0)
    net = lopt.NFNNet(width=4, depth=1)
    problem = LearnedOptimizerProblem(
        net,
        get_family("mlp-gmm"),
        truncation=3,
        horizon=6,
        horizon_max=60,
        meta_loss=MetaLoss("log", ramp_fraction=0.5),
    )
    theta = problem.initial_theta().expand(2, -1)
    horizons = set()
    for counter in range(6):
        inner = problem.reset(counter, 2)
        horizon = problem.horizon_of(counter)
        horizons.add(horizon)
        assert problem.unroller.horizon == horizon
        metas, losses, inner = problem.unroll(theta, inner, counter)
        w = torch.tensor([1.0, 2.0, 3.0]) / (0.5 * horizon)
        torch.testing.assert_close(metas, (losses.log() * w.clamp(max=1.0)).mean(-1))
    assert len(horizons) > 1


def test_unroll_ramps_the_meta_loss_by_the_inner_steps_taken():
    from meta_train import MetaLoss

    torch.manual_seed(0)
    net = lopt.NFNNet(width=4, depth=1)
    unroll = TaskUnroll(net, get_task("mlp-gmm"), MetaLoss("log", ramp=6))
    inner = unroll.init_inner(2, torch.Generator().manual_seed(0))
    theta = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    thetas = theta.expand(2, -1)
    g = torch.Generator().manual_seed(1)
    for start in (0, 3):  # two truncations of 3 steps: weights 1/6..3/6, then 4/6..1
        batches = unroll.sample_batches(3, g)
        loop_metas = unroll.unroll_loop(thetas, inner, batches)[0]
        metas, losses, inner = unroll.unroll(thetas, inner, batches)
        w = torch.tensor([start + 1.0, start + 2.0, start + 3.0]) / 6
        torch.testing.assert_close(metas, (losses.log() * w).mean(-1))
        torch.testing.assert_close(metas, loop_metas)
    assert torch.all(inner["step"] == 6)


CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.json"))


def test_configs_are_the_shipped_nets_recipes():
    """configs/ holds one recipe per shipped net, the one meta_train.ship
    writes from the net's phases (so the file and the card never disagree)."""
    from meta_train import options
    from meta_train.__main__ import DEFAULTS
    from meta_train.recipes import from_phases

    assert sorted(c.stem for c in CONFIGS) == lopt.pretrained_names()
    for config in CONFIGS:
        meta = lopt.load(config.stem)[1]
        upgrade = lambda c, n=config.stem: options.upgrade(c, n, saved_run=True)  # noqa: E731
        assert from_phases(config.stem, meta, DEFAULTS, upgrade) == json.loads(config.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_recipe_builds_and_matches_its_shipped_net(config, tmp_path):
    """Each file in configs/ is the recipe of the shipped net of its name:
    its stages parse, name only known options that differ from the
    defaults, start from the stage before (the first from scratch) and
    build their nets and task families; the stages' outer steps are those of
    the net's phases, and the last stage builds a net of the shipped one's
    class and config."""
    from meta_train import recipes
    from meta_train.__main__ import DEFAULTS, build, parser, resolve_config

    stages = recipes.check(json.loads(config.read_text()), config.name)
    shipped, meta = lopt.load(config.stem)
    steps = [p["outer_steps"] for p in meta["phases"]] + [meta["outer_steps"]]
    assert [st["options"]["outer_steps"] for st in stages] == steps
    for i, stage in enumerate(stages):
        opts = stage["options"]
        # Only what differs from the defaults, but the outer steps: always the phase's.
        differ = (v != DEFAULTS.get(k) for k, v in opts.items() if k != "outer_steps")
        assert all(differ), stage["name"]
        assert opts.get("init_from") == (None if i == 0 else f"stage:{stages[i - 1]['name']}")
        path = tmp_path / f"{stage['name']}.json"
        path.write_text(json.dumps(recipes.resolved(opts, tmp_path)))
        cfg = resolve_config(parser().parse_args(["--config", str(path), "--out", str(tmp_path)]))
        trainer, net = build(cfg, torch.device("cpu"), warm=False)
        assert trainer.problem.net is net
    assert type(net) is type(shipped) and net.config == shipped.config


def test_a_recipe_runs_its_stages_in_order_and_resumes(tmp_path, capsys):
    """A recipe of two stages: the second starts from the net the first
    wrote; --resume keeps a finished stage and carries the next one on; the
    shipped card lists the first stage as a phase; flags that would change a
    stage, and bad recipes, are refused with nothing written."""
    from meta_train.__main__ import main
    from meta_train.ship import main as ship

    tiny = {"net": "mlp", "width": 4, "family": "mlp-gmm", "truncation": 2, "horizon": 4,
            "population": 1, "checkpoint_every": 1}  # fmt: skip
    recipe = {"stages": [
        {"name": "first", "options": {**tiny, "outer_steps": 2}},
        {"name": "second", "options": {**tiny, "init_from": "stage:first", "outer_steps": 3,
                                       "meta_lr": 0.5}},
    ]}  # fmt: skip
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    out = tmp_path / "run"
    assert main(["--config", str(path), "--out", str(out), "--no-progress"]) == 0
    first, _ = lopt.load(out / "first" / "optimizer.pt")
    second, meta = lopt.load(out / "second" / "optimizer.pt")
    assert meta["config"]["init_from"] == str(out / "first" / "optimizer.pt")
    assert meta["outer_steps"] == 3 and not torch.equal(first.out.weight, second.out.weight)
    # Carry on: the first stage is kept, the second (asked for more) resumes.
    recipe["stages"][1]["options"]["outer_steps"] = 4
    (out / "recipe.json").write_text(json.dumps(recipe))
    before = (out / "first" / "optimizer.pt").read_bytes()
    capsys.readouterr()
    assert main(["--resume", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "stage 1/2 'first': finished (2 outer steps), kept" in err
    assert "stage 2/2 'second': carrying it on" in err
    assert (out / "first" / "optimizer.pt").read_bytes() == before
    assert lopt.load(out / "second" / "optimizer.pt")[1]["outer_steps"] == 4
    assert ship([str(out), "my-two", "--dest", str(tmp_path / "pre")]) == 0
    card = capsys.readouterr().out
    assert "Phases 1-1" in card and "Outer steps: 4" in card
    with pytest.raises(SystemExit, match="--meta-lr: a recipe's stages hold their options"):
        main(["--config", str(path), "--out", str(tmp_path / "x"), "--meta-lr", "0.1"])
    with pytest.raises(SystemExit, match="already holds files"):
        main(["--config", str(path), "--out", str(out)])
    for bad, message in [
        ({"stages": []}, "'stages' must be a non-empty list"),
        ({"stages": [{"name": "a", "options": {}}], "x": 1}, "one key, 'stages'"),
        ({"stages": [{"name": "a/b", "options": {}}]}, "must be a folder name"),
        ({"stages": [{"name": "a", "options": {"init_from": "stage:b"}}]},
         "starts from 'stage:b', which is not an earlier stage"),
        ({"stages": [{"name": "a", "options": {}}, {"name": "a", "options": {}}]},
         "two stages are named 'a'"),
        ({"stages": [{"name": "a", "options": {"out": "x"}}]}, "sets each stage's folder"),
    ]:  # fmt: skip
        path.write_text(json.dumps(bad))
        with pytest.raises(SystemExit, match=message):
            main(["--config", str(path), "--out", str(tmp_path / "bad")])
        assert not (tmp_path / "bad").exists()


def test_old_run_configs_resume_under_the_update_rule(tmp_path):
    """A run folder written before the update rule was one object holds its
    inverted switches and hand-set guards: it resumes with the rule they
    meant; a --config that turns a retired guard on is refused, naming it."""
    from meta_train.__main__ import main

    out = tmp_path / "run"
    assert main(f"{TINY_MAGNITUDE_NFN} --no-progress --out {out}".split()) == 0
    cfg = json.loads((out / "config.json").read_text())
    for key in ("learned_term_tangent", "width_factor_on_input_layers"):
        del cfg[key]
    cfg.update(radial_correction=False, input_width_factor=False, step_cap=0.0, warmup=0.0,
               decay_power=1.0, init_ortho_lr=None)  # fmt: skip
    (out / "config.json").write_text(json.dumps(cfg))
    assert main(["--resume", str(out), "--outer-steps", "3", "--no-progress"]) == 0
    assert lopt.load(out / "optimizer.pt")[0].rule == lopt.UpdateRule()
    saved = json.loads((out / "config.json").read_text())
    assert "radial_correction" not in saved and saved["learned_term_tangent"] is True
    bad_cfg = tmp_path / "bad.json"
    bad_cfg.write_text(json.dumps({"net": "mlp", "step_cap": 0.02}))
    with pytest.raises(SystemExit, match="--step-cap is set, and this version of lopt no longer"):
        main(["--config", str(bad_cfg), "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("net", ["nfn", "mlp"])
def test_a_fresh_net_is_drawn_from_the_runs_seed(net, tmp_path):
    """PyTorch seeds its global generator at random per process: the fresh net
    must come from --seed, or a rerun (or each torchrun rank) starts elsewhere."""
    from meta_train.__main__ import DEFAULTS, build

    def fresh(seed):
        cfg = {**DEFAULTS, "net": net, "width": 4, "family": "mixed-family-small"}
        cfg.update(seed=seed, out=str(tmp_path), eval_every=0)
        net_built = build(cfg, torch.device("cpu"))[1]
        return torch.nn.utils.parameters_to_vector(net_built.parameters()).detach()

    before = torch.random.get_rng_state()
    first, again, other = fresh(3), fresh(3), fresh(4)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's generator untouched


def test_a_portable_copy_resumes_from_its_outer_step(tmp_path):
    """The copy drops the inner run in progress (smaller), keeps the net, the
    meta-parameters and the step; --resume on it carries the run on; a
    destination holding files, or a folder that is not a run, is refused."""
    from meta_train.__main__ import main
    from meta_train.portable import main as portable_main

    out = tmp_path / "run"
    args = "--net mlp --width 4 --family mlp-gmm --truncation 2 --horizon 8 --population 1"
    run = [*args.split(), "--meta-lr", "0.1", "--out", str(out), "--no-progress"]
    assert main([*run, "--outer-steps", "3", "--checkpoint-every", "1"]) == 0
    copy = tmp_path / "copy"
    assert portable_main([str(out), str(copy)]) == 0
    full = torch.load(out / "checkpoint.pt", weights_only=False)
    light = torch.load(copy / "checkpoint.pt", weights_only=False)
    assert full["slots"][0]["inner"] is not None
    assert light["slots"] == [
        {"counter": None, "end": 0, "inner_t": 0, "inner": None, "est_state": {}}
    ]
    assert light["step"] == full["step"] == 3 and torch.equal(light["theta"], full["theta"])
    assert (copy / "checkpoint.pt").stat().st_size < (out / "checkpoint.pt").stat().st_size
    assert main(["--resume", str(copy), "--outer-steps", "5", "--no-progress"]) == 0
    assert torch.load(copy / "checkpoint.pt", weights_only=False)["step"] == 5
    assert [h["outer_steps"] for h in lopt.load(copy / "optimizer.pt")[1]["history"]] == [3, 5]
    with pytest.raises(SystemExit, match="holds files"):
        portable_main([str(out), str(copy)])
    with pytest.raises(SystemExit, match="no checkpoint.pt"):
        portable_main([str(tmp_path), str(tmp_path / "other")])
    assert not (tmp_path / "other").exists()


def test_role_rates_flag_meta_trains_the_roles_rates_and_resumes(tmp_path):
    """--role-rates builds an NFN with a log-rate per role that meta-training
    moves; a resumed run keeps them; a per-entry net is refused."""
    from meta_train.__main__ import main

    out = tmp_path / "run"
    assert main(f"{TINY_MAGNITUDE_NFN} --role-rates --no-progress --out {out}".split()) == 0
    net, meta = lopt.load(out / "optimizer.pt")
    assert meta["config"]["role_rates"] is True and net.config["role_rates"] is True
    assert any(v.item() != 0 for v in net.role_log_rate.values())  # trained
    assert main(["--resume", str(out), "--outer-steps", "3", "--no-progress"]) == 0
    assert hasattr(lopt.load(out / "optimizer.pt")[0], "role_log_rate")
    bad = tmp_path / "bad"
    with pytest.raises(SystemExit, match="--role-rates is for --net nfn"):
        main(["--net", "mlp", "--role-rates", "--family", "mlp-gmm", "--out", str(bad)])
    assert not bad.exists()


def test_embedding_roles_flag_meta_trains_the_embeddings_role_and_resumes(tmp_path):
    """--embedding-roles builds an NFN whose NF-layer knows token and position
    embeddings; on a language model meta-training moves their role's rate and
    weights; a resumed run keeps them; a per-entry net is refused."""
    from meta_train.__main__ import main

    out = tmp_path / "run"
    tiny_lm = TINY_MAGNITUDE_NFN.replace("mlp-gmm", "lm-docs-d32h2l2")
    argv = f"{tiny_lm} --role-rates --embedding-roles --no-progress --out {out}".split()
    assert main(argv) == 0
    net, meta = lopt.load(out / "optimizer.pt")
    assert meta["config"]["embedding_roles"] is True and net.config["embedding_roles"] is True
    assert net.role_log_rate["ih"].item() != 0  # trained on the model's embeddings
    assert main(["--resume", str(out), "--outer-steps", "3", "--no-progress"]) == 0
    assert "ih<-p" in lopt.load(out / "optimizer.pt")[0].nf.weights
    bad = tmp_path / "bad"
    with pytest.raises(SystemExit, match="--embedding-roles is for --net nfn"):
        main(["--net", "mlp", "--embedding-roles", "--family", "mlp-gmm", "--out", str(bad)])
    assert not bad.exists()


def test_depth_factor_flag_builds_the_net_with_it_and_resumes(tmp_path):
    """--depth-factor builds a net with a learned depth exponent, kept by a
    resumed run and in the saved net's config."""
    from meta_train.__main__ import main

    out = tmp_path / "run"
    assert main(f"{TINY_MAGNITUDE_NFN} --depth-factor --no-progress --out {out}".split()) == 0
    net, meta = lopt.load(out / "optimizer.pt")
    assert meta["config"]["depth_factor"] is True and net.config["depth_factor"] is True
    assert main(["--resume", str(out), "--outer-steps", "3", "--no-progress"]) == 0
    assert lopt.load(out / "optimizer.pt")[0].reads_depth


@pytest.mark.parametrize(
    "flags,saved,words,absent",
    [
        ("--per-task", {"per_task": True},
         "meta-gradient divided by the RMS of its pairs' loss differences", "loss differences"),
        ("--meta-lr-decay-steps 3 --meta-lr-final 0.25",
         {"meta_lr_decay_steps": 3, "meta_lr_final": 0.25},
         "meta lr 0.05 cosine-decayed to 0.25x of it over outer steps 0-3", "cosine-decayed"),
        ("--tasks-per-step 2", {"tasks_per_step": 2}, "2 tasks per outer step",
         "tasks per outer step"),
        ("--gain log_lr=10", {"gain": ["log_lr=10"]},
         "(perturbed and stepped at gains `log_lr` x10)", "perturbed and stepped"),
    ],
)  # fmt: skip
def test_meta_objective_flags_are_saved_resume_and_go_on_the_card(
    tmp_path, flags, saved, words, absent
):
    from meta_train.__main__ import main
    from meta_train.ship import model_card

    out = tmp_path / "run"
    assert main(f"{TINY_MAGNITUDE_NFN} {flags} --no-progress --out {out}".split()) == 0
    net, meta = lopt.load(out / "optimizer.pt")
    assert {k: meta["config"][k] for k in saved} == saved
    assert main(["--resume", str(out), "--outer-steps", "3", "--no-progress"]) == 0
    net, meta = lopt.load(out / "optimizer.pt")
    assert {k: meta["config"][k] for k in saved} == saved and meta["outer_steps"] == 3
    assert words in model_card("x", meta, net, 1)
    assert meta["tasks_drawn"] == {"mlp-gmm": meta["tasks_drawn"]["mlp-gmm"]}
    drawn = meta["tasks_drawn"]["mlp-gmm"]
    assert f"{drawn} tasks drawn (mlp-gmm {drawn})" in model_card("x", meta, net, 1)
    plain = tmp_path / "plain"
    assert main(f"{TINY_MAGNITUDE_NFN} --no-progress --out {plain}".split()) == 0
    net, meta = lopt.load(plain / "optimizer.pt")
    assert absent not in model_card("x", meta, net, 1)
