"""Learned optimizers against per-task tuned Adam (and tuned SGD with momentum).

    python -m benchmarks.compare --suite heldout --steps 200 --seeds 3 \\
        --weights nfn-real mlp-real --out runs/compare
    python -m benchmarks.compare --quick --out /tmp/compare        # < 1 minute

For every task of the suite: Adam and SGD with momentum 0.9 have their
learning rate tuned per task on a log grid (1e-4 .. 1e-1, 7 points; the pick
minimises the mean final training loss over the tuning seeds at the horizon);
then every optimizer runs from the same initialisations on the same batches
for 5x the horizon (the horizon is the meta-training horizon the learned
optimizers are judged at; 2x and 5x show generalisation in time).

Writes to --out: ``curves.csv`` (every loss of every run), ``results.md``
(tables: per task, summary), ``meta.json`` (grids, picks, timings, command),
``curves.png`` (loss curves per task) and ``summary.png`` (normalised loss per
task). The summary is computed from ``curves.csv`` alone
(:func:`summarise`), so ``python -m benchmarks.compare --from-csv`` can redo it.

To compare a new checkpoint with baselines already measured, ``--baselines-from
DIR`` copies tuned Adam / SGDm from an earlier run's folder (same horizon,
factors, seeds, grid, device and torch; checked) instead of tuning them again,
which is most of a run's time:

    python -m benchmarks.compare --suite heldout --steps 200 --seeds 3 \\
        --weights new=runs/nfn/optimizer.pt --baselines-from runs/compare --out runs/compare-new
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

import lopt
from benchmarks.figures import loss_curves, pyplot
from lopt import cli
from lopt.nets import schedule_prior
from tasks import get_suite, get_task
from tasks.runs import ADAM_GRID, adam, run, sgdm, tune

FACTORS = (1, 2, 5)
QUICK_GRID = (1e-3, 1e-2, 1e-1)
FIRST_TUNE_SEED = 100  # tuning runs seeds 100, 101, ...: never a benchmark seed (0..99)
# A batch-loss spike: a step's batch loss above SPIKE_MARGIN times the run's
# initial (whole-split) loss. The whole-split loss is evaluated every
# horizon / 10 steps and misses spikes of a few steps; the margin keeps the
# first steps' batch-to-batch noise around the start from counting.
SPIKE_MARGIN = 1.25


def weights_label(weights: str) -> tuple[str, str]:
    """``(label, path)`` of ``[LABEL=]WEIGHTS``; the default label is the
    file's stem, or its folder's name for meta_train's ``DIR/optimizer.pt``."""
    label, _, path = weights.rpartition("=")
    if not label:
        p = Path(path)
        label = p.parent.name if p.stem == "optimizer" and p.parent.name else p.stem
    return label, path


def learned(weights: str, overrides: dict[str, float] | None = None) -> tuple[str, callable]:
    """A label and an optimizer factory for ``[LABEL=]WEIGHTS`` (a shipped
    name or a checkpoint path). The default label is the file's stem, or its
    folder's name for meta_train's ``DIR/optimizer.pt``. ``overrides`` set
    scalar meta-parameters (``fan_in_exp``, ``log_lr``, ``log_step_mult``) to
    other values, an ablation of one learned number, or scale an NFN net's
    NF-layer output (``nf_scale=0``: the per-entry path alone, an ablation of
    what the NF-layer adds)."""
    label, path = weights_label(weights)
    net, _ = cli.load_weights("--weights", path)
    apply_overrides(net, overrides or {}, label)
    return label, optimizer_for(net)


def optimizer_for(net: lopt.OptimizerNet, total_steps: int | None = None):
    """An optimizer factory, ``model -> optimizer``, that steps ``model`` with
    ``net`` (an NFNOptimizer for an NFN net, an MLPOptimizer otherwise),
    told ``total_steps``."""
    cls = lopt.NFNOptimizer if isinstance(net, lopt.NFNNet) else lopt.MLPOptimizer
    return lambda model: cls(model.parameters(), net=net, model=model, total_steps=total_steps)


def scalar_parameters(net: lopt.OptimizerNet) -> dict[str, torch.Tensor]:
    """The net's learned scalars (one-entry parameters) by name: what
    ``--set`` here and ``update_scale --on`` can name."""
    return {n: t for n, t in net.named_parameters() if t.numel() == 1}


# A schedule's decay reads the budget features, all zero without total_steps.
NO_DECAY_HERE = (
    "--set decay_width: {where} without total_steps, where a learned schedule has no "
    "decay to move; {fix}"
)


def apply_overrides(net: lopt.OptimizerNet, overrides: dict[str, float], label: str) -> None:
    """Set ``net``'s scalar meta-parameters (or an NFN's ``nf_scale``) as
    ``--set`` asks; ``decay_width=W`` moves a budget net's learned schedule
    onto a decay of width W (:func:`~lopt.nets.schedule_prior`: the prior's
    part is swapped, what meta-training added to it kept), to measure what
    an earlier or later anneal does. ``SystemExit`` naming what ``label``'s
    net has instead."""
    scalars = scalar_parameters(net)
    for name, value in overrides.items():
        if name == "nf_scale" and isinstance(net, lopt.NFNNet):
            net.nf_scale = value
            continue
        if name == "decay_width":
            if not net.reads_budget:
                raise SystemExit(
                    f"--set decay_width: {label}'s net has no learned schedule "
                    "(it was built without a step budget)"
                )
            try:
                moved = schedule_prior(value)[0] - schedule_prior()[0]
            except ValueError as e:
                raise SystemExit(f"--set decay_width: {e}") from None
            with torch.no_grad():
                net.schedule.weight.add_(moved)
            continue
        if name not in scalars:
            settable = sorted(scalars) + (["nf_scale"] if isinstance(net, lopt.NFNNet) else [])
            settable += ["decay_width"] if net.reads_budget else []
            raise SystemExit(
                f"--set {name}: {label} has no scalar meta-parameter {name!r} "
                f"(it has {', '.join(settable)})"
            )
        with torch.no_grad():
            scalars[name].fill_(value)


def learned_all(
    specs: list[str], overrides: dict[str, float] | None = None
) -> list[tuple[str, callable]]:
    out = [learned(w, overrides) for w in specs]
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels) or {"adam", "sgdm"} & set(labels):
        raise SystemExit(
            f"--weights: labels must be unique and not adam/sgdm, got {labels} "
            "(name them: --weights nfn=PATH mlp=PATH)"
        )
    return out


def parse_overrides(items: list[str]) -> dict[str, float]:
    """``NAME=VALUE`` strings (``--set``) as a dict."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise SystemExit(f"--set {item!r}: expected NAME=NUMBER, e.g. fan_in_exp=0.9")
    return out


def untrained(kind: str) -> tuple[str, callable]:
    torch.manual_seed(0)
    net = lopt.NFNNet() if kind == "nfn" else lopt.PerParamMLP()
    cls = lopt.NFNOptimizer if kind == "nfn" else lopt.MLPOptimizer
    return f"{kind}-untrained", lambda model: cls(model.parameters(), net=net, model=model)


# -------------------------------------------------------------------- runs
def run_task(name, optimizers, steps, seeds, grid, tune_seeds, factors, device, reuse=None):
    """Tune the baselines, run everything; returns (csv rows, meta). ``reuse``:
    (rows, meta) of the tuned baselines from an earlier run (see
    :func:`load_baselines`), which are then neither tuned nor run again."""
    task = get_task(name, device)
    total = steps * max(factors)
    eval_every = max(1, steps // 10)
    meta = {"params": task.num_params, "grid": list(grid), "seconds_per_step": {}}
    makers = dict(optimizers)
    rows = []
    if reuse is not None:
        rows, old = list(reuse[0]), reuse[1]
        for label in BASELINES:
            for key in (f"{label}_lr", f"{label}_grid_scores"):
                meta[key] = old[key]
            meta["seconds_per_step"][label] = old["seconds_per_step"][label]
    else:
        for label, family in (("adam", adam), ("sgdm", sgdm)):
            best, scores = tune(task, family, steps, tune_seeds, grid)
            meta[f"{label}_lr"] = best
            meta[f"{label}_grid_scores"] = {f"{lr:.0e}": s for lr, s in scores.items()}
            makers = {f"{label}": family(best), **makers}
    for label, make in makers.items():
        per_step = []
        for seed in seeds:
            curve = run(task, make, total, seed, eval_every)
            per_step.append(curve.seconds_per_step)
            for i, loss in enumerate(curve.train, start=1):
                rows.append((name, label, seed, i, "batch", loss))
            for s, tr, te in zip(curve.eval_steps, curve.train_eval, curve.test_eval):
                rows.append((name, label, seed, s, "train", tr))
                rows.append((name, label, seed, s, "test", te))
        meta["seconds_per_step"][label] = statistics.median(per_step)
    return rows, meta


CSV_HEADER = ("task", "optimizer", "seed", "step", "split", "loss")
BASELINES = ("adam", "sgdm")


def read_run(folder: Path, option: str) -> tuple[list[tuple], dict]:
    """(curves.csv rows, meta.json) of a compare run's folder; SystemExit
    naming ``option`` if either cannot be read."""
    try:
        meta = json.loads((Path(folder) / "meta.json").read_text())
        return read_csv(Path(folder) / "curves.csv"), meta
    except (OSError, ValueError) as e:
        raise SystemExit(f"{option} {folder}: cannot read its meta.json / curves.csv: {e}") from e


def same_loss(a: float, b: float) -> bool:
    """Equal, with a diverged (NaN) point equal to another NaN."""
    return a == b or (math.isnan(a) and math.isnan(b))


def merge_runs(folders: list[Path], common_factors: bool = False) -> tuple[list[tuple], dict]:
    """The rows and meta of several compare runs as one run, e.g. checkpoints
    each run with ``--baselines-from`` the same folder. Settings must match,
    and a curve in more than one run (the shared baselines) must be the same
    in each, else this raises SystemExit saying where. ``common_factors``:
    runs may have other multiples of the horizon (e.g. a ``--factors 1`` run
    on more seeds), and the merged meta keeps those all of them have."""
    rows: dict[tuple, float] = {}
    meta: dict = {}
    keys = (
        ("horizon", "device", "torch")
        if common_factors
        else ("horizon", "factors", "device", "torch")
    )
    for folder in map(Path, folders):
        r, m = read_run(folder, "--merge")
        if not meta:
            meta = {k: v for k, v in m.items() if k != "tasks"} | {"tasks": {}}
            meta["command"] = "merged from " + ", ".join(map(str, folders))
        for key in keys:
            if m.get(key) != meta.get(key):
                raise SystemExit(f"--merge {folder}: {key} {m.get(key)} != {meta.get(key)}")
        if common_factors:
            meta["factors"] = [f for f in meta["factors"] if f in m.get("factors", [])]
        for *key, loss in r:
            key = tuple(key)
            if key in rows and not same_loss(rows[key], loss):
                raise SystemExit(f"--merge {folder}: {key} differs from an earlier run's")
            rows[key] = loss
        for task, tm in m.get("tasks", {}).items():
            merged = meta["tasks"].setdefault(task, dict(tm))
            merged["seconds_per_step"] = merged["seconds_per_step"] | tm["seconds_per_step"]
    return [(*k, v) for k, v in rows.items()], meta


def load_baselines(
    folder: Path, *, steps: int, factors, seeds, tune_seeds, grid, device: str
) -> dict[str, tuple[list[tuple], dict]]:
    """Per task, the tuned Adam / SGDm rows and meta of an earlier compare run
    in ``folder``, for reuse: a learned optimizer's new checkpoint is then
    compared with the very same baseline curves, without retuning (the
    baselines are deterministic given the seeds, so rerunning them gives the
    same numbers). Settings that change the baselines must match, else this
    raises SystemExit saying which; a task whose baseline runs lack a seed is
    left out (and run afresh)."""
    folder = Path(folder)
    rows, old = read_run(folder, "--baselines-from")
    want = {
        "horizon": steps,
        "factors": sorted(set(factors)),
        "device": str(device),
        "torch": str(torch.__version__),
        "tune_seeds": len(tune_seeds),
    }
    have = {k: old.get(k) for k in want}
    have["factors"] = sorted(set(have["factors"] or []))
    # Runs from before tune_seeds was recorded used the default, 2.
    have["tune_seeds"] = old.get("tune_seeds", 2)
    diff = [f"{k}: {have[k]} there, {v} here" for k, v in want.items() if have[k] != v]
    if diff:
        raise SystemExit(f"--baselines-from {folder}: settings differ ({'; '.join(diff)})")
    by_task: dict[str, list[tuple]] = defaultdict(list)
    for r in rows:
        if r[1] in BASELINES and r[2] in seeds:
            by_task[r[0]].append(r)
    out = {}
    for task, task_meta in old.get("tasks", {}).items():
        if [float(x) for x in task_meta.get("grid", [])] != [float(x) for x in grid]:
            raise SystemExit(f"--baselines-from {folder}: {task} was tuned on another grid")
        have_seeds = {(r[1], r[2]) for r in by_task.get(task, [])}
        if have_seeds == {(b, s) for b in BASELINES for s in seeds}:
            out[task] = (by_task[task], task_meta)
    return out


def write_csv(rows, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_HEADER)
        w.writerows(rows)


def read_csv(path: Path) -> list[tuple]:
    with open(path, newline="") as f:
        r = csv.reader(f)
        header = tuple(next(r))
        if header != CSV_HEADER:
            raise ValueError(f"{path}: expected columns {CSV_HEADER}, got {header}")
        return [(t, o, int(s), int(st), sp, float(loss)) for t, o, s, st, sp, loss in r]


# ----------------------------------------------------------------- summary
def steps_to_reach(curve: dict[int, float], target: float) -> float:
    """The first evaluated step (after the start) from which ``curve`` (step
    -> loss) stays at or below ``target`` to its end; ``inf`` if its last
    evaluation is above it. A run that dips below and climbs back (a learned
    optimizer near loss 0 can swing by orders of magnitude) has not reached
    the target at the dip: counting the first crossing ranks an oscillating
    run above a steady one that ends lower."""
    reached = math.inf
    for step in sorted(curve, reverse=True):
        if step <= 0 or not curve[step] <= target:
            break
        reached = step
    return reached


def summarise(rows, horizon: int, factors=FACTORS, baseline: str = "adam") -> dict:
    """Per task and optimizer, from the ``train`` rows (whole-split training
    loss, averaged over seeds): the loss at each multiple of the horizon, the
    loss normalised by the baseline's (learned_optimization's convention:
    below 1 beats it), the steps to reach the baseline's loss at the horizon
    and stay there (:func:`steps_to_reach`) as a fraction of the horizon,
    whether the run diverged (non-finite, or above its initial loss) and, per
    seed, its highest loss after the start over its initial loss (``peak``:
    the worst seed; ``runs_above_start``) and how many seeds end at or above
    it (``runs_end_above_start``); from the ``batch`` rows (every step), how
    many seeds have a batch-loss spike (:func:`batch_spike`,
    ``runs_batch_spike``). Then, per optimizer, on how many tasks it beats the
    baseline at each multiple."""
    curves: dict = defaultdict(lambda: defaultdict(list))
    runs: dict = defaultdict(dict)  # (task, opt, seed) -> {step: loss}
    batches: dict = defaultdict(dict)
    for task, opt, seed, step, split, loss in rows:
        if split == "train":
            curves[(task, opt)][step].append(loss)
            runs[(task, opt, seed)][step] = loss
        elif split == "batch":
            batches[(task, opt, seed)][step] = loss
    spikes: dict = defaultdict(int)
    for (task, opt, seed), c in batches.items():
        start = runs.get((task, opt, seed), {}).get(0)
        if start is not None:
            spikes[(task, opt)] += batch_spike([c[s] for s in sorted(c)], start)
    # The bar's "stays finite and below its initial value", read strictly: per
    # seed, every evaluated loss after the start (the seed-mean curve and the
    # end point hide a spike that one seed recovers from).
    peaks: dict = defaultdict(list)
    ends: dict = defaultdict(list)  # per seed: whether it ends at or above its start
    for (task, opt, _seed), c in runs.items():
        steps = sorted(c)
        later = [c[s] for s in steps[1:]]
        if not later:  # a run evaluated at its start only
            continue
        if not all(math.isfinite(v) for v in later):
            peaks[(task, opt)].append(math.inf)
            ends[(task, opt)].append(True)
            continue
        start, top = c[steps[0]], max(later)
        peaks[(task, opt)].append(top / start if start > 0 else (math.inf if top > 0 else 1.0))
        ends[(task, opt)].append(later[-1] >= start)
    mean = {k: {s: statistics.fmean(v) for s, v in sorted(c.items())} for k, c in curves.items()}
    tasks = sorted({t for t, _ in mean})
    opts = sorted({o for _, o in mean})
    per_task = {}
    for task in tasks:
        if (task, baseline) not in mean:
            raise ValueError(f"task {task!r} has no {baseline!r} runs to compare with")
        base = mean[(task, baseline)]
        for opt in opts:
            c = mean.get((task, opt))
            if c is None:
                continue
            entry = {}
            for f in factors:
                s = horizon * f
                if s in c and s in base:
                    entry[f"loss@{f}x"] = c[s]
                    entry[f"beats@{f}x"] = c[s] < base[s]
            target = base.get(horizon, math.nan)
            entry["normalised"] = c.get(horizon, math.nan) / target if target else math.nan
            entry["steps_to_baseline"] = steps_to_reach(c, target) / horizon
            values = list(c.values())
            entry["diverged"] = (not all(math.isfinite(v) for v in values)) or values[-1] >= values[
                0
            ]
            entry["peak"] = max(peaks[(task, opt)], default=0.0)
            entry["runs_above_start"] = sum(p >= 1 for p in peaks[(task, opt)])
            entry["runs_end_above_start"] = sum(ends[(task, opt)])
            entry["runs_batch_spike"] = spikes[(task, opt)]
            entry["runs"] = len(peaks[(task, opt)])
            per_task[(task, opt)] = entry
    counts = {}
    for opt in opts:
        if opt == baseline:
            continue
        entries = [per_task[(t, opt)] for t in tasks if (t, opt) in per_task]
        counts[opt] = {
            f"beats@{f}x": sum(e.get(f"beats@{f}x", False) for e in entries) for f in factors
        }
        counts[opt]["tasks"] = len(entries)
        steps = [e["steps_to_baseline"] for e in entries]
        counts[opt]["median_steps_to_baseline"] = statistics.median(steps) if steps else math.nan
        counts[opt]["diverged"] = sum(e["diverged"] for e in entries)
        counts[opt]["runs_above_start"] = sum(e["runs_above_start"] for e in entries)
        counts[opt]["runs_end_above_start"] = sum(e["runs_end_above_start"] for e in entries)
        counts[opt]["runs_batch_spike"] = sum(e["runs_batch_spike"] for e in entries)
        counts[opt]["runs"] = sum(e["runs"] for e in entries)
    return {"tasks": tasks, "optimizers": opts, "per_task": per_task, "counts": counts}


def batch_spike(losses: list[float], start: float) -> bool:
    """Whether a run's batch losses spike: one is above ``SPIKE_MARGIN *
    start`` or not finite."""
    return any(not (v <= SPIKE_MARGIN * start) for v in losses)


def markdown(summary: dict, meta: dict, factors=FACTORS) -> str:
    lines = ["## Per task", ""]
    head = "| task | optimizer | " + " | ".join(f"loss @{f}x" for f in factors)
    lines += [
        head + " | normalised @1x | steps to Adam @1x | diverged | peak / start |",
        "|" + "---|" * (len(factors) + 6),
    ]
    for (task, opt), e in summary["per_task"].items():
        losses = " | ".join(f"{e.get(f'loss@{f}x', math.nan):.4f}" for f in factors)
        lines.append(
            f"| {task} | {opt} | {losses} | {e['normalised']:.3f} | "
            f"{steps_text(e['steps_to_baseline'])} | {'yes' if e['diverged'] else 'no'} | "
            f"{e['peak']:.3f} |"
        )
    lines += ["", "## Summary: tasks where each optimizer beats tuned Adam", ""]
    lines += [
        "| optimizer | "
        + " | ".join(f"@{f}x" for f in factors)
        + " | median steps to Adam's loss | diverged | runs ever at or above their start"
        + " | runs ending at or above it | runs with a batch-loss spike |",
        "|" + "---|" * (len(factors) + 6),
    ]
    for opt, c in summary["counts"].items():
        beats = " | ".join(f"{c[f'beats@{f}x']}/{c['tasks']}" for f in factors)
        lines.append(
            f"| {opt} | {beats} | {steps_text(c['median_steps_to_baseline'])} | {c['diverged']} | "
            f"{c['runs_above_start']}/{c['runs']} | {c['runs_end_above_start']}/{c['runs']} | "
            f"{c['runs_batch_spike']}/{c['runs']} |"
        )
    lines += [
        "",
        "diverged: tasks whose seed-mean loss is not finite or ends at or above its start; "
        "peak / start: the highest loss after step 0 over the initial loss, the worst seed "
        "(inf: not finite); runs ever at or above their start: (task, seed) runs with such a "
        "loss at any evaluated step up to the last multiple; runs ending at or above it: "
        "(task, seed) runs whose last loss is at or above the start, or that went non-finite; "
        f"runs with a batch-loss spike: (task, seed) runs with a batch loss above "
        f"{SPIKE_MARGIN:g}x the start, or not finite, at any step (the whole-split loss is "
        "evaluated every horizon / 10 steps and misses spikes of a few steps).",
    ]
    if meta.get("tasks"):
        lines += [
            "",
            "## Tuned baselines and cost",
            "",
            "| task | params | Adam lr | SGDm lr | ms / step ("
            + ", ".join(summary["optimizers"])
            + ") |",
            "|---|---|---|---|---|",
        ]
        for task, m in meta["tasks"].items():
            ms = ", ".join(
                f"{1e3 * m['seconds_per_step'].get(o, math.nan):.1f}" for o in summary["optimizers"]
            )
            lines.append(
                f"| {task} | {m['params']:,} | {m['adam_lr']:.0e} | {m['sgdm_lr']:.0e} | {ms} |"
            )
    return "\n".join(lines) + "\n"


def steps_text(fraction: float) -> str:
    """A fraction of a run's steps as a table cell: ``0.75x``, or ``never``."""
    return "never" if math.isinf(fraction) else f"{fraction:.2f}x"


def figures(rows, summary: dict, horizon: int, out: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    tasks = summary["tasks"]
    curves: dict = defaultdict(lambda: defaultdict(list))
    for task, opt, _, step, split, loss in rows:
        if split == "train":
            curves[(task, opt)][step].append(loss)
    marks = dict.fromkeys(tasks, horizon)
    loss_curves(curves, tasks, summary["optimizers"], out / "curves.png", marks)

    learned_opts = [o for o in summary["optimizers"] if o != "adam"]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(tasks)), 3.5))
    width = 0.8 / max(1, len(learned_opts))
    for i, opt in enumerate(learned_opts):
        vals = [summary["per_task"].get((t, opt), {}).get("normalised", math.nan) for t in tasks]
        ax.bar([j + i * width for j in range(len(tasks))], vals, width, label=opt)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))])
    ax.set_xticklabels(tasks, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("final loss / tuned Adam's (@1x)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> dict:
    p = cli.ArgumentParser(
        prog="python -m benchmarks.compare",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--suite", default="heldout", help="a suite or a task name (heldout)")
    p.add_argument("--steps", type=int, default=None, help="the horizon (meta-training's; 200)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="run seeds FIRST .. FIRST + SEEDS - 1 (0): fresh seeds, to confirm on new "
        "initialisations and batches a net picked after runs on the first ones",
    )
    p.add_argument("--tune-seeds", type=int, default=2)
    p.add_argument(
        "--weights",
        nargs="*",
        default=None,
        help="learned optimizers: shipped names or checkpoint paths "
        "(default: untrained NFN and MLP nets)",
    )
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="ablation: set a scalar meta-parameter of every learned net "
        "(fan_in_exp, log_lr, log_step_mult) or scale an NFN net's NF-layer "
        "output (nf_scale=0: its per-entry path alone) before running",
    )
    p.add_argument("--factors", type=int, nargs="+", default=list(FACTORS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("runs/compare"))
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI size: quick suite, 50 steps, 1 seed, 3-point grid, 1x and 2x",
    )
    p.add_argument(
        "--from-csv", action="store_true", help="only redo the summary from --out/curves.csv"
    )
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="write the union of these runs' curves (identical where they overlap) to --out "
        "and summarise it",
    )
    p.add_argument(
        "--baselines-from",
        type=Path,
        default=None,
        metavar="DIR",
        help="reuse tuned Adam / SGDm from an earlier run's --out folder (same steps, "
        "factors, seeds, device and torch) instead of tuning and running them again",
    )
    args = p.parse_args(argv)
    cli.check_device("--device", args.device)
    if args.quick and args.steps is not None:
        raise SystemExit("--quick runs 50 steps: drop --steps, or drop --quick")
    if args.steps is None:
        args.steps = 200
    counts = [("--steps", args.steps), ("--seeds", args.seeds), ("--tune-seeds", args.tune_seeds)]
    for flag, value in counts + [("--factors", f) for f in args.factors]:
        if value < 1:
            raise SystemExit(f"{flag} must be a whole number >= 1, got {value}")
    if not (args.merge or args.from_csv):
        try:
            get_suite("quick" if args.quick else args.suite)
        except KeyError as e:
            raise SystemExit(f"--suite: {e.args[0]}") from None
    overrides = parse_overrides(args.set)
    if overrides and not args.weights:
        raise SystemExit("--set changes learned nets: give them with --weights")
    if "decay_width" in overrides:
        raise SystemExit(
            NO_DECAY_HERE.format(
                where="benchmarks.compare runs the learned optimizers",
                fix="use benchmarks.real, which tells them each run's length",
            )
        )
    if args.first_seed < 0 or args.first_seed + args.seeds > 100:
        raise SystemExit(
            f"--first-seed {args.first_seed} --seeds {args.seeds}: the seeds run must lie in "
            "0..99 (from 100 on they tune Adam and SGDm's learning rates)"
        )
    if args.weights and not (args.merge or args.from_csv):
        learned_all(args.weights, overrides)  # a bad name or file is reported before any write
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    grid = ADAM_GRID
    if args.quick:
        args.suite, args.steps, args.seeds, args.tune_seeds = "quick", 50, 1, 1
        args.factors, grid = [1, 2], QUICK_GRID
    factors = tuple(sorted(set(args.factors) | {1}))
    if args.merge:
        rows, meta = merge_runs(args.merge)
        factors = tuple(meta["factors"])
        write_csv(rows, out / "curves.csv")
        (out / "meta.json").write_text(json.dumps(meta, indent=2))
    elif args.from_csv:
        rows = read_csv(out / "curves.csv")
        meta = json.loads((out / "meta.json").read_text())
        factors = tuple(meta["factors"])
    else:
        optimizers = (
            learned_all(args.weights, overrides)
            if args.weights
            else [untrained("nfn"), untrained("mlp")]
        )
        rows, meta = (
            [],
            {
                "command": "python -m benchmarks.compare "
                + " ".join(argv if argv is not None else sys.argv[1:]),
                "date": time.strftime("%Y-%m-%d"),
                "device": args.device,
                "torch": str(torch.__version__),
                "horizon": args.steps,
                "factors": list(factors),
                "seeds": args.seeds,
                "first_seed": args.first_seed,
                "set": overrides,
                "tune_seeds": args.tune_seeds,
                "tasks": {},
            },
        )
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        tune_seeds = list(range(FIRST_TUNE_SEED, FIRST_TUNE_SEED + args.tune_seeds))
        reuse = {}
        if args.baselines_from is not None:
            reuse = load_baselines(
                args.baselines_from,
                steps=args.steps,
                factors=factors,
                seeds=seeds,
                tune_seeds=tune_seeds,
                grid=grid,
                device=args.device,
            )
            meta["baselines_from"] = str(args.baselines_from)
            meta["baselines_reused"] = sorted(reuse)
        for name in tqdm(get_suite(args.suite), desc="tasks"):
            if args.baselines_from is not None and name not in reuse:
                tqdm.write(f"{name}: no reusable baselines in {args.baselines_from}; tuning them")
            task_rows, task_meta = run_task(
                name,
                optimizers,
                args.steps,
                seeds,
                grid,
                tune_seeds,
                factors,
                args.device,
                reuse.get(name),
            )
            rows += task_rows
            meta["tasks"][name] = task_meta
        write_csv(rows, out / "curves.csv")
        (out / "meta.json").write_text(json.dumps(meta, indent=2))
    summary = summarise(rows, meta["horizon"], factors)
    text = markdown(summary, meta, factors)
    (out / "results.md").write_text(text)
    figures(rows, summary, meta["horizon"], out)
    print(text)
    return summary


if __name__ == "__main__":
    cli.run(main, "python -m benchmarks.compare")
