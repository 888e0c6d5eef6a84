"""Inner steps per second of meta-training: vmap over the population against
a Python loop over its members, measured interleaved in one run.

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
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                t.outer_step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[v].append(time.perf_counter() - t0)
        steps = pop * args.truncation
        vm, lp = steps / statistics.median(times[True]), steps / statistics.median(times[False])
        rows.append({"population": pop, "vmap": vm, "loop": lp, "ratio": vm / lp})
    print(f"{args.net} net on {args.family}, truncation {args.truncation}, {device}")
    print("| population | vmap (inner steps/s) | loop (inner steps/s) | vmap / loop |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['population']} | {r['vmap']:.0f} | {r['loop']:.0f} | {r['ratio']:.1f}x |")
    return rows


if __name__ == "__main__":
    cli.run(main, "python -m benchmarks.meta_throughput")
