"""The README's table of built-in tasks: what per-task tuned Adam reaches.

python -m benchmarks.task_table --steps 500 --seeds 2
"""

from __future__ import annotations

import argparse
import statistics

from tqdm import tqdm

from lopt import cli
from tasks import get_suite, get_task
from tasks.runs import ADAM_GRID, adam, run, tune


def main(argv: list[str] | None = None) -> str:
    p = cli.ArgumentParser(
        prog="python -m benchmarks.task_table",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--suite", default="builtin")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seeds", type=int, default=2)
    args = p.parse_args(argv)
    if args.steps < 1 or args.seeds < 1:
        p.error(f"--steps and --seeds must be whole numbers >= 1, got {args.steps}, {args.seeds}")
    seeds = list(range(args.seeds))
    rows = [
        "| task | data | params | tuned Adam lr | initial loss | final train loss "
        "| final test loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in tqdm(get_suite(args.suite), desc="tasks"):
        task = get_task(name)
        lr, _ = tune(task, adam, args.steps, seeds, ADAM_GRID)
        curves = [run(task, adam(lr), args.steps, s) for s in seeds]
        rows.append(
            f"| {name} | {task.dataset.name} | {task.num_params:,} | {lr:.0e} | "
            f"{statistics.mean(c.initial_train for c in curves):.3f} | "
            f"{statistics.mean(c.final_train for c in curves):.3f} | "
            f"{statistics.mean(c.test_eval[-1] for c in curves):.3f} |"
        )
    table = "\n".join(rows)
    print(table)
    return table


if __name__ == "__main__":
    cli.run(main, "python -m benchmarks.task_table")
