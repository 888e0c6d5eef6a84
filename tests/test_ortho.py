"""The orthogonalised-momentum base direction (lopt.ortho) and the nets' switch."""

import pytest
import torch
from helpers import architectures, make_cnn, make_mlp
from hypothesis import given, settings
from hypothesis import strategies as st

import lopt
from lopt import WeightSpaceSpec, functional, ortho
from lopt.nets import NFNNet, PerParamMLP


@pytest.mark.parametrize("shape", [(5, 5), (3, 9), (12, 4), (1, 6)])
def test_newton_schulz_keeps_singular_vectors_and_pulls_values_toward_one(shape):
    # SVD reference: the output is U f(S) V^T with f(s) in about [0.6, 1.25]
    # for every nonzero singular value, whatever the input's scale.
    g = torch.Generator().manual_seed(0)
    m = torch.randn(*shape, generator=g, dtype=torch.float64) * 37.0
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    out = ortho.newton_schulz(m)
    core = u.T @ out @ vh.T  # diagonal if the singular vectors are kept
    torch.testing.assert_close(core, torch.diag(torch.diagonal(core)), atol=1e-6, rtol=0)
    values = torch.diagonal(core)
    assert values.min() > 0.6 and values.max() < 1.25, values
    assert torch.equal(ortho.newton_schulz(torch.zeros(*shape)), torch.zeros(*shape))


def test_newton_schulz_is_permutation_equivariant():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(6, 8, generator=g)
    rows, cols = torch.randperm(6, generator=g), torch.randperm(8, generator=g)
    torch.testing.assert_close(
        ortho.newton_schulz(m[rows][:, cols]), ortho.newton_schulz(m)[rows][:, cols]
    )


def test_applies_only_between_hidden_groups():
    mlp = WeightSpaceSpec.from_module(make_mlp([6, 8, 7, 5, 3]))
    assert [t.name for t in mlp.tensors if ortho.applies(mlp, t)] == ["2.weight", "4.weight"]
    cnn = WeightSpaceSpec.from_module(make_cnn([2, 4, 3, 5], [3, 3, 1], 2, "flatten", 3, True, 4))
    assert [t.name for t in cnn.tensors if ortho.applies(cnn, t)] == ["2.weight", "4.weight"]
    one_layer = WeightSpaceSpec.from_module(make_mlp([6, 3]))
    assert not any(ortho.applies(one_layer, t) for t in one_layer.tensors)


@settings(max_examples=15, deadline=None)
@given(arch=architectures(), seed=st.integers(0, 1000))
def test_other_tensors_keep_the_adam_base_exactly(arch, seed):
    # Nets equal but for the switch: every tensor the term does not apply to
    # gets the same update; the others get no Adam term but the orthogonal one.
    model, _ = arch
    spec = WeightSpaceSpec.from_module(model)
    torch.manual_seed(seed)
    net = NFNNet(out_scale=1.0, step_mult=1e-2, lr=1e-2)
    on = NFNNet(**dict(net.config, ortho_lr=0.05))
    on.load_state_dict(net.state_dict(), strict=False)
    params = [p.detach() for p in model.parameters()]
    grads = [torch.randn_like(p) for p in params]
    state = functional.init(params)
    with torch.no_grad():
        off_u, after = functional.update(net, spec, None, grads, state, params)
        on_u, _ = functional.update(on, spec, None, grads, state, params)
        lr = net.log_lr.exp()
        for t, a, b, m, v, g in zip(
            spec.tensors, off_u, on_u, after["momenta"], after["second_moment"], grads
        ):
            if not ortho.applies(spec, t):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
                continue
            factor = torch.exp(net.fan_in_exp * lopt.nets.width_log_ratio(t))
            adam = m[1] / ((v / 0.001).sqrt() + 1e-8) / 0.1  # bias corrections at step 1
            learned = a + lr * factor * adam
            torch.testing.assert_close(
                b, learned - 0.05 * ortho.direction(g, m[1]), rtol=1e-4, atol=1e-6
            )


@pytest.mark.parametrize("cls", [NFNNet, PerParamMLP])
def test_switch_survives_a_checkpoint_and_learns_its_rate(cls, tmp_path):
    net = cls(ortho_lr=0.03)
    assert net.ortho and not cls().ortho
    assert "log_ortho_lr" in dict(net.named_parameters())
    with torch.no_grad():
        net.log_ortho_lr.fill_(-2.5)
    lopt.save(net, tmp_path / "n.pt")
    loaded, _ = lopt.load(tmp_path / "n.pt")
    assert loaded.config["ortho_lr"] == 0.03 and loaded.log_ortho_lr.item() == -2.5
    old, _ = lopt.load("nfn-broad")  # shipped before the switch: off
    assert not old.ortho and "log_ortho_lr" not in dict(old.named_parameters())


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan")])
def test_bad_rate_is_refused(bad):
    with pytest.raises(ValueError, match="ortho_lr must be positive"):
        NFNNet(ortho_lr=bad)


def test_trains_a_deep_mlp():
    torch.manual_seed(3)
    model = make_mlp([6, 16, 16, 3])
    x = torch.randn(64, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    opt = lopt.NFNOptimizer(model.parameters(), net=NFNNet(lr=1e-2, ortho_lr=0.05), model=model)
    losses = []
    for _ in range(50):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
