"""Loss spikes run by run: one optimizer on one task over seeds, every step.

``benchmarks.compare`` evaluates the whole training split every horizon / 10
steps and counts batch-loss spikes from each step's batch. This reruns
(task, seed) runs from the same initialisations and batches, optionally
with the whole training split evaluated at *every* step, and prints per run
the highest batch loss over the start (and its step), the steps whose
whole-split loss is at or above the start, and the final loss::

    python -m benchmarks.per_step cnn-digits-wide nfn-stats --seeds 8 --steps 40 --every-step
    python -m benchmarks.per_step mlp-digits-wide adam:0.1 --seeds 5 6 7 8 --steps 60 --every-step
    python -m benchmarks.per_step cnn-digits-wide nfn-stats --seeds $(seq 5 24) --set nf_scale=0

The optimizer is a learned net (a shipped name or checkpoint path, with
``--set`` overrides as in ``compare``) or ``adam:LR`` / ``sgdm:LR``.
"""

from __future__ import annotations

import argparse
import math
import sys

from tqdm import tqdm

from benchmarks.compare import SPIKE_MARGIN, batch_spike, learned, parse_overrides
from lopt import cli
from tasks import get_task
from tasks.runs import Curve, MakeOptimizer, adam, run, sgdm


def optimizer_factory(spec: str, overrides: dict[str, float]) -> tuple[str, MakeOptimizer]:
    """A label and factory for ``adam:LR``, ``sgdm:LR`` or learned weights."""
    kind, sep, lr = spec.partition(":")
    if sep and kind in ("adam", "sgdm"):
        try:
            rate = float(lr)
        except ValueError:
            raise SystemExit(f"{spec}: the rate after {kind}: must be a number") from None
        if not rate > 0:
            raise SystemExit(f"{spec}: the rate must be positive")
        if overrides:
            raise SystemExit("--set is for learned optimizers, not adam / sgdm")
        return spec, (adam if kind == "adam" else sgdm)(rate)
    return learned(spec, overrides)


def run_report(curve: Curve) -> dict:
    """What a run shows of spikes: the highest batch loss over the start and
    its step, the evaluated steps (after 0) at or above the start with
    their ratio, whether a batch loss spiked (``compare``'s rule), and the
    final whole-split loss."""
    start = curve.initial_train
    top = max(range(len(curve.train)), key=curve.train.__getitem__)  # runner maps NaN to inf
    above = [
        (step, loss / start)
        for step, loss in zip(curve.eval_steps[1:], curve.train_eval[1:])
        if not loss < start
    ]
    return {
        "start": start,
        "batch_max": curve.train[top] / start,
        "batch_max_step": top + 1,
        "spike": batch_spike(curve.train, start),
        "above": above,
        "final": curve.final_train,
    }


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(
        prog="python -m benchmarks.per_step",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("task", help="a task name (python -m tasks list)")
    p.add_argument("optimizer", help="a shipped name, a checkpoint path, adam:LR or sgdm:LR")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument(
        "--every-step",
        action="store_true",
        help="evaluate the whole training split at every step (slower), not only at the end",
    )
    p.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE", help="as in compare")
    args = p.parse_args(argv)
    if args.steps < 1:
        raise SystemExit(f"--steps must be positive, got {args.steps}")
    try:
        task = get_task(args.task)
    except KeyError as e:
        raise SystemExit(e.args[0]) from None
    label, make = optimizer_factory(args.optimizer, parse_overrides(args.set))
    print(f"{label} on {args.task}, {args.steps} steps")
    print(
        "| seed | start | highest batch loss / start (step) "
        "| whole-split at or above start | final |"
    )
    print("|---|---|---|---|---|")
    reports = []
    for seed in tqdm(args.seeds, desc="seeds", file=sys.stderr):
        curve = run(task, make, args.steps, seed, eval_every=1 if args.every_step else args.steps)
        r = run_report(curve)
        reports.append(r)
        above = ", ".join(f"{s}: {x:.3f}x" for s, x in r["above"][:12]) or "none"
        if len(r["above"]) > 12:
            above += f" (+{len(r['above']) - 12} more)"
        tqdm.write(
            f"| {seed} | {r['start']:.4f} | {r['batch_max']:.3f}x ({r['batch_max_step']}) "
            f"| {above} | {r['final']:.4g} |"
        )
    finals = [r["final"] for r in reports]
    gmean = (
        math.exp(sum(math.log(f) for f in finals) / len(finals))
        if all(f > 0 and math.isfinite(f) for f in finals)
        else math.nan
    )
    spikes = sum(r["spike"] for r in reports)
    print(
        f"\nruns with a batch-loss spike (above {SPIKE_MARGIN}x the start or not finite): "
        f"{spikes}/{len(reports)}; geometric mean of the final loss: {gmean:.4g}"
    )
    return 0


if __name__ == "__main__":
    cli.run(main, "python -m benchmarks.per_step")
