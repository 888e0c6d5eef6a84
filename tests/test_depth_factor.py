"""depth_factor: the update of a network with a residual stream times
exp(residual_log_rate) * stream_writers(spec) ** -depth_exp, on every path
(torch, fused, multi-tensor), warm-started as a no-op."""

import copy
import math

import pytest
import torch
from helpers import first_step
from torch import nn

import lopt
from lopt import NFNNet, PerParamMLP, WeightSpaceSpec, fused
from lopt.nets import stream_writers
from tasks.models import ResNet, TransformerLM


class ResidualMLP(nn.Module):
    """A stem, ``blocks`` residual MLP blocks on one stream, a head."""

    def __init__(self, width: int, blocks: int) -> None:
        super().__init__()
        self.stem = nn.Linear(5, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))
            for _ in range(blocks)
        )
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


@pytest.mark.parametrize("blocks", [1, 2, 3, 4])
def test_stream_writers_count_the_writers_of_a_residual_stream(blocks):
    torch.manual_seed(0)
    assert stream_writers(WeightSpaceSpec.from_module(ResidualMLP(6, blocks))) == blocks + 1
    # Token and position embeddings, and each layer's two output projections.
    lm = TransformerLM(11, 6, 8, 2, blocks)
    assert stream_writers(WeightSpaceSpec.from_module(lm)) == 2 * blocks + 2
    resnet = ResNet((1, 8, 8), 4, blocks, 3)
    assert stream_writers(WeightSpaceSpec.from_module(resnet)) == blocks + 1
    plain = nn.Sequential(*[m for _ in range(blocks) for m in (nn.Linear(6, 6), nn.ReLU())])
    assert stream_writers(WeightSpaceSpec.from_module(plain)) == 1


def make_net(cls, depth_exp: float | None, residual_log_rate: float = 0.0):
    """One net per class (its weights drawn once: the first NFN built also
    builds cached templates from the global generator), with or without
    the factor, ``depth_exp`` set."""
    if cls not in _NETS:
        torch.manual_seed(3)
        kwargs = dict(out_scale=1.0, step_mult=1e-2, lr=1e-3, budget=True)
        if cls is NFNNet:
            kwargs["nf_channels"] = 2
        _NETS[cls] = (cls(**kwargs), cls(**kwargs, depth_factor=True))
    without, with_it = _NETS[cls]
    if depth_exp is None:
        return copy.deepcopy(without)
    net = copy.deepcopy(with_it)
    extra = {"depth_exp": depth_exp, "residual_log_rate": residual_log_rate}
    net.load_state_dict({**without.state_dict(), **{k: torch.tensor(v) for k, v in extra.items()}})
    return net


_NETS: dict = {}


def updates(net, model, path):
    return first_step(net, model, path)[2]


PATHS = ["torch", "multi"] + (["fused"] if fused.available() else [])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cls", [NFNNet, PerParamMLP])
def test_the_depth_factor_scales_every_update_by_the_stream_s_writers(cls, path):
    torch.manual_seed(5)
    lm = TransformerLM(11, 6, 8, 2, 2)  # 6 writers
    base = updates(make_net(cls, 0.0), lm, path)
    got = updates(make_net(cls, 0.7, -0.4), lm, path)
    factor = math.exp(-0.4) * 6.0**-0.7
    for a, b in zip(got, base):
        torch.testing.assert_close(a, b * factor, rtol=1e-5, atol=1e-9)
    assert any(b.abs().sum() > 0 for b in base)
    # Without residual connections there is one writer: nothing changes.
    torch.manual_seed(5)
    plain = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    for a, b in zip(
        updates(make_net(cls, 0.7, -0.4), plain, path), updates(make_net(cls, 0.0), plain, path)
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("cls", [NFNNet, PerParamMLP])
def test_a_net_warm_started_with_the_factor_steps_as_before(cls):
    without = make_net(cls, None)
    with_it = make_net(cls, 0.0)
    fresh = make_net(cls, 0.0)
    missing, unexpected = fresh.load_state_dict(without.state_dict(), strict=False)
    assert sorted(missing) == ["depth_exp", "residual_log_rate"] and not unexpected
    torch.manual_seed(2)
    lm = TransformerLM(11, 6, 8, 2, 3)
    for a, b in zip(updates(with_it, lm, "torch"), updates(without, lm, "torch")):
        assert torch.equal(a, b)
    assert not without.reads_depth and with_it.reads_depth
    assert "depth_factor" not in without.config


def test_the_depth_exponent_survives_a_checkpoint(tmp_path):
    net = make_net(NFNNet, 0.35, 0.2)
    lopt.save(net, tmp_path / "net.pt")
    back, _ = lopt.load(tmp_path / "net.pt")
    assert back.config["depth_factor"] is True
    assert back.depth_exp.item() == pytest.approx(0.35)
    assert back.residual_log_rate.item() == pytest.approx(0.2)


def test_the_model_card_states_the_learned_depth_factor():
    from meta_train.ship import model_card

    card = model_card("x", {"outer_steps": 3}, make_net(NFNNet, 0.5, 0.2), 1000)
    line = next(x for x in card.splitlines() if "residual stream" in x)
    # exp(0.2) * n ** -0.5 at 2, 4, 6 and 8 writers.
    assert "2: 0.864, 4: 0.611, 6: 0.499, 8: 0.432" in line
    plain = model_card("x", {"outer_steps": 3}, make_net(NFNNet, None), 1000)
    assert "residual stream" not in plain
