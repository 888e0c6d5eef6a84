"""The shipped optimizer nets: each loads by name, carries its model card
metadata, is small, and trains a task it never saw without blowing up."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lopt
from lopt.checkpoint import PRETRAINED_DIR
from tasks import get_task

SHIPPED = lopt.pretrained_names()
CLASSES = {"NFNNet": lopt.NFNOptimizer, "PerParamMLP": lopt.MLPOptimizer}


def test_the_default_nfn_and_its_mlp_baseline_are_all_that_ship():
    assert SHIPPED == ["mlp-real", "nfn-real"]
    assert set(lopt.checkpoint.RECOMMENDED.values()) == set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_net_loads_by_name_with_its_recipe(name):
    path = PRETRAINED_DIR / f"{name}.pt"
    assert path.stat().st_size < 5 * 2**20
    net, meta = lopt.load(name)
    cls = CLASSES[type(net).__name__]
    for key in ("command", "config", "outer_steps", "machine"):
        assert key in meta, key
    assert meta["command"].startswith("python -m meta_train")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = cls(model.parameters(), model=model, weights=name)
    assert torch.equal(opt.net.log_lr, net.log_lr)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_nets_carry_every_phase_of_their_recipe(name):
    # The same first twelve phases: a per-entry net from scratch on small
    # MLPs and CNNs, five more on the broad family (three of them on a GPU),
    # a per-entry or NFN stage on it, one on real-family, one that adds the
    # orthogonal step, one that scales it by the gradient's signal-to-noise
    # ratio, one that weighs the end of each inner run more and one that
    # also draws autoencoders; each written out in full. Both nets carry that
    # last recipe on with a new seed, then twice more with the anneal timed
    # by the loss (loss_anneal), each twin with its own seeds.
    net, meta = lopt.load(name)
    phases = meta["phases"]
    assert len(phases) == 14 and "shipped" not in str(phases)
    assert phases[0]["config"].get("init_from") is None
    for ph in phases:
        assert ph["command"].startswith("python -m meta_train") and ph["outer_steps"] > 0
    assert all(ph["config"]["family"].startswith("mixed-family") for ph in phases[:7])
    assert phases[7]["config"]["family"] == "real-family"
    assert not phases[7]["config"].get("orthogonal") and phases[8]["config"]["orthogonal"]
    assert not phases[8]["config"].get("orthogonal_snr") and phases[9]["config"]["orthogonal_snr"]
    assert net.config["orthogonal"] and meta["config"]["orthogonal_snr"]
    ramps = [c["config"]["meta_loss_ramp_fraction"] for c in (phases[9], *phases[10:], meta)]
    assert ramps[1] < ramps[0] and len(set(ramps[1:])) == 1
    assert "autoencoder-family" not in phases[10]["config"]["family"]
    runs = [*phases[11:], meta]
    assert all(r["config"]["family"] == meta["config"]["family"] for r in runs)
    assert "autoencoder-family" in meta["config"]["family"]
    assert len({r["config"]["seed"] for r in runs}) == len(runs)
    assert not any(ph["config"].get("loss_anneal") for ph in phases[:13])
    assert phases[13]["config"]["loss_anneal"]
    assert meta["config"]["loss_anneal"] and net.has_loss_anneal
    devices = [ph["device"] for ph in phases]
    assert devices == ["cpu"] * 3 + ["cuda"] * 3 + ["cpu"] * 8


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_net_trains_a_held_out_task(name):
    # A held-out task (wider than the meta-training family), a fixed init and
    # batches: the loss after 100 steps is finite and well below the start.
    task = get_task("mlp-digits-wide")
    net, _ = lopt.load(name)
    cls = CLASSES[type(net).__name__]
    model = task.module_with(task.init(torch.Generator().manual_seed(0)))
    opt = cls(model.parameters(), model=model, net=net)
    losses = []
    for step in range(100):
        x, y = task.sample_batch(torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0]


def test_quickstart_trains_with_the_shipped_nfn_and_plots(tmp_path):
    root = Path(__file__).resolve().parents[1]
    plot = tmp_path / "curves.png"
    run = subprocess.run(
        [sys.executable, str(root / "examples/quickstart.py"), "--steps", "30"]
        + ["--plot", str(plot)],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    default = lopt.checkpoint.RECOMMENDED["NFNNet"]
    assert f"{default}: final train loss" in run.stdout and plot.stat().st_size > 0


def test_cards_command_writes_a_page_per_shipped_net(tmp_path):
    from meta_train.cards import main

    assert main(["--out", str(tmp_path / "cards")]) == 0
    pages = sorted(p.stem for p in (tmp_path / "cards").glob("*.md") if p.stem != "README")
    assert pages == lopt.pretrained_names()
    default = lopt.checkpoint.RECOMMENDED["NFNNet"]
    card = (tmp_path / "cards" / f"{default}.md").read_text()
    assert "python -m meta_train --config configs/" in card and "Learned scalars" in card
    assert f"* Recipe: `python -m meta_train --config configs/{default}.json" in card
    meta = lopt.load(default)[1]
    runs = [*meta["phases"], meta]
    outer = sum(r["outer_steps"] for r in runs)
    assert f"* The whole recipe as run: {len(runs)} runs, {outer:,} outer steps" in card
    assert "min on cpu + " in card and "not timed" not in card
    index = (tmp_path / "cards" / "README.md").read_text()
    assert f"[`{default}`]({default}.md) (the default of `lopt.NFNOptimizer`)" in index
