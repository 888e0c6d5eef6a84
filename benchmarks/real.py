"""Learned optimizers against tuned Adam on the real suite: each task at its
own step budget.

    python -m benchmarks.real --weights nfn-real --seeds 2 --out runs/real
    python -m benchmarks.real --suite validation-real --weights nfn=runs/x/optimizer.pt
    python -m benchmarks.real --suite validation-real --weights s900=runs/x/snapshots/... \\
        --baselines-from runs/val-base --out runs/val-s900   # reuse tuned Adam, AdamW

Every task of the suite (``tasks.TASK_STEPS`` gives its run length) runs:
- Adam at a constant learning rate and Adam with cosine decay to 0 over the
  run, each with its rate tuned on the 7-point log grid (1e-4 .. 1e-1) on
  separate tuning seeds; the tuned Adam of a task is the better of the two
  (lower mean final loss on the benchmark seeds, which favours Adam);
- AdamW at its defaults (rate 1e-3, weight decay 1e-2);
- every learned optimizer of ``--weights``, told the run's length
  (``total_steps``) and each step's loss; ``--hide-budget`` runs them
  without the run's length, ``--hide-loss`` without the loss (a loop that
  calls ``step()`` alone), to measure how a net that reads them does when a
  user does not give them.

``--budget-fraction F`` gives the learned optimizers a shorter run, F of each
task's steps, told that budget, against tuned Adam over all of them: a
budget-aware optimizer anneals in the last part of whatever run it is told,
so the steps it needs to reach Adam's final loss are measured by its final
loss on the shorter run (``--budget-fraction 0.7``: does it reach tuned
Adam's loss in 0.7x of Adam's steps).

All runs of a seed start from the same initialisation and see the same
batches. The loss is the whole training split's, every budget / 20 steps.
Writes ``curves.csv``, ``meta.json``, ``results.md`` (the tables, with the
command, machine and date) and ``curves.png`` to --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.compare import (
    NO_DECAY_HERE,
    apply_overrides,
    optimizer_for,
    parse_overrides,
    steps_text,
    steps_to_reach,
    weights_label,
)
from benchmarks.figures import loss_curves
from lopt import cli
from tasks import TASK_STEPS, get_suite, get_task
from tasks.runs import ADAM_GRID, Curve, adam, cosine, run, tune

FIRST_TUNE_SEED = 100  # tuning seeds are never benchmark seeds (0..99)
ADAM_KINDS = ("adam-constant", "adam-cosine")
TUNED = "adam-tuned"  # the better of the two, per task


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters())


def learned(weights: str, total_steps: int | None, overrides: dict[str, float] | None = None):
    """A label and an optimizer factory for ``[LABEL=]WEIGHTS``, told
    ``total_steps``, with ``overrides`` (``--set``) applied to its net."""
    label, path = weights_label(weights)
    net, _ = cli.load_weights("--weights", path)
    apply_overrides(net, overrides or {}, label)
    return label, optimizer_for(net, total_steps)


BASELINES = (*ADAM_KINDS, "adamw")
# Where in a run the per-task table reads each learned optimizer's loss: one
# that reaches tuned Adam's final loss in this fraction of the steps is
# below 1 there.
PART = 0.7
# Final losses below this count as equal to it in the ratios: float32
# cross-entropy rounds to exactly 0 once every example is fitted (a ratio of
# 0, or 0 / 0), and differences below it say nothing of the optimizer.
LOSS_FLOOR = 1e-8


def run_task(
    name: str,
    weights: list[str],
    seeds,
    tune_seeds,
    hide_budget: bool,
    device: str,
    baselines: tuple[list, dict] | None = None,
    overrides: dict[str, float] | None = None,
    budget_fraction: float = 1.0,
    hide_loss: bool = False,
):
    """Tune Adam's two schedules, run everything; returns (csv rows, meta).
    ``baselines`` (rows and meta of this task from an earlier run with the
    same seeds) replaces the tuning and the baselines' runs; the learned
    optimizers run ``budget_fraction`` of the task's steps, told the loss
    unless ``hide_loss``."""
    task = get_task(name, device)
    steps = TASK_STEPS[name]
    learned_steps = max(1, round(budget_fraction * steps))
    eval_every = max(1, steps // 20)
    meta: dict = {"params": task.num_params, "steps": steps}
    runs: dict[str, tuple] = {}  # label -> (make_optimizer, schedule, steps)
    total = 0 if baselines else len(ADAM_KINDS) * len(ADAM_GRID) * len(tune_seeds)
    total += (0 if baselines else len(BASELINES) * len(seeds)) + len(weights) * len(seeds)
    bar = tqdm(total=total, desc=f"{name} ({steps} steps)", unit="run", leave=False)
    rows = []
    if baselines:
        old_rows, old_meta = baselines
        rows = [r for r in old_rows if r[1] in BASELINES]
        meta.update({k: v for k, v in old_meta.items() if k.startswith(ADAM_KINDS)})
    else:
        for label, schedule in zip(ADAM_KINDS, (None, cosine)):
            best, scores = tune(
                task, adam, steps, tune_seeds, ADAM_GRID, schedule, on_run=lambda: bar.update()
            )
            meta[f"{label}_lr"] = best
            meta[f"{label}_grid_scores"] = {f"{lr:.0e}": s for lr, s in scores.items()}
            runs[label] = (adam(best), schedule, steps)
        runs["adamw"] = (adamw, None, steps)
    for w in weights:
        label, make = learned(w, None if hide_budget else learned_steps, overrides)
        runs[label] = (make, None, learned_steps)
    for label, (make, schedule, length) in runs.items():
        for seed in seeds:
            # run tells only learned optimizers the loss: Adam never sees it.
            curve: Curve = run(task, make, length, seed, eval_every, schedule, not hide_loss)
            bar.update()
            for s, tr in zip(curve.eval_steps, curve.train_eval):
                rows.append((name, label, seed, s, tr))
    bar.close()
    return rows, meta


def summarise(rows) -> dict:
    """Per task: its steps (the last evaluated step of tuned Adam's
    seed-mean curve), each optimizer's mean final loss over seeds, the tuned
    Adam (the better schedule), each learned optimizer's ratio to it, the steps it
    needs to reach tuned Adam's final loss and stay there (fraction of the
    budget, from the evaluated points of the seed-mean curve:
    :func:`benchmarks.compare.steps_to_reach`), its loss at ``PART`` of the
    run over tuned Adam's final loss (where it stands when it would need to
    have reached it to make the ``PART`` mark) and whether any seed diverged
    (an evaluated loss not finite or not below its start). Then, per learned
    optimizer, over tasks: beats, worst and geometric-mean ratio, median
    steps fraction, divergences. Final losses below ``LOSS_FLOOR`` count as
    ``LOSS_FLOOR`` in the ratios."""
    curves: dict = defaultdict(lambda: defaultdict(list))
    per_seed: dict = defaultdict(dict)
    for task, opt, seed, step, loss in rows:
        curves[(task, opt)][step].append(loss)
        per_seed[(task, opt, seed)][step] = loss
    mean = {k: {s: statistics.fmean(v) for s, v in sorted(c.items())} for k, c in curves.items()}
    diverged: dict = defaultdict(bool)
    for (task, opt, _), c in per_seed.items():
        values = [c[s] for s in sorted(c)]
        bad = any(not math.isfinite(v) or v >= values[0] for v in values[1:])
        diverged[(task, opt)] |= bad
    tasks = sorted({t for t, _ in mean})
    others = sorted({o for _, o in mean} - set(ADAM_KINDS))
    per_task = {}
    for task in tasks:
        finals = {o: mean[(task, o)][max(mean[(task, o)])] for t, o in mean if t == task}
        tuned = min(ADAM_KINDS, key=lambda k: finals.get(k, math.inf))
        target, steps = finals[tuned], max(mean[(task, tuned)])
        entry = {
            "tuned": tuned,
            "steps": steps,
            "final": finals,
            "ratio": {},
            "steps_to_adam": {},
            "at_part": {},
        }
        entry["adam_at_part"] = _at_part(mean[(task, tuned)], steps, target)
        for opt in others:
            if opt not in finals:
                continue
            entry["ratio"][opt] = max(finals[opt], LOSS_FLOOR) / max(target, LOSS_FLOOR)
            entry["steps_to_adam"][opt] = steps_to_reach(mean[(task, opt)], target) / steps
            entry["at_part"][opt] = _at_part(mean[(task, opt)], steps, target)
            entry.setdefault("diverged", {})[opt] = diverged[(task, opt)]
        per_task[task] = entry
    counts = {}
    for opt in others:
        ratios = [per_task[t]["ratio"][opt] for t in tasks if opt in per_task[t]["ratio"]]
        fracs = [per_task[t]["steps_to_adam"][opt] for t in tasks if opt in per_task[t]["ratio"]]
        counts[opt] = {
            "beats": sum(r < 1 for r in ratios),
            "tasks": len(ratios),
            "worst_ratio": max(ratios, default=math.nan),
            "geomean_ratio": math.exp(statistics.fmean(math.log(r) for r in ratios))
            if ratios and all(0 < r < math.inf for r in ratios)
            else math.nan,
            "median_steps_to_adam": statistics.median(fracs) if fracs else math.nan,
            "diverged": sum(
                per_task[t]["diverged"][opt] for t in tasks if opt in per_task[t]["ratio"]
            ),
        }
    return {"tasks": tasks, "optimizers": others, "per_task": per_task, "counts": counts}


def _at_part(curve: dict, steps: int, target: float) -> float:
    """A seed-mean curve's loss at its last evaluation within ``PART`` of
    ``steps``, over ``target`` (NaN when that is 0)."""
    loss = curve[max(s for s in curve if s <= PART * steps)]
    return loss / target if target > 0 else math.nan


def figure(rows, summary: dict, path: Path) -> None:
    """Every task's loss curves, tuned Adam's two schedules among them."""
    curves: dict = defaultdict(lambda: defaultdict(list))
    for task, opt, _, step, loss in rows:
        curves[(task, opt)][step].append(loss)
    loss_curves(curves, summary["tasks"], [*ADAM_KINDS, *summary["optimizers"]], path)


def markdown(summary: dict, meta: dict) -> str:
    fraction = meta.get("budget_fraction", 1.0)
    told = "not told the budget" if meta["hide_budget"] else "told the budget (total_steps)"
    if fraction != 1:
        told = f"run for {fraction:g} of each task's steps, " + (
            "not told it" if meta["hide_budget"] else "told that budget (total_steps)"
        )
    if meta.get("hide_loss"):
        told += ", not told the loss"
    lines = [
        f"`{meta['command']}`",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['date']}; "
        f"seeds {meta['seeds']}; learned optimizers {told}",
        "",
        "Final training loss (whole split, mean over seeds); in brackets, over tuned Adam's "
        "final loss after all of the task's steps.",
        "",
    ]
    opts = summary["optimizers"]
    lines.append("| task | steps | " + " | ".join([*ADAM_KINDS, *opts]) + " |")
    lines.append("|---|---|" + "---|" * (len(ADAM_KINDS) + len(opts)))
    for task in summary["tasks"]:
        e = summary["per_task"][task]
        cells = []
        for o in ADAM_KINDS:
            lr = meta["tasks"][task][f"{o}_lr"]
            mark = " *" if o == e["tuned"] else ""
            cells.append(f"{e['final'][o]:.4g} (lr {lr:.0e}){mark}")
        for o in opts:
            div = ", diverged" if e["diverged"][o] else ""
            cells.append(f"{e['final'][o]:.4g} ({e['ratio'][o]:.2f}{div})")
        lines.append(f"| {task} | {meta['tasks'][task]['steps']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "\\* the tuned Adam of the task.",
        "",
        "| optimizer | beats tuned Adam | worst ratio | geometric-mean ratio "
        "| median steps to Adam's final loss | diverged |",
        "|---|---|---|---|---|---|",
    ]
    for o, c in summary["counts"].items():
        lines.append(
            f"| {o} | {c['beats']}/{c['tasks']} | {c['worst_ratio']:.2f} | "
            f"{c['geomean_ratio']:.2f} | {steps_text(c['median_steps_to_adam'])} | "
            f"{c['diverged']} |"
        )
    lines += [
        "",
        "Per task: the steps each learned optimizer needs to reach tuned Adam's final loss "
        f"and stay at or below it (fraction of the task's steps), and its loss at {PART:g} "
        "of them over tuned Adam's final loss (seed means).",
        "",
        f"| task | tuned Adam: loss at {PART:g} | "
        + " | ".join(f"{o}: steps | {o}: loss at {PART:g}" for o in opts)
        + " |",
        "|---|---|" + "---|---|" * len(opts),
    ]
    for task in summary["tasks"]:
        e = summary["per_task"][task]
        cells = [f"{e['adam_at_part']:.3g}"]
        cells += [f"{steps_text(e['steps_to_adam'][o])} | {e['at_part'][o]:.3g}" for o in opts]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = cli.ArgumentParser(
        prog="python -m benchmarks.real",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--suite", default="real", help="a suite of tasks with budgets (real)")
    p.add_argument("--weights", nargs="*", default=[], metavar="[LABEL=]WEIGHTS")
    p.add_argument("--seeds", type=int, default=2, help="benchmark seeds, from 0 (2)")
    p.add_argument("--tune-seeds", type=int, default=1, help="seeds that tune Adam's rates (1)")
    p.add_argument("--hide-budget", action="store_true", help="do not tell total_steps")
    p.add_argument(
        "--hide-loss",
        action="store_true",
        help="do not tell the learned optimizers each step's loss (call step() alone)",
    )
    p.add_argument(
        "--budget-fraction",
        type=float,
        default=1.0,
        metavar="F",
        help="run the learned optimizers for F (in (0, 1]) of each task's steps, told that "
        "budget, against tuned Adam over all of them (1)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--resume",
        action="store_true",
        help="carry on a run in --out that stopped: the tasks it finished are kept",
    )
    p.add_argument(
        "--from-csv",
        action="store_true",
        help="only redo the tables and figure from --out's curves.csv and meta.json",
    )
    p.add_argument(
        "--baselines-from",
        type=Path,
        default=None,
        metavar="DIR",
        help="copy tuned Adam and AdamW from an earlier run of the same tasks and seeds "
        "(most of a run's time) instead of running them again",
    )
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="ablation, as in benchmarks.compare: set a scalar meta-parameter of every "
        "learned net (fan_in_exp, log_lr, log_step_mult), scale an NFN net's NF-layer "
        "and neuron-statistics output (nf_scale=0: its per-entry path alone) or move "
        "the learned schedule's anneal (decay_width=0.1 later, 1 earlier; 0.3 as trained)",
    )
    args = p.parse_args(argv)
    if args.from_csv:
        return write_page(*read_out(args.out, "--from-csv"), args.out)
    cli.check_device("--device", args.device)
    overrides = parse_overrides(args.set)
    if overrides and not args.weights:
        p.error("--set is for learned optimizers: give them with --weights")
    if "decay_width" in overrides and args.hide_budget:
        p.error(
            NO_DECAY_HERE.format(
                where="--hide-budget runs the learned optimizers", fix="drop --hide-budget"
            )
        )
    for w in args.weights:
        learned(w, None, overrides)  # a bad name, file or --set is reported before anything runs
    if not 1 <= args.seeds <= 100:
        p.error(f"--seeds must be in 1..100, got {args.seeds}")
    if not 0 < args.budget_fraction <= 1:
        p.error(f"--budget-fraction must be in (0, 1], got {args.budget_fraction}")
    if args.tune_seeds < 1:
        p.error(f"--tune-seeds must be >= 1, got {args.tune_seeds}")
    try:
        names = get_suite(args.suite)
    except KeyError as e:
        p.error(str(e.args[0]))
    missing = [n for n in names if n not in TASK_STEPS]
    if missing:
        p.error(f"--suite {args.suite}: no step budget for {', '.join(missing)}")
    settings = {
        "suite": args.suite,
        "weights": args.weights,
        "seeds": args.seeds,
        "tune_seeds": args.tune_seeds,
        "hide_budget": args.hide_budget,
        "hide_loss": args.hide_loss,
        "budget_fraction": args.budget_fraction,
        "device": args.device,
        "baselines_from": None if args.baselines_from is None else str(args.baselines_from),
        "set": overrides,
    }
    base_rows, base_meta = ([], {})
    if args.baselines_from is not None:
        base_rows, base_meta = read_out(args.baselines_from, "--baselines-from")
        theirs = base_meta.get("settings", {})
        for key in ("seeds", "tune_seeds", "device"):
            if theirs.get(key) != settings[key]:
                p.error(
                    f"--baselines-from {args.baselines_from}: ran with {key} "
                    f"{theirs.get(key)!r}, this run {settings[key]!r}"
                )
        missing = [n for n in names if n not in base_meta.get("tasks", {})]
        if missing:
            p.error(f"--baselines-from {args.baselines_from}: no runs of {', '.join(missing)}")
    rows: list = []
    meta: dict = {
        "command": "python -m benchmarks.real "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {args.device}",
        "torch": str(torch.__version__),
        "seeds": args.seeds,
        "hide_budget": args.hide_budget,
        "hide_loss": args.hide_loss,
        "budget_fraction": args.budget_fraction,
        "settings": settings,
        "tasks": {},
    }
    if args.resume:
        rows, meta = read_out(args.out, "--resume")
        before = {"baselines_from": None, "set": {}, "budget_fraction": 1.0, "hide_loss": False}
        if {**before, **meta.get("settings", {})} != settings:
            p.error(f"--resume: {args.out} was run with other settings: {meta.get('settings')}")
    elif (args.out / "curves.csv").exists():
        p.error(f"--out {args.out} holds a run already: --resume carries it on, or pick another")
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    tune_seeds = list(range(FIRST_TUNE_SEED, FIRST_TUNE_SEED + args.tune_seeds))
    for name in tqdm([n for n in names if n not in meta["tasks"]], desc="tasks"):
        baselines = None
        if args.baselines_from is not None:
            task_base = [r for r in base_rows if r[0] == name]
            baselines = (task_base, base_meta["tasks"][name])
        task_rows, meta["tasks"][name] = run_task(
            name,
            args.weights,
            seeds,
            tune_seeds,
            args.hide_budget,
            args.device,
            baselines,
            overrides,
            args.budget_fraction,
            args.hide_loss,
        )
        rows += task_rows
        write_out(rows, meta, args.out)  # each finished task is kept
    return write_page(rows, meta, args.out)


def write_out(rows, meta: dict, out: Path) -> None:
    """``curves.csv`` and ``meta.json``, each replaced whole (never half written)."""
    tmp = out / ".curves.csv.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("task", "optimizer", "seed", "step", "loss"))
        w.writerows(rows)
    tmp.replace(out / "curves.csv")
    tmp = out / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(out / "meta.json")


def read_out(out: Path, flag: str) -> tuple[list, dict]:
    """The rows and meta of a run in ``out``; ``SystemExit`` naming ``flag``."""
    try:
        meta = json.loads((out / "meta.json").read_text())
        with (out / "curves.csv").open() as f:
            body = list(csv.reader(f))[1:]
        rows = [(t, o, int(s), int(k), float(v)) for t, o, s, k, v in body]
    except (OSError, ValueError) as e:
        raise SystemExit(f"{flag}: cannot read {out}'s meta.json / curves.csv: {e}") from None
    done = set(meta.get("tasks", {}))
    return [r for r in rows if r[0] in done], meta


def write_page(rows, meta: dict, out: Path) -> dict:
    """``results.md`` and ``curves.png`` in ``out``, from the runs' rows."""
    summary = summarise(rows)
    text = markdown(summary, meta) + "\n![loss curves](curves.png)\n"
    (out / "results.md").write_text(text)
    figure(rows, summary, out / "curves.png")
    print(text)
    return summary


if __name__ == "__main__":
    cli.run(main, "python -m benchmarks.real")
