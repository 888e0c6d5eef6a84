"""How fast hand-designed optimizers reach tuned Adam's loss: what a learned
optimizer's speed can be read against.

The bar's speed measure is the steps an optimizer needs to reach per-task
tuned Adam's loss at the horizon. This runs hand-made variants of Adam on the
same footing (Adam's learning rate tuned as :mod:`benchmarks.compare` tunes
it, then every variant from the same initialisations and batches on the
given seeds): Adam at other learning rates, with its rate decayed linearly to
0 at the horizon, with other betas, NAdam, and, for the weights between
hidden neuron groups, the orthogonalised Nesterov momentum of
:mod:`lopt.ortho` (Muon's direction) at each ``--ortho-lrs`` rate, Adam
elsewhere. What no variant reaches is a hard target; what one reaches is a
direction a learned optimizer's base can take.

    python -m benchmarks.hand_variants --tasks mlp-mnist1d-wide mlp-gmm-hard \\
        --seeds 10 --first-seed 5 --out runs/hand-variants

Writes ``results.md`` (per task and variant: the seed-mean training loss at
the horizon over Adam's, and the steps to Adam's loss as a fraction of the
horizon, on compare's grid of a tenth) and ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from benchmarks.compare import FIRST_TUNE_SEED, QUICK_GRID, summarise
from lopt import cli, ortho
from lopt.features import ADAM_MOMENTUM, MOMENTUM_DECAYS
from lopt.weightspace import WeightSpaceSpec
from tasks import get_task
from tasks.runs import ADAM_GRID, MakeOptimizer, adam, run, tune


class LinearDecayAdam(torch.optim.Adam):
    """Adam whose learning rate falls linearly from ``lr`` to 0 at ``steps``."""

    def __init__(self, params, lr: float, steps: int, **kwargs) -> None:
        super().__init__(params, lr=lr, **kwargs)
        self.peak, self.steps, self.t = lr, steps, 0

    def step(self, closure=None):
        self.t += 1
        for group in self.param_groups:
            group["lr"] = self.peak * max(0.0, 1 - (self.t - 1) / self.steps)
        return super().step(closure)


class OrthoHidden(torch.optim.Optimizer):
    """Weights between hidden neuron groups step by ``-ortho_lr`` times their
    orthogonalised Nesterov momentum (0.9, as the nets' base); every other
    parameter takes Adam's step at ``lr``."""

    def __init__(self, model: nn.Module, lr: float, ortho_lr: float) -> None:
        spec = WeightSpaceSpec.from_module(model)
        params = list(model.parameters())
        hidden = [p for p, t in zip(params, spec.tensors) if ortho.applies(spec, t)]
        ids = {id(p) for p in hidden}
        rest = [p for p in params if id(p) not in ids]
        groups = [{"params": g} for g in (rest, hidden) if g]
        super().__init__(groups, {"lr": ortho_lr})
        self.hidden = hidden
        self.adam = torch.optim.Adam(rest, lr=lr) if rest else None
        self.ortho_lr = ortho_lr

    @torch.no_grad()
    def step(self, closure=None):
        if self.adam is not None:
            self.adam.step()
        for p in self.hidden:
            if p.grad is None:
                continue
            m = self.state[p].setdefault("momentum", torch.zeros_like(p))
            m.lerp_(p.grad, 1 - MOMENTUM_DECAYS[ADAM_MOMENTUM])
            p.add_(ortho.direction(p.grad, m), alpha=-self.ortho_lr)


def variants(lr: float, steps: int, ortho_lrs) -> dict[str, MakeOptimizer]:
    """Every variant's factory, Adam at ``lr`` (the tuned one) first."""
    out: dict[str, MakeOptimizer] = {"adam": adam(lr)}
    for k in (0.5, 0.7, 1.4, 2.0):
        out[f"adam lr x{k:g}"] = adam(lr * k)
    for k in (1.0, 1.5, 2.0):
        out[f"adam lr x{k:g}, linear decay"] = lambda m, k=k: LinearDecayAdam(
            m.parameters(), lr * k, steps
        )
    for b1, b2 in ((0.8, 0.999), (0.95, 0.999), (0.9, 0.99), (0.9, 0.95)):
        out[f"adam betas {b1}, {b2}"] = lambda m, b=(b1, b2): torch.optim.Adam(
            m.parameters(), lr=lr, betas=b
        )
    out["nadam"] = lambda m: torch.optim.NAdam(m.parameters(), lr=lr)
    for o in ortho_lrs:
        out[f"ortho hidden {o:g}, adam elsewhere"] = lambda m, o=o: OrthoHidden(m, lr, o)
    return out


def measure(
    name: str,
    steps: int,
    seeds: list[int],
    tune_seeds: list[int],
    grid,
    ortho_lrs,
    progress: Callable[[str], None] = lambda s: None,
) -> dict:
    """One task: Adam's tuned rate, and per variant its loss at the horizon
    over Adam's and its steps to Adam's loss (``inf``: never)."""
    task = get_task(name)
    lr, _ = tune(task, adam, steps, tune_seeds, grid)
    eval_every = max(1, steps // 10)
    makers = variants(lr, steps, ortho_lrs)
    rows = []  # compare's CSV rows, so that its summary defines the measures
    for label, make in makers.items():
        for seed in seeds:
            curve = run(task, make, steps, seed, eval_every)
            rows += [
                (name, label, seed, s, "train", v)
                for s, v in zip(curve.eval_steps, curve.train_eval)
            ]
        progress(f"{name}: {label}")
    per_task = summarise(rows, steps, factors=(1,))["per_task"]
    out = {}
    for label in makers:
        e = per_task[(name, label)]
        out[label] = {
            "loss": e["loss@1x"],
            "normalised": e["normalised"],
            "steps_to_adam": e["steps_to_baseline"],
        }
    return {"adam_lr": lr, "variants": out}


def markdown(results: dict, command: str) -> str:
    lines = [f"`{command}`", ""]
    lines += ["| task | variant | loss @1x / Adam's | steps to Adam's loss |", "|---|---|---|---|"]
    for name, r in results.items():
        for label, v in r["variants"].items():
            reach = "never" if math.isinf(v["steps_to_adam"]) else f"{v['steps_to_adam']:.2f}x"
            shown = label if label != "adam" else f"adam (tuned, lr {r['adam_lr']:.0e})"
            lines.append(f"| {name} | {shown} | {v['normalised']:.3f} | {reach} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = cli.ArgumentParser(
        prog="python -m benchmarks.hand_variants",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--tasks", nargs="+", default=["mlp-mnist1d-wide", "mlp-gmm-hard"])
    p.add_argument("--steps", type=int, default=200, help="the horizon (200)")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--first-seed", type=int, default=5)
    p.add_argument("--tune-seeds", type=int, default=2, help="as benchmarks.compare (2)")
    p.add_argument("--ortho-lrs", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1])
    p.add_argument("--quick", action="store_true", help="CI size: compare's 3-point grid")
    p.add_argument("--out", type=Path, default=Path("runs/hand-variants"))
    args = p.parse_args(argv)
    for name in args.tasks:
        get_task(name)  # an unknown name raises (with close names) before anything runs
    if args.steps < 1 or args.seeds < 1 or any(o <= 0 for o in args.ortho_lrs):
        raise SystemExit("--steps and --seeds must be positive, and every --ortho-lrs rate too")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    tune_seeds = list(range(FIRST_TUNE_SEED, FIRST_TUNE_SEED + args.tune_seeds))
    grid = QUICK_GRID if args.quick else ADAM_GRID
    command = "python -m benchmarks.hand_variants " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    results = {
        name: measure(
            name,
            args.steps,
            seeds,
            tune_seeds,
            grid,
            args.ortho_lrs,
            lambda s: print(s, file=sys.stderr, flush=True),
        )
        for name in args.tasks
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"command": command, "tasks": results}))
    text = markdown(results, command)
    (args.out / "results.md").write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    cli.run(main, "python -m benchmarks.hand_variants")
