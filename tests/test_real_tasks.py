"""The task families of real architectures, meta-training across step
budgets on them, and the real benchmark suite."""

import csv
import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lopt
from benchmarks import real
from meta_train.__main__ import main as meta_train_main
from meta_train.problems import LearnedOptimizerProblem
from meta_train.unroll import TaskUnroll
from tasks import SUITES, TASK_STEPS, data, get_family, get_suite, get_task
from tasks.models import ResNet, TransformerLM, autoencoder

NEW_FAMILIES = [
    "resnet-family",
    "transformer-family",
    "autoencoder-family",
    "real-family",
    "real-broad-family",
    "mlp-family-fit",
    "real-fit-family",
]


def test_text_data_is_next_character_windows():
    d = data.text("docs", context=16)
    assert d.x_train.shape[1] == 16 and d.x_train.dtype == torch.long
    assert d.n_classes == len(data.TEXT_VOCAB) == 96
    assert int(d.x_train.max()) < 96 and int(d.x_train.min()) >= 0
    # Targets are the inputs one character on, within and across windows' ends.
    torch.testing.assert_close(d.y_train[:, :-1], d.x_train[:, 1:])
    torch.testing.assert_close(d.y_train[:-1, -1], d.x_train[1:, 0])
    code = data.text("code", context=16)
    assert not torch.equal(code.x_train[:50], d.x_train[:50])
    with pytest.raises(ValueError, match="text source must be 'docs' or 'code'"):
        data.text("poems")


def test_wine_regression_reads_alcohol_from_the_other_measurements():
    from sklearn.datasets import load_wine

    d = data.wine_alcohol()
    assert d.n_classes == 0 and d.input_shape == (12,)
    assert d.x_train.shape == (142, 12) and d.y_train.shape == (142, 1)
    raw = torch.tensor(load_wine().data, dtype=torch.float32)
    y = torch.cat([d.y_train, d.y_test])[:, 0]
    x = torch.cat([d.x_train, d.x_test])
    alcohol = (raw[:, 0] - raw[:, 0].mean()) / raw[:, 0].std()
    # The same wines, reordered by the split: the targets are the
    # standardised alcohol contents, and no input column is that.
    assert torch.allclose(y.sort().values, alcohol.sort().values, atol=1e-5)
    for col in range(12):
        assert not torch.allclose(x[:, col].sort().values, alcohol.sort().values, atol=1e-3)
    assert torch.allclose(x.mean(0), torch.zeros(12), atol=1e-5)


def test_reconstruction_targets_are_the_flattened_inputs():
    d = data.reconstruction(data.digits())
    assert d.n_classes == 0 and d.output_size == 64
    torch.testing.assert_close(d.y_train, d.x_train.flatten(1))


def test_lm_loss_counts_every_position():
    task = get_task("lm-docs-d32h2l2")
    params = task.init(torch.Generator().manual_seed(0))
    x, y = task.sample_batch(torch.Generator().manual_seed(1))
    logits = torch.func.functional_call(task.model, params, (x,))
    want = F.cross_entropy(logits.reshape(-1, 96), y.reshape(-1))
    torch.testing.assert_close(task.loss(params, (x, y)), want)
    # Causal: a later token does not change an earlier position's logits.
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % 96
    logits2 = torch.func.functional_call(task.model, params, (x2,))
    torch.testing.assert_close(logits[:, :-1], logits2[:, :-1])
    assert not torch.allclose(logits[:, -1], logits2[:, -1])


def test_init_sets_norms_to_identity_and_embeddings_normal():
    task = get_task("lm-docs-d32h2l2")
    p = task.init(torch.Generator().manual_seed(0))
    assert torch.equal(p["blocks.0.ln1.weight"], torch.ones(32))
    assert torch.equal(p["blocks.0.ln1.bias"], torch.zeros(32))
    assert abs(p["tok.weight"].std().item() - 1.0) < 0.1
    bound = 1 / math.sqrt(32)
    assert p["blocks.0.attn.qkv.weight"].abs().max() <= bound
    res = get_task("resnet-digits-16x2").init(torch.Generator().manual_seed(0))
    assert torch.equal(res["blocks.0.norm1.weight"], torch.ones(16))
    # Deterministic in the generator.
    again = task.init(torch.Generator().manual_seed(0))
    assert all(torch.equal(p[k], again[k]) for k in p)


def test_models_refuse_bad_sizes_by_name():
    with pytest.raises(ValueError, match="d_model \\(30\\) must be a multiple of heads \\(4\\)"):
        TransformerLM(96, 8, 30, 4, 1)
    with pytest.raises(ValueError, match="in_shape must be"):
        ResNet((8,), 4, 1, 3)
    with pytest.raises(ValueError, match="bottleneck"):
        autoencoder(10, [])


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_families_sample_trainable_tasks(family):
    """Every sampled task's loss is finite and one Adam step lowers it on
    the same batch (the model, data and loss fit together)."""
    fam = get_family(family)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        task = fam.sample(g)
        params = task.init(torch.Generator().manual_seed(0))
        batch = task.sample_batch(torch.Generator().manual_seed(0))
        model = task.module_with(params)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        before = task.loss(dict(model.named_parameters()), batch)
        before.backward()
        opt.step()
        after = task.loss(dict(model.named_parameters()), batch)
        assert math.isfinite(before.item()) and after < before, task


def test_real_suites_have_budgets_and_stay_out_of_the_family():
    suites = ("real", "validation-real", "heldout", "validation-small", "validation-broad")
    for suite in (*suites, "validation-lm", "validation-outside"):
        for name in get_suite(suite):
            assert TASK_STEPS[name] >= 100
    # Both suites hold a run of 3,000 steps or more.
    for suite in ("real", "validation-real"):
        assert max(TASK_STEPS[n] for n in SUITES[suite]) >= 3000
    assert not set(SUITES["real"]) & set(SUITES["validation-real"])
    assert not set(SUITES["real"]) & set(SUITES["validation-lm"])
    assert not set(SUITES["real"]) & set(SUITES["validation-outside"])
    assert not set(SUITES["heldout"]) & set(SUITES["validation-small"])
    # A family of ResNets on 2-D digits of 1-2 blocks: the held-out ResNets
    # are 1-D or 3 blocks deep; the LMs read other text or are 3 layers deep.
    for family in ("real-family", "real-broad-family", "real-fit-family"):
        fam = get_family(family)
        g = torch.Generator().manual_seed(0)
        names = {fam.sample(g).name for _ in range(200)}
        assert not any(
            n.startswith("resnet-mnist1d") or "x3-" in n and "resnet" in n for n in names
        )
        assert not any(n.startswith("lm-text-code") or n.endswith("l3") for n in names)
        assert not any("mnist1d-recon" in n or "diabetes" in n or "wine" in n for n in names)


def test_validation_lms_lie_inside_real_family():
    fam = next(f for f in get_family("real-family").families if f.name == "transformer-family")
    for name in SUITES["validation-lm"]:
        task = get_task(name)
        model = task.model
        assert isinstance(model, TransformerLM), name
        width, layers = model.tok.embedding_dim, len(model.blocks)
        heads = model.blocks[0].attn.heads
        assert fam.width[0] <= width <= fam.width[1] and width % heads == 0, name
        assert heads in fam.heads and fam.layers[0] <= layers <= fam.layers[1], name
        assert task.dataset.name in fam.datasets, name
        assert fam.batch_size[0] <= task.batch_size <= fam.batch_size[1], name


def budget_net():
    torch.manual_seed(0)
    net = lopt.NFNNet(width=4, out_scale=1.0, step_mult=1e-2, budget=True, nf_channels=2)
    with torch.no_grad():
        net.budget_inp.weight.normal_()
    return net


@pytest.mark.parametrize("name", ["resnet-digits-16x2", "lm-docs-d32h2l2"])
def test_vmapped_unroll_equals_a_loop_on_real_architectures(name):
    net = budget_net()
    unroll = TaskUnroll(net, get_task(name))
    inner = unroll.init_inner(2, torch.Generator().manual_seed(0), total_steps=20)
    theta = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    thetas = theta + 0.05 * torch.randn(2, theta.numel())
    batches = unroll.sample_batches(2, torch.Generator().manual_seed(1))
    a = unroll.unroll(thetas, inner, batches)
    b = unroll.unroll_loop(thetas, inner, batches)
    torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-5)
    assert torch.equal(a[2]["total_steps"], torch.full((2,), 20.0))


def test_inner_runs_are_told_their_horizon_or_nothing():
    """budget_of is the run's horizon, or None in about budget_hidden of the
    runs, the same on every call; the inner state carries it (-1: hidden),
    and the net's updates depend on it."""
    net = budget_net()
    problem = LearnedOptimizerProblem(
        net, get_family("mlp-gmm"), truncation=2, horizon=4, horizon_max=40, budget_hidden=0.3
    )
    told = [problem.budget_of(c) for c in range(400)]
    assert told == [problem.budget_of(c) for c in range(400)]
    hidden = sum(b is None for b in told) / len(told)
    assert 0.2 < hidden < 0.4
    assert all(b == problem.horizon_of(c) for c, b in enumerate(told) if b is not None)
    c_hidden = told.index(None)
    inner = problem.reset(c_hidden, 2)
    assert torch.equal(inner["total_steps"], torch.full((2,), -1.0))
    theta = problem.initial_theta().expand(2, -1)
    hidden_losses = problem.unroll(theta, inner, 0)[1]
    inner["total_steps"] = torch.full((2,), 2.0)
    told_losses = problem.unroll(theta, inner, 0)[1]
    assert not torch.allclose(hidden_losses, told_losses)
    with pytest.raises(ValueError, match="budget_hidden must be in \\[0, 1\\]"):
        LearnedOptimizerProblem(net, get_family("mlp-gmm"), budget_hidden=1.5)


def test_cli_budget_flags(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "--family",
        "mlp-gmm",
        "--net",
        "mlp",
        "--width",
        "4",
        "--population",
        "2",
        "--truncation",
        "2",
        "--horizon",
        "4",
        "--outer-steps",
        "2",
        "--no-progress",
    ]
    with pytest.raises(SystemExit, match="--budget-hidden hides the budget"):
        meta_train_main([*args, "--out", str(out), "--budget-hidden", "0.5"])
    with pytest.raises(SystemExit, match="--budget-hidden must be a number in \\[0, 1\\]"):
        meta_train_main([*args, "--out", str(out), "--budget", "--budget-hidden", "2"])
    assert not out.exists()
    assert meta_train_main([*args, "--out", str(out), "--budget", "--budget-hidden", "0.5"]) == 0
    net, meta = lopt.load(out / "optimizer.pt")
    assert net.reads_budget and meta["config"]["budget_hidden"] == 0.5
    assert net.budget_inp.weight.abs().sum() > 0  # meta-trained away from zero
    # The learned term's schedule, warm-started from that net: the rest is
    # copied, the schedule starts at zero and is meta-trained.
    term = tmp_path / "term"
    init = ["--init-from", str(out / "optimizer.pt")]
    argv = [*args, "--out", str(term), "--budget", "--term-schedule", *init]
    assert meta_train_main(argv) == 0
    assert "copied" in capsys.readouterr().err
    warm, meta = lopt.load(term / "optimizer.pt")
    assert warm.has_term_schedule and meta["config"]["term_schedule"] is True
    assert warm.term_schedule.weight.abs().sum() > 0 and warm.term_snr_exp != 0


def test_real_summary_against_hand_made_curves():
    """Tuned Adam is the better schedule; ratios, beats, steps to Adam's
    final loss and divergence come out as computed by hand."""
    rows = []
    curves = {
        "adam-constant": [4.0, 2.0, 1.0],
        "adam-cosine": [4.0, 1.5, 0.5],
        "adamw": [4.0, 2.0, 0.8],
        "net": [4.0, 0.5, 0.25],
        "bad": [4.0, 5.0, 0.6],
        "dip": [4.0, 0.4, 0.6],  # below Adam's final at step 50, above it at the end
    }
    for opt, c in curves.items():
        for seed in (0, 1):
            for step, loss in zip((0, 50, 100), c):
                rows.append(("t", opt, seed, step, loss))
    s = real.summarise(rows)
    e = s["per_task"]["t"]
    assert e["tuned"] == "adam-cosine"
    assert e["ratio"]["net"] == pytest.approx(0.5) and e["ratio"]["bad"] == pytest.approx(1.2)
    assert e["steps_to_adam"]["net"] == pytest.approx(0.5)
    assert e["steps_to_adam"]["bad"] == math.inf
    assert e["steps_to_adam"]["dip"] == math.inf
    assert e["diverged"] == {"adamw": False, "bad": True, "dip": False, "net": False}
    assert s["counts"]["net"]["beats"] == 1 and s["counts"]["bad"]["beats"] == 0
    # At 0.7 of the run the last evaluation is step 50: each loss there over
    # tuned Adam's final 0.5.
    assert real.PART == 0.7
    assert e["at_part"]["net"] == pytest.approx(1.0)
    assert e["at_part"]["bad"] == pytest.approx(10.0)
    assert e["adam_at_part"] == pytest.approx(3.0)
    page = real.markdown(s, {"command": "c", "machine": "m", "torch": "t", "date": "d",
                             "seeds": 2, "hide_budget": False,
                             "tasks": {"t": {"steps": 100, "adam-constant_lr": 1e-3,
                                             "adam-cosine_lr": 1e-2}}})  # fmt: skip
    assert "| t | 3 | never | 4 | never | 10 | never | 0.8 | 0.50x | 1 |" in page


def test_real_summary_floors_losses_that_reach_zero():
    """A loss of exactly 0 (float32 cross-entropy on fitted data) counts as
    ``LOSS_FLOOR``: finite ratios, and a geometric mean that is a number."""
    rows = []
    curves = {
        ("a", "adam-constant"): [2.0, 1e-3], ("a", "adam-cosine"): [2.0, 0.0],
        ("a", "net"): [2.0, 0.0], ("b", "adam-constant"): [2.0, 0.5],
        ("b", "adam-cosine"): [2.0, 0.4], ("b", "net"): [2.0, 0.0],
    }  # fmt: skip
    for (task, opt), c in curves.items():
        for step, loss in zip((0, 10), c):
            rows.append((task, opt, 0, step, loss))
    s = real.summarise(rows)
    assert s["per_task"]["a"]["ratio"]["net"] == pytest.approx(1.0)
    assert s["per_task"]["b"]["ratio"]["net"] == pytest.approx(real.LOSS_FLOOR / 0.4)
    assert s["counts"]["net"]["geomean_ratio"] == pytest.approx(math.sqrt(real.LOSS_FLOOR / 0.4))
    assert s["counts"]["net"]["beats"] == 1


def test_real_benchmark_runs_and_writes_its_page(tmp_path, monkeypatch):
    monkeypatch.setitem(TASK_STEPS, "mlp-gmm", 12)
    monkeypatch.setattr(real, "ADAM_GRID", (1e-3, 1e-2))
    out = tmp_path / "real"
    args = ["--suite", "mlp-gmm", "--weights", "nfn-real", "--seeds", "1", "--out", str(out)]
    s = real.main(args)
    assert s["counts"]["nfn-real"]["tasks"] == 1
    page = (out / "results.md").read_text()
    assert "python -m benchmarks.real --suite mlp-gmm" in page and "adam-cosine" in page
    assert (out / "curves.csv").exists() and (out / "curves.png").exists()
    (out / "results.md").unlink()
    again = real.main(["--from-csv", "--out", str(out)])
    assert again == s and (out / "results.md").read_text() == page
    with pytest.raises(SystemExit):
        real.main(["--suite", "mlp-digits", "--out", str(tmp_path / "x")])  # no budget
    assert not (tmp_path / "x").exists()
    # Another net against the same baselines: tuned Adam and AdamW copied,
    # not run again, so their rows and picks are the first run's.
    reuse = tmp_path / "reuse"
    calls = []
    monkeypatch.setattr(real, "tune", lambda *a, **k: calls.append(a) or (1e-3, {}))
    s2 = real.main([*args[:2], "--weights", "b=nfn-real", "--seeds", "1",
                    "--baselines-from", str(out), "--out", str(reuse)])  # fmt: skip
    assert not calls and s2["per_task"]["mlp-gmm"]["tuned"] == s["per_task"]["mlp-gmm"]["tuned"]
    base = [r for r in csv.reader(open(out / "curves.csv")) if r[1] in real.BASELINES]
    copied = [r for r in csv.reader(open(reuse / "curves.csv")) if r[1] in real.BASELINES]
    assert base == copied and {r[1] for r in csv.reader(open(reuse / "curves.csv"))} >= {"b"}
    # --set: the NFN without its NF-layer and statistics (nf_scale=0) runs
    # differently, and the setting is recorded; it needs learned optimizers.
    ablate = tmp_path / "ablate"
    s3 = real.main([*args[:2], "--weights", "c=nfn-real", "--set", "nf_scale=0", "--seeds", "1",
                    "--baselines-from", str(out), "--out", str(ablate)])  # fmt: skip
    assert json.loads((ablate / "meta.json").read_text())["settings"]["set"] == {"nf_scale": 0.0}
    assert s3["per_task"]["mlp-gmm"]["final"]["c"] != s["per_task"]["mlp-gmm"]["final"]["nfn-real"]
    with pytest.raises(SystemExit):
        real.main([*args[:2], "--set", "nf_scale=0", "--out", str(tmp_path / "z")])
    assert not (tmp_path / "z").exists()
    # --budget-fraction: the net runs half the steps, told that budget, against
    # tuned Adam's whole run; its final loss is that run's.
    half = tmp_path / "half"
    s4 = real.main([*args[:2], "--weights", "nfn-real", "--seeds", "1", "--budget-fraction",
                    "0.5", "--baselines-from", str(out), "--out", str(half)])  # fmt: skip
    _, make = real.learned("nfn-real", 6)
    direct = real.run(get_task("mlp-gmm"), make, 6, 0, 1)  # the loop the benchmark runs
    learned_steps = {int(r[3]) for r in csv.reader(open(half / "curves.csv")) if r[1] == "nfn-real"}
    assert max(learned_steps) == 6
    e4 = s4["per_task"]["mlp-gmm"]
    assert e4["final"]["nfn-real"] == pytest.approx(direct.train_eval[-1])
    assert e4["final"]["adam-cosine"] == s["per_task"]["mlp-gmm"]["final"]["adam-cosine"]
    assert e4["steps_to_adam"]["nfn-real"] <= 0.5 or e4["steps_to_adam"]["nfn-real"] == math.inf
    assert "run for 0.5 of each task's steps" in (half / "results.md").read_text()
    for bad in ("0", "1.5"):
        with pytest.raises(SystemExit, match="--budget-fraction must be in \\(0, 1\\]"):
            real.main([*args, "--budget-fraction", bad, "--out", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()
    with pytest.raises(SystemExit, match="--baselines-from .*: ran with seeds 1, this run 2"):
        real.main([*args[:2], "--seeds", "2", "--baselines-from", str(out),
                   "--out", str(tmp_path / "y")])  # fmt: skip
    assert not (tmp_path / "y").exists()


def test_snapshots_rank_on_a_budget_suite_with_the_budget_told_or_hidden(tmp_path, monkeypatch):
    from benchmarks import snapshots

    monkeypatch.setitem(TASK_STEPS, "mlp-gmm", 12)
    monkeypatch.setattr(real, "ADAM_GRID", (1e-3, 1e-2))
    run = tmp_path / "run"
    (run / "snapshots").mkdir(parents=True)
    net, meta = lopt.load("nfn-real")
    lopt.save(net, run / "snapshots" / "optimizer-000010.pt", meta)
    finals = {}
    for hide in (False, True):
        out = tmp_path / f"rank-{hide}"
        args = [str(run), "--suite", "mlp-gmm", "--seeds", "1", "--out", str(out)]
        assert snapshots.main(args + ["--hide-budget"] * hide) == run / "snapshots" / (
            "optimizer-000010.pt"
        )
        assert json.loads((out / "meta.json").read_text())["settings"]["hide_budget"] is hide
        assert ("not told it" in (out / "ranking.md").read_text()) is hide
        rows = [r for r in csv.reader(open(out / "curves.csv")) if r[1] == "step10"]
        finals[hide] = rows[-1][-1]
    assert finals[False] != finals[True]  # the net reads the budget it is told
    with pytest.raises(SystemExit):
        snapshots.main([str(run), "--suite", "mlp-digits", "--hide-budget", "--out",
                        str(tmp_path / "x")])  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_real_benchmark_and_snapshots_run_a_loss_reading_net_told_or_not_told_the_loss(
    tmp_path, monkeypatch
):
    """--hide-loss runs the learned optimizers as a loop that calls step()
    alone does; without it they are told each step's loss; it is recorded in
    the settings and the page, and the snapshot ranking passes it on."""
    from helpers import strong

    from benchmarks import snapshots
    from tasks.runs import run

    monkeypatch.setitem(TASK_STEPS, "mlp-gmm", 12)
    monkeypatch.setattr(real, "ADAM_GRID", (1e-3, 1e-2))
    torch.manual_seed(0)
    net = strong("nfn-real-like")
    run_dir = tmp_path / "run"
    (run_dir / "snapshots").mkdir(parents=True)
    path = run_dir / "snapshots" / "optimizer-000010.pt"
    lopt.save(net, path, {})
    base = tmp_path / "base"
    args = ["--suite", "mlp-gmm", "--seeds", "1", "--weights", f"n={path}"]
    told = real.main([*args, "--out", str(base)])
    hidden = tmp_path / "hidden"
    s = real.main([*args, "--hide-loss", "--baselines-from", str(base), "--out", str(hidden)])
    final = s["per_task"]["mlp-gmm"]["final"]["n"]
    assert final != told["per_task"]["mlp-gmm"]["final"]["n"]  # the net reads the loss
    _, make = real.learned(str(path), 12)
    direct = run(get_task("mlp-gmm"), make, 12, 0, 1, tell_loss=False)
    assert final == pytest.approx(direct.train_eval[-1])
    assert json.loads((hidden / "meta.json").read_text())["settings"]["hide_loss"] is True
    assert "not told the loss" in (hidden / "results.md").read_text()
    assert "not told the loss" not in (base / "results.md").read_text()
    # Resuming a run with the loss told as one with it hidden is refused.
    with pytest.raises(SystemExit, match="--resume: .* other settings"):
        real.main([*args, "--hide-loss", "--resume", "--out", str(base)])
    ranked = tmp_path / "rank"
    snapshots.main([str(run_dir), "--suite", "mlp-gmm", "--seeds", "1", "--hide-loss",
                    "--baselines-from", str(base), "--out", str(ranked)])  # fmt: skip
    assert "not told the loss" in (ranked / "ranking.md").read_text()
    rows = [r for r in csv.reader(open(ranked / "curves.csv")) if r[1] == "step10"]
    assert float(rows[-1][-1]) == pytest.approx(direct.train_eval[-1])
    with pytest.raises(SystemExit):
        snapshots.main([str(run_dir), "--suite", "mlp-digits", "--hide-loss", "--out",
                        str(tmp_path / "x")])  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_the_run_loop_tells_only_learned_optimizers_the_loss_and_only_when_asked(monkeypatch):
    from tasks.runs import adam, run

    seen = []
    step = lopt.NFNOptimizer.step

    def spy(self, closure=None, loss=None):
        seen.append(loss is not None)
        return step(self, closure, loss=loss)

    monkeypatch.setattr(lopt.NFNOptimizer, "step", spy)
    task = get_task("mlp-gmm")
    make = real.learned("nfn-real", 3)[1]
    run(task, make, 3, 0)
    assert seen == [True] * 3
    seen.clear()
    run(task, make, 3, 0, tell_loss=False)
    assert seen == [False] * 3
    adam_steps = []
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: adam_steps.append(k))
    run(task, adam(1e-3), 2, 0)
    assert adam_steps == [{}, {}]


def test_cosine_schedule_reaches_zero_at_the_end():
    from tasks.runs import cosine

    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = cosine(opt, 10)
    lrs = []
    for _ in range(10):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[4] == pytest.approx(0.05) and lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_real_benchmark_keeps_each_finished_task_and_resumes(tmp_path, monkeypatch):
    """A run stopped after its first task keeps that task; --resume runs only
    the rest, and the result equals an uninterrupted run's; an --out holding
    a run is refused without --resume, and other settings with it."""
    monkeypatch.setitem(TASK_STEPS, "mlp-gmm", 6)
    monkeypatch.setitem(TASK_STEPS, "mlp-teacher", 6)
    monkeypatch.setitem(SUITES, "two", ["mlp-gmm", "mlp-teacher"])
    monkeypatch.setattr(real, "ADAM_GRID", (1e-2,))
    args = ["--suite", "two", "--seeds", "1"]
    whole = real.main([*args, "--out", str(tmp_path / "whole")])
    calls = []
    original = real.run_task

    def stop_after_one(name, *rest):
        if calls:
            raise KeyboardInterrupt
        calls.append(name)
        return original(name, *rest)

    monkeypatch.setattr(real, "run_task", stop_after_one)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        real.main([*args, "--out", str(part)])
    assert {r[0] for r in real.read_out(part, "x")[0]} == {"mlp-gmm"}
    monkeypatch.setattr(real, "run_task", original)
    with pytest.raises(SystemExit, match="holds a run already"):
        real.main([*args, "--out", str(part)])
    with pytest.raises(SystemExit, match="other settings"):
        real.main(["--suite", "two", "--seeds", "2", "--out", str(part), "--resume"])
    done = []
    monkeypatch.setattr(real, "run_task", lambda name, *r: done.append(name) or original(name, *r))
    resumed = real.main([*args, "--out", str(part), "--resume"])
    assert done == ["mlp-teacher"] and resumed == whole
