"""Benchmarks: tuning, the summary computed from curves, and --quick runs."""

import copy
import csv
import json
import math
import statistics

import pytest
import torch
from torch import nn

import lopt
from benchmarks import compare, overhead
from tasks import Task
from tasks.data import Dataset
from tasks.models import mlp
from tasks.runs import adam, run, tune


def toy_task(target=2.0):
    x = torch.ones(8, 1)
    ds = Dataset("toy", x, torch.full((8, 1), target), x, torch.full((8, 1), target), 0)
    return Task("toy", mlp(1, [], 1, bias=False), ds, batch_size=4)


def hand_adam_final(task, lr, steps, seed, target=2.0):
    """Adam written out on the one-weight problem (w - target)^2."""
    w = task.init(torch.Generator().manual_seed(seed))["1.weight"].item()
    m = v = 0.0
    for t in range(1, steps + 1):
        g = 2 * (w - target)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w -= lr * (m / (1 - 0.9**t)) / (math.sqrt(v / (1 - 0.999**t)) + 1e-8)
    return (w - target) ** 2


def test_tuned_adam_picks_the_best_grid_point():
    task = toy_task()
    grid = [1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
    best, scores = tune(task, adam, 30, [0, 1], grid)
    finals = {lr: sum(hand_adam_final(task, lr, 30, s) for s in (0, 1)) / 2 for lr in grid}
    for lr in grid:
        assert scores[lr] == pytest.approx(finals[lr], rel=1e-3, abs=1e-6)
    assert best == min(finals, key=finals.get)
    assert best not in (grid[0], grid[-1])  # an interior answer: the search matters


def test_runs_share_initialisation_and_batches():
    task = toy_task()
    a = run(task, adam(0.1), 5, seed=3)
    b = run(task, adam(0.1), 5, seed=3)
    assert a.train == b.train and a.eval_steps[-1] == 5


def write_rows(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(compare.CSV_HEADER)
        w.writerows(rows)


def test_summary_counts_from_a_hand_made_csv(tmp_path):
    # Horizon 10. On task A the learned optimizer beats Adam at 1x and 2x and
    # reaches Adam's 1x loss at step 5; on task B it loses at 1x, wins at 2x.
    rows = []
    for seed, noise in ((0, 0.0), (1, 0.02)):
        for step, adam_loss, lopt_loss in (
            (0, 2.0, 2.0),
            (5, 1.0, 0.5),
            (10, 0.6, 0.3),
            (20, 0.4, 0.2),
        ):
            rows += [
                ("A", "adam", seed, step, "train", adam_loss + noise),
                ("A", "nfn", seed, step, "train", lopt_loss + noise),
                ("A", "nfn", seed, step, "test", 9.9),
            ]
        for step, adam_loss, lopt_loss in (
            (0, 3.0, 3.0),
            (5, 1.5, 2.0),
            (10, 1.0, 1.2),
            (20, 0.9, 0.5),
        ):
            rows += [
                ("B", "adam", seed, step, "train", adam_loss),
                ("B", "nfn", seed, step, "train", lopt_loss),
            ]
    rows += [
        ("B", "div", 0, s, "train", v)
        for s, v in ((0, 3.0), (5, 2.0), (10, float("nan")), (20, 4.0))
    ]
    rows += [("A", "div", 0, s, "train", v) for s, v in ((0, 2.0), (5, 2.5), (10, 3.0), (20, 3.5))]
    path = tmp_path / "curves.csv"
    write_rows(path, rows)
    s = compare.summarise(compare.read_csv(path), horizon=10, factors=(1, 2))
    nfn = s["counts"]["nfn"]
    assert (nfn["beats@1x"], nfn["beats@2x"], nfn["tasks"]) == (1, 2, 2)
    assert s["per_task"][("A", "nfn")]["steps_to_baseline"] == 0.5
    assert s["per_task"][("B", "nfn")]["steps_to_baseline"] == 2.0
    assert nfn["median_steps_to_baseline"] == 1.25
    assert s["per_task"][("A", "nfn")]["normalised"] == pytest.approx(0.31 / 0.61)
    assert s["counts"]["div"]["diverged"] == 2 and nfn["diverged"] == 0
    text = compare.markdown(s, {}, (1, 2))
    assert "| nfn | 1/2 | 2/2 | 1.25x | 0 | 0/4 | 0/4 | 0/4 |" in text
    assert s["per_task"][("A", "nfn")]["peak"] == pytest.approx(0.52 / 2.02)
    assert s["per_task"][("B", "div")]["peak"] == math.inf  # a NaN on the way
    assert s["per_task"][("A", "div")]["peak"] == pytest.approx(3.5 / 2.0)
    assert s["counts"]["div"]["runs_above_start"] == 2
    assert s["counts"]["div"]["runs_end_above_start"] == 2  # ends at 3.5 > 2.0; NaN on the way
    assert "| div | 0/2 | 0/2 | never | 2 | 2/2 | 2/2 | 0/2 |" in text


def test_summary_counts_a_seed_that_spikes_above_its_start_and_recovers():
    # The seed mean ends below the start (not "diverged"), but seed 1 went
    # above its initial loss on the way: the strict reading of the bar sees it.
    rows = [("T", "adam", seed, s, "train", v) for seed in (0, 1)
            for s, v in ((0, 2.0), (10, 1.0), (20, 0.5))]  # fmt: skip
    rows += [("T", "spiky", 0, s, "train", v) for s, v in ((0, 2.0), (10, 0.8), (20, 0.4))]
    rows += [("T", "spiky", 1, s, "train", v) for s, v in ((0, 2.0), (10, 5.0), (20, 0.6))]
    # One seed ends above its start, the seed mean below it (1.25 < 2).
    rows += [("T", "late", 0, s, "train", v) for s, v in ((0, 2.0), (10, 0.1), (20, 0.1))]
    rows += [("T", "late", 1, s, "train", v) for s, v in ((0, 2.0), (10, 1.0), (20, 2.4))]
    s = compare.summarise(rows, horizon=10, factors=(1, 2))
    e = s["per_task"][("T", "spiky")]
    assert not e["diverged"] and e["peak"] == 2.5 and (e["runs_above_start"], e["runs"]) == (1, 2)
    assert s["counts"]["spiky"]["runs_above_start"] == 1
    assert s["counts"]["spiky"]["runs_end_above_start"] == 0
    late = s["per_task"][("T", "late")]
    assert not late["diverged"]
    assert (late["runs_above_start"], late["runs_end_above_start"]) == (1, 1)
    assert "| T | spiky | 2.9000 | 0.5000 | 2.900 | 2.00x | no | 2.500 |" in compare.markdown(
        s, {}, (1, 2)
    )


def test_batch_spike_against_the_margin():
    m = compare.SPIKE_MARGIN
    assert not compare.batch_spike([2.0, 2.0 * m, 0.1], 2.0)  # at the margin: not above
    assert compare.batch_spike([2.0, 2.0 * m * 1.001, 0.1], 2.0)
    assert compare.batch_spike([1.0, float("nan"), 1.0], 2.0)
    assert compare.batch_spike([1.0, float("inf")], 2.0)
    assert not compare.batch_spike([], 2.0)


def test_summary_counts_batch_loss_spikes_the_sparse_evaluations_miss():
    # Whole-split losses every 10 steps never leave [start/4, start], but
    # seed 1's batch losses spike to 3x the start for 3 steps in between.
    rows = []
    for opt in ("adam", "spiky"):
        for seed in (0, 1):
            rows += [("T", opt, seed, s, "train", v) for s, v in ((0, 2.0), (10, 1.0), (20, 0.5))]
            batch = [2.0 - 0.07 * s for s in range(1, 21)]
            if opt == "spiky" and seed == 1:
                batch[11:14] = [6.0] * 3
            batch[0] = 2.4  # the first steps' noise, inside the margin
            rows += [("T", opt, seed, s, "batch", v) for s, v in enumerate(batch, 1)]
    s = compare.summarise(rows, horizon=10, factors=(1, 2))
    assert s["per_task"][("T", "spiky")]["runs_above_start"] == 0
    assert s["per_task"][("T", "spiky")]["runs_batch_spike"] == 1
    assert s["counts"]["spiky"]["runs_batch_spike"] == 1
    assert s["per_task"][("T", "adam")]["runs_batch_spike"] == 0
    assert "| 0/2 | 0/2 | 1/2 |" in compare.markdown(s, {}, (1, 2))


def test_summary_rejects_a_csv_without_the_baseline(tmp_path):
    path = tmp_path / "c.csv"
    write_rows(path, [("A", "nfn", 0, 0, "train", 1.0)])
    with pytest.raises(ValueError, match="no 'adam' runs"):
        compare.summarise(compare.read_csv(path), horizon=10)
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="expected columns"):
        compare.read_csv(path)


@pytest.mark.slow
def test_compare_quick_writes_every_output(tmp_path):
    summary = compare.main(["--quick", "--out", str(tmp_path)])
    for name in ("curves.csv", "results.md", "meta.json", "curves.png", "summary.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert set(summary["tasks"]) == {"mlp-digits", "mlp-gmm"}
    assert {"adam", "sgdm", "nfn-untrained", "mlp-untrained"} == set(summary["optimizers"])
    again = compare.main(["--from-csv", "--out", str(tmp_path)])
    assert again["counts"] == summary["counts"]


@pytest.mark.slow
def test_overhead_quick_writes_every_output(tmp_path):
    rows = overhead.main(["--quick", "--out", str(tmp_path), "--no-nfn"])
    for name in ("overhead.md", "overhead.json", "overhead.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert {r["model"] for r in rows} == {"mlp-tiny", "cnn-tiny"}
    assert all(r["nfn_step_ms"] > 0 and r["nfn_peak_mb"] >= 0 for r in rows)
    # Adam's foreach step calls few operators; the learned ones, more.
    assert all(0 < r["adam_launches"] < r["mlp_launches"] < r["nfn_launches"] for r in rows)
    # Other shipped nets by name, recorded in the metadata; an unknown name
    # is refused before anything runs.
    out = tmp_path / "ortho"
    overhead.main(["--quick", "--out", str(out), "--no-nfn", "--nfn", "nfn-ortho"])
    nets = json.loads((out / "overhead.json").read_text())["meta"]["nets"]
    assert "shipped nfn-ortho" in nets["nfn"] and "'ortho_lr': None" not in nets["nfn"]
    assert f"shipped {lopt.checkpoint.RECOMMENDED['PerParamMLP']}" in nets["mlp"]
    with pytest.raises(SystemExit, match="--nfn nope: not a shipped net"):
        overhead.main(["--quick", "--out", str(tmp_path / "bad"), "--nfn", "nope"])
    assert not (tmp_path / "bad").exists()


def test_overhead_times_with_denormals_flushed_and_restores_the_setting():
    tiny = torch.tensor([1e-40])  # a denormal float32
    assert (tiny * 1.0).item() != 0
    row = overhead.time_steps("mlp-tiny", torch.device("cpu"), 1, 4)
    assert row["nfn_step_ms"] > 0
    assert (tiny * 1.0).item() != 0  # flushing is off again afterwards


def test_overhead_pages_without_an_mlp_have_no_figure(tmp_path):
    # The figure is step time against MLP size: a run of other models writes
    # its tables and no figure (matplotlib refused empty log axes).
    row = {"model": "resnet-bn", "params": 10, **{
        f"{k}_{m}": 1.0 for k in overhead.OPTIMIZERS
        for m in ("step_ms", "train_ms", "launches", "state_mb")
    }}  # fmt: skip
    table = overhead.write_outputs([row], tmp_path, {"device": "cpu"})
    assert "| resnet-bn | 10 | nfn |" in table and (tmp_path / "overhead.md").exists()
    assert not (tmp_path / "overhead.png").exists()


@pytest.mark.slow
def test_overhead_times_the_torch_path_with_any_slicing(tmp_path):
    from lopt import nets

    base = ["--quick", "--no-nfn", "--no-memory", "--nfn", "nfn-broad", "--mlp", "mlp-broad"]
    fused = overhead.main(base + ["--out", str(tmp_path / "a")])
    torch_path = overhead.main(base + ["--torch-path", "--out", str(tmp_path / "b")])
    sliced = ["--torch-path", "--slice-entries", "8", "--out", str(tmp_path / "c")]
    sliced = overhead.main(base + sliced)
    for a, b, c in zip(fused, torch_path, sliced):
        # The fused kernel replaces most operators; slices of 8 entries add them back per slice.
        assert a["mlp_launches"] < b["mlp_launches"] < c["mlp_launches"]
        assert b["nfn_launches"] < c["nfn_launches"] and a["adam_launches"] == c["adam_launches"]
    meta = json.loads((tmp_path / "c" / "overhead.json").read_text())["meta"]
    assert meta["path"] == {"torch_path": True, "slice_entries": 8}
    # The benchmark leaves the library as it found it.
    assert overhead.FUSED is None and nets.CHUNK == 65536 and nets.GPU_CHUNK == 1 << 22
    with pytest.raises(SystemExit, match="--slice-entries 0: must be at least 1"):
        overhead.main(base + ["--slice-entries", "0", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_learned_optimizer_labels(tmp_path):
    import lopt

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        lopt.save(lopt.PerParamMLP(), tmp_path / d / "optimizer.pt")
    labels = [
        label
        for label, _ in compare.learned_all(
            [str(tmp_path / "a" / "optimizer.pt"), "mine=" + str(tmp_path / "b" / "optimizer.pt")]
        )
    ]
    assert labels == ["a", "mine"]
    with pytest.raises(SystemExit, match="labels must be unique"):
        compare.learned_all(["x=" + str(tmp_path / "a" / "optimizer.pt")] * 2)


@pytest.mark.slow
def test_compare_reuses_tuned_baselines(tmp_path, monkeypatch):
    import lopt

    first, second = tmp_path / "first", tmp_path / "second"
    torch.manual_seed(0)
    lopt.save(lopt.PerParamMLP(), tmp_path / "net.pt")
    compare.main(["--quick", "--weights", f"a={tmp_path / 'net.pt'}", "--out", str(first)])

    def no_tuning(*args, **kwargs):
        raise AssertionError("baselines were tuned again")

    monkeypatch.setattr(compare, "tune", no_tuning)
    args = ["--quick", "--weights", f"b={tmp_path / 'net.pt'}", "--out", str(second)]
    summary = compare.main(args + ["--baselines-from", str(first)])
    assert set(summary["optimizers"]) == {"adam", "sgdm", "b"}
    old, new = (compare.read_csv(d / "curves.csv") for d in (first, second))
    assert sorted(r for r in old if r[1] in ("adam", "sgdm")) == sorted(
        r for r in new if r[1] in ("adam", "sgdm")
    )
    # The same net under another label gives the same curves as in the first run.
    assert [r[2:] for r in old if r[1] == "a"] == [r[2:] for r in new if r[1] == "b"]
    meta = json.loads((second / "meta.json").read_text())
    assert meta["baselines_reused"] == ["mlp-digits", "mlp-gmm"]

    common = dict(factors=(1, 2), seeds=[0], tune_seeds=[100], grid=compare.QUICK_GRID)
    with pytest.raises(SystemExit, match="horizon: 50 there, 60 here"):
        compare.load_baselines(first, steps=60, device="cpu", **common)
    assert compare.load_baselines(first, steps=50, device="cpu", **common).keys() == {
        "mlp-digits",
        "mlp-gmm",
    }
    # A seed the first run lacks: nothing to reuse, so those tasks are run afresh.
    common["seeds"] = [0, 1]
    assert compare.load_baselines(first, steps=50, device="cpu", **common) == {}
    with pytest.raises(SystemExit, match="cannot read"):
        compare.load_baselines(tmp_path / "missing", steps=50, device="cpu", **common)

    # Both runs as one: the shared baselines once, both learned nets.
    merged = compare.main(["--merge", str(first), str(second), "--out", str(tmp_path / "m")])
    assert set(merged["optimizers"]) == {"adam", "sgdm", "a", "b"}
    rows = compare.read_csv(tmp_path / "m" / "curves.csv")
    assert len(rows) == len(old) + sum(r[1] == "b" for r in new)
    assert merged["counts"]["a"] == merged["counts"]["b"]  # the same net under two labels
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.json").write_text((second / "meta.json").read_text())
    changed = [(*r[:5], r[5] + 1.0) if r[1] == "adam" else r for r in new]
    compare.write_csv(changed, bad / "curves.csv")
    with pytest.raises(SystemExit, match="differs from an earlier run"):
        compare.merge_runs([first, bad])
    # A diverged (NaN) point in a shared curve is the same in both runs.
    diverged = [(*r[:5], math.nan) if r[1] == "adam" else r for r in new]
    for name in ("nan1", "nan2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text((second / "meta.json").read_text())
        compare.write_csv(diverged, tmp_path / name / "curves.csv")
    rows, _ = compare.merge_runs([tmp_path / "nan1", tmp_path / "nan2"])
    assert sum(math.isnan(r[-1]) for r in rows) == sum(r[1] == "adam" for r in new) > 0


def test_set_overrides_a_learned_scalar_for_an_ablation(tmp_path):
    import lopt

    net = lopt.NFNNet()
    lopt.save(net, tmp_path / "n.pt")
    overrides = compare.parse_overrides(["fan_in_exp=0.25", "log_lr=-3"])
    assert overrides == {"fan_in_exp": 0.25, "log_lr": -3.0}
    ((label, make),) = compare.learned_all([f"x={tmp_path / 'n.pt'}"], overrides)
    opt = make(mlp(4, [8], 2))
    assert label == "x"
    assert opt.net.fan_in_exp.item() == 0.25 and opt.net.log_lr.item() == -3.0
    assert lopt.load(tmp_path / "n.pt")[0].fan_in_exp.item() == net.fan_in_exp.item()
    with pytest.raises(SystemExit, match="no scalar meta-parameter or switch 'inp.weight'"):
        compare.learned(str(tmp_path / "n.pt"), {"inp.weight": 1.0})
    ((_, make),) = compare.learned_all([str(tmp_path / "n.pt")], {"input_width_factor": 0})
    assert make(mlp(4, [8], 2)).net.input_width_factor is False
    ((_, make),) = compare.learned_all([str(tmp_path / "n.pt")], {"radial_correction": 0})
    assert make(mlp(4, [8], 2)).net.radial_correction is False
    with pytest.raises(SystemExit, match="a switch is 0 or 1"):
        compare.learned(str(tmp_path / "n.pt"), {"input_width_factor": 0.5})
    for bad in ("fan_in_exp", "fan_in_exp=x", "=1"):
        with pytest.raises(SystemExit, match="expected NAME=NUMBER"):
            compare.parse_overrides([bad])
    with pytest.raises(SystemExit, match="give them with --weights"):
        compare.main(["--set", "fan_in_exp=1", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    # -inf switches the orthogonal base of a net that has one off: the hidden
    # weight then moves by the learned term alone, the others as before.
    lopt.save(lopt.NFNNet(ortho_lr=0.05), tmp_path / "o.pt")
    moved = {}
    for value in (math.log(0.05), -math.inf):
        ((_, make),) = compare.learned_all([str(tmp_path / "o.pt")], {"log_ortho_lr": value})
        torch.manual_seed(0)
        model = mlp(4, [8, 8], 2)
        before = [p.detach().clone() for p in model.parameters()]
        opt = make(model)
        model(torch.randn(16, 4)).square().mean().backward()
        opt.step()
        moved[value] = [(p.detach() - b).norm().item() for p, b in zip(model.parameters(), before)]
    on, off = moved[math.log(0.05)], moved[-math.inf]
    hidden = [n for n, _ in model.named_parameters()].index("3.weight")
    assert 0 < off[hidden] < 0.1 * on[hidden]
    assert [x for i, x in enumerate(on) if i != hidden] == pytest.approx(
        [x for i, x in enumerate(off) if i != hidden]
    )


def test_nf_scale_0_runs_the_nfn_as_its_per_entry_net(tmp_path):
    import lopt
    from tasks import get_task

    torch.manual_seed(0)
    nfn = lopt.NFNNet(nf_channels=4, nf_scale=0.1, step_mult=0.03)
    with torch.no_grad():  # an NF-layer whose output matters
        for name, p in nfn.named_parameters():
            if name.startswith("nf."):
                p.mul_(100)
    trunk = lopt.PerParamMLP()
    trunk.load_state_dict({k: v for k, v in nfn.state_dict().items() if k in trunk.state_dict()})
    lopt.save(nfn, tmp_path / "nfn.pt")
    lopt.save(trunk, tmp_path / "mlp.pt")
    task = get_task("mlp-gmm")
    makes = {
        "nfn": compare.learned(str(tmp_path / "nfn.pt"))[1],
        "nfn0": compare.learned(str(tmp_path / "nfn.pt"), {"nf_scale": 0})[1],
        "mlp": compare.learned(str(tmp_path / "mlp.pt"))[1],
    }
    losses = {k: run(task, m, 10, 0, 10).train for k, m in makes.items()}
    assert losses["nfn0"] == pytest.approx(losses["mlp"], rel=1e-5)
    assert abs(losses["nfn"][-1] - losses["mlp"][-1]) > 1e-3
    with pytest.raises(SystemExit, match=r"no scalar meta-parameter or switch 'nf_scale'"):
        compare.learned(str(tmp_path / "mlp.pt"), {"nf_scale": 0})


def test_set_step_cap_caps_a_learned_optimizers_steps(tmp_path):
    """--set step_cap=C runs a saved net with its weights' steps capped at
    C times their norm (a net of either kind), without touching the file."""
    import lopt
    from tasks import get_task

    torch.manual_seed(0)
    lopt.save(lopt.PerParamMLP(out_scale=1.0, step_mult=0.3), tmp_path / "mlp.pt")
    task = get_task("mlp-gmm")
    make = compare.learned(str(tmp_path / "mlp.pt"), {"step_cap": 1e-3})[1]
    free = run(task, compare.learned(str(tmp_path / "mlp.pt"))[1], 10, 0, 10).train
    capped = run(task, make, 10, 0, 10)
    assert abs(capped.train[-1] - free[-1]) > 1e-3
    assert make(task.module_with(task.init(torch.Generator()))).net.step_cap == 1e-3
    assert lopt.load(tmp_path / "mlp.pt")[0].step_cap == 0.0


def test_ratio_interval_matches_the_stratified_normal_interval():
    """With many seeds per task the bootstrap interval is the normal one:
    exp(M +- 1.96 SE), SE^2 = sum over tasks of n_t var_t / N^2 (plug-in
    variances; the tasks' own means are kept, so their spread adds nothing)."""
    from benchmarks import head_to_head as h2h

    gen = torch.Generator().manual_seed(0)
    task_logs = [
        (mu + sd * torch.randn(n, generator=gen, dtype=torch.float64)).tolist()
        for mu, sd, n in ((-0.5, 0.1, 300), (0.4, 0.3, 200), (0.0, 0.05, 400))
    ]
    flat = [x for t in task_logs for x in t]
    n = len(flat)
    m = sum(flat) / n
    var = sum(statistics.pvariance(t) * len(t) for t in task_logs) / n**2
    lo, hi = h2h.ratio_interval(task_logs)
    assert math.log(lo) == pytest.approx(m - 1.96 * var**0.5, abs=0.15 * var**0.5)
    assert math.log(hi) == pytest.approx(m + 1.96 * var**0.5, abs=0.15 * var**0.5)
    assert h2h.ratio_interval(task_logs) == (lo, hi)  # seeded
    assert lo < h2h.ratio_interval(task_logs, level=0.5)[0] < math.exp(m)
    assert all(math.isnan(x) for x in h2h.ratio_interval([[], []]))
    with pytest.raises(ValueError, match="level must be in"):
        h2h.ratio_interval(task_logs, level=1.0)


def compare_run(folder, rows, horizon=10):
    """A compare --out folder holding ``rows``, as head_to_head reads it."""
    folder.mkdir()
    compare.write_csv(rows, folder / "curves.csv")
    meta = {"horizon": horizon, "factors": [1], "device": "cpu", "torch": "x", "tasks": {}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder, meta


def test_head_to_head_pairs_seeds_and_tests_signs(tmp_path, capsys):
    from benchmarks import head_to_head as h2h

    assert h2h.sign_test(5, 5) == 1.0
    assert h2h.sign_test(0, 0) == 1.0
    assert h2h.sign_test(10, 0) == pytest.approx(2 / 2**10)
    assert h2h.sign_test(1, 9) == pytest.approx(2 * 11 / 2**10)
    # A is 10% lower than B on every seed of t1 and 10% higher on t2's, except
    # seed 2 of t2, where B diverged; C ran one task only.
    rows = []
    for task, ratio in (("t1", 0.9), ("t2", 1.1)):
        for seed in range(3):
            b = 1.0 + seed
            a = b * ratio
            if (task, seed) == ("t2", 2):
                b = math.nan
            for opt, loss in (("A", a), ("B", b), ("adam", 1.0)):
                rows.append((task, opt, seed, 0, "train", 2.0))
                rows.append((task, opt, seed, 10, "train", loss))
                rows.append((task, opt, seed, 10, "batch", 99.0))
        if task == "t1":
            rows.append((task, "C", 0, 10, "train", 1.0))
    r = h2h.head_to_head(rows, "A", "B", 10)
    assert r["per_task"]["t1"] == {
        "seeds": 3,
        "ratio": pytest.approx(0.9),
        "wins": 3,
        "losses": 0,
        "finite": 3,
    }
    # B's diverged seed counts as A's win, and is left out of the ratio.
    t2 = r["per_task"]["t2"]
    assert (t2["wins"], t2["losses"], t2["finite"]) == (1, 2, 2)
    assert t2["ratio"] == pytest.approx(1.1)
    assert (r["wins"], r["losses"], r["pairs"], r["nonfinite"]) == (4, 2, 6, 1)
    assert (r["task_wins"], r["task_losses"]) == (1, 1)
    assert r["ratio"] == pytest.approx(math.exp((3 * math.log(0.9) + 2 * math.log(1.1)) / 5))
    # Every task's seeds agree, so resampling seeds within tasks moves nothing.
    assert r["ratio_interval"] == pytest.approx((r["ratio"], r["ratio"]))
    # A loss of 0 is the lowest there is, not a failure.
    zero = [(t, o, s, st, sp, 0.0 if o == "A" else v) for t, o, s, st, sp, v in rows]
    assert h2h.head_to_head(zero, "A", "B", 10)["wins"] == 6
    assert r["p_pairs"] == pytest.approx(h2h.sign_test(4, 2))
    assert h2h.head_to_head(rows, "A", "C", 10)["pairs"] == 1
    with pytest.raises(ValueError, match="optimizers in these runs: A, B, C, adam"):
        h2h.head_to_head(rows, "A", "D", 10)
    # Through the CLI, from a compare run's folder.
    run_dir, meta = compare_run(tmp_path / "run", rows)
    out = tmp_path / "h2h.md"
    res = h2h.main([str(run_dir), "--a", "A", "--b", "B", "--out", str(out)])
    assert res[1]["wins"] == 4
    assert "| t1 | 3 | 0.900 | 3 | 0 |" in out.read_text()
    assert "A lower on 4 of 6" in capsys.readouterr().out
    # A second run on other seeds with more multiples: pooled at the common one.
    more = tmp_path / "more"
    more.mkdir()
    compare.write_csv(
        [(t, o, s + 10, st, sp, v) for t, o, s, st, sp, v in rows if o in "AB"]
        + [("t1", o, 10, 20, "train", v) for o, v in (("A", 5.0), ("B", 1.0))],
        more / "curves.csv",
    )
    (more / "meta.json").write_text(json.dumps(meta | {"factors": [1, 2]}))
    res = h2h.main([str(run_dir), str(more), "--a", "A", "--b", "B"])
    assert list(res) == [1] and (res[1]["wins"], res[1]["pairs"]) == (8, 12)
    # The same net under another label in a third run: pooled under A's name.
    other = tmp_path / "other"
    other.mkdir()
    compare.write_csv(
        [(t, "A2" if o == "A" else o, s + 20, st, sp, v) for t, o, s, st, sp, v in rows],
        other / "curves.csv",
    )
    (other / "meta.json").write_text(json.dumps(meta))
    res = h2h.main([str(run_dir), str(other), "--a", "A,A2", "--b", "B"])
    assert (res[1]["wins"], res[1]["pairs"]) == (8, 12)
    assert "| t1 | 6 | 0.900 | 6 | 0 |" in capsys.readouterr().out
    clash = [(t, "A2", s, st, sp, v + 1) for t, o, s, st, sp, v in rows if o == "A"]
    compare.write_csv(rows + clash, other / "curves.csv")
    with pytest.raises(SystemExit, match="A, A2 differ on t1 seed 0"):
        h2h.main([str(other), "--a", "A,A2", "--b", "B"])
    with pytest.raises(SystemExit, match="two different optimizers"):
        h2h.main([str(run_dir), "--a", "A,B", "--b", "B"])
    with pytest.raises(SystemExit, match="--factors 2: not in every run"):
        h2h.main([str(run_dir), str(more), "--a", "A", "--b", "B", "--factors", "2"])
    with pytest.raises(SystemExit, match="two different optimizers"):
        h2h.main([str(run_dir), "--a", "A", "--b", "A"])
    with pytest.raises(SystemExit, match="no task has train losses of both 'A' and 'Z'"):
        h2h.main([str(run_dir), "--a", "A", "--b", "Z"])


def test_recipe_interval_widens_with_the_spread_between_nets():
    """Nets that agree within their seeds but disagree with each other: with
    the nets fixed the interval is narrow, with them resampled it spans
    their means; one net gives the stratified interval."""
    from benchmarks import head_to_head as h2h

    gen = torch.Generator().manual_seed(1)

    def net(mu: float) -> list[list[float]]:
        return [(mu + 0.05 * torch.randn(50, generator=gen, dtype=torch.float64)).tolist()] * 2

    nets = [net(-0.2), net(0.0), net(0.2)]
    lo, hi = h2h.ratio_interval([tl for n in nets for tl in n])
    rlo, rhi = h2h.recipe_interval(nets)
    assert rlo < lo < 1 < hi < rhi
    assert rlo < math.exp(-0.1) and rhi > math.exp(0.1)
    assert h2h.recipe_interval(nets) == (rlo, rhi)  # seeded
    one = h2h.recipe_interval(nets[:1])
    assert math.log(one[0]) == pytest.approx(math.log(h2h.ratio_interval(nets[0])[0]), abs=0.01)
    assert all(math.isnan(x) for x in h2h.recipe_interval([[[]], []]))
    with pytest.raises(ValueError, match="level must be in"):
        h2h.recipe_interval(nets, level=0.0)


def test_head_to_head_pools_several_pairs_of_nets(tmp_path, capsys):
    """Several --a (one net per meta-training seed) against one --b, or
    paired in order with as many --b: each pair reported, the pairs pooled."""
    from benchmarks import head_to_head as h2h

    # A1 is 0.8 of B's loss on every pair, A2 1.0 (a tie), A3 0.9; B2 is
    # A3's own partner, at A3's loss over 0.5.
    rows = []
    for task in ("t1", "t2"):
        for seed in range(4):
            b = 1.0 + seed
            for opt, loss in (("A1", 0.8 * b), ("A2", b), ("A3", 0.9 * b), ("B", b)):
                rows.append((task, opt, seed, 10, "train", loss))
            rows.append((task, "B2", seed, 10, "train", 1.8 * b))
    r = h2h.pooled_head_to_head(rows, [("A1", "B"), ("A2", "B"), ("A3", "B")], 10)
    assert [e["ratio"] for e in r["per_pair"]] == pytest.approx([0.8, 1.0, 0.9])
    assert (r["wins"], r["losses"], r["pairs"]) == (16, 0, 24)
    assert r["ratio"] == pytest.approx((0.8 * 1.0 * 0.9) ** (1 / 3))
    # Seeds agree within every net: only resampling the nets moves the ratio.
    assert r["ratio_interval"] == pytest.approx((r["ratio"], r["ratio"]))
    lo, hi = r["recipe_interval"]
    assert 0.8 - 1e-9 <= lo < r["ratio"] < hi <= 1.0 + 1e-9
    with pytest.raises(ValueError, match="no pair of nets"):
        h2h.pooled_head_to_head(rows, [], 10)
    run_dir, _ = compare_run(tmp_path / "run", rows)
    out = tmp_path / "pooled.md"
    res = h2h.main(
        [str(run_dir), "--a", "A1", "--a", "A2", "--a", "A3", "--b", "B", "--out", str(out)]
    )
    assert res[1]["ratio"] == pytest.approx(r["ratio"])
    text = out.read_text()
    assert "| A1 | B | 8 | 8 | 0 | 0.800 (0.800-0.800) |" in text
    assert "A lower on 16 of 24, B on 0" in text
    # Paired in order: A3 with its own B2.
    res = h2h.main([str(run_dir), "--a", "A1", "--a", "A3", "--b", "B", "--b", "B2"])
    assert [e["b"] for e in res[1]["per_pair"]] == ["B", "B2"]
    assert res[1]["per_pair"][1]["ratio"] == pytest.approx(0.5)
    capsys.readouterr()
    with pytest.raises(SystemExit, match="--a is given 3 times and --b 2"):
        h2h.main([str(run_dir), "--a", "A1", "--a", "A2", "--a", "A3", "--b", "B", "--b", "B2"])
    with pytest.raises(SystemExit, match="two different optimizers"):
        h2h.main([str(run_dir), "--a", "A1", "--a", "B", "--b", "B"])
    with pytest.raises(SystemExit, match="X is given as another label of both A1 and A2"):
        h2h.main([str(run_dir), "--a", "A1,X", "--a", "A2,X", "--b", "B"])
    with pytest.raises(SystemExit, match="no task has train losses of both 'A9' and 'B'"):
        h2h.main([str(run_dir), "--a", "A1", "--a", "A9", "--b", "B"])
    assert not (tmp_path / "nothing.md").exists()


@pytest.mark.slow
def test_snapshots_ranks_a_runs_nets_on_a_suite(tmp_path):
    import lopt
    from benchmarks import snapshots

    run = tmp_path / "run"
    (run / "snapshots").mkdir(parents=True)
    torch.manual_seed(0)
    # Step 10's net barely moves (lr 1e-7); step 20's is Adam-like at 1e-2.
    lopt.save(lopt.PerParamMLP(lr=1e-7, step_mult=1e-7), run / "snapshots" / "optimizer-000010.pt")
    lopt.save(lopt.PerParamMLP(lr=1e-2), run / "snapshots" / "optimizer-000020.pt")
    (run / "snapshots" / "notes.pt").write_text("not a snapshot")
    assert [lab for lab, _ in snapshots.snapshots(run)] == ["step10", "step20"]
    # The final net of step 30 is listed once, as "final", not also as its snapshot.
    lopt.save(lopt.PerParamMLP(), run / "optimizer.pt", {"outer_steps": 30})
    lopt.save(lopt.PerParamMLP(), run / "snapshots" / "optimizer-000030.pt", {"outer_steps": 30})
    assert [lab for lab, _ in snapshots.snapshots(run)] == ["step10", "step20", "final"]
    assert [lab for lab, _ in snapshots.snapshots(run, every=20)] == ["step20", "final"]
    with pytest.raises(SystemExit, match="--every must be >= 0"):
        snapshots.snapshots(run, every=-1)
    # Up to step 20: the final net (step 30) is left out, its snapshot too.
    assert [lab for lab, _ in snapshots.snapshots(run, max_step=20)] == ["step10", "step20"]
    assert [lab for lab, _ in snapshots.snapshots(run, max_step=30)][-1] == "final"
    with pytest.raises(SystemExit, match="--max-step must be >= 0"):
        snapshots.snapshots(run, max_step=-1)
    (run / "optimizer.pt").unlink()
    (run / "snapshots" / "optimizer-000030.pt").unlink()
    out = tmp_path / "rank"
    args = [str(run), "--suite", "mlp-gmm", "--steps", "20", "--seeds", "1", "--out", str(out)]
    best = snapshots.main(args)
    assert best == run / "snapshots" / "optimizer-000020.pt"
    text = (out / "ranking.md").read_text()
    assert text.index("| step20 |") < text.index("| step10 |")
    assert text.strip().endswith(f"best: {best}")
    # Two runs ranked together, labelled by folder, --set passed to every net.
    other = tmp_path / "other"
    (other / "snapshots").mkdir(parents=True)
    slow = lopt.PerParamMLP(lr=1e-7, step_mult=1e-7)
    lopt.save(slow, other / "snapshots" / "optimizer-000020.pt")
    both = tmp_path / "both"
    args = [str(other), str(run), *args[1:-1], str(both), "--every", "20", "--set", "step_cap=0.5"]
    assert snapshots.main(args) == run / "snapshots" / "optimizer-000020.pt"
    text = (both / "ranking.md").read_text()
    assert text.index("| run-step20 |") < text.index("| other-step20 |")
    assert "step10" not in text
    assert json.loads((both / "meta.json").read_text())["set"] == {"step_cap": 0.5}
    with pytest.raises(SystemExit, match="distinct folder names"):
        snapshots.main([str(run), str(run), "--out", str(both)])

    def entry(ratio, steps):
        return {"normalised": ratio, "steps_to_baseline": steps}

    summary = {
        "per_task": {
            ("A", "x"): entry(0.5, 0.6),
            ("B", "x"): entry(2.0, math.inf),
            ("A", "y"): entry(0.5, 0.5),
            ("B", "y"): entry(math.nan, math.inf),
            # z wins A by a ratio of 1e-4 (a loss near 0): clipped to 0.5, so
            # it does not outweigh its worse task B.
            ("A", "z"): entry(1e-4, 0.4),
            ("B", "z"): entry(1.5, 0.9),
            ("A", "w"): entry(0.8, 0.5),
            ("B", "w"): entry(0.9, 0.8),
        },
        "counts": {k: {"beats@1x": 1, "diverged": 0} for k in "xyzw"},
    }
    assert snapshots.score(summary, "x") == pytest.approx(1.0)
    assert snapshots.score(summary, "y") == math.inf
    assert snapshots.score(summary, "z") == pytest.approx(math.sqrt(0.5 * 1.5))
    assert snapshots.score(summary, "z", clip=None) == pytest.approx(math.sqrt(1e-4 * 1.5))
    assert snapshots.speed(summary, "x") == pytest.approx((0.6 + snapshots.NEVER) / 2)
    assert snapshots.speed(summary, "w") == pytest.approx(0.65)
    # z and w tie on speed, w has the lower clipped ratio; y's NaN puts it last.
    assert [r[0] for r in snapshots.ranking(summary, list("xyzw"))] == ["w", "z", "x", "y"]
    with pytest.raises(SystemExit, match="no snapshots"):
        snapshots.main([str(tmp_path / "empty"), "--out", str(out)])


class _Grow(torch.optim.Optimizer):
    """Multiplies every parameter by 1.01: each step is along the weight."""

    def __init__(self, params):
        super().__init__(params, {})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                p.mul_(1.01)


def test_weight_norms_trace_against_a_naive_run():
    from benchmarks import weight_norms
    from tasks import get_task

    task = get_task("mlp-gmm")
    rows = weight_norms.trace(task, lambda m: _Grow(m.parameters()), steps=20, every=10)
    assert [r["step"] for r in rows] == [0, 10, 20]
    for r in rows[1:]:
        assert r["radial"] == pytest.approx([1.0, 1.0], abs=1e-5)
        assert r["rel_step"] == pytest.approx([0.01, 0.01], rel=1e-3)
        assert r["max_rel_step"] == pytest.approx(0.01, rel=1e-3)
        assert r["norms"] == pytest.approx(
            [n * 1.01 ** r["step"] for n in rows[0]["norms"]], rel=1e-5
        )
    # Adam: the same numbers as a plain loop from the same initialisation and batches.
    make = lambda m: torch.optim.Adam(m.parameters(), lr=1e-2)  # noqa: E731
    rows = weight_norms.trace(task, make, steps=20, every=20)
    model = task.module_with(task.init(torch.Generator().manual_seed(0)))
    opt, batches = make(model), torch.Generator().manual_seed(10_000)
    cos, rel = [], []
    for _ in range(20):
        before = [p.detach().clone() for p in model.parameters() if p.dim() == 2]
        opt.zero_grad()
        task.loss(dict(model.named_parameters()), task.sample_batch(batches)).backward()
        opt.step()
        after = [p.detach() for p in model.parameters() if p.dim() == 2]
        cos.append(
            [
                float((a - b).flatten() @ b.flatten() / ((a - b).norm() * b.norm()))
                for a, b in zip(after, before)
            ]
        )
        rel.append([float((a - b).norm() / b.norm()) for a, b in zip(after, before)])
    assert rows[-1]["norms"] == pytest.approx([p.norm().item() for p in after], rel=1e-6)
    assert rows[-1]["radial"] == pytest.approx(
        [sum(c[i] for c in cos) / 20 for i in range(2)], abs=1e-5
    )
    assert rows[-1]["rel_step"] == pytest.approx(
        [sum(r[i] for r in rel) / 20 for i in range(2)], rel=1e-5
    )
    assert rows[-1]["max_rel_step"] == pytest.approx(max(max(r) for r in rel), rel=1e-5)
    assert rows[-1]["max_rel_step"] > rows[-1]["rel_step"][0]
    with pytest.raises(SystemExit, match="nothing to run"):
        weight_norms.main(["--task", "mlp-gmm", "--adam-lr", "0"])


def test_weight_norms_learned_share_is_the_learned_term_over_adams_part():
    """learned_share: about 0 (rounding) for a net whose learned term vanishes; for a net
    of large learned steps, above 1 without adam_cap and at most adam_cap
    with it; empty for Adam."""
    import lopt
    from benchmarks import weight_norms
    from tasks import get_task

    task = get_task("mlp-gmm")
    torch.manual_seed(0)
    big = lopt.PerParamMLP(out_scale=1.0, step_mult=0.3, lr=1e-3)
    silent = lopt.PerParamMLP(step_mult=1e-30)
    capped = lopt.PerParamMLP(out_scale=1.0, step_mult=0.3, lr=1e-3, adam_cap=0.5)
    capped.load_state_dict(big.state_dict())

    def share(net):
        make = lambda m: lopt.MLPOptimizer(m.parameters(), net=net, model=m)  # noqa: E731
        return weight_norms.trace(task, make, steps=10, every=10)[-1]["learned_share"]

    assert max(share(silent)) < 1e-4  # float32 rounding of w_after - w_before
    assert min(share(big)) > 1.0
    assert all(0.1 < r <= 0.5 * (1 + 1e-4) for r in share(capped))
    adam = lambda m: torch.optim.Adam(m.parameters(), lr=1e-2)  # noqa: E731
    assert weight_norms.trace(task, adam, steps=2, every=2)[-1]["learned_share"] == []


@pytest.mark.slow
def test_compare_first_seed_runs_fresh_seeds(tmp_path):
    import lopt

    torch.manual_seed(0)
    lopt.save(lopt.PerParamMLP(), tmp_path / "net.pt")
    base = ["--quick", "--suite", "mlp-gmm", "--weights", f"a={tmp_path / 'net.pt'}"]
    compare.main([*base, "--out", str(tmp_path / "s0")])
    compare.main([*base, "--first-seed", "7", "--out", str(tmp_path / "s7")])
    s0, s7 = (compare.read_csv(tmp_path / d / "curves.csv") for d in ("s0", "s7"))
    assert {r[2] for r in s0} == {0} and {r[2] for r in s7} == {7}
    # Another initialisation and other batches: other curves, the same first step count.
    assert [r[5] for r in s0 if r[1] == "a"] != [r[5] for r in s7 if r[1] == "a"]
    assert json.loads((tmp_path / "s7" / "meta.json").read_text())["first_seed"] == 7
    # The two as one run of two seeds.
    merged = compare.main(["--merge", str(tmp_path / "s0"), str(tmp_path / "s7"),
                           "--out", str(tmp_path / "m")])  # fmt: skip
    assert {r[2] for r in compare.read_csv(tmp_path / "m" / "curves.csv")} == {0, 7}
    assert merged["optimizers"]
    for bad in (["--first-seed", "-1"], ["--first-seed", "99", "--seeds", "2"]):
        with pytest.raises(SystemExit, match="must lie in 0..99"):
            compare.main([*base, *bad, "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_ortho_hidden_steps_hidden_weights_orthogonally_and_the_rest_by_adam():
    from benchmarks.hand_variants import OrthoHidden
    from lopt import ortho

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 3))
    twin = copy.deepcopy(model)
    opt = OrthoHidden(model, lr=0.01, ortho_lr=0.05)
    hidden = model[2].weight
    others = [p for p in model.parameters() if p is not hidden]
    adam = torch.optim.Adam([p for p in twin.parameters() if p is not twin[2].weight], lr=0.01)
    w, m = twin[2].weight.detach().clone(), torch.zeros_like(hidden)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in model.parameters()]
        for p, q, g in zip(model.parameters(), twin.parameters(), grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        adam.step()
        m = 0.9 * m + 0.1 * grads[2]  # the hidden weight is the third tensor
        w = w - 0.05 * ortho.direction(grads[2], m)
    torch.testing.assert_close(hidden.detach(), w)
    twins = [q for q in twin.parameters() if q is not twin[2].weight]
    for p, q in zip(others, twins):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)


def test_hand_variants_quick_writes_every_variant(tmp_path):
    from benchmarks import hand_variants

    out = tmp_path / "hv"
    args = ["--tasks", "mlp-mnist1d", "--steps", "10", "--seeds", "1", "--tune-seeds", "1"]
    results = hand_variants.main(args + ["--ortho-lrs", "0.02", "--quick", "--out", str(out)])
    rows = results["mlp-mnist1d"]["variants"]
    assert rows["adam"]["normalised"] == 1.0 and rows["adam"]["steps_to_adam"] <= 1.0
    assert "ortho hidden 0.02, adam elsewhere" in rows and "nadam" in rows and len(rows) == 14
    assert all(math.isfinite(v["loss"]) for v in rows.values())
    text = (out / "results.md").read_text()
    assert "ortho hidden 0.02" in text and (out / "results.json").exists()
    for bad, message in ((["--tasks", "nope"], "nope"), (["--ortho-lrs", "-1"], "positive")):
        with pytest.raises((SystemExit, KeyError), match=message):
            hand_variants.main(bad + ["--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_nf_share_measures_the_nf_layers_part_of_the_update(tmp_path, capsys):
    """Against a naive reference (two copies of the net, one with the layer
    off, stepped side by side); 0 with the layer off; linear in nf_scale at
    small scales; the net is left as it was; bad input is refused."""
    from benchmarks import nf_share
    from lopt import functional
    from tasks import get_task

    torch.manual_seed(0)
    net = lopt.NFNNet(width=8, nf_channels=2, nf_scale=0.5, ortho_lr=0.01)
    with torch.no_grad():  # an NF-layer as large as a trained one, not the init's
        for w in net.nf.parameters():
            w.mul_(30)
    before = copy.deepcopy(net.state_dict())
    r = nf_share.nf_share(net, "mlp-gmm", steps=4)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.nf_scale == 0.5

    # The reference: the same steps with three nets.
    off, base = copy.deepcopy(net), copy.deepcopy(net)
    off.nf_scale = base.nf_scale = 0.0
    with torch.no_grad():
        base.log_step_mult.fill_(-math.inf)
    task = get_task("mlp-gmm")
    params = task.init(torch.Generator().manual_seed(0))
    names, ps = list(params), list(params.values())
    batches = torch.Generator().manual_seed(10_000)
    state = functional.init(ps)
    for step in range(4):
        leaves = [p.clone().requires_grad_() for p in ps]
        grads = torch.autograd.grad(
            task.loss(dict(zip(names, leaves)), task.sample_batch(batches)), leaves
        )
        with torch.no_grad():
            u0, _ = functional.update(off, task.spec, None, grads, state, ps)
            b, _ = functional.update(base, task.spec, None, grads, state, ps)
            u, state = functional.update(net, task.spec, None, grads, state, ps)
        d = torch.cat([(x - y).flatten() for x, y in zip(u, u0)]).norm()
        learned = torch.cat([(x - y).flatten() for x, y in zip(u0, b)]).norm()
        assert r["of_update"][step] == pytest.approx(
            (d / torch.cat([x.flatten() for x in u0]).norm()).item(), rel=1e-5
        )
        assert r["of_learned"][step] == pytest.approx((d / learned).item(), rel=1e-5)
        ps = [p + x for p, x in zip(ps, u)]
    assert 0.01 < r["of_update"][0] < r["of_learned"][0]
    assert math.isfinite(r["final_loss"])

    net.nf_scale = 0.0
    assert nf_share.nf_share(net, "mlp-gmm", steps=2)["of_update"] == [0.0, 0.0]
    net.nf_scale = 1e-3
    small = nf_share.nf_share(net, "mlp-gmm", steps=1)["of_update"][0]
    net.nf_scale = 2e-3
    assert nf_share.nf_share(net, "mlp-gmm", steps=1)["of_update"][0] == pytest.approx(
        2 * small, rel=0.02
    )
    with pytest.raises(TypeError, match="PerParamMLP has no NF-layer"):
        nf_share.nf_share(lopt.PerParamMLP(), "mlp-gmm", steps=1)
    with pytest.raises(ValueError, match="steps must be positive"):
        nf_share.nf_share(net, "mlp-gmm", steps=0)

    # The command line: a shipped net, a table and its numbers.
    out = tmp_path / "share"
    res = nf_share.main(
        ["--weights", "v2=nfn-ortho-v2", "--tasks", "mlp-gmm", "--steps", "3", "--every", "2",
         "--out", str(out), "--no-progress"]
    )  # fmt: skip
    assert list(res) == [("v2", "mlp-gmm")]
    text = (out / "nf_share.md").read_text()
    assert "| net | task | step 1 | step 2 | step 3 |" in text and "| v2 | mlp-gmm |" in text
    payload = json.loads((out / "nf_share.json").read_text())
    assert payload["results"][0]["of_update"] == pytest.approx(res[("v2", "mlp-gmm")]["of_update"])
    assert payload["command"].startswith("python -m benchmarks.nf_share --weights v2=nfn-ortho-v2")
    capsys.readouterr()
    bad = tmp_path / "bad"
    with pytest.raises(SystemExit, match="a PerParamMLP, which has no NF-layer"):
        nf_share.main(["--weights", "mlp-ortho", "--out", str(bad)])
    with pytest.raises(SystemExit, match="--weights nope: no optimizer checkpoint 'nope'"):
        nf_share.main(["--weights", "nope", "--out", str(bad)])
    with pytest.raises(SystemExit, match="--steps and --every must be positive"):
        nf_share.main(["--weights", "nfn-ortho-v2", "--steps", "0", "--out", str(bad)])
    assert not bad.exists()


def test_per_step_report_against_a_hand_made_curve():
    from benchmarks.per_step import run_report
    from tasks.runs import Curve

    c = Curve(
        train=[2.1, 1.9, 2.6, 1.0, 0.5],
        eval_steps=[0, 1, 2, 3, 4, 5],
        train_eval=[2.0, 2.0, 1.5, 2.4, 0.9, 0.4],
    )
    r = run_report(c)
    assert r["start"] == 2.0 and r["batch_max_step"] == 3 and r["batch_max"] == pytest.approx(1.3)
    assert r["above"] == [(1, 1.0), (3, pytest.approx(1.2))]  # at the start counts
    assert r["spike"] and r["final"] == 0.4
    c.train[2] = 2.5  # exactly at the margin: not a spike
    assert not run_report(c)["spike"]
    c.train[1] = math.inf  # the runner stores a non-finite loss as inf
    assert run_report(c)["spike"] and run_report(c)["batch_max_step"] == 2


def test_per_step_reruns_runs_with_the_whole_split_every_step(capsys):
    """per_step with --every-step prints, per seed, what a naive rerun of the
    same (task, seed) with the whole split evaluated every step shows; a
    learned net with --set runs too; bad inputs are refused with a message."""
    from benchmarks import per_step
    from tasks import get_task
    from tasks.runs import run

    assert (
        per_step.main(["mlp-gmm", "adam:1", "--seeds", "3", "4", "--steps", "12", "--every-step"])
        == 0
    )
    out = capsys.readouterr().out
    spikes = 0
    for seed in (3, 4):
        c = run(get_task("mlp-gmm"), adam(1.0), 12, seed, eval_every=1)
        spikes += compare.batch_spike(c.train, c.initial_train)
        start = c.initial_train
        above = [(s, v / start) for s, v in zip(c.eval_steps[1:], c.train_eval[1:]) if v >= start]
        top = max(range(12), key=c.train.__getitem__)
        cells = ", ".join(f"{s}: {x:.3f}x" for s, x in above) or "none"
        peak = f"{c.train[top] / start:.3f}x ({top + 1})"
        assert above  # Adam at rate 1 overshoots: the check has steps to find
        row = f"| {seed} | {start:.4f} | {peak} | {cells} | {c.final_train:.4g} |"
        assert row in out
    assert f"runs with a batch-loss spike (above 1.25x the start or not finite): {spikes}/2" in out
    assert per_step.main(["mlp-gmm", "nfn-stats", "--steps", "3", "--set", "nf_scale=0"]) == 0
    assert "nfn-stats on mlp-gmm, 3 steps" in capsys.readouterr().out
    for argv, message in [
        (["mlp-gmm", "adam:fast"], "the rate after adam: must be a number"),
        (["mlp-gmm", "sgdm:-1"], "the rate must be positive"),
        (["mlp-gmm", "adam:0.1", "--set", "step_cap=0.1"], "--set is for learned optimizers"),
        (["mlp-gmz", "adam:0.1"], "unknown task 'mlp-gmz'"),
        (["mlp-gmm", "adam:0.1", "--steps", "0"], "--steps must be positive"),
    ]:
        with pytest.raises(SystemExit, match=message):
            per_step.main(argv)


def test_meta_throughput_reports_vmap_loop_and_the_tasks_share(capsys):
    from benchmarks.meta_throughput import main

    rows = main(
        ["--family", "mlp-gmm", "--populations", "2", "--truncation", "2", "--repeats", "1"]
    )
    (row,) = rows
    assert row["population"] == 2 and row["vmap"] > 0 and row["loop"] > 0
    assert 0 < row["task"] < 1.5  # the task is a part of the outer step (timing noise aside)
    assert "task forward + backward share" in capsys.readouterr().out


def test_budget_sweep_reads_every_run_and_flags_divergence(tmp_path):
    from benchmarks import budgets

    out = tmp_path / "sweep"
    summary = budgets.main(
        ["--weights", "nfn-stats", "--suite", "mlp-gmm", "--budgets", "12", "4", "--out", str(out)]
    )
    assert set(summary) == {("mlp-gmm", 4), ("mlp-gmm", 12)}
    rows = list(csv.DictReader(open(out / "budgets.csv")))
    assert {int(r["step"]) for r in rows if r["budget"] == "4"} == {0, 1, 2, 3, 4}
    text = (out / "results.md").read_text()
    assert "python -m benchmarks.budgets --weights nfn-stats" in text and "| mlp-gmm |" in text
    # A reading at or above the start, or not finite, is a divergence.
    fake = [("t", 5, 0, 1.0), ("t", 5, 1, 0.5), ("t", 5, 2, 1.2), ("u", 5, 0, 1.0),
            ("u", 5, 5, float("nan")), ("v", 5, 0, 1.0), ("v", 5, 5, 0.1)]  # fmt: skip
    s = budgets.summarise(fake)
    assert s[("t", 5)]["diverged"] and s[("u", 5)]["diverged"] and not s[("v", 5)]["diverged"]
    with pytest.raises(SystemExit, match="holds a sweep already"):
        budgets.main(["--weights", "nfn-stats", "--suite", "mlp-gmm", "--out", str(out)])
    with pytest.raises(SystemExit, match="--weights nope"):
        budgets.main(["--weights", "nope", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--budgets must be >= 1"):
        budgets.main(["--weights", "nfn-stats", "--budgets", "0", "--out", str(tmp_path / "y")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_snapshots_rank_on_a_suite_of_step_budgets(tmp_path, monkeypatch):
    """On a suite whose tasks have budgets, the nets run through
    benchmarks.real (told each budget) and rank by speed, then the clipped
    ratio to tuned Adam; --set is refused there."""
    import lopt
    from benchmarks import real, snapshots
    from tasks import SUITES, TASK_STEPS

    monkeypatch.setitem(TASK_STEPS, "mlp-gmm", 20)
    monkeypatch.setitem(SUITES, "budgeted", ["mlp-gmm"])
    monkeypatch.setattr(real, "ADAM_GRID", (1e-2,))
    run = tmp_path / "run"
    (run / "snapshots").mkdir(parents=True)
    torch.manual_seed(0)
    lopt.save(lopt.PerParamMLP(lr=1e-7, step_mult=1e-7), run / "snapshots" / "optimizer-000010.pt")
    lopt.save(lopt.PerParamMLP(lr=1e-2), run / "snapshots" / "optimizer-000020.pt")
    out = tmp_path / "rank"
    best = snapshots.main([str(run), "--suite", "budgeted", "--seeds", "1", "--out", str(out)])
    assert best == run / "snapshots" / "optimizer-000020.pt"
    text = (out / "ranking.md").read_text()
    assert "each task at its step budget" in text
    assert text.index("| step20 |") < text.index("| step10 |")
    assert "python -m benchmarks.real --suite budgeted" in (out / "results.md").read_text()
    with pytest.raises(SystemExit, match="--set does not apply to budgeted"):
        snapshots.main([str(run), "--suite", "budgeted", "--set", "step_cap=0.5",
                        "--out", str(tmp_path / "x")])  # fmt: skip
    assert not (tmp_path / "x").exists()
