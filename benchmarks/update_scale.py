"""How a learned optimizer's final loss moves with one factor on its whole
update, or on one of its learned scalars.

    python -m benchmarks.update_scale --weights nfn-real --out runs/depth-lm
    python -m benchmarks.update_scale --suite validation-lm --weights runs/x/optimizer.pt \\
        --scales 0.5 1 2 --out runs/scale-x
    python -m benchmarks.update_scale --suite validation-lm --weights runs/x/optimizer.pt \\
        --on ortho_weight --scales 0.5 1 2 --out runs/ortho-x

Every task of the suite (``depth-lm`` by default: one transformer LM at 1 to 4
layers) runs at its step budget (``tasks.TASK_STEPS``; ``--steps`` overrides
it), told that budget (``total_steps``), once per seed and per factor of
``--scales``: the net's Adam rate and its learned term's multiplier are both
multiplied by the factor (``log_lr`` and ``log_step_mult`` shifted by its
log), so its whole update is. ``--on NAME`` multiplies one learned scalar of
the net instead (a one-entry parameter such as ``ortho_weight``), to see where its
value stands among its neighbours. A net whose best factor on a task is 1 takes the
step that task wants; a best factor that moves with an architecture's size
(depth, width) shows what the net does not see of it. It is a diagnostic, not
a tuned baseline: a factor chosen by looking at a suite is tuned on that suite.

All runs of a seed start from the same initialisation and see the same
batches. Writes ``results.csv`` (task, scale, seed, final loss of the whole
training split; inf for a run that diverged) and ``results.md`` (the table,
with the command, machine and date) to --out.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import lopt
from benchmarks.compare import optimizer_for, scalar_parameters, weights_label
from lopt import cli
from tasks import TASK_STEPS, get_suite, get_task
from tasks.runs import run

DEFAULT_SCALES = (0.5, 0.7, 1.0, 1.4)


def scaled(net: lopt.OptimizerNet, factor: float) -> lopt.OptimizerNet:
    """A copy of ``net`` whose every update is ``factor`` times ``net``'s."""
    out = copy.deepcopy(net)
    with torch.no_grad():
        out.log_lr.add_(math.log(factor))
        out.log_step_mult.add_(math.log(factor))
    return out


def scalar_scaled(net: lopt.OptimizerNet, name: str, factor: float) -> lopt.OptimizerNet:
    """A copy of ``net`` whose learned scalar ``name`` is ``factor`` times ``net``'s."""
    out = copy.deepcopy(net)
    with torch.no_grad():
        out.get_parameter(name).mul_(factor)
    return out


def final_losses(
    net: lopt.OptimizerNet, task_name: str, steps: int, scales, seeds, on: str | None = None
) -> list[tuple[float, int, float]]:
    """``(scale, seed, final training loss)`` of every run on one task, the
    factor on the whole update (or, given ``on``, on that learned scalar)."""
    task = get_task(task_name)
    rows = []
    for s in scales:
        make = optimizer_for(scaled(net, s) if on is None else scalar_scaled(net, on, s), steps)
        for seed in seeds:
            rows.append((s, seed, run(task, make, steps, seed).final_train))
    return rows


def markdown(rows, meta: dict) -> str:
    scales = meta["scales"]
    lines = [
        f"`{meta['command']}`",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['date']}; "
        f"seeds {meta['seeds']}; {meta['weights']} told each run's budget (total_steps)",
        "",
        "Final training loss (whole split, mean over seeds) with "
        + (
            f"the learned `{meta['on']}` ({meta['on_value']:.4g})"
            if meta.get("on")
            else "the whole update"
        )
        + " times each factor; in brackets, over the loss at factor 1 (where 1 is among "
        "them); * the best factor of the task.",
        "",
        "| task | steps | " + " | ".join(f"x{s:g}" for s in scales) + " | best factor |",
        "|---|---|" + "---|" * (len(scales) + 1),
    ]
    for task, steps in meta["tasks"].items():
        means = []
        for s in scales:
            losses = [r[3] for r in rows if r[0] == task and r[1] == s]
            means.append(sum(losses) / len(losses))
        ref = means[scales.index(1.0)] if 1.0 in scales else None
        best = min(range(len(scales)), key=lambda i: means[i])
        cells = []
        for i, m in enumerate(means):
            cell = f"{m:.4g}" if math.isfinite(m) else "diverged"
            if ref is not None and math.isfinite(m) and math.isfinite(ref) and ref > 0:
                cell += f" ({m / ref:.2f})"
            cells.append(cell + (" *" if i == best else ""))
        lines.append(f"| {task} | {steps} | " + " | ".join(cells) + f" | {scales[best]:g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = cli.ArgumentParser(
        prog="python -m benchmarks.update_scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--suite", default="depth-lm", help="a suite of tasks (depth-lm)")
    p.add_argument("--weights", required=True, metavar="[LABEL=]WEIGHTS")
    p.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=list(DEFAULT_SCALES),
        help="factors on the whole update (0.5 0.7 1 1.4)",
    )
    p.add_argument(
        "--on",
        metavar="NAME",
        default=None,
        help="multiply this learned scalar of the net (e.g. ortho_weight) instead of the "
        "whole update",
    )
    p.add_argument("--seeds", type=int, default=2, help="seeds, from 0 (2)")
    p.add_argument("--steps", type=int, default=None, help="every task's run length (its budget)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    bad = [s for s in args.scales if not (math.isfinite(s) and s > 0)]
    if bad:
        p.error(f"--scales must be positive and finite, got {bad[0]:g}")
    if len(set(args.scales)) != len(args.scales):
        p.error("--scales: each factor once")
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    try:
        names = get_suite(args.suite)
    except KeyError as e:
        p.error(f"--suite: {e.args[0]}")
    if args.steps is None:
        missing = [n for n in names if n not in TASK_STEPS]
        if missing:
            p.error(f"--suite {args.suite}: no step budget for {', '.join(missing)} (give --steps)")
    if (args.out / "results.csv").exists():
        p.error(f"--out {args.out} holds a run already: pick another")
    label, path = weights_label(args.weights)
    net, _ = cli.load_weights("--weights", path)
    scalars = scalar_parameters(net)
    if args.on is not None and args.on not in scalars:
        p.error(f"--on: {label} has no learned scalar {args.on!r} (it has {', '.join(scalars)})")
    scales = sorted(args.scales)
    seeds = list(range(args.seeds))
    meta = {
        "command": "python -m benchmarks.update_scale "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, cpu",
        "torch": str(torch.__version__),
        "seeds": args.seeds,
        "weights": label,
        "scales": scales,
        "on": args.on,
        "on_value": None if args.on is None else scalars[args.on].item(),
        "tasks": {n: args.steps or TASK_STEPS[n] for n in names},
    }
    rows = []
    for name in tqdm(names, desc="tasks"):
        steps = meta["tasks"][name]
        rows += [(name, *r) for r in final_losses(net, name, steps, scales, seeds, args.on)]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "scale", "seed", "final_loss"])
        w.writerows(rows)
    page = markdown(rows, meta)
    (args.out / "results.md").write_text(page)
    print(page)
    return page


if __name__ == "__main__":
    cli.run(main, "python -m benchmarks.update_scale")
