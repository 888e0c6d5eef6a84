"""orthogonal=True: a hidden layer's weight matrix steps along its
orthogonalised 0.9-momentum in place of (a learned share of) Adam's
direction, on every path (torch, fused, multi-tensor), equivariantly; with
orthogonal_snr=True, times its gradient signal-to-noise ratio to a learned
power."""

import copy
import math

import pytest
import torch
from helpers import first_step, path_kwargs
from torch import nn

import lopt
from lopt import NFNNet, PerParamMLP, WeightSpace, WeightSpaceSpec, functional, fused
from lopt.features import ADAM_MOMENTUM, bias_corrections
from lopt.nets import ORTHO_SNR_GAIN, matrix_groups, orthogonal_tensors, orthogonalised
from tasks.models import TransformerLM


@pytest.mark.parametrize("shape", [(7, 7), (12, 5), (4, 30), (1, 6)])
def test_orthogonalised_keeps_the_singular_vectors_and_pulls_the_values_near_one(shape):
    torch.manual_seed(0)
    m = torch.randn(shape, dtype=torch.float64) * 3.0
    o = orthogonalised(m) / math.sqrt(max(shape))
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    # U^T o V is diagonal: a polynomial in m m^T times m has m's singular vectors.
    inner = u.T @ o @ vh.T
    diag = torch.diagonal(inner)
    torch.testing.assert_close(inner, torch.diag(diag), atol=1e-6, rtol=0)
    assert diag.min() > 0.6 and diag.max() < 1.3
    # Unit RMS per entry, whatever the shape and the scale of m.
    rms = (orthogonalised(m) ** 2).mean().sqrt()
    assert 0.6 < rms < 1.3
    torch.testing.assert_close(orthogonalised(1e-4 * m), orthogonalised(m))


def test_orthogonalised_commutes_with_row_and_column_permutations():
    torch.manual_seed(1)
    m = torch.randn(9, 6)
    rows, cols = torch.randperm(9), torch.randperm(6)
    torch.testing.assert_close(orthogonalised(m[rows][:, cols]), orthogonalised(m)[rows][:, cols])


class Embedded(nn.Module):
    """An embedding, a hidden layer and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.hidden = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.hidden(self.emb(x))))


def test_only_hidden_layers_weight_matrices_take_the_term():
    mlp = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4), nn.ReLU(), nn.Linear(4, 3))
    spec = WeightSpaceSpec.from_module(mlp)
    assert orthogonal_tensors(spec) == (True, False, True, False, False, False)
    cnn = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    spec = WeightSpaceSpec.from_module(cnn)
    assert orthogonal_tensors(spec) == (True, False, False, False)
    spec = WeightSpaceSpec.from_module(Embedded())
    assert [t.name for t, on in zip(spec.tensors, orthogonal_tensors(spec)) if on] == [
        "hidden.weight"
    ]
    lm = TransformerLM(11, 8, 8, 2, 1)
    spec = WeightSpaceSpec.from_module(lm)
    on = [t.label for t, o in zip(spec.tensors, orthogonal_tensors(spec)) if o]
    assert not any(n.startswith(("tok", "pos", "head")) for n in on)
    assert any("qkv" in n for n in on) and any("proj" in n for n in on)


def test_matrices_of_one_shape_are_orthogonalised_in_one_batch_as_each_alone():
    # Three 7x7 hidden matrices share a batch; 7x5 (taken transposed) and the
    # 4x7 go alone. Each term equals its own matrix's iteration times its rate.
    mlp = nn.Sequential(
        *[
            m
            for a, b in [(5, 7), (7, 7), (7, 7), (7, 7), (7, 4)]
            for m in (nn.Linear(a, b), nn.Tanh())
        ],
        nn.Linear(4, 3),
    )
    spec = WeightSpaceSpec.from_module(mlp)
    assert matrix_groups(spec) == {(7, 5): (0,), (7, 7): (2, 4, 6), (4, 7): (8,)}
    net = PerParamMLP(orthogonal=True)
    with torch.no_grad():
        net.log_lr.fill_(-2.0)
    gen = torch.Generator().manual_seed(0)
    momenta = [torch.randn(4, *t.shape, generator=gen) for t in spec.tensors]
    one = torch.ones(())
    terms = net.orthogonal_terms(spec, momenta, None, one, one)
    rates = -net.log_lr.exp() * net.ortho_weight * net.tensor_log_factors(spec).exp()
    for i, z in enumerate(terms):
        if i not in (0, 2, 4, 6, 8):
            assert z is None
            continue
        alone = orthogonalised(momenta[i][ADAM_MOMENTUM])
        torch.testing.assert_close(z, rates[i] * alone, rtol=1e-5, atol=1e-7)


_NETS: dict = {}


def make_net(cls, weight: float | None, keep: float = 0.0):
    """One net per class with the term (its weights drawn once), ``ortho_weight``
    and ``ortho_adam_keep`` set; ``weight=None``: the same net without the term."""
    if cls not in _NETS:
        torch.manual_seed(3)
        kwargs = dict(out_scale=1.0, step_mult=1e-2, lr=1e-3, budget=True)
        if cls is NFNNet:
            kwargs["nf_channels"] = 2
        with_it = cls(**kwargs, orthogonal=True)
        without = cls(**kwargs)
        without.load_state_dict(with_it.state_dict(), strict=False)
        _NETS[cls] = (without, with_it)
    without, with_it = _NETS[cls]
    if weight is None:
        return copy.deepcopy(without)
    net = copy.deepcopy(with_it)
    with torch.no_grad():
        net.ortho_weight.fill_(weight)
        net.ortho_adam_keep.fill_(keep)
    return net


PATHS = ["torch", "multi"] + (["fused"] if fused.available() else [])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cls", [NFNNet, PerParamMLP])
def test_the_term_replaces_a_share_of_adam_s_direction_by_the_orthogonalised_momentum(cls, path):
    torch.manual_seed(5)
    model = TransformerLM(11, 8, 8, 2, 2)
    w, keep = 0.7, 0.25
    net = make_net(cls, w, keep)
    spec, grads, got = first_step(net, model, path)
    plain = make_net(cls, None)
    _, _, base = first_step(plain, model, path)
    # The first step's momentum is 0.1 * g: the same orthogonalised; Adam's
    # direction is then g / (|g| + eps).
    _, _, steps_in, budget_in, _ = net.step_inputs(torch.ones(()), 40)
    schedule = net.schedule_scale(steps_in, budget_in)
    neg_lrs, _ = plain.tensor_factors(spec)
    expected = []
    for t, g, neg, on in zip(spec.tensors, spec.split(grads), neg_lrs, orthogonal_tensors(spec)):
        if not on:
            expected.append(torch.zeros(t.shape))
            continue
        ortho = orthogonalised(g.reshape(t.shape[0], -1)).reshape(t.shape)
        adam = g / (g.abs() + 1e-8)
        expected.append(schedule * neg * (w * ortho - (1 - keep) * adam))
    assert sum(orthogonal_tensors(spec)) >= 8
    for a, b, e in zip(got, base, spec.join(expected)):
        torch.testing.assert_close(a - b, e, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("path", PATHS[1:])
@pytest.mark.parametrize("arch", ["cnn", "lm"])
def test_every_path_gives_the_torch_path_s_update(path, arch):
    torch.manual_seed(6)
    if arch == "cnn":
        model = nn.Sequential(nn.Conv2d(2, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(80, 3))
    else:  # packed attention projections: the term per piece
        model = TransformerLM(11, 8, 8, 2, 2)
    net = make_net(NFNNet, 1.3, 0.4)
    _, _, ref = first_step(net, model, "torch")
    _, _, got = first_step(net, model, path)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("path", ["torch", "multi"])
def test_steps_commute_with_hidden_permutations(path):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))
    spec = WeightSpaceSpec.from_module(model)
    perms = {g: torch.randperm(n) for g, n in spec.hidden_groups().items()}

    def permuted(tensors):
        return WeightSpace.from_tensors(spec, list(tensors)).permute(perms).to_tensors()

    net = make_net(NFNNet, 2.0, 0.3)
    params = [p.detach().clone() for p in model.parameters()]
    twin = permuted(params)
    state, twin_state = functional.init(params), functional.init(twin)
    kw = {"total_steps": 30, "multi_tensor": path == "multi"}
    with torch.no_grad():
        for k in range(4):
            g = torch.Generator().manual_seed(10 + k)
            grads = [torch.randn(p.shape, generator=g) for p in params]
            ups, state = functional.update(net, spec, None, grads, state, params, **kw)
            tw, twin_state = functional.update(
                net, spec, None, permuted(grads), twin_state, twin, **kw
            )
            for a, b in zip(permuted(ups), tw):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
            params = functional.apply_updates(params, ups)
            twin = functional.apply_updates(twin, tw)
    # The term is there: without it the first step differs.
    _, _, with_it = first_step(net, model, path)
    _, _, without = first_step(make_net(NFNNet, None), model, path)
    assert (with_it[0] - without[0]).abs().max() > 1e-5


def test_the_weights_survive_a_checkpoint_and_older_nets_have_no_term(tmp_path):
    net = make_net(NFNNet, 0.45, 0.2)
    lopt.save(net, tmp_path / "net.pt")
    back, _ = lopt.load(tmp_path / "net.pt")
    assert back.config["orthogonal"] is True and back.has_orthogonal_term
    assert back.ortho_weight.item() == pytest.approx(0.45)
    assert back.ortho_adam_keep.item() == pytest.approx(0.2)
    plain = NFNNet(nf_channels=2, budget=True)
    assert not plain.has_orthogonal_term and "orthogonal" not in plain.config
    assert not hasattr(plain, "ortho_weight") and not hasattr(plain, "ortho_adam_keep")


def test_the_model_card_states_the_learned_weights():
    from meta_train.ship import model_card

    card = " ".join(model_card("x", {"outer_steps": 3}, make_net(NFNNet, 0.45, 0.2), 1000).split())
    assert "0.9-momentum (unit RMS) times its rate and a learned weight of 0.45" in card
    assert "along Adam's direction times a learned share of 0.2." in card
    plain = model_card("x", {"outer_steps": 3}, NFNNet(nf_channels=2, budget=True), 1000)
    assert "orthogonalised" not in plain


def snr_net(cls, weight: float, power: float):
    """A net with the term and its signal-to-noise power (the weights drawn
    the same each time), ``ortho_weight`` and the power (``ORTHO_SNR_GAIN *
    ortho_snr_exp``) set."""
    torch.manual_seed(3)
    kwargs = dict(out_scale=1.0, step_mult=1e-2, lr=1e-3, budget=True)
    if cls is NFNNet:
        kwargs["nf_channels"] = 2
    net = cls(**kwargs, orthogonal=True, orthogonal_snr=True)
    with torch.no_grad():
        net.ortho_weight.fill_(weight)
        net.ortho_snr_exp.fill_(power / ORTHO_SNR_GAIN)
    return net


def last_of_steps(net, model, path: str, steps: int = 4):
    """The updates of the last of ``steps`` steps from a fresh state, on
    seeded gradients that shrink from step to step (so their signal-to-noise
    ratio falls), and the state after it."""
    spec = WeightSpaceSpec.from_module(model)
    params = [p.detach().clone() for p in model.parameters()]
    state, kwargs = functional.init(params), path_kwargs(path)
    with torch.no_grad():
        for k in range(steps):
            g = torch.Generator().manual_seed(20 + k)
            grads = [torch.randn(p.shape, generator=g) * 0.5**k for p in params]
            ups, state = functional.update(net, spec, None, grads, state, params, **kwargs)
            ups = [u.clone() for u in ups]
    return spec, ups, state


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cls", [NFNNet, PerParamMLP])
def test_the_snr_power_scales_the_orthogonalised_step_by_the_naive_ratio(cls, path):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))
    power, steps = 0.6, 4
    spec, off, _ = last_of_steps(snr_net(cls, 0.0, power), model, path, steps)
    _, plain, _ = last_of_steps(snr_net(cls, 0.8, 0.0), model, path, steps)
    _, got, _ = last_of_steps(snr_net(cls, 0.8, power), model, path, steps)
    # The naive ratio from the plain path's state: mean(m**2) / mean(v),
    # both bias-corrected, as a log clamped to [-8, 2].
    _, _, state = last_of_steps(snr_net(cls, 0.0, power), model, "torch", steps)
    c1, c2 = bias_corrections(torch.tensor(float(steps)))
    ons = orthogonal_tensors(spec)
    assert sum(ons) == 2
    for on, m, v, a, b, z in zip(ons, state["momenta"], state["second_moment"], got, plain, off):
        if not on:
            torch.testing.assert_close(a, z, rtol=1e-4, atol=1e-8)
            continue
        ratio = (m[ADAM_MOMENTUM] / c1).square().mean() / (v / c2).mean()
        log_snr = float(ratio.log().clamp(-8.0, 2.0))
        assert log_snr < -0.5  # the shrinking gradients: the power is at work
        factor = math.exp(min(power * log_snr, 3.0))
        torch.testing.assert_close(a - z, factor * (b - z), rtol=1e-3, atol=1e-8)


def test_the_snr_power_survives_a_checkpoint_and_needs_the_term(tmp_path):
    net = snr_net(NFNNet, 0.45, 0.8)
    lopt.save(net, tmp_path / "net.pt")
    back, _ = lopt.load(tmp_path / "net.pt")
    assert back.reads_ortho_snr and back.config["orthogonal_snr"] is True
    assert ORTHO_SNR_GAIN * back.ortho_snr_exp.item() == pytest.approx(0.8)
    assert not make_net(NFNNet, 0.3).reads_ortho_snr  # nets of the term alone have none
    with pytest.raises(ValueError, match="orthogonal_snr=True needs orthogonal=True"):
        NFNNet(nf_channels=2, orthogonal_snr=True)
    from meta_train.ship import model_card

    card = " ".join(model_card("x", {"outer_steps": 3}, net, 1000).split())
    assert "signal-to-noise ratio (`log_signal_to_noise`) to the power 0.8." in card
