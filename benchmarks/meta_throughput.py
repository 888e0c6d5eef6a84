"""Inner steps per second of meta-training: vmap over the population against
a Python loop over its members, measured interleaved in one run; and the
share of a vmapped outer step that is the task's own forward and backward
passes (the rest is the learned optimizer's update and the estimator).

    python -m benchmarks.meta_throughput                 # populations 8 and 32, CPU
    python -m benchmarks.meta_throughput --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lopt import cli
from lopt.nets import NFNNet, PerParamMLP
from meta_train import LearnedOptimizerProblem, MetaTrainer, make_estimator
from tasks import get_family


def trainer(
    net_name: str, family: str, trajectories: int, vectorise: bool, truncation: int, device
):
    torch.manual_seed(0)
    net = (NFNNet if net_name == "nfn" else PerParamMLP)().to(device)
    problem = LearnedOptimizerProblem(
        net, get_family(family, device), truncation=truncation, horizon=10_000, vectorise=vectorise
    )
    return MetaTrainer(problem, make_estimator("pes", 0.01), pairs=trajectories // 2)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def task_seconds(t: MetaTrainer, repeats: int, device) -> float:
    """Median seconds of one vmapped forward and backward pass of the task
    over the population's current parameters."""
    u = t.problem.unroller
    xs, ys = u.sample_batches(1, torch.Generator().manual_seed(0))
    grad = torch.func.vmap(torch.func.grad_and_value(u.task.loss), in_dims=(0, None))
    params = t.inner["params"]
    grad(params, (xs[0], ys[0]))  # warm-up
    return statistics.median(
        timed(lambda: grad(params, (xs[0], ys[0])), device) for _ in range(repeats)
    )


def main(argv: list[str] | None = None) -> list[dict]:
    p = cli.ArgumentParser(
        prog="python -m benchmarks.meta_throughput",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--net", choices=["nfn", "mlp"], default="nfn")
    p.add_argument(
        "--family", default="mlp-mnist1d", help="a task or family (default: one fixed task)"
    )
    p.add_argument("--populations", type=int, nargs="+", default=[8, 32])
    p.add_argument("--truncation", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = cli.check_device("--device", args.device)
    try:
        get_family(args.family)
    except KeyError as e:
        p.error(f"--family: {e.args[0]}")
    for flag, values in (("--populations", args.populations), ("--truncation", [args.truncation]),
                         ("--repeats", [args.repeats])):  # fmt: skip
        if min(values) < 1:
            p.error(f"{flag} must be whole numbers >= 1, got {values}")
    rows = []
    for pop in args.populations:
        runs = {
            v: trainer(args.net, args.family, pop, v, args.truncation, device)
            for v in (True, False)
        }
        for t in runs.values():
            t.outer_step()  # warm-up (and the first task)
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for v, t in runs.items():
                times[v].append(timed(t.outer_step, device))
        steps = pop * args.truncation
        outer = statistics.median(times[True])
        vm, lp = steps / outer, steps / statistics.median(times[False])
        share = task_seconds(runs[True], args.repeats, device) * args.truncation / outer
        rows.append({"population": pop, "vmap": vm, "loop": lp, "ratio": vm / lp, "task": share})
    print(f"{args.net} net on {args.family}, truncation {args.truncation}, {device}")
    print(
        "| population | vmap (inner steps/s) | loop (inner steps/s) | vmap / loop "
        "| task forward + backward share (vmap) |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['population']} | {r['vmap']:.0f} | {r['loop']:.0f} | {r['ratio']:.1f}x "
            f"| {r['task']:.0%} |"
        )
    return rows


if __name__ == "__main__":
    cli.run(main, "python -m benchmarks.meta_throughput")
