"""How far apart the seeds of a ``benchmarks.real`` page are on its speed measure.

A page's "steps to Adam's final loss" reads each optimizer's seed-mean curve.
This reads the same ``curves.csv`` and gives, per task and learned
optimizer, the steps each seed alone needs to reach that same target (tuned
Adam's seed-mean final loss) and stay at or below it, as fractions of the
task's steps, then each seed's median over tasks. A difference between two
nets' medians smaller than the spread between seeds of one net is not yet a
difference:

    python -m benchmarks.seed_spread docs/results/real docs/results/validation-broad
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from benchmarks.compare import steps_text, steps_to_reach
from benchmarks.real import read_out, summarise


def seed_steps(rows) -> dict:
    """``{optimizer: {task: {seed: fraction}}}`` for every optimizer in
    ``rows`` (``benchmarks.real``'s (task, optimizer, seed, step, loss))
    other than tuned Adam's two schedules, each fraction the steps that
    seed needs to reach tuned Adam's seed-mean final loss and stay there
    (:func:`benchmarks.compare.steps_to_reach`) over the task's steps;
    ``inf`` where it never does."""
    summary = summarise(rows)
    runs: dict = defaultdict(dict)
    for task, opt, seed, step, loss in rows:
        runs[(task, opt, seed)][step] = loss
    out: dict = defaultdict(dict)
    for (task, opt, seed), curve in sorted(runs.items()):
        if opt not in summary["optimizers"]:
            continue
        entry = summary["per_task"][task]
        target = entry["final"][entry["tuned"]]
        out[opt].setdefault(task, {})[seed] = steps_to_reach(curve, target) / entry["steps"]
    return dict(out)


def seed_medians(per_task: dict) -> dict[int, float]:
    """Each seed's median over tasks of one optimizer's fractions."""
    seeds = sorted({s for by_seed in per_task.values() for s in by_seed})
    return {
        s: statistics.median(by_seed[s] for by_seed in per_task.values() if s in by_seed)
        for s in seeds
    }


def table(folder: Path) -> str:
    """The markdown table of one ``benchmarks.real`` output folder."""
    rows, _ = read_out(folder, str(folder))
    spread = seed_steps(rows)
    if not spread:
        raise SystemExit(f"{folder}: no optimizer besides tuned Adam in its curves.csv")
    lines = [f"`{folder}`: steps to tuned Adam's final loss, per seed", ""]
    for opt, per_task in spread.items():
        medians = seed_medians(per_task)
        seeds = list(medians)
        lines += [f"| {opt} | " + " | ".join(f"seed {s}" for s in seeds) + " |"]
        lines += ["|---" * (len(seeds) + 1) + "|"]
        for task, by_seed in per_task.items():
            cells = [steps_text(by_seed[s]) if s in by_seed else "" for s in seeds]
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        lines.append("| median | " + " | ".join(steps_text(medians[s]) for s in seeds) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.seed_spread",
        description="Per-seed steps to tuned Adam's final loss on benchmarks.real pages",
    )
    p.add_argument("folders", type=Path, nargs="+", help="benchmarks.real --out folders")
    args = p.parse_args(argv)
    for folder in args.folders:
        print(table(folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
