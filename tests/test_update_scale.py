"""benchmarks.update_scale: one factor on a learned optimizer's whole update,
and the depth-lm suite it runs by default."""

import csv
import math
import re

import pytest
import torch
from helpers import first_step
from torch import nn

import lopt
from benchmarks import update_scale
from lopt import cli
from tasks import SUITES, TASK_STEPS, get_family, get_suite, get_task
from tasks.models import TransformerLM
from tasks.runs import run


def shipped_net() -> lopt.NFNNet:
    net, _ = cli.load_weights("--weights", "nfn-real")
    return net


def scaled_step(net: lopt.NFNNet, factor: float) -> list[torch.Tensor]:
    # The update itself, not a difference of parameters, which would carry
    # the rounding of the parameters' own size.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    return first_step(update_scale.scaled(net, factor), model, "fused")[2]


@pytest.mark.parametrize("factor", [0.5, 2.5])
def test_the_factor_multiplies_the_whole_update(factor):
    net = shipped_net()
    base, scaled = scaled_step(net, 1.0), scaled_step(net, factor)
    for u, v in zip(base, scaled):
        assert u.abs().max() > 0
        torch.testing.assert_close(v, factor * u, rtol=1e-4, atol=1e-9)
    # The net it was given is left as it was.
    assert torch.equal(net.log_lr, shipped_net().log_lr)


def test_page_reports_the_runs_of_the_unscaled_net(tmp_path):
    out = tmp_path / "scale"
    page = update_scale.main(
        ["--suite", "validation-small", "--weights", "nfn-real", "--scales", "1", "0.5",
         "--seeds", "1", "--steps", "4", "--out", str(out)]
    )  # fmt: skip
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 * len(get_suite("validation-small"))
    assert "| x0.5 | x1 |" in page and (out / "results.md").read_text() == page
    net = shipped_net()
    for name in get_suite("validation-small"):
        ref = run(
            get_task(name),
            lambda model: lopt.NFNOptimizer(
                model.parameters(), net=net, model=model, total_steps=4
            ),
            4,
            0,
        ).final_train
        got = next(
            float(r["final_loss"]) for r in rows if r["task"] == name and r["scale"] == "1.0"
        )
        assert math.isclose(got, ref, rel_tol=1e-6), name


@pytest.mark.parametrize(
    "args, message",
    [
        (["--scales", "0.5", "-1"], "--scales must be positive and finite, got -1"),
        (["--scales", "1", "1"], "--scales: each factor once"),
        (["--seeds", "0"], "--seeds must be >= 1, got 0"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--suite", "no-such-suite"], "unknown suite 'no-such-suite'"),
        (["--on", "depth_exp"], "--on: nfn-real has no learned scalar 'depth_exp' (it has"),
        (["--on", "inp.weight"], "--on: nfn-real has no learned scalar 'inp.weight'"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tmp_path, args, message):
    out = tmp_path / "scale"
    with pytest.raises(SystemExit, match=re.escape(message)):
        update_scale.main(["--weights", "nfn-real", "--out", str(out), *args])
    assert not out.exists()


def test_on_multiplies_one_learned_scalar_and_the_page_names_it(tmp_path):
    net = shipped_net()
    twice = update_scale.scalar_scaled(net, "log_step_mult", 2.0)
    assert twice.log_step_mult.item() == pytest.approx(2 * net.log_step_mult.item())
    assert twice.log_lr.item() == net.log_lr.item()
    assert net.log_step_mult.item() == shipped_net().log_step_mult.item()  # left as it was
    out = tmp_path / "on"
    page = update_scale.main(
        ["--suite", "validation-small", "--weights", "nfn-real", "--on", "log_step_mult",
         "--scales", "1", "2", "--seeds", "1", "--steps", "3", "--out", str(out)]
    )  # fmt: skip
    assert f"the learned `log_step_mult` ({net.log_step_mult.item():.4g}) times each" in page
    rows = list(csv.DictReader(open(out / "results.csv")))
    name = get_suite("validation-small")[0]
    ref = run(
        get_task(name),
        lambda model: lopt.NFNOptimizer(model.parameters(), net=twice, model=model, total_steps=3),
        3,
        0,
    ).final_train
    got = next(float(r["final_loss"]) for r in rows if r["task"] == name and r["scale"] == "2.0")
    assert math.isclose(got, ref, rel_tol=1e-6)


def test_a_finished_run_is_not_overwritten(tmp_path):
    out = tmp_path / "scale"
    out.mkdir()
    (out / "results.csv").write_text("kept")
    with pytest.raises(SystemExit, match="holds a run already"):
        update_scale.main(["--weights", "nfn-real", "--out", str(out)])
    assert (out / "results.csv").read_text() == "kept"


def test_depth_lm_is_one_lm_at_one_to_four_layers():
    fam = next(f for f in get_family("real-family").families if f.name == "transformer-family")
    layers = []
    for name in SUITES["depth-lm"]:
        task = get_task(name)
        assert isinstance(task.model, TransformerLM), name
        assert task.model.tok.embedding_dim == 32 and task.model.blocks[0].attn.heads == 2
        assert task.dataset.name in fam.datasets and task.batch_size == 16
        assert TASK_STEPS[name] == 1000
        layers.append(len(task.model.blocks))
    assert layers == [1, 2, 3, 4]
    # Its 1- and 2-layer LMs lie inside the family, the deeper ones beyond it.
    assert fam.layers == (1, 2)
    assert not set(SUITES["depth-lm"]) & set(SUITES["real"])
