"""Whether a learned optimizer stays stable at every run length: each task of
a suite trained from the same initialisation at several step budgets (the
optimizer told each one as ``total_steps``, or not told with
``--hide-budget``), the loss on the whole training split read 20 times per
run. A run *diverges* when any reading is not finite or not below the
starting loss.

    python -m benchmarks.budgets --weights nfn-real --budgets 100 1000 10000 \\
        --out docs/results/budgets-shipped

Writes ``budgets.csv`` (every reading) and ``results.md`` (final loss over
the starting loss, and diverged runs, per task and budget; with the command,
machine and date) to --out.
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.real import learned
from lopt import cli
from tasks import SUITES, TASKS, get_suite, get_task
from tasks.runs import run

DEFAULT_BUDGETS = (100, 300, 1000, 3000, 10000)
READINGS = 20  # loss readings per run


def sweep(weights: str, names: list[str], budgets: list[int], seed: int, hide: bool):
    """``(task, budget, step, loss)`` rows of every run."""
    rows = []
    for name in tqdm(names, desc="tasks"):
        task = get_task(name)
        for budget in tqdm(budgets, desc=name, leave=False):
            _, make = learned(weights, None if hide else budget)
            curve = run(task, make, budget, seed, eval_every=max(1, budget // READINGS))
            rows += [(name, budget, s, v) for s, v in zip(curve.eval_steps, curve.train_eval)]
    return rows


def summarise(rows) -> dict:
    """Per (task, budget): final loss over the starting loss, and whether
    any reading was not finite or not below the start."""
    out: dict = {}
    for task, budget, step, loss in rows:
        entry = out.setdefault((task, budget), {"start": None, "final": None, "diverged": False})
        if step == 0:
            entry["start"] = loss
            continue
        entry["final"] = loss
        bad = not math.isfinite(loss) or (entry["start"] is not None and loss >= entry["start"])
        entry["diverged"] |= bad
    return out


def markdown(summary: dict, names: list[str], budgets: list[int], meta: dict) -> str:
    lines = [
        f"`{meta['command']}`",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['date']}; seed {meta['seed']}; "
        + ("not told the budget" if meta["hide_budget"] else "told the budget (total_steps)"),
        "",
        "Final training loss over the starting loss, per task and step budget; "
        "**diverged** where a reading was not finite or not below the start.",
        "",
        "| task | " + " | ".join(f"{b} steps" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for name in names:
        cells = []
        for b in budgets:
            e = summary[(name, b)]
            ratio = e["final"] / e["start"] if e["start"] else float("nan")
            cells.append(f"{ratio:.3g}" + (" **diverged**" if e["diverged"] else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    n_bad = sum(e["diverged"] for e in summary.values())
    lines += ["", f"Diverged: {n_bad} of {len(summary)} runs.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = cli.ArgumentParser(
        prog="python -m benchmarks.budgets",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--weights", required=True, help="a shipped name or a checkpoint ([LABEL=]PATH)")
    p.add_argument("--suite", default="real", help="a suite or a task name (real)")
    p.add_argument("--budgets", type=int, nargs="+", default=list(DEFAULT_BUDGETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hide-budget", action="store_true", help="do not tell total_steps")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.suite in SUITES:
        names = list(get_suite(args.suite))
    elif args.suite in TASKS:
        names = [args.suite]
    else:
        known = [*SUITES, *TASKS]
        hint = cli.did_you_mean(args.suite, known)
        p.error(f"--suite: unknown suite or task {args.suite!r}{hint}")
    if any(b < 1 for b in args.budgets):
        p.error(f"--budgets must be >= 1, got {args.budgets}")
    learned(args.weights, None)  # a bad --weights is refused before anything runs
    if (args.out / "budgets.csv").exists():
        p.error(f"--out {args.out} holds a sweep already: pick another folder")
    budgets = sorted(set(args.budgets))
    rows = sweep(args.weights, names, budgets, args.seed, args.hide_budget)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "budgets.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "budget", "step", "loss"])
        w.writerows(rows)
    meta = {
        "command": "python -m benchmarks.budgets "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "seed": args.seed,
        "hide_budget": args.hide_budget,
    }
    summary = summarise(rows)
    text = markdown(summary, names, budgets, meta)
    (args.out / "results.md").write_text(text)
    print(text)
    return summary


if __name__ == "__main__":
    cli.run(main, "python -m benchmarks.budgets")
