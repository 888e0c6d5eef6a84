"""The multi-tensor fused step (lopt.fused_plan) against the torch path."""

import copy

import pytest
import torch
from helpers import (
    KINDS,
    STEP_LOSS,
    architectures,
    assert_same_step_from_the_same_point,
    make_cnn,
    make_mlp,
    optimizer_twins,
    random_state,
    real_models,
    strong,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import lopt
from lopt import WeightSpaceSpec, functional, fused, fused_plan
from tasks.models import ResNet

pytestmark = pytest.mark.skipif(
    not fused.available(), reason=f"no fused kernel: {fused.unavailable_reason()}"
)


def step_both(net, spec, params, grads, state, total_steps=None):
    """The torch path's update and state, and the multi-tensor step's (which
    must be the path taken)."""
    mine = copy.deepcopy(state)
    with torch.no_grad():
        assert fused_plan.plan_for(net, spec, params, grads, mine) is not None
        ref = functional.update(net, spec, None, grads, state, params, total_steps=total_steps,
                                loss=STEP_LOSS)  # fmt: skip
        out = functional.update(net, spec, None, grads, mine, params, guard=False, inplace=True,
                                fused=True, total_steps=total_steps, loss=STEP_LOSS)  # fmt: skip
    return ref, out, mine


def assert_same_step(ref, out, held):
    (ref_u, ref_state), (out_u, out_state) = ref, out
    for a, b in zip(out_u, ref_u):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(a.abs().sum() > 0 for a in out_u)
    for key in ("momenta", "second_moment"):
        for a, b, mine in zip(out_state[key], ref_state[key], held[key]):
            torch.testing.assert_close(a, b)
            assert a.data_ptr() == mine.data_ptr()  # in place
    assert torch.equal(out_state["step"], ref_state["step"])
    assert torch.equal(out_state["skipped"], ref_state["skipped"])
    assert torch.equal(out_state["loss_stats"], ref_state["loss_stats"])


def mlp_step_inputs(sizes, state_seed):
    """An MLP's weight space, its parameters, random gradients and a random
    state: what one multi-tensor step reads."""
    model = make_mlp(sizes)
    spec = WeightSpaceSpec.from_module(model)
    params = [p.detach().clone() for p in model.parameters()]
    grads = [torch.randn_like(p) for p in params]
    return spec, params, grads, random_state(params, state_seed)


def assert_skipped_without_a_write(updates, new, state, before):
    """A step that read a non-finite gradient: zero updates, the state's
    tensors (and what it returns) as they were, one more skip."""
    assert all(torch.equal(u, torch.zeros_like(u)) for u in updates)
    for k in ("momenta", "second_moment"):
        assert all(torch.equal(a, b) for a, b in zip(state[k], before[k]))
        assert all(torch.equal(a, b) for a, b in zip(new[k], before[k]))
    assert torch.equal(new["step"], before["step"])
    assert new["skipped"].item() == before["skipped"].item() + 1


def assert_same_step_on(module, net, threads, seed, total_steps):
    """One step of ``module``'s parameters (random gradients and state) on
    ``threads`` threads: the torch path and the multi-tensor step agree."""
    spec = WeightSpaceSpec.from_module(module)
    params = [p.detach().clone() for p in module.parameters()]
    grads = [torch.randn_like(p) for p in params]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        state = random_state(params, seed)
        ref, out, mine = step_both(net, spec, params, grads, state, total_steps)
    finally:
        torch.set_num_threads(old)
    assert_same_step(ref, out, mine)


@settings(max_examples=30, deadline=None)
@given(
    arch=architectures(),
    kind=st.sampled_from(KINDS),
    depth=st.integers(1, 2),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
    total=st.sampled_from([50, None]),
)
def test_the_multi_tensor_step_equals_the_torch_path(arch, kind, depth, threads, seed, total):
    module, _ = arch
    torch.manual_seed(seed)
    assert_same_step_on(module, strong(kind, depth), threads, seed, total)


@pytest.mark.parametrize("name", ["transformer", "resnet-bn", "wide-mlp"])
@pytest.mark.parametrize("kind", ["nfn-real-like", "mlp-budget"])
@pytest.mark.parametrize("threads, split", [(1, False), (2, False), (2, True)])
def test_the_multi_tensor_step_equals_the_torch_path_on_real_models(
    name, kind, threads, split, monkeypatch
):
    # Packed attention projections (pieces), 4-axis views, norms,
    # embeddings, convolutions; tensors shared out whole between threads,
    # and (split) every tensor of 16+ entries split between them.
    if split:
        monkeypatch.setattr(fused, "MIN_ENTRIES_PER_THREAD", 8)
    assert_same_step_on(real_models()[name], strong(kind), threads, 4, 300)


def test_parameters_laid_out_otherwise_are_read_through_contiguous_copies():
    """Transposed gradients (a transformer's packed projections too) and
    channels_last convolutions: the multi-tensor step reads
    contiguous copies of them, with the torch path's numbers, and leaves
    the parameters and gradients as they were."""
    torch.manual_seed(1)
    for model in (make_mlp([5, 7, 3]), make_cnn([3, 4, 5], [3, 3]),
                  real_models()["transformer"]):  # fmt: skip
        spec = WeightSpaceSpec.from_module(model)
        params = [p.detach().clone() for p in model.parameters()]
        grads = [torch.randn_like(p) for p in params]
        for j, p in enumerate(params):
            if p.dim() == 2:  # a transposed gradient (a packed one's too)
                grads[j] = torch.randn(p.shape[::-1]).t()
            if p.dim() == 4:  # channels_last: parameter and gradient
                params[j] = p.contiguous(memory_format=torch.channels_last)
                grads[j] = grads[j].contiguous(memory_format=torch.channels_last)
        assert not all(x.is_contiguous() for x in (*params, *grads))
        before = [x.clone() for x in (*params, *grads)]
        state = random_state(params, 3)
        net = strong("nfn-stats")
        ref, out, mine = step_both(net, spec, params, grads, state)
        assert_same_step(ref, out, mine)
        with torch.no_grad():
            plan = fused_plan.plan_for(net, spec, params, grads, mine)
        staged = {j for j, _, _ in plan.staged}
        assert staged == {j for j, (p, g) in enumerate(zip(params, grads))
                          if not (p.is_contiguous() and g.is_contiguous())}  # fmt: skip
        for x, x0 in zip((*params, *grads), before):
            assert torch.equal(x, x0) and x.stride() == x0.stride()


def test_the_optimizer_steps_a_channels_last_network_as_a_contiguous_one():
    torch.manual_seed(2)
    model = make_cnn([3, 4, 5], [3, 3])
    twin = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.randn(6, 3, 4, 4)
    opts = [lopt.NFNOptimizer(m.parameters(), weights="nfn-real", model=m, total_steps=10)
            for m in (model, twin)]  # fmt: skip
    for _ in range(3):
        for m, opt in zip((model, twin), opts):
            opt.zero_grad()
            m(x.contiguous(memory_format=torch.channels_last)).square().mean().backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
        if q.dim() == 4:
            assert q.is_contiguous(memory_format=torch.channels_last)


def test_a_tensor_the_kernel_cannot_read_takes_the_per_tensor_path():
    torch.manual_seed(1)
    net = strong("nfn-stats")
    spec, params, grads, state = mlp_step_inputs([5, 7, 3], 3)
    grads[0] = grads[0].double()  # not float32
    with torch.no_grad():
        assert fused_plan.plan_for(net, spec, params, grads, state) is None
        ref = functional.update(net, spec, None, grads, copy.deepcopy(state), params)
        out = functional.update(net, spec, None, grads, state, params, guard=False, inplace=True,
                                fused=True)  # fmt: skip
    for a, b in zip(out[0], ref[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_a_non_finite_update_counts_a_skipped_step():
    model = make_mlp([4, 6, 2])
    net = strong("nfn")
    spec = WeightSpaceSpec.from_module(model)
    params = [p.detach().clone() for p in model.parameters()]
    params[0][0, 0] = float("inf")  # a finite gradient, an update that is not
    grads = [torch.randn_like(p) for p in params]
    state = random_state(params, 5)
    with torch.no_grad():
        assert fused_plan.plan_for(net, spec, params, grads, state) is not None
        _, new = functional.update(net, spec, None, grads, state, params, guard=False,
                                   inplace=True, fused=True)  # fmt: skip
    assert new["skipped"].item() == 1.0 and new["step"].item() == 8.0


@pytest.mark.parametrize("threads, split", [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e20])
@pytest.mark.parametrize("where", ["first", "last"])
def test_a_non_finite_gradient_leaves_the_state_and_gives_zero_updates(
    threads, split, bad, where, monkeypatch
):
    # The state pass reads every gradient before it writes: an entry in the
    # first tensor or in the last one's scalar tail, on one thread or split;
    # 1e20 is finite but its square is not (nor the second moment it makes).
    if split:
        monkeypatch.setattr(fused, "MIN_ENTRIES_PER_THREAD", 8)
    torch.manual_seed(3)
    net = strong("nfn")
    spec, params, grads, state = mlp_step_inputs([9, 13, 5], 5)
    if where == "first":
        grads[0][3, 4] = bad
    else:
        grads[-1][-1] = bad
    before = copy.deepcopy(state)
    threads_were = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            assert fused_plan.plan_for(net, spec, params, grads, state) is not None
            updates, new = functional.update(net, spec, None, grads, state, params, guard=False,
                                             inplace=True, fused=True)  # fmt: skip
    finally:
        torch.set_num_threads(threads_were)
    assert_skipped_without_a_write(updates, new, state, before)


def test_the_torch_path_in_place_also_leaves_the_state_on_a_non_finite_gradient():
    torch.manual_seed(3)
    net = strong("nfn")
    spec, params, grads, state = mlp_step_inputs([4, 6, 2], 5)
    grads[1][0] = float("nan")
    before = copy.deepcopy(state)
    with torch.no_grad():
        updates, new = functional.update(net, spec, None, grads, state, params, guard=False,
                                         inplace=True, fused=False)  # fmt: skip
    assert_skipped_without_a_write(updates, new, state, before)


@pytest.mark.parametrize("cls", [lopt.NFNOptimizer, lopt.MLPOptimizer])
def test_the_optimizer_steps_a_transformer_as_the_torch_path_does(cls):
    # Step after step from the same parameters and state (a run of either
    # drifts apart from float rounding alone: training amplifies it), the
    # multi-tensor step with its plan cached over steps.
    model, a, twin, b, tokens = optimizer_twins(cls, fused=True)

    def loss(m):
        logits = m(tokens[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    for _ in range(6):
        assert_same_step_from_the_same_point(model, a, twin, b, loss)


def test_a_state_dict_round_trip_continues_the_run_to_the_last_bit():
    torch.manual_seed(2)
    model = ResNet((3, 8, 8), 8, 1, 5)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))

    def train(m, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()

    net = strong("nfn-real-like")
    opt = lopt.NFNOptimizer(model.parameters(), model=model, net=net, fused=True)
    train(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, 3)
    twin = ResNet((3, 8, 8), 8, 1, 5)
    twin.load_state_dict(saved_model)
    again = lopt.NFNOptimizer(twin.parameters(), model=twin, net=copy.deepcopy(net), fused=True)
    again.load_state_dict(saved_opt)
    train(twin, again, 3)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_the_kernels_reject_bad_tables_and_write_nothing():
    base = torch.ones(8)
    out = torch.zeros(2, 8)
    sums = torch.zeros(1, dtype=torch.float64)
    terms = torch.zeros(fused.MAX_TERMS + 1, len(fused.TERM_FIELDS), dtype=torch.int64)
    table = torch.tensor([[8, 0, 1, 1, 1, 8, 0, fused.MAX_TERMS + 1, 0, 0, 0, 0]])
    with torch.no_grad():
        total = fused.finish_many(table, terms, out, base, 10.0, 1.0, sums)
        assert total != total  # NaN: too many terms for one tensor
        assert torch.equal(base, torch.ones(8))
        with pytest.raises(ValueError, match="int64 of shape"):
            fused.finish_many(table[:, :5], terms, out, base, 10.0, 1.0, sums)
        with pytest.raises(ValueError, match="float64 of shape"):
            fused.state_update_many(
                torch.zeros(1, len(fused.ENTRY_FIELDS), dtype=torch.int64),
                [0.1],
                0.9,
                torch.zeros(1, 3),
            )
    assert torch.equal(base, torch.ones(8))


@pytest.mark.parametrize(
    "shapes",
    [[(5, 4), (5,), (), (3, 5)], [(7,), (1, 7), (1,)], [(3, 2, 3, 1), (2, 6)]],
    ids=["a-scalar", "size-1-axes", "a-4-axis-tensor"],
)
@pytest.mark.parametrize("kind", ["nfn-real-like", "nfn", "mlp"])
def test_views_of_any_rank_up_to_4_take_the_multi_tensor_step(shapes, kind):
    spec = WeightSpaceSpec.from_shapes(shapes)
    params = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    ref, out, mine = step_both(strong(kind), spec, params, grads, random_state(params, 1), 10)
    assert_same_step(ref, out, mine)


def test_a_view_of_5_axes_takes_the_per_tensor_path():
    shapes = [(2, 3, 4, 5, 2), (6, 2)]
    spec = WeightSpaceSpec.from_shapes(shapes)
    params = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    with torch.no_grad():
        assert fused_plan.plan_for(strong("nfn"), spec, params, grads,
                                   random_state(params, 1)) is None  # fmt: skip


def test_each_parameter_group_builds_its_plan_once(monkeypatch):
    torch.manual_seed(0)
    model = make_mlp([6, 8, 8, 8, 8, 8, 3])
    params = list(model.parameters())
    groups = [{"params": params[i::6]} for i in range(6)]
    opt = lopt.NFNOptimizer(groups, model=model, net=strong("nfn"), fused=True)
    for p in params:
        p.grad = torch.randn_like(p)
    builds = []
    build = fused_plan.build
    monkeypatch.setattr(fused_plan, "build", lambda *a, **k: builds.append(1) or build(*a, **k))
    for _ in range(3):
        opt.step()
    assert len(builds) == 6


def test_a_net_changed_in_place_between_steps_is_read_afresh():
    # The plan keeps what it reads of the net (output layers, factors) while
    # the net's parameters keep their versions; an in-place change shows.
    torch.manual_seed(3)
    model = make_mlp([5, 7, 3])
    twin = copy.deepcopy(model)
    net = strong("nfn-real-like")
    a = lopt.NFNOptimizer(model.parameters(), model=model, net=net, fused=True)
    b = lopt.NFNOptimizer(twin.parameters(), model=twin, net=copy.deepcopy(net), fused=False)
    x = torch.randn(8, 5)
    for change in (False, True):
        if change:
            for opt in (a, b):
                with torch.no_grad():
                    opt.net.log_step_mult.add_(0.5)
                    next(iter(opt.net.nf.weights.values())).mul_(2.0)
        assert_same_step_from_the_same_point(model, a, twin, b, lambda m: m(x).square().mean())
