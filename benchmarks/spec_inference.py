"""What reading a model's weight space costs: ``WeightSpaceSpec.from_module``
from the traced graph against the sequential rule, per named task's model
(it runs once, when an optimizer is built with ``model=``).

    python -m benchmarks.spec_inference --tasks lm-docs-d64h4l3 resnet-digits-32x3-gelu
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

from lopt import WeightSpaceSpec, cli
from lopt.weightspace import GROUP
from tasks import TASKS, get_task

DEFAULT_TASKS = ["mlp-mnist1d-128x2", "resnet-digits-32x3-gelu", "lm-docs-d64h4l3"]


def measure(name: str, repeats: int) -> dict:
    model = get_task(name).model
    times = {}
    for graph in (True, False):
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                spec = WeightSpaceSpec.from_module(model, graph=graph)
            runs.append(time.perf_counter() - t0)
        times[graph] = (statistics.median(runs), spec)
    spec = times[True][1]
    grouped = sum(any(a.kind == GROUP for a in t.axes) for t in spec.tensors)
    return {
        "task": name,
        "tensors": len(spec.tensors),
        "with_groups": grouped,
        "graph_ms": 1000 * times[True][0],
        "sequential_ms": 1000 * times[False][0],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = cli.ArgumentParser(
        prog="python -m benchmarks.spec_inference",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    for name in args.tasks:
        if name not in TASKS:
            p.error(f"--tasks: unknown task {name!r}{cli.did_you_mean(name, TASKS)}")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    rows = [measure(name, args.repeats) for name in args.tasks]
    print("| task | tensors | in a neuron group (graph) | graph (ms) | sequential rule (ms) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['task']} | {r['tensors']} | {r['with_groups']} | {r['graph_ms']:.1f} "
            f"| {r['sequential_ms']:.2f} |"
        )
    return rows


if __name__ == "__main__":
    cli.run(main, "python -m benchmarks.spec_inference")
