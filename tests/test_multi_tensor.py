"""The multi-tensor torch path (lopt.multi_tensor, what a GPU runs) against
the per-tensor path, and the step it makes: no value read back to the host,
a number of operators that does not grow with the number of tensors.

No GPU here: the device is simulated by the ``meta`` device (any read of a
value to the host, or a tensor made on the CPU and mixed in, raises)."""

import copy
import warnings
from collections import Counter

import pytest
import torch
from helpers import (
    KINDS,
    STEP_LOSS,
    architectures,
    assert_same_step_from_the_same_point,
    make_mlp,
    optimizer_twins,
    random_state,
    real_models,
    strong,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import lopt
from lopt import WeightSpaceSpec, functional, multi_tensor
from tasks.models import TransformerLM


def per_tensor_and_multi(net, module, seed, total_steps=50):
    """Both paths' updates on ``module``'s parameters, random gradients and state."""
    spec = WeightSpaceSpec.from_module(module)
    params = [p.detach().clone() for p in module.parameters()]
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    state = random_state(params, seed)
    args = (spec, spec.split(params), spec.split(grads), spec.split(state["momenta"], dim=1),
            spec.split(state["second_moment"]), state["step"] + 1)  # fmt: skip
    loss_in = torch.tensor([-0.3, 0.2, 0.5, 1.0])  # loss features (the nets reading them)
    with torch.no_grad():
        ref = net(*args, total_steps=total_steps, loss_in=loss_in)
        out = net(*args, total_steps=total_steps, multi_tensor=True, loss_in=loss_in)
    return ref, out


def assert_updates_close(out, ref):
    assert len(out) == len(ref)
    for a, b in zip(out, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(a.abs().sum() > 0 for a in out)


@settings(max_examples=30, deadline=None)
@given(
    arch=architectures(),
    kind=st.sampled_from(KINDS),
    depth=st.integers(1, 2),
    chunk=st.sampled_from([7, 64, 1 << 22]),
    seed=st.integers(0, 2**16),
)
def test_the_multi_tensor_forward_equals_the_per_tensor_one(arch, kind, depth, chunk, seed):
    module, _ = arch
    torch.manual_seed(seed)
    old = multi_tensor.CHUNK_ENTRIES
    multi_tensor.CHUNK_ENTRIES = chunk  # small: tensors cut across chunks
    try:
        ref, out = per_tensor_and_multi(strong(kind, depth), module, seed)
    finally:
        multi_tensor.CHUNK_ENTRIES = old
    assert_updates_close(out, ref)


@pytest.mark.parametrize("total", [300, None], ids=["told", "not-told"])
@pytest.mark.parametrize("name", ["transformer", "resnet-bn"])
@pytest.mark.parametrize("kind", KINDS)
def test_the_multi_tensor_forward_equals_the_per_tensor_one_on_real_models(name, kind, total):
    # Packed attention projections (pieces, nested axes), embeddings,
    # 4-axis convolutions, norms; told the budget or not.
    ref, out = per_tensor_and_multi(strong(kind), real_models()[name], 3, total_steps=total)
    assert_updates_close(out, ref)


def test_meta_gradients_through_the_multi_tensor_forward_equal_the_per_tensor_ones():
    # Meta-training vmaps the update over a population and differentiates it.
    torch.manual_seed(0)
    module = TransformerLM(13, 8, 16, 4, 1)
    spec = WeightSpaceSpec.from_module(module)
    params = [p.detach().clone() for p in module.parameters()]
    grads = [torch.randn_like(p) for p in params]
    state = random_state(params, 4)
    net = strong("nfn-real-like")
    theta = {k: v.detach() for k, v in net.named_parameters()}
    population = {k: torch.stack([v, v * 1.01]) for k, v in theta.items()}

    def meta_loss(th, multi):
        total = torch.tensor(50.0)
        updates, _ = functional.update(net, spec, th, grads, state, params, total_steps=total,
                                       multi_tensor=multi)  # fmt: skip
        return sum((u * u).sum() for u in updates)

    results = [
        torch.func.vmap(torch.func.grad_and_value(lambda th, m=multi: meta_loss(th, m)))(population)
        for multi in (False, True)
    ]
    (g_ref, v_ref), (g_out, v_out) = results
    torch.testing.assert_close(v_out, v_ref, rtol=1e-4, atol=0)
    for name in g_ref:
        torch.testing.assert_close(g_out[name], g_ref[name], rtol=1e-3, atol=1e-9)
    assert g_out["stat_weight"].abs().sum() > 0 and g_out["nf_proj.weight"].abs().sum() > 0


def test_what_a_transform_builds_and_keeps_is_plain():
    # Plans, layouts, width ratios and constants first made under grad and
    # vmap are kept; a tensor made from data under grad would be wrapped
    # for it, and a fused step outside would then fail on it.
    from lopt.features import constant

    torch.manual_seed(5)
    module = make_mlp([5, 11, 7, 3])  # a weight space no other test builds
    spec = WeightSpaceSpec.from_module(module)
    params = [p.detach().clone() for p in module.parameters()]
    grads = [torch.randn_like(p) for p in params]
    net = strong("nfn-real-like")
    theta = {k: v.detach()[None] for k, v in net.named_parameters()}
    values = (0.25, 12345.0)  # constants no other test makes
    state = random_state(params, 1)

    def loss(th):
        updates, _ = functional.update(net, spec, th, grads, state, params, total_steps=50,
                                       multi_tensor=True)  # fmt: skip
        return sum(u.sum() for u in updates) + constant(values, "cpu").sum()

    torch.func.vmap(torch.func.grad(loss))(theta)
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    plan = multi_tensor.plan_for(net, spec, torch.device("cpu"))
    kept = [v for v in vars(plan).values() if isinstance(v, torch.Tensor)]
    kept += [v for v in plan.layout if isinstance(v, torch.Tensor)] + [constant(values, "cpu")]
    assert len(kept) > 10 and not any(wrapped(t) for t in kept)
    opt = lopt.NFNOptimizer(module.parameters(), net=net, model=module, fused=True)
    for p, g in zip(module.parameters(), grads):
        p.grad = g
    opt.step()  # the fused step reads the same layouts


def device_step(net, spec, grads, state, params):
    """functional.update's in-place multi-tensor step (the one a GPU takes)."""
    with torch.no_grad():
        return functional.update(net, spec, None, grads, state, params, guard=False,
                                 inplace=True, multi_tensor=True, total_steps=40,
                                 loss=STEP_LOSS)  # fmt: skip


def step_setup(seed=0):
    torch.manual_seed(seed)
    module = TransformerLM(13, 8, 16, 4, 1)
    spec = WeightSpaceSpec.from_module(module)
    params = [p.detach().clone() for p in module.parameters()]
    grads = [torch.randn_like(p) for p in params]
    return spec, params, grads, random_state(params, seed)


@pytest.mark.parametrize("kind", ["nfn-real-like", "mlp-budget"])
def test_the_device_step_updates_the_state_in_place_as_the_per_tensor_path_does(kind):
    spec, params, grads, state = step_setup()
    net = strong(kind)
    mine = copy.deepcopy(state)
    with torch.no_grad():
        ref_u, ref = functional.update(net, spec, None, grads, state, params, total_steps=40,
                                       loss=STEP_LOSS)  # fmt: skip
    held = [m.data_ptr() for m in mine["momenta"]]
    out_u, out = device_step(net, spec, grads, mine, params)
    assert_updates_close(out_u, ref_u)
    for key in ("momenta", "second_moment"):
        for a, b in zip(out[key], ref[key]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # lerp rounds otherwise
    assert [m.data_ptr() for m in mine["momenta"]] == held  # in place
    assert out["step"].item() == 8.0 and out["skipped"].item() == 0.0
    assert torch.equal(out["loss_stats"], ref["loss_stats"])


def test_a_non_finite_gradient_leaves_the_device_step_s_state_as_it_was():
    spec, params, grads, state = step_setup(1)
    grads[2] = grads[2].clone()
    grads[2].view(-1)[3] = float("nan")
    before = copy.deepcopy(state)
    updates, new = device_step(strong("nfn-real-like"), spec, grads, state, params)
    assert all(torch.equal(u, torch.zeros_like(u)) for u in updates)
    for key in ("momenta", "second_moment"):
        for a, b in zip(state[key], before[key]):
            assert torch.equal(a, b)
    assert new["step"].item() == 7.0 and new["skipped"].item() == 1.0


def test_a_non_finite_update_zeroes_the_device_step_but_keeps_its_gradient():
    spec, params, grads, state = step_setup(2)
    net = strong("nfn")
    with torch.no_grad():
        net.out.bias.fill_(float("nan"))  # finite gradients, updates that are not
    before = copy.deepcopy(state)
    updates, new = device_step(net, spec, grads, state, params)
    assert all(torch.equal(u, torch.zeros_like(u)) for u in updates)
    assert not torch.equal(state["second_moment"][0], before["second_moment"][0])
    assert new["step"].item() == 8.0 and new["skipped"].item() == 1.0


@pytest.mark.parametrize("cls", [lopt.NFNOptimizer, lopt.MLPOptimizer])
def test_an_optimizer_step_on_a_device_reads_nothing_back_to_the_host(cls):
    # On the meta device every read of a value (.item(), bool(), float())
    # raises, as does a tensor made on the CPU mixed into the step.
    torch.manual_seed(0)
    model = TransformerLM(13, 8, 16, 4, 2).to("meta")
    opt = cls(model.parameters(), model=model, total_steps=100)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    for _ in range(opt.SKIPS_BEFORE_WARNING - 1):  # the skip count is read every 5th step
        opt.step()
    state = opt.state[next(model.parameters())]
    assert all(v.device.type == "meta" for v in state.values())


def test_every_index_of_a_plan_lies_on_its_device():
    net = strong("nfn-real-like").to("meta")
    spec = WeightSpaceSpec.from_module(real_models()["transformer"])
    plan = multi_tensor.plan_for(net, spec, torch.device("meta"))
    tensors = [v for v in vars(plan).values() if isinstance(v, torch.Tensor)]
    tensors += [v for v in plan.layout if isinstance(v, torch.Tensor)]
    tensors += [v for v in vars(plan.flat).values() if isinstance(v, torch.Tensor)]
    tensors += list(plan.flat.members)
    assert len(tensors) > 15 and all(t.device.type == "meta" for t in tensors)


class KernelCount(TorchDispatchMode):
    """Torch operators that would launch a kernel (views excluded)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def kernels_per_step(model, cls) -> int:
    opt = cls(model.parameters(), model=model, total_steps=100)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # the plan is built at the first step
    with KernelCount() as count:
        opt.step()
    # On the CPU a multi-tensor operator runs tensor by tensor: count it once.
    return sum(1 if name.startswith("aten._foreach") else n for name, n in count.counts.items())


@pytest.mark.parametrize("cls", [lopt.NFNOptimizer, lopt.MLPOptimizer])
def test_the_device_step_s_operators_do_not_grow_with_the_number_of_tensors(cls, monkeypatch):
    monkeypatch.setattr(functional, "multi_tensor_default", lambda params, fused: True)
    torch.manual_seed(0)
    shallow = kernels_per_step(make_mlp([6, 8, 8, 3]), cls)
    deep = kernels_per_step(make_mlp([6] + [8] * 30 + [3]), cls)
    assert shallow == deep


@pytest.mark.parametrize("cls", [lopt.NFNOptimizer, lopt.MLPOptimizer])
def test_the_optimizer_on_the_device_path_steps_as_on_the_cpu_path(cls, monkeypatch):
    # Step after step from the same parameters and state; a NaN gradient
    # in the middle is skipped by both.
    model, device, twin, cpu, tokens = optimizer_twins(cls, fused=False)
    real_default = functional.multi_tensor_default

    nan_steps = iter((False, False, True, True, False, False, False, False))  # the second step

    def loss(m):  # called once per optimizer per step: NaN for both or neither
        logits = m(tokens[:, :-1])
        out = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        return out * float("nan") if next(nan_steps) else out

    def chooser(params, fused):  # the device path for one of the two
        return params[0] is next(model.parameters()) or real_default(params, fused)

    monkeypatch.setattr(functional, "multi_tensor_default", chooser)
    for _ in range(4):
        assert_same_step_from_the_same_point(model, device, twin, cpu, loss)
    assert device.state[next(model.parameters())]["skipped"].item() == 1.0


def test_skipped_steps_on_the_device_path_warn(monkeypatch):
    monkeypatch.setattr(functional, "multi_tensor_default", lambda params, fused: True)
    model = make_mlp([4, 6, 2])
    opt = lopt.NFNOptimizer(model.parameters(), model=model)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(opt.SKIPS_BEFORE_WARNING):
            opt.step()
    assert [str(w.message) for w in caught if "were skipped" in str(w.message)]
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_the_multi_tensor_path_is_taken_off_the_cpu_unless_switched_off(monkeypatch):
    meta = [torch.empty(3, device="meta")]
    assert functional.multi_tensor_default(meta, fused=False)
    assert not functional.multi_tensor_default([torch.empty(3)], fused=False)
    monkeypatch.setenv("LOPT_MULTI_TENSOR", "0")
    assert not functional.multi_tensor_default(meta, fused=False)
